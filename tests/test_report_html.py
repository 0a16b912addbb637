"""The HTML report renders in a real browser (headless Chromium) and shows its plots."""

import json
import re
import shutil
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from mlopt.cli.main import app

from conftest import TOY

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def _browser():
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium (.ci/run installs chromium-headless-shell)")
@pytest.mark.slow
def test_html_report_renders_with_plots(tmp_path):
    from PIL import Image

    recipe = {
        "version": 1,
        "model": {"spec": f"{TOY}:tiny_cnn"},
        "data": {"source": "digits", "batch_size": 32},
        "steps": [{"type": "train", "epochs": 1, "lr": 0.02},
                  {"type": "prune", "ratio": 0.5, "finetune_epochs": 1, "finetune": {"lr": 0.01}},
                  {"type": "export", "exporter": "torchscript"},
                  {"type": "bench", "iterations": 5, "warmup": 1}],
        "gates": {"max_size_mb": 100, "iterations": 6},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--quiet"]).exit_code == 0
    page = out / "report.html"
    shot = tmp_path / "page.png"
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
           "--window-size=1000,2400", f"--screenshot={shot}", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Uncaught" not in proc.stderr and "CONSOLE" not in proc.stderr  # no script errors, no console output
    dom = subprocess.run([*cmd[:-2], "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") >= 3 and "Gates:" in dom and "<pre>" not in dom
    # First the summary: one row per model of the chain, its latency at each batch size and speed-up.
    assert dom.index("<h2>Summary</h2>") < dom.index("Gates:") < dom.index("<h2>01-train</h2>")
    summary = dom[dom.index("<h2>Summary</h2>"):dom.index("Gates:")]
    assert "<th>batch 1 ms</th>" in summary and "<th>speed-up b1</th>" in summary
    assert all(f"<td>{step}</td>" in summary for step in ("01-train", "02-prune", "03-export"))
    # Then each step's sections: tables as real tables, the pruned channels as a plot.
    assert "<h3>training history</h3>" in dom and "<h3>fine-tuning history</h3>" in dom
    prune = dom[dom.index("<h2>02-prune</h2>"):dom.index("<h2>03-export</h2>")]
    assert "<svg" in prune and "<th>prune step</th>" in prune
    assert re.search(r"best model 0[123]-(train|prune|export)<", dom) and "Chain: every model measured alike" in dom
    img = Image.open(shot).convert("L")
    assert img.size == (1000, 2400)
    coloured = sum(img.histogram()[:200])
    assert coloured > 20000, coloured  # plots drew something (a blank page has almost no dark pixels)
    report = json.loads((out / "report.json").read_text())
    assert report["gates"]["passed"]
    assert [(lat["model"], lat["output"]) for lat in report["steps"][1]["latency"]] == [("before", False), ("after", True)]
