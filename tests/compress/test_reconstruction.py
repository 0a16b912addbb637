"""Data-aware structured pruning: activation importance and the least-squares refit (compress/lib/reconstruction.py)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.compress.lib.pruning import prune_safely
from mlopt.compress.lib.calibration import Calibration
from mlopt.compress.lib.importance import measure_energy
from mlopt.compress.prune import PruneConfig

from conftest import TOY

runner = CliRunner()


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _cal(reconstruct, n=256):
    torch.manual_seed(1)
    return Calibration(batches=[torch.randn(64, 8) for _ in range(n // 64)], reconstruct=reconstruct)


def _prune(model, importance, cal):
    cfg = PruneConfig(ratio=0.5, importance=importance)
    if importance == "activation":
        measure_energy(model, cal)
    return prune_safely(model, (8,), cfg, 0.5, None, ["fc2"], cal=cal).module


def _error(model, pruned):
    torch.manual_seed(2)
    x = torch.randn(512, 8)
    with torch.no_grad():
        return float((model(x) - pruned(x)).abs().max()), float(model(x).abs().max())


def test_activation_importance_cuts_the_channels_the_data_never_reaches():
    """Half the hidden channels are dead on the data (a large negative bias: ReLU gives 0) but have the larger
    weights, so weight magnitude keeps them and cuts live ones; the activation score cuts the dead ones, and the
    pruned model computes what the original does."""
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[8:] *= 4
        model.fc1.bias[8:] = -100.0
        model.fc2.weight[:, 8:] *= 4
    by_activation = _prune(model, "activation", _cal(False))
    by_magnitude = _prune(model, "l1", None)
    assert by_activation.fc1.out_features == by_magnitude.fc1.out_features == 8
    error, scale = _error(model, by_activation)
    assert error < 1e-5 * scale
    assert _error(model, by_magnitude)[0] > 0.1 * scale


def test_the_refit_gives_the_next_layer_what_the_cut_channels_carried():
    """The cut channels are half of the kept ones (channel 8+i is 0.5 x channel i, exactly, through ReLU): a refit
    of fc2 on calibration inputs folds them into the kept columns and the output comes back, where cutting alone
    loses it."""
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[8:] = 0.5 * model.fc1.weight[:8]
        model.fc1.bias[8:] = 0.5 * model.fc1.bias[:8]
        model.fc2.weight[:, 8:] = 0.3 * model.fc2.weight[:, :8]  # smaller: magnitude cuts these
    cal = _cal(True)
    refitted = _prune(model, "l1", cal)
    cut_only = _prune(model, "l1", None)
    assert refitted.fc1.out_features == cut_only.fc1.out_features == 8
    assert cal.refitted == ["fc2"]
    assert torch.equal(refitted.fc1.weight, model.fc1.weight[:8])  # what feeds the cut channels is untouched
    error, scale = _error(model, refitted)
    lost, _ = _error(model, cut_only)
    assert lost > 0.05 * scale
    assert error < 0.05 * lost


def test_reconstruct_needs_data_and_structured_pruning(tmp_path):
    result = runner.invoke(app, ["prune", "--model", f"{TOY}:tiny_cnn", "--input-shape", "1x1x8x8", "--ratio", "0.5",
                                 "--reconstruct", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--reconstruct reads the model's inputs (labels unused): give --data" in result.output
    result = runner.invoke(app, ["prune", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--sparsity",
                                 "unstructured", "--ratio", "0.5", "--reconstruct", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "does not apply to unstructured sparsity" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_reconstruct_on_a_cnn_says_it_found_nothing_to_refit(tmp_path):
    """A convolution's channels pass a batch norm before the next layer: no Linear alone reads them, so nothing is
    refitted, and the report says so instead of claiming a refit."""
    out = tmp_path / "p"
    result = runner.invoke(app, ["prune", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--ratio", "0.5",
                                 "--importance", "activation", "--reconstruct", "--calibration-samples", "64",
                                 "--no-latency", "--out", str(out)])
    assert result.exit_code == 0, result.output
    step = json.loads((out / "report.json").read_text())["step"]
    assert step["metrics"]["refitted_linears"] == 0 and step["metrics"]["calibration_samples"] == 64
    assert "--reconstruct found no Linear that alone reads pruned channels: nothing was refitted" in step["notes"]
