"""Artifacts: the model that flows from pass to pass, and how it is saved and reloaded.

A torch artifact is saved as ``model.pt`` (a state dict, with torch's per-module versions) and
``model.json`` (how to rebuild the module: the spec, the class count, later the pruned shapes). An ONNX artifact is
``model.onnx`` plus ``model.json``. A decoder language model is a "causal-lm" (its HF folder, before
export) and then a "genai" folder (onnxruntime-genai's layout: ``genai_config.json``, ``model.onnx`` and
its external data, the tokenizer files) plus ``model.json``. Reloading never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlopt.core.errors import InputError, first_line, storage_error
from mlopt.core.fsutil import atomic_write_json, file_size_mb
from mlopt.runtime.models import (VOCAB_KEY, apply_recorded_shapes, apply_state_dict, bake_reparametrized, build_module,
                                  check_shape_size, count_params, cpu_state_dict, input_vocabulary, load_state_dict_file,
                                  parse_vocabulary)

META_FILE = "model.json"
TORCH_FILE = "model.pt"
ONNX_FILE = "model.onnx"
META_VERSION = 1


@dataclass
class Artifact:
    format: Literal["torch", "onnx", "causal-lm", "genai"]
    sample_shape: tuple[int, ...] | None  # one sample, without the batch dimension
    num_classes: int | None
    lineage: list[str] = field(default_factory=list)
    builder: dict[str, Any] | None = None  # torch: {"spec", "num_classes", "pruned": {module: {attr: value}}}
    # (spec None: a module handed to the Python API, which mlopt cannot rebuild)
    module: Any = None  # torch: the live nn.Module
    onnx_path: Path | None = None  # onnx: the file
    origin: str = ""  # what the user named, for messages
    vocab: int | None = None  # the input is integer token ids below this (a model reading its input with an
    # nn.Embedding, `input_vocabulary`); None: float inputs, or (integer_input) ids of unknown range
    integer_input: bool = False  # onnx: the one graph input is int32/int64 (token ids, most likely)

    def derive(self, step: str, **changes: Any) -> "Artifact":
        """A new artifact produced by a step, keeping the rest of the metadata."""
        return Artifact(**{**self.__dict__, **changes, "lineage": [*self.lineage, step]})

    def require_torch(self, step: str) -> Any:
        if self.format != "torch":
            raise InputError(f"{step} needs a PyTorch model, but the current model is ONNX ({self.origin})")
        return self.module

    @property
    def is_decoder(self) -> bool:
        return self.format in ("causal-lm", "genai")

    @property
    def folder(self) -> Path:
        """A genai artifact's folder (model.onnx, its data, genai_config.json, tokenizer)."""
        assert self.format == "genai" and self.onnx_path is not None
        return Path(self.onnx_path).parent

    def require_onnx(self, step: str) -> Path:
        if self.is_decoder:
            raise InputError(f"{step} does not run on decoder language models ({self.origin})")
        if self.format != "onnx":
            raise InputError(f"{step} needs an ONNX model; add an export step before it (current model: {self.origin})")
        assert self.onnx_path is not None
        return self.onnx_path

    def metadata(self) -> dict[str, Any]:
        meta = {"mlopt_model_version": META_VERSION, "format": self.format, "builder": self.builder,
                "sample_shape": list(self.sample_shape) if self.sample_shape else None,
                "num_classes": self.num_classes, "lineage": self.lineage}
        if self.vocab is not None:
            meta["input_vocabulary"] = self.vocab
        signature = _sign(self.builder)
        if signature is not None:
            meta["builder_signature"] = signature
        return meta

    def save(self, out_dir: Path) -> Path:
        """Write the artifact into out_dir (a staging directory); return the main file."""
        import torch

        out_dir = Path(out_dir)
        target = out_dir / (TORCH_FILE if self.format == "torch" else ONNX_FILE)
        try:
            if self.format == "torch":
                with open(target, "wb") as f:  # through a Python file, so a full disk raises OSError(ENOSPC)
                    torch.save(cpu_state_dict(self.module), f)
            elif self.format == "genai":
                copy_genai_files(self.folder, out_dir)
            elif self.format == "causal-lm":
                raise InputError("a decoder is saved once exported: add an export step")
            else:
                assert self.onnx_path is not None
                if Path(self.onnx_path).resolve() != target.resolve():
                    shutil.copyfile(self.onnx_path, target)
            atomic_write_json(out_dir / META_FILE, self.metadata())
        except Exception as exc:
            full = storage_error(exc, target)
            if full is None:
                raise
            raise full from exc
        return target

    def size_mb(self) -> float | None:
        if self.format == "genai":
            return folder_size_mb(self.folder)
        if self.format == "onnx" and self.onnx_path is not None:  # the graph and its external data
            return file_size_mb(self.onnx_path)
        if self.module is not None:
            return sum(v.numel() * v.element_size() for v in self.module.state_dict().values()) / 1e6
        return None

    def params(self) -> int | None:
        return count_params(self.module) if self.format == "torch" and self.module is not None else None


def genai_files(folder: Path, weights: bool = True) -> list[Path]:
    """The files of a genai folder that are the model: every file but mlopt's own (model.json, reports, the
    output marker); without `weights`, those that are not the graph and its data (configs, tokenizer)."""
    from mlopt.runtime.decoder import onnx_name

    return [p for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != META_FILE
            and not p.name.startswith(("report.", ".mlopt")) and (weights or not p.name.startswith(onnx_name(folder)))]


def folder_size_mb(folder: Path) -> float:
    """What a user ships of a genai folder."""
    return sum(p.stat().st_size for p in genai_files(folder)) / 1e6


def copy_genai_files(src: Path, dst: Path, weights: bool = True) -> None:
    """A genai folder's files (see genai_files) into `dst`: hard links where the file system allows (weights are
    large), copies elsewhere."""
    import os

    if src.resolve() == dst.resolve():
        return
    for item in genai_files(src, weights):
        target = dst / item.name
        try:
            os.link(item, target)
        except OSError:
            shutil.copyfile(item, target)


def _graph_name(folder: Path) -> str | None:
    from mlopt.runtime.decoder import onnx_name

    try:
        return onnx_name(folder)
    except InputError:
        return None


def load_genai_folder(path: Path, meta: dict[str, Any] | None = None) -> Artifact:
    """An onnxruntime-genai folder (mlopt's or anyone's): its model.onnx is checked like any ONNX file."""
    from mlopt.runtime.decoder import GENAI_CONFIG, onnx_name

    if not (path / GENAI_CONFIG).is_file():
        raise InputError(f"{path} is not a decoder folder: it has no {GENAI_CONFIG}")
    graph = path / onnx_name(path)
    for file in (path / GENAI_CONFIG, graph):  # as for external data: a link may not lead out of the folder
        if not file.resolve().is_relative_to(path.resolve()):
            raise InputError(f"{file} is a link to {file.resolve()}, outside the decoder's folder; mlopt reads a "
                             "decoder's graph and genai_config.json only from files in its folder")
    load_onnx_file(graph)  # refuses a broken file or external data outside the folder
    meta = meta or {}
    return Artifact(format="genai", sample_shape=None, num_classes=None, lineage=list(meta.get("lineage") or []),
                    builder=meta.get("builder"), onnx_path=graph, origin=str(path))


def load_artifact(path: str | Path) -> Artifact:
    """Load an mlopt output directory (torch, ONNX or genai), an onnxruntime-genai folder or a bare FILE.onnx."""
    from mlopt.runtime.decoder import is_genai_folder

    path = Path(path)
    if path.is_dir():
        meta_path = path / META_FILE
        if not meta_path.is_file() and is_genai_folder(path):
            return load_genai_folder(path)
        if not meta_path.is_file():
            last = _last_model_of_run(path)
            if last is None:
                raise InputError(f"{path} is not an mlopt model directory (no {META_FILE})")
            return load_artifact(last)
        meta = _read_meta(meta_path)
        fmt = meta["format"]
        if fmt == "genai":
            return load_genai_folder(path, meta)
        if fmt == "torch":
            return _load_torch_dir(path, meta)
        if fmt == "onnx":
            art = load_onnx_file(path / ONNX_FILE)
            art.lineage, art.builder = list(meta.get("lineage") or []), meta.get("builder")
            art.sample_shape = tuple(meta["sample_shape"]) if meta.get("sample_shape") else art.sample_shape
            art.num_classes = meta.get("num_classes") or art.num_classes
            art.vocab = meta.get("input_vocabulary") or art.vocab
            return art
        raise InputError(f"{meta_path}: unknown model format {fmt!r}")
    if path.suffix == ".onnx":
        if is_genai_folder(path.parent) and path.name == _graph_name(path.parent):
            return load_artifact(path.parent)  # a decoder's graph runs only with its folder (KV cache, tokenizer)
        return load_onnx_file(path)
    raise InputError(f"{path} does not exist" if not path.exists() else f"{path} is neither an mlopt directory nor an .onnx file")


#: A key of this user's, kept outside every model folder: mlopt signs the builder of each model.json it
#: writes with it, so that a folder it wrote may rebuild a model by running the user's code, and a
#: folder handed over by someone else may not.
KEY_ENV = "MLOPT_KEY_FILE"


def _key(create: bool) -> bytes | None:
    """This user's signing key; created (readable by the user only) on first use. None where it cannot be."""
    import os
    import secrets
    import tempfile

    path = Path(os.environ.get(KEY_ENV)
                or Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mlopt" / "provenance.key")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if not create:
            return None
    except OSError:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".key.")  # mode 0600
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # atomic, and the first of two racing processes wins
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return path.read_bytes()
    except OSError:
        return None


def _sign(builder: dict[str, Any] | None, create: bool = True) -> str | None:
    import hashlib
    import hmac

    key = _key(create) if builder is not None else None
    if key is None:
        return None
    return hmac.new(key, json.dumps(builder, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def _check_builder(path: Path, builder: dict[str, Any], signature: Any) -> None:
    """A model.json may name code to run only when mlopt wrote it for this user (its builder signed with
    the user's key): a folder handed over by someone else must not make mlopt import a file or module."""
    import hmac

    spec = builder["spec"]
    if not isinstance(spec, str):
        raise InputError(f"{path / META_FILE} is corrupt: the builder spec is not a string")
    if spec.startswith(("torchvision:", "hf:")):  # builds without importing code (FILE.py:FACTORY, module:FACTORY)
        return
    expected = _sign(builder, create=False)
    if expected is None or not isinstance(signature, str) or not hmac.compare_digest(expected, signature):
        raise InputError(f"{path / META_FILE} rebuilds the model by running code ({spec}) and was not written by "
                         "mlopt for this user; mlopt runs code a model folder names only in folders it wrote itself. "
                         f"If you trust that code, name it yourself: --model {spec} --weights {path / TORCH_FILE}")


MAX_META_BYTES = 16 << 20  # the largest model.json mlopt writes (pruned shapes of a big model) is far smaller


def _read_meta(meta_path: Path) -> dict[str, Any]:
    """model.json, checked field by field: a corrupt or forged one is refused with one line."""
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise InputError(f"{meta_path} is corrupt: larger than {MAX_META_BYTES >> 20} MiB")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as exc:  # not JSON, or not UTF-8
        raise InputError(f"{meta_path} is corrupt: {first_line(exc)}") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise InputError(f"{meta_path} is corrupt: not an mlopt model description (no format)")
    shape = meta.get("sample_shape")
    if shape is not None:
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise InputError(f"{meta_path} is corrupt: sample_shape must be a list of positive integers, not {shape!r:.80}")
        check_shape_size(shape, f"{meta_path}: sample_shape")
    classes = meta.get("num_classes")
    if classes is not None and (not isinstance(classes, int) or isinstance(classes, bool) or classes <= 0):
        raise InputError(f"{meta_path} is corrupt: num_classes must be a positive integer, not {classes!r:.80}")
    vocab = meta.get("input_vocabulary")
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0):
        raise InputError(f"{meta_path} is corrupt: input_vocabulary must be a positive integer, not {vocab!r:.80}")
    lineage = meta.get("lineage") or []
    if not isinstance(lineage, list) or not all(isinstance(step, str) for step in lineage):
        raise InputError(f"{meta_path} is corrupt: lineage must be a list of step names")
    return meta


def _load_torch_dir(path: Path, meta: dict[str, Any]) -> Artifact:
    builder = meta.get("builder") or {}
    if not isinstance(builder, dict) or "spec" not in builder:
        raise InputError(f"{path / META_FILE} is corrupt: no builder spec")
    if builder["spec"] is None:  # a module handed to the Python API: mlopt never pickles the class
        raise InputError(f"{path} holds a model built in Python ({builder.get('module', 'a module')}) that mlopt "
                         f"cannot rebuild: build it in Python and load {TORCH_FILE} into it "
                         f"(torch.load(weights_only=True); {META_FILE} lists the pruned shapes), or start from a spec "
                         "mlopt builds (FILE.py:FACTORY)")
    _check_builder(path, builder, meta.get("builder_signature"))
    module = build_module(builder["spec"], builder.get("num_classes"))
    state = load_state_dict_file(path / TORCH_FILE)
    baked = builder.get("baked")
    if baked is not None:
        if not isinstance(baked, list) or not all(isinstance(n, str) for n in baked):
            raise InputError(f"{path / META_FILE} is corrupt: baked must be a list of module names")
        bake_reparametrized(module, baked)
    if builder.get("pruned"):
        apply_recorded_shapes(module, builder["pruned"], state)
    apply_state_dict(module, state, str(path / TORCH_FILE))
    module.eval()
    shape = meta.get("sample_shape")
    # A folder written before mlopt recorded the vocabulary: probed again (only models with an embedding run)
    vocab = meta["input_vocabulary"] if "input_vocabulary" in meta or not shape else input_vocabulary(module, tuple(shape))
    return Artifact(format="torch", sample_shape=tuple(shape) if shape else None, num_classes=meta.get("num_classes"),
                    lineage=list(meta.get("lineage") or []), builder=builder, module=module, origin=str(path),
                    vocab=vocab)


def load_onnx_file(path: Path) -> Artifact:
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path} is not a valid ONNX file ({type(exc).__name__})") from exc
    if not model.graph.input or not model.graph.output:
        raise InputError(f"{path} is not a valid ONNX model (no graph inputs or outputs)")
    _check_external_data(model, path)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs:
        raise InputError(f"{path} is not a valid ONNX model (every graph input is an initializer)")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if any(d is not None and d < 0 for d in dims):
        raise InputError(f"{path}: input {inputs[0].name!r} declares a negative dimension {dims}")
    sample_shape = tuple(dims[1:]) if dims[1:] and all(d for d in dims[1:]) else None
    if sample_shape is not None:
        check_shape_size(sample_shape, f"{path}: input {inputs[0].name!r}")
    out_dims = [d.dim_value if d.HasField("dim_value") else None for d in model.graph.output[0].type.tensor_type.shape.dim]
    num_classes = out_dims[-1] if len(out_dims) == 2 and out_dims[-1] and len(model.graph.output) == 1 else None
    ids = {onnx.TensorProto.INT32, onnx.TensorProto.INT64}  # not uint8: images with the conversion in the graph
    return Artifact(format="onnx", sample_shape=sample_shape, num_classes=num_classes, onnx_path=path, origin=str(path),
                    vocab=onnx_vocabulary(model, inputs[0].name if len(inputs) == 1 else None),
                    integer_input=len(inputs) == 1 and inputs[0].type.tensor_type.elem_type in ids)


def onnx_vocabulary(model: Any, name: str | None) -> int | None:
    """The input vocabulary mlopt's export recorded in an ONNX model's metadata (`VOCAB_KEY`); for a file from
    elsewhere whose one input (`name`; initializers listed as inputs do not count) indexes tables directly (Gather
    of an initializer by the graph input), the smallest table's rows; else None."""
    recorded = parse_vocabulary(next((p.value for p in model.metadata_props if p.key == VOCAB_KEY), None))
    if recorded is not None or name is None:
        return recorded
    tables = {i.name: i.dims[0] for i in model.graph.initializer if i.dims}
    rows = [tables[n.input[0]] for n in model.graph.node
            if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == name and n.input[0] in tables]
    return min(rows) if rows else None


def _tensors(graph: Any) -> Any:
    """Every tensor stored in a graph: initializers and constant attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def _check_external_data(model: Any, path: Path) -> None:
    """External data must be files inside the model's own folder: a location that climbs out of it
    (``../../etc/passwd``), an absolute one or a symlink leading elsewhere is refused before any load."""
    import onnx

    folder = path.parent.resolve()
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            link = f" (a link to {target})" if (folder / location).is_symlink() else ""
            raise InputError(f"{path}: tensor {tensor.name!r} keeps its data at {location!r}{link}, outside the "
                             "model's folder; mlopt reads external data only from files beside the model")
        if not target.is_file():
            raise InputError(f"{path}: tensor {tensor.name!r} keeps its data in {location}, which does not exist")


def _last_model_of_run(run_dir: Path) -> Path | None:
    """The last step directory of a recipe run that holds a model (the run's final model)."""
    if not (run_dir / "report.json").is_file():
        return None
    steps = sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / META_FILE).is_file())
    return steps[-1] if steps else None


def looks_like_artifact(spec: str) -> bool:
    from mlopt.runtime.decoder import is_genai_folder

    p = Path(spec)
    return spec.endswith(".onnx") or (p.is_dir() and ((p / META_FILE).is_file() or is_genai_folder(p)
                                                      or _last_model_of_run(p) is not None))
