import json

import pytest
import yaml
from typer.testing import CliRunner

from mlopt.cli.main import app

from conftest import TOY


@pytest.mark.slow
def test_recipe_runs_every_step(tmp_path):
    recipe = {
        "version": 1,
        "model": {"spec": f"{TOY}:tiny_cnn"},
        "data": {"source": "digits", "batch_size": 32},
        "steps": [
            {"type": "train", "epochs": 3, "lr": 0.01},
            {"type": "eval"},
            {"type": "export", "exporter": "torchscript"},
            {"type": "eval"},
            {"type": "bench", "batch_sizes": [1, 8], "iterations": 5, "warmup": 1},
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == ["01-train", "02-eval", "03-export", "04-eval", "05-bench"]
    assert (out / "01-train" / "model.pt").is_file() and (out / "03-export" / "model.onnx").is_file()
    report = json.loads((out / "report.json").read_text())
    steps = report["steps"]
    assert [s["type"] for s in steps] == ["train", "eval", "export", "eval", "bench"]
    torch_acc, onnx_acc = steps[1]["metrics"]["accuracy"], steps[3]["metrics"]["accuracy"]
    assert torch_acc > 0.8 and abs(torch_acc - onnx_acc) <= 1 / 360
    assert steps[3]["input"]["format"] == "onnx"
    bench = steps[4]
    assert [(lat["batch_size"], lat["model"], lat["output"]) for lat in bench["latency"]] == [
        (1, str(out / "03-export"), True), (8, str(out / "03-export"), True)]
    assert all(0 < lat["p50_ms"] <= lat["p99_ms"] for lat in bench["latency"])
    assert [row[2] for row in bench["sections"][0]["rows"]] == [1, 8]  # batch_size
    md = (out / "report.md").read_text()
    assert "05-bench" in md and "| cpu |" in md
    page = (out / "report.html").read_text()
    assert "accuracy against latency" in page and "<svg" in page and "<script" not in page


def test_invalid_recipe_does_no_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": {"spec": "torchvision:resnet18"},
                                    "steps": [{"type": "train", "epoks": 2}]}))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 2 and "epoks: unknown key" in result.stderr
    assert not out.exists()


def test_step_needing_data_is_caught_before_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": {"spec": "torchvision:resnet18"},
                                    "steps": [{"type": "export"}, {"type": "train"}]}))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "needs data" in result.stderr
    assert not (tmp_path / "run").exists()


def test_bench_before_export_is_a_clear_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": {"spec": f"{TOY}:tiny_cnn", "input_shape": "1x1x8x8"},
                                    "steps": [{"type": "bench"}]}))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "add an export step" in result.stderr
    assert not (tmp_path / "run").exists()


def test_run_dir_is_a_model_and_eval_reuses_its_input_shape(tmp_path):
    """`--model RUN_DIR` means the run's final model; data is resized to what the model was trained on."""
    recipe = {
        "version": 1,
        "model": {"spec": f"{TOY}:tiny_cnn_rgb"},
        "data": {"source": "digits", "image_size": 12, "channels": 3},
        "steps": [{"type": "train", "epochs": 1, "lr": 0.02}, {"type": "export", "exporter": "torchscript"}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--quiet"]).exit_code == 0
    trained = json.loads((out / "01-train" / "report.json").read_text())["step"]["metrics"]["accuracy"]
    for model in (out, out / "01-train"):
        result = CliRunner().invoke(app, ["eval", "--model", str(model), "--data", "digits", "--json"])
        assert result.exit_code == 0, result.output
        assert abs(json.loads(result.stdout)["accuracy"] - trained) <= 1 / 360
    result = CliRunner().invoke(app, ["eval", "--model", str(out), "--data", "digits", "--image-size", "8"])
    assert result.exit_code == 2 and "3x12x12" in result.stderr


def test_resume_skips_completed_steps_and_overwrite_clears(tmp_path):
    recipe = {
        "version": 1,
        "model": {"spec": f"{TOY}:tiny_cnn"},
        "data": {"source": "digits", "batch_size": 32},
        "steps": [{"type": "train", "epochs": 1, "lr": 0.02}, {"type": "eval"}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--quiet"]).exit_code == 0
    first = (out / "01-train" / "model.pt").stat().st_mtime_ns

    recipe["steps"][1] = {"type": "eval", "batch_size": 16}  # only the second step changes
    path.write_text(yaml.safe_dump(recipe))
    refused = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert "01-train: already completed" in result.stderr
    assert (out / "01-train" / "model.pt").stat().st_mtime_ns == first
    report = json.loads((out / "report.json").read_text())
    assert report["steps"][1]["config"]["batch_size"] == 16

    recipe["steps"] = recipe["steps"][:1]
    path.write_text(yaml.safe_dump(recipe))
    assert CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--overwrite", "--quiet"]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [".mlopt-output.json", "01-train", "report.html", "report.json", "report.md"]


def _gate_recipe(tmp_path, gates):
    recipe = {
        "version": 1,
        "model": {"spec": f"{TOY}:tiny_cnn"},
        "data": {"source": "digits", "batch_size": 32},
        "steps": [{"type": "train", "epochs": 2, "lr": 0.02},
                  {"type": "prune", "ratio": 0.5, "finetune_epochs": 1, "measure_latency": False,
                   "finetune": {"lr": 0.01}},
                  {"type": "export", "exporter": "torchscript"}],
        "gates": gates,
    }
    path = tmp_path / "gated.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_gates_pass_and_fail_with_junit(tmp_path):
    path = _gate_recipe(tmp_path, {"max_accuracy_drop": 1.0, "max_size_mb": 100, "min_speedup": 0.01,
                                   "iterations": 6})
    out, junit = tmp_path / "ok", tmp_path / "ok.xml"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--junit", str(junit), "--quiet"])
    assert result.exit_code == 0, result.output
    gates = json.loads((out / "report.json").read_text())["gates"]
    assert gates["passed"] and {r["gate"] for r in gates["results"]} == {"max_accuracy_drop", "max_size_mb", "min_speedup"}
    assert gates["baseline"].endswith("01-train")
    assert 'failures="0"' in junit.read_text()

    path = _gate_recipe(tmp_path, {"max_size_mb": 0.0001, "max_latency_ms": 1000, "iterations": 6})
    out, junit = tmp_path / "bad", tmp_path / "bad.xml"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--junit", str(junit), "--quiet"])
    assert result.exit_code == 3, result.output
    assert "max_size_mb" in result.stderr and "FAIL" in result.stderr  # the table shows even with --quiet
    assert (out / "03-export" / "model.onnx").is_file()  # artifacts and reports are still written
    assert "**FAIL**" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert '<span class="fail">FAILED</span>' in page and "<td>max_size_mb</td><td>&lt;= 0.0001</td>" in page
    assert page.count("<svg") >= 2  # the chain's latencies and the channels per layer
    assert "<script" not in page and 'src="http' not in page and "href=\"http" not in page  # self-contained
    xml = junit.read_text()
    assert 'tests="2" failures="1"' in xml and '<testcase classname="mlopt.gates" name="max_size_mb">' in xml


def test_accuracy_gate_needs_data(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": {"spec": f"{TOY}:tiny_cnn", "input_shape": "1x1x8x8"},
                                    "steps": [{"type": "export"}], "gates": {"max_accuracy_drop": 0.01}}))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "needs labelled data" in result.stderr


def test_recipe_validate_and_schema(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"version": 1, "model": {"spec": "torchvision:resnet18"}, "data": {"source": "digits"},
                                    "steps": [{"type": "train"}], "gates": {"min_speedup": 2}}))
    result = CliRunner().invoke(app, ["recipe", "validate", str(good)])
    assert result.exit_code == 0 and "valid (1 steps: train)" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"version": 1, "model": {"spec": "x"}, "steps": [{"type": "train"}],
                                   "gates": {"min_sped": 2}}))
    result = CliRunner().invoke(app, ["recipe", "validate", str(bad)])
    assert result.exit_code == 2 and "gates.min_sped: unknown key" in result.stderr
    schema = json.loads(CliRunner().invoke(app, ["recipe", "schema"]).stdout)
    assert set(schema["properties"]) == {"version", "model", "data", "steps", "gates"}
    assert "prune" in json.dumps(schema["$defs"]["PruneConfig"])


@pytest.mark.parametrize("spec, step, message", [
    ("torchvision:resnet1", {"type": "train"}, "model: spec: unknown torchvision classification, video or segmentation model 'resnet1'; did you mean resnet18"),
    ("torch vision:resnet18", {"type": "train"}, "model: spec: unrecognised model 'torch vision:resnet18': unknown prefix"),
    ("torchvision:resnet18", {"type": "distill", "teacher": "torchvision:resnet05"},
     "steps[0] (distill): teacher: unknown torchvision classification, video or segmentation model 'resnet05'"),
])
def test_recipe_validate_refuses_model_specs_that_cannot_name_a_model(tmp_path, spec, step, message):
    """A spec's form is checked without any file: an unknown prefix or a torchvision name torchvision lacks is
    refused (exit 2) by validate, not first by the run."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": {"spec": spec}, "data": {"source": "digits"},
                                    "steps": [step]}))
    result = CliRunner().invoke(app, ["recipe", "validate", str(path)])
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_recipe_validate_warns_of_a_path_spec_that_does_not_exist(tmp_path, monkeypatch):
    """A spec without a scheme is a path (a run's output may not exist yet): valid, with a warning naming it."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": {"spec": "garbage"}, "steps": [{"type": "export"}]}))
    result = CliRunner().invoke(app, ["recipe", "validate", str(path)])
    assert result.exit_code == 0 and "'garbage' is read as a path" in result.stderr, result.output
    (tmp_path / "garbage").mkdir()
    monkeypatch.chdir(tmp_path)
    here = CliRunner().invoke(app, ["recipe", "validate", str(path)])
    assert here.exit_code == 0 and "valid (1 steps: export)" in here.stderr and "warning" not in here.stderr


def test_resume_reruns_steps_whose_inputs_changed(tmp_path, npz_file):
    import numpy as np

    recipe = {
        "version": 1,
        "model": {"spec": f"{TOY}:tiny_cnn"},
        "data": {"source": f"npz:{npz_file}", "batch_size": 32},
        "steps": [{"type": "train", "epochs": 1, "lr": 0.02}, {"type": "eval"}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--quiet"]).exit_code == 0
    first = json.loads((out / "report.json").read_text())["steps"]

    same = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--resume"])
    assert same.exit_code == 0 and same.stderr.count("already completed") == 2, same.output

    with np.load(npz_file) as arrays:  # same file name and options, different content
        x, y = arrays["x"], arrays["y"]
    np.savez(npz_file, x=x[::-1].copy(), y=y[::-1].copy())
    changed = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--resume"])
    assert changed.exit_code == 0, changed.output
    assert "already completed" not in changed.stderr
    second = json.loads((out / "report.json").read_text())["steps"]
    assert [s["config"] for s in second] == [s["config"] for s in first]
    assert all(a["inputs_sha256"] != b["inputs_sha256"] for a, b in zip(first, second))
