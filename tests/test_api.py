"""The Python API (mlopt/api.py): `import mlopt` stays light; mlopt.run and one function per step type."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import mlopt
from mlopt.core.errors import InputError

from conftest import TOY

ROOT = Path(__file__).resolve().parent.parent


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 4))


X = torch.zeros(1, 1, 8, 8)


def test_import_mlopt_loads_no_torch_and_offers_the_api():
    code = ("import sys, mlopt; light = 'torch' not in sys.modules and 'pydantic' not in sys.modules; "
            "print(light, callable(mlopt.run), callable(mlopt.export), mlopt.Recipe.__name__, mlopt.prune.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True", "Recipe", "prune"]
    import mlopt.run.runner  # the package of the same name stays callable once its modules are imported

    assert callable(mlopt.run) and mlopt.run.runner.run_recipe is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        mlopt.nothing


def test_step_function_on_a_module_returns_the_new_module_and_keeps_the_callers(tmp_path):
    model = _model()
    result = mlopt.prune(model, X, ratio=0.5, measure_latency=False)
    assert result.out is None  # a torch result: nothing kept on disk
    assert result.model[0].out_channels == 8 and model[0].out_channels == 16
    metrics = result.report["step"]["metrics"]
    assert metrics["macs_ratio"] == pytest.approx(2.0, rel=0.05) and metrics["params_before"] > metrics["params_after"]
    assert result.report["step"]["output"]["lineage"] == ["prune"]

    saved = mlopt.prune(model, X, ratio=0.5, measure_latency=False, out=tmp_path / "pruned")
    meta = json.loads((tmp_path / "pruned" / "model.json").read_text())
    assert meta["builder"]["spec"] is None and meta["builder"]["module"] == "torch.nn.modules.container.Sequential"
    assert torch.equal(saved.model[0].weight, result.model[0].weight)  # the same pruning, saved
    from mlopt.runtime.artifacts import load_artifact

    with pytest.raises(InputError, match="built in Python .*cannot rebuild"):
        load_artifact(tmp_path / "pruned")


@pytest.mark.parametrize("call, message", [
    (lambda: mlopt.prune(_model(), X, ratioo=0.5), r"mlopt.prune\(\): steps.0.prune.ratioo: unknown key \(did you mean ratio"),
    (lambda: mlopt.prune(_model(), X), "needs exactly one of ratio"),
    (lambda: mlopt.prune(_model()), "give example_input"),
    (lambda: mlopt.prune(_model(), torch.zeros(8), ratio=0.5), "no batch axis"),
    (lambda: mlopt.prune(42, X, ratio=0.5), "not int"),
    (lambda: mlopt.eval(_model(), X), "needs data"),
    (lambda: mlopt.prune(_model(), torch.zeros(1, 3, 8, 8), ratio=0.5), "rejects input of shape 1x3x8x8"),
    (lambda: mlopt.step("quantize", _model(), X), "unknown step type 'quantize'"),
    (lambda: mlopt.run(42), "takes a Recipe, a mapping or a YAML file's path"),
])
def test_errors_raise_input_errors(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=message):
        call()
    assert list(tmp_path.iterdir()) == []


def test_run_takes_a_recipe_a_mapping_or_a_yaml_path(tmp_path):
    raw = {"version": 1, "model": {"spec": f"{TOY}:tiny_cnn"}, "data": {"source": "digits"},
           "steps": [{"type": "eval"}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    from_dict = mlopt.run({**raw, "gates": {"max_size_mb": 0.001}})
    assert from_dict.out is None and from_dict.report["kind"] == "run" and not from_dict.passed
    assert from_dict.gates[0]["gate"] == "max_size_mb" and from_dict.gates[0]["passed"] is False
    from_file = mlopt.run(path, out=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "report.json").read_text())["recipe_file"] == str(path)
    from_model = mlopt.run(mlopt.Recipe.model_validate(raw))
    assert from_model.passed and from_model.gates is None
    accuracies = {r.report["steps"][0]["metrics"]["accuracy"] for r in (from_dict, from_file, from_model)}
    assert len(accuracies) == 1 and isinstance(from_model.model, nn.Module)


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    (macs_ratio, torch_accuracy), (onnx_file,), (passed, onnx_accuracy) = printed
    assert float(macs_ratio) == pytest.approx(2.0, rel=0.05) and float(torch_accuracy) > 0.5
    assert onnx_file == "runs/py-export/model.onnx" and (tmp_path / onnx_file).is_file()
    assert passed == "True" and abs(float(onnx_accuracy) - float(torch_accuracy)) <= 1 / 360  # one sample



def test_run_without_out_keeps_the_onnx_model_it_made():
    import shutil

    raw = {"version": 1, "model": {"spec": f"{TOY}:tiny_cnn", "input_shape": "1x1x8x8"},
           "steps": [{"type": "export", "exporter": "torchscript"}]}
    result = mlopt.run(raw)
    try:
        assert Path(result.model).is_file() and Path(result.model).parent == result.out / "01-export"
    finally:
        shutil.rmtree(result.out.parent)
