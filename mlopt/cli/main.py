"""The `mlopt` console script. Heavy libraries are imported inside commands so --help is instant."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

try:  # the Click that Typer's commands raise from: recent Typer releases carry their own copy
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - Typer before it vendored Click
    import click.exceptions as click_errors  # type: ignore[no-redef]

from mlopt import __version__
from mlopt.cli.common import handle_errors
from mlopt.cli.recipe_cmd import recipe_app
from mlopt.cli.report_cmd import report_app
from mlopt.cli.run import run


class _UsageError(click_errors.UsageError):
    """Click's usage error (a missing option, a bad value, an unknown command) shown as every mlopt error is: one
    line on stderr, exit code 2."""

    def __init__(self, exc: click_errors.UsageError) -> None:
        super().__init__(exc.format_message(), exc.ctx)

    def show(self, file: Any = None) -> None:
        from mlopt.core import console

        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        console.error(self.format_message().rstrip(".") + hint)


def _one_line(exc: click_errors.UsageError) -> click_errors.UsageError:
    return exc if isinstance(exc, (_UsageError, click_errors.NoArgsIsHelpError)) else _UsageError(exc)


class _Commands(TyperGroup):
    """The commands, with one per registered step type made from its config (mlopt.cli.steps), made when a
    command line is read, not when this module is imported (importing their config classes imports pydantic).
    Usage errors, the group's and its commands', are one line."""

    def make_context(self, info_name: Any, args: Any, parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click_errors.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except click_errors.UsageError as exc:
            raise _one_line(exc) from None

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
