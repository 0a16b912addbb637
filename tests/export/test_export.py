import json
import numpy as np
import onnx
import pytest
import torch

from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.core.errors import ParityError, RunError
from mlopt.export.lib.onnx import export_onnx
from mlopt.export.lib.parity import compare
from mlopt.runtime.session import make_session, run_session
from mlopt.runtime.models import build_module

from conftest import TOY


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_has_dynamic_batch_and_matches_torch(tmp_path, exporter):
    torch.manual_seed(0)
    module = build_module(f"{TOY}:tiny_cnn", 10).eval()
    path = tmp_path / "m.onnx"
    export_onnx(module, (1, 8, 8), path, opset=18, exporter=exporter)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 18
    session = make_session(path)
    for batch in (1, 5):
        x = torch.randn(batch, 1, 8, 8)
        got = run_session(session, x.numpy())
        with torch.no_grad():
            np.testing.assert_allclose(got, module(x).numpy(), atol=1e-4)
    result = compare(module, path, torch.randn(16, 1, 8, 8), atol=1e-4, rtol=1e-3)
    assert result["top1_agreement"] == 1.0 and result["max_abs_error"] < 1e-4


def test_parity_failure_is_detected(tmp_path):
    torch.manual_seed(0)
    module = build_module(f"{TOY}:tiny_cnn", 10).eval()
    path = tmp_path / "m.onnx"
    export_onnx(module, (1, 8, 8), path, opset=18, exporter="torchscript")
    with torch.no_grad():
        module.classifier.bias += 0.5  # torch now disagrees with the exported file
    with pytest.raises(ParityError, match="max abs error 0.5"):
        compare(module, path, torch.randn(8, 1, 8, 8), atol=1e-4, rtol=1e-3)


def test_export_failure_is_one_line(tmp_path):
    class Untraceable(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x.flatten(1)
            return -x.flatten(1)

    with pytest.raises(RunError, match="ONNX export failed") as info:
        export_onnx(Untraceable(), (4,), tmp_path / "m.onnx", opset=18, exporter="dynamo")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.slow
def test_exporter_debug_metadata_is_dropped_unless_asked(trained_dir, tmp_path, keep):
    out = tmp_path / "e"
    args = ["export", "--model", str(trained_dir), "--data", "digits", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args + (["--debug-metadata"] if keep else []))
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out / "model.onnx"))
    traces = [p.value for n in model.graph.node for p in n.metadata_props if p.key == "pkg.torch.onnx.stack_trace"]
    assert bool(traces) == keep
    assert str(TOY) not in str(model) or keep  # no local source paths in a shipped model


def test_export_falls_back_to_the_other_exporter_unless_one_was_chosen(tmp_path):
    out = tmp_path / "e"
    args = ["export", "--model", f"{TOY}:dynamo_breaks", "--input-shape", "1x1x8x8", "--fuse", "off", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    step = json.loads((out / "report.json").read_text())["step"]
    assert step["metrics"]["exporter"] == "torchscript"
    assert any(n.startswith("the dynamo exporter failed (") and n.endswith("exported with the torchscript exporter "
                                                                          "instead") for n in step["notes"])
    chosen = CliRunner().invoke(app, [*args, "--exporter", "dynamo", "--out", str(tmp_path / "d")])
    assert chosen.exit_code == 1
    assert "ONNX export failed" in chosen.output and "torchscript exporter failed too" not in chosen.output
    assert not (tmp_path / "d").exists()


def test_both_exporters_failing_is_one_line_naming_both(tmp_path, monkeypatch):
    import mlopt.export.lib.onnx as onnx_lib

    def fails(module, shape, path, opset, exporter, **options):
        raise RunError(f"ONNX export failed: {exporter} cannot (try exporter: other)")

    monkeypatch.setattr(onnx_lib, "export_onnx", fails)
    with pytest.raises(RunError) as info:
        onnx_lib.export_either(torch.nn.Linear(1, 1), (1,), tmp_path / "m.onnx", 18, "dynamo")
    assert str(info.value) == ("ONNX export failed: dynamo cannot; the torchscript exporter failed too: torchscript "
                               "cannot")


def test_error_lines_lose_terminal_colours():
    from mlopt.core.errors import first_line

    assert first_line(RuntimeError("Failed. \x1b[96mThis is step 2/3\x1b[0m of exporting\nmore")) == \
        "Failed. This is step 2/3 of exporting"


@pytest.mark.slow
@pytest.mark.parametrize("chosen", [None, "dynamo"])
def test_a_model_with_recurrent_layers_goes_to_the_torchscript_exporter_unless_one_is_chosen(chosen, tmp_path):
    """torch's dynamo exporter traces a GRU one time step after another before writing one ONNX GRU node (31 s
    against 4 s over 248 steps); unless the user chose an exporter, such a model goes to TorchScript first."""
    out = tmp_path / "e"
    result = CliRunner().invoke(app, ["export", "--model", "tests/user_models.py:audio_gru", "--input-shape", "1x1x40",
                                 "--out", str(out), "--json", "--quiet", *(["--exporter", chosen] if chosen else [])])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert m["exporter"] == (chosen or "torchscript") and m["max_abs_error"] < 1e-4
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "GRU" in ops, ops
    notes = json.loads((out / "report.json").read_text())["step"]["notes"]
    assert any("recurrent layers (gru)" in n for n in notes) == (chosen is None), notes


def test_parity_and_scoring_batches_shrink_for_large_inputs():
    """MViT's parity check in batches of 32 clips of 3x16x224x224 went past 12 GB: batches hold at most 2**22
    input values (one such clip), never fewer than one sample nor more than asked."""
    from mlopt.runtime.data import batch_within

    assert batch_within(torch.zeros(2, 3, 16, 224, 224), 32) == 1
    assert batch_within(torch.zeros(2, 3, 224, 224), 32) == 27
    assert batch_within(torch.zeros(2, 1, 8, 8), 32) == 32 and batch_within(torch.zeros(2, 1, 8, 8), 4) == 4
    assert batch_within({"input_ids": torch.zeros(2, 128, dtype=torch.long)}, 64) == 64
