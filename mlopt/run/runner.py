"""The runner: executes a recipe's steps, in order, in a run directory, then writes the reports.

Every CLI subcommand builds a one-step recipe and calls `run_recipe`, so `mlopt export ...`
and a recipe with one export step are the same code path. A run is planned (inputs checked,
model and data loaded), each step executed (staged, then committed), and finished (chain
comparison, gates, the run report).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlopt.core import console
from mlopt.core.contracts import PASSES, StepContext
from mlopt.core.errors import InputError
from mlopt.report.files import write_reports
from mlopt.report.schema import SCHEMA_VERSION
from mlopt.run import chain, resume as resuming
from mlopt.run.gates import check_family, evaluate_gates
from mlopt.run.loading import is_decoder_spec, prepare
from mlopt.run.outdir import OutputDir
from mlopt.runtime import distributed, environment, hf
from mlopt.runtime.artifacts import load_artifact

if TYPE_CHECKING:
    from mlopt.run.recipe import Recipe
    from mlopt.runtime.artifacts import Artifact
    from mlopt.runtime.data import Dataset


@dataclass
class RunResult:
    report: dict[str, Any]
    artifact: "Artifact"
    out: Path | None
    is_main: bool = True  # False on torchrun ranks other than 0, which print nothing
    gates: list[dict[str, Any]] | None = None  # one row per gate, when the recipe has gates

    @property
    def model(self) -> Any:
        """The final model: a torch module, or the path of an ONNX file."""
        return self.artifact.module if self.artifact.format == "torch" else self.artifact.onnx_path

    @property
    def passed(self) -> bool:
        """Whether every gate passed (True without gates)."""
        return all(row["passed"] for row in self.gates or [])


@dataclass
class Run:
    """A run in progress: where it writes, the current model, and the reports of its steps so far."""

    recipe: "Recipe"
    out: Path | None
    output: OutputDir | None  # None: nothing is kept (no --out), or a torchrun rank other than 0
    root: Path  # where the steps are written (the output directory, or a scratch one)
    flat: bool
    resume: bool
    artifact: "Artifact"
    data: "Dataset | None"
    data_fp: list[Any]
    model_fp: Any
    env: dict[str, Any]
    baseline: "Artifact | None" = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ckpt_name(self) -> str:
        return ".checkpoint" if self.flat else ".checkpoints"

    @property
    def ckpt_root(self) -> Path:
        # Every rank reads checkpoints from the real output directory; only rank 0 writes them.
        return (Path(self.out) if self.out is not None else self.root) / self.ckpt_name


def run_recipe(recipe: "Recipe", out: Path | None, overwrite: bool = False, flat: bool = False,
               recipe_file: str | None = None, resume: bool = False, model: "Artifact | None" = None) -> RunResult:
    """Execute every step of `recipe`.

    flat=True (single commands): the step's artifact and report go straight into `out`; flat=False
    (recipes): one `NN-<type>/` directory per step and a combined report. out=None: nothing is kept.
    Each step is staged and renamed into place when it succeeds, so a failure never leaves a
    half-written step. Training steps checkpoint into `out` (`.checkpoint/`, recipes:
    `.checkpoints/NN-<type>/`); `resume=True` continues from there and, for recipes, skips steps
    that completed with the same config and inputs. Under torchrun only rank 0 writes anything.
    `model`: the first model, ready in memory (the Python API), instead of the one the recipe names.
    """
    run = plan(recipe, out, overwrite, flat, resume, model)
    try:
        for index, step in enumerate(recipe.steps, start=1):
            execute_step(run, index, step)
        report, gate_rows = finish(run, recipe_file)
    finally:
        if run.output is not None:
            run.output.close()  # a folder this run created and completed nothing in is removed again
        else:
            shutil.rmtree(run.root, ignore_errors=True)
    return RunResult(report=report, artifact=run.artifact, out=out, is_main=distributed.current().is_main,
                     gates=gate_rows)


def plan(recipe: "Recipe", out: Path | None, overwrite: bool, flat: bool, resume: bool,
         model: "Artifact | None" = None) -> Run:
    """Check the recipe against what it asks for, load the model and data, and open the output directory."""
    dist = distributed.current()
    if not dist.is_main:
        console.set_quiet(True)
    resume = resume or distributed.restarted()  # torchrun restarted the workers after a failure
    output = OutputDir(out) if out is not None and dist.is_main else None
    if output is not None:
        output.check(overwrite or resume, resume)
    _check_inputs(recipe)
    artifact, data = prepare(recipe, model)
    if recipe.gates is not None:
        exported = artifact.format == "genai" or any(s.type in ("export", "ptq") for s in recipe.steps)
        check_family(recipe.gates, artifact.is_decoder, data, exported)
    for step in recipe.steps:  # options of the other family of model: refused before any step runs
        PASSES[step.type].check_family(step, artifact.is_decoder)
    if artifact.is_decoder:
        _check_decoder_steps(recipe)
    else:
        _check_text_steps(recipe, hf.is_text_artifact(artifact))
    data_fp, model_fp = resuming.data_fingerprint(recipe), resuming.model_fingerprint(recipe)  # may raise: first
    # Ranks other than 0 (and runs without --out) work in a scratch directory.
    root = Path(out) if output is not None else Path(tempfile.mkdtemp(prefix="mlopt-"))
    run = Run(recipe=recipe, out=out, output=output, root=root, flat=flat, resume=resume, artifact=artifact,
              data=data, data_fp=data_fp, model_fp=model_fp, env=environment.describe())
    if output is not None:
        output.open(overwrite or resume, resume)
        if not flat and overwrite and not resume:
            output.clear()  # --overwrite: no step of an earlier run may survive into this one
        output.claim_tree(run.ckpt_name)
    return run


def _check_inputs(recipe: "Recipe") -> None:
    for step in recipe.steps:
        if PASSES[step.type].needs_data and recipe.data is None:
            raise InputError(f"step {step.type!r} needs data: give --data (or 'data:' in the recipe)")
    if recipe.gates is not None and recipe.gates.max_accuracy_drop is not None and recipe.data is None:
        raise InputError("the max_accuracy_drop gate needs labelled data: add 'data:' to the recipe")
    # Before loading (tokenizing a large text file takes a while); again after, for saved text models.
    text_data = recipe.data is not None and recipe.data.source.startswith("text:")
    if is_decoder_spec(recipe.model.spec):
        _check_decoder_steps(recipe)
    else:
        _check_text_steps(recipe, hf.is_hf_spec(recipe.model.spec) or text_data)


def _check_decoder_steps(recipe: "Recipe") -> None:
    unsupported = [s.type for s in recipe.steps if not PASSES[s.type].decoder_ok]
    if unsupported:
        supported = ", ".join(sorted(n for n, p in PASSES.items() if p.decoder_ok))
        raise InputError(f"step {unsupported[0]!r} does not run on decoder language models; these steps do: {supported}")


def _check_text_steps(recipe: "Recipe", text: bool) -> None:
    unsupported = [s.type for s in recipe.steps if not PASSES[s.type].text_ok] if text else []
    if unsupported:
        supported = ", ".join(sorted(n for n, p in PASSES.items() if p.text_ok))
        raise InputError(f"step {unsupported[0]!r} does not support hf: text models; these steps do: {supported}")
    for step in recipe.steps if text else []:
        PASSES[step.type].check_text(step)


def execute_step(run: Run, index: int, step: Any) -> None:
    """Run one step in its staging directory and commit it; a step already done (--resume) is skipped."""
    from rich.markup import escape

    pass_ = PASSES[step.type]()
    name = f"{index:02d}-{step.type}"
    final_dir = run.root if run.flat else run.root / name
    if pass_.compresses and run.baseline is None:
        run.baseline = run.artifact
    inputs_sha256 = resuming.step_digest(step, run.data_fp, run.model_fp)
    if run.resume and not run.flat and _skip_completed(run, name, final_dir, step, inputs_sha256, pass_.produces_model):
        return
    if pass_.rank0_only and not distributed.current().is_main:
        distributed.barrier()
        return
    stage = run.output.staging(name) if run.output is not None else final_dir
    stage.mkdir(parents=True, exist_ok=True)
    ckpt_dir = (run.ckpt_root if run.flat else run.ckpt_root / name) if run.out is not None else None
    console.info(f"[bold]{name}[/bold]: {step.type} ({run.artifact.format} model {escape(run.artifact.origin)})")
    started = time.time()
    batch_size = run.recipe.data.batch_size if run.recipe.data is not None else 64
    ctx = StepContext(out_dir=stage, data=run.data, batch_size=batch_size, baseline=run.baseline or run.artifact,
                      checkpoint_dir=ckpt_dir, resume=run.resume)
    try:
        result = pass_.run(run.artifact, step, ctx)
        step_report = _step_report(run, index, name, step, inputs_sha256, result, pass_.produces_model, stage, final_dir)
        step_report["duration_s"] = round(time.time() - started, 3)
        write_reports(stage, _step_file(run, step_report))
        if run.output is not None:
            run.output.commit(stage, "" if run.flat else name)
        if pass_.produces_model:
            if result.artifact.format in ("onnx", "genai"):
                result.artifact.onnx_path = final_dir / Path(result.artifact.onnx_path).name
            run.model_fp = resuming.model_files(final_dir)
    except BaseException:
        if run.output is not None:
            run.output.remove_tree(stage.name)
        raise
    if pass_.rank0_only:
        distributed.barrier()
    if run.output is not None and ckpt_dir is not None:
        run.output.remove_tree(ckpt_dir.relative_to(run.root).as_posix())
    run.steps.append(step_report)
    run.artifact = result.artifact


def _skip_completed(run: Run, name: str, final_dir: Path, step: Any, inputs_sha256: str, produces_model: bool) -> bool:
    done = resuming.completed_step(final_dir, step.model_dump(mode="json"), inputs_sha256)
    if done is None:
        return False
    console.info(f"[bold]{name}[/bold]: already completed with this configuration and inputs; skipped")
    if produces_model:
        run.artifact = load_artifact(final_dir)
        run.model_fp = resuming.model_files(final_dir)
    run.steps.append(done)
    return True


def _step_report(run: Run, index: int, name: str, step: Any, inputs_sha256: str, result: Any, produces_model: bool,
                 stage: Path, final_dir: Path) -> dict[str, Any]:
    files = []
    if produces_model:
        files.append(result.artifact.save(stage).name)
        result.artifact.origin = str(final_dir)
    return {"index": index, "dir": name, "type": step.type, "config": step.model_dump(mode="json"),
            "inputs_sha256": inputs_sha256, "input": {"format": run.artifact.format, "lineage": run.artifact.lineage},
            "output": {"format": result.artifact.format, "files": files, "lineage": result.artifact.lineage},
            "metrics": result.metrics, "notes": result.notes,
            "latency": [lat.model_dump(mode="json") for lat in result.latency],
            "sections": [s.model_dump(mode="json") for s in result.sections]}


def _step_file(run: Run, step_report: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "kind": "step", "step": step_report, "environment": run.env}


def finish(run: Run, recipe_file: str | None) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """After the last step: the chain comparison, the gates and the run report (recipes)."""
    if run.output is not None and not (run.ckpt_root.is_dir() and any(run.ckpt_root.iterdir())):
        run.output.remove_tree(run.ckpt_name)
    if run.flat:
        return _step_file(run, run.steps[-1]), None
    recipe, main = run.recipe, distributed.current().is_main
    baseline = run.baseline or run.artifact
    comparison = None  # every model of the chain measured alike; the gates read it (mlopt/run/chain.py)
    if main and chain.wanted(recipe) and not run.artifact.is_decoder:  # decoders: the ptq table and the gates
        comparison = chain.compare(recipe, run.root, run.steps, baseline, run.data)
    gate_rows = None
    if recipe.gates is not None and recipe.gates.any() and main:
        gate_rows = evaluate_gates(recipe.gates, baseline, run.artifact, run.data, comparison)
    report: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": "run", "recipe_file": recipe_file,
                              "recipe": recipe.model_dump(mode="json"), "steps": run.steps, "environment": run.env}
    if comparison is not None:
        report["chain"] = comparison
    if gate_rows is not None:
        report["gates"] = {"passed": all(r["passed"] for r in gate_rows), "results": gate_rows, "baseline": baseline.origin}
    if run.output is not None:
        for name in write_reports(run.root, report):
            run.output.record(name)
    return report, gate_rows
