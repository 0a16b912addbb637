"""torch model -> ONNX (dynamic batch axis), checked, then validated on onnxruntime against PyTorch."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mlopt.core import console
from mlopt.core.contracts import StepResult
from mlopt.core.errors import InputError, RunError, first_line, storage_error
from mlopt.core.fsutil import file_size_mb
from mlopt.core.sections import Config
from mlopt.export.lib.parity import compare
from mlopt.runtime import hf
from mlopt.runtime.data import first_inputs

_PROTOBUF_LIMIT = 2 * 1024**3


class ExportOptions(Config):
    """How a model is exported and checked (the `export` step's settings; other steps use the defaults)."""

    opset: int = Field(18, ge=17, le=23)
    exporter: Literal["dynamo", "torchscript"] = Field(
        "dynamo", description="torch.export-based exporter (default) or the legacy TorchScript one")
    atol: float = Field(1e-4, ge=0, description="parity: absolute tolerance")
    rtol: float = Field(1e-3, ge=0, description="parity: tolerance relative to the largest output")
    parity_samples: int = Field(64, gt=0, description="inputs compared between PyTorch and onnxruntime")
    debug_metadata: bool = Field(False, description="keep the exporter's per-node metadata (source stack traces, "
                                 "module names); dropped by default")


def export_onnx(module: Any, sample_shape: tuple[int, ...], path: Path, opset: int, exporter: str,
                example: dict[str, Any] | None = None, output: str = "logits", max_sequence: int | None = None,
                debug_metadata: bool = False) -> None:
    """Write `module` to `path` with a dynamic batch axis; raise a one-line error on failure. `example` names
    the inputs of a multi-input model (token models: input_ids, attention_mask, ...); with `max_sequence` their
    second axis (the sequence) is dynamic as well. The dynamo exporter's per-node debug metadata is dropped
    unless `debug_metadata`: onnxruntime never reads it, and it is 3% of an INT8 mobilenet_v2 file."""
    import onnx
    import torch

    module.eval()
    example = example or {"input": torch.randn((2, *sample_shape))}
    names, args = list(example), tuple(example.values())
    try:
        # The exporters print progress on stdout; keep stdout clean for --json output.
        with contextlib.redirect_stdout(sys.stderr), _quiet_warnings():
            if exporter == "dynamo":
                dims = {0: torch.export.Dim("batch", min=1)}
                if max_sequence:
                    dims[1] = torch.export.Dim("sequence", min=1, max=max_sequence)
                program = torch.onnx.export(
                    module, args, None, dynamo=True, opset_version=opset,
                    input_names=names, output_names=[output],
                    dynamic_shapes=tuple(dict(dims) for _ in names), verbose=False, optimize=True,
                )
                if not debug_metadata:
                    for node in program.model.graph.all_nodes():
                        node.metadata_props.clear()
                params = sum(p.numel() * p.element_size() for p in module.state_dict().values())
                program.save(str(path), external_data=params > _PROTOBUF_LIMIT * 0.9)
            else:
                axes = {0: "batch", 1: "sequence"} if max_sequence else {0: "batch"}
                torch.onnx.export(
                    module, args, str(path), dynamo=False, opset_version=opset,
                    input_names=names, output_names=[output],
                    dynamic_axes={n: axes for n in names} | {output: axes if output == "last_hidden_state" else {0: "batch"}},
                )
    except Exception as exc:
        full = storage_error(exc, path)
        if full is not None:  # the disk, not the exporter: suggesting the other exporter would mislead
            raise full from exc
        hint = " (try exporter: torchscript)" if exporter == "dynamo" else " (try exporter: dynamo)"
        raise RunError(f"ONNX export failed: {type(exc).__name__}: {first_line(exc)[:300]}{hint}") from exc
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise RunError(f"the exported ONNX model fails onnx.checker: {first_line(exc)}") from exc
    produced = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}
    if produced.get("", produced.get("ai.onnx")) != opset:
        hint = " (the dynamo exporter needs opset >= 18 for most models; try exporter: torchscript)"
        raise RunError(f"the {exporter} exporter produced opset {produced.get('')} instead of the requested {opset}"
                       + (hint if exporter == "dynamo" else ""))


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with console.muted_loggers("torch.onnx", "torch.export", "onnxscript"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def parity_inputs(artifact: Any, data: Any, n: int, seed: int = 0) -> tuple[Any, str]:
    """Real validation inputs when data is given, otherwise seeded Gaussian noise (token models: fixed ids)."""
    import torch

    if data is not None:
        return first_inputs(data, n), f"{data.name} validation split"
    if hf.is_text_artifact(artifact):
        return hf.example_inputs(artifact, n), "fixed token ids"
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *artifact.sample_shape), generator=g), "random normal inputs"


def export_artifact(artifact: Any, path: Path, opset: int = 18, exporter: str = "dynamo", data: Any = None,
                    debug_metadata: bool = False) -> None:
    """Export a torch artifact to `path` (no parity check): image models and hf: text models alike."""
    module = artifact.require_torch("export")
    if artifact.sample_shape is None:
        raise InputError("the model's input shape is unknown: give --input-shape")
    text = text_options(artifact, parity_inputs(artifact, data, 2)[0]) if hf.is_text_artifact(artifact) else {}
    export_onnx(module, tuple(artifact.sample_shape), path, opset, exporter, debug_metadata=debug_metadata, **text)


def text_options(artifact: Any, example: dict[str, Any]) -> dict[str, Any]:
    """export_onnx's options for an hf: text model: its token inputs (`example`), dynamic up to its longest
    sequence, and its own output's name."""
    info = artifact.builder["hf"]
    return {"example": example, "output": info["output"], "max_sequence": info["max_positions"]}


def export_checked(artifact: Any, data: Any, path: Path, config: ExportOptions) -> StepResult:
    """Export a torch artifact to `path` and check parity; the export step of every pass that needs ONNX."""
    if artifact.format == "onnx":
        raise InputError(f"the model is already ONNX ({artifact.origin}); export takes a PyTorch model")
    console.info(f"exporting to ONNX (opset {config.opset}, {config.exporter} exporter)")
    export_artifact(artifact, path, config.opset, config.exporter, data, config.debug_metadata)
    inputs, source = parity_inputs(artifact, data, config.parity_samples)
    parity = compare(artifact.module, path, inputs, config.atol, config.rtol)
    agreement = "" if parity["top1_agreement"] is None else f", top-1 agreement {parity['top1_agreement']:.4f}"
    console.info(f"parity: max abs error {parity['max_abs_error']:.3g} (tolerance {parity['tolerance']:.3g})"
                 f"{agreement} on {parity['parity_samples']} inputs")
    return StepResult(artifact=artifact.derive("export", format="onnx", module=None, onnx_path=path),
                      metrics={**parity, "opset": config.opset, "size_mb": file_size_mb(path)},
                      notes=[f"parity checked on {parity['parity_samples']} {source}"])
