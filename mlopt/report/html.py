"""report.html: one self-contained page rendered from report.json, with plots as inline SVG.

No script and no network: matplotlib draws each plot to SVG text that is embedded in the page.
First a summary (one row per model), then the gates and the chain, then each step's tables and
plots, drawn from the generic sections (mlopt/core/sections.py) whatever step made them.
"""

from __future__ import annotations

import html
import io
from typing import Any

from mlopt.core.sections import Bars, Point, Scatter, Table
from mlopt.report.markdown import as_table, chain_table, fmt, latency_table, metrics_table, step_latency, step_speedup, steps_of
from mlopt.report.schema import Chain, RunReport, StepReport, StepReportFile

MAX_PLOTTED_LABELS = 40  # more names than this: a table (bars would be too thin to read)
QUALITY = ("accuracy", "top1_agreement", "cosine_mean")  # the first a step has is its "top-1 or fidelity"


def _esc(value: Any) -> str:
    return html.escape(fmt(value))


def html_table(table: Table, heading: str = "h3") -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>" for row in table.rows)
    note = f"<p>{_esc(table.note)}</p>" if table.note else ""
    return f"<{heading}>{_esc(table.title)}</{heading}>{note}<table><tr>{head}</tr>{body}</table>"


def summary_table(report: RunReport | StepReportFile) -> Table:
    """One row per model: format, size, latency per batch size, top-1 (or fidelity), speed-up on the baseline.

    From the chain comparison where the run has one (every model measured alike), else each step's own figures."""
    chain = report.chain if isinstance(report, RunReport) else None
    if chain is not None:
        sizes = chain.batch_sizes
        text = all(r.accuracy is None for r in chain.models) and any(r.cosine is not None for r in chain.models)
        rows = [[r.step, r.format, r.size_mb, *(r.latency_ms[b] for b in sizes), r.cosine if text else r.accuracy,
                 *(f"{r.speedup[b]:.2f}x" for b in sizes)] for r in chain.models]
        return Table(title="Summary", rows=rows, note="Every model measured alike (the chain comparison below).",
                     columns=["step", "format", "size MB", *(f"batch {b} ms" for b in sizes),
                              "cosine to the baseline" if text else "top-1", *(f"speed-up b{b}" for b in sizes)])
    sizes = sorted({b for s in steps_of(report) for b in step_latency(s)})
    rows = []
    for s in steps_of(report):
        lat = step_latency(s)
        quality = next((f"{k} {fmt(s.metrics[k])}" for k in QUALITY if s.metrics.get(k) is not None), None)
        speedup = step_speedup(s)
        rows.append([s.dir, s.output.format, s.metrics.get("size_mb"), *(lat.get(b) for b in sizes), quality,
                     *(f"{speedup[b]:.2f}x" if b in speedup else None for b in sizes)])
    return Table(title="Summary", rows=rows, note="Each step's own figures of the model it hands on, its speed-up against "
                 "the first model it timed, the one it started from (not comparable across steps: a bench step or a "
                 "latency gate times every model alike).",
                 columns=["step", "format", "size MB", *(f"batch {b} p50 ms" for b in sizes), "top-1 or fidelity",
                          *(f"speed-up b{b}" for b in sizes)])


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return "<figure>" + text[text.index("<svg"):] + "</figure>"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "mlopt"  # ids from the content: the same report draws the same page
    import matplotlib.pyplot as plt

    return plt


def bars_svg(bars: Bars) -> str:
    """Horizontal bars, one row per label, the figure as tall as the labels need (so none overlap)."""
    plt = _pyplot()
    n, k = len(bars.labels), max(1, len(bars.series))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.22 * n * min(k, 2)))
    height = 0.8 / k
    for i, (name, values) in enumerate(bars.series.items()):
        ax.barh([j + i * height for j in range(n)], [v or 0 for v in values], height=height, label=name)
    ax.set_yticks([j + (k - 1) * height / 2 for j in range(n)], bars.labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(bars.unit)
    ax.set_title(bars.title)
    if len(bars.series) > 1:
        ax.legend()
    return _svg(fig)


def scatter_svg(scatter: Scatter) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p.x for p in scatter.points], [p.y for p in scatter.points], color="#4c72b0")
    for p in scatter.points:
        ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(scatter.xlabel)
    ax.set_ylabel(scatter.ylabel)
    ax.set_title(scatter.title)
    return _svg(fig)


def render_section(section: Table | Bars | Scatter) -> str:
    if isinstance(section, Bars) and 0 < len(section.labels) <= MAX_PLOTTED_LABELS:
        return bars_svg(section)
    if isinstance(section, Scatter) and section.points:
        return scatter_svg(section)
    return html_table(as_table(section))


def chain_plots(chain: Chain) -> list[Table | Bars | Scatter]:
    """The chain as sections: accuracy against latency, and latency per model at each batch size."""
    batch = min(chain.batch_sizes)
    points = [Point(label=r.step + (" (best)" if r.best else ""), x=r.latency_ms[batch], y=r.accuracy)
              for r in chain.models if r.accuracy is not None]
    scatter = Scatter(title="accuracy against latency", xlabel=f"latency, batch {batch} (ms; every model timed alike)",
                      ylabel="top-1 accuracy", points=points)
    bars = Bars(title="latency per model (every model timed alike)", labels=[r.step for r in chain.models], unit="ms",
                series={f"batch {b}": [r.latency_ms[b] for r in chain.models] for b in chain.batch_sizes})
    return [scatter, bars] if points else [bars]


def _step_html(step: StepReport) -> list[str]:
    parts = [f"<h2>{_esc(step.dir)}</h2><p>{_esc(step.type)}, ran in {step.duration_s:.1f} s.</p>"]
    if step.notes:
        parts.append("<ul>" + "".join(f"<li>{_esc(n)}</li>" for n in step.notes) + "</ul>")
    parts += [html_table(t) for t in (metrics_table(step.metrics), latency_table(step.latency)) if t is not None]
    return parts + [render_section(s) for s in step.sections]


STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
         ".fail{color:#b00;font-weight:bold}.pass{color:#070}figure{margin:1em 0}")


def render_html(report: RunReport | StepReportFile) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>mlopt report</title>',
             f"<style>{STYLE}</style></head><body>", "<h1>mlopt report</h1>", html_table(summary_table(report), "h2")]
    run = report if isinstance(report, RunReport) else None
    if run is not None and run.gates is not None:
        g = run.gates
        cls = "pass" if g.passed else "fail"
        parts.append(f'<h2>Gates: <span class="{cls}">{"passed" if g.passed else "FAILED"}</span></h2>')
        rows = [[r.gate, r.expected, r.measured, "pass" if r.passed else "FAIL"] for r in g.results]
        parts.append(html_table(Table(title=f"baseline {g.baseline}", rows=rows,
                                      columns=["gate", "expected", "measured", "result"]), "h3"))
    if run is not None and run.chain is not None:
        cls = "pass" if run.chain.final_is_best else "fail"
        parts.append(f'<h2>Chain: <span class="{cls}">best model {_esc(run.chain.best)}</span></h2>'
                     f'<p class="{cls}">{_esc(run.chain.verdict)}</p>')
        parts.append(html_table(chain_table(run.chain)))
        parts += [render_section(s) for s in chain_plots(run.chain)]
    for step in steps_of(report):
        parts += _step_html(step)
    rows = [[key, str(value)] for key, value in report.environment.model_dump().items()]
    parts += [html_table(Table(title="Environment", columns=["", ""], rows=rows), "h2"), "</body></html>"]
    return "\n".join(parts) + "\n"
