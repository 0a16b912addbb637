import json

import pytest
import yaml
from typer.testing import CliRunner

from mlopt.cli.main import app

from conftest import TOY

runner = CliRunner()
TEACHER_ARGS = ["--data", "digits", "--batch-size", "32", "--lr", "0.02", "--quiet"]


def distill(*args):
    return runner.invoke(app, ["distill", *map(str, args)])


def test_logit_distillation_reports_baseline(trained_dir, tmp_path):
    out = tmp_path / "student"
    result = distill("--teacher", trained_dir, "--student", f"{TOY}:tiny_cnn", *TEACHER_ARGS,
                     "--epochs", 2, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert 0.5 < m["accuracy"] <= 1 and 0 < m["baseline_accuracy"] <= 1
    assert m["distillation_gain"] == pytest.approx(m["accuracy"] - m["baseline_accuracy"])
    assert m["teacher_accuracy"] > 0.8
    meta = json.loads((out / "model.json").read_text())
    assert meta["lineage"] == ["distill"] and meta["builder"]["spec"].endswith("tiny_cnn")
    ev = runner.invoke(app, ["eval", "--model", str(out), "--data", "digits", "--json"])
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(m["accuracy"])


def test_feature_distillation_with_projection(trained_dir, tmp_path):
    # The student is narrower than the teacher: a learned 1x1 projection bridges the widths.
    student = tmp_path / "narrow.py"
    student.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom toy_models import TinyCNN\n"
        "def make(num_classes=10):\n    return TinyCNN(num_classes=num_classes, width=8)\n" % str(TOY.parent)
    )
    result = distill("--teacher", trained_dir, "--student", f"{student}:make", *TEACHER_ARGS, "--epochs", 1,
                     "--feature", "features.5:features.5", "--no-baseline", "--out", tmp_path / "s", "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert "baseline_accuracy" not in m and m["accuracy"] > 0.3


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--feature", "features.9:features.5"], "teacher has no layer named 'features.9'"),
        (["--feature", "nonsense"], "must be TEACHER_LAYER:STUDENT_LAYER"),
        (["--alpha", "1.5"], "alpha"),
    ],
)
def test_distill_errors(trained_dir, tmp_path, extra, match):
    result = distill("--teacher", trained_dir, "--student", f"{TOY}:tiny_cnn", *TEACHER_ARGS, "--epochs", 1,
                     *extra, "--out", tmp_path / "s")
    assert result.exit_code == 2 and match in result.stderr
    assert not (tmp_path / "s").exists()


def test_recipe_teacher_defaults_to_model_before_compression(tmp_path):
    recipe = {
        "version": 1,
        "model": {"spec": f"{TOY}:tiny_cnn"},
        "data": {"source": "digits", "batch_size": 32},
        "steps": [
            {"type": "train", "epochs": 2, "lr": 0.02},
            {"type": "distill", "student": f"{TOY}:tiny_cnn", "epochs": 1, "lr": 0.02, "baseline": False},
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    train_acc = report["steps"][0]["metrics"]["accuracy"]
    d = report["steps"][1]
    assert d["metrics"]["teacher_accuracy"] == pytest.approx(train_acc)
    assert str(out / "01-train") in d["notes"][0]


def test_distill_without_teacher_is_an_error(tmp_path):
    recipe = {"version": 1, "model": {"spec": f"{TOY}:tiny_cnn"}, "data": {"source": "digits"},
              "steps": [{"type": "distill", "epochs": 1}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "distill needs a teacher" in result.stderr


@pytest.mark.slow
def test_distill_without_labels_learns_the_teachers_outputs_and_refuses_label_options(tmp_path):
    """On unlabelled inputs (random:SHAPE here) the student learns the teacher's outputs; the report gives their
    cosine before and after, and says what random inputs are worth. Options about labels are refused, not ignored."""
    out = tmp_path / "d"
    args = ["distill", "--student", f"{TOY}:tiny_cnn", "--teacher", f"{TOY}:tiny_cnn", "--data", "random:1x8x8",
            "--epochs", "2"]
    result = runner.invoke(app, [*args, "--out", str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert -1 <= m["cosine_before"] <= 1 and m["cosine"] >= m["cosine_before"]  # the better student is handed on
    assert "the inputs are random noise" in result.stderr
    for option, why in ((["--alpha", "0.5"], "alpha is not supported (alpha weighs the labels, and 'random:1x8x8' "
                                             "has none)"),
                        (["--baseline"], "baseline is not supported")):
        refused = runner.invoke(app, [*args, *option, "--out", str(tmp_path / "r")])
        assert refused.exit_code == 2 and why in refused.stderr, refused.output
        assert not (tmp_path / "r").exists()


def test_unlabelled_batches_collate_without_labels():
    import torch
    from torch.utils.data import TensorDataset

    from mlopt.compress.lib.engine import _collate
    from mlopt.runtime.data import _InputsOnly

    x = torch.arange(12.0).reshape(6, 2)
    for dataset in (TensorDataset(x), _InputsOnly(TensorDataset(x, torch.zeros(6, dtype=torch.long)))):
        inputs, labels = _collate(dataset, [4, 1], torch.device("cpu"))
        assert labels is None and inputs.tolist() == [[8.0, 9.0], [2.0, 3.0]]
