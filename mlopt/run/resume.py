"""What a step reads, by content: `--resume` skips a step only when its config and inputs are unchanged.

The files a step reads are those named by config fields marked `names_file()` (mlopt.core.contracts)
in the step's, the model's and the data's settings, and the model the previous step handed over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlopt.core.contracts import file_fields
from mlopt.core.fsutil import digest, path_fingerprint
from mlopt.report.schema import SCHEMA_VERSION
from mlopt.runtime.artifacts import META_FILE, ONNX_FILE, TORCH_FILE

if TYPE_CHECKING:
    from pydantic import BaseModel

    from mlopt.run.recipe import Recipe


def completed_step(step_dir: Path, config: dict[str, Any], inputs_sha256: str) -> dict[str, Any] | None:
    """The report of a step that already finished with the same configuration and inputs, if any."""
    try:
        report = json.loads((step_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    # A report of another schema version (an earlier mlopt) is not reused: its step would not fit this run's report.
    step = report.get("step", {}) if isinstance(report, dict) and report.get("schema_version") == SCHEMA_VERSION else {}
    return step if step.get("config") == config and step.get("inputs_sha256") == inputs_sha256 else None


def model_files(step_dir: Path) -> dict[str, str | None]:
    """A saved model by the content of its files."""
    return {name: path_fingerprint(step_dir / name) for name in (META_FILE, TORCH_FILE, ONNX_FILE)}


def _paths_in(value: str, spec: str) -> list[str]:
    """The files or folders a marked field's value names, by its kind of spec (`names_file`): a data source
    (mlopt.runtime.data) the FILE or DIR of npz:, imagefolder: and text:; a model spec (mlopt.runtime.models)
    the DIR of hf:DIR, the FILE of gguf:FILE, the FILE.py of FILE.py:FACTORY, or itself when it has no scheme (an mlopt directory,
    FILE.onnx). torchvision:NAME, package.module:FACTORY, digits and random:SHAPE name none."""
    scheme, colon, rest = value.partition(":")
    if spec == "data":
        return [rest] if scheme in ("npz", "imagefolder", "text") and rest else []
    if spec == "model" and colon:
        prefix = value.rpartition(":")[0]
        return [rest] if scheme in ("hf", "gguf") else [prefix] if prefix.endswith(".py") else []
    return [value]


def named_files(config: "BaseModel") -> dict[str, str | None]:
    """The files the config's `names_file()` fields name, by content (nested settings included)."""
    from pydantic import BaseModel

    found: dict[str, str | None] = {}
    marked = file_fields(type(config))
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            found.update(named_files(value))
        elif name in marked:
            for v in value if isinstance(value, list) else [value]:
                for p in _paths_in(v, marked[name]) if isinstance(v, str) else []:
                    found[p] = path_fingerprint(Path(p).expanduser())
    return found


def model_fingerprint(recipe: "Recipe") -> list[Any]:
    """The recipe's model settings, and the files they name (FILE.py:factory, hf:DIR, weights) by content."""
    return [recipe.model.model_dump(mode="json"), named_files(recipe.model)]


def data_fingerprint(recipe: "Recipe") -> list[Any]:
    """The recipe's data settings, and the files they name (npz:FILE, imagefolder:DIR, text:FILE) by content."""
    if recipe.data is None:
        return []
    extra: dict[str, Any] = named_files(recipe.data)
    if recipe.data.source == "digits":
        import sklearn

        extra["scikit-learn"] = sklearn.__version__  # the digits ship with it
    return [recipe.data.model_dump(mode="json"), extra]


def step_digest(step: "BaseModel", data_fp: list[Any], model_fp: Any) -> str:
    """The content hash of everything a step reads: its config, the data, the model before it, its files."""
    return digest(step.model_dump(mode="json"), data_fp, model_fp, named_files(step))
