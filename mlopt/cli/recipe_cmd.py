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
    from mlopt.run.recipe import load_recipe

    recipe = load_recipe(recipe_file)
    console.info(f"{recipe_file}: valid ({len(recipe.steps)} steps: {', '.join(s.type for s in recipe.steps)})")


@recipe_app.command("schema")
@handle_errors
def schema() -> None:
    """Print the recipe JSON Schema (for editors that complete and check YAML)."""
    from mlopt.run.recipe import Recipe

    console.emit_json(Recipe.model_json_schema())
