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

import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mlopt.core import console
from mlopt.core.contracts import Pass, StepResult, cli
from mlopt.core.errors import InputError
from mlopt.core.sections import BatchSize, Config
from mlopt.export.lib.fusion import per_batch_note
from mlopt.quant.lib.quantize import latency_entries, speedups
from mlopt.quant.lib.search import Candidate, Plan, choose, float_nodes, measure, prepare, sections
from mlopt.runtime import generation

class PTQConfig(Config):
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
    smooth_alpha: float = Field(0.5, ge=0, le=1, description="SmoothQuant's migration strength (activation outliers "
                                "moved into the weights) for static INT8 on transformer encoders and for decoders' "
                                "candidates with int8 activations (accuracy level 4); 0: no smoothing")
    fallback: bool = Field(True, description="keep the most sensitive nodes in float until the budget is met")
    fallback_groups: int = Field(5, gt=0, description="at most this many groups of nodes are kept in float")
    provider: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    batch_sizes: list[BatchSize] = Field(default_factory=lambda: [1, 32], min_length=1, description="batch sizes timed",
                                   json_schema_extra=cli(flag="--batch-size", short="-b"))
    iterations: int = Field(30, gt=0, description="timed runs per candidate and batch size", json_schema_extra=cli(short="-n"))
    # Decoder language models: weight-only INT4/INT8 (mlopt.quant.lib.weightsearch).
    max_ppl_increase: float = Field(0.05, ge=0, description="decoders: allowed perplexity increase over FP32 (0.05 = 5%)")
    max_ttft_ratio: float = Field(1.1, gt=0, description="decoders: time to first token at most this many times FP32's "
                                                         "(1.1: 10% slower at most)")
    algorithms: list[str] = Field(
        default_factory=lambda: ["grid", "rtn", "hqq", "k_quant"], min_length=1,
        description="decoders: INT4 weight algorithms measured (grid: weights that lie on a block grid, as a GGUF "
                    "file's do, stored on it exactly; measured only when they do); gptq (calibrated on the training "
                    "lines) is not a default: it takes minutes even on a 135M-parameter decoder on 2 cores",
        json_schema_extra=cli(flag="--algorithm"))
    block_sizes: list[int] = Field(
        default_factory=lambda: [32, 64, 128], min_length=1, description="decoders: block sizes measured (INT4 and INT8)",
        json_schema_extra=cli(flag="--block-size"))
    accuracy_levels: list[int] = Field(
        default_factory=lambda: [4, 0], min_length=1,
        description="decoders: MatMulNBits accuracy levels (4: int8 activations); the first screens, the rest are "
                    "tried on the candidates within budget", json_schema_extra=cli(flag="--accuracy-level"))
    window: int = Field(generation.WINDOW, ge=8, description="decoders: tokens per perplexity window")
    max_windows: int = Field(generation.MAX_WINDOWS, gt=0, description="decoders: perplexity windows at most")
    prompt_tokens: int = Field(128, gt=0, description="decoders: prompt length timed")
    new_tokens: int = Field(generation.NEW_TOKENS, gt=0, description="decoders: tokens generated when timing")
    rounds: int = Field(generation.ROUNDS, gt=0, description="decoders: interleaved timing rounds")

    @field_validator("algorithms", "block_sizes", "accuracy_levels")
    @classmethod
    def _decoder_choices(cls, values: list[Any], info: Any) -> list[Any]:
        allowed = {"algorithms": ("grid", "rtn", "hqq", "gptq", "k_quant"), "block_sizes": (16, 32, 64, 128, 256),
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
            plan = prepare(artifact, config, ctx.data, Path(work))
            measure(plan, config, ctx.data)
            return _finish(plan, choose(plan, config), config, Path(ctx.out_dir) / "model.onnx")


DECODER_FIELDS = ("max_ppl_increase", "max_ttft_ratio", "algorithms", "block_sizes", "accuracy_levels", "window", "max_windows",
                  "prompt_tokens", "new_tokens", "rounds")
#: the decoder search's settings: its own fields and the ones it shares with encoders
DECODER_SETTINGS = (*DECODER_FIELDS, "smooth_alpha")


def _check_family(config: PTQConfig, decoder: bool) -> None:
    """Options of the other model family are errors: a decoder's are weight-only, an encoder's are INT8 graphs."""
    given = config.model_fields_set - {"type"}
    wrong = sorted(given - set(DECODER_SETTINGS) - {"mode"} if decoder else given & set(DECODER_FIELDS))
    if wrong:
        kind = "a decoder language model (weight-only quantization)" if decoder else "a model that is not a decoder language model"
        raise InputError(f"ptq option(s) {', '.join('--' + w.replace('_', '-') for w in wrong)} do not apply to {kind}")
    if decoder and config.mode != "auto":
        raise InputError("a decoder language model is quantized in mode auto (weight-only candidates, measured)")
    if decoder and "smooth_alpha" in given and config.smooth_alpha and 4 not in config.accuracy_levels:
        raise InputError("--smooth-alpha on a decoder smooths the candidates whose kernels quantize activations "
                         "(--accuracy-level 4), and none is measured")


def quantize_decoder(artifact: Any, config: PTQConfig, ctx: Any) -> StepResult:
    """Weight-only candidates of a decoder (exported first when it is still an HF folder), measured; the chosen one kept."""
    from mlopt.export.lib.decoder import export_decoder
    from mlopt.quant.lib.weightsearch import Settings, search_decoder

    settings = Settings(**{name: getattr(config, name) for name in DECODER_SETTINGS})
    with tempfile.TemporaryDirectory(prefix="mlopt-ptq-", ignore_cleanup_errors=True) as work:
        notes = []
        if artifact.format == "causal-lm":
            exported = export_decoder(artifact, Path(work) / "fp32")
            artifact, notes = exported.artifact, exported.notes
        result = search_decoder(artifact, settings, ctx.data, Path(work), Path(ctx.out_dir))
        result.notes[:0] = notes
        return result


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
                        latency=latency, sections=sections(plan))
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
                   size_ratio=fp32.size_mb / chosen.size_mb, float_nodes=float_nodes(chosen.sensitivity),
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


