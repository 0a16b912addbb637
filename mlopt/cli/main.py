"""The `mlopt` console script. Heavy libraries are imported inside commands so --help is instant."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mlopt.cli.bench import bench
from mlopt.cli.distill import distill
from mlopt.cli.evaluate import eval_
from mlopt.cli.export import export
from mlopt.cli.prune import prune
from mlopt.cli.ptq import ptq
from mlopt.cli.qat import qat
from mlopt.cli.recipe_cmd import recipe_app
from mlopt.cli.report_cmd import report_app
from mlopt.cli.run import run
from mlopt.cli.train import train

app = typer.Typer(
    name="mlopt",
    help="Make PyTorch models smaller and faster, and measure what it produced on onnxruntime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from mlopt import __version__

        typer.echo(f"mlopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = None,
) -> None:
    """Exit codes: 0 success, 1 runtime failure, 2 invalid input or config, 3 a gate failed."""


app.command("train")(train)
app.command("prune")(prune)
app.command("distill")(distill)
app.command("eval")(eval_)
app.command("export")(export)
app.command("ptq")(ptq)
app.command("qat")(qat)
app.command("bench")(bench)
app.command("run")(run)
app.add_typer(recipe_app, name="recipe")
app.add_typer(report_app, name="report")


def main() -> None:
    app()
