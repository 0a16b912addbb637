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


def test_a_linear_too_wide_for_the_memory_left_is_cut_without_a_refit_and_the_report_says_so(tmp_path, monkeypatch):
    """The refit holds a float64 Gram matrix of a Linear's inputs ((C+1)^2 x 8 bytes, twice that at the solve): a
    Linear whose refit would take more than half the memory the machine can give is cut without it, and the report
    names the count and the size instead of claiming a refit. The same command with the memory there refits."""
    import mlopt.compress.lib.reconstruction as reconstruction

    args = ["prune", "--model", f"{TOY}:tiny_vit", "--data", "digits", "--input-shape", "1x1x8x8", "--ratio", "0.5",
            "--importance", "activation", "--reconstruct", "--calibration-samples", "64", "--no-latency"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "room")])
    assert result.exit_code == 0, result.output
    room = json.loads((tmp_path / "room" / "report.json").read_text())["step"]
    assert room["metrics"]["refitted_linears"] > 0 and "linears_too_wide_to_refit" not in room["metrics"]

    # 65 inputs (64 channels and the bias) need 2 x 8 x 65^2 = 67,600 bytes: leave less than twice that
    monkeypatch.setattr(reconstruction, "available_memory", lambda: 100_000)
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "tight")])
    assert result.exit_code == 0, result.output
    tight = json.loads((tmp_path / "tight" / "report.json").read_text())["step"]
    assert tight["metrics"]["refitted_linears"] == room["metrics"]["refitted_linears"] - 2  # the two mlp.2 (64 wide)
    assert tight["metrics"]["linears_too_wide_to_refit"] == 2
    assert any("2 Linears that read pruned channels were not refitted" in n and "67.6 kB" in n
               for n in tight["notes"]), tight["notes"]
    assert reconstruction.refit_bytes(torch.nn.Linear(64, 8)) == 67_600


class Shared(torch.nn.Module):
    """fc2 called twice per forward pass (ALBERT shares its layers so), reading channels two writers make: on the
    first call channel 8+i is half of channel i (a refit folds it back exactly), on the second they are unrelated."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 8)
        with torch.no_grad():
            self.a.weight[8:] = 0.5 * self.a.weight[:8]
            self.a.bias[8:] = 0.5 * self.a.bias[:8]

    def forward(self, x):
        return self.fc2(torch.relu(self.a(x))) + self.fc2(torch.relu(self.b(x)))


def test_a_linear_shared_across_layers_is_refitted_on_every_call():
    """Least squares over both calls' inputs: on held-out inputs, fc2's error summed over its two calls (each
    against the original fc2 on the same input) is well below that of a refit on the first call's inputs only,
    which folds the cut channels back as if every call saw the first writer's channels."""
    import copy

    from mlopt.compress.lib import reconstruction

    torch.manual_seed(0)
    model = Shared().eval()
    cal = Calibration(batches=[torch.randn(64, 8) for _ in range(4)], reconstruct=True)
    cut = list(range(8, 16))
    fits = {}
    for shared in (True, False):
        fits[shared] = copy.deepcopy(model)
        assert reconstruction._refit_one(fits[shared], fits[shared].fc2, cut, cal, shared=shared)

    def fc2_error(fitted):
        seen = {"orig": [], "fit": []}
        hooks = [m.fc2.register_forward_hook(lambda mod, i, o, k=k: seen[k].append((i[0], o)))
                 for m, k in ((model, "orig"), (fitted, "fit"))]
        torch.manual_seed(3)
        with torch.no_grad():
            x = torch.randn(512, 8)
            model(x)
            fitted(x)
        for h in hooks:
            h.remove()
        # each call of the fitted fc2 against the original fc2 on the same input
        with torch.no_grad():
            return sum(float(((model.fc2(i) - o) ** 2).sum()) for i, o in seen["fit"])

    errors = {shared: fc2_error(fit) for shared, fit in fits.items()}
    assert errors[True] < 0.7 * errors[False], errors  # measured 66 against 122
    assert float((fits[True].fc2.weight[:, 8:]).abs().max()) == 0.0
    # refit() counts the calls and takes the shared path by itself
    whole = copy.deepcopy(model)
    reconstruction.refit(whole, {whole.fc2: cut}, cal)
    assert cal.refitted == ["fc2"] and torch.allclose(whole.fc2.weight, fits[True].fc2.weight)
