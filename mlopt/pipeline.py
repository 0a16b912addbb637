"""Passes and the runner that executes a recipe's steps, in order, in a run directory.

Every CLI subcommand builds a one-step recipe and calls `run_recipe`, so `mlopt export ...`
and a recipe with one export step are the same code path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mlopt import console
from mlopt.errors import InputError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from mlopt.artifacts import Artifact
    from mlopt.data import Dataset
    from mlopt.recipe import Recipe


@dataclass
class StepResult:
    """What a pass hands back: the (possibly new) model and what it measured."""

    artifact: "Artifact"
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # plain statements of what was done and why
    extra: dict[str, Any] = field(default_factory=dict)  # structured report sections (e.g. "bench")


@dataclass
class StepContext:
    out_dir: Path  # the step's own (staging) directory
    data: "Dataset | None"
    recipe: "Recipe"


class Pass:
    """One step type: a typed config (`config_class`) and a `run` method."""

    name: ClassVar[str]
    config_class: ClassVar[type["BaseModel"]]
    produces_model: ClassVar[bool] = True
    needs_data: ClassVar[bool] = False

    def run(self, artifact: "Artifact", config: Any, ctx: StepContext) -> StepResult:
        raise NotImplementedError


@dataclass
class RunResult:
    report: dict[str, Any]
    artifact: "Artifact"
    out: Path | None


def run_recipe(
    recipe: "Recipe",
    out: Path | None,
    overwrite: bool = False,
    flat: bool = False,
    recipe_file: str | None = None,
) -> RunResult:
    """Execute every step of `recipe`.

    flat=True (single CLI commands): the step's artifact and report go straight into `out`.
    flat=False (recipes): one `NN-<type>/` directory per step and a combined report in `out`.
    out=None: nothing is kept (eval and bench without --out).
    Each step is written into a staging directory and renamed into place when it succeeds.
    """
    from rich.markup import escape

    from mlopt import environment, fsutil
    from mlopt.recipe import PASSES
    from mlopt.report import SCHEMA_VERSION, write_reports

    if out is not None:
        fsutil.check_output_dir(out, overwrite)
    for step in recipe.steps:
        if PASSES[step.type].needs_data and recipe.data is None:
            raise InputError(f"step {step.type!r} needs data: give --data (or 'data:' in the recipe)")

    artifact, data = prepare(recipe)
    env = environment.describe()
    step_reports: list[dict[str, Any]] = []

    scratch = None
    if out is None:
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="mlopt-"))
    root = scratch
    staged_root = None
    if not flat and out is not None:
        staged_root = fsutil.staging_dir(Path(out))
    try:
        for index, step in enumerate(recipe.steps, start=1):
            pass_ = PASSES[step.type]()
            name = f"{index:02d}-{step.type}"
            if out is None:
                final_dir = stage = root / name
                stage.mkdir()
            else:
                final_dir = Path(out) if flat else staged_root / name
                stage = fsutil.staging_dir(final_dir)
            shown_dir = final_dir if out is None or flat else Path(out) / name
            console.info(f"[bold]{name}[/bold]: {step.type} ({artifact.format} model {escape(artifact.origin)})")
            started = time.time()
            try:
                result = pass_.run(artifact, step, StepContext(out_dir=stage, data=data, recipe=recipe))
                files = []
                if pass_.produces_model:
                    main_file = result.artifact.save(stage)
                    result.artifact.origin = str(shown_dir)
                    files.append(main_file.name)
                step_report = {
                    "index": index,
                    "dir": name,
                    "type": step.type,
                    "config": step.model_dump(mode="json"),
                    "input": {"format": artifact.format, "lineage": artifact.lineage},
                    "output": {"format": result.artifact.format, "files": files, "lineage": result.artifact.lineage},
                    "metrics": result.metrics,
                    "notes": result.notes,
                    "duration_s": round(time.time() - started, 3),
                    **result.extra,
                }
                write_reports(stage, {
                    "schema_version": SCHEMA_VERSION,
                    "kind": "step",
                    "step": step_report,
                    "environment": env,
                })
                if stage != final_dir:
                    fsutil.commit_dir(stage, final_dir)
                if result.artifact.format == "onnx" and pass_.produces_model:
                    result.artifact.onnx_path = final_dir / "model.onnx"
            except BaseException:
                if stage != final_dir:
                    fsutil.discard_dir(stage)
                raise
            step_reports.append(step_report)
            artifact = result.artifact
        run_report = {
            "schema_version": SCHEMA_VERSION,
            "kind": "run",
            "recipe_file": recipe_file,
            "recipe": recipe.model_dump(mode="json"),
            "steps": step_reports,
            "environment": env,
        }
        if staged_root is not None:
            write_reports(staged_root, run_report)
            fsutil.commit_dir(staged_root, Path(out))
            if artifact.format == "onnx" and artifact.onnx_path is not None:
                artifact.onnx_path = Path(out) / Path(artifact.onnx_path).relative_to(staged_root)
    except BaseException:
        if staged_root is not None:
            fsutil.discard_dir(staged_root)
        raise
    finally:
        if scratch is not None:
            fsutil.discard_dir(scratch)
    report = run_report if not flat else {"schema_version": SCHEMA_VERSION, "kind": "step", "step": step_reports[-1], "environment": env}
    return RunResult(report=report, artifact=artifact, out=out)


def prepare(recipe: "Recipe") -> tuple["Artifact", "Dataset | None"]:
    """Load the recipe's model and data and check that they fit each other.

    A saved model remembers its input shape; when the data section leaves image_size and
    channels unset, they are taken from the model, so `mlopt eval --model DIR --data digits`
    feeds a model trained on resized digits the same resized digits.
    """
    from mlopt.artifacts import load_artifact, looks_like_artifact
    from mlopt.data import load_data

    loaded = None
    data_cfg = recipe.data
    if looks_like_artifact(recipe.model.spec):
        if recipe.model.weights:
            raise InputError("--weights applies to a model spec, not to an mlopt directory or ONNX file")
        loaded = load_artifact(recipe.model.spec)
        shape = loaded.sample_shape
        if data_cfg is not None and shape is not None and len(shape) == 3:
            fill = {}
            if data_cfg.channels is None:
                fill["channels"] = shape[0]
            if data_cfg.image_size is None and shape[1] == shape[2]:
                fill["image_size"] = shape[1]
            data_cfg = data_cfg.model_copy(update=fill)
    data = load_data(data_cfg) if data_cfg is not None else None
    return initial_artifact(recipe, data, loaded), data


def initial_artifact(recipe: "Recipe", data: "Dataset | None", loaded: "Artifact | None" = None) -> "Artifact":
    """Turn the recipe's model section into the first artifact, checking it against the data."""
    from mlopt.artifacts import Artifact
    from mlopt.data import check_labels
    from mlopt.models import apply_state_dict, build_module, load_state_dict_file, parse_shape, probe_output

    cfg = recipe.model
    shape = None
    if cfg.input_shape is not None:
        full = parse_shape(cfg.input_shape)
        if len(full) < 2:
            raise InputError(f"--input-shape {cfg.input_shape} must include the batch dimension, e.g. 1x3x224x224")
        shape = full[1:]
    if data is not None:
        if shape is not None and tuple(shape) != tuple(data.sample_shape):
            raise InputError(
                f"--input-shape {cfg.input_shape} disagrees with the data's samples ({'x'.join(map(str, data.sample_shape))})"
            )
        shape = tuple(data.sample_shape)

    if loaded is not None:
        artifact = loaded
        if shape is not None:
            if artifact.sample_shape is not None and tuple(artifact.sample_shape) != tuple(shape):
                raise InputError(
                    f"{cfg.spec} takes inputs of shape {'x'.join(map(str, artifact.sample_shape))} per sample, "
                    f"but the data gives {'x'.join(map(str, shape))}"
                )
            artifact.sample_shape = tuple(shape)
        if artifact.num_classes is not None and data is not None:
            check_labels(data, artifact.num_classes)
        return artifact

    num_classes = cfg.num_classes if cfg.num_classes is not None else (data.num_classes if data else None)
    module = build_module(cfg.spec, num_classes)
    if cfg.weights:
        apply_state_dict(module, load_state_dict_file(Path(cfg.weights)), cfg.weights)
    if shape is None:
        if cfg.spec.startswith("torchvision:"):
            shape = (3, 224, 224)
        else:
            raise InputError(f"give --input-shape for {cfg.spec} (for example 1x3x224x224): the model does not imply one")
    classes = probe_output(module, tuple(shape))
    if data is not None:
        check_labels(data, classes)
    return Artifact(
        format="torch",
        sample_shape=tuple(shape),
        num_classes=classes,
        builder={"spec": _absolute_spec(cfg.spec), "num_classes": classes},
        module=module,
        origin=cfg.spec,
    )


def _absolute_spec(spec: str) -> str:
    """File specs are stored with an absolute path so the artifact reloads from anywhere."""
    prefix, _, name = spec.rpartition(":")
    if prefix.endswith(".py"):
        return f"{Path(prefix).resolve()}:{name}"
    return spec
