from pathlib import Path

import pytest

from mlopt.core.errors import InputError
from mlopt.run.recipe import load_recipe, recipe_from_dict, recipe_to_yaml

ROOT = Path(__file__).parent.parent

BASE = {"version": 1, "model": {"spec": "torchvision:resnet18"}, "data": {"source": "digits"}, "steps": [{"type": "train"}]}


def test_defaults_are_typed():
    r = recipe_from_dict(BASE, "t")
    assert r.steps[0].type == "train" and r.steps[0].epochs == 5


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"steps": [{"type": "train", "epochs": 3, "epoch": 4}]}, r"steps\.0\.train\.epoch: unknown key \(did you mean epochs"),
        ({"steps": [{"type": "quantize"}]}, "unknown step type 'quantize'; expected one of bench, distill, eval, export, prune, ptq, qat, train"),
        ({"steps": [{"type": "prun"}]}, r"unknown step type 'prun' \(did you mean prune\?\)"),
        ({"steps": [{"type": "train", "epochs": 0}]}, r"epochs: Input should be greater than 0"),
        ({"steps": []}, "steps"),
        ({"version": 2}, "version"),
        ({"modle": {"spec": "x"}}, "modle: unknown key"),
        # options a step would not use are errors, not silently dropped
        ({"steps": [{"type": "prune", "ratio": 0.5, "finetune": {"epochs": 3}}]}, "set finetune_epochs"),
        ({"steps": [{"type": "ptq", "per_channel": False}]}, "per_channel apply to mode static or dynamic"),
        ({"steps": [{"type": "ptq", "mode": "dynamic", "calibration": "entropy"}]}, "dynamic quantization has no"),
        ({"steps": [{"type": "bench", "iterations": 50, "duration_s": 2}]}, "iterations or duration_s, not both"),
        ({"steps": [{"type": "qat", "shard": True}]}, "qat does not shard"),
    ],
)
def test_invalid_recipes(patch, match):
    with pytest.raises(InputError, match=match):
        recipe_from_dict({**BASE, **patch}, "r.yaml")


def test_training_steps_take_shard():
    r = recipe_from_dict({**BASE, "steps": [
        {"type": "train", "shard": True},
        {"type": "prune", "ratio": 0.5, "finetune_epochs": 1, "finetune": {"shard": True}},
        {"type": "distill", "teacher": "t", "shard": True, "shard_teacher": True},
    ]}, "r.yaml")
    assert r.steps[0].shard and r.steps[1].finetune.shard and r.steps[2].shard and r.steps[2].shard_teacher
    assert not recipe_from_dict(BASE, "r.yaml").steps[0].shard  # replicated unless asked


def test_env_interpolation(monkeypatch):
    monkeypatch.setenv("MLOPT_TEST_EPOCHS_SOURCE", "digits")
    r = recipe_from_dict({**BASE, "data": {"source": "${MLOPT_TEST_EPOCHS_SOURCE}"}}, "t")
    assert r.data.source == "digits"
    with pytest.raises(InputError, match="MLOPT_UNSET_VAR is not set"):
        recipe_from_dict({**BASE, "data": {"source": "${MLOPT_UNSET_VAR}"}}, "t")


def test_yaml_errors_name_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nmodel: {spec: x\nsteps: []\n")
    with pytest.raises(InputError, match=r"r\.yaml:\d+:\d+: invalid YAML"):
        load_recipe(path)


def test_errors_name_file_line_column_and_close_names(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nmodel:\n  spec: torchvision:resnet18\nsteps:\n  - type: train\n    epoch: 3\n"
                    "gates:\n  min_sped: 2\n")
    with pytest.raises(InputError) as info:
        load_recipe(path)
    text = str(info.value)
    assert f"{path}:6:5: steps.0.train.epoch: unknown key (did you mean epochs" in text
    assert f"{path}:8:3: gates.min_sped: unknown key (did you mean min_speedup" in text


def test_yaml_roundtrip(tmp_path):
    r = recipe_from_dict({**BASE, "steps": [{"type": "train", "epochs": 2}, {"type": "bench", "batch_sizes": [1, 8]}]}, "t")
    path = tmp_path / "r.yaml"
    path.write_text(recipe_to_yaml(r))
    assert load_recipe(path) == r


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path, monkeypatch):
    monkeypatch.setenv("IMAGES", "/data/images")
    monkeypatch.setenv("WEIGHTS", "/data/weights.pt")
    monkeypatch.setenv("MODEL", "/data/encoder")
    monkeypatch.setenv("TEXT", "/data/lines.txt")
    recipe = load_recipe(path)
    assert recipe.steps and recipe.gates is not None and recipe.gates.any()


def test_ci_example_runs_the_documented_commands():
    workflow = (ROOT / "examples" / "ci" / "mlopt.yml").read_text()
    assert "mlopt run recipes/quickstart.yaml --out runs/ci --junit runs/gates.xml" in workflow
    assert "GITHUB_STEP_SUMMARY" in workflow
