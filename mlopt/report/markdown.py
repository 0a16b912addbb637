"""Reports: JSON first (mlopt/report/schema.py); Markdown is a rendering of it, and compare reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlopt.core.errors import InputError, RunError
from mlopt.core.sections import Bars, Latency, Scatter, Table
from mlopt.report.schema import Chain, RunReport, StepReport, StepReportFile, parse


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def is_timing(key: str) -> bool:
    """Metrics that a step timed itself (latencies, speed-ups, throughputs)."""
    return any(word in key for word in ("latency", "speedup", "throughput"))


STEP_TIMING_NOTE = ("Timings in this step are its own measurement (its own method, iterations and moment of a shared "
                    "machine): compare them with each other, not with another step's. The run report's chain table "
                    "times every model of a recipe alike.")


def as_table(section: Table | Bars | Scatter) -> Table:
    """Any section as rows and columns (Markdown shows every section this way, HTML the long ones)."""
    if isinstance(section, Table):
        return section
    if isinstance(section, Bars):
        rows = [[label, *(values[i] for values in section.series.values())] for i, label in enumerate(section.labels)]
        unit = f" ({section.unit})" if section.unit else ""
        return Table(title=section.title, columns=["", *(f"{s}{unit}" for s in section.series)], rows=rows,
                     note=section.note)
    return Table(title=section.title, columns=["", section.xlabel, section.ylabel],
                 rows=[[p.label, p.x, p.y] for p in section.points], note=section.note)


def latency_table(latency: list[Latency]) -> Table | None:
    if not latency:
        return None
    named = any(lat.model for lat in latency)
    methods = list(dict.fromkeys(lat.method for lat in latency))
    rows = [[*([f"{lat.model} (output)" if lat.output else lat.model] if named else []), lat.batch_size, lat.p50_ms,
             lat.mean_ms, lat.p90_ms, lat.p99_ms, *([lat.method] if len(methods) > 1 else [])] for lat in latency]
    return Table(title="latency", columns=[*(["model"] if named else []), "batch", "p50 ms", "mean ms", "p90 ms",
                                           "p99 ms", *(["method"] if len(methods) > 1 else [])],
                 rows=rows, note=f"timing: {methods[0]}" if len(methods) == 1 else None)


def step_latency(step: StepReport) -> dict[int, float]:
    """p50 per batch size of the model the step hands on (the step's own measurement): its entries marked
    `output`; where none is marked (a report written before the mark), the step's only timed model."""
    marked = [lat for lat in step.latency if lat.output]
    if not marked and len({lat.model for lat in step.latency}) == 1:
        marked = step.latency
    return {lat.batch_size: lat.p50_ms for lat in marked}


def step_speedup(step: StepReport) -> dict[int, float]:
    """Per batch size, the step's reference (its first timed model) over the model it hands on."""
    out = step_latency(step)
    first = [lat for lat in step.latency if lat.model == step.latency[0].model] if out else []
    return {lat.batch_size: lat.p50_ms / out[lat.batch_size] for lat in first if lat.batch_size in out}


def metrics_table(metrics: dict[str, Any]) -> Table | None:
    return Table(title="metrics", columns=["metric", "value"], rows=[[k, v] for k, v in metrics.items()]) if metrics else None


def _table(table: Table, heading: str = "###") -> list[str]:
    def cell(value: Any) -> str:
        return fmt(value).replace("|", "\\|").replace("\n", " ")

    lines = [f"{heading} {table.title}", ""]
    if table.note:
        lines += [table.note, ""]
    lines += ["| " + " | ".join(map(cell, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in table.rows]
    return lines + [""]


def rich_table(table: Table) -> Any:
    """A table for the terminal (console.table)."""
    from rich.markup import escape
    from rich.table import Table as RichTable

    out = RichTable(title=escape(table.title))
    for column in table.columns:
        out.add_column(escape(column))
    for row in table.rows:
        out.add_row(*(escape(fmt(v)) for v in row))
    return out


COSINE_METHOD = ("mean-pooled outputs of each ONNX file against the baseline's on the validation text (onnxruntime), "
                 "mean over the lines")


def chain_table(chain: Chain) -> Table:
    sizes = chain.batch_sizes
    cosine = any(r.cosine is not None for r in chain.models)
    top1 = not cosine or any(r.accuracy is not None for r in chain.models)  # text: cosine instead of top-1
    rows = []
    for r in chain.models:
        outside = "outside accuracy tolerance" if r.cosine is None or r.accuracy is not None else \
            f"cosine below {chain.min_cosine}"
        marks = [m for m, on in (("baseline", r.step == chain.baseline), ("final", r.step == chain.final),
                                 ("**best**", r.best), (outside, not r.eligible)) if on]
        marks += [f"fastest at batch {b}" for b in r.fastest_at if len(sizes) > 1]
        rows.append([r.step, *(["n/a" if r.accuracy is None else f"{r.accuracy:.4f}"] if top1 else []),
                     *(["n/a" if r.cosine is None else f"{r.cosine:.4f}"] if cosine else []),
                     *(f"{r.latency_ms[b]:.3f}" for b in sizes), *(f"{r.speedup[b]:.2f}x" for b in sizes),
                     f"{r.size_mb:.2f}", ", ".join(marks)])
    note = (f"Latency: {chain.method}; {chain.provider}, {chain.rounds} rounds of {chain.iterations_per_round} runs per "
            f"model and batch size ({chain.duration_s:.1f} s in all, exports included)"
            + (f"; {' and '.join(chain.retimed)} timed again together in {chain.rounds} more rounds (final/best "
               f"{chain.retimed_ratio:.2f}x round by round). " if chain.retimed
               else ". ")
            + (f"Cosine: {COSINE_METHOD}; at least {chain.min_cosine}. " if cosine else
               f"Accuracy: {chain.accuracy_method or 'not measured (no labelled data)'}. Accuracy tolerance "
               f"{chain.accuracy_tolerance} from {chain.accuracy_tolerance_from}. ") + f"Rule: {chain.rule}.")
    return Table(title="Chain: every model measured alike", note=note, rows=rows,
                 columns=["step", *(["top-1"] if top1 else []), *(["cosine"] if cosine else []), *(f"batch {b} ms" for b in sizes), *(f"speed-up b{b}" for b in sizes),
                          "size MB", ""])


def _step_section(step: StepReport, heading: str) -> list[str]:
    lines = [heading, "", f"Ran in {step.duration_s:.1f} s.", ""]
    if step.latency or any(is_timing(k) for k in step.metrics):
        lines += [STEP_TIMING_NOTE, ""]
    if step.notes:
        lines += [f"- {n}" for n in step.notes] + [""]
    for table in (metrics_table(step.metrics), latency_table(step.latency), *map(as_table, step.sections)):
        if table is not None:
            lines += _table(table)
    return lines


def render_markdown(report: StepReportFile | RunReport) -> str:
    if isinstance(report, StepReportFile):
        lines = [f"# mlopt {report.step.type}", "", *_step_section(report.step, "## Result"),
                 "## Configuration", "", "```json", json.dumps(report.step.config, indent=2), "```", ""]
    else:
        lines = ["# mlopt run", ""]
        if report.recipe_file:
            lines += [f"Recipe: `{report.recipe_file}`", ""]
        if report.chain:
            chain = chain_table(report.chain)
            verdict = f"{report.chain.verdict}." if report.chain.final_is_best else f"**Warning: {report.chain.verdict}.**"
            lines += _table(chain.model_copy(update={"note": f"{verdict[0].upper()}{verdict[1:]}\n\n{chain.note}"}), "##")
        # Each step's own timings are left out here: they are not comparable (the chain table is).
        rows = [[s.dir, s.type, round(s.duration_s, 1),
                 ", ".join(f"{k} {fmt(v)}" for k, v in s.metrics.items() if not is_timing(k))] for s in report.steps]
        lines += _table(Table(title="Steps", columns=["step", "type", "duration s", "key metrics (timings: in each "
                                                      "step's section)"], rows=rows), "##")
        if report.gates:
            g = report.gates
            rows = [[r.gate, r.expected, r.measured, "pass" if r.passed else "**FAIL**"] for r in g.results]
            lines += _table(Table(title=f"Gates: {'passed' if g.passed else 'FAILED'}", note=f"Baseline: `{g.baseline}`",
                                  columns=["gate", "expected", "measured", "result"], rows=rows), "##")
        for step in report.steps:
            lines += _step_section(step, f"## {step.dir}")
    env = report.environment
    lines += ["## Environment", "", f"{env.cpu} ({env.cpu_count} CPUs; ISA: {', '.join(env.isa) or 'n/a'}); "
              f"Python {env.python}; {', '.join(f'{k} {v}' for k, v in env.libraries.items())}", ""]
    return "\n".join(lines)


# Metrics compared between runs: name -> True when higher is better. Regressions are judged on
# accuracy (absolute tolerance), latency and size (relative tolerance); the rest is shown only.
COMPARED = {"accuracy": True, "size_mb": False, "loss": False, "train_samples_per_s": True, "max_abs_error": False}
JUDGED = {"accuracy", "size_mb", "latency"}


def load_run_report(run_dir: Path) -> RunReport | StepReportFile:
    path = Path(run_dir) / "report.json"
    try:
        return parse(path.read_text())
    except OSError:
        raise InputError(f"{run_dir} has no report.json (is it an mlopt output directory?)") from None
    except RunError as exc:
        raise InputError(f"{path}: {exc}") from None


def steps_of(report: RunReport | StepReportFile) -> list[StepReport]:
    return [report.step] if isinstance(report, StepReportFile) else report.steps


def _figures(step: StepReport) -> dict[str, float]:
    """What compare reads of a step: its compared metrics, and the p50 per batch size of the model it hands on
    (not of the references it timed beside it)."""
    out = {k: float(v) for k, v in step.metrics.items() if k in COMPARED and isinstance(v, (int, float))
           and not isinstance(v, bool)}
    return out | {f"latency p50 ms[batch {b}]": ms for b, ms in step_latency(step).items()}


def _chain_figures(report: RunReport | StepReportFile) -> dict[str, dict[str, float]]:
    chain = report.chain if isinstance(report, RunReport) else None
    return {f"chain {r.step}": {**({"accuracy": r.accuracy} if r.accuracy is not None else {}),
                                **{f"latency ms[batch {b}]": ms for b, ms in r.latency_ms.items()}}
            for r in (chain.models if chain else [])}


def compare_runs(old: RunReport | StepReportFile, new: RunReport | StepReportFile, tolerance: float,
                 accuracy_tolerance: float) -> list[dict[str, Any]]:
    """Rows of (step, metric, old, new, change, regressed) for the figures both runs measured."""
    before = {s.dir: _figures(s) for s in steps_of(old)} | _chain_figures(old)
    after = {s.dir: _figures(s) for s in steps_of(new)} | _chain_figures(new)
    rows = []
    for name, figures in after.items():
        for key, y in figures.items():
            x = before.get(name, {}).get(key)
            if x is None:
                continue
            kind = key.split(" ")[0]
            regressed = y < x - accuracy_tolerance if kind == "accuracy" else kind in JUDGED and y > x * (1 + tolerance)
            rows.append({"step": name, "metric": key, "old": x, "new": y, "change": (y - x) / abs(x) if x else 0.0,
                         "better": (y > x) == COMPARED.get(kind, False) if y != x else None, "regressed": regressed})
    return rows
