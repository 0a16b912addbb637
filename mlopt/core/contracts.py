"""The contracts every part of mlopt relies on: a pass, what it may read, what it hands back.

This module imports no torch, onnx or pass: the runner, the command line and the Python API
depend on it, and a pass depends on nothing else of the runner. A pass is registered when its
class is defined (`Pass.__init_subclass__`), so a new step type is one new module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from pydantic import BaseModel

#: step type -> pass class, filled as pass classes are defined.
PASSES: dict[str, type["Pass"]] = {}
#: called with each newly registered pass (the recipe model adds its config to the step union).
_listeners: list[Callable[[type["Pass"]], None]] = []

#: `json_schema_extra` key of a config field that names a file or folder the step reads.
FILE_FIELD = "mlopt_file"


def names_file(spec: str = "path", **extra: Any) -> dict[str, Any]:
    """`Field(json_schema_extra=names_file())`: resume hashes the files this field names by content; `spec`
    says how its value names them: "path" (it is one), "model" (a model spec) or "data" (a data source)."""
    return {FILE_FIELD: spec, **extra}


#: `json_schema_extra` key of a config field's command-line settings.
CLI_FIELD = "mlopt_cli"


def cli(flag: str = "", short: str = "", *, required: bool = False, hidden: bool = False,
        omit: tuple[str, ...] = ()) -> dict[str, Any]:
    """`Field(json_schema_extra=cli(...))`: the field's option where `--field-name` is not it: flag
    ("--per-channel/--per-tensor" names both sides of a bool), short ("-e"), required (though the
    config has a default), hidden (from --help); on a nested config, omit: its fields with no option."""
    settings = {"flag": flag, "short": short, "required": required, "hidden": hidden, "omit": list(omit)}
    return {CLI_FIELD: {k: v for k, v in settings.items() if v}}


def file_fields(config_class: type["BaseModel"]) -> dict[str, str]:
    """The fields of a config class marked with `names_file()`, each with its kind of spec."""
    return {name: f.json_schema_extra[FILE_FIELD] for name, f in config_class.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(FILE_FIELD)}


@dataclass
class StepResult:
    """What a pass hands back: the (possibly new) model, what it measured, and report sections."""

    artifact: Any  # mlopt.runtime.artifacts.Artifact
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> number, text or flag
    notes: list[str] = field(default_factory=list)  # plain statements of what was done and why
    latency: list[Any] = field(default_factory=list)  # mlopt.core.sections.Latency, one per model and batch size
    sections: list[Any] = field(default_factory=list)  # mlopt.core.sections.Table / Bars / Scatter, in order


@dataclass
class StepContext:
    """Everything a pass may read besides its model and its config."""

    out_dir: Path  # the step's own (staging) directory
    data: Any  # mlopt.runtime.data.Dataset or None
    batch_size: int  # the data's batch size, where the step's config sets none
    baseline: Any  # the model before the first compressing step (teacher, gate baseline)
    checkpoint_dir: Path | None = None  # where a training step keeps its checkpoint
    resume: bool = False


class Pass:
    """One step type: a typed config (`config_class`, whose `type` field names the step) and `run`.

    Defining a subclass with a `name` registers it; the recipe, the command line (`cli_help`) and
    the reports find it there.
    """

    name: ClassVar[str]
    config_class: ClassVar[type["BaseModel"]]
    cli_help: ClassVar[str] = ""  # the command's help; the config's docstring when empty
    cli_model_option: ClassVar[tuple[str, ...]] = ("--model", "-m")  # the option naming the model
    cli_models_help: ClassVar[str] = ""  # set: the models are positional arguments instead (see cli_models)
    produces_model: ClassVar[bool] = True
    needs_data: ClassVar[bool] = False
    uses_data: ClassVar[bool] = False  # takes --data when given, without needing it
    compresses: ClassVar[bool] = False  # the model before the first such step is the baseline
    rank0_only: ClassVar[bool] = False  # under torchrun, other ranks skip it (benchmarks)
    text_ok: ClassVar[bool] = False  # runs on hf: text models (token inputs)
    decoder_ok: ClassVar[bool] = False  # runs on decoder language models (causal-lm and genai artifacts)
    trains: ClassVar[bool] = False  # checkpoints as it trains: the command takes --resume and --nproc

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return  # an abstract helper class
        known = PASSES.get(cls.name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"step type {cls.name!r} is already defined by {PASSES[cls.name].__module__}")
        PASSES[cls.name] = cls
        for listener in _listeners:
            listener(cls)

    def run(self, artifact: Any, config: Any, ctx: StepContext) -> StepResult:
        raise NotImplementedError

    @classmethod
    def check_family(cls, config: Any, decoder: bool) -> None:
        """Before any step runs: refuse the options that do not apply to this family of model (a decoder
        language model, or any other), instead of ignoring them. Raises InputError."""

    @classmethod
    def check_text(cls, config: Any) -> None:
        """Before any step runs, on an hf: text model: refuse the options that do not apply to text (no labels,
        token inputs) instead of ignoring them. Raises InputError."""

    @classmethod
    def cli_models(cls, models: list[str], step: dict[str, Any]) -> str:
        """With `cli_models_help`: the model spec from the positional arguments (may set step fields)."""
        raise NotImplementedError

    @classmethod
    def cli_json(cls, step: dict[str, Any]) -> Any:
        """What the command prints with --json, from the step's report."""
        return step["metrics"]


def on_register(listener: Callable[[type[Pass]], None]) -> None:
    _listeners.append(listener)
