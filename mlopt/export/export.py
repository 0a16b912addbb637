"""The `export` step: torch model -> ONNX (dynamic batch axis), checked, then validated on onnxruntime."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mlopt.core.contracts import Pass, StepResult, cli
from mlopt.core.errors import InputError
from mlopt.core.fsutil import file_size_mb
from mlopt.export.lib.decoder import export_decoder
from mlopt.export.lib.fusion import choose
from mlopt.export.lib.onnx import ExportOptions, export_checked, parity_inputs


class ExportConfig(ExportOptions):
    """Export to ONNX and check that onnxruntime reproduces PyTorch's outputs."""

    type: Literal["export"] = "export"
    fuse: Literal["auto", "on", "off"] = Field(
        "auto", description="onnxruntime's fused operators (attention, skip layer norm, bias GELU) by onnxscript's "
        "rewriter: auto keeps the fused graph only when it is measured faster; on keeps it whenever it passes parity")
    fuse_batch_sizes: list[int] = Field(default_factory=lambda: [1, 16], min_length=1,
                                        description="batch sizes at which the fused and plain graphs are timed",
                                        json_schema_extra=cli(flag="--fuse-batch-size"))
    fuse_iterations: int = Field(30, gt=0, description="timed runs per graph and batch size (in interleaved rounds)")


class ExportPass(Pass):
    name = "export"
    config_class = ExportConfig
    text_ok = True
    decoder_ok = True
    cli_help = ("Export to ONNX (dynamic batch), check it, and compare onnxruntime with PyTorch on real inputs; "
                "a decoder language model becomes an onnxruntime-genai folder (KV cache) that must load and generate.")

    def run(self, artifact: Any, config: ExportConfig, ctx: Any) -> StepResult:
        if artifact.format == "causal-lm":
            return export_decoder(artifact, Path(ctx.out_dir))
        if artifact.format == "genai":
            raise InputError(f"{artifact.origin} is already an exported decoder (an onnxruntime-genai folder)")
        path = Path(ctx.out_dir) / "model.onnx"
        result = export_checked(artifact, ctx.data, path, config)
        if config.fuse == "off":
            return result
        inputs, _ = parity_inputs(artifact, ctx.data, config.parity_samples)
        metrics, notes, sections = choose(artifact.module, path, inputs, config.atol, config.rtol, config.fuse,
                                          tuple(artifact.sample_shape), config.fuse_batch_sizes, config.fuse_iterations)
        result.metrics.update(metrics, size_mb=file_size_mb(path))
        return replace(result, notes=[*result.notes, *notes], sections=[*result.sections, *sections])
