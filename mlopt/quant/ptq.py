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
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlopt.core import console
from mlopt.core.errors import InputError
from mlopt.core.contracts import Pass, StepResult, cli
from mlopt.quant.lib.quantize import (Quality, Scheme, candidate_schemes, latencies, not_faster_at, preprocess,
                                      quantize, reduce_range_for)


class PTQConfig(BaseModel):
    """Quantize to INT8 with onnxruntime; in auto mode, keep the fastest candidate within budget."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["ptq"] = "ptq"
    mode: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="auto: measure candidates, keep the fastest within budget")
    format: Literal["qdq", "qoperator"] = Field("qdq", description="static/dynamic modes: graph format")
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = Field(True, description="weight scales per channel or per tensor (static/dynamic modes)",
                              json_schema_extra=cli(flag="--per-channel/--per-tensor"))
    calibration: Literal["auto", "minmax", "percentile", "entropy"] = Field(
        "auto", description="auto: minmax and percentile candidates in auto mode, minmax otherwise"
    )
    calibration_samples: int = Field(256, gt=0, description="training samples used to calibrate")
    reduce_range: Literal["auto", "on", "off"] = Field("auto", description="auto: on for CPUs without VNNI")
    preprocess: bool = Field(True, description="shape inference and graph fusion by onnxruntime before quantizing")
    max_drop: float = Field(0.01, ge=0, le=1, description="allowed top-1 drop (0.01 = 1 point)")
    min_cosine: float = Field(0.99, ge=-1, le=1, description="fidelity floor when the data has no labels")
    fallback: bool = Field(True, description="keep the most sensitive nodes in float until the budget is met")
    fallback_groups: int = Field(5, gt=0, description="at most this many groups of nodes are kept in float")
    provider: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1, description="batch sizes timed",
                                   json_schema_extra=cli(flag="--batch-size", short="-b"))
    iterations: int = Field(30, gt=0, description="timed runs per candidate and batch size", json_schema_extra=cli(short="-n"))

    @model_validator(mode="after")
    def _options_used(self) -> "PTQConfig":
        """An option the chosen mode would not use is an error, never silently dropped."""
        scheme = {"format", "activation_type", "per_channel", "weight_type"} & self.model_fields_set
        if self.mode == "auto" and scheme:
            raise ValueError(f"{', '.join(sorted(scheme))} apply to mode static or dynamic; mode auto measures its own candidates")
        if self.mode == "dynamic" and ({"format", "activation_type"} & self.model_fields_set or self.calibration != "auto"):
            raise ValueError("dynamic quantization has no activation format, type or calibration")
        return self


class PTQPass(Pass):
    name = "ptq"
    config_class = PTQConfig
    needs_data = True
    compresses = True
    text_ok = True
    cli_help = "Post-training INT8 quantization (onnxruntime), kept only when measured faster and within budget."

    def run(self, artifact: Any, config: PTQConfig, ctx: Any) -> StepResult:
        from mlopt.runtime import hf
        from mlopt.runtime.session import input_spec, make_session
        from mlopt.core.fsutil import file_size_mb
        from mlopt.quant.lib import graph
        from mlopt.quant.lib.calibration import calibration_batches

        work = Path(tempfile.mkdtemp(prefix="mlopt-ptq-"))
        notes: list[str] = []
        try:
            if artifact.format == "torch":
                from mlopt.export.lib.onnx import ExportOptions, export_checked

                artifact, exported = export_checked(artifact, ctx.data, work / "fp32.onnx", ExportOptions())
                notes += exported.notes
            fp32 = Path(artifact.require_onnx("ptq"))
            model = graph.load(fp32)
            if graph.quantized_ops(model):
                raise InputError(f"{artifact.origin} is already quantized ({', '.join(graph.quantized_ops(model))}); give the FP32 model")
            if not graph.has_float_weights(model):
                raise InputError(f"{artifact.origin} has no float Conv/MatMul/Gemm weights to quantize")
            has_conv = any(n.op_type == "Conv" for n in model.graph.node)
            text = hf.is_text_artifact(artifact)
            schemes = candidate_schemes(config, has_conv, text)
            feeds = []
            if any(s.method == "static" for s in schemes):  # dynamic quantization needs no calibration
                name, shape, _ = input_spec(make_session(fp32, "cpu"))
                feeds = calibration_batches(ctx.data, name, shape, config.calibration_samples)
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
            reduce_range = reduce_range_for(config.reduce_range)

            paths = [work / f"candidate{i}.onnx" for i in range(len(schemes))]
            for scheme, path in zip(schemes, paths):
                console.info(f"quantizing: {scheme.name}")
                quantize(pre, path, scheme, feeds, reduce_range)
            console.info(f"timing FP32 and {len(schemes)} candidate(s) on onnxruntime ({config.provider})")
            fp32_latency, *cand_latency = latencies([fp32, *paths], artifact.sample_shape, config.provider, config.batch_sizes, config.iterations)
            quality = Quality(fp32, ctx.data, config.max_drop, config.min_cosine)
            fp32_row = {"name": "FP32", "latency_ms": fp32_latency, **quality.baseline, "size_mb": file_size_mb(fp32),
                        "kernels": graph.kernel_counts(fp32)}
            console.info(f"FP32: {self._describe(fp32_row)}")
            rows: list[dict[str, Any]] = []
            for scheme, path, latency in zip(schemes, paths, cand_latency):
                row = self._measure(scheme, path, latency, quality, fp32_latency)
                rows.append(row)
                console.info(f"{scheme.name}: {self._describe(row)}")

            chosen = self._choose(rows)
            if chosen is None and config.fallback:
                chosen = self._fallback(rows, pre, feeds, reduce_range, quality, fp32_latency, artifact, config, work, notes)
            if chosen is None and config.mode != "auto":
                # The user asked for this exact scheme: hand it back, and say plainly what it costs.
                chosen = rows[-1] if rows[-1]["within_budget"] else rows[0]
                for problem in self._problems(chosen, quality):
                    console.warn(problem)
                    notes.append(problem)
            out = Path(ctx.out_dir) / "model.onnx"
            if chosen is not None:
                shutil.copyfile(chosen["path"], out)
            for row in rows:
                row["path"] = row["path"].name
            metrics: dict[str, Any] = {
                "fp32_latency_ms": fp32_latency,
                "fp32_size_mb": fp32_row["size_mb"],
                "reduce_range": reduce_range,
                "calibration_samples": sum(len(next(iter(f.values()))) for f in feeds),
                "budget": quality.budget_text(),
            }
            if text:
                metrics["transformer_fusions"] = fusions
                metrics["sequence_length"] = artifact.sample_shape[0]
            if quality.labeled:
                metrics["fp32_accuracy"] = quality.baseline["accuracy"]
            extra = {"ptq": {"fp32": fp32_row, "candidates": rows}}
            if chosen is None:
                reason = self._no_winner_reason(rows, quality)
                console.warn(f"kept the FP32 model: {reason}")
                notes.append(f"kept the FP32 model: {reason}")
                shutil.copyfile(fp32, out)
                new = artifact.derive("ptq", onnx_path=out)
                metrics.update(quantized=False, chosen="FP32", latency_ms=fp32_latency, size_mb=fp32_row["size_mb"],
                               **{k: v for k, v in quality.baseline.items()})
                return StepResult(artifact=new, metrics=metrics, notes=notes, sections=extra)

            new = artifact.derive("ptq", onnx_path=out)
            speedups = {b: fp32_latency[b] / chosen["latency_ms"][b] for b in fp32_latency}
            metrics.update(
                quantized=True, chosen=chosen["name"], latency_ms=chosen["latency_ms"], speedup=speedups,
                size_mb=chosen["size_mb"], size_ratio=fp32_row["size_mb"] / chosen["size_mb"],
                float_nodes=chosen.get("float_nodes", []),
                left_in_float=chosen["kernels"]["float_ops"],
                **{k: chosen[k] for k in ("accuracy", "accuracy_drop", "cosine_mean", "cosine_min") if k in chosen},
            )
            if chosen["kernels"]["float"]:
                notes.append(f"onnxruntime left {chosen['kernels']['float']} Conv/MatMul/Gemm kernel(s) in float: "
                             f"{', '.join(chosen['kernels']['float_ops'])}")
            speed = ", ".join(f"{s:.2f}x faster at batch {b}" if s >= 1 else f"{1 / s:.2f}x SLOWER at batch {b}"
                              for b, s in speedups.items())
            budget = (f"within {quality.budget_text()}" if chosen["within_budget"]
                      else f"MISSING the budget ({quality.budget_text()})")
            notes.append(f"{'chose' if config.mode == 'auto' else 'quantized as asked'} {chosen['name']}: {speed}, "
                         f"{metrics['size_ratio']:.2f}x smaller, {budget}")
            metrics["within_budget"] = chosen["within_budget"]
            (console.info if chosen["within_budget"] and chosen["faster_than_fp32"] else console.warn)(notes[-1])
            return StepResult(artifact=new, metrics=metrics, notes=notes, sections=extra)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @staticmethod
    def _describe(row: dict[str, Any]) -> str:
        lat = ", ".join(f"batch {b} {ms:.3f} ms" for b, ms in row["latency_ms"].items())
        q = f"top-1 {row['accuracy']:.4f}" if "accuracy" in row else f"cosine {row.get('cosine_mean', 1):.4f}"
        return f"{lat}; {q}; {row['kernels']['integer']} integer / {row['kernels']['float']} float kernels"

    @staticmethod
    def _measure(scheme: Scheme, path: Path, latency: dict[int, float], quality: Quality,
                 fp32_latency: dict[int, float], float_nodes: list[str] | None = None) -> dict[str, Any]:
        from mlopt.core.fsutil import file_size_mb
        from mlopt.quant.lib import graph

        q = quality.score(path)
        return {
            "name": scheme.name + (f" + {len(float_nodes)} nodes in float" if float_nodes else ""),
            "scheme": asdict(scheme),
            "path": path,
            "latency_ms": latency,
            "faster_than_fp32": not not_faster_at(latency, fp32_latency),
            "within_budget": quality.within_budget(q),
            "size_mb": file_size_mb(path),
            "kernels": graph.kernel_counts(path),
            "float_nodes": float_nodes or [],
            **q,
        }

    @staticmethod
    def _choose(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The fastest (geometric mean over batch sizes) of the candidates that are faster and within budget."""
        ok = [r for r in rows if r["faster_than_fp32"] and r["within_budget"]]
        return min(ok, key=lambda r: math.prod(r["latency_ms"].values())) if ok else None

    def _fallback(self, rows: list[dict[str, Any]], pre: Path, feeds: Any, reduce_range: bool, quality: Quality,
                  fp32_latency: dict[int, float], artifact: Any, cfg: PTQConfig, work: Path,
                  notes: list[str]) -> dict[str, Any] | None:
        """Keep the most sensitive nodes of the fastest static candidate in float, a group at a time."""
        from mlopt.quant.lib.sensitivity import node_sqnr

        fast = [r for r in rows if r["faster_than_fp32"] and r["scheme"]["method"] == "static"]
        if not fast:
            return None
        base = min(fast, key=lambda r: math.prod(r["latency_ms"].values()))
        scheme = Scheme(**base["scheme"])
        ranking = node_sqnr(pre, base["path"], feeds[:2])
        if not ranking:
            return None
        group = max(1, math.ceil(len(ranking) / 10))
        console.info(f"{scheme.name} misses the budget ({quality.budget_text()}); keeping sensitive nodes in float")
        for g in range(1, cfg.fallback_groups + 1):
            exclude = [r["node"] for r in ranking[: g * group]]
            path = work / f"fallback{g}.onnx"
            quantize(pre, path, scheme, feeds, reduce_range, exclude)
            # Timed beside the FP32 model again, in the same interleaved rounds.
            fp32_now, latency = latencies([Path(artifact.onnx_path), path], artifact.sample_shape, cfg.provider, cfg.batch_sizes, cfg.iterations)
            fp32_latency = {b: min(fp32_latency[b], fp32_now[b]) for b in fp32_latency}
            row = self._measure(scheme, path, latency, quality, fp32_latency, exclude)
            row["sensitivity"] = ranking[: g * group]
            rows.append(row)
            console.info(f"{row['name']}: {self._describe(row)}")
            if not row["faster_than_fp32"]:
                break
            if row["within_budget"]:
                notes.append(
                    "kept in float (lowest SQNR first): "
                    + ", ".join(f"{r['node']} ({r['sqnr_db']:.1f} dB)" for r in ranking[: g * group])
                )
                return row
        return None

    @staticmethod
    def _problems(row: dict[str, Any], quality: Quality) -> list[str]:
        problems = []
        if not row["faster_than_fp32"]:
            problems.append(f"{row['name']} is SLOWER than FP32 on this machine: {row['latency_ms']} ms")
        if not row["within_budget"]:
            problems.append(f"{row['name']} misses the quality budget ({quality.budget_text()})")
        return problems

    @staticmethod
    def _no_winner_reason(rows: list[dict[str, Any]], quality: Quality) -> str:
        faster = [r for r in rows if r["faster_than_fp32"]]
        if not faster:
            return "no INT8 candidate ran faster than FP32 on this machine and provider (see the candidates table)"
        return f"every INT8 candidate that ran faster than FP32 missed the budget ({quality.budget_text()})"
