import pytest
import torch

from mlopt.core.errors import InputError
from mlopt.runtime.models import apply_state_dict, build_module, load_state_dict_file, parse_shape, probe_output

from conftest import TOY


@pytest.mark.parametrize("text,expected", [("1x3x224x224", (1, 3, 224, 224)), ("3X32x32", (3, 32, 32)), ([1, 8], (1, 8))])
def test_parse_shape(text, expected):
    assert parse_shape(text) == expected


@pytest.mark.parametrize("text", ["1x3xa", "0x3", "", "1x-2"])
def test_parse_shape_rejects(text):
    with pytest.raises(InputError, match="shape"):
        parse_shape(text)


def test_torchvision_model_with_classes():
    m = build_module("torchvision:resnet18", 7)
    assert m.fc.out_features == 7


def test_unknown_torchvision_model_suggests_close_names():
    with pytest.raises(InputError, match="did you mean resnet18"):
        build_module("torchvision:resnet81", 10)


def test_file_factory_receives_num_classes():
    m = build_module(f"{TOY}:tiny_cnn", 4)
    assert m.classifier.out_features == 4


def test_module_factory():
    m = build_module("toy_models:tiny_cnn", 3)
    assert m.classifier.out_features == 3


@pytest.mark.parametrize(
    "spec,match",
    [
        (f"{TOY}:nope", "no callable named 'nope'"),
        (f"{TOY}:not_a_module", "not a torch.nn.Module"),
        (f"{TOY}:broken_factory", "factory exploded"),
        ("missing/file.py:make", "does not exist"),
        ("no_such_package_xyz:make", "cannot import module"),
        ("resnet18", "unrecognised model"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(InputError, match=match):
        build_module(spec, 10)


def test_weights_roundtrip_and_mismatch(tmp_path):
    a = build_module(f"{TOY}:tiny_cnn", 10)
    path = tmp_path / "w.pt"
    torch.save(a.state_dict(), path)
    b = build_module(f"{TOY}:tiny_cnn", 10)
    apply_state_dict(b, load_state_dict_file(path), str(path))
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    c = build_module(f"{TOY}:tiny_cnn", 5)
    with pytest.raises(InputError, match="shape mismatch.*classifier"):
        apply_state_dict(c, load_state_dict_file(path), str(path))


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="not a valid PyTorch state dict"):
        load_state_dict_file(path)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    from toy_models import tiny_cnn

    torch.save(tiny_cnn(), path)
    with pytest.raises(InputError, match="cannot read weights"):
        load_state_dict_file(path)


def test_probe_rejects_wrong_shape():
    m = build_module(f"{TOY}:tiny_cnn", 10)
    assert probe_output(m, (1, 8, 8)) == 10
    with pytest.raises(InputError, match="rejects input of shape 1x3x8x8"):
        probe_output(m, (3, 8, 8))


def test_torchvision_video_and_segmentation_models_build_with_their_default_shapes():
    import torch

    from mlopt.runtime.models import torchvision_default_shape

    assert torchvision_default_shape("resnet18") == (3, 224, 224)
    assert torchvision_default_shape("r3d_18") == (3, 16, 112, 112)
    assert torchvision_default_shape("mvit_v1_b") == (3, 16, 224, 224)
    seg = build_module("torchvision:lraspp_mobilenet_v3_large", 5).eval()
    with torch.no_grad():
        assert seg(torch.zeros(1, 3, 64, 64)).shape == (1, 5, 64, 64)  # the map, not the dict
    with pytest.raises(InputError, match="unknown torchvision classification, video or segmentation model 'fasterrcnn"):
        build_module("torchvision:fasterrcnn_resnet50_fpn", 3)


@pytest.mark.slow
def test_float16_weights_are_worked_on_in_float32_with_a_warning(tmp_path):
    import json

    from typer.testing import CliRunner

    from mlopt.cli.main import app

    out = tmp_path / "p"
    result = CliRunner().invoke(app, ["prune", "--model", "tests/user_models.py:half_cnn", "--input-shape", "1x3x16x16",
                                      "--ratio", "0.5", "--out", str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "its weights are float16; mlopt works on the model in float32" in result.stderr
    assert json.loads(result.stdout)["macs_ratio"] > 2


def test_a_model_with_a_scripted_block_is_refused_in_one_line():
    from mlopt.runtime.models import build_module

    with pytest.raises(InputError, match=r"^tests/user_models.py:scripted_block: 0 is a TorchScript module .* plain "
                                         r"torch.nn.Module code$"):
        build_module("tests/user_models.py:scripted_block", 10)
    from mlopt.runtime.models import refuse_scripted

    traced = torch.jit.trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), torch.zeros(1, 4))
    with pytest.raises(InputError, match=r"^m: the model itself is a TorchScript module "):  # not its children too
        refuse_scripted(traced, "m")
