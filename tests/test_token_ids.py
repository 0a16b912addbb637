"""Models whose input is integer token ids read by an nn.Embedding (users' own text models, not hf: ones): found
by their embedding, traced, exported, timed and calibrated on valid ids, and fed ids from .npz or random data."""

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.runtime.artifacts import load_artifact
from mlopt.runtime.models import VOCAB_KEY, input_vocabulary, probe_output
from user_models import positions_only, token_cnn, token_transformer, two_heads, two_tables

USER = "tests/user_models.py"
runner = CliRunner()


def _step(*args):
    result = runner.invoke(app, [*map(str, args), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _ids_npz(path, vocab=50, n=240, length=16, classes=4, seed=0):
    """Labelled ids: class c has token c among random others."""
    rng = np.random.default_rng(seed)
    x = rng.integers(classes, vocab, (n, length))
    y = rng.integers(0, classes, n)
    x[np.arange(n), rng.integers(0, length, n)] = y
    np.savez(path, x=x, y=y)
    return path


def test_the_vocabulary_is_that_of_the_embeddings_the_input_reaches():
    assert input_vocabulary(token_cnn(), (16,)) == 50
    assert input_vocabulary(token_transformer(), (16,)) == 3  # not the position embedding's 64
    assert input_vocabulary(two_tables(), (16,)) == 10  # both tables read the ids: the smaller one bounds them
    assert input_vocabulary(positions_only(), (16, 8)) is None  # its embedding reads positions, not the input
    assert input_vocabulary(two_heads(), (3, 32, 32)) is None
    assert probe_output(token_cnn(), (16,), vocab=50) == 4
    with pytest.raises(Exception, match="the model rejects input of shape 1x16: .*Long, Int"):
        probe_output(token_cnn(), (16,))


@pytest.mark.slow
def test_a_token_model_prunes_exports_and_quantizes_on_made_up_ids(tmp_path):
    # 3 ids: the ids timing makes up for an integer input of unknown meaning (0..4) would index past the table.
    pruned, exported = tmp_path / "p", tmp_path / "e"
    spec = f"{USER}:token_transformer"
    m = _step("prune", "--model", spec, "--input-shape", "1x16", "--ratio", "0.5", "--out", pruned)
    assert m["macs_ratio"] > 1.5
    assert load_artifact(pruned).vocab == 3 and json.loads((pruned / "model.json").read_text())["input_vocabulary"] == 3
    m = _step("export", "--model", pruned, "--out", exported)
    assert m["max_abs_error"] < 1e-3
    graph = onnx.load(str(exported / "model.onnx"))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert {p.key: p.value for p in graph.metadata_props}[VOCAB_KEY] == "3"
    m = _step("ptq", "--model", exported, "--data", "random:16", "--out", tmp_path / "q", "-n", "6")
    assert m["budget"].startswith("mean cosine") and m["cosine_mean"] >= 0.99
    assert _step("bench", str(tmp_path / "q"), "-b", "4", "-n", "3")


@pytest.mark.slow
def test_labelled_ids_from_npz_train_prune_and_quantize_in_a_recipe(tmp_path):
    import yaml

    data = _ids_npz(tmp_path / "ids.npz", n=600)
    recipe = {"version": 1, "model": {"spec": f"{USER}:token_cnn"},
              "data": {"source": f"npz:{data}", "batch_size": 32},
              "steps": [{"type": "train", "epochs": 5, "lr": 0.01},
                        {"type": "prune", "ratio": 0.5, "finetune_epochs": 2},
                        {"type": "ptq", "iterations": 6}, {"type": "eval"}],
              "gates": {"max_accuracy_drop": 0.1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    steps = {s["type"]: s for s in report["steps"]}
    assert steps["train"]["metrics"]["accuracy"] > 0.9  # it learnt from the ids
    assert steps["eval"]["metrics"]["accuracy"] > 0.85 and report["gates"]["passed"]
    # ptq calibrated and scored its INT8 candidates on the ids (which it keeps depends on this machine's timing)
    assert steps["ptq"]["metrics"]["accuracy"] > 0.85 and steps["prune"]["metrics"]["macs_ratio"] > 1.5


@pytest.mark.parametrize("values,message", [
    (np.full((40, 16), 2.5), "holds 2.5: give whole numbers 0..49"),
    (np.full((40, 16), 50), "holds 50: give whole numbers 0..49"),
    (np.full((40, 16), -1), "holds -1: give whole numbers 0..49"),
])
def test_data_that_are_not_ids_below_the_vocabulary_are_refused_in_one_line(tmp_path, values, message):
    np.savez(tmp_path / "x.npz", x=values, y=np.arange(40) % 4)
    result = runner.invoke(app, ["eval", "--model", f"{USER}:token_cnn", "--data", f"npz:{tmp_path / 'x.npz'}"])
    assert result.exit_code == 2 and message in result.stderr and "embedding of 50" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_images_for_a_token_model_are_refused_in_one_line(tmp_path):
    result = runner.invoke(app, ["eval", "--model", f"{USER}:token_cnn", "--data", "digits"])
    assert result.exit_code == 2 and "the model rejects input of shape 1x1x8x8" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_forged_vocabulary_in_model_json_is_refused(tmp_path):
    out = tmp_path / "p"
    _step("prune", "--model", f"{USER}:token_cnn", "--input-shape", "1x16", "--ratio", "0.5", "--no-latency",
          "--out", out)
    meta = json.loads((out / "model.json").read_text())
    meta["input_vocabulary"] = "many"
    (out / "model.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["export", "--model", str(out), "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "input_vocabulary must be a positive integer" in result.stderr


@pytest.mark.parametrize("teacher,student,ok", [
    ("token_cnn", "token_cnn", True),
    ("token_cnn", "small_vocab_cnn", True),  # the data is the student's: ids below 7, which the teacher reads
    ("small_vocab_cnn", "token_cnn", False),  # ids below 50 for a teacher of 7
    ("float_mlp", "token_cnn", False),
])
def test_teacher_and_student_must_read_the_same_ids(tmp_path, teacher, student, ok):
    args = ["distill", "--teacher", f"{USER}:{teacher}", "--data", "random:16", "--student", f"{USER}:{student}",
            "--epochs", "1", "--out", str(tmp_path / "d"), "--quiet"]
    result = runner.invoke(app, args)
    if ok:
        assert result.exit_code == 0, result.output
        assert load_artifact(tmp_path / "d").vocab == (50 if student == "token_cnn" else 7)
    else:
        assert result.exit_code == 2 and "teacher and student must read the same inputs" in result.stderr
        assert "the teacher reads" in result.stderr


def _onnx_elsewhere(module, path):
    """An ONNX file mlopt did not write: an int64 input, no vocabulary in its metadata."""
    import torch

    torch.onnx.export(module.eval(), (torch.zeros(2, 16, dtype=torch.long),), str(path), dynamo=False,
                      input_names=["ids"], dynamic_axes={"ids": {0: "batch"}})
    return path


def test_an_onnx_model_from_elsewhere_takes_its_vocabulary_from_the_table_its_input_indexes(tmp_path):
    path = _onnx_elsewhere(token_cnn(), tmp_path / "m.onnx")
    assert load_artifact(path).vocab == 50
    m = json.loads(runner.invoke(app, ["eval", "--model", str(path), "--data", f"npz:{_ids_npz(tmp_path / 'i.npz')}",
                                       "--json", "--quiet"]).stdout)
    assert 0 <= m["accuracy"] <= 1 and m["samples"] == 48
    np.savez(tmp_path / "f.npz", x=np.full((40, 16), 0.5), y=np.arange(40) % 4)
    result = runner.invoke(app, ["eval", "--model", str(path), "--data", f"npz:{tmp_path / 'f.npz'}"])
    assert result.exit_code == 2 and "holds 0.5: give whole numbers 0..49" in result.stderr


def test_an_onnx_model_from_elsewhere_with_an_integer_input_and_no_table_refuses_random_data(tmp_path):
    from user_models import CastIds

    path = _onnx_elsewhere(CastIds(), tmp_path / "m.onnx")
    assert load_artifact(path).vocab is None
    result = runner.invoke(app, ["eval", "--model", str(path), "--data", "random:16"])
    assert result.exit_code == 2 and "integer inputs (token ids?) and records no vocabulary" in result.stderr
    np.savez(tmp_path / "f.npz", x=np.full((40, 16), 0.5), y=np.arange(40) % 4)
    result = runner.invoke(app, ["eval", "--model", str(path), "--data", f"npz:{tmp_path / 'f.npz'}"])
    assert result.exit_code == 2 and "holds 0.5: give whole numbers 0 or more" in result.stderr


@pytest.mark.parametrize("value", ["\u00b2", "9" * 5000, "0", "-3", "many"])
def test_a_forged_vocabulary_in_onnx_metadata_is_ignored(tmp_path, value):
    import onnxruntime as ort

    from mlopt.runtime.session import synthetic_feed

    path = _onnx_elsewhere(token_cnn(), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {VOCAB_KEY: value})
    onnx.save(model, str(path))
    assert load_artifact(path).vocab == 50  # from the table, not the forged value
    feed = synthetic_feed(ort.InferenceSession(str(path)), 2, (16,), np.random.default_rng(0))
    assert feed["ids"].dtype == np.int64 and 0 <= feed["ids"].min() and feed["ids"].max() < 5


def test_labelled_distillation_refuses_a_teacher_that_cannot_read_the_ids(tmp_path):
    data = _ids_npz(tmp_path / "ids.npz")  # ids below 50, labelled: the labelled branch of distill
    args = ["distill", "--teacher", f"{USER}:small_vocab_cnn", "--student", f"{USER}:token_cnn", "--data",
            f"npz:{data}", "--epochs", "1", "--out", str(tmp_path / "d")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "the teacher reads token ids below 7, but the data holds token ids below 50" in result.stderr


def test_a_folder_written_before_the_vocabulary_was_recorded_is_probed_again(tmp_path):
    out = tmp_path / "p"
    _step("prune", "--model", f"{USER}:token_cnn", "--input-shape", "1x16", "--ratio", "0.5", "--no-latency",
          "--out", out)
    meta = json.loads((out / "model.json").read_text())
    del meta["input_vocabulary"]
    (out / "model.json").write_text(json.dumps(meta))
    assert load_artifact(out).vocab == 50


@pytest.mark.slow
def test_static_ptq_calibrates_an_int32_input_from_elsewhere_in_its_own_type(tmp_path):
    import torch

    class Int32Ids(torch.nn.Module):  # a model from elsewhere whose ids are int32
        def __init__(self):
            super().__init__()
            self.net = token_cnn()

        def forward(self, ids):
            return self.net(ids.long())

    path = tmp_path / "m.onnx"
    torch.onnx.export(Int32Ids().eval(), (torch.zeros(2, 16, dtype=torch.int32),), str(path), dynamo=False,
                      input_names=["ids"], dynamic_axes={"ids": {0: "batch"}})
    m = _step("ptq", "--model", path, "--data", f"npz:{_ids_npz(tmp_path / 'i.npz')}", "--mode", "static",
              "--out", tmp_path / "q", "-n", "3", "-b", "1")
    assert m["quantized"] or m["chosen"] != "FP32"
