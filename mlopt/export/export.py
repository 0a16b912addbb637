"""The `export` step: torch model -> ONNX (dynamic batch axis), checked, then validated on onnxruntime."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mlopt.core.contracts import Pass, StepResult, cli
from mlopt.core.errors import InputError, MloptError
from mlopt.core.fsutil import file_size_mb
from mlopt.core.sections import BatchSize
from mlopt.export.lib.decoder import export_decoder
from mlopt.export.lib.fusion import choose
from mlopt.export.lib.onnx import ExportOptions, export_artifact, export_checked, parity_inputs
from mlopt.runtime import hf


class ExportConfig(ExportOptions):
    """Export to ONNX and check that onnxruntime reproduces PyTorch's outputs."""

    type: Literal["export"] = "export"
    fuse: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: the export, its version with onnxruntime's fused operators (attention, skip layer "
        "norm, bias GELU; onnxscript's rewriter) and, for transformer encoders, the other exporter's graphs are "
        "checked and timed, and the fastest is kept; on: the fused export whenever it passes parity; off: the export")
    fuse_batch_sizes: list[BatchSize] = Field(default_factory=lambda: [1, 16], min_length=1,
                                        description="batch sizes at which the candidate graphs are timed",
                                        json_schema_extra=cli(flag="--fuse-batch-size"))
    fuse_iterations: int = Field(30, gt=0, description="timed runs per graph and batch size (in interleaved rounds)")


class ExportPass(Pass):
    name = "export"
    config_class = ExportConfig
    text_ok = True
    decoder_ok = True
    cli_help = ("Export to ONNX (dynamic batch), check it, and compare onnxruntime with PyTorch on real inputs; "
                "a decoder language model becomes an onnxruntime-genai folder (KV cache) that must load and generate.")

    @classmethod
    def check_family(cls, config: ExportConfig, decoder: bool) -> None:
        # onnxruntime-genai's builder writes a decoder's graph; of these settings only atol and rtol (its logits'
        # parity) reach it, so any other one given is refused rather than dropped
        given = sorted(config.model_fields_set - {"type", "atol", "rtol"}) if decoder else []
        if given:
            raise InputError(f"export's {given[0]} does not apply to a decoder language model (onnxruntime-genai's "
                             "builder writes its graph; atol and rtol set its parity check)")

    def run(self, artifact: Any, config: ExportConfig, ctx: Any) -> StepResult:
        if artifact.format == "causal-lm":
            return export_decoder(artifact, Path(ctx.out_dir), config)
        if artifact.format == "genai":
            raise InputError(f"{artifact.origin} is already an exported decoder (an onnxruntime-genai folder)")
        path = Path(ctx.out_dir) / "model.onnx"
        result = export_checked(artifact, ctx.data, path, config)
        if config.fuse == "off":
            return result
        inputs, _ = parity_inputs(artifact, ctx.data, config.parity_samples)
        others = []
        if config.fuse == "auto" and hf.is_text_artifact(artifact) and result.metrics["exporter"] == config.exporter:
            # Transformer encoders: the other exporter's graph is a candidate too (on all-MiniLM-L6-v2 onnxruntime
            # ran the TorchScript exporter's graph 1.18x faster than the dynamo one's, in one run).
            other = "torchscript" if result.metrics["exporter"] == "dynamo" else "dynamo"
            label, other_path = f"the {other} exporter's graph", path.with_name(f"{other}-{path.name}")
            try:
                export_artifact(artifact, other_path, config.opset, other, ctx.data, config.debug_metadata,
                                fallback=False)
                others.append((label, other_path))
            except MloptError as exc:  # a candidate, not the export: the export stands without it
                result.notes.append(f"{label}: not a candidate ({exc})")
        metrics, notes, sections = choose(artifact.module, path, others, inputs, config.atol, config.rtol, config.fuse,
                                          tuple(artifact.sample_shape), config.fuse_batch_sizes, config.fuse_iterations)
        result.metrics.update(metrics, size_mb=file_size_mb(path))
        return replace(result, notes=[*result.notes, *notes], sections=[*result.sections, *sections])
