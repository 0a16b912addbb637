"""Structured pruning on models mlopt's tests did not know: groups Torch-Pruning cannot prune are kept whole."""

import json

import pytest
import torch
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.compress.lib.pruning import classifier_names, prune_safely, search_ratio
from mlopt.compress.prune import PruneConfig
from mlopt.core.errors import InputError
from mlopt.runtime.artifacts import load_artifact
from user_models import PATTERNS, conv_classifier, pattern_net, user_net

USER = "tests/user_models.py"
runner = CliRunner()


def _params(module):
    return sum(p.numel() for p in module.parameters())


def _outcome(model, shape=(3, 32, 32), ratio=0.5, **config):
    return prune_safely(model.eval(), shape, PruneConfig(ratio=ratio, **config), ratio, None,
                        classifier_names(model, 10, shape))


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.slow
def test_each_user_pattern_prunes_without_help(pattern):
    torch.manual_seed(0)
    model = pattern_net(pattern)
    outcome = _outcome(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = outcome.module.eval()(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    # Torch-Pruning cannot map the residual stream through a swapped split or a fixed width: those groups stay
    # whole, and the widths inside the blocks are pruned
    tangled = pattern in ("swapped_split", "fixed_width")
    assert bool(outcome.kept) == tangled, outcome.kept
    assert _params(outcome.module) * (1.05 if tangled else 1.3) <= _params(model), outcome.kept
    assert _params(model) == sum(p.numel() for p in pattern_net(pattern).parameters())  # the input is not changed


@pytest.mark.slow
def test_a_group_that_breaks_the_forward_is_found_and_kept_whole():
    torch.manual_seed(0)
    outcome = _outcome(pattern_net("fixed_width"))
    reasons = {name: k.reason for name, k in outcome.kept.items()}
    assert any("fails to run" in r for r in reasons.values()), reasons
    assert all(k.layers for k in outcome.kept.values())
    assert outcome.module.block1.conv.out_channels == 32  # the fixed width stays
    assert outcome.module.stem[0].out_channels < 32 or outcome.module.mid[0].out_channels < 32


def test_an_importance_that_raises_keeps_only_its_group_whole(monkeypatch):
    model = pattern_net("depthwise")
    from torch_pruning.pruner.algorithms.base_pruner import BasePruner

    real = BasePruner.estimate_importance

    def flaky(self, group):
        if any(self.DG._module2name.get(dep.target.module) == "mid.0" for dep, _ in group):
            raise IndexError("index 96 is out of bounds for dimension 0 with size 64")
        return real(self, group)

    monkeypatch.setattr(BasePruner, "estimate_importance", flaky)
    outcome = _outcome(model)
    assert {k.reason for k in outcome.kept.values()} == {
        "its importance raised IndexError: index 96 is out of bounds for dimension 0 with size 64"}
    assert all("mid.0" in k.layers for k in outcome.kept.values())  # the two groups that reach mid.0
    assert outcome.module.mid[0].in_channels == 32 and outcome.module.stem[0].out_channels < 32


def test_final_convolution_is_the_classifier():
    model = conv_classifier()
    assert classifier_names(model, None, (3, 16, 16)) == ["4"]
    outcome = _outcome(model, (3, 16, 16))
    assert outcome.module(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
    assert outcome.module[2].out_channels < 64


def test_nothing_prunable_is_refused_naming_the_modules():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    with pytest.raises(InputError, match="nothing can be pruned"):
        _outcome(model, (12,))


@pytest.mark.slow
def test_the_issue_model_prunes_and_exports_with_parity(tmp_path):
    out = tmp_path / "p"
    result = runner.invoke(app, ["prune", "--model", f"{USER}:user_net", "--input-shape", "1x3x64x64", "--ratio", "0.5",
                                 "--no-latency", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["params_ratio"] >= 1.3 and metrics["groups_kept_whole"] >= 1
    assert "groups of layers kept whole" in result.stderr
    step = json.loads((out / "report.json").read_text())["step"]
    table = next(s for s in step["sections"] if s["title"] == "groups kept whole")
    assert len(table["rows"]) == metrics["groups_kept_whole"] and all(row[1] for row in table["rows"])
    exported = runner.invoke(app, ["export", "--model", str(out), "--out", str(tmp_path / "e"), "--json"])
    assert exported.exit_code == 0, exported.output
    parity = json.loads(exported.stdout)
    assert parity["max_abs_error"] <= parity["tolerance"] and parity["parity_samples"] > 0  # else export exits 1
    model = load_artifact(out).module.eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == user_net()(torch.zeros(2, 3, 64, 64)).shape


@pytest.mark.parametrize("spec,shape", [
    ("torchvision:resnet50", "1x3x32x32"),
    ("torchvision:densenet121", "1x3x32x32"),
    ("torchvision:shufflenet_v2_x0_5", "1x3x32x32"),
    ("torchvision:convnext_tiny", "1x3x32x32"),
    ("torchvision:efficientnet_v2_s", "1x3x32x32"),
    ("torchvision:regnet_y_400mf", "1x3x32x32"),
    (f"{USER}:small_vit", "1x3x32x32"),
    (f"{USER}:small_swin", "1x3x64x64"),
    ("torchvision:r3d_18", "1x3x4x32x32"),
    ("torchvision:lraspp_mobilenet_v3_large", "1x3x64x64"),
], ids=lambda v: v.split(":")[-1] if ":" in v else None)
@pytest.mark.slow
def test_torchvision_families_prune_run_and_export(spec, shape, tmp_path):
    """A representative of each torchvision family (benchmarks/prune_torchvision.py runs them all); a video
    classifier (a clip: 1x3xFRAMESxHxW) and a segmentation model (its map, the output dict's "out") too."""
    out = tmp_path / "p"
    result = runner.invoke(app, ["prune", "--model", spec, "--num-classes", "10", "--input-shape", shape, "--ratio", "0.5",
                                 "--no-latency", "--out", str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["macs_ratio"] >= 1.5, metrics
    exported = runner.invoke(app, ["export", "--model", str(out), "--out", str(tmp_path / "e"), "--json", "--quiet"])
    assert exported.exit_code == 0, exported.output
    dims = [int(d) for d in shape.split("x")]
    segmentation = spec.endswith("lraspp_mobilenet_v3_large")
    assert load_artifact(out).module.eval()(torch.zeros(dims)).shape == ((1, 10, *dims[2:]) if segmentation else (1, 10))


def test_unreachable_target_says_groups_were_kept_whole():
    model = pattern_net("swapped_split").eval()
    cfg = PruneConfig(target_macs=0.2)
    with pytest.raises(InputError, match=r"cannot be reached: .* keeps 0\.\d+ of the macs .*groups had to be kept whole"):
        search_ratio(model, (3, 32, 32), cfg, classifier_names(model, 10, (3, 32, 32)))


@pytest.mark.slow
def test_runaway_groups_are_stopped_and_kept_whole():
    """Swin's window reshapes multiply Torch-Pruning's index lists without bound (gigabytes on swin_t)."""
    from user_models import small_swin

    model = small_swin().eval()
    outcome = _outcome(model, (3, 64, 64))
    runaway = [k for k in outcome.kept.values() if "multiply through reshapes" in k.reason]
    assert runaway and all(k.outputs for k in runaway)
    assert outcome.module(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.slow
def test_weight_normed_layers_are_pruned_as_their_plain_weights_and_reload(tmp_path):
    """Torch-Pruning cannot replace a weight that weight norm computes ("attribute 'weight' already exists"): such
    weights are baked into plain ones first (same outputs), and a reload bakes the rebuilt model alike."""
    out = tmp_path / "p"
    result = runner.invoke(app, ["prune", "--model", f"{USER}:weight_normed", "--input-shape", "1x3x16x16",
                                 "--ratio", "0.5", "--out", str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["macs_ratio"] > 2
    meta = json.loads((out / "model.json").read_text())
    assert meta["builder"]["baked"] == ["c1", "c2", "mid"]
    report = json.loads((out / "report.json").read_text())["step"]
    assert any("replaced by the plain weights" in n for n in report["notes"])
    module = load_artifact(out).module
    assert module.c1.weight.shape[0] == 8 and module.c2.weight.shape[0] == 16
    x = torch.randn(2, 3, 16, 16)
    result = runner.invoke(app, ["export", "--model", str(out), "--out", str(tmp_path / "e"), "--json", "--quiet"])
    assert result.exit_code == 0 and json.loads(result.stdout)["max_abs_error"] < 1e-4, result.output
    with torch.no_grad():
        assert module(x).shape == (2, 10)


@pytest.mark.slow
def test_a_forged_baked_list_is_refused_in_one_line(tmp_path):
    from mlopt.runtime.artifacts import _sign

    out = tmp_path / "p"
    assert runner.invoke(app, ["prune", "--model", f"{USER}:weight_normed", "--input-shape", "1x3x16x16",
                               "--ratio", "0.5", "--out", str(out), "--quiet"]).exit_code == 0
    meta = json.loads((out / "model.json").read_text())
    for forged, why in (("c1", "baked must be a list"), (["fc"], "does not reparametrize")):
        meta["builder"]["baked"] = forged
        meta["builder_signature"] = _sign(meta["builder"])  # as this user's own edit: signed, and still refused
        (out / "model.json").write_text(json.dumps(meta))
        with pytest.raises(InputError, match=why):
            load_artifact(out)
