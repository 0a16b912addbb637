"""What every command does after parsing its flags: build a recipe, run it, show the result.

Errors are turned into one line and an exit code in exactly one place: `handle_errors`.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

import typer

from mlopt.core import console
from mlopt.core.errors import EXIT_FAILURE, InputError, MloptError, first_line, storage_error
from mlopt.core.fsutil import atomic_write_text
from mlopt.runtime import distributed

# The run layer (recipes, passes, pydantic) is imported inside the commands: `mlopt --help` stays
# fast, and an error while loading step types (MLOPT_PASSES) is turned into a message like any other.


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map mlopt errors to a one-line message and their exit code; MLOPT_DEBUG=1 shows tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            console.error("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            if os.environ.get("MLOPT_DEBUG"):
                raise
            # Else an mlopt bug or an unexpected library failure, unless a full disk or a read-only place.
            known = exc if isinstance(exc, MloptError) else storage_error(exc)
            if known is not None:
                console.error(str(known))
                raise typer.Exit(known.exit_code) from None
            console.error(f"{type(exc).__name__}: {first_line(exc)} (set MLOPT_DEBUG=1 for the traceback)")
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper


def build_recipe(model: dict[str, Any], data: dict[str, Any] | None, step: dict[str, Any]) -> Any:
    """A one-step recipe from command-line values (None means: not given, use the default)."""
    from mlopt.run.recipe import recipe_from_dict

    def given(values: dict[str, Any]) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if v is not None}

    raw: dict[str, Any] = {"version": 1, "model": given(model), "steps": [given(step)]}
    if data is not None and data.get("source") is not None:
        raw["data"] = given(data)
    elif data is not None and [k for k in given(data) if k != "seed"]:  # never dropped in silence (--seed seeds
        name = next(k for k in given(data) if k != "seed")                # the model's initialisation too)
        raise InputError(f"--{name.replace('_', '-')} applies to the data: give --data as well")
    return recipe_from_dict(raw, "command line")


def execute(recipe: Any, out: Path | None, overwrite: bool, quiet: bool, save: Path | None = None,
            resume: bool = False, json_out: bool = False,
            json_view: Callable[[dict[str, Any]], Any] = lambda step: step["metrics"]) -> Any:
    """Run a one-step recipe through the shared runner (flat layout); with --json print json_view(step report).

    --save-recipe: write the recipe instead (an existing file is replaced only with --overwrite)."""
    from mlopt.run.outdir import check_replaceable_file
    from mlopt.run.recipe import recipe_to_yaml
    from mlopt.run.runner import run_recipe

    console.set_quiet(quiet or json_out)
    if save is not None:
        check_replaceable_file(save, lambda text: False, overwrite, "--save-recipe")
        try:
            atomic_write_text(save, recipe_to_yaml(recipe))
        except OSError as exc:
            raise InputError(f"cannot write {save}: {exc.strerror or exc}") from None
        console.info(f"wrote {save}")
        raise typer.Exit(0)
    result = run_recipe(recipe, out, overwrite=overwrite, flat=True, resume=resume)
    if out is not None:
        console.info(f"wrote {out}")
    if json_out and result.is_main:
        console.emit_json(json_view(result.report["step"]))
    return result


def relaunch_under_torchrun(nproc: int, save: Path | None) -> None:
    """--nproc N (N > 1): run this same command line under torchrun and exit with its status."""
    if nproc == 1 or save is not None:
        return
    raise typer.Exit(distributed.launch(nproc, distributed.strip_nproc(sys.argv[1:])))
