"""Recipes: the typed, validated description of a run (model, data, steps).

A recipe is validated completely before any work starts; unknown keys are errors, never
ignored. `${VAR}` environment interpolation is the only substitution; no code is evaluated.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, ValidationError

from mlopt.core.contracts import PASSES, names_file, on_register
from mlopt.core.errors import InputError, first_line
from mlopt.core.sections import BatchSize, Config, Seed
from mlopt.runtime.data import MAX_CLASSES, DataConfig

#: Packages whose modules define the built-in step types (one module per step type).
PASS_HOMES = ("mlopt.compress", "mlopt.quant", "mlopt.export")
#: Environment variable naming more modules that define step types (comma separated).
PASSES_ENV = "MLOPT_PASSES"


def import_passes() -> None:
    """Import every module that defines a step type: the homes' top-level modules, and MLOPT_PASSES."""
    import importlib
    import pkgutil

    for home in PASS_HOMES:
        for m in pkgutil.iter_modules(importlib.import_module(home).__path__):
            if not m.ispkg:
                importlib.import_module(f"{home}.{m.name}")
    for name in (n.strip() for n in os.environ.get(PASSES_ENV, "").split(",") if n.strip()):
        try:
            importlib.import_module(name)
        except Exception as exc:  # a plugin that fails to load (or redefines a step type) is the user's input
            raise InputError(f"{PASSES_ENV}: cannot import {name}: {type(exc).__name__}: {first_line(exc)}") from None


def _step_union() -> Any:
    return Annotated[Union[tuple(p.config_class for p in PASSES.values())], Field(discriminator="type")]


import_passes()
StepConfig = _step_union()


class GatesConfig(Config):
    """Thresholds the final model must meet; any subset."""

    max_accuracy_drop: float | None = Field(None, ge=0, description="top-1 drop from the baseline (0.01 = 1 point)")
    min_speedup: float | None = Field(None, gt=0, description="baseline latency / final latency on onnxruntime")
    max_size_mb: float | None = Field(None, gt=0, description="size of the final model file")
    max_latency_ms: float | None = Field(None, gt=0, description="final model latency (median)")
    min_cosine: float | None = Field(None, gt=-1, le=1, description="text encoders: mean cosine of the final model's "
                                     "mean-pooled outputs to the baseline's on the validation text")
    min_decode_speedup: float | None = Field(None, gt=0, description="decoders: final decode tokens/s over the baseline's")
    max_ppl_increase: float | None = Field(None, ge=0, description="decoders: perplexity increase over the baseline (0.05 = 5%)")
    batch_size: BatchSize = Field(1, description="batch size of the latency measurements")
    provider: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    iterations: int = Field(30, gt=0)

    def any(self) -> bool:
        return any(v is not None for v in (self.max_accuracy_drop, self.min_speedup, self.max_size_mb, self.max_latency_ms,
                                           self.min_decode_speedup, self.max_ppl_increase, self.min_cosine))


class ModelConfig(Config):
    """The model a run starts from."""

    spec: str = Field(json_schema_extra=names_file("model"), description="torchvision:NAME, FILE.py:FACTORY, package.module:FACTORY, hf:DIR, an mlopt directory or FILE.onnx")
    num_classes: int | None = Field(None, gt=0, le=MAX_CLASSES, description="defaults to the data's class count")
    weights: str | None = Field(None, json_schema_extra=names_file(), description="a state dict file, read with torch.load(weights_only=True)")
    input_shape: str | None = Field(None, description="e.g. 1x3x224x224, where neither model nor data implies one")
    seed: Seed = Field(0, description="seed of the random initialisation")


class Recipe(Config):
    version: Literal[1] = 1
    model: ModelConfig
    data: DataConfig | None = None
    steps: list[StepConfig] = Field(min_length=1)
    gates: GatesConfig | None = None


def _add_step_type(_: Any) -> None:
    """A pass defined after this module loaded (a plugin, a test) joins the recipe's step union."""
    global StepConfig
    StepConfig = _step_union()
    Recipe.model_fields["steps"].annotation = list[StepConfig]  # a rebuild alone keeps the resolved old union
    Recipe.model_rebuild(force=True)


on_register(_add_step_type)


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


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping at `loc` (for suggesting a misspelled key's close names)."""
    import typing

    cls: Any = Recipe
    items = list(loc)
    while items:
        item = items.pop(0)
        if cls is Recipe and item == "steps":  # steps.<index>.<type>...
            if len(items) < 2 or items[1] not in PASSES:
                return []
            cls, items = PASSES[items[1]].config_class, items[2:]
            continue
        field = cls.model_fields.get(item)
        annotation = field.annotation if field is not None else None
        cls = next((a for a in [annotation, *typing.get_args(annotation)]
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return []
    return list(cls.model_fields)


def _mark(node: Any, loc: tuple[Any, ...]) -> tuple[int, int] | None:
    import yaml

    mark = None
    for item in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(item, str):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == item), None)
            if match is None:
                continue  # e.g. the step type pydantic adds to a step's location
            mark, node = match[0].start_mark, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(item, int) and item < len(node.value):
            node = node.value[item]
            mark = node.start_mark
    return (mark.line + 1, mark.column + 1) if mark is not None else None


def format_validation_error(exc: ValidationError, where: str, tree: Any = None) -> str:
    """One clause per problem: 'FILE:3:5: steps.0.epoch: unknown key (did you mean epochs?)'."""
    import difflib

    parts = []
    for err in exc.errors():
        loc, msg = tuple(err["loc"]), err["msg"]
        shown = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc[:-1]), n=2)
            msg = "unknown key" + (f" (did you mean {' or '.join(close)}?)" if close else "")
        elif err["type"] == "union_tag_invalid":
            tag = str((err.get("ctx") or {}).get("tag", ""))
            close = difflib.get_close_matches(tag, list(PASSES), n=1)
            msg = f"unknown step type {tag!r}" + (f" (did you mean {close[0]}?)" if close else "") \
                + f"; expected one of {', '.join(sorted(PASSES))}"
        at = _mark(tree, loc) if tree is not None else None
        prefix = f"{where}:{at[0]}:{at[1]}" if at else where
        parts.append(f"{prefix}: {shown}: {msg}" if shown else f"{prefix}: {msg}")
    return "; ".join(parts)


def recipe_from_dict(raw: Any, where: str, tree: Any = None) -> Recipe:
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a recipe must be a mapping with version, model, data and steps")
    try:
        return Recipe.model_validate(_interpolate(raw, where))
    except ValidationError as exc:
        raise InputError(format_validation_error(exc, where, tree)) from None


#: A recipe is a few hundred lines at most; these bounds refuse hostile files before any work.
MAX_RECIPE_BYTES = 1 << 20
#: Values a recipe may expand to, anchors and aliases counted at every use (an alias bomb of nine
#: levels of ten aliases expands to 10^9 values from 90 written ones).
MAX_RECIPE_VALUES = 10_000
MAX_RECIPE_DEPTH = 32


def _expanded_size(node: Any, where: str) -> int:
    """How many values `node` stands for once every alias is expanded (shared nodes counted once each use); a key
    given twice in one mapping is refused on the way."""
    import yaml

    sizes: dict[int, int] = {}

    def size(n: Any, depth: int) -> int:
        if depth > MAX_RECIPE_DEPTH:
            raise InputError(f"{where}: nested more than {MAX_RECIPE_DEPTH} levels deep; a recipe is a few levels deep")
        if id(n) in sizes:
            return sizes[id(n)]
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in n.value)
        elif isinstance(n, yaml.MappingNode):
            seen: set[str] = set()
            for k, _ in n.value:  # YAML keeps the last of two equal keys without a word: a setting silently lost
                if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                    if k.value in seen:
                        raise InputError(f"{where}:{k.start_mark.line + 1}: key {k.value!r} is given twice in one "
                                         "mapping; keep one")
                    seen.add(k.value)
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in n.value)
        if total > MAX_RECIPE_VALUES:
            raise InputError(f"{where}: expands to more than {MAX_RECIPE_VALUES:,} values through YAML aliases "
                             "(*name); a recipe may reuse anchors, but not multiply them (alias bomb?)")
        sizes[id(n)] = total
        return total

    return size(node, 0)


def _read_recipe_text(path: Path) -> str:
    if path.is_dir():
        raise InputError(f"recipe {path} is a directory, not a YAML file")
    if not path.is_file():
        raise InputError(f"recipe {path} does not exist" if not path.exists() else f"recipe {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise InputError(f"recipe {path} is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a short YAML file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"recipe {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "a recipe is a YAML file") from None


def _parse_yaml(text: str, where: str) -> tuple[Any, Any]:
    """The recipe's data and its composed node tree (for line numbers), refusing alias bombs and deep nesting."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events come without recursion, unlike nodes
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_RECIPE_DEPTH:
                raise InputError(f"{where}: nested more than {MAX_RECIPE_DEPTH} levels deep; a recipe is a few levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _expanded_size(node, where)
        return loader.construct_document(node), node
    finally:
        loader.dispose()


def load_recipe(path: Path) -> Recipe:
    import yaml

    path = Path(path)
    try:
        raw, tree = _parse_yaml(_read_recipe_text(path), str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise InputError(f"{path}{at}: invalid YAML: {problem}") from None
    return recipe_from_dict(raw, str(path), tree)


def recipe_to_yaml(recipe: Recipe) -> str:
    import yaml

    data = {"version": recipe.version, **recipe.model_dump(mode="json", exclude_defaults=True)}
    data["steps"] = [{"type": s.type, **s.model_dump(mode="json", exclude_defaults=True)} for s in recipe.steps]
    return yaml.safe_dump(data, sort_keys=False)
