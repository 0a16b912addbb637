import numpy as np
import pytest

from mlopt.runtime.data import DataConfig, load_data
from mlopt.core.errors import InputError


def test_digits_split_is_deterministic_and_stratified():
    a = load_data(DataConfig(source="digits"))
    b = load_data(DataConfig(source="digits"))
    assert a.num_classes == 10 and a.sample_shape == (1, 8, 8)
    assert len(a.train) + len(a.val) == 1797
    assert len(a.val) == 360
    assert (a.val.tensors[0] == b.val.tensors[0]).all()
    counts = np.bincount(a.val.tensors[1].numpy())
    assert counts.min() >= 35  # every class is represented in validation
    x = a.train.tensors[0]
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_digits_resized_to_rgb():
    d = load_data(DataConfig(source="digits", image_size=32, channels=3))
    assert d.sample_shape == (3, 32, 32)
    x = d.val.tensors[0]
    assert (x[:, 0] == x[:, 2]).all()


def test_npz_with_and_without_val(tmp_path, npz_file):
    d = load_data(DataConfig(source=f"npz:{npz_file}", val_fraction=0.25))
    assert d.num_classes == 4 and len(d.val) == 50
    path = tmp_path / "split.npz"
    x = np.zeros((10, 2), np.float32)
    np.savez(path, x=x, y=np.arange(10) % 2, x_val=x[:3], y_val=np.array([0, 1, 1]))
    d = load_data(DataConfig(source=f"npz:{path}"))
    assert len(d.train) == 10 and len(d.val) == 3 and d.sample_shape == (2,)


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"x": np.zeros((4, 2))}, "must hold arrays 'x' and 'y'"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, np.int64)}, "different lengths"),
        ({"x": np.zeros((4, 2)), "y": np.array([0.5, 1, 0, 1])}, "integer"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, -1, 0, 1])}, ">= 0"),
    ],
)
def test_npz_errors(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=match):
        load_data(DataConfig(source=f"npz:{path}"))


def test_imagefolder(tmp_path):
    from PIL import Image

    for cls, value in (("cat", 30), ("dog", 220)):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (20, 12), (value, value, value)).save(tmp_path / cls / f"{i}.png")
    d = load_data(DataConfig(source=f"imagefolder:{tmp_path}", image_size=16, val_fraction=0.2))
    assert d.num_classes == 2 and d.sample_shape == (3, 16, 16)
    assert len(d.train) + len(d.val) == 10 and len(d.val) == 2
    x, y = d.train[0]
    assert tuple(x.shape) == (3, 16, 16) and int(y) in (0, 1)


def test_random_has_no_labels():
    d = load_data(DataConfig(source="random:3x4x4", samples=8))
    assert not d.labeled and d.sample_shape == (3, 4, 4) and len(d.train) == 8


@pytest.mark.parametrize(
    "source,match",
    [("mnist", "unrecognised data"), ("npz:/no/such.npz", "does not exist"), ("imagefolder:/no/dir", "does not exist"),
     ("random:3xq", "invalid shape")],
)
def test_bad_sources(source, match):
    with pytest.raises(InputError, match=match):
        load_data(DataConfig(source=source))


def test_channels_must_be_1_or_3():
    with pytest.raises(InputError, match="channels must be 1 or 3"):
        load_data(DataConfig(source="digits", channels=2))
