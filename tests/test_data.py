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
        ({"x": np.zeros((4, 2)), "y": np.array([0, -1, 0, 1])}, "class indices 0..999999, found -1"),
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
    [("npz:/no/such.npz", "does not exist"), ("imagefolder:/no/dir", "does not exist"), ("random:3xq", "invalid shape")],
)
def test_bad_sources(source, match):
    with pytest.raises(InputError, match=match):
        load_data(DataConfig(source=source))


@pytest.mark.parametrize("fields,match", [
    ({"source": "mnist"}, "unrecognised data 'mnist'"), ({"source": "text:"}, "unrecognised data 'text:'"),
    ({"source": "digits:x"}, "unrecognised data"), ({"source": "digits", "channels": 2}, "channels must be 1 or 3")])
def test_what_the_config_tells_without_reading_is_refused_by_the_config(fields, match):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=match):
        DataConfig(**fields)


def test_npz_with_more_classes_than_the_validation_share_is_split_without_stratifying(tmp_path):
    """40 samples of 10 classes: 8 validation samples cannot hold every class, so the split is a plain one."""
    y = np.arange(40) % 10
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((40, 1, 8, 8), np.float32), y=y)
    d = load_data(DataConfig(source=f"npz:{tmp_path / 'd.npz'}"))
    assert len(d.train) == 32 and len(d.val) == 8 and d.num_classes == 10
    np.savez(tmp_path / "e.npz", x=np.zeros((100, 1, 8, 8), np.float32), y=np.arange(100) % 10)
    d = load_data(DataConfig(source=f"npz:{tmp_path / 'e.npz'}"))  # room for every class: stratified
    assert sorted(int(label) for _, label in d.val) == sorted(list(range(10)) * 2)


def test_an_image_named_in_another_encoding_is_read_and_fingerprinted(tmp_path):
    import os

    from PIL import Image

    from mlopt.core.fsutil import path_fingerprint

    for cls, value in (("a", 30), ("b", 220)):
        (tmp_path / cls).mkdir()
        for name in ("0.png", "1.png", os.fsdecode(b"\xff.png")):
            Image.new("L", (8, 8), value).save(tmp_path / cls / name)
    d = load_data(DataConfig(source=f"imagefolder:{tmp_path}", val_fraction=0.5))
    assert len(d.train) + len(d.val) == 6
    first = path_fingerprint(tmp_path)
    (tmp_path / "a" / os.fsdecode(b"\xff.png")).unlink()
    assert first != path_fingerprint(tmp_path)  # the recipe's resume fingerprint reads every file name
