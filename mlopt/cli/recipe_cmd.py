"""`mlopt recipe validate FILE` and `mlopt recipe schema`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlopt.cli.common import handle_errors
from mlopt.core import console

recipe_app = typer.Typer(help="Check recipes and print their JSON Schema.", no_args_is_help=True)


@recipe_app.command("validate")
@handle_errors
def validate(recipe_file: Annotated[Path, typer.Argument(metavar="RECIPE", help="A YAML recipe.")]) -> None:
    """Validate a recipe completely without running it (exit 2 and the problems if it is invalid)."""
    from mlopt.core.contracts import file_fields
    from mlopt.core.errors import InputError
    from mlopt.run.recipe import load_recipe
    from mlopt.runtime.models import spec_problem

    recipe = load_recipe(recipe_file)
    places = [("model", recipe.model)] + [(f"steps[{i}] ({step.type})", step) for i, step in enumerate(recipe.steps)]
    for where, config in places:  # the model specs' form: files are read when the recipe runs
        for name in (n for n, kind in file_fields(type(config)).items() if kind == "model"):
            value = getattr(config, name)
            for spec in (v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)):
                problem = spec_problem(spec)
                if problem:
                    raise InputError(f"{recipe_file}: {where}: {name}: {problem}")
                if ":" not in spec and not Path(spec).expanduser().exists():
                    console.warn(f"{recipe_file}: {where}: {name}: {spec!r} is read as a path (an mlopt directory, "
                                 "a folder or FILE.onnx), which does not exist now")
    console.info(f"{recipe_file}: valid ({len(recipe.steps)} steps: {', '.join(s.type for s in recipe.steps)})")


@recipe_app.command("schema")
@handle_errors
def schema() -> None:
    """Print the recipe JSON Schema (for editors that complete and check YAML)."""
    from mlopt.run.recipe import Recipe

    console.emit_json(Recipe.model_json_schema())
