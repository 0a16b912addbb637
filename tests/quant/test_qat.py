import json

import onnx
import pytest
from typer.testing import CliRunner

from mlopt.cli.main import app

runner = CliRunner()


def test_qat_exports_fully_fused_int8(trained_dir, tmp_path):
    out = tmp_path / "q"
    result = runner.invoke(app, ["qat", "--model", str(trained_dir), "--data", "digits", "--epochs", "1",
                                 "--lr", "0.001", "--bench-batch-size", "1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    # every Conv and Gemm of the tiny CNN runs as an integer kernel after onnxruntime's optimisation
    assert m["integer_kernels"] == 3 and m["float_kernels"] == 0
    assert m["simulation_top1_agreement"] >= 0.95
    assert abs(m["accuracy"] - m["simulated_accuracy"]) <= 0.05
    assert m["accuracy"] > 0.5
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out / "model.onnx")).graph.node)
    ev = runner.invoke(app, ["eval", "--model", str(out), "--data", "digits", "--json"])
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(m["accuracy"])
    report = json.loads((out / "report.json").read_text())["step"]
    assert report["output"]["lineage"] == ["train", "qat"] and len(report["history"]) == 1


def test_qat_needs_a_torch_model(exported_dir, tmp_path):
    result = runner.invoke(app, ["qat", "--model", str(exported_dir), "--data", "digits", "--out", str(tmp_path / "q")])
    assert result.exit_code == 2 and "qat trains a PyTorch model" in result.stderr
    assert not (tmp_path / "q").exists()


def test_simulation_is_removed_and_weights_stay_plain():
    import torch

    from mlopt.quant.qat import Simulation
    from toy_models import tiny_cnn

    m = tiny_cnn()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sim = Simulation(m, 0.9)
    sim.calibrate([torch.randn(8, 1, 8, 8)])
    with torch.no_grad():
        simulated = m(torch.randn(4, 1, 8, 8))
    assert simulated.shape == (4, 10)
    w = m.classifier.weight  # fake-quantized: at most 255 distinct values per output row
    assert all(len(torch.unique(row)) <= 255 for row in w)
    sim.remove()
    assert m.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
