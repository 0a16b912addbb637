"""Passes and the runner that executes a recipe's steps, in order, in a run directory.

Every CLI subcommand builds a one-step recipe and calls `run_recipe`, so `mlopt export ...`
and a recipe with one export step are the same code path.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mlopt.core import console

from mlopt.runtime import hf
from mlopt.core.errors import InputError
from mlopt.run.outdir import OutputDir

if TYPE_CHECKING:
    from pydantic import BaseModel

    from mlopt.runtime.artifacts import Artifact
    from mlopt.runtime.data import Dataset
    from mlopt.run.recipe import Recipe


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
    baseline: "Artifact"  # the model before the first compressing step (teacher, gate baseline)
    checkpoint_dir: Path | None = None  # where a training step keeps its checkpoint
    resume: bool = False


class Pass:
    """One step type: a typed config (`config_class`) and a `run` method."""

    name: ClassVar[str]
    config_class: ClassVar[type["BaseModel"]]
    produces_model: ClassVar[bool] = True
    needs_data: ClassVar[bool] = False
    compresses: ClassVar[bool] = False  # the model before the first such step is the baseline
    rank0_only: ClassVar[bool] = False  # under torchrun, other ranks skip it (benchmarks)
    text_ok: ClassVar[bool] = False  # runs on hf: text models (token inputs)

    def run(self, artifact: "Artifact", config: Any, ctx: StepContext) -> StepResult:
        raise NotImplementedError


@dataclass
class RunResult:
    report: dict[str, Any]
    artifact: "Artifact"
    out: Path | None
    is_main: bool = True  # False on torchrun ranks other than 0, which print nothing
    gates: list[dict[str, Any]] | None = None  # one row per gate, when the recipe has gates


def run_recipe(
    recipe: "Recipe",
    out: Path | None,
    overwrite: bool = False,
    flat: bool = False,
    recipe_file: str | None = None,
    resume: bool = False,
) -> RunResult:
    """Execute every step of `recipe`.

    flat=True (single CLI commands): the step's artifact and report go straight into `out`.
    flat=False (recipes): one `NN-<type>/` directory per step and a combined report in `out`.
    out=None: nothing is kept (eval and bench without --out).

    Each step is written into a staging directory and renamed into place when it succeeds, so a
    failure never leaves a half-written step. Training steps checkpoint into `out` (flat:
    `.checkpoint/`; recipes: `.checkpoints/NN-<type>/`); `resume=True` continues from there and,
    for recipes, skips steps that already completed with the same configuration and inputs
    (content hashes of the model, data and files the step reads).
    Under torchrun every rank runs the steps; only rank 0 writes anything.
    """
    from rich.markup import escape

    from mlopt.runtime import distributed, environment

    from mlopt.core import fsutil
    from mlopt.runtime.artifacts import load_artifact
    from mlopt.run.recipe import PASSES
    from mlopt.report.markdown import SCHEMA_VERSION, write_reports

    dist = distributed.current()
    if not dist.is_main:
        console.set_quiet(True)
    resume = resume or distributed.restarted()  # torchrun restarted the workers after a failure
    output = OutputDir(out) if out is not None and dist.is_main else None
    if output is not None:
        output.check(overwrite or resume, resume)
    for step in recipe.steps:
        if PASSES[step.type].needs_data and recipe.data is None:
            raise InputError(f"step {step.type!r} needs data: give --data (or 'data:' in the recipe)")
    gates = recipe.gates if recipe.gates is not None and recipe.gates.any() else None
    if gates is not None and gates.max_accuracy_drop is not None and recipe.data is None:
        raise InputError("the max_accuracy_drop gate needs labelled data: add 'data:' to the recipe")
    # Before loading (tokenizing a large text file takes a while); again after, for saved text models.
    text_data = recipe.data is not None and recipe.data.source.startswith("text:")
    _check_text_steps(recipe, hf.is_hf_spec(recipe.model.spec) or text_data)

    artifact, data = prepare(recipe)
    # What each step reads, by content: --resume skips a step only when these are unchanged too.
    data_fp = _data_fingerprint(recipe)
    model_fp = _model_fingerprint(recipe)
    _check_text_steps(recipe, hf.is_text_artifact(artifact))
    baseline = None
    env = environment.describe()
    step_reports: list[dict[str, Any]] = []
    writes = output is not None  # ranks other than 0 work in a scratch directory
    root = Path(out) if writes else Path(tempfile.mkdtemp(prefix="mlopt-"))
    # Every rank reads checkpoints from the real output directory; only rank 0 writes them.
    ckpt_name = ".checkpoint" if flat else ".checkpoints"
    ckpt_root = (Path(out) if out is not None else root) / ckpt_name
    if output is not None:
        output.open(overwrite or resume, resume)
        if not flat and overwrite and not resume:
            output.clear()  # --overwrite: no step of an earlier run may survive into this one
        output.claim_tree(ckpt_name)
    try:
        for index, step in enumerate(recipe.steps, start=1):
            pass_ = PASSES[step.type]()
            name = f"{index:02d}-{step.type}"
            config = step.model_dump(mode="json")
            final_dir = root if flat else root / name
            if pass_.compresses and baseline is None:
                baseline = artifact
            inputs_sha256 = fsutil.digest(config, data_fp, model_fp, _config_files(config))
            done = _completed_step(final_dir, config, inputs_sha256) if resume and not flat else None
            if done is not None:
                console.info(f"[bold]{name}[/bold]: already completed with this configuration and inputs; skipped")
                if pass_.produces_model:
                    artifact = load_artifact(final_dir)
                    model_fp = _model_files(final_dir)
                step_reports.append(done)
                continue
            if pass_.rank0_only and not dist.is_main:
                distributed.barrier()
                continue
            stage = output.staging(name) if output is not None else final_dir
            stage.mkdir(parents=True, exist_ok=True)
            ckpt_dir = (ckpt_root if flat else ckpt_root / name) if out is not None else None
            console.info(f"[bold]{name}[/bold]: {step.type} ({artifact.format} model {escape(artifact.origin)})")
            started = time.time()
            ctx = StepContext(out_dir=stage, data=data, recipe=recipe, baseline=baseline or artifact,
                              checkpoint_dir=ckpt_dir, resume=resume)
            try:
                result = pass_.run(artifact, step, ctx)
                files = []
                if pass_.produces_model:
                    files.append(result.artifact.save(stage).name)
                    result.artifact.origin = str(final_dir)
                step_report = {
                    "index": index,
                    "dir": name,
                    "type": step.type,
                    "config": config,
                    "inputs_sha256": inputs_sha256,
                    "input": {"format": artifact.format, "lineage": artifact.lineage},
                    "output": {"format": result.artifact.format, "files": files, "lineage": result.artifact.lineage},
                    "metrics": result.metrics,
                    "notes": result.notes,
                    "duration_s": round(time.time() - started, 3),
                    **result.extra,
                }
                write_reports(stage, {"schema_version": SCHEMA_VERSION, "kind": "step", "step": step_report, "environment": env})
                if output is not None:
                    output.commit(stage, "" if flat else name)
                if result.artifact.format == "onnx" and pass_.produces_model:
                    result.artifact.onnx_path = final_dir / "model.onnx"
                if pass_.produces_model:
                    model_fp = _model_files(final_dir)
            except BaseException:
                if output is not None:
                    output.remove_tree(stage.name)
                raise
            if pass_.rank0_only:
                distributed.barrier()
            if output is not None and ckpt_dir is not None:
                output.remove_tree(ckpt_dir.relative_to(root).as_posix())
            step_reports.append(step_report)
            artifact = result.artifact
        if output is not None and not (ckpt_root.is_dir() and any(ckpt_root.iterdir())):
            output.remove_tree(ckpt_name)
        comparison = None  # every model of the chain measured alike; the gates read it (mlopt/run/chain.py)
        if not flat and dist.is_main:
            from mlopt.run import chain

            if chain.wanted(recipe):
                comparison = chain.compare(recipe, root, step_reports, baseline or artifact, data)
        gate_rows = None
        if gates is not None and dist.is_main:
            from mlopt.run.gates import evaluate_gates

            gate_rows = evaluate_gates(gates, baseline or artifact, artifact, data, comparison)
        run_report = {
            "schema_version": SCHEMA_VERSION,
            "kind": "run",
            "recipe_file": recipe_file,
            "recipe": recipe.model_dump(mode="json"),
            "steps": step_reports,
            "environment": env,
        }
        if comparison is not None:
            run_report["chain"] = comparison
        if gate_rows is not None:
            run_report["gates"] = {"passed": all(r["passed"] for r in gate_rows), "results": gate_rows,
                                   "baseline": (baseline or artifact).origin}
        if not flat and output is not None:
            for name in write_reports(root, run_report):
                output.record(name)
    finally:
        if output is not None:
            output.close()  # a folder this run created and completed nothing in is removed again
        else:
            fsutil.discard_dir(root)
    report = run_report if not flat else {"schema_version": SCHEMA_VERSION, "kind": "step", "step": step_reports[-1], "environment": env}
    return RunResult(report=report, artifact=artifact, out=out, is_main=dist.is_main, gates=gate_rows)


def _check_text_steps(recipe: "Recipe", text: bool) -> None:
    from mlopt.run.recipe import PASSES

    unsupported = [s.type for s in recipe.steps if not PASSES[s.type].text_ok] if text else []
    if unsupported:
        supported = ", ".join(sorted(n for n, p in PASSES.items() if p.text_ok))
        raise InputError(f"step {unsupported[0]!r} does not support hf: text models; these steps do: {supported}")


def _completed_step(step_dir: Path, config: dict[str, Any], inputs_sha256: str) -> dict[str, Any] | None:
    """The report of a step that already finished with the same configuration and inputs, if any."""
    import json

    try:
        report = json.loads((step_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    step = report.get("step", {})
    return step if step.get("config") == config and step.get("inputs_sha256") == inputs_sha256 else None


def _model_files(step_dir: Path) -> dict[str, str | None]:
    """A saved model by the content of its files."""
    from mlopt.runtime.artifacts import META_FILE, ONNX_FILE, TORCH_FILE
    from mlopt.core.fsutil import path_fingerprint

    return {name: path_fingerprint(step_dir / name) for name in (META_FILE, TORCH_FILE, ONNX_FILE)}


def _paths_in(spec: str) -> list[str]:
    """The files or directories a model or data spec names (FILE.py:factory, npz:FILE, hf:DIR, DIR...)."""
    candidates = [spec, spec.partition(":")[2], spec.rpartition(":")[0]]
    return [c for c in candidates if c and Path(c).exists()]


def _model_fingerprint(recipe: "Recipe") -> list[Any]:
    """The recipe's model settings, and the files they name (FILE.py:factory, hf:DIR, weights) by content."""
    m = recipe.model.model_dump(mode="json")
    return [m, _config_files(m)]


def _data_fingerprint(recipe: "Recipe") -> list[Any]:
    """The recipe's data settings, and the files they name (npz:FILE, imagefolder:DIR, text:FILE) by content."""
    if recipe.data is None:
        return []
    d = recipe.data.model_dump(mode="json")
    extra: dict[str, Any] = _config_files(d)
    if recipe.data.source == "digits":
        import sklearn

        extra["scikit-learn"] = sklearn.__version__  # the digits ship with it
    return [d, extra]


def _config_files(config: dict[str, Any]) -> dict[str, str | None]:
    """Files that settings name (a model's FILE.py, a student's, ONNX files to compare), by content."""
    from mlopt.core.fsutil import path_fingerprint

    found: dict[str, str | None] = {}

    def visit(value: Any) -> None:
        if isinstance(value, str):
            for p in _paths_in(value):
                found[p] = path_fingerprint(Path(p))
        elif isinstance(value, list):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    visit(config)
    return found


def prepare(recipe: "Recipe") -> tuple["Artifact", "Dataset | None"]:
    """Load the recipe's model and data and check that they fit each other.

    A saved model remembers its input shape; when the data section leaves image_size and
    channels unset, they are taken from the model, so `mlopt eval --model DIR --data digits`
    feeds a model trained on resized digits the same resized digits.
    """
    from mlopt.runtime.artifacts import load_artifact, looks_like_artifact
    from mlopt.runtime.data import load_data

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
    text_spec = recipe.model.spec if hf.is_hf_spec(recipe.model.spec) else None
    if loaded is not None and hf.is_text_artifact(loaded):
        text_spec = loaded.builder["spec"]
    if data is not None and data.text != (text_spec is not None):
        if data.text:
            raise InputError(f"text data ({data.name}) needs an hf: model, whose tokenizer reads it; {recipe.model.spec} is not one")
        raise InputError(f"{recipe.model.spec} is a text model: give --data text:FILE (one example a line), not {data.name}")
    if data is not None and data.text:
        data = hf.tokenize(data, text_spec, data_cfg.max_length)
    return initial_artifact(recipe, data, loaded), data


def initial_artifact(recipe: "Recipe", data: "Dataset | None", loaded: "Artifact | None" = None) -> "Artifact":
    """Turn the recipe's model section into the first artifact, checking it against the data."""
    from mlopt.runtime.artifacts import Artifact
    from mlopt.runtime.data import check_labels
    from mlopt.runtime.models import apply_state_dict, build_module, load_state_dict_file, parse_shape, probe_output

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
            # A text model's sequence axis is dynamic: it takes the data's length.
            fixed = artifact.sample_shape is not None and not hf.is_text_artifact(artifact)
            if fixed and tuple(artifact.sample_shape) != tuple(shape):
                raise InputError(
                    f"{cfg.spec} takes inputs of shape {'x'.join(map(str, artifact.sample_shape))} per sample, "
                    f"but the data gives {'x'.join(map(str, shape))}"
                )
            artifact.sample_shape = tuple(shape)
        if artifact.num_classes is not None and data is not None:
            check_labels(data, artifact.num_classes)
        return artifact

    import torch

    num_classes = cfg.num_classes if cfg.num_classes is not None else (data.num_classes if data else None)
    torch.manual_seed(cfg.seed)  # a reproducible random initialisation
    module = build_module(cfg.spec, num_classes)
    if cfg.weights:
        apply_state_dict(module, load_state_dict_file(Path(cfg.weights)), cfg.weights)
    if hf.is_hf_spec(cfg.spec):
        if shape is not None and len(shape) != 1:
            raise InputError(f"--input-shape {cfg.input_shape} for a text model must be BATCHxSEQUENCE, e.g. 1x128")
        info = hf.model_info(cfg.spec)
        classes = (module.model.config.num_labels or None) if info["output"] == "logits" else None
        return Artifact(format="torch", sample_shape=tuple(shape or (128,)), num_classes=classes,
                        builder={"spec": _absolute_spec(cfg.spec), "num_classes": classes, "hf": info},
                        module=module, origin=cfg.spec)
    if shape is None:
        if cfg.spec.startswith("torchvision:"):
            shape = (3, 224, 224)
        else:
            raise InputError(f"give --input-shape for {cfg.spec} (for example 1x3x224x224): the model does not imply one")
    classes = probe_output(module, tuple(shape), cfg.spec)
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
    if hf.is_hf_spec(spec):
        return f"{hf.PREFIX}{Path(spec[len(hf.PREFIX):]).expanduser().resolve()}"
    prefix, _, name = spec.rpartition(":")
    if prefix.endswith(".py"):
        return f"{Path(prefix).resolve()}:{name}"
    return spec
