"""Saved models: save then load_artifact gives back the same model, torch or ONNX."""

import numpy as np
import pytest
import torch

from mlopt.core.errors import InputError
from mlopt.runtime.artifacts import META_FILE, Artifact, load_artifact
from mlopt.runtime.models import build_module

from conftest import TOY


def _torch_artifact():
    from toy_models import tiny_cnn

    torch.manual_seed(3)
    module = tiny_cnn().eval()
    for p in module.parameters():
        p.data.normal_()  # not the seeded initialisation load_artifact rebuilds first
    return Artifact(format="torch", sample_shape=(1, 8, 8), num_classes=10, lineage=["train", "prune"],
                    builder={"spec": f"{TOY}:tiny_cnn", "num_classes": 10}, module=module, origin="mine")


def test_torch_round_trip(tmp_path):
    art = _torch_artifact()
    assert art.save(tmp_path).name == "model.pt"
    back = load_artifact(tmp_path)
    assert (back.format, back.sample_shape, back.num_classes, back.lineage) == ("torch", (1, 8, 8), 10, ["train", "prune"])
    assert back.builder == art.builder and back.origin == str(tmp_path)
    a, b = art.module.state_dict(), back.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(art.module(x), back.module(x))
    assert not back.module.training


def test_onnx_round_trip(tmp_path):
    import onnxruntime as ort

    from mlopt.export.lib.onnx import export_onnx

    src = _torch_artifact()
    exported = tmp_path / "src.onnx"
    export_onnx(src.module, (1, 8, 8), exported, opset=18, exporter="torchscript")
    art = src.derive("export", format="onnx", module=None, onnx_path=exported)
    out = tmp_path / "saved"
    out.mkdir()
    assert art.save(out) == out / "model.onnx"
    assert (out / "model.onnx").read_bytes() == exported.read_bytes()
    back = load_artifact(out)
    assert (back.format, back.onnx_path, back.sample_shape, back.num_classes) == ("onnx", out / "model.onnx", (1, 8, 8), 10)
    assert back.lineage == ["train", "prune", "export"] and back.builder == src.builder
    x = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(back.onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = src.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], expected, atol=1e-4)
    back.save(out)  # saving onto its own file leaves it as it was
    assert (out / "model.onnx").read_bytes() == exported.read_bytes()
    bare = load_artifact(exported)  # a bare FILE.onnx: shape and classes from the graph
    assert (bare.format, bare.sample_shape, bare.num_classes, bare.lineage) == ("onnx", (1, 8, 8), 10, [])


def test_load_refuses_what_is_not_a_saved_model(tmp_path):
    with pytest.raises(InputError, match="not an mlopt model directory"):
        load_artifact(tmp_path)
    (tmp_path / META_FILE).write_text('{"mlopt_model_version": 1, "format": "tflite"}')
    with pytest.raises(InputError, match="unknown model format 'tflite'"):
        load_artifact(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_artifact(tmp_path / "nothing")


def _versioned_artifact(spec, shape):
    module = build_module(spec, 10).eval()
    torch.manual_seed(5)
    for p in module.parameters():
        p.data.normal_()
    return Artifact(format="torch", sample_shape=shape, num_classes=10, builder={"spec": spec, "num_classes": 10},
                    module=module, origin="mine")


@pytest.mark.parametrize("spec,shape", [(f"{TOY}:versioned_cnn", (1, 8, 8)),
                                        pytest.param("torchvision:mnasnet0_5", (3, 32, 32), marks=pytest.mark.slow)])
def test_module_versions_survive_the_round_trip(tmp_path, spec, shape):
    """Modules that read their saved version when loading (torchvision's MNASNet) reload; so does a model.pt
    written as a plain dict, without versions, read with the versions of the module it is loaded into."""
    art = _versioned_artifact(spec, shape)
    art.save(tmp_path)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved._metadata[""]["version"] == 2
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected = art.module(x)
        assert torch.equal(load_artifact(tmp_path).module(x), expected)
        torch.save(dict(saved), tmp_path / "model.pt")
        assert torch.equal(load_artifact(tmp_path).module(x), expected)
