"""The report: its schema, the Markdown and HTML renderings of generic sections, and compare."""

import json
import re

import pytest
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.core.errors import RunError
from mlopt.report.html import MAX_PLOTTED_LABELS, render_html, render_section, summary_table
from mlopt.report.markdown import compare_runs, render_markdown
from mlopt.report.schema import parse

from conftest import run_report, step_report

TABLE = {"kind": "table", "title": "per epoch", "columns": ["epoch", "loss"], "rows": [[1, 0.5], [2, 0.25]]}
BARS = {"kind": "bars", "title": "channels", "labels": ["conv1", "conv2"], "series": {"before": [8, 16], "after": [4, 8]}}
SCATTER = {"kind": "scatter", "title": "acc vs ms", "xlabel": "ms", "ylabel": "top-1",
           "points": [{"label": "a", "x": 1.0, "y": 0.9}, {"label": "b", "x": 2.0, "y": 0.95}]}


def _lat(model, batch, p50, output=False):
    return {"batch_size": batch, "p50_ms": p50, "mean_ms": p50 * 1.1, "method": "sequential runs", "model": model,
            "output": output}


def _chain(latency_ms):
    """A chain comparison of two models; latency_ms: step -> {batch size: ms} (int keys, as in memory)."""
    base = latency_ms["01-train"]
    models = [{"step": step, "model": f"run/{step}", "format": "onnx", "accuracy": 0.9, "size_mb": 1.0,
               "latency_ms": lat, "geomean_ms": 1.0, "speedup": {b: base[b] / ms for b, ms in lat.items()},
               "eligible": True, "best": step == "02-prune", "fastest_at": []} for step, lat in latency_ms.items()]
    return {"method": "interleaved", "provider": "cpu", "batch_sizes": sorted(base), "rounds": 9,
            "iterations_per_round": 3, "accuracy_method": None, "accuracy_tolerance": 0.01,
            "accuracy_tolerance_from": "default", "tie": 0.05, "rule": "fastest", "baseline": "01-train",
            "final": "02-prune", "models": models, "best": "02-prune", "final_is_best": True,
            "verdict": "the final model (02-prune) is the best of its chain", "duration_s": 1.0}


def _run(bench_ms, chain_ms=None, accuracy=0.9, output="a"):
    """A run whose bench step timed models {(name, batch size): p50}, the one named `output` marked as handed on."""
    latency = [_lat(f"/x/{m}", b, ms, m == output) for (m, b), ms in bench_ms.items()]
    steps = [step_report("01-train", metrics={"accuracy": accuracy, "size_mb": 1.0}, sections=[TABLE]),
             step_report("02-prune", "prune", sections=[BARS, SCATTER]),
             step_report("03-bench", "bench", latency=latency)]
    return run_report(steps, **({"chain": _chain(chain_ms)} if chain_ms else {}))


def test_a_good_report_validates_and_the_schema_is_printed():
    report = parse(_run({("a", 1): 2.0}, {"01-train": {1: 2.0}, "02-prune": {1: 1.0}}))
    assert [type(s).__name__ for s in report.steps[1].sections] == ["Bars", "Scatter"]
    schema = json.loads(CliRunner().invoke(app, ["report", "schema"]).stdout)
    assert {"StepReport", "RunReport", "Latency", "Table", "Bars", "Scatter", "Chain"} <= set(schema["$defs"])


@pytest.mark.parametrize("change, problem", [
    (lambda s: s["sections"].append({"kind": "pie", "title": "x"}), "sections.0"),
    (lambda s: s["metrics"].update(latency_ms={"1": 2.0}), "metrics.latency_ms"),
    (lambda s: s.update(history=[{"epoch": 1}]), "history"),
    (lambda s: s["latency"].append({"batch_size": 0, "p50_ms": 1.0, "method": "m"}), "latency.0.batch_size"),
])
def test_a_report_outside_the_schema_fails(change, problem):
    step = step_report()
    change(step)
    with pytest.raises(RunError, match=re.escape(problem)):
        parse(run_report([step]))


def test_markdown_renders_every_section_kind_as_a_table():
    md = render_markdown(parse(_run({("a", 1): 2.0, ("b", 1): 1.5})))
    assert "### per epoch" in md and "| 1 | 0.5 |" in md and "| 2 | 0.25 |" in md
    assert "|  | before | after |" in md and "| conv1 | 8 | 4 |" in md and "| conv2 | 16 | 8 |" in md
    assert "|  | ms | top-1 |" in md and "| b | 2 | 0.95 |" in md
    assert "| /x/a (output) | 1 | 2 |" in md and "| /x/b | 1 | 1.5 |" in md and "timing: sequential runs" in md


@pytest.mark.slow  # matplotlib
def test_html_plots_bars_and_scatters_and_tabulates_many_names():
    from mlopt.core.sections import Bars, Scatter, Table

    assert render_section(Bars(**BARS)).startswith("<figure><svg")
    assert render_section(Scatter(**SCATTER)).startswith("<figure><svg")
    table = render_section(Table(**TABLE))
    assert "<th>epoch</th><th>loss</th>" in table and "<td>2</td><td>0.25</td>" in table
    def height(svg):
        return float(re.search(r'<svg[^>]* height="([0-9.]+)pt"', svg).group(1))

    labels = [f"layer{i}" for i in range(MAX_PLOTTED_LABELS)]
    tall = render_section(Bars(title="t", labels=labels, series={"x": list(range(len(labels)))}))
    assert height(tall) / len(labels) >= 12  # a row of at least 12 pt per 8 pt label: none overlap
    names = [f"block{i}.conv" for i in range(MAX_PLOTTED_LABELS + 1)]
    many = render_section(Bars(title="t", labels=names, series={"after": list(range(len(names)))}))
    assert "<svg" not in many and all(f"<td>{n}</td>" in many for n in names)


@pytest.mark.slow  # matplotlib
def test_html_summary_first_from_the_chain_else_from_the_steps():
    fresh = _run({("a", 1): 2.0}, {"01-train": {1: 2.0, 8: 9.0}, "02-prune": {1: 1.0, 8: 3.0}})  # int batch keys
    page = render_html(parse(fresh))
    assert page == render_html(parse(json.dumps(fresh)))  # as a resumed run reads it back: the same page
    assert page.index("<h2>Summary</h2>") < page.index("Chain:") < page.index("<h2>01-train</h2>")
    summary = page[page.index("<h2>Summary</h2>"):page.index("Chain:")]
    assert "<th>batch 1 ms</th><th>batch 8 ms</th>" in summary
    assert "<td>02-prune</td><td>onnx</td><td>1</td><td>1</td><td>3</td><td>0.9</td><td>2.00x</td><td>3.00x</td>" in summary
    assert page.count("<svg") == 4  # chain scatter, chain latency bars, the prune step's bars and scatter
    assert "<pre>" not in page
    plain = render_html(parse(_run({("a", 1): 2.0, ("a", 8): 4.0, ("b", 1): 1.0})))
    summary = plain[plain.index("<h2>Summary</h2>"):plain.index("<h2>01-train</h2>")]
    assert "<th>batch 1 p50 ms</th><th>batch 8 p50 ms</th>" in summary
    assert "<td>03-bench</td><td>torch</td><td></td><td>2</td><td>4</td>" in summary  # the output model's p50s
    assert "<td>01-train</td><td>torch</td><td>1</td><td></td><td></td><td>accuracy 0.9</td>" in summary


def test_compare_reads_per_batch_latencies_of_the_same_model_fresh_or_from_json():
    old = _run({("a", 1): 2.0, ("a", 8): 10.0, ("b", 1): 1.0}, {"01-train": {1: 2.0, 8: 9.0}, "02-prune": {1: 1.0, 8: 3.0}})
    new = _run({("a", 1): 2.05, ("a", 8): 13.0, ("b", 1): 1.0}, {"01-train": {1: 2.0, 8: 9.0}, "02-prune": {1: 1.0, 8: 4.0}})
    fresh = compare_runs(parse(old), parse(new), tolerance=0.1, accuracy_tolerance=0.005)
    # A resumed step comes back from report.json, where batch sizes are string keys.
    resumed = compare_runs(parse(json.dumps(old)), parse(json.loads(json.dumps(new))), 0.1, 0.005)
    assert fresh == resumed
    rows = {(r["step"], r["metric"]): r for r in fresh}
    assert rows["03-bench", "latency p50 ms[batch 8]"]["regressed"]
    assert rows["03-bench", "latency p50 ms[batch 8]"]["old"] == 10.0
    assert not rows["03-bench", "latency p50 ms[batch 1]"]["regressed"]
    assert [r["metric"] for r in fresh if r["step"] == "03-bench"] == ["latency p50 ms[batch 1]", "latency p50 ms[batch 8]"]
    assert rows["chain 02-prune", "latency ms[batch 8]"]["regressed"]
    assert not rows["chain 02-prune", "latency ms[batch 1]"]["regressed"]
    assert not rows["01-train", "accuracy"]["regressed"]


def _quantized(fp32_ms, int8_ms, int8_out=True):
    """A PTQ step that timed FP32 (first, its reference), a static INT8 candidate and the dynamic one it chose."""
    latency = [*(_lat(name, b, ms, output) for name, ms, output in
                 (("FP32", fp32_ms, not int8_out), ("static", 2 * int8_ms, False), ("dynamic", int8_ms, int8_out))
                 for b in (1, 8))]
    return step_report("02-ptq", "ptq", metrics={"accuracy": 0.9, "size_mb": 0.3}, latency=latency,
                       output={"format": "onnx", "lineage": ["ptq"], "files": []})


def test_the_summary_shows_the_latency_and_speedup_of_the_model_a_step_hands_on():
    prune = step_report("01-prune", "prune", latency=[_lat("before", 1, 3.0), _lat("after", 1, 2.0, True)])
    unmarked = _quantized(4.0, 1.0) | {"dir": "03-ptq", "index": 3}
    for lat in unmarked["latency"]:
        lat["output"] = False  # a report written before the mark: several models, none known as the output
    single = step_report("04-bench", "bench", latency=[_lat("/x/a", 1, 5.0), _lat("/x/a", 8, 20.0)])
    table = summary_table(parse(run_report([prune, _quantized(4.0, 1.0), unmarked, single])))
    rows = {row[0]: row for row in table.rows}
    assert table.columns[3:] == ["batch 1 p50 ms", "batch 8 p50 ms", "top-1 or fidelity", "speed-up b1", "speed-up b8"]
    assert rows["01-prune"][3:] == [2.0, None, None, "1.50x", None]
    assert rows["02-ptq"][3:] == [1.0, 1.0, "accuracy 0.9", "4.00x", "4.00x"]  # the chosen INT8, not FP32
    assert rows["03-ptq"][3:] == [None, None, "accuracy 0.9", None, None]
    assert rows["04-bench"][3:] == [5.0, 20.0, None, "1.00x", "1.00x"]  # one model, unmarked: the output
    kept_fp32 = summary_table(parse(run_report([_quantized(4.0, 1.0, int8_out=False)])))
    assert kept_fp32.rows[0][3:] == [4.0, 4.0, "accuracy 0.9", "1.00x", "1.00x"]


def test_compare_judges_the_output_model_not_the_references_timed_beside_it():
    old, slower_fp32, slower_int8 = (run_report([_quantized(fp32, int8)]) for fp32, int8 in ((4.0, 1.0), (8.0, 1.0), (4.0, 2.0)))
    assert not any(r["regressed"] for r in compare_runs(parse(old), parse(slower_fp32), 0.1, 0.005))
    rows = compare_runs(parse(old), parse(slower_int8), 0.1, 0.005)
    assert {r["metric"] for r in rows if r["regressed"]} == {"latency p50 ms[batch 1]", "latency p50 ms[batch 8]"}
    assert all(r["old"] == 1.0 for r in rows if r["regressed"])


def test_report_compare_command_flags_regressions(tmp_path):
    def run_dir(name, accuracy, ms):
        (tmp_path / name).mkdir()
        # One timed model and no mark (a report written before it): that model counts as the output.
        (tmp_path / name / "report.json").write_text(json.dumps(_run({("a", 1): ms}, accuracy=accuracy, output=None)))
        return tmp_path / name

    old, same, worse = run_dir("old", 0.98, 2.0), run_dir("same", 0.978, 2.1), run_dir("worse", 0.95, 3.0)
    ok = CliRunner().invoke(app, ["report", "compare", str(old), str(same), "--json"])
    assert ok.exit_code == 0, ok.output
    assert not json.loads(ok.stdout)["regressed"]
    bad = CliRunner().invoke(app, ["report", "compare", str(old), str(worse)])
    assert bad.exit_code == 3
    assert "01-train accuracy" in bad.stderr and "03-bench latency p50 ms[batch 1]" in bad.stderr
    assert "REGRESSED" in bad.stderr
    loose = CliRunner().invoke(app, ["report", "compare", str(old), str(worse), "--tolerance", "1",
                                     "--accuracy-tolerance", "0.05"])
    assert loose.exit_code == 0, loose.output
    missing = CliRunner().invoke(app, ["report", "compare", str(old), str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no report.json" in missing.stderr
    (tmp_path / "nope").mkdir()
    (tmp_path / "nope" / "report.json").write_text(json.dumps({"kind": "run", "schema_version": 1}))
    old_schema = CliRunner().invoke(app, ["report", "compare", str(old), str(tmp_path / "nope")])
    assert old_schema.exit_code == 2 and "report schema (version 2)" in old_schema.stderr
    (tmp_path / "nope" / "report.json").unlink()  # (every report.json left under tmp_path must validate)
