"""The `export` pass: torch model -> ONNX (dynamic batch axis), checked, then validated on onnxruntime."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlopt import console
from mlopt.errors import InputError, RunError, first_line
from mlopt.pipeline import Pass, StepResult

_PROTOBUF_LIMIT = 2 * 1024**3


class ExportConfig(BaseModel):
    """Export to ONNX and check that onnxruntime reproduces PyTorch's outputs."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["export"] = "export"
    opset: int = Field(18, ge=17, le=23)
    exporter: Literal["dynamo", "torchscript"] = Field(
        "dynamo", description="torch.export-based exporter (default) or the legacy TorchScript one"
    )
    atol: float = Field(1e-4, ge=0, description="parity: absolute tolerance")
    rtol: float = Field(1e-3, ge=0, description="parity: tolerance relative to the largest output")
    parity_samples: int = Field(64, gt=0, description="inputs compared between PyTorch and onnxruntime")


def export_onnx(module: Any, sample_shape: tuple[int, ...], path: Path, opset: int, exporter: str) -> None:
    """Write `module` to `path` with a dynamic batch axis; raise a one-line error on failure."""
    import onnx
    import torch

    module.eval()
    example = (torch.randn((2, *sample_shape)),)
    try:
        # The exporters print progress on stdout; keep stdout clean for --json output.
        with contextlib.redirect_stdout(sys.stderr), _quiet_warnings():
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1)
                program = torch.onnx.export(
                    module, example, None, dynamo=True, opset_version=opset,
                    input_names=["input"], output_names=["logits"],
                    dynamic_shapes=({0: batch},), verbose=False, optimize=True,
                )
                params = sum(p.numel() * p.element_size() for p in module.state_dict().values())
                program.save(str(path), external_data=params > _PROTOBUF_LIMIT * 0.9)
            else:
                torch.onnx.export(
                    module, example, str(path), dynamo=False, opset_version=opset,
                    input_names=["input"], output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                )
    except Exception as exc:
        first = first_line(exc)
        hint = " (try exporter: torchscript)" if exporter == "dynamo" else " (try exporter: dynamo)"
        raise RunError(f"ONNX export failed: {type(exc).__name__}: {first[:300]}{hint}") from exc
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise RunError(f"the exported ONNX model fails onnx.checker: {first_line(exc)}") from exc
    produced = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}
    if produced.get("", produced.get("ai.onnx")) != opset:
        raise RunError(
            f"the {exporter} exporter produced opset {produced.get('')} instead of the requested {opset}"
            + (" (the dynamo exporter needs opset >= 18 for most models; try exporter: torchscript)" if exporter == "dynamo" else "")
        )


@contextlib.contextmanager
def _quiet_warnings():
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def parity_inputs(artifact: Any, data: Any, n: int, seed: int = 0) -> tuple[Any, str]:
    """Real validation inputs when data is given, otherwise seeded Gaussian noise."""
    import torch

    if data is not None:
        from mlopt.data import first_inputs

        return first_inputs(data, n), f"{data.name} validation split"
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *artifact.sample_shape), generator=g), "random normal inputs"


def export_checked(artifact: Any, data: Any, path: Path, config: ExportConfig) -> tuple[Any, StepResult]:
    """Export a torch artifact to `path` and check parity; the export step of every pass that needs ONNX."""
    from mlopt.export.parity import compare
    from mlopt.fsutil import file_size_mb

    if artifact.format == "onnx":
        raise InputError(f"the model is already ONNX ({artifact.origin}); export takes a PyTorch model")
    module = artifact.require_torch("export")
    if artifact.sample_shape is None:
        raise InputError("the model's input shape is unknown: give --input-shape")
    console.info(f"exporting to ONNX (opset {config.opset}, {config.exporter} exporter)")
    export_onnx(module, tuple(artifact.sample_shape), path, config.opset, config.exporter)
    inputs, source = parity_inputs(artifact, data, config.parity_samples)
    parity = compare(module, path, inputs, config.atol, config.rtol)
    console.info(
        f"parity: max abs error {parity['max_abs_error']:.3g} (tolerance {parity['tolerance']:.3g}), "
        f"top-1 agreement {parity['top1_agreement']:.4f} on {parity['parity_samples']} inputs"
    )
    new = artifact.derive("export", format="onnx", module=None, onnx_path=path)
    metrics = {**parity, "opset": config.opset, "size_mb": file_size_mb(path)}
    return new, StepResult(artifact=new, metrics=metrics, notes=[f"parity checked on {parity['parity_samples']} {source}"])


class ExportPass(Pass):
    name = "export"
    config_class = ExportConfig

    def run(self, artifact: Any, config: ExportConfig, ctx: Any) -> StepResult:
        return export_checked(artifact, ctx.data, Path(ctx.out_dir) / "model.onnx", config)[1]
