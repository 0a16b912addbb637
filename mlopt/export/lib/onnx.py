"""torch model -> ONNX (dynamic batch axis), checked, then validated on onnxruntime against PyTorch."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mlopt.core import console
from mlopt.core.contracts import StepResult
from mlopt.core.errors import InputError, RunError, first_line, storage_error, without_colours
from mlopt.core.fsutil import file_size_mb
from mlopt.core.sections import Config
from mlopt.export.lib.parity import compare
from mlopt.runtime import hf
from mlopt.runtime.data import first_inputs
from mlopt.runtime.models import VOCAB_KEY, flat_tensors, synthetic_input

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
                debug_metadata: bool = False, vocab: int | None = None) -> None:
    """Write `module` to `path` with a dynamic batch axis; raise a one-line error on failure. `example` names
    the inputs of a multi-input model (token models: input_ids, attention_mask, ...); with `max_sequence` their
    second axis (the sequence) is dynamic as well. The dynamo exporter's per-node debug metadata is dropped
    unless `debug_metadata`: onnxruntime never reads it, and it is 3% of an INT8 mobilenet_v2 file. A model reading
    token ids (`vocab`) is traced on ids below it, and the vocabulary is written into the file's metadata
    (`VOCAB_KEY`), from which timing makes up valid ids."""
    import onnx
    import torch

    module.eval()
    example = example or {"input": synthetic_input((2, *sample_shape), vocab)}
    names, args = list(example), tuple(example.values())
    printed = io.StringIO()
    try:
        with torch.no_grad():  # a model that returns several tensors (a tuple, a dict) gets one named output each
            count = len(flat_tensors(module(*args)))
        output_names = [output] if count == 1 else [f"output_{i}" for i in range(count)]
        # The exporters print progress, and on failure the whole traced graph: kept out of --json output and the
        # terminal (the error says what failed), shown on stderr under MLOPT_DEBUG=1.
        shown = sys.stderr if os.environ.get("MLOPT_DEBUG") else printed
        with contextlib.redirect_stdout(shown), contextlib.redirect_stderr(shown), _quiet_warnings():
            if exporter == "dynamo":
                dims = {0: torch.export.Dim("batch", min=1)}
                if max_sequence:
                    dims[1] = torch.export.Dim("sequence", min=1, max=max_sequence)
                program = torch.onnx.export(
                    module, args, None, dynamo=True, opset_version=opset,
                    input_names=names, output_names=output_names,
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
                    input_names=names, output_names=output_names,
                    dynamic_axes={n: axes for n in names} | {o: axes if o == "last_hidden_state" else {0: "batch"}
                                                              for o in output_names},
                )
    except Exception as exc:
        full = storage_error(exc, path)
        if full is not None:  # the disk, not the exporter: suggesting the other exporter would mislead
            raise full from exc
        hint = " (try exporter: torchscript)" if exporter == "dynamo" else " (try exporter: dynamo)"
        raise RunError(f"ONNX export failed: {export_reason(exc)}{hint}") from exc
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise RunError(f"the exported ONNX model fails onnx.checker: {first_line(exc)}") from exc
    written = onnx.load(str(path), load_external_data=False)
    produced = {o.domain: o.version for o in written.opset_import}
    if produced.get("", produced.get("ai.onnx")) != opset:
        hint = " (the dynamo exporter needs opset >= 18 for most models; try exporter: torchscript)"
        raise RunError(f"the {exporter} exporter produced opset {produced.get('')} instead of the requested {opset}"
                       + (hint if exporter == "dynamo" else ""))
    if vocab is not None:  # the tensors stay where the exporter wrote them (external data is not loaded)
        onnx.helper.set_model_props(written, {**{p.key: p.value for p in written.metadata_props}, VOCAB_KEY: str(vocab)})
        onnx.save(written, str(path))


def export_reason(exc: BaseException) -> str:
    """Why an export failed, in one line: the innermost exception of the chain (torch.onnx wraps the real reason
    in "Failed to export the model with torch.export. This is step 1/3 ... Next steps:", and names it in an
    "## Exception summary" when it is not chained), and the line of the user's code that raised it when torch
    names one."""
    chain, current = [exc], exc
    while current.__cause__ is not None and current.__cause__ not in chain:
        current = current.__cause__
        chain.append(current)
    root = chain[-1]
    reason = f"{type(root).__name__}: {first_line(root)}"
    if len(chain) == 1:
        summary = re.search(r"## Exception summary\s+<class '(?:[\w.]*\.)?(\w+)'>: ([^\n]*)", without_colours(str(exc)))
        reason = f"{summary.group(1)}: {summary.group(2)}" if summary else reason
    reason = re.sub(r"\s*Next steps:$", "", reason.strip())[:300]
    for e in chain:
        where = re.search(r'The following call raised this error:\s+File "([^"]+)", line (\d+), in \w+\s+([^\n]+)',
                          str(e))
        if where:
            return f"{reason} (at {where.group(1)}:{where.group(2)}: {where.group(3).strip()[:120]})"
    return reason


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with console.muted_loggers("torch.onnx", "torch.export", "torch.fx", "onnxscript"), warnings.catch_warnings():
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
    what = "random normal inputs" if artifact.vocab is None else f"random token ids below {artifact.vocab}"
    return synthetic_input((n, *artifact.sample_shape), artifact.vocab, g), what


def export_artifact(artifact: Any, path: Path, opset: int = 18, exporter: str = "dynamo", data: Any = None,
                    debug_metadata: bool = False, fallback: bool = True) -> tuple[str, str | None]:
    """Export a torch artifact to `path` (no parity check): image models and hf: text models alike. When
    `exporter` fails and `fallback` is on (the user did not choose the exporter), the other exporter is tried;
    returns (the exporter used, a note saying why when it is not `exporter`)."""
    module = artifact.require_torch("export")
    if artifact.sample_shape is None:
        raise InputError("the model's input shape is unknown: give --input-shape")
    text = text_options(artifact, parity_inputs(artifact, data, 2)[0]) if hf.is_text_artifact(artifact) else {}
    return export_either(module, tuple(artifact.sample_shape), path, opset, exporter, fallback,
                         debug_metadata=debug_metadata, vocab=artifact.vocab, **text)


def export_either(module: Any, sample_shape: tuple[int, ...], path: Path, opset: int, exporter: str,
                  fallback: bool = True, **options: Any) -> tuple[str, str | None]:
    """export_onnx with `exporter`, then (with `fallback`) the other one if it fails for a reason other than the
    disk; returns (the exporter used, a note saying why when it is not `exporter`). Both failing raises the
    first error with the second's named in it. With `fallback` (the user did not choose), a model with recurrent
    layers goes to the TorchScript exporter first (`recurrent_layers`)."""
    recurrent = recurrent_layers(module) if fallback and exporter == "dynamo" else []
    if recurrent:
        used, note = export_either(module, sample_shape, path, opset, "torchscript", True, **options)
        why = (f"the model has recurrent layers ({', '.join(recurrent[:3])}{', ...' if len(recurrent) > 3 else ''}), "
               "which the dynamo exporter unrolls step by step while it traces (minutes on long sequences) before "
               "writing the same ONNX op")
        note = f"{why}; exported with the TorchScript exporter" if used == "torchscript" else f"{why}; {note}"
        console.info(note)
        return used, note
    try:  # a full disk is an InputError, not a RunError: it is raised as it is
        export_onnx(module, sample_shape, path, opset, exporter, **options)
        return exporter, None
    except RunError as exc:
        if not fallback:
            raise
        first = exc
    other = "torchscript" if exporter == "dynamo" else "dynamo"
    try:
        export_onnx(module, sample_shape, path, opset, other, **options)
    except RunError as exc:
        raise RunError(f"{_without_hint(first)}; the {other} exporter failed too: "
                       f"{_without_hint(exc).removeprefix('ONNX export failed: ')}") from first
    note = (f"the {exporter} exporter failed ({_without_hint(first).removeprefix('ONNX export failed: ')[:200]}); "
            f"exported with the {other} exporter instead")
    console.warn(note)
    return other, note


def recurrent_layers(module: Any) -> list[str]:
    """The model's LSTM, GRU and RNN layers. torch's dynamo exporter traces them through their Python
    decomposition, one time step after another with symbolic shapes, and then writes one ONNX LSTM/GRU/RNN node
    anyway: a GRU over 248 steps took 31 s against 4 s for the TorchScript exporter, over 498 steps 57 s against
    4.4 s, and onnxruntime ran both graphs as fast. (torch 2.14.1, 2 cores.)"""
    import torch

    return [name for name, m in module.named_modules() if isinstance(m, torch.nn.RNNBase)]


def _without_hint(exc: Exception) -> str:
    return re.sub(r" \(try exporter: \w+\)$|\(the dynamo exporter needs.*\)$", "", str(exc)).rstrip()


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
    # the exporter falls back to the other one only when the user did not choose it
    used, fell_back = export_artifact(artifact, path, config.opset, config.exporter, data, config.debug_metadata,
                                      fallback="exporter" not in config.model_fields_set)
    inputs, source = parity_inputs(artifact, data, config.parity_samples)
    parity = compare(artifact.module, path, inputs, config.atol, config.rtol)
    agreement = "" if parity["top1_agreement"] is None else f", top-1 agreement {parity['top1_agreement']:.4f}"
    console.info(f"parity: max abs error {parity['max_abs_error']:.3g} (tolerance {parity['tolerance']:.3g})"
                 f"{agreement} on {parity['parity_samples']} inputs")
    return StepResult(artifact=artifact.derive("export", format="onnx", module=None, onnx_path=path),
                      metrics={**parity, "opset": config.opset, "exporter": used, "size_mb": file_size_mb(path)},
                      notes=[*([fell_back] if fell_back else []), f"parity checked on {parity['parity_samples']} {source}"])
