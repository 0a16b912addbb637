"""Recipes: the typed, validated description of a run (model, data, steps).

A recipe is validated completely before any work starts; unknown keys are errors, never
ignored. `${VAR}` environment interpolation is the only substitution; no code is evaluated.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlopt.compress.distill import DistillConfig, DistillPass
from mlopt.compress.prune import PruneConfig, PrunePass
from mlopt.compress.train import TrainConfig, TrainPass
from mlopt.data import DataConfig
from mlopt.errors import InputError
from mlopt.evaluate import EvalConfig, EvalPass
from mlopt.export.bench import BenchConfig, BenchPass
from mlopt.export.onnx import ExportConfig, ExportPass
from mlopt.gates import GatesConfig
from mlopt.quant.ptq import PTQConfig, PTQPass

#: step type -> pass class. A new pass is added here and to StepConfig.
PASSES = {p.name: p for p in (TrainPass, PrunePass, DistillPass, EvalPass, ExportPass, PTQPass, BenchPass)}

StepConfig = Annotated[
    Union[TrainConfig, PruneConfig, DistillConfig, EvalConfig, ExportConfig, PTQConfig, BenchConfig],
    Field(discriminator="type"),
]


class ModelConfig(BaseModel):
    """The model a run starts from."""

    model_config = ConfigDict(extra="forbid")
    spec: str = Field(description="torchvision:NAME, FILE.py:FACTORY, package.module:FACTORY, an mlopt directory or FILE.onnx")
    num_classes: int | None = Field(None, gt=0, description="defaults to the data's class count")
    weights: str | None = Field(None, description="a state dict file, read with torch.load(weights_only=True)")
    input_shape: str | None = Field(None, description="e.g. 1x3x224x224, where neither model nor data implies one")
    seed: int = Field(0, description="seed of the random initialisation")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    model: ModelConfig
    data: DataConfig | None = None
    steps: list[StepConfig] = Field(min_length=1)
    gates: GatesConfig | None = None


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _interpolate(value: Any, where: str) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                raise InputError(f"{where}: environment variable {name} is not set")
            return os.environ[name]

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_interpolate(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, where) for k, v in value.items()}
    return value


def format_validation_error(exc: ValidationError, where: str) -> str:
    """One line per problem: 'FILE: steps.0.epochs: Input should be greater than 0'."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown step type; expected one of {', '.join(PASSES)}"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{where}: " + "; ".join(parts)


def recipe_from_dict(raw: Any, where: str) -> Recipe:
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a recipe must be a mapping with version, model, data and steps")
    try:
        return Recipe.model_validate(_interpolate(raw, where))
    except ValidationError as exc:
        raise InputError(format_validation_error(exc, where)) from None


def load_recipe(path: Path) -> Recipe:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise InputError(f"{path}{at}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    return recipe_from_dict(raw, str(path))


def recipe_to_yaml(recipe: Recipe) -> str:
    import yaml

    data = recipe.model_dump(mode="json", exclude_defaults=True)
    data = {"version": recipe.version, **data}
    data["steps"] = [{"type": s.type, **s.model_dump(mode="json", exclude_defaults=True)} for s in recipe.steps]
    return yaml.safe_dump(data, sort_keys=False)
