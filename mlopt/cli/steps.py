"""One command per registered step type, made from the step's config class: its fields are the options.

`lr: float = Field(2e-3, description="peak learning rate")` becomes `--lr <float>  Peak learning rate.
[default: (0.002)]`; `cli(...)` (mlopt.core.contracts) adjusts an option; a nested config (prune's
`finetune`) adds its fields. An option defaults to None, "not given": the recipe (and --save-recipe)
holds what the user gave, the config the rest. The options all steps share (mlopt.cli.options) are
taken as the pass's attributes say; a field whose option would be a shared one is not an option of
its own: a `seed` field takes --seed's value, the others (a training step's batch_size) are left to recipes.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing
from typing import Annotated, Any, Callable, List, Literal, Optional, Union

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mlopt.cli import options as o
from mlopt.cli.common import build_recipe, execute, handle_errors, relaunch_under_torchrun
from mlopt.core.contracts import CLI_FIELD, PASSES, Pass

_MODEL_KEYS = ("num_classes", "weights", "input_shape", "seed")
_DATA_KEYS = ("batch_size", "image_size", "channels", "max_length", "seed")
_FALSE_BY_DEFAULT = ("resume", "overwrite", "quiet", "json_out")


def _fields(config: type[BaseModel], prefix: tuple[str, ...] = (), omit: tuple[str, ...] = ()) -> list[Any]:
    """(path, field, cli settings with the flag) of every field; ("finetune", "lr") for a nested config's."""
    found = []
    for name, info in config.model_fields.items():
        if name == "type" or name in omit:
            continue
        extra = info.json_schema_extra
        meta = extra.get(CLI_FIELD, {}) if isinstance(extra, dict) else {}
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            found += _fields(info.annotation, (*prefix, name), tuple(meta.get("omit", ())))
        else:
            found.append(((*prefix, name), info, {"flag": "--" + name.replace("_", "-"), "named": "flag" in meta, **meta}))
    return found


def _option_type(info: FieldInfo) -> tuple[Any, str | None]:
    """The option's type without None, and for a Literal the choices as metavar (the value stays a str)."""
    annotation = info.annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else Union[tuple(rest)]
    if typing.get_origin(annotation) is list:  # list[BatchSize]: the bounds are the config's to check, not Typer's
        (item,) = typing.get_args(annotation)
        annotation = list[typing.get_args(item)[0] if typing.get_origin(item) is Annotated else item]
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None
    return (type(choices[0]), "<" + "|".join(map(str, choices)) + ">") if choices else (annotation, None)


def _help(info: FieldInfo) -> str:
    text = info.description or ""
    if re.match(r"[a-z]+ ", text):  # a phrase, not a value ("auto: ...") or a name
        text = text[0].upper() + text[1:]
    return text + ("." if text and not text.endswith(".") else "")


def _shown_default(default: Any, flag: str) -> str | bool:
    if default is None or default == []:
        return False
    if isinstance(default, bool):
        return flag.split("/")[0 if default else 1]
    return ", ".join(map(str, default)) if isinstance(default, list) else str(default)


def _field_parameter(path: tuple[str, ...], info: FieldInfo, meta: dict[str, Any]) -> inspect.Parameter:
    base, metavar = _option_type(info)
    flag = meta["flag"] if base is not bool or "/" in meta["flag"] else f"{meta['flag']}/--no-{meta['flag'][2:]}"
    required = bool(meta.get("required"))
    shown = False if required else _shown_default(info.get_default(call_default_factory=True), flag)
    option = typer.Option(flag, *filter(None, [meta.get("short")]), help=_help(info), show_default=shown,
                          metavar=metavar, hidden=bool(meta.get("hidden")))
    return inspect.Parameter("step__" + "__".join(path), inspect.Parameter.KEYWORD_ONLY,
                             annotation=Annotated[base if required else Optional[base], option],
                             default=inspect.Parameter.empty if required else None)


def _shared(p: type[Pass], seeded: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared options the step takes (flag -> (name, annotation)): those listed before its own, those after."""
    takes_data = p.needs_data or p.produces_model or p.uses_data  # else the step has no use of data
    if p.cli_models_help:
        first = {"": ("models", Annotated[List[str], typer.Argument(help=p.cli_models_help)])}
    else:
        first = {p.cli_model_option[0]: ("model", Annotated[str, typer.Option(*p.cli_model_option, help=o.MODEL_HELP)])}
    if takes_data:
        first["--data"] = ("data", o.Data if p.needs_data else o.OptionalData)
    first["--out"] = ("out", o.Out if p.produces_model else o.OptionalOut)
    after = {
        "batch_size": takes_data and o.BatchSize, "input_shape": o.InputShape,
        "image_size": takes_data and o.ImageSize, "channels": takes_data and o.Channels,
        "max_length": takes_data and p.text_ok and o.MaxLength,
        "num_classes": not p.cli_models_help and o.NumClasses, "weights": not p.cli_models_help and o.Weights,
        "seed": seeded and o.Seed, "resume": p.trains and o.Resume, "nproc": p.trains and o.Nproc,
        "overwrite": o.Overwrite, "quiet": o.Quiet, "json_out": o.Json, "save_recipe": o.SaveRecipe,
    }
    return first, {"--json" if n == "json_out" else "--" + n.replace("_", "-"): (n, option)
                   for n, option in after.items() if option}


def _signature(p: type[Pass]) -> tuple[inspect.Signature, list[Any], list[tuple[str, ...]]]:
    """The command's parameters, the fields that are options, and the paths of the fields --seed fills."""
    fields = _fields(p.config_class)
    named = {meta["flag"].split("/")[0] for _, _, meta in fields if meta["named"]}
    first, after = _shared(p, seeded=any(path[-1] == "seed" and not meta["named"] for path, _, meta in fields))
    after = {flag: option for flag, option in after.items() if flag not in named}  # ptq's --batch-size is its own
    options = [f for f in fields if f[2]["named"] or f[2]["flag"] not in {*first, *after}]
    seeds = [f[0] for f in fields if f[0][-1] == "seed" and f not in options]
    if len({meta["flag"] for _, _, meta in options}) != len(options):
        raise TypeError(f"step type {p.name!r}: two config fields have the same option")

    def shared(name: str, annotation: Any) -> inspect.Parameter:
        required = name in ("model", "models") or (name == "data" and p.needs_data) or (name == "out" and p.produces_model)
        default = inspect.Parameter.empty if required else False if name in _FALSE_BY_DEFAULT else 1 if name == "nproc" else None
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    parameters = [*(shared(*v) for v in first.values()), *(_field_parameter(*f) for f in options),
                  *(shared(*v) for v in after.values())]
    return inspect.Signature(parameters), options, seeds


def _put(step: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    if value is None or value == [] or value == ():
        return
    for key in path[:-1]:
        step = step.setdefault(key, {})
    step[path[-1]] = list(value) if isinstance(value, tuple) else value


def step_command(p: type[Pass]) -> Callable[..., None]:
    """The command of step type `p`: a one-step recipe from its options, run by the shared runner."""
    signature, options, seeds = _signature(p)

    def command(**values: Any) -> None:
        relaunch_under_torchrun(values.get("nproc", 1), values["save_recipe"])
        step: dict[str, Any] = {"type": p.name}
        for path, _, _ in options:
            _put(step, path, values["step__" + "__".join(path)])
        for path in seeds:
            _put(step, path, values.get("seed"))
        spec = p.cli_models(values["models"], step) if "models" in values else values["model"]
        recipe = build_recipe({"spec": spec, **{k: values.get(k) for k in _MODEL_KEYS}},
                              {"source": values.get("data"), **{k: values.get(k) for k in _DATA_KEYS}}, step)
        execute(recipe, values["out"], values["overwrite"], values["quiet"], values["save_recipe"],
                resume=values.get("resume", False), json_out=values["json_out"], json_view=p.cli_json)

    command.__signature__ = signature  # type: ignore[attr-defined]  # Typer reads the options from it
    command.__doc__ = p.cli_help or p.config_class.__doc__
    return handle_errors(command)


def step_types() -> dict[str, type[Pass]]:
    """Every registered step type (the built-in ones and those MLOPT_PASSES names)."""
    from mlopt.run.recipe import import_passes  # loading the recipe module imports them; errors become messages

    import_passes()
    return dict(PASSES)


@functools.cache
def click_command(p: type[Pass]) -> Any:
    """The Click command of step type `p` (a Typer of one command gives that command)."""
    app = typer.Typer(add_completion=False, rich_markup_mode=None)
    app.command(p.name)(step_command(p))
    return typer.main.get_command(app)
