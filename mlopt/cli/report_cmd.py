"""`mlopt report compare OLD_DIR NEW_DIR` and `mlopt report schema`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlopt.cli import options as o
from mlopt.cli.common import handle_errors
from mlopt.core import console
from mlopt.core.errors import GateError, InputError

report_app = typer.Typer(help="Work with run reports.", no_args_is_help=True)


@report_app.command("schema")
@handle_errors
def schema() -> None:
    """Print the JSON schema that every report.json (step or run) follows."""
    from mlopt.report.schema import json_schema

    console.emit_json(json_schema())


@report_app.command("compare")
@handle_errors
def compare(
    old: Annotated[Path, typer.Argument(help="The earlier run (an mlopt output directory).")],
    new: Annotated[Path, typer.Argument(help="The run to check.")],
    tolerance: Annotated[float, typer.Option("--tolerance", help="Allowed relative increase of latency and size.")] = 0.1,
    accuracy_tolerance: Annotated[float, typer.Option("--accuracy-tolerance", help="Allowed top-1 drop (0.005 = 0.5 point).")] = 0.005,
    json_out: o.Json = False,
) -> None:
    """Show what changed between two runs; exit 3 when NEW regresses beyond the tolerances."""
    import math

    from mlopt.core.sections import Table
    from mlopt.report.markdown import compare_runs, load_run_report, rich_table

    for flag, value in (("--tolerance", tolerance), ("--accuracy-tolerance", accuracy_tolerance)):
        if not (math.isfinite(value) and value >= 0):  # a NaN bound would pass every comparison: no regression ever
            raise InputError(f"{flag} must be a finite number >= 0, not {value}")
    rows = compare_runs(load_run_report(old), load_run_report(new), tolerance, accuracy_tolerance)
    if json_out:
        console.emit_json({"rows": rows, "regressed": any(r["regressed"] for r in rows)})
    else:
        verdicts = {True: "better", False: "worse", None: ""}
        console.table(rich_table(Table(title=f"{old} -> {new}", columns=["step", "metric", "old", "new", "change", "verdict"],
                                       rows=[[r["step"], r["metric"], r["old"], r["new"], f"{100 * r['change']:+.1f}%",
                                              "REGRESSED" if r["regressed"] else verdicts[r["better"]]] for r in rows])))
    if not rows:
        raise InputError(f"{old} and {new} have no step with metrics in common")
    regressed = [f"{r['step']} {r['metric']}" for r in rows if r["regressed"]]
    if regressed:
        raise GateError(f"{new} regresses: {', '.join(regressed)}")
