from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlopt.cli import options as o
from mlopt.cli.common import handle_errors, relaunch_under_torchrun
from mlopt.core import console
from mlopt.core.errors import GateError, InputError
from mlopt.core.fsutil import atomic_write_text


@handle_errors
def run(
    recipe_file: Annotated[Path, typer.Argument(metavar="RECIPE", help="A YAML recipe.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: runs/<recipe>-<time>).")] = None,
    resume: o.Resume = False,
    nproc: o.Nproc = 1,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Write the gate results as JUnit XML.")] = None,
) -> None:
    """Run a multi-step YAML recipe: one NN-<type>/ directory per step and a combined report.

    With --resume, steps that completed with the same configuration are skipped and an interrupted
    training step continues from its checkpoint.
    """
    from mlopt.run.gates import JUNIT_CLASSNAME, junit_xml
    from mlopt.run.outdir import check_replaceable_file
    from mlopt.run.recipe import load_recipe
    from mlopt.run.runner import run_recipe

    console.set_quiet(quiet or json_out)
    recipe = load_recipe(recipe_file)  # validated before any process is launched
    if out is None:
        if resume or nproc > 1:
            raise InputError("--resume and --nproc need an explicit --out directory")
        out = Path("runs") / f"{recipe_file.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if junit is not None:  # checked before any work: a file of the user's is never replaced
        check_replaceable_file(junit, lambda text: f'classname="{JUNIT_CLASSNAME}"' in text, False, "--junit")
    relaunch_under_torchrun(nproc, None)
    result = run_recipe(recipe, out, overwrite=overwrite, flat=False, recipe_file=str(recipe_file), resume=resume)
    console.info(f"wrote {out} (report: {out / 'report.md'})")
    if json_out and result.is_main:
        console.emit_json(result.report)
    if result.gates is not None and result.is_main:
        if junit is not None:
            atomic_write_text(junit, junit_xml(result.gates, recipe_file.stem))
        failed = [r["gate"] for r in result.gates if not r["passed"]]
        if failed:
            raise GateError(f"gate(s) failed: {', '.join(failed)} (see {out / 'report.md'})")
