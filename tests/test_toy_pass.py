"""Acceptance: a new step type is one new module (tests/toy_pass.py). Imported, or named in
MLOPT_PASSES, it is in the recipe schema, runs in `mlopt run` and in the Python API, and its metric
and section are in report.json and report.md."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.core.contracts import PASSES

from conftest import TESTS, TOY

TYPE = "toy_scale"


@pytest.fixture(scope="module")
def toy_pass():
    """The toy module imported (registering its step type), and unregistered again afterwards."""
    from mlopt.run import recipe

    assert TYPE not in PASSES
    module = importlib.import_module("toy_pass")
    yield module
    del PASSES[TYPE]
    sys.modules.pop("toy_pass")
    recipe._add_step_type(None)  # the recipe's step union without the toy type


def _recipe(tmp_path, factor=2.0):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": {"spec": f"{TOY}:tiny_cnn", "input_shape": "1x1x8x8"},
                                    "steps": [{"type": TYPE, "factor": factor}]}))
    return path


def _initial_model():
    from toy_models import tiny_cnn

    torch.manual_seed(0)  # the recipe's model seed
    return tiny_cnn()


@pytest.fixture(scope="module")
def toy_run(toy_pass, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    result = CliRunner().invoke(app, ["run", str(_recipe(out.parent)), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def test_toy_step_is_in_the_recipe_schema_and_validated(toy_pass, tmp_path):
    result = CliRunner().invoke(app, ["recipe", "schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema["$defs"]["ScaleConfig"]["properties"]["factor"]["description"] == "what every parameter is multiplied by"
    refused = CliRunner().invoke(app, ["recipe", "validate", str(_recipe(tmp_path, factor=-1))])
    assert refused.exit_code == 2 and "factor" in refused.stderr and "greater than 0" in refused.stderr


def test_toy_step_runs_in_a_recipe_and_reports_its_metric_and_section(toy_run):
    from mlopt.runtime.artifacts import load_artifact

    report = json.loads((toy_run / "report.json").read_text())
    (step,) = report["steps"]
    assert step["type"] == TYPE and step["config"] == {"type": TYPE, "factor": 2.0}
    assert step["metrics"]["weight_scale"] == pytest.approx(2.0)
    (section,) = step["sections"]
    names = [name for name, _ in _initial_model().named_parameters()]
    assert section["kind"] == "table" and [row[0] for row in section["rows"]] == names
    assert "weight_scale" in (toy_run / "report.md").read_text()
    scaled = load_artifact(toy_run / f"01-{TYPE}").module  # the step's model, saved and reloaded
    for (name, before), after in zip(_initial_model().state_dict().items(), scaled.state_dict().values()):
        if before.is_floating_point() and "running_var" not in name:
            assert torch.allclose(after, 2 * before if "running_mean" not in name else before), name


def test_toy_section_is_rendered_in_report_md(toy_run):
    md = (toy_run / "report.md").read_text()
    assert "toy_scale: sum of |w| per parameter" in md and "classifier.weight" in md


def test_toy_step_is_a_python_api_function(toy_pass):
    import mlopt

    model = _initial_model()
    result = mlopt.toy_scale(model, torch.zeros(1, 1, 8, 8), factor=3)
    assert result.report["step"]["metrics"]["weight_scale"] == pytest.approx(3.0)
    assert torch.allclose(result.model.classifier.weight, 3 * model.classifier.weight)
    assert torch.equal(model.classifier.weight, _initial_model().classifier.weight)  # the caller's module is unchanged


@pytest.mark.slow
def test_toy_step_from_mlopt_passes_in_a_fresh_process(tmp_path):
    env = {**os.environ, "MLOPT_PASSES": "toy_pass",
           "PYTHONPATH": os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mlopt", "run", str(_recipe(tmp_path, 0.5)), "--out", str(out), "--quiet"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    step = json.loads((out / "report.json").read_text())["steps"][0]
    assert step["type"] == TYPE and step["metrics"]["weight_scale"] == pytest.approx(0.5)
    missing = subprocess.run([sys.executable, "-m", "mlopt", "recipe", "validate", str(tmp_path / "toy.yaml")],
                             env={**env, "MLOPT_PASSES": "no_such_module"}, capture_output=True, text=True)
    assert missing.returncode == 2 and "MLOPT_PASSES: cannot import no_such_module" in missing.stderr


def test_a_plugin_that_redefines_a_built_in_step_type_is_refused(tmp_path, monkeypatch):
    from mlopt.compress.prune import PrunePass
    from mlopt.core.contracts import PASSES
    from mlopt.core.errors import InputError
    from mlopt.run.recipe import import_passes

    (tmp_path / "clash_pass.py").write_text(
        "from mlopt.core.contracts import Pass\n\nclass PrunePass(Pass):\n    name = 'prune'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MLOPT_PASSES", "clash_pass")
    with pytest.raises(InputError, match="MLOPT_PASSES: cannot import clash_pass: TypeError: step type 'prune' is "
                                         "already defined by mlopt.compress.prune"):
        import_passes()
    assert PASSES["prune"] is PrunePass
