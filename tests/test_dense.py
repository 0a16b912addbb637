"""Models whose output is not logits (batch, classes): a segmentation map, a feature map, an image. They prune,
export and quantize, compared by their outputs; labels, which cannot score them, are refused or left unused, and
the user is told which."""

import json

import pytest
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.runtime.artifacts import load_artifact
from mlopt.runtime.models import probe_output, probe_output_shape
from user_models import unet, two_heads

USER = "tests/user_models.py"
runner = CliRunner()


def test_the_probe_gives_a_dense_output_no_classes_and_refuses_a_tuple():
    assert probe_output_shape(unet(), (3, 32, 32)) == (1, 4, 32, 32)
    assert probe_output(unet(), (3, 32, 32)) is None
    with pytest.raises(Exception, match="must return one tensor with a batch axis .* it returned tuple"):
        probe_output(two_heads(), (3, 32, 32))


@pytest.mark.slow
def test_a_unet_prunes_exports_and_quantizes_by_its_outputs(tmp_path):
    pruned, onnx_dir, quantized = tmp_path / "p", tmp_path / "e", tmp_path / "q"
    result = runner.invoke(app, ["prune", "--model", f"{USER}:unet", "--data", "random:3x32x32", "--ratio", "0.5",
                                 "--out", str(pruned), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["macs_ratio"] > 2
    import torch

    module = load_artifact(pruned).module.eval()
    with torch.no_grad():
        assert tuple(module(torch.randn(2, 3, 32, 32)).shape) == (2, 4, 32, 32)  # the output layer kept its width
    result = runner.invoke(app, ["export", "--model", str(pruned), "--out", str(onnx_dir), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_abs_error"] < 1e-3
    result = runner.invoke(app, ["ptq", "--model", str(onnx_dir), "--data", "random:3x32x32", "--out", str(quantized),
                                 "-n", "6", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert m["budget"].startswith("mean cosine") and "accuracy" not in m


def test_labelled_data_feeds_a_dense_model_its_inputs_and_says_its_labels_are_unused(tmp_path):
    out = tmp_path / "p"
    result = runner.invoke(app, ["prune", "--model", f"{USER}:unet", "--data", "digits", "--channels", "3",
                                 "--image-size", "32", "--ratio", "0.5", "--importance", "activation", "--out",
                                 str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "the labels of 'digits' are not used" in result.stderr
    metrics = json.loads(result.stdout)
    assert "accuracy" not in metrics and metrics["macs_ratio"] > 2  # activation importance read the digits


@pytest.mark.parametrize("step", [["train", "--epochs", "1"], ["prune", "--ratio", "0.5", "--finetune-epochs", "1"],
                                  ["eval"]])
def test_steps_that_need_labels_refuse_a_dense_model_in_one_line(step, tmp_path):
    out = tmp_path / "o"
    result = runner.invoke(app, [step[0], "--model", f"{USER}:unet", "--data", "digits", "--channels", "3",
                                 "--image-size", "32", *step[1:], "--out", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "returns 1x10x32x32, not logits (batch, classes)" in errors[0], result.stderr
    assert not out.exists()
