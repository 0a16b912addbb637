"""Artifacts: the model that flows from pass to pass, and how it is saved and reloaded.

A torch artifact is saved as ``model.pt`` (a plain state dict) and ``model.json`` (how to
rebuild the module: the spec, the class count, later the pruned shapes). An ONNX artifact is
``model.onnx`` plus ``model.json``. Reloading never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlopt.errors import InputError, storage_error

META_FILE = "model.json"
TORCH_FILE = "model.pt"
ONNX_FILE = "model.onnx"
META_VERSION = 1


@dataclass
class Artifact:
    format: Literal["torch", "onnx"]
    sample_shape: tuple[int, ...] | None  # one sample, without the batch dimension
    num_classes: int | None
    lineage: list[str] = field(default_factory=list)
    builder: dict[str, Any] | None = None  # torch: {"spec", "num_classes", "pruned": {module: {attr: value}}}
    module: Any = None  # torch: the live nn.Module
    onnx_path: Path | None = None  # onnx: the file
    origin: str = ""  # what the user named, for messages

    def derive(self, step: str, **changes: Any) -> "Artifact":
        """A new artifact produced by a step, keeping the rest of the metadata."""
        values = {**self.__dict__, **changes}
        values["lineage"] = [*self.lineage, step]
        return Artifact(**values)

    def require_torch(self, step: str) -> Any:
        if self.format != "torch":
            raise InputError(f"{step} needs a PyTorch model, but the current model is ONNX ({self.origin})")
        return self.module

    def require_onnx(self, step: str) -> Path:
        if self.format != "onnx":
            raise InputError(f"{step} needs an ONNX model; add an export step before it (current model: {self.origin})")
        assert self.onnx_path is not None
        return self.onnx_path

    def metadata(self) -> dict[str, Any]:
        return {
            "mlopt_model_version": META_VERSION,
            "format": self.format,
            "builder": self.builder,
            "sample_shape": list(self.sample_shape) if self.sample_shape else None,
            "num_classes": self.num_classes,
            "lineage": self.lineage,
        }

    def save(self, out_dir: Path) -> Path:
        """Write the artifact into out_dir (a staging directory); return the main file."""
        import torch

        from mlopt.fsutil import atomic_write_json

        out_dir = Path(out_dir)
        target = out_dir / (TORCH_FILE if self.format == "torch" else ONNX_FILE)
        try:
            if self.format == "torch":
                state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
                with open(target, "wb") as f:  # through a Python file, so a full disk raises OSError(ENOSPC)
                    torch.save(state, f)
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
        if self.format == "onnx" and self.onnx_path is not None:
            from mlopt.fsutil import file_size_mb

            return file_size_mb(self.onnx_path)
        if self.module is not None:
            return sum(v.numel() * v.element_size() for v in self.module.state_dict().values()) / 1e6
        return None

    def params(self) -> int | None:
        if self.format == "torch" and self.module is not None:
            from mlopt.models import count_params

            return count_params(self.module)
        return None


def load_artifact(path: str | Path) -> Artifact:
    """Load an mlopt output directory (torch or ONNX) or a bare FILE.onnx."""
    path = Path(path)
    if path.is_dir():
        meta_path = path / META_FILE
        if not meta_path.is_file():
            last = _last_model_of_run(path)
            if last is None:
                raise InputError(f"{path} is not an mlopt model directory (no {META_FILE})")
            return load_artifact(last)
        try:
            meta = json.loads(meta_path.read_text())
            fmt = meta["format"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{meta_path} is corrupt: {exc}") from exc
        if fmt == "torch":
            return _load_torch_dir(path, meta)
        if fmt == "onnx":
            art = load_onnx_file(path / ONNX_FILE)
            art.lineage = list(meta.get("lineage") or [])
            art.builder = meta.get("builder")
            if meta.get("sample_shape"):
                art.sample_shape = tuple(meta["sample_shape"])
            if meta.get("num_classes"):
                art.num_classes = meta["num_classes"]
            return art
        raise InputError(f"{meta_path}: unknown model format {fmt!r}")
    if path.suffix == ".onnx":
        return load_onnx_file(path)
    raise InputError(f"{path} does not exist" if not path.exists() else f"{path} is neither an mlopt directory nor an .onnx file")


def _load_torch_dir(path: Path, meta: dict[str, Any]) -> Artifact:
    from mlopt.models import apply_recorded_shapes, apply_state_dict, build_module, load_state_dict_file

    builder = meta.get("builder") or {}
    if "spec" not in builder:
        raise InputError(f"{path / META_FILE} is corrupt: no builder spec")
    module = build_module(builder["spec"], builder.get("num_classes"))
    state = load_state_dict_file(path / TORCH_FILE)
    if builder.get("pruned"):
        apply_recorded_shapes(module, builder["pruned"], state)
    apply_state_dict(module, state, str(path / TORCH_FILE))
    module.eval()
    shape = meta.get("sample_shape")
    return Artifact(
        format="torch",
        sample_shape=tuple(shape) if shape else None,
        num_classes=meta.get("num_classes"),
        lineage=list(meta.get("lineage") or []),
        builder=builder,
        module=module,
        origin=str(path),
    )


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
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    sample_shape = tuple(dims[1:]) if dims[1:] and all(d for d in dims[1:]) else None
    out_dims = [d.dim_value if d.HasField("dim_value") else None for d in model.graph.output[0].type.tensor_type.shape.dim]
    num_classes = out_dims[-1] if len(out_dims) == 2 and out_dims[-1] else None
    return Artifact(format="onnx", sample_shape=sample_shape, num_classes=num_classes, onnx_path=path, origin=str(path))


def _last_model_of_run(run_dir: Path) -> Path | None:
    """The last step directory of a recipe run that holds a model (the run's final model)."""
    if not (run_dir / "report.json").is_file():
        return None
    steps = sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / META_FILE).is_file())
    return steps[-1] if steps else None


def looks_like_artifact(spec: str) -> bool:
    p = Path(spec)
    return spec.endswith(".onnx") or (p.is_dir() and ((p / META_FILE).is_file() or _last_model_of_run(p) is not None))
