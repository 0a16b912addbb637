"""Reports: JSON first (a versioned schema); Markdown is a rendering of the JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any


SCHEMA_VERSION = 1


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else str(value)
    return str(value)


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    rows = [(k, v) for k, v in metrics.items() if not isinstance(v, (dict, list))
            or isinstance(v, list) and len(v) < 6 and not any(isinstance(i, dict) for i in v)]
    if not rows:
        return []
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return lines


def _bench_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | provider | batch | mean ms | p50 ms | p90 ms | p99 ms | items/s | size MB | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lat = r["latency_ms"]
        speedup = r.get("speedup")
        lines.append(
            f"| {r['model']} | {r['provider']} | {r['batch_size']} | {lat['mean']:.3f} | {lat['p50']:.3f} | "
            f"{lat['p90']:.3f} | {lat['p99']:.3f} | {r['throughput_per_s']:.1f} | {r['size_mb']:.2f} | "
            f"{'' if speedup is None else f'{speedup:.2f}x'} |"
        )
    return lines


def _simulation_error_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["Quantized tensors, torch simulation against onnxruntime (in quantization steps; local: computed from "
             "onnxruntime's own inputs; end to end: the simulation run on its own):", "",
             "| tensor -> read by | local max | local values off | end-to-end max | end-to-end mean | SQNR dB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        sqnr = "identical" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        lines.append(f"| {r['point']} | {r['local_max_error_steps']:.2f} | {100 * r['local_mismatch']:.2f}% | "
                     f"{r['max_error_steps']:.2f} | {r['mean_error_steps']:.3f} | {sqnr} |")
    return lines


def is_timing(key: str) -> bool:
    """Metrics that a step timed itself (latencies, speed-ups, throughputs)."""
    return any(word in key for word in ("latency", "speedup", "throughput"))


STEP_TIMING_NOTE = ("Timings in this step are its own measurement (its own method, iterations and moment of a shared "
                    "machine): compare them with each other, not with another step's. The run report's chain table "
                    "times every model of a recipe alike.")


def _chain_section(chain: dict[str, Any]) -> list[str]:
    sizes = chain["batch_sizes"]
    verdict = f"{chain['verdict']}." if chain["final_is_best"] else f"**Warning: {chain['verdict']}.**"
    lines = ["## Chain: every model measured alike", "", verdict[0].upper() + verdict[1:], "",
             f"Latency: {chain['method']}; {chain['provider']}, {chain['rounds']} rounds of "
             f"{chain['iterations_per_round']} runs per model and batch size ({chain['duration_s']:.1f} s in all, "
             f"exports included). Accuracy: {chain['accuracy_method'] or 'not measured (no labelled data)'}. "
             f"Accuracy tolerance {chain['accuracy_tolerance']} from {chain['accuracy_tolerance_from']}. "
             f"Rule: {chain['rule']}.", "",
             "| step | top-1 | " + " | ".join(f"batch {b} ms" for b in sizes) + " | "
             + " | ".join(f"speed-up b{b}" for b in sizes) + " | size MB | |",
             "| --- " * (4 + 2 * len(sizes)) + "|"]
    for r in chain["models"]:
        marks = [m for m, on in (("baseline", r["step"] == chain["baseline"]), ("final", r["step"] == chain["final"]),
                                 ("**best**", r["best"]), ("outside accuracy tolerance", not r["eligible"])) if on]
        marks += [f"fastest at batch {b}" for b in r["fastest_at"] if len(sizes) > 1]
        top1 = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        lines.append(f"| {r['step']} | {top1} | "
                     + " | ".join(f"{r['latency_ms'][str(b)]:.3f}" for b in sizes) + " | "
                     + " | ".join(f"{r['speedup'][str(b)]:.2f}x" for b in sizes)
                     + f" | {r['size_mb']:.2f} | {', '.join(marks)} |")
    lines.append("")
    return lines


def _step_section(step: dict[str, Any], heading: str) -> list[str]:
    lines = [heading, ""]
    lines.append(f"Ran in {step['duration_s']:.1f} s.")
    if step.get("bench") or any(is_timing(k) for k in step.get("metrics", {})):
        lines += ["", STEP_TIMING_NOTE]
    if step.get("notes"):
        lines += [""] + [f"- {n}" for n in step["notes"]]
    lines.append("")
    lines += _metrics_table(step.get("metrics", {}))
    if step.get("bench"):
        lines += ["", *_bench_table(step["bench"]["results"]), "", f"Timing: {step['bench']['timing']}"]
    if step.get("metrics", {}).get("simulation_error"):
        lines += ["", *_simulation_error_table(step["metrics"]["simulation_error"])]
    lines.append("")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    if report["kind"] == "step":
        step = report["step"]
        lines = [f"# mlopt {step['type']}", ""]
        lines += _step_section(step, "## Result")
        lines += ["## Configuration", "", "```json", _json(step["config"]), "```", ""]
    else:
        lines = ["# mlopt run", ""]
        if report.get("recipe_file"):
            lines += [f"Recipe: `{report['recipe_file']}`", ""]
        if report.get("chain"):
            lines += _chain_section(report["chain"])
        # Each step's own timings are left out here: they are not comparable (the chain table is).
        lines += ["| step | type | duration s | key metrics (timings: in each step's section) |",
                  "| --- | --- | --- | --- |"]
        for step in report["steps"]:
            key = ", ".join(f"{k} {_fmt(v)}" for k, v in step.get("metrics", {}).items()
                            if not isinstance(v, (dict, list)) and not is_timing(k))
            lines.append(f"| {step['dir']} | {step['type']} | {step['duration_s']:.1f} | {key} |")
        lines.append("")
        if report.get("gates"):
            g = report["gates"]
            lines += [f"## Gates: {'passed' if g['passed'] else 'FAILED'}", "",
                      f"Baseline: `{g['baseline']}`", "", "| gate | expected | measured | result |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {r['gate']} | {r['expected']} | {r['measured']} | {'pass' if r['passed'] else '**FAIL**'} |"
                      for r in g["results"]]
            lines.append("")
        for step in report["steps"]:
            lines += _step_section(step, f"## {step['dir']}")
    env = report.get("environment", {})
    if env:
        libs = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items())
        lines += ["## Environment", "", f"{env.get('cpu')} ({env.get('cpu_count')} CPUs; ISA: {', '.join(env.get('isa', [])) or 'n/a'}); Python {env.get('python')}; {libs}", ""]
    return "\n".join(lines)


def _json(data: Any) -> str:
    import json

    return json.dumps(data, indent=2)


# Metrics compared between runs: name -> True when higher is better. Regressions are judged on
# accuracy (absolute tolerance), latency and size (relative tolerance); the rest is shown only.
COMPARED = {"accuracy": True, "latency_ms": False, "size_mb": False, "loss": False,
            "train_samples_per_s": True, "max_abs_error": False}
JUDGED = {"accuracy", "latency_ms", "size_mb"}


def load_run_report(run_dir: Path) -> dict[str, Any]:
    import json

    from mlopt.core.errors import InputError

    path = Path(run_dir) / "report.json"
    try:
        report = json.loads(path.read_text())
    except OSError:
        raise InputError(f"{run_dir} has no report.json (is it an mlopt output directory?)") from None
    except ValueError as exc:
        raise InputError(f"{path} is corrupt: {exc}") from None
    if report.get("kind") == "step":
        step = report["step"]
        return {"steps": [{**step, "dir": step.get("dir") or step["type"]}]}
    return report


def compare_runs(old: dict[str, Any], new: dict[str, Any], tolerance: float, accuracy_tolerance: float) -> list[dict[str, Any]]:
    """Rows of (step, metric, old, new, change, regressed) for the metrics both runs measured."""
    rows = []
    old_steps = {s["dir"]: s for s in old.get("steps", [])}
    for step in new.get("steps", []):
        before = old_steps.get(step["dir"])
        if before is None:
            continue
        for key, higher in COMPARED.items():
            a, b = before.get("metrics", {}).get(key), step.get("metrics", {}).get(key)
            pairs = [(key, a, b)]
            if isinstance(a, dict) and isinstance(b, dict):  # per batch size
                pairs = [(f"{key}[batch {k}]", a[k], b[k]) for k in a if k in b]
            for name, x, y in pairs:
                if not isinstance(x, (int, float)) or not isinstance(y, (int, float)) or isinstance(x, bool):
                    continue
                if key == "accuracy":
                    regressed = y < x - accuracy_tolerance
                elif key in JUDGED:
                    regressed = y > x * (1 + tolerance)
                else:
                    regressed = False
                change = (y - x) / abs(x) if x else 0.0
                rows.append({"step": step["dir"], "metric": name, "old": x, "new": y, "change": change,
                             "better": (y > x) == higher if y != x else None, "regressed": regressed})
    return rows
