from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlopt.cli import options as o
from mlopt.cli.common import handle_errors


@handle_errors
def run(
    recipe_file: Annotated[Path, typer.Argument(metavar="RECIPE", help="A YAML recipe.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: runs/<recipe>-<time>).")] = None,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
) -> None:
    """Run a multi-step YAML recipe: one NN-<type>/ directory per step and a combined report."""
    from mlopt import console
    from mlopt.pipeline import run_recipe
    from mlopt.recipe import load_recipe

    console.set_quiet(quiet or json_out)
    recipe = load_recipe(recipe_file)
    if out is None:
        out = Path("runs") / f"{recipe_file.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_recipe(recipe, out, overwrite=overwrite, flat=False, recipe_file=str(recipe_file))
    console.info(f"wrote {out} (report: {out / 'report.md'})")
    if json_out:
        console.emit_json(result.report)
