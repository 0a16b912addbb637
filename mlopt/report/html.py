"""report.html: one self-contained page rendered from report.json, with plots as inline SVG.

No script and no network: matplotlib draws each plot to SVG text that is embedded in the page.
"""

from __future__ import annotations

import html
import io
import json
from typing import Any


def _step_points(report: dict[str, Any]) -> tuple[list[dict[str, Any]], int | None]:
    """(step, accuracy, latency, size) per model, and the batch size of the latencies.

    Latencies come only from the chain comparison, which measured every model alike (at its
    smallest batch size here); each step's own timings are not comparable, so a run without a
    chain comparison plots no latency. Without a chain, a step that makes no new model (eval)
    measures the model of the step before it, so an accuracy carries over to it until a step
    produces another model.
    """
    chain = report.get("chain")
    if chain:
        batch = min(chain["batch_sizes"])
        points = []
        for r in chain["models"]:
            marks = [m for m, on in (("final", r["step"] == chain["final"]), ("best", r["best"])) if on]
            points.append({"step": r["step"] + (f" ({', '.join(marks)})" if marks else ""), "accuracy": r["accuracy"],
                           "latency": r["latency_ms"][str(batch)], "size": r["size_mb"]})
        return points, batch
    points, accuracy = [], None
    for step in report.get("steps", []):
        m = step.get("metrics", {})
        if step.get("output", {}).get("files"):
            accuracy = None
        accuracy = m.get("accuracy", accuracy)
        points.append({"step": step["dir"], "accuracy": accuracy, "latency": None, "size": m.get("size_mb")})
    return points, None


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _pareto_plot(points: list[dict[str, Any]], batch: int | None) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in points if p["accuracy"] is not None and p["latency"] is not None]
    if not pts:
        return None
    front, best = [], -1.0
    for p in sorted(pts, key=lambda p: p["latency"]):
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p["latency"] for p in pts], [p["accuracy"] for p in pts], color="#4c72b0")
    ax.plot([p["latency"] for p in front], [p["accuracy"] for p in front], color="#dd8452", label="Pareto front")
    for p in pts:
        ax.annotate(p["step"], (p["latency"], p["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"latency, batch {batch} (ms; every model timed alike)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("accuracy against latency")
    ax.legend()
    return _svg(fig)


def _bars(labels: list[str], values: list[float], title: str, ylabel: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(labels, values, color="#55a868")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    return _svg(fig)


def _layer_plot(step: dict[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = step.get("metrics", {}).get("layers") or {}
    if not layers:
        return None
    names = list(layers)
    before = [int(v.split("->")[0]) for v in layers.values()]
    after = [int(v.split("->")[1]) for v in layers.values()]
    fig, ax = plt.subplots(figsize=(7, 3))
    x = range(len(names))
    ax.bar(x, before, color="#c7c7c7", label="before")
    ax.bar(x, after, color="#4c72b0", label="after")
    ax.set_xticks(list(x), names, rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(f"{step['dir']}: channels per layer")
    ax.legend()
    return _svg(fig)


def _sensitivity_plot(step: dict[str, Any]) -> str | None:
    rows = [r for r in step.get("ptq", {}).get("candidates", []) if r.get("sensitivity")]
    if not rows:
        return None
    sens = rows[-1]["sensitivity"]
    return _bars([s["node"] for s in sens], [s["sqnr_db"] for s in sens],
                  f"{step['dir']}: quantization sensitivity (lowest SQNR kept in float)", "SQNR (dB)")


def _simulation_error_plot(step: dict[str, Any]) -> str | None:
    """QAT: how far each quantized tensor in onnxruntime is from the torch simulation's, end to end."""
    rows = step.get("metrics", {}).get("simulation_error") or []
    return _bars([r["point"] for r in rows], [r["max_error_steps"] for r in rows],
                 f"{step['dir']}: simulation vs onnxruntime, per quantized tensor (end to end)",
                 "max error (quantization steps)")


def render_html(report: dict[str, Any]) -> str:
    from mlopt.report.markdown import render_markdown

    steps = report.get("steps") or ([report["step"]] if "step" in report else [])
    run = {**report, "steps": steps}
    points, batch = _step_points(run)
    plots = [
        _pareto_plot(points, batch),
        _bars([p["step"] for p in points if p["size"]], [p["size"] for p in points if p["size"]],
              "model size per step", "MB"),
        _bars([p["step"] for p in points if p["latency"]], [p["latency"] for p in points if p["latency"]],
              f"latency per model, batch {batch} (every model timed alike)", "ms"),
    ]
    for step in steps:
        plots += [_layer_plot(step), _sensitivity_plot(step), _simulation_error_plot(step)]
    gates = report.get("gates")
    env = report.get("environment", {})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>mlopt report</title>',
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        ".fail{color:#b00;font-weight:bold}.pass{color:#070}pre{background:#f6f6f6;padding:1em;overflow:auto}"
        "figure{margin:1em 0}</style></head><body>",
        "<h1>mlopt report</h1>",
    ]
    if gates:
        cls = "pass" if gates["passed"] else "fail"
        parts.append(f'<h2>Gates: <span class="{cls}">{"passed" if gates["passed"] else "FAILED"}</span></h2>')
        parts.append("<table><tr><th>gate</th><th>expected</th><th>measured</th><th>result</th></tr>")
        for r in gates["results"]:
            verdict = '<span class="pass">pass</span>' if r["passed"] else '<span class="fail">FAIL</span>'
            parts.append(f"<tr><td>{html.escape(r['gate'])}</td><td>{html.escape(str(r['expected']))}</td>"
                         f"<td>{html.escape(str(r['measured']))}</td><td>{verdict}</td></tr>")
        parts.append("</table>")
    chain = report.get("chain")
    if chain:  # the table itself is in the report below
        cls = "pass" if chain["final_is_best"] else "fail"
        parts.append(f'<h2>Chain: <span class="{cls}">best model {html.escape(chain["best"])}</span></h2>'
                     f'<p class="{cls}">{html.escape(chain["verdict"])}</p>')
    parts.append("<h2>Plots</h2>")
    parts += [f"<figure>{svg}</figure>" for svg in plots if svg]
    parts.append("<h2>Environment</h2><table>")
    for key in ("cpu", "cpu_count", "isa", "python", "platform", "libraries"):
        value = env.get(key)
        parts.append(f"<tr><th>{key}</th><td>{html.escape(json.dumps(value) if not isinstance(value, str) else value)}</td></tr>")
    parts.append("</table>")
    parts.append("<h2>Report</h2><pre>" + html.escape(render_markdown(report)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
