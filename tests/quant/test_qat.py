import json

import onnx
import pytest
from typer.testing import CliRunner

from mlopt.cli.main import app

from conftest import TOY, latency_of, section, table_rows

ERRORS = "simulation vs onnxruntime, per quantized tensor"

runner = CliRunner()


@pytest.mark.slow
def test_qat_exports_fully_fused_int8(trained_dir, tmp_path):
    out = tmp_path / "q"
    result = runner.invoke(app, ["qat", "--model", str(trained_dir), "--data", "digits", "--epochs", "1",
                                 "--lr", "0.001", "--bench-batch-size", "1", "--keep-int8", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert m["quantized"] is True and m["chosen"] in ("start", "trained")
    assert m["accuracy"] == max(m["start_accuracy"], m["trained_accuracy"])
    # every Conv and Gemm of the tiny CNN runs as an integer kernel after onnxruntime's optimisation
    assert m["integer_kernels"] == 3 and m["float_kernels"] == 0
    assert m["unfolded_batchnorms"] == 0  # both batch norms follow a convolution and fold into it
    # every tensor onnxruntime's quantizer picks (the input, both ReLU outputs it folds into the
    # convolutions, the classifier input and the logits) is simulated and handed over
    assert m["simulated_points"] == "onnxruntime's quantized tensors"
    assert m["activation_points"] == m["quantized_tensors"] == m["ranges_handed_to_onnxruntime"] == 5
    assert m["tensors_calibrated_by_onnxruntime"] == 0
    # batch norm folded by onnxruntime, unfolded in the simulation: the same int8 weight codes
    assert m["weight_layers"] == 3 and m["weight_codes_differing"] <= 2
    # the same quantized values in torch and onnxruntime: the input exactly, the others within one
    # quantization step (float rounding at grid boundaries)
    report = json.loads((out / "report.json").read_text())["step"]
    errors = {r["tensor -> read by"]: r for r in table_rows(report, ERRORS)}
    assert list(errors) == ["x -> features.0", "features.2 -> features.3", "features.5 -> features.6",
                            "flatten -> classifier", "classifier -> output"]
    assert errors["x -> features.0"]["end-to-end max steps"] == 0 and errors["x -> features.0"]["SQNR dB"] is None
    assert all(r["end-to-end max steps"] <= 1.01 and r["end-to-end mean steps"] < 0.5 for r in errors.values())
    assert all(r["local max steps"] <= 1.01 and r["local values off %"] < 1 for r in errors.values())
    bars = section(report, ERRORS + " (end to end)")
    assert bars["labels"] == list(errors) and bars["series"]["max error"] == [r["end-to-end max steps"] for r in errors.values()]
    assert not [s for s in report["sections"] if s["title"] == "left in float or outside the simulation"]
    assert m["simulation_top1_agreement"] >= 0.95
    assert abs(m["accuracy"] - m["simulated_accuracy"]) <= 0.05
    assert m["accuracy"] > 0.5
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out / "model.onnx")).graph.node)
    ev = runner.invoke(app, ["eval", "--model", str(out), "--data", "digits", "--json"])
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(m["accuracy"])
    assert report["output"]["lineage"] == ["train", "qat"] and len(section(report, "training history")["rows"]) == 1
    assert set(latency_of(report, "FP32")) == set(latency_of(report, "INT8")) == {1}


def test_qat_needs_a_torch_model(exported_dir, tmp_path):
    result = runner.invoke(app, ["qat", "--model", str(exported_dir), "--data", "digits", "--out", str(tmp_path / "q")])
    assert result.exit_code == 2 and "qat trains a PyTorch model" in result.stderr
    assert "already quantized" not in result.stderr
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_qat_refuses_an_already_quantized_onnx_model(exported_dir, tmp_path):
    ptq = runner.invoke(app, ["ptq", "--model", str(exported_dir), "--data", "digits", "--mode", "static",
                              "--batch-size", "1", "--iterations", "3", "--out", str(tmp_path / "int8"), "--quiet"])
    assert ptq.exit_code == 0, ptq.output
    result = runner.invoke(app, ["qat", "--model", str(tmp_path / "int8"), "--data", "digits", "--out", str(tmp_path / "q")])
    assert result.exit_code == 2
    assert "is an ONNX model that is already quantized (DequantizeLinear" in result.stderr
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1 and not (tmp_path / "q").exists()


def test_simulation_is_removed_and_weights_stay_plain():
    import torch

    from mlopt.quant.lib.simulation import Simulation
    from toy_models import tiny_cnn

    m = tiny_cnn()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sim = Simulation(m, 0.9)
    sim.hook_layer_inputs()
    sim.calibrate([torch.randn(8, 1, 8, 8)])
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        simulated = m(x)
    recorded = sim.record(x)
    assert list(recorded) == ["features.0", "features.3", "classifier"]
    assert len(set(recorded["features.0"].ravel().tolist())) <= 256  # on a uint8 grid
    assert simulated.shape == (4, 10)
    w = m.classifier.weight  # fake-quantized: at most 255 distinct values per output row
    assert all(len(torch.unique(row)) <= 255 for row in w)
    sim.remove()
    assert m.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


QAT = ["qat", "--data", "digits", "--epochs", "2", "--lr", "0.001", "--bench-batch-size", "1", "--batch-size", "32"]


@pytest.mark.parametrize("freeze_bn_after", [0, 1])
@pytest.mark.slow
def test_batchnorm_statistics_update_until_frozen(trained_dir, tmp_path, monkeypatch, freeze_bn_after):
    import torch

    from mlopt.quant import qat

    seen = []
    original = qat.batchnorm_layers

    def spy(module):
        layers = original(module)
        seen.append([(bn, bn.running_mean.clone()) for bn in layers])
        return layers

    monkeypatch.setattr(qat, "batchnorm_layers", spy)
    result = runner.invoke(app, [*QAT, "--model", str(trained_dir), "--freeze-bn-after", str(freeze_bn_after),
                                 "--out", str(tmp_path / "q"), "--quiet"])
    assert result.exit_code == 0, result.output
    (layers,) = seen
    moved = [not torch.equal(bn.running_mean, before) for bn, before in layers]
    assert len(moved) == 2 and all(moved) == bool(freeze_bn_after) and any(moved) == bool(freeze_bn_after)


@pytest.mark.slow
def test_training_that_makes_the_int8_model_worse_hands_back_the_starting_point(trained_dir, tmp_path):
    """A learning rate that wrecks the weights: QAT hands back its calibrated starting point, and says so."""
    out = tmp_path / "q"
    result = runner.invoke(app, [*QAT, "--model", str(trained_dir), "--lr", "3", "--keep-int8", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert m["trained_accuracy"] < m["start_accuracy"] - 0.2  # training did make it worse
    assert m["chosen"] == "start" and m["quantized"] is True
    assert m["accuracy"] == m["start_accuracy"] > 0.8  # the calibrated start: about the FP32 model's top-1
    assert "QAT training LOWERED INT8 top-1" in result.stderr
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out / "model.onnx")).graph.node)
    ev = runner.invoke(app, ["eval", "--model", str(out), "--data", "digits", "--json"])
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(m["start_accuracy"])
    notes = json.loads((out / "report.json").read_text())["step"]["notes"]
    assert any("handed back the calibrated starting point" in n for n in notes)
    # the starting point is PTQ's static min/max model: the same scales, so QAT is never below that PTQ
    ptq = runner.invoke(app, ["ptq", "--model", str(trained_dir), "--data", "digits", "--mode", "static",
                              "--calibration", "minmax", "--iterations", "3", "--out", str(tmp_path / "ptq"), "--json"])
    assert ptq.exit_code == 0, ptq.output
    assert activation_scales(out / "model.onnx") == activation_scales(tmp_path / "ptq" / "model.onnx")
    assert json.loads(ptq.stdout)["accuracy"] == pytest.approx(m["start_accuracy"])


def activation_scales(path):
    """{tensor: (scale, zero point)} of every activation QuantizeLinear of a QDQ model."""
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]])) for n in graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


@pytest.mark.parametrize("flags, changed", [([], {}), (["--keep-int8", "--lr", "0.001"], {"keep_int8": True, "lr": 0.001})])
def test_mlopt_qat_uses_the_config_defaults_unless_told(tmp_path, flags, changed):
    import yaml

    from mlopt.quant.qat import QATConfig

    path = tmp_path / "r.yaml"
    result = runner.invoke(app, ["qat", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--out", str(tmp_path / "q"),
                                 *flags, "--save-recipe", str(path)])
    assert result.exit_code == 0, result.output
    (step,) = yaml.safe_load(path.read_text())["steps"]
    assert QATConfig(**step) == QATConfig(**changed)


def test_the_int8_rule_is_faster_at_every_batch_size():
    from mlopt.quant.lib.quantize import not_faster_at

    assert not_faster_at({1: 0.9, 32: 5.0}, {1: 1.0, 32: 6.0}) == []
    assert not_faster_at({1: 1.1, 32: 5.0}, {1: 1.0, 32: 6.0}) == [1]
    assert not_faster_at({1: 1.0, 32: 6.0}, {1: 1.0, 32: 6.5}) == [1]  # a tie is not faster


def timed_as(monkeypatch, int8_ms):
    """Make the interleaved timing deterministic: FP32 1 ms at every batch size, INT8 `int8_ms`."""
    from mlopt.quant import qat

    calls = []

    def fake(paths, sample_shape, provider, batch_sizes, iterations):
        calls.append([p.name for p in paths])
        return [{b: 1.0 for b in batch_sizes}, {b: int8_ms for b in batch_sizes}]

    monkeypatch.setattr(qat, "interleaved_latency", fake)
    return calls


@pytest.mark.parametrize("int8_ms, flags, quantized", [
    (1.5, [], False),  # INT8 slower: the FP32 model QAT started from comes back
    (1.5, ["--keep-int8"], True),  # unless INT8 is asked for
    (0.5, [], True),  # INT8 faster: kept
])
@pytest.mark.slow
def test_qat_hands_back_fp32_when_int8_is_not_faster(trained_dir, tmp_path, monkeypatch, int8_ms, flags, quantized):
    calls = timed_as(monkeypatch, int8_ms)
    out = tmp_path / "q"
    result = runner.invoke(app, [*QAT, "--model", str(trained_dir), *flags, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    # one timing, of the FP32 model QAT started from against the INT8 model it picked
    assert calls == [["start-fp32.onnx", f"{m['chosen']}-int8.onnx"]]
    assert m["quantized"] is quantized
    int8 = max(m["start_accuracy"], m["trained_accuracy"])
    assert m["accuracy"] == (int8 if quantized else m["fp32_onnx_accuracy"])
    report = json.loads((out / "report.json").read_text())["step"]
    assert latency_of(report, "FP32") == {1: 1.0} and latency_of(report, "INT8") == {1: int8_ms}
    assert [lat["model"] for lat in report["latency"] if lat["output"]] == ["INT8" if quantized else "FP32"]
    assert m["speedup_b1"] == pytest.approx(1 / int8_ms)
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert ("QuantizeLinear" in ops) is quantized
    notes = " ".join(report["notes"])
    if int8_ms > 1:
        assert ("kept INT8 as asked" in notes) is quantized
        assert ("handed back the FP32 model QAT started from" in notes) is not quantized
        assert "NOT faster" in result.stderr
    else:
        assert "INT8 is faster than the FP32 model QAT started from" in notes
    ev = runner.invoke(app, ["eval", "--model", str(out), "--data", "digits", "--json"])
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(m["accuracy"])


def test_layers_the_simulation_does_not_cover_are_listed():
    from torch import nn

    from mlopt.quant.lib.simulation import not_simulated

    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv1d(4, 4, 1), nn.ConvTranspose2d(4, 4, 1),
                      nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2), nn.Embedding(4, 2))
    assert not_simulated(m) == ["3 (ConvTranspose2d)", "7 (Embedding)"]


@pytest.mark.slow
def test_killed_qat_resumes_to_the_same_int8_model(trained_dir, tmp_path):
    import numpy as np
    from onnx import numpy_helper

    from conftest import kill_once_checkpointed

    args = [*QAT, "--model", str(trained_dir), "--checkpoint-every", "5", "--keep-int8", "--quiet"]
    full = tmp_path / "full"
    assert runner.invoke(app, [*args, "--out", str(full)]).exit_code == 0
    out = tmp_path / "killed"
    kill_once_checkpointed([*args, "--out", out], out / ".checkpoint" / "qat" / "checkpoint.pt")
    resumed = runner.invoke(app, [*args, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output

    def weights(path):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path / "model.onnx")).graph.initializer}

    a, b = weights(full), weights(out)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_learned_ranges_become_the_scales_of_the_int8_model(tmp_path):
    import numpy as np
    import torch
    from onnx import numpy_helper

    from mlopt.export.lib.onnx import export_onnx
    from mlopt.quant.lib.quantize import Scheme, quantize
    from mlopt.quant.lib.alignment import match_layers, range_overrides
    from mlopt.quant.lib.simulation import Simulation
    from toy_models import tiny_cnn

    torch.manual_seed(0)
    m = tiny_cnn().eval()
    sim = Simulation(m, 0.9)
    sim.hook_layer_inputs()
    x = torch.randn(16, 1, 8, 8)
    sim.calibrate([x])
    sim.points["features.0"].observer.hi.fill_(7.5)  # a range calibration alone would never produce
    sim.remove()
    order = sim.execution_order(x[:1])
    assert order == ["features.0", "features.3", "classifier"]
    export_onnx(m, (1, 8, 8), tmp_path / "fp32.onnx", 18, "dynamo")
    layer_tensors, unmatched = match_layers(onnx.load(str(tmp_path / "fp32.onnx")), order, sim)
    assert unmatched == [] and list(layer_tensors) == order and layer_tensors["features.0"] == "input"
    overrides = range_overrides(sim, {name: [t] for name, t in layer_tensors.items()})
    assert len(overrides) == 3 and "input" in overrides
    lo = min(float(sim.points["features.0"].observer.lo), 0.0)
    assert float(overrides["input"][0]["scale"]) == pytest.approx((7.5 - lo) / 255, rel=1e-6)

    quantize(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", Scheme("static", "qdq", "uint8", "int8", True, "minmax"),
             [{"input": x.numpy()}], False, overrides=overrides)
    model = onnx.load(str(tmp_path / "int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in overrides:
            want = overrides[node.input[0]][0]
            assert np.isclose(inits[node.input[1]], want["scale"]) and inits[node.input[2]] == want["zero_point"]
    assert sum(n.op_type == "QuantizeLinear" and n.input[0] in overrides for n in model.graph.node) == 3


def test_lsq_observers_learn_scale_and_zero_point():
    import torch

    from mlopt.quant.lib.simulation import Simulation
    from toy_models import tiny_cnn

    torch.manual_seed(0)
    m = tiny_cnn()
    sim = Simulation(m, 0.9, learned=True)
    sim.hook_layer_inputs()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    sim.calibrate([x])
    obs = sim.points["features.3"].observer
    start = obs.qparams()
    lo, hi = min(float(obs.lo), 0.0), max(float(obs.hi), 0.0)
    assert start[0] == pytest.approx((hi - lo) / 255, rel=1e-5)  # starts from the calibrated range
    params = [p for o in sim.all_observers() for p in o.parameters()]
    opt = torch.optim.Adam(params, lr=1e-4)
    m.train()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        assert obs.scale.grad is not None and obs.scale.grad.abs().item() > 0
        opt.step()
    assert obs.qparams()[0] != pytest.approx(start[0], rel=1e-4)
    sim.freeze()
    assert not obs.scale.requires_grad


@pytest.mark.slow
def test_qat_with_learned_ranges_exports_them(trained_dir, tmp_path):
    out = tmp_path / "q"
    result = runner.invoke(app, ["qat", "--model", str(trained_dir), "--data", "digits", "--epochs", "1", "--lr", "0.001",
                                 "--observer", "lsq", "--bench-batch-size", "1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert m["integer_kernels"] == 3 and m["ranges_handed_to_onnxruntime"] == 5
    assert m["simulation_top1_agreement"] >= 0.95 and m["accuracy"] > 0.5
    errors = table_rows(json.loads((out / "report.json").read_text())["step"], ERRORS)
    assert len(errors) == 5 and all(r["local max steps"] <= 1.01 for r in errors)


@pytest.mark.parametrize("factory, expected", [
    # stem ReLU output (read by the add and a), a's ReLU output, b's output (the add's other input),
    # the add's output (read by the mean), the head input, the logits; and the input
    ("residual_net", {"x", "relu", "a.2", "b", "add", "mean", "head"}),
    # the inputs and outputs of both concatenations and of the split, and the mean and head as above
    ("concat_split_net", {"x", "relu", "relu_1", "cat", "relu_2", "getitem", "getitem_1", "after_a", "after_b", "cat_1",
                          "mean", "head"}),
])
@pytest.mark.slow
def test_the_tensors_onnxruntime_quantizes_are_found_in_the_torch_graph(tmp_path, factory, expected):
    import torch

    import toy_models
    from mlopt.export.lib.onnx import export_onnx
    from mlopt.quant.lib.points import match_by_value, onnx_values, quantized_tensors
    from mlopt.quant.lib.quantize import Scheme, quantize
    from mlopt.quant.lib.simulation import Simulation, trace

    torch.manual_seed(0)
    m = getattr(toy_models, factory)().eval()
    x = torch.randn(8, 3, 16, 16)
    export_onnx(m, (3, 16, 16), tmp_path / "m.onnx", 18, "dynamo")
    quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", Scheme("static", "qdq", "uint8", "int8", True, "minmax"),
             [{"input": x.numpy()}], False)
    tensors = quantized_tensors(tmp_path / "q.onnx")
    gm, why = trace(m)
    assert why is None
    found = match_by_value(gm, x[:4], onnx_values(tmp_path / "m.onnx", tensors, {"input": x[:4].numpy()}))
    assert set(found) == set(tensors)  # every one of them has its torch counterpart
    nodes = {n.name: n for n in gm.graph.nodes}
    names = {nodes[v].meta.get("label") or (str(nodes[v].target) if nodes[v].op == "call_module" else v)
             for v in found.values()}
    assert names == expected
    with torch.no_grad():
        plain = m(x)
    sim = Simulation(m, 0.9)
    sim.place(gm, [[n] for n in sorted(set(found.values()), key=list(nodes).index)])
    sim.calibrate([x])
    with torch.no_grad():
        simulated = sim.model(x)
    assert not torch.equal(simulated, plain) and torch.allclose(simulated, plain, atol=0.5)
    assert len(sim.points) == len(set(found.values())) and all(p.observer.qparams()[0] > 0 for p in sim.points.values())


def qat_one_epoch(tmp_path, factory):
    result = runner.invoke(app, ["qat", "--model", f"{TOY}:{factory}", "--data", "digits", "--epochs", "1",
                                 "--bench-batch-size", "1", "--out", str(tmp_path / "q"), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), json.loads((tmp_path / "q" / "report.json").read_text())["step"], result.stderr


@pytest.mark.slow
def test_a_model_torch_fx_cannot_trace_is_simulated_at_layer_inputs(tmp_path):
    m, report, stderr = qat_one_epoch(tmp_path, "untraceable_cnn")
    assert m["simulated_points"] == "layer inputs" and m["activation_points"] == 2
    assert "torch.fx cannot trace the model" in stderr
    # the layer inputs are handed over; onnxruntime calibrates the rest, and they are listed
    assert m["ranges_handed_to_onnxruntime"] == 2 and m["tensors_calibrated_by_onnxruntime"] > 0
    listed = [r["name"] for r in table_rows(report, "left in float or outside the simulation")
              if r["what"] == "tensor calibrated by onnxruntime"]
    assert len(listed) == m["tensors_calibrated_by_onnxruntime"]
    assert m["integer_kernels"] == 2 and m["float_kernels"] == 0


@pytest.mark.slow
def test_qat_of_a_transformer_encoder_simulates_its_matmuls_as_onnxruntime_runs_them(tmp_path):
    m, report, stderr = qat_one_epoch(tmp_path, "tiny_bert_like")
    # every weight MatMul, both attention MatMuls of each layer and the patch convolution: integer
    assert m["integer_kernels"] == 14 and m["float_kernels"] == 0 and m["not_simulated"] == 0
    assert m["activation_points"] == m["quantized_tensors"] == m["ranges_handed_to_onnxruntime"]
    assert m["activation_ranges"] < m["activation_points"]  # reshapes and transposes share their input's scale
    errors = table_rows(report, ERRORS)
    points = {r["tensor -> read by"].split(" -> ")[0]: r for r in errors}
    # the product and the sum of each Linear, as onnxruntime quantizes MatMul + Add
    assert {"layers.0.attention.query (no bias)", "layers.0.attention.query", "softmax"} <= set(points)
    assert "transpose -> layers.0.attention.query, layers.0.attention.key, layers.0.attention.value, add" in [
        r["tensor -> read by"] for r in errors]
    assert all(r["local max steps"] <= 1.01 and r["local values off %"] < 1 for r in errors)
    assert m["simulation_top1_agreement"] >= 0.95
    # the patch convolution, eight Linears found as MatMul weights the exporter renamed, and the head
    assert m["weight_layers"] == 10 and m["weight_codes_differing"] <= 2


@pytest.mark.slow
def test_batch_norm_that_cannot_be_folded_is_named(tmp_path):
    m, report, stderr = qat_one_epoch(tmp_path, "bn_after_relu")
    assert m["unfolded_batchnorms"] == 1
    assert [r["what"] for r in table_rows(report, "left in float or outside the simulation")].count(
        "batch norm not folded into a convolution") == 1
    assert "1 batch norm(s) could not be folded" in stderr


@pytest.mark.slow
def test_qat_with_learned_scales_under_two_process_ddp(tmp_path):
    """torchrun on the CPU (gloo): the traced model with quantized adds trains in DDP, and the LSQ
    parameters, which live outside the DDP-wrapped module, get their gradients averaged."""
    import subprocess
    import sys

    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, "-m", "mlopt", "qat", "--model", f"{TOY}:residual_net", "--data", "digits",
                           "--image-size", "16", "--channels", "3", "--epochs", "1", "--lr", "0.001", "--observer", "lsq",
                           "--device", "cpu", "--nproc", "2", "--bench-batch-size", "1", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout)
    assert m["processes"] == 2 and m["replica_max_abs_diff"] == 0
    assert m["activation_points"] == m["quantized_tensors"] == m["ranges_handed_to_onnxruntime"] == 7
    assert m["integer_kernels"] == 4 and m["float_kernels"] == 0


@pytest.mark.parametrize("reduce_range", [False, True])
def test_dynamic_int8_simulation_grids_are_onnxruntimes(reduce_range):
    """The grids QAT on encoders trains with are the ones onnxruntime's quantizer computes: a Linear's weight int8,
    symmetric, per output column (7 bits with reduce_range); an input or embedding table uint8 over its range
    stretched to hold zero."""
    import numpy as np
    import torch
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    from mlopt.quant.lib.dynamic_sim import dynamic_fake_quant
    from mlopt.quant.lib.simulation import weight_fake_quant

    rng = np.random.default_rng(0)
    w = rng.normal(size=(24, 8)).astype(np.float32)  # as a MatMul holds it: (in, out)
    w[:, 3] *= 50  # columns of very different ranges
    mine = weight_fake_quant(qmax=64 if reduce_range else 127)(torch.from_numpy(w.T.copy())).numpy().T
    for col in range(w.shape[1]):
        zero, scale, q = quantize_data(w[:, col], TensorProto.INT8, symmetric=True, reduce_range=reduce_range)
        np.testing.assert_allclose(mine[:, col], (q.astype(np.float32) - zero) * scale, rtol=1e-6, atol=1e-7)
    x = (rng.normal(size=(4, 16)) + 0.7).astype(np.float32)  # mostly positive: the grid must still hold zero
    zero, scale, q = quantize_data(x.ravel(), TensorProto.UINT8, symmetric=False)
    np.testing.assert_allclose(dynamic_fake_quant(torch.from_numpy(x)).numpy().ravel(),
                               (q.astype(np.float32) - zero) * scale, rtol=1e-6, atol=1e-6)
