"""The `export` step: torch model -> ONNX (dynamic batch axis), checked, then validated on onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from mlopt.core.contracts import Pass, StepResult
from mlopt.core.errors import InputError
from mlopt.export.lib.decoder import export_decoder
from mlopt.export.lib.onnx import ExportOptions, export_checked


class ExportConfig(ExportOptions):
    """Export to ONNX and check that onnxruntime reproduces PyTorch's outputs."""

    type: Literal["export"] = "export"


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
        return export_checked(artifact, ctx.data, Path(ctx.out_dir) / "model.onnx", config)
