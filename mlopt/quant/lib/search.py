"""The INT8 candidate search of `ptq`, shared with `qat` on encoders: the FP32 model checked and prepared, every
candidate scheme quantized on every base graph, timed beside FP32 in interleaved rounds and scored, near-equal ones
timed again, and the choice among them (`ptq`'s docstring says why measuring, not trusting a default).

`config` is the ptq step's settings (mlopt.quant.ptq.PTQConfig), or `Settings` where another step searches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlopt.core import console
from mlopt.core.errors import InputError, RunError, first_line
from mlopt.core.fsutil import file_size_mb
from mlopt.core.sections import Bars, Table
from mlopt.export.lib.fusion import float_attention
from mlopt.export.lib.onnx import ExportOptions, export_checked
from mlopt.export.lib.timing import NOISE_CAP, TIMING_ROUNDS, best_of, interleaved_rounds, paired_ratio, spread_of
from mlopt.quant.lib import graph
from mlopt.quant.lib.quantize import (Quality, Scheme, candidate_schemes, describe_latency, not_faster_at, preprocess,
                                      quantize, reduce_range_for)
from mlopt.quant.lib.sensitivity import dynamic_sqnr, node_sqnr
from mlopt.runtime import hf
from mlopt.runtime.session import input_specs, make_session


@dataclass
class Settings:
    """What the search reads of ptq's settings, for a step other than ptq (qat on encoders): dynamic INT8 with
    int8 weights per channel on every base graph, timed at `batch_sizes`, no quality budget (the caller judges)."""

    batch_sizes: list[int]
    iterations: int
    mode: str = "dynamic"
    weight_type: str = "int8"
    per_channel: bool = True
    provider: str = "cpu"
    preprocess: bool = True
    reduce_range: str = "auto"
    max_drop: float = 1.0
    min_cosine: float = 0.0
    fallback: bool = False
    model_fields_set: frozenset[str] = frozenset()


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
    timed_with: int = 0  # rows with the same number were timed in the same interleaved rounds (`_paired`)

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


def prepare(artifact: Any, config: Any, data: Any, work: Path) -> Plan:
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
        raise InputError("--smooth-alpha applies to transformer encoders (hf: text models) and decoder language "
                         "models; this model's static candidates quantize every operator onnxruntime can")
    schemes = candidate_schemes(config, any(n.op_type == "Conv" for n in model.graph.node), text)
    feeds = []
    static = any(s.method == "static" for s in schemes)
    if static or config.fallback:  # dynamic quantization needs none, but its fallback ranks what it quantizes on them
        try:
            name, shape, dtype = input_specs(make_session(fp32, "cpu"))[0]
            feeds = calibration_batches(data, name, shape, config.calibration_samples, dtype=dtype)
        except InputError as exc:
            if static:
                raise
            notes.append(f"no fallback for dynamic INT8: no calibration inputs ({first_line(exc)})")
    fusions: dict[str, int] = {}
    if not config.preprocess:
        pre, note = fp32, None
    elif text:
        pre, fusions, note = hf.optimize(fp32, work / "pre.onnx", artifact.builder["hf"])
        console.info("transformer optimizer fusions: " + (", ".join(f"{k} {v}" for k, v in fusions.items()) or "none"))
    else:
        pre, note = preprocess(fp32, work / "pre.onnx")
    if note:  # on text the other graphs are still candidates: said in the report, not warned
        (console.info if text else console.warn)(note)
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


def measure(plan: Plan, config: Any, data: Any, quality: Quality | None = None) -> None:
    """Quantize every candidate scheme on every base graph, time them beside FP32 in interleaved rounds, score
    them all by `quality` (default: against the plan's FP32 model). A quantized transformer whose fused
    layer norm or GELU onnxruntime runs slower than the plain operators is a candidate again with them split
    (`split_fusions`): measured, not assumed."""
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
    plan.quality = quality or Quality(plan.fp32, data, config.max_drop, config.min_cosine)
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


def tied(rows: list[Candidate]) -> list[Candidate]:
    """The rows as fast as the fastest one as far as their timing rounds can tell. Rows timed in the same rounds
    are compared round by round (`_paired`): within the larger of 2% and the noise of their per-round ratios.
    Others by their best rounds: within the larger of 2% and either row's round spread. Never more than 10%."""
    rows = sorted(rows, key=_geomean)
    first = rows[0] if rows else None
    return [r for r in rows if _slower_by(first, r) <= _noise(first, r)]


def _slower_by(first: Candidate, row: Candidate) -> float:
    paired = _paired(first, row)
    return (paired[0] if paired else _geomean(row) / _geomean(first)) - 1


def _noise(*rows: Candidate) -> float:
    """The timing noise two rows carry (of their per-round ratios where `_paired`), between 2% and 10%."""
    paired = _paired(*rows) if len(rows) == 2 else None
    return min(NOISE_CAP, max(NOISE_FLOOR, *([paired[1]] if paired else (r.spread for r in rows))))


def _paired(a: Candidate, b: Candidate) -> tuple[float, float] | None:
    """b's latency over a's and its noise, round by round (`paired_ratio`), where both were timed in the same
    interleaved rounds; None where not. Measured on MiniLM beside a busy process: two INT8 graphs 6-8% apart spread
    12-26% round to round, which made them a tie half the time; their per-round ratio held."""
    if a.timed_with != b.timed_with:
        return None
    return paired_ratio(a.rounds, b.rounds)


SETTLE_AT_MOST = 4  # candidates timed again together
QUALITY_TIE = 1e-4  # cosines (or accuracies) closer than this are equally close to FP32


def settle(plan: Plan, config: Any) -> Candidate | None:
    """When candidates that qualify are within the timing noise of the fastest (`tied`), time them again beside
    FP32 in twice as many rounds and decide on all rounds: a busy machine must not flip the choice between
    near-equal models. Those still within the noise are equally fast as far as this machine can tell: the one
    closest to FP32 (accuracy, else cosine; then the candidates' order) is returned, so that the choice does not
    depend on the load of the moment."""
    ok = [r for r in plan.candidates if r.faster_than_fp32 and r.within_budget]
    near = tied(ok)[:SETTLE_AT_MOST]
    if len(near) < 2:
        return None
    rows = [plan.fp32_row, *near]
    extra = interleaved_rounds([r.path for r in rows], plan.artifact.sample_shape, config.provider,
                               config.batch_sizes, config.iterations * 2, 2 * TIMING_ROUNDS)
    for row, more in zip(rows, extra):
        row.rounds = {b: row.rounds.get(b, []) + more[b] for b in more}
        row.latency = best_of(row.rounds)
    for row in near:
        row.faster_than_fp32 = not not_faster_at(row.latency, plan.fp32_row.latency)
    plan.notes.append(f"{', '.join(r.name for r in near)}: within the timing noise of each other, timed again in "
                      f"{2 * TIMING_ROUNDS} more interleaved rounds, and decided on all of them")
    console.info(plan.notes[-1])
    still = tied([r for r in near if r.faster_than_fp32])
    if len(still) < 2:
        return None
    # The closest to FP32; among those as close (the same weights on graphs that differ only in fused operators
    # score alike to 1e-5), the fastest best round: a round the load left alone, which held the idle order on MiniLM
    # where the per-round ratios of a busy machine scattered past the 10% cap.
    best = max(_quality_key(r) for r in still)
    as_close = [r for r in still if _quality_key(r) >= best - QUALITY_TIE]
    closest = min(as_close, key=_geomean)
    why = "the closest to FP32" + (", and of those as close the fastest best round" if len(as_close) > 1 else "")
    plan.notes.append(f"{', '.join(r.name for r in still)}: still within the timing noise ("
                      f"{100 * max(_noise(still[0], r) for r in still[1:]):.1f}%); kept {closest.name}, {why}")
    console.info(plan.notes[-1])
    return closest


def _static_text_base(plan: Plan, config: Any) -> list[tuple[str, Path]]:
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
    name = (name or scheme.name) + (f" + {float_nodes(sensitivity)} nodes in float" if sensitivity else "")
    row = Candidate(name, scheme, path, latency, q, file_size_mb(path), graph.kernel_counts(path),
                    faster_than_fp32=not not_faster_at(latency, fp32_latency),
                    within_budget=plan.quality.within_budget(q), sensitivity=sensitivity or [], base=base or plan.pre,
                    split=split)
    plan.candidates.append(row)
    _log(row)
    return row


def float_nodes(sensitivity: list[dict[str, Any]]) -> int:
    """How many nodes a fallback keeps in float (a row names one node, or the MatMuls that read its tensor)."""
    return sum(len(r["node"].split(", ")) for r in sensitivity)


def _log(row: Candidate) -> None:
    q = row.quality
    quality = f"top-1 {q['accuracy']:.4f}" if "accuracy" in q else f"cosine {q.get('cosine_mean', 1):.4f}"
    console.info(f"{row.name}: {describe_latency(row.latency)}; {quality}; {row.kernels['integer']} integer / "
                 f"{row.kernels['float']} float kernels")


def fastest(rows: list[Candidate]) -> Candidate:
    """The lowest geometric mean latency over the batch sizes."""
    return min(rows, key=lambda r: math.prod(r.latency.values()))


def choose(plan: Plan, config: Any) -> Candidate | None:
    """The fastest candidate that is faster and within budget; else a fallback; else, in static or dynamic
    mode, the scheme asked for; else None (FP32 goes back)."""
    tie = settle(plan, config) if config.mode == "auto" else None
    ok = [r for r in plan.candidates if r.faster_than_fp32 and r.within_budget]
    chosen = tie or (fastest(ok) if ok else None)
    if chosen is None and config.fallback:
        chosen = _fallback(plan, config)
    if chosen is None and config.mode != "auto":
        # The user asked for this exact scheme: hand it back, and say plainly what it costs.
        if not plan.candidates:  # onnxruntime could not make it at all: why, in one line
            why = next((n for n in reversed(plan.notes) if "not a candidate" in n), "no candidate was made")
            raise RunError(f"{config.mode} INT8 as asked could not be made: {why}")
        within = [r for r in plan.candidates if r.within_budget]
        chosen = fastest(within) if within else plan.candidates[0]
        if not chosen.faster_than_fp32:
            plan.notes.append(f"{chosen.name} is SLOWER than FP32 on this machine: {describe_latency(chosen.latency)}")
            console.warn(plan.notes[-1])
        if not chosen.within_budget:
            plan.notes.append(f"{chosen.name} misses the quality budget ({plan.quality.budget_text()})")
            console.warn(plan.notes[-1])
    return chosen


def _fallback(plan: Plan, cfg: Any) -> Candidate | None:
    """Keep the most sensitive nodes in float, a group at a time, in each method's candidate (dynamic, static) that
    is closest to FP32 among those faster than FP32 (of those as close, the fastest), until it is within budget or
    no longer faster. (On all-mpnet-base-v2 the fastest dynamic candidate, per-tensor, scored 0.70 and per-channel
    0.88: the fallback starts from the closer one.) When both methods get within budget, they are timed together
    beside FP32 and the faster is kept (within the timing noise, the closer to FP32)."""
    bases = []
    for method in ("dynamic", "static"):
        rows = [r for r in plan.candidates if r.faster_than_fp32 and r.scheme.method == method]
        if rows:  # the closest to FP32 (scores within QUALITY_TIE are as close), of those the fastest
            best = max(_quality_key(r) for r in rows)
            bases.append(min((r for r in rows if _quality_key(r) >= best - QUALITY_TIE), key=_geomean))
    bases.sort(key=_geomean)
    found = [row for tag, base in enumerate(bases, 1) if (row := _fallback_of(plan, cfg, base, tag)) is not None]
    if not found:
        return None
    kept = found[0]
    if len(found) > 1:
        # Both methods met the budget, each timed in rounds of its own: time them together beside FP32, keep the faster.
        timed = interleaved_rounds([Path(plan.artifact.onnx_path), *(r.path for r in found)], plan.artifact.sample_shape,
                                   cfg.provider, cfg.batch_sizes, cfg.iterations)
        fp32_latency = best_of(timed[0])
        for row, rounds in zip(found, timed[1:]):
            row.rounds, row.latency, row.timed_with = rounds, best_of(rounds), -1
            row.faster_than_fp32 = not not_faster_at(row.latency, fp32_latency)
        faster = [r for r in found if r.faster_than_fp32]
        if not faster:
            plan.notes.append(" and ".join(r.name for r in found) + " met the budget, but timed together beside FP32 "
                              "neither was faster")
            console.info(plan.notes[-1])
            return None
        near = tied(faster)  # as fast as each other as far as the rounds tell: the closer to FP32
        kept = max(near, key=_quality_key) if len(near) > 1 else near[0]
        why = "within the timing noise of each other, the closer to FP32" if len(near) > 1 else "the faster"
        plan.notes.append(" and ".join(r.name for r in found)
                          + f" met the budget; timed together beside FP32, kept {why}: {kept.name} "
                          f"({describe_latency(kept.latency)})")
        console.info(plan.notes[-1])
    plan.notes.append("kept in float (lowest SQNR first): "
                      + ", ".join(f"{r['node']} ({r['sqnr_db']:.1f} dB)" for r in kept.sensitivity))
    return kept


def _fallback_of(plan: Plan, cfg: Any, base: Candidate, tag: int) -> Candidate | None:
    from mlopt.export.lib.rewrite import split_fusions

    if base.scheme.method == "static":
        ranking = node_sqnr(base.base, base.path, plan.feeds[:2])
    else:
        ranking = dynamic_sqnr(base.base, plan.feeds[:2])
    if base.scheme.method == "dynamic" or base.scheme.weight_matmuls_only:
        # a tensor stays float when the nodes that read it do
        ranking = [{**r, "node": ", ".join(r["readers"])} for r in ranking if r["readers"]]
    if not ranking:
        return None
    group = max(1, math.ceil(len(ranking) / 10))
    console.info(f"{base.scheme.name} misses the budget ({plan.quality.budget_text()}); "
                 "keeping sensitive nodes in float")
    fp32_latency = plan.fp32_row.latency
    for g in range(1, min(cfg.fallback_groups, math.ceil(len(ranking) / group)) + 1):
        kept = ranking[: g * group]
        path = plan.work / f"fallback-{base.scheme.method}{g}.onnx"
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
        row.timed_with = 1000 * tag + g  # its own rounds beside FP32: not paired with the others
        if not row.faster_than_fp32:
            break
        if row.within_budget:
            return row
    return None


def sections(plan: Plan) -> list[Any]:
    """The candidates table, the sensitivity of the nodes kept in float, and the transformer fusions."""
    sizes = list(plan.fp32_row.latency)
    rows = [[r.name, r.faster_than_fp32, r.within_budget, *(r.latency[b] for b in sizes), r.quality.get("accuracy"),
             r.quality.get("accuracy_drop"), r.quality["cosine_mean"], r.quality["cosine_min"], r.size_mb,
             r.kernels["integer"], r.kernels["float"], float_nodes(r.sensitivity), round(100 * r.spread, 1)]
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
