"""The `ptq` step: post-training INT8 quantization with onnxruntime, kept only when it measures faster.

onnxruntime.quantization does the QDQ insertion and calibration. What mlopt adds is the part users
of every quantization tool miss: each candidate configuration is timed on the real runtime and
scored on the validation data, and the fastest one within the accuracy budget wins. When none is
faster than FP32, the FP32 model is handed back with the reason. When the fastest misses the
budget, the most sensitive nodes (lowest SQNR) are kept in float, one group at a time.

Measured on a 2-core AVX512-VNNI CPU: onnxruntime's own defaults (QDQ, S8S8, per-tensor) fuse only
9 of resnet18's 20 convolutions and run 3.7x slower than FP32, while U8S8 per-channel QDQ fuses
all 20; hence U8S8 first, and hence measuring instead of trusting any default.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mlopt.core import console
from mlopt.core.contracts import Pass, StepResult, cli
from mlopt.core.errors import InputError, RunError, first_line
from mlopt.core.fsutil import file_size_mb
from mlopt.core.sections import Strict, Bars, Table
from mlopt.export.lib.onnx import ExportOptions, export_checked
from mlopt.export.lib.fusion import float_attention, per_batch_note
from mlopt.export.lib.timing import NOISE_CAP, TIMING_ROUNDS, best_of, interleaved_rounds, spread_of
from mlopt.quant.lib import graph
from mlopt.quant.lib.quantize import (Quality, Scheme, candidate_schemes, describe_latency, latency_entries,
                                      not_faster_at, preprocess, quantize, reduce_range_for, speedups)
from mlopt.quant.lib.sensitivity import node_sqnr
from mlopt.runtime import hf
from mlopt.runtime.session import input_specs, make_session


class PTQConfig(Strict):
    """Quantize to INT8 with onnxruntime; in auto mode, keep the fastest candidate within budget."""

    type: Literal["ptq"] = "ptq"
    mode: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="auto: measure candidates, keep the fastest within budget")
    format: Literal["qdq", "qoperator"] = Field("qdq", description="static/dynamic modes: graph format")
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = Field(True, description="weight scales per channel or per tensor (static/dynamic modes)",
                              json_schema_extra=cli(flag="--per-channel/--per-tensor"))
    calibration: Literal["auto", "minmax", "percentile", "entropy"] = Field(
        "auto", description="auto: minmax and percentile candidates in auto mode, minmax otherwise")
    calibration_samples: int = Field(256, gt=0, description="training samples used to calibrate")
    reduce_range: Literal["auto", "on", "off"] = Field("auto", description="auto: on for CPUs without VNNI")
    preprocess: bool = Field(True, description="shape inference and graph fusion by onnxruntime before quantizing")
    max_drop: float = Field(0.01, ge=0, le=1, description="allowed top-1 drop (0.01 = 1 point)")
    min_cosine: float = Field(0.99, ge=-1, le=1, description="fidelity floor when the data has no labels")
    smooth_alpha: float = Field(0.5, ge=0, le=1, description="static INT8 on transformer encoders: SmoothQuant's "
                                "migration strength (activation outliers moved into the weights); 0: no smoothing")
    fallback: bool = Field(True, description="keep the most sensitive nodes in float until the budget is met")
    fallback_groups: int = Field(5, gt=0, description="at most this many groups of nodes are kept in float")
    provider: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1, description="batch sizes timed",
                                   json_schema_extra=cli(flag="--batch-size", short="-b"))
    iterations: int = Field(30, gt=0, description="timed runs per candidate and batch size", json_schema_extra=cli(short="-n"))
    # Decoder language models: weight-only INT4/INT8 (mlopt.quant.lib.weightsearch).
    max_ppl_increase: float = Field(0.05, ge=0, description="decoders: allowed perplexity increase over FP32 (0.05 = 5%)")
    algorithms: list[str] = Field(
        default_factory=lambda: ["rtn", "hqq", "k_quant"], min_length=1,
        description="decoders: INT4 weight algorithms measured; gptq (calibrated on the training lines) is not a "
                    "default: it takes minutes even on a 135M-parameter decoder on 2 cores",
        json_schema_extra=cli(flag="--algorithm"))
    block_sizes: list[int] = Field(
        default_factory=lambda: [32, 128], min_length=1, description="decoders: block sizes measured (INT4 and INT8)",
        json_schema_extra=cli(flag="--block-size"))
    accuracy_levels: list[int] = Field(
        default_factory=lambda: [4, 0], min_length=1,
        description="decoders: MatMulNBits accuracy levels (4: int8 activations); the first screens, the rest are "
                    "tried on the candidates within budget", json_schema_extra=cli(flag="--accuracy-level"))
    window: int = Field(128, ge=8, description="decoders: tokens per perplexity window")
    max_windows: int = Field(40, gt=0, description="decoders: perplexity windows at most")
    prompt_tokens: int = Field(128, gt=0, description="decoders: prompt length timed")
    new_tokens: int = Field(64, gt=0, description="decoders: tokens generated when timing")
    rounds: int = Field(3, gt=0, description="decoders: interleaved timing rounds")

    @field_validator("algorithms", "block_sizes", "accuracy_levels")
    @classmethod
    def _decoder_choices(cls, values: list[Any], info: Any) -> list[Any]:
        allowed = {"algorithms": ("rtn", "hqq", "gptq", "k_quant"), "block_sizes": (16, 32, 64, 128, 256),
                   "accuracy_levels": (0, 1, 2, 3, 4)}[info.field_name]
        wrong = [v for v in values if v not in allowed]
        if wrong:
            raise ValueError(f"{info.field_name} must be among {', '.join(map(str, allowed))}, not {wrong[0]}")
        return list(dict.fromkeys(values))

    @model_validator(mode="after")
    def _options_used(self) -> "PTQConfig":
        """An option the chosen mode would not use is an error, never silently dropped."""
        scheme = {"format", "activation_type", "per_channel", "weight_type"} & self.model_fields_set
        if self.mode == "auto" and scheme:
            raise ValueError(f"{', '.join(sorted(scheme))} apply to mode static or dynamic; mode auto measures its own candidates")
        if self.mode == "dynamic" and ({"format", "activation_type", "smooth_alpha"} & self.model_fields_set
                                       or self.calibration != "auto"):
            raise ValueError("dynamic quantization has no activation format, type, calibration or smoothing")
        return self


@dataclass
class Candidate:
    """One measured model (FP32 or a quantized candidate): its file, speed, quality and kernels."""

    name: str
    scheme: Scheme | None
    path: Path
    latency: dict[int, float]  # batch size -> median ms, from interleaved rounds
    quality: dict[str, Any]  # accuracy, accuracy_drop (labelled data), cosine_mean, cosine_min
    size_mb: float
    kernels: dict[str, Any]  # graph.kernel_counts
    faster_than_fp32: bool | None = None  # None: the FP32 model itself
    within_budget: bool | None = None
    sensitivity: list[dict[str, Any]] = field(default_factory=list)  # nodes kept in float, lowest SQNR first
    base: Path | None = None  # the float graph it was quantized from
    split: bool = False  # its fused layer norms and GELUs split after quantizing (rewrite.split_fusions)
    rounds: dict[int, list[float]] = field(default_factory=dict)  # batch size -> each timing round's median ms

    @property
    def spread(self) -> float:
        """How far its timing rounds disagree (0.05: the median round 5% above the best)."""
        return spread_of(self.rounds) if self.rounds else 0.0


@dataclass
class Plan:
    """What the phases of a PTQ run share: the FP32 model, its prepared form, the calibration data, the results."""

    artifact: Any
    fp32: Path
    pre: Path
    schemes: list[Scheme]
    feeds: list[dict[str, Any]]
    reduce_range: bool
    text: bool
    work: Path
    notes: list[str]
    fusions: dict[str, int] = field(default_factory=dict)
    # The graphs each scheme quantizes, with their labels: the pre-processed model, and for transformer
    # encoders other spellings of it too (see `text_bases`).
    bases: list[tuple[str, Path]] = field(default_factory=list)
    quality: Quality | None = None
    fp32_row: Candidate | None = None
    candidates: list[Candidate] = field(default_factory=list)


class PTQPass(Pass):
    name = "ptq"
    config_class = PTQConfig
    needs_data = True
    compresses = True
    text_ok = True
    decoder_ok = True
    cli_help = ("Post-training INT8 quantization (onnxruntime), kept only when measured faster and within budget; "
                "decoder language models get weight-only INT4/INT8, chosen by measured perplexity and decode speed.")

    @classmethod
    def check_family(cls, config: PTQConfig, decoder: bool) -> None:
        _check_family(config, decoder)

    def run(self, artifact: Any, config: PTQConfig, ctx: Any) -> StepResult:
        if artifact.is_decoder:
            return quantize_decoder(artifact, config, ctx)
        with tempfile.TemporaryDirectory(prefix="mlopt-ptq-", ignore_cleanup_errors=True) as work:
            plan = _plan(artifact, config, ctx.data, Path(work))
            _measure(plan, config, ctx.data)
            return _finish(plan, _choose_model(plan, config), config, Path(ctx.out_dir) / "model.onnx")


DECODER_FIELDS = ("max_ppl_increase", "algorithms", "block_sizes", "accuracy_levels", "window", "max_windows",
                  "prompt_tokens", "new_tokens", "rounds")


def _check_family(config: PTQConfig, decoder: bool) -> None:
    """Options of the other model family are errors: a decoder's are weight-only, an encoder's are INT8 graphs."""
    given = config.model_fields_set - {"type"}
    wrong = sorted(given - set(DECODER_FIELDS) - {"mode"} if decoder else given & set(DECODER_FIELDS))
    if wrong:
        kind = "a decoder language model (weight-only quantization)" if decoder else "a model that is not a decoder language model"
        raise InputError(f"ptq option(s) {', '.join('--' + w.replace('_', '-') for w in wrong)} do not apply to {kind}")
    if decoder and config.mode != "auto":
        raise InputError("a decoder language model is quantized in mode auto (weight-only candidates, measured)")


def quantize_decoder(artifact: Any, config: PTQConfig, ctx: Any) -> StepResult:
    """Weight-only candidates of a decoder (exported first when it is still an HF folder), measured; the chosen one kept."""
    from mlopt.export.lib.decoder import export_decoder
    from mlopt.quant.lib.weightsearch import Settings, search_decoder

    settings = Settings(**{name: getattr(config, name) for name in DECODER_FIELDS})
    with tempfile.TemporaryDirectory(prefix="mlopt-ptq-", ignore_cleanup_errors=True) as work:
        notes = []
        if artifact.format == "causal-lm":
            exported = export_decoder(artifact, Path(work) / "fp32")
            artifact, notes = exported.artifact, exported.notes
        result = search_decoder(artifact, settings, ctx.data, Path(work), Path(ctx.out_dir))
        result.notes[:0] = notes
        return result


def _plan(artifact: Any, config: PTQConfig, data: Any, work: Path) -> Plan:
    """The FP32 ONNX model (exported if need be) checked, pre-processed, and the candidate schemes with their calibration data."""
    from mlopt.quant.lib.calibration import calibration_batches

    notes: list[str] = []
    if artifact.format == "torch":
        exported = export_checked(artifact, data, work / "fp32.onnx", ExportOptions())
        artifact, notes = exported.artifact, exported.notes
    fp32 = Path(artifact.require_onnx("ptq"))
    model = graph.load(fp32)
    if graph.quantized_ops(model):
        raise InputError(f"{artifact.origin} is already quantized ({', '.join(graph.quantized_ops(model))}); give the FP32 model")
    if not graph.has_float_weights(model):
        raise InputError(f"{artifact.origin} has no float Conv/MatMul/Gemm weights to quantize")
    text = hf.is_text_artifact(artifact)
    if not text and float_attention(model):
        notes.append(f"the model's {float_attention(model)} fused attention node(s) stay in float (onnxruntime's "
                     "QAttention takes neither an attention bias nor unequal qkv_hidden_sizes, and "
                     "MultiHeadAttention has no INT8 form)")
        console.warn(notes[-1])
    if "smooth_alpha" in config.model_fields_set and not text:
        raise InputError("--smooth-alpha applies to transformer encoders (hf: text models); this model's static "
                         "candidates quantize every operator onnxruntime can")
    schemes = candidate_schemes(config, any(n.op_type == "Conv" for n in model.graph.node), text)
    feeds = []
    if any(s.method == "static" for s in schemes):  # dynamic quantization needs no calibration
        name, shape, _ = input_specs(make_session(fp32, "cpu"))[0]
        feeds = calibration_batches(data, name, shape, config.calibration_samples)
    fusions: dict[str, int] = {}
    if not config.preprocess:
        pre, note = fp32, None
    elif text:
        pre, fusions, note = hf.optimize(fp32, work / "pre.onnx", artifact.builder["hf"])
        console.info("transformer optimizer fusions: " + (", ".join(f"{k} {v}" for k, v in fusions.items()) or "none"))
    else:
        pre, note = preprocess(fp32, work / "pre.onnx")
    if note:
        console.warn(note)
        notes.append(note)
    # static INT8 on text quantizes the model as given (`_static_text_base`): no other graphs to build
    dynamic = any(s.method == "dynamic" for s in schemes)
    bases = text_bases(fp32, pre, work, notes) if text and config.preprocess and dynamic else [("", pre)]
    return Plan(artifact, fp32, pre, schemes, feeds, reduce_range_for(config.reduce_range), text, work, notes, fusions,
                bases=bases)


def text_bases(fp32: Path, pre: Path, work: Path, notes: list[str]) -> list[tuple[str, Path]]:
    """The graphs of a transformer encoder that each scheme quantizes: onnxruntime's transformer optimizer's
    output, the model as given, and the model with onnxscript's fused Attention (when the given one has none).
    Fused attention is quantized (QAttention) only with a mask index: an attention bias that is a key-padding
    mask becomes one (`attention_mask_index`); a fused attention that keeps its bias stays in float and is said."""
    import onnx

    from mlopt.export.lib.fusion import fuse
    from mlopt.export.lib.rewrite import attention_mask_index

    bases = [("onnxruntime's transformer optimizer", pre)] if pre != fp32 else []
    given = work / "given.onnx"
    bases.append(("the model as given", given if attention_mask_index(fp32, given) else fp32))
    left = float_attention(graph.load(bases[-1][1]))
    if left:
        notes.append(f"the model's {left} fused attention node(s) stay in float (onnxruntime's QAttention takes "
                     "neither an attention bias other than a key-padding mask nor unequal qkv_hidden_sizes, and "
                     "MultiHeadAttention has no INT8 form); ptq on the PyTorch model, before export, fuses its own")
        console.warn(notes[-1])
    if not any(n.op_type in ("Attention", "MultiHeadAttention") for n in graph.load(fp32).graph.node):
        fused, masked = work / "fused.onnx", work / "fused-mask.onnx"
        if fuse(fp32, fused).get("Attention") and attention_mask_index(fused, masked) and not float_attention(
                onnx.load(str(masked), load_external_data=False)):
            bases.append(("onnxscript's fused attention", masked))
    return bases


def _measure(plan: Plan, config: PTQConfig, data: Any) -> None:
    """Quantize every candidate scheme on every base graph, time them beside FP32 in interleaved rounds, score
    them all. A quantized transformer whose fused layer norm or GELU onnxruntime runs slower than the plain
    operators is a candidate again with them split (`split_fusions`): measured, not assumed."""
    from mlopt.export.lib.rewrite import split_fusions

    made: list[tuple[str, Scheme, Path, Path, bool]] = []
    for scheme in plan.schemes:
        bases = _static_text_base(plan, config) if plan.text and scheme.method == "static" else plan.bases
        for label, base in bases:
            name = scheme.name + (f" on {label}" if label else "")
            path = plan.work / f"candidate{len(made)}.onnx"
            console.info(f"quantizing: {name}")
            try:
                quantize(base, path, scheme, plan.feeds, plan.reduce_range)
            except RunError as exc:
                if not made and (scheme, base) == (plan.schemes[-1], bases[-1]):
                    raise  # nothing else to measure
                plan.notes.append(f"{name}: not a candidate ({exc})")
                console.warn(plan.notes[-1])
                continue
            made.append((name, scheme, path, base, False))
            split = path.with_name(f"split-{path.name}")
            if plan.text and split_fusions(path, split):
                made.append((f"{name}, fusions split", scheme, split, base, True))
    console.info(f"timing FP32 and {len(made)} candidate(s) on onnxruntime ({config.provider})")
    fp32_rounds, *timed = interleaved_rounds([plan.fp32, *(m[2] for m in made)], plan.artifact.sample_shape,
                                             config.provider, config.batch_sizes, config.iterations)
    fp32_latency = best_of(fp32_rounds)
    plan.quality = Quality(plan.fp32, data, config.max_drop, config.min_cosine)
    plan.fp32_row = Candidate("FP32", None, plan.fp32, fp32_latency, plan.quality.baseline, file_size_mb(plan.fp32),
                              graph.kernel_counts(plan.fp32), rounds=fp32_rounds)
    _log(plan.fp32_row)
    for (name, scheme, path, base, split), rounds in zip(made, timed):
        row = _score(plan, scheme, path, best_of(rounds), fp32_latency, name=name, base=base, split=split)
        row.rounds = rounds


NOISE_FLOOR = 0.02  # two models closer than this are never told apart by one set of rounds


def _geomean(row: Candidate) -> float:
    return math.prod(row.latency.values()) ** (1 / len(row.latency))


def _quality_key(row: Candidate) -> float:
    return row.quality["accuracy"] if "accuracy" in row.quality else row.quality["cosine_mean"]


def _tied(rows: list[Candidate]) -> list[Candidate]:
    """The rows as fast as the fastest one as far as their timing rounds can tell: within the larger of 2% and
    either row's round spread, and never more than 10%."""
    rows = sorted(rows, key=_geomean)
    first = rows[0] if rows else None
    return [r for r in rows if _geomean(r) <= _geomean(first) * (1 + _noise(first, r))]


def _noise(*rows: Candidate) -> float:
    return min(NOISE_CAP, max(NOISE_FLOOR, *(r.spread for r in rows)))


SETTLE_AT_MOST = 4  # candidates timed again together


def _settle(plan: Plan, config: PTQConfig) -> Candidate | None:
    """When candidates that qualify are within the timing noise of the fastest (`_tied`), time them again beside
    FP32 in twice as many rounds and decide on all rounds: a busy machine must not flip the choice between
    near-equal models. Those still within the noise are equally fast as far as this machine can tell: the one
    closest to FP32 (accuracy, else cosine; then the candidates' order) is returned, so that the choice does not
    depend on the load of the moment."""
    ok = [r for r in plan.candidates if r.faster_than_fp32 and r.within_budget]
    tied = _tied(ok)[:SETTLE_AT_MOST]
    if len(tied) < 2:
        return None
    rows = [plan.fp32_row, *tied]
    extra = interleaved_rounds([r.path for r in rows], plan.artifact.sample_shape, config.provider,
                               config.batch_sizes, config.iterations * 2, 2 * TIMING_ROUNDS)
    for row, more in zip(rows, extra):
        row.rounds = {b: row.rounds.get(b, []) + more[b] for b in more}
        row.latency = best_of(row.rounds)
    for row in tied:
        row.faster_than_fp32 = not not_faster_at(row.latency, plan.fp32_row.latency)
    plan.notes.append(f"{', '.join(r.name for r in tied)}: within the timing noise of each other, timed again in "
                      f"{2 * TIMING_ROUNDS} more interleaved rounds, and decided on all of them")
    console.info(plan.notes[-1])
    still = _tied([r for r in tied if r.faster_than_fp32])
    if len(still) < 2:
        return None
    order = {id(r): i for i, r in enumerate(plan.candidates)}
    closest = max(still, key=lambda r: (_quality_key(r), -order[id(r)]))
    plan.notes.append(f"{', '.join(r.name for r in still)}: still within the timing noise ("
                      f"{100 * _noise(*still):.1f}%); kept {closest.name}, the closest "
                      "to FP32")
    console.info(plan.notes[-1])
    return closest


def _static_text_base(plan: Plan, config: PTQConfig) -> list[tuple[str, Path]]:
    """The graph static INT8 quantizes on a transformer: the model as given (static QDQ inside onnxruntime's fused
    operators is not supported), smoothed (mlopt.quant.lib.smoothing) unless --smooth-alpha is 0."""
    from mlopt.quant.lib.smoothing import smooth

    smoothed = plan.work / "smoothed.onnx"
    try:
        if config.smooth_alpha > 0 and smooth(plan.fp32, smoothed, plan.feeds, config.smooth_alpha):
            return [(f"the model as given, SmoothQuant alpha {config.smooth_alpha:g}", smoothed)]
    except Exception as exc:  # static without smoothing is still a candidate; say why
        plan.notes.append(f"SmoothQuant could not run ({type(exc).__name__}: {first_line(exc)[:120]}); static INT8 "
                          "quantizes the model unsmoothed")
        console.warn(plan.notes[-1])
    return [("the model as given", plan.fp32)]


def _score(plan: Plan, scheme: Scheme, path: Path, latency: dict[int, float], fp32_latency: dict[int, float],
           sensitivity: list[dict[str, Any]] | None = None, name: str | None = None, base: Path | None = None,
           split: bool = False) -> Candidate:
    """A quantized model scored and added to the candidates."""
    q = plan.quality.score(path)
    name = (name or scheme.name) + (f" + {_float_nodes(sensitivity)} nodes in float" if sensitivity else "")
    row = Candidate(name, scheme, path, latency, q, file_size_mb(path), graph.kernel_counts(path),
                    faster_than_fp32=not not_faster_at(latency, fp32_latency),
                    within_budget=plan.quality.within_budget(q), sensitivity=sensitivity or [], base=base or plan.pre,
                    split=split)
    plan.candidates.append(row)
    _log(row)
    return row


def _float_nodes(sensitivity: list[dict[str, Any]]) -> int:
    """How many nodes a fallback keeps in float (a row names one node, or the MatMuls that read its tensor)."""
    return sum(len(r["node"].split(", ")) for r in sensitivity)


def _log(row: Candidate) -> None:
    q = row.quality
    quality = f"top-1 {q['accuracy']:.4f}" if "accuracy" in q else f"cosine {q.get('cosine_mean', 1):.4f}"
    console.info(f"{row.name}: {describe_latency(row.latency)}; {quality}; {row.kernels['integer']} integer / "
                 f"{row.kernels['float']} float kernels")


def _fastest(rows: list[Candidate]) -> Candidate:
    """The lowest geometric mean latency over the batch sizes."""
    return min(rows, key=lambda r: math.prod(r.latency.values()))


def _choose_model(plan: Plan, config: PTQConfig) -> Candidate | None:
    """The fastest candidate that is faster and within budget; else a fallback; else, in static or dynamic
    mode, the scheme asked for; else None (FP32 goes back)."""
    tie = _settle(plan, config) if config.mode == "auto" else None
    ok = [r for r in plan.candidates if r.faster_than_fp32 and r.within_budget]
    chosen = tie or (_fastest(ok) if ok else None)
    if chosen is None and config.fallback:
        chosen = _fallback(plan, config)
    if chosen is None and config.mode != "auto":
        # The user asked for this exact scheme: hand it back, and say plainly what it costs.
        within = [r for r in plan.candidates if r.within_budget]
        chosen = _fastest(within) if within else plan.candidates[0]
        if not chosen.faster_than_fp32:
            plan.notes.append(f"{chosen.name} is SLOWER than FP32 on this machine: {describe_latency(chosen.latency)}")
            console.warn(plan.notes[-1])
        if not chosen.within_budget:
            plan.notes.append(f"{chosen.name} misses the quality budget ({plan.quality.budget_text()})")
            console.warn(plan.notes[-1])
    return chosen


def _fallback(plan: Plan, cfg: PTQConfig) -> Candidate | None:
    """Keep the most sensitive nodes of the fastest static candidate in float, a group at a time."""
    from mlopt.export.lib.rewrite import split_fusions

    fast = [r for r in plan.candidates if r.faster_than_fp32 and r.scheme.method == "static"]
    if not fast:
        return None
    base = _fastest(fast)
    ranking = node_sqnr(base.base, base.path, plan.feeds[:2])
    if base.scheme.weight_matmuls_only:  # a tensor stays float when the MatMuls that read it do
        ranking = [{**r, "node": ", ".join(r["readers"])} for r in ranking if r["readers"]]
    if not ranking:
        return None
    group = max(1, math.ceil(len(ranking) / 10))
    console.info(f"{base.scheme.name} misses the budget ({plan.quality.budget_text()}); "
                 "keeping sensitive nodes in float")
    fp32_latency = plan.fp32_row.latency
    for g in range(1, min(cfg.fallback_groups, math.ceil(len(ranking) / group)) + 1):
        kept = ranking[: g * group]
        path = plan.work / f"fallback{g}.onnx"
        quantize(base.base, path, base.scheme, plan.feeds, plan.reduce_range,
                 [name for r in kept for name in r["node"].split(", ")])
        if base.split:  # as the candidate it comes from
            split_fusions(path, path)
        # Timed beside the FP32 model again, in the same interleaved rounds.
        fp32_now, rounds = interleaved_rounds([Path(plan.artifact.onnx_path), path], plan.artifact.sample_shape,
                                              cfg.provider, cfg.batch_sizes, cfg.iterations)
        fp32_latency = {b: min(fp32_latency[b], ms) for b, ms in best_of(fp32_now).items()}
        row = _score(plan, base.scheme, path, best_of(rounds), fp32_latency, kept, name=base.name, base=base.base,
                     split=base.split)
        row.rounds = rounds
        if not row.faster_than_fp32:
            break
        if row.within_budget:
            plan.notes.append("kept in float (lowest SQNR first): "
                              + ", ".join(f"{r['node']} ({r['sqnr_db']:.1f} dB)" for r in kept))
            return row
    return None


def _finish(plan: Plan, chosen: Candidate | None, config: PTQConfig, out: Path) -> StepResult:
    """Hand back the chosen model (or FP32), with its metrics, notes, latencies and the candidates table."""
    quality, fp32 = plan.quality, plan.fp32_row
    shutil.copyfile(chosen.path if chosen else plan.fp32, out)
    metrics: dict[str, Any] = {"fp32_size_mb": fp32.size_mb, "reduce_range": plan.reduce_range,
                               "calibration_samples": sum(len(next(iter(f.values()))) for f in plan.feeds),
                               "budget": quality.budget_text()}
    if plan.text:
        metrics["sequence_length"] = plan.artifact.sample_shape[0]
    if quality.labeled:
        metrics["fp32_accuracy"] = quality.baseline["accuracy"]
    latency = [entry for row in [fp32, *plan.candidates]
               for entry in latency_entries(row.latency, row.name, config.provider, output=row is (chosen or fp32))]
    result = StepResult(artifact=plan.artifact.derive("ptq", onnx_path=out), metrics=metrics, notes=plan.notes,
                        latency=latency, sections=_sections(plan))
    if chosen is None:
        if not any(r.faster_than_fp32 for r in plan.candidates):
            reason = "no INT8 candidate ran faster than FP32 on this machine and provider (see the candidates table)"
        else:
            reason = f"every INT8 candidate that ran faster than FP32 missed the budget ({quality.budget_text()})"
        plan.notes.append(f"kept the FP32 model: {reason}")
        console.warn(plan.notes[-1])
        metrics.update(quantized=False, chosen="FP32", size_mb=fp32.size_mb, **quality.baseline)
        return result
    within = [r for r in plan.candidates if r.within_budget]
    for b in chosen.latency if within else []:  # one file serves every batch size: say where one alone differs
        best = min(within, key=lambda r: r.latency[b])
        if best is not chosen:
            plan.notes.append(per_batch_note(b, best.name, best.latency[b], chosen.name, chosen.latency[b]))
    speedup = speedups(fp32.latency, chosen.latency)
    metrics.update(quantized=True, chosen=chosen.name, **speedup, size_mb=chosen.size_mb,
                   size_ratio=fp32.size_mb / chosen.size_mb, float_nodes=_float_nodes(chosen.sensitivity),
                   integer_kernels=chosen.kernels["integer"], float_kernels=chosen.kernels["float"], **chosen.quality,
                   within_budget=chosen.within_budget)
    if chosen.kernels["float"]:
        plan.notes.append(f"onnxruntime left {chosen.kernels['float']} Conv/MatMul/Gemm kernel(s) in float: "
                          f"{', '.join(chosen.kernels['float_ops'])}")
    speed = ", ".join(f"{s:.2f}x faster at batch {b}" if s >= 1 else f"{1 / s:.2f}x SLOWER at batch {b}"
                      for b, s in zip(fp32.latency, speedup.values()))
    budget = f"within {quality.budget_text()}" if chosen.within_budget else f"MISSING the budget ({quality.budget_text()})"
    plan.notes.append(f"{'chose' if config.mode == 'auto' else 'quantized as asked'} {chosen.name}: {speed}, "
                      f"{metrics['size_ratio']:.2f}x smaller, {budget}")
    (console.info if chosen.within_budget and chosen.faster_than_fp32 else console.warn)(plan.notes[-1])
    return result


def _sections(plan: Plan) -> list[Any]:
    """The candidates table, the sensitivity of the nodes kept in float, and the transformer fusions."""
    sizes = list(plan.fp32_row.latency)
    rows = [[r.name, r.faster_than_fp32, r.within_budget, *(r.latency[b] for b in sizes), r.quality.get("accuracy"),
             r.quality.get("accuracy_drop"), r.quality["cosine_mean"], r.quality["cosine_min"], r.size_mb,
             r.kernels["integer"], r.kernels["float"], _float_nodes(r.sensitivity), round(100 * r.spread, 1)]
            for r in [plan.fp32_row, *plan.candidates]]
    sections: list[Any] = [Table(
        title="PTQ candidates", rows=rows,
        columns=["model", "faster than FP32", "within budget", *(f"batch {b} ms" for b in sizes), "top-1",
                 "top-1 drop", "cosine mean", "cosine min", "size MB", "integer kernels", "float kernels",
                 "nodes in float", "round spread %"],
        note=f"latency: median of the best of interleaved rounds; round spread: the "
             f"median round over the best, minus 1; budget: {plan.quality.budget_text()}")]
    sens = next((r.sensitivity for r in reversed(plan.candidates) if r.sensitivity), None)
    if sens:
        sections.append(Bars(title="quantization sensitivity (lowest SQNR kept in float)", labels=[s["node"] for s in sens],
                             series={"SQNR": [s["sqnr_db"] for s in sens]}, unit="dB"))
    if plan.text:
        sections.append(Table(title="transformer optimizer fusions", columns=["fusion", "count"],
                              rows=[[k, v] for k, v in plan.fusions.items()]))
    return sections
