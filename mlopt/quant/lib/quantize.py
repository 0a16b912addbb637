"""onnxruntime quantization for the `ptq` and `qat` steps: the schemes mlopt measures, the quantizer
run quietly, scoring against FP32 on the validation split, and the INT8-or-FP32 rule."""

from __future__ import annotations

import contextlib
import gc
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlopt.core import console
from mlopt.core.errors import RunError, first_line
from mlopt.core.sections import Latency
from mlopt.runtime.data import batch_within, first_inputs, inputs_of, labels_of, loader, to_numpy
from mlopt.runtime.environment import cpu_flags
from mlopt.runtime.hf import pooled
from mlopt.runtime.session import make_session, run_session_all


@dataclass(frozen=True)
class Scheme:
    """One quantization configuration."""

    method: Literal["static", "dynamic"]
    format: str = "qdq"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    calibration: str | None = "minmax"
    # Static on transformers: only the MatMuls with a weight. Quantizing the rest too (the attention scores'
    # Add, whose mask holds the float minimum, Softmax, the residual adds) took all-MiniLM-L6-v2 to cosine 0.34.
    weight_matmuls_only: bool = False

    @property
    def name(self) -> str:
        if self.method == "dynamic":
            return f"dynamic {self.weight_type} {'per-channel' if self.per_channel else 'per-tensor'}"
        types = f"{'U8' if self.activation_type == 'uint8' else 'S8'}{'S8' if self.weight_type == 'int8' else 'U8'}"
        only = " (weight MatMuls)" if self.weight_matmuls_only else ""
        return f"{self.format.upper()} {types} {'per-channel' if self.per_channel else 'per-tensor'} {self.calibration}{only}"


def candidate_schemes(cfg: Any, has_conv: bool, text: bool = False) -> list[Scheme]:
    if cfg.mode == "static":
        calib = "minmax" if cfg.calibration == "auto" else cfg.calibration
        return [Scheme("static", cfg.format, cfg.activation_type, cfg.weight_type, cfg.per_channel, calib, text)]
    if cfg.mode == "dynamic":
        return [Scheme("dynamic", "qoperator", "uint8", cfg.weight_type, cfg.per_channel, None)]
    # MatMul-heavy models (transformers): dynamic quantization of the weights is the usual winner
    dynamic = [Scheme("dynamic", "qoperator", "uint8", "int8", per_channel, None) for per_channel in (True, False)]
    if text:  # and static QDQ of the weight MatMuls, after SmoothQuant (ptq measures it beside dynamic)
        return dynamic + [Scheme("static", "qdq", "uint8", "int8", True, "minmax", True)]
    calibs = ["minmax", "percentile"] if cfg.calibration == "auto" else [cfg.calibration]
    schemes = [Scheme("static", "qdq", "uint8", "int8", True, c) for c in calibs]
    schemes += [Scheme("static", "qdq", "uint8", "int8", False, calibs[0]),
                Scheme("static", "qdq", "int8", "int8", True, calibs[0])]
    return schemes if has_conv else schemes + dynamic


def reduce_range_for(setting: str) -> bool:
    """U8S8 without VNNI can saturate 16-bit accumulators; onnxruntime advises 7-bit weights there."""
    if setting != "auto":
        return setting == "on"
    flags = set(cpu_flags())
    x86 = bool(flags & {"avx2", "avx512f"})
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return x86 and not vnni


def quantize(src: Path, dst: Path, scheme: Scheme, feeds: list[dict[str, Any]], reduce_range: bool,
             exclude: list[str] | None = None, overrides: dict[str, Any] | None = None) -> None:
    """onnxruntime's quantizer with one scheme; `overrides` (static) fixes the scale and zero point
    of named tensors (TensorQuantOverrides) instead of calibrating them."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from mlopt.quant.lib.calibration import FeedReader

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    # Where shape inference leaves a tensor's type open (fused transformer ops), it is float.
    typed = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    calibration = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                   "entropy": CalibrationMethod.Entropy}
    # onnxruntime's calibrators print progress on stdout, which belongs to --json output.
    sink = io.StringIO() if console.is_quiet() else sys.stderr
    try:  # the root logger's errors only: not its advice to pre-process, which mlopt has (or says why not)
        with contextlib.redirect_stdout(sink), console.muted_loggers(""):
            if scheme.method == "dynamic":
                quantize_dynamic(str(src), str(dst), per_channel=scheme.per_channel, reduce_range=reduce_range,
                                 weight_type=qtype[scheme.weight_type], nodes_to_exclude=exclude or [],
                                 extra_options=typed)
            else:
                fmt = QuantFormat.QDQ if scheme.format == "qdq" else QuantFormat.QOperator
                extra = {"CalibMaxIntermediateOutputs": 64, **typed,
                         **({"TensorQuantOverrides": overrides} if overrides else {}),
                         # A pair of its own per MatMul, so that the tensor's other readers (residual adds) stay
                         # float, and float outputs (onnxruntime runs MatMulIntegerToFloat).
                         **({"MatMulConstBOnly": True, "DedicatedQDQPair": True,
                             "OpTypesToExcludeOutputQuantization": ["MatMul"]} if scheme.weight_matmuls_only else {})}
                # onnxruntime's QDQ MatMul ignores MatMulConstBOnly: name the MatMuls with a weight instead.
                only = {"op_types_to_quantize": ["MatMul"],
                        "nodes_to_quantize": weight_matmuls(src)} if scheme.weight_matmuls_only else {}
                quantize_static(str(src), str(dst), FeedReader(feeds), quant_format=fmt, per_channel=scheme.per_channel,
                                reduce_range=reduce_range, activation_type=qtype[scheme.activation_type],
                                weight_type=qtype[scheme.weight_type], nodes_to_exclude=exclude or [],
                                calibrate_method=calibration[scheme.calibration or "minmax"], extra_options=extra,
                                **only)
    except Exception as exc:
        raise RunError(f"onnxruntime could not quantize ({scheme.name}): {first_line(exc)}") from exc
    finally:
        # The calibration session can linger in a reference cycle; its idle intra-op threads spin
        # and slow down the next timing (measured here: 13.4 ms instead of 8 ms at batch 32).
        gc.collect()


def weight_matmuls(path: Path) -> list[str]:
    """The names of the MatMul nodes whose second input is an initializer (a weight)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name and n.input[1] in weights]


class Quality:
    """Scores a model on the validation split: top-1 when labelled, and fidelity (cosine) to FP32."""

    def __init__(self, fp32: Path, data: Any, max_drop: float = 0.01, min_cosine: float = 0.99, batch: int = 64):
        self.max_drop, self.min_cosine, self.labeled = max_drop, min_cosine, data.labeled
        self.batches = []
        if not data.text:  # large inputs (video clips) in smaller batches; token batches are small already
            batch = batch_within(first_inputs(data, 1), batch)
        for b in loader(data.val, batch):
            y = labels_of(b)
            self.batches.append((to_numpy(inputs_of(b)), None if y is None else y.numpy()))
        self.reference = self.outputs(fp32)
        self.baseline = self.metrics(self.reference)

    def outputs(self, path: Path) -> list[Any]:
        """The model's outputs for every validation batch (a list of its graph outputs each), from one onnxruntime
        session."""
        session = make_session(path, "cpu")
        return [run_session_all(session, x) for x, _ in self.batches]

    def metrics(self, outputs: list[Any]) -> dict[str, Any]:
        """Top-1 on labels (one output: logits) and each sample's cosine to FP32's outputs: of a model with several
        outputs (a tuple, a dict), its least faithful output's, so that no output can drift unseen behind the
        others."""
        import numpy as np

        correct, n, cosines = 0, 0, []
        for (x, y), outs, refs in zip(self.batches, outputs, self.reference):
            per_output = []
            for out, ref in zip(outs, refs):
                # Token models are scored on their sentence embeddings (mean over real tokens).
                flat, ref_flat = (pooled(out, x), pooled(ref, x)) if isinstance(x, dict) else (
                    out.reshape(len(out), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64))
                denom = np.linalg.norm(flat, axis=1) * np.linalg.norm(ref_flat, axis=1)
                per_output.append(np.where(denom > 0, (flat * ref_flat).sum(1) / np.maximum(denom, 1e-30), 1.0))
            if y is not None:
                correct += int((outs[0].reshape(len(outs[0]), -1).argmax(1) == y).sum())
            n += len(outs[0])
            cosines.append(np.min(per_output, axis=0))
        c = np.concatenate(cosines)
        result: dict[str, Any] = {"cosine_mean": float(c.mean()), "cosine_min": float(c.min())}
        if self.labeled:
            result["accuracy"] = correct / n
            baseline = getattr(self, "baseline", result)  # the FP32 model scores itself first
            result["accuracy_drop"] = baseline["accuracy"] - result["accuracy"]
        return result

    def score(self, path: Path) -> dict[str, Any]:
        return self.metrics(self.outputs(path))

    def within_budget(self, q: dict[str, Any]) -> bool:
        return q["accuracy_drop"] <= self.max_drop + 1e-12 if self.labeled else q["cosine_mean"] >= self.min_cosine

    def budget_text(self) -> str:
        if self.labeled:
            return f"top-1 drop <= {100 * self.max_drop:.2f} points"
        return f"mean cosine to FP32 >= {self.min_cosine}"


def latency_entries(timed: dict[int, float], model: str, provider: str, output: bool) -> list[Latency]:
    """One model's medians from `interleaved_latency` as report entries (`output`: the model handed on)."""
    method = (f"interleaved rounds on onnxruntime ({provider}): one session alive at a time, intra-op spinning off, "
              "each model keeping its best round's median")
    return [Latency(batch_size=b, p50_ms=ms, method=method, model=model, output=output) for b, ms in timed.items()]


def speedups(fp32_latency: dict[int, float], int8_latency: dict[int, float]) -> dict[str, float]:
    """FP32 over INT8 latency per batch size, as scalar metrics `speedup_b<batch>`."""
    return {f"speedup_b{b}": fp32_latency[b] / int8_latency[b] for b in fp32_latency}


def describe_latency(timed: dict[int, float]) -> str:
    return ", ".join(f"batch {b} {ms:.3f} ms" for b, ms in timed.items())


INT8_RULE = ("INT8 is kept only when it is faster than FP32 at every batch size timed (interleaved rounds, one "
             "session alive at a time, each model keeping its best round); a tie counts as not faster")


def not_faster_at(int8_latency: dict[int, float], fp32_latency: dict[int, float]) -> list[int]:
    """The batch sizes at which a quantized model is not faster than FP32 (`INT8_RULE`, by which both PTQ's
    auto mode and QAT choose); empty: it is faster at all of them."""
    return [b for b in int8_latency if int8_latency[b] >= fp32_latency[b]]


def preprocess(src: Path, dst: Path) -> tuple[Path, str | None]:
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
        return dst, None
    except Exception as exc:
        try:
            quant_pre_process(str(src), str(dst), skip_optimization=True)
            return dst, f"onnxruntime's graph optimisation failed before quantizing ({type(exc).__name__}); shape inference only"
        except Exception:
            return src, f"onnxruntime's pre-processing failed ({type(exc).__name__}); quantized the model as exported"
