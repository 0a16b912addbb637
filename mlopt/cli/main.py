"""The `mlopt` console script. Heavy libraries are imported inside commands so --help is instant."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from mlopt import __version__
from mlopt.cli.common import handle_errors
from mlopt.cli.recipe_cmd import recipe_app
from mlopt.cli.report_cmd import report_app
from mlopt.cli.run import run


class _Commands(TyperGroup):
    """The commands, with one per registered step type made from its config (mlopt.cli.steps), made when a
    command line is read, not when this module is imported (importing their config classes imports pydantic)."""

    def list_commands(self, ctx: Any) -> list[str]:
        from mlopt.cli.steps import step_types

        return [*handle_errors(step_types)(), *super().list_commands(ctx)]

    def get_command(self, ctx: Any, name: str) -> Any:
        command = super().get_command(ctx, name)
        if command is None:
            from mlopt.cli.steps import click_command, step_types

            step = handle_errors(step_types)().get(name)
            command = click_command(step) if step is not None else None
        return command


app = typer.Typer(cls=_Commands, name="mlopt", no_args_is_help=True, add_completion=False,
                  help="Make PyTorch models smaller and faster, and measure what it produced on onnxruntime.",
                  pretty_exceptions_enable=False, rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = None,
) -> None:
    """Exit codes: 0 success, 1 runtime failure, 2 invalid input or config, 3 a gate failed."""


app.command("run")(run)
app.add_typer(recipe_app, name="recipe")
app.add_typer(report_app, name="report")


def main() -> None:
    app()
