"""Models whose output is not logits (batch, classes): a segmentation map, a feature map, an image, or several
tensors (a tuple or dict: detection heads, several tasks). They prune, export and quantize, compared by their
outputs; labels, which cannot score them, are refused or left unused, and the user is told which."""

import json

import pytest
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.runtime.artifacts import load_artifact
from mlopt.runtime.models import probe_output, probe_output_shapes
from user_models import two_heads, unet

USER = "tests/user_models.py"
runner = CliRunner()


def test_the_probe_gives_dense_and_several_outputs_no_classes():
    import torch

    assert probe_output_shapes(unet(), (3, 32, 32)) == [(1, 4, 32, 32)]
    assert probe_output(unet(), (3, 32, 32)) is None
    assert probe_output_shapes(two_heads(), (3, 32, 32)) == [(1, 10), (1, 4)]
    assert probe_output(two_heads(), (3, 32, 32)) is None
    with pytest.raises(Exception, match=r"must return tensors with a batch axis .* it returned 1 for a batch of 1"):
        probe_output(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 1), torch.nn.Flatten(0)),
                     (3, 32, 32))


def _step(*args):
    """Run one mlopt command with --json --quiet; its metrics."""
    result = runner.invoke(app, [*map(str, args), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_a_unet_prunes_exports_and_quantizes_by_its_outputs(tmp_path):
    import torch

    pruned, onnx_dir = tmp_path / "p", tmp_path / "e"
    assert _step("prune", "--model", f"{USER}:unet", "--data", "random:3x32x32", "--ratio", "0.5", "--out",
                 pruned)["macs_ratio"] > 2
    module = load_artifact(pruned).module.eval()
    with torch.no_grad():
        assert tuple(module(torch.randn(2, 3, 32, 32)).shape) == (2, 4, 32, 32)  # the output layer kept its width
    assert _step("export", "--model", pruned, "--out", onnx_dir)["max_abs_error"] < 1e-3
    m = _step("ptq", "--model", onnx_dir, "--data", "random:3x32x32", "--out", tmp_path / "q", "-n", "6")
    assert m["budget"].startswith("mean cosine") and "accuracy" not in m



@pytest.mark.slow
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
    assert len(errors) == 1 and "returns 1x10x32x32, not one logits tensor (batch, classes)" in errors[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("factory", ["two_heads", "dict_heads"])
@pytest.mark.slow
def test_a_model_with_several_outputs_prunes_exports_every_output_and_quantizes(factory, tmp_path):
    """A tuple (class logits and a box) or a dict of them: both heads keep their widths, every output is an ONNX
    output checked for parity, and ptq's fidelity is the least faithful output's."""
    import onnx
    import torch

    pruned, onnx_dir = tmp_path / "p", tmp_path / "e"
    assert _step("prune", "--model", f"{USER}:{factory}", "--data", "random:3x16x16", "--ratio", "0.5", "--out",
                 pruned)["macs_ratio"] > 1.5
    module = load_artifact(pruned).module.eval()
    with torch.no_grad():
        out = module(torch.randn(2, 3, 16, 16))
    heads = out if isinstance(out, tuple) else tuple(out.values())
    assert [tuple(t.shape) for t in heads] == [(2, 10), (2, 4)]
    assert _step("export", "--model", pruned, "--out", onnx_dir)["top1_agreement"] is None
    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["output_0", "output_1"]
    assert all(o.type.tensor_type.shape.dim[0].dim_param for o in graph.output)  # both with a dynamic batch
    m = _step("ptq", "--model", onnx_dir, "--data", "random:3x16x16", "--out", tmp_path / "q", "-n", "6", "-b", "1",
              "-b", "4")
    assert m["budget"].startswith("mean cosine")


def test_fidelity_is_the_least_faithful_outputs(tmp_path):
    """ptq's cosine of a model with two outputs is each sample's lower one: a drifting box head is not hidden by
    faithful class logits."""
    import numpy as np

    from mlopt.quant.lib.quantize import Quality

    q = Quality.__new__(Quality)
    q.labeled, q.batches = False, [(np.zeros((2, 3)), None)]
    q.reference = [[np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 1.0], [1.0, 1.0]])]]
    drifted = [[np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, -1.0], [1.0, 1.0]])]]
    m = q.metrics(drifted)
    assert m["cosine_min"] == pytest.approx(0.0) and m["cosine_mean"] == pytest.approx(0.5)


@pytest.mark.slow
def test_a_recipe_gates_a_dense_model_on_its_cosine(tmp_path):
    """min_cosine gates any model compared on unlabelled data: a U-Net pruned and quantized in CI."""
    for threshold, code in ((0.5, 0), (1.0, 3)):  # pruned, the U-Net is not exactly the original
        recipe = tmp_path / f"r{code}.yaml"
        recipe.write_text(f"""model: {{spec: "{USER}:unet", input_shape: 1x3x32x32}}
data: {{source: "random:3x32x32", samples: 32}}
steps:
  - {{type: prune, ratio: 0.25}}
  - {{type: ptq, iterations: 6, batch_sizes: [1]}}
gates: {{min_cosine: {threshold}, batch_size: 1, iterations: 6}}
""")
        out = tmp_path / f"o{code}"
        result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
        assert result.exit_code == code, result.output
        gate = json.loads((out / "report.json").read_text())["gates"]["results"][0]
        assert gate["gate"] == "min_cosine" and 0.5 < gate["measured"] <= 1.0 and gate["passed"] == (code == 0), gate


@pytest.mark.slow
def test_a_pruned_unet_is_distilled_back_towards_the_original_on_the_datas_inputs(tmp_path):
    """prune then distil, on labelled images whose labels a map cannot use: the student learns the unpruned
    U-Net's maps on the images; the report gives the cosine before and after."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""model: {{spec: "{USER}:unet"}}
data: {{source: digits, channels: 3, image_size: 32}}
steps:
  - {{type: prune, ratio: 0.5, importance: activation, measure_latency: false}}
  - {{type: distill, epochs: 2, lr: 0.001}}
""")
    out = tmp_path / "o"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    step = json.loads((out / "02-distill" / "report.json").read_text())["step"]
    m = step["metrics"]
    assert 0 < m["cosine_before"] < 1 and m["cosine"] >= m["cosine_before"], m
    assert any("learned the teacher's outputs on digits" in n for n in step["notes"]), step["notes"]
