import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.core.errors import InputError
from mlopt.run.outdir import MARKER

from conftest import TOY

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys; from mlopt.cli.main import app; "
        "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'pydantic', 'sklearn') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("cmd", ["train", "eval", "export", "bench", "run"])
def test_subcommand_help(cmd):
    result = invoke(cmd, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.parametrize("args,message", [
    (["train", "--epochs", "abc", "-m", "x", "-d", "digits"], "error: Invalid value for '--epochs' / '-e': Input should be a "
     "valid integer, unable to parse string as an integer (see 'mlopt train --help')"),
    (["train", "-m", "x"], "error: Missing option '--data' / '-d' (see 'mlopt train --help')"),
    (["nosuchcmd"], "error: No such command 'nosuchcmd' (see 'mlopt --help')"),
    (["recipe", "validate"], "error: Missing argument 'RECIPE' (see 'mlopt recipe validate --help')"),
    (["report", "nosuch"], "error: No such command 'nosuch' (see 'mlopt report --help')"),
])
def test_usage_errors_are_one_line_like_every_error(args, message):
    result = invoke(*args)
    assert result.exit_code == 2 and result.stderr.strip() == message and not result.stdout


def test_no_command_still_shows_the_help():
    result = invoke()
    assert result.exit_code == 2 and "Usage: mlopt [OPTIONS] COMMAND" in result.output and "bench" in result.output


def test_train_writes_artifact_and_report(trained_dir):
    assert {p.name for p in trained_dir.iterdir()} == {"model.pt", "model.json", "report.json", "report.md", MARKER}
    meta = json.loads((trained_dir / "model.json").read_text())
    assert meta["format"] == "torch" and meta["sample_shape"] == [1, 8, 8] and meta["lineage"] == ["train"]
    report = json.loads((trained_dir / "report.json").read_text())
    assert report["step"]["type"] == "train" and report["step"]["metrics"]["accuracy"] > 0.8
    history = report["step"]["sections"][0]
    assert history["title"] == "training history" and [row[0] for row in history["rows"]] == [1, 2, 3]
    assert not [p for p in trained_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_eval_json_torch_and_onnx_agree(trained_dir, exported_dir):
    a = invoke("eval", "--model", trained_dir, "--data", "digits", "--json")
    b = invoke("eval", "--model", exported_dir / "model.onnx", "--data", "digits", "--json")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert set(ja) == {"accuracy", "loss", "samples"} and ja["samples"] == 360
    assert ja["accuracy"] == pytest.approx(jb["accuracy"], abs=1 / 360)
    trained = json.loads((trained_dir / "report.json").read_text())["step"]["metrics"]["accuracy"]
    assert ja["accuracy"] == pytest.approx(trained)


def test_export_report_records_parity(exported_dir):
    report = json.loads((exported_dir / "report.json").read_text())
    m = report["step"]["metrics"]
    assert m["max_abs_error"] < 1e-3 and m["top1_agreement"] == 1.0 and m["parity_samples"] == 64
    assert report["step"]["input"]["lineage"] == ["train"]
    assert json.loads((exported_dir / "model.json").read_text())["lineage"] == ["train", "export"]


def test_bench_json_contract(exported_dir, tmp_path):
    onnx_path = exported_dir / "model.onnx"
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(onnx_path.read_bytes())
    result = invoke("bench", onnx_path, copy, "--batch-size", 1, "--batch-size", 2, "--iterations", 3,
                    "--warmup", 1, "--json", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    results = data["results"]
    assert [(r["model"], r["batch_size"]) for r in results] == [
        (str(onnx_path), 1), (str(onnx_path), 2), (str(copy), 1), (str(copy), 2)]
    for r in results:
        assert set(r) == {"model", "provider", "batch_size", "latency_ms", "throughput_per_s", "size_mb", "speedup"}
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and lat["mean"] > 0 and r["provider"] == "cpu"
    assert results[0]["speedup"] == 1.0 and "sequential" in data["timing"]
    md = (tmp_path / "b" / "report.md").read_text()
    assert md.count("| cpu | 1 |") == 2 and md.count("| cpu | 2 |") == 2
    step = json.loads((tmp_path / "b" / "report.json").read_text())["step"]
    assert {lat["model"] for lat in step["latency"] if lat["output"]} == {str(onnx_path)}  # handed on unchanged


@pytest.mark.parametrize("flag, spinning", [([], False), (["--spinning"], True)])
def test_bench_spins_the_threads_only_when_asked(exported_dir, tmp_path, monkeypatch, flag, spinning):
    from mlopt.export.lib import timing

    made = []
    real = timing.make_session
    monkeypatch.setattr(timing, "make_session", lambda *a, **k: made.append(k.get("spinning")) or real(*a, **k))
    result = invoke("bench", exported_dir / "model.onnx", "--iterations", 2, "--warmup", 0, *flag, "--json",
                    "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert made == [spinning]
    assert json.loads(result.stdout)["timing"].endswith(f"spinning {'on' if spinning else 'off'}")


def test_export_without_data_uses_input_shape(tmp_path):
    out = tmp_path / "e"
    result = invoke("export", "--model", f"{TOY}:tiny_cnn", "--input-shape", "1x1x8x8", "--out", out,
                    "--exporter", "torchscript", "--quiet")
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").is_file()
    assert "random normal" in (out / "report.md").read_text()


def test_save_recipe_writes_equivalent_recipe(tmp_path):
    from mlopt.run.recipe import load_recipe

    path = tmp_path / "r.yaml"
    result = invoke("train", "--model", "torchvision:resnet18", "--data", "digits", "--epochs", 3,
                    "--image-size", 32, "--out", tmp_path / "never", "--save-recipe", path)
    assert result.exit_code == 0, result.output
    recipe = load_recipe(path)
    assert recipe.steps[0].epochs == 3 and recipe.data.image_size == 32
    assert not (tmp_path / "never").exists()


def _error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not an uncaught exception
    return lines[0]


@pytest.mark.parametrize(
    "args,code,match",
    [
        (["eval", "--model", "torchvision:resnet81", "--data", "digits"], 2, "did you mean resnet18"),
        (["eval", "--model", f"{TOY}:tiny_cnn", "--data", "random:1x8x8"], 2, "needs labelled data"),
        (["eval", "--model", f"{TOY}:tiny_cnn", "--data", "mnist"], 2, "unrecognised data"),
        (["eval", "--model", "/no/such.onnx", "--data", "digits"], 2, "does not exist"),
        (["eval", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--channels", "3"], 2, "rejects input of shape"),
        (["eval", "--model", f"{TOY}:tiny_cnn", "--num-classes", "4", "--data", "digits"], 2, "labels up to 9"),
        (["bench", "/no/such.onnx"], 2, "does not exist"),
        (["train", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--optimizer", "lion", "--out", "x"], 2, "optimizer"),
        (["export", "--model", f"{TOY}:tiny_cnn", "--out", "x"], 2, "give --input-shape"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, code, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert match in _error_line(result)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_corrupt_files(tmp_path, exported_dir):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    result = invoke("bench", bad)
    assert result.exit_code == 2 and "not a valid ONNX" in _error_line(result)
    weights = tmp_path / "w.pt"
    weights.write_text("junk")
    result = invoke("eval", "--model", f"{TOY}:tiny_cnn", "--weights", weights, "--data", "digits")
    assert result.exit_code == 2 and "not a valid PyTorch state dict" in _error_line(result)


def test_existing_out_is_refused_unless_overwrite(tmp_path, trained_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["export", "--model", trained_dir, "--out", out, "--exporter", "torchscript", "--quiet"]
    result = invoke(*args)
    assert result.exit_code == 2 and "--overwrite" in _error_line(result)
    assert (out / "keep.txt").read_text() == "precious"
    result = invoke(*args, "--overwrite")  # --overwrite replaces only what mlopt wrote: still refused
    assert result.exit_code == 2 and "'keep.txt'" in _error_line(result)
    assert (out / "keep.txt").read_text() == "precious" and not (out / "model.onnx").exists()
    (out / "keep.txt").unlink()
    assert invoke(*args).exit_code == 0 and (out / "model.onnx").is_file()
    assert invoke(*args, "--overwrite").exit_code == 0


def test_failed_step_leaves_nothing(tmp_path):
    # The exported graph is off by 1e-3 (export_drift): parity fails after the ONNX file was written;
    # no output may remain.
    out = tmp_path / "out"
    args = ["export", "--model", f"{TOY}:export_drift", "--input-shape", "1x1x8x8", "--exporter", "torchscript",
            "--rtol", 0]
    result = invoke(*args, "--atol", 1e-4, "--out", out)
    assert result.exit_code == 1, result.output
    assert "disagrees with PyTorch: max abs error 0.001 > tolerance 0.0001" in _error_line(result)
    assert list(tmp_path.iterdir()) == []
    assert invoke(*args, "--atol", 1e-2, "--out", out, "--quiet").exit_code == 0  # within a looser tolerance


def test_debug_env_raises_instead_of_one_line(monkeypatch):
    args = ["eval", "--model", "torchvision:resnet81", "--data", "digits"]
    assert isinstance(invoke(*args).exception, SystemExit)  # handled: one line, exit 2
    monkeypatch.setenv("MLOPT_DEBUG", "1")
    result = invoke(*args)
    assert isinstance(result.exception, InputError) and "resnet81" in str(result.exception)


@pytest.mark.slow
def test_debug_env_prints_the_traceback():
    # an error found before torch is imported: two fresh interpreters in a second or two
    cmd = [sys.executable, "-m", "mlopt", "recipe", "validate", "no-such-recipe.yaml"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "MLOPT_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1] == "mlopt.core.errors.InputError: recipe no-such-recipe.yaml does not exist"


def test_weights_flag_loads_state_dict(tmp_path, trained_dir):
    state = torch.load(trained_dir / "model.pt", weights_only=True)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    a = invoke("eval", "--model", f"{TOY}:tiny_cnn", "--weights", path, "--data", "digits", "--json")
    b = invoke("eval", "--model", trained_dir, "--data", "digits", "--json")
    assert json.loads(a.stdout) == json.loads(b.stdout)


def test_train_on_npz(tmp_path, npz_file):
    out = tmp_path / "m"
    result = invoke("train", "--model", f"{TOY}:tiny_cnn", "--data", f"npz:{npz_file}", "--epochs", 10, "--lr", 0.02,
                    "--out", out, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["accuracy"] > 0.9
    assert json.loads((out / "model.json").read_text())["num_classes"] == 4
