"""Data specs and loading.

- ``digits``: scikit-learn's real 8x8 handwritten digits (1797 images, 10 classes), scaled to
  [-1, 1], split deterministically (stratified) into train and validation.
- ``npz:FILE``: arrays ``x`` (N, C, H, W) float and ``y`` (N,) int; optional ``x_val``/``y_val``
  give the validation split, otherwise it is split deterministically.
- ``imagefolder:DIR``: one folder per class (``DIR/train`` and ``DIR/val`` if present), images
  resized to ``image_size`` (default 224) and normalised with ImageNet statistics.
- ``random:SHAPE``: Gaussian inputs of one sample's shape (e.g. ``3x32x32``), no labels:
  for calibration and benchmarking only.
- ``text:FILE``: one example a line (blank lines skipped), no labels, for ``hf:`` models: the
  model's tokenizer turns the lines into tokens (see mlopt.runtime.hf). Split deterministically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from mlopt.core.contracts import names_file
from mlopt.core.errors import InputError, first_line
from mlopt.core.sections import Config, Seed
from mlopt.core.memory import available_memory, readable_size
from mlopt.runtime.hf import CHARS_PER_TOKEN
from mlopt.runtime.models import parse_shape

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataConfig(Config):
    """Where the data comes from and how it is shaped; shared by every step of a recipe."""


    source: str = Field(json_schema_extra=names_file("data"), description="digits | npz:FILE | imagefolder:DIR | random:SHAPE | text:FILE")
    image_size: int | None = Field(None, gt=0, le=8192, description="resize images to this height and width")
    channels: int | None = Field(None, description="convert images to 1 or 3 channels")
    batch_size: int = Field(64, gt=0)
    val_fraction: float = Field(0.2, gt=0, lt=1, description="validation share when the source has no split")
    seed: Seed = 0
    samples: int = Field(256, gt=0, description="number of samples for random:SHAPE")
    max_length: int = Field(128, ge=2, le=2**20, description="text: tokens per example at most (longer lines are "
                            "truncated; at least 2, an encoder's two special tokens)")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":  # what can be told without reading anything (recipe validate says it)
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        kind, _, arg = self.source.partition(":")
        if (kind == "digits") == bool(arg) or kind not in SOURCES:
            raise ValueError(f"unrecognised data {self.source!r}: expected digits, npz:FILE, imagefolder:DIR, "
                             "random:SHAPE or text:FILE")
        return self


@dataclass
class Dataset:
    """Both splits of a data source, ready for torch DataLoaders."""

    name: str
    train: Any  # torch.utils.data.Dataset
    val: Any
    sample_shape: tuple[int, ...]
    num_classes: int | None  # None: no labels
    text: bool = False  # lines of text: tokenized for an hf: model before use (mlopt.runtime.hf.tokenize)

    unlabelled_why: str | None = None  # why the source's labels are not used (`inputs_only`)

    @property
    def labeled(self) -> bool:
        return self.num_classes is not None

    def inputs_only(self, why: str) -> "Dataset":
        """The same inputs without their labels: for a model whose output labels cannot score (a dense output).
        Batches are (inputs,), as random:SHAPE's are."""
        from dataclasses import replace

        return replace(self, train=_InputsOnly(self.train), val=_InputsOnly(self.val), num_classes=None,
                       unlabelled_why=why)


    def as_token_ids(self, vocab: int | None, seed: int = 0) -> "Dataset":
        """The data for a model that reads integer token ids below `vocab` (`input_vocabulary`; None: an ONNX model
        from elsewhere whose input is integer, with no vocabulary recorded): random:SHAPE becomes random ids
        (seeded); other data must hold whole numbers in [0, vocab) (an .npz of ids), which become int64."""
        import torch
        from dataclasses import replace
        from torch.utils.data import TensorDataset

        reads = (f"token ids below {vocab} (its input goes into an embedding of {vocab})" if vocab is not None
                 else "integer inputs (token ids?) and records no vocabulary")
        if self.name.startswith("random:"):
            if vocab is None:
                raise InputError(f"the model reads {reads}: {self.name} cannot make up valid ones; give an .npz "
                                 "whose x holds its inputs")
            g = torch.Generator().manual_seed(seed)
            ids = TensorDataset(torch.randint(0, vocab, (len(self.train), *self.sample_shape), generator=g))
            return replace(self, train=ids, val=ids)
        if not isinstance(self.train, TensorDataset) or not isinstance(self.val, TensorDataset):
            raise InputError(f"the model reads {reads}; {self.name} holds images: give an .npz whose x holds the ids")
        splits = []
        for split in (self.train, self.val):
            x, *rest = split.tensors
            bad = ~torch.isfinite(x) | (x != x.round()) | (x < 0) | (x >= (vocab or float("inf")))
            if bool(bad.any()):
                value = x[bad][0].item()
                allowed = f"0..{vocab - 1}" if vocab is not None else "0 or more"
                raise InputError(f"the model reads {reads}, but {self.name} holds {value:g}: give whole numbers "
                                 f"{allowed}")
            splits.append(TensorDataset(x.long(), *rest))
        return replace(self, train=splits[0], val=splits[1])


class _InputsOnly:
    """A map-style dataset's samples without their labels."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any]:
        return (self.dataset[i][0],)


def require_labels(data: Dataset, why: str) -> None:
    if getattr(data, "unlabelled_why", None) is not None:  # duck-typed data (the Python API, tests) may lack it
        raise InputError(f"{why} needs labels that score the model's output, and {data.unlabelled_why}")
    if not data.labeled:
        hint = {"random": " (random data is for calibration and benchmarking)",
                "text": " (text:FILE is one unlabelled example a line)"}.get(data.name.split(":")[0], "")
        raise InputError(f"{why} needs labelled data; {data.name!r} has no labels{hint}")


#: The data sources; DataConfig checks the source's form.
SOURCES = ("digits", "npz", "imagefolder", "random", "text")


def load_data(cfg: DataConfig) -> Dataset:
    kind, _, arg = cfg.source.partition(":")
    if kind == "digits":
        return _digits(cfg)
    if kind == "npz":
        return _npz(cfg, Path(arg))
    if kind == "imagefolder":
        return _imagefolder(cfg, Path(arg))
    if kind == "random":
        return _random(cfg, arg)
    return _text(cfg, Path(arg))


def _tensor_split(cfg: DataConfig, name: str, x: Any, y: Any, x_val: Any = None, y_val: Any = None) -> Dataset:
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset

    if x_val is None:
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(y))
        counts = np.bincount(y)
        classes, n_val = int((counts > 0).sum()), math.ceil(cfg.val_fraction * len(y))
        # stratified only where each class has two samples and each side has room for every class (sklearn's terms)
        stratify = y if counts[counts > 0].min() >= 2 and classes <= min(n_val, len(y) - n_val) else None
        tr, va = train_test_split(idx, test_size=cfg.val_fraction, random_state=cfg.seed, stratify=stratify)
        tr, va = np.sort(tr), np.sort(va)
        x, x_val, y, y_val = x[tr], x[va], y[tr], y[va]
    xt = _shape_images(torch.as_tensor(x, dtype=torch.float32), cfg)
    xv = _shape_images(torch.as_tensor(x_val, dtype=torch.float32), cfg)
    return Dataset(name=name, train=TensorDataset(xt, torch.as_tensor(y, dtype=torch.long)),
                   val=TensorDataset(xv, torch.as_tensor(y_val, dtype=torch.long)), sample_shape=tuple(xt.shape[1:]),
                   num_classes=int(max(y.max(), y_val.max())) + 1)


def _shape_images(x: Any, cfg: DataConfig) -> Any:
    """Resize (bilinear) and convert channels of an (N, C, H, W) float tensor."""
    import torch.nn.functional as F

    if x.dim() == 4 and cfg.image_size is not None and tuple(x.shape[-2:]) != (cfg.image_size, cfg.image_size):
        nbytes = x.shape[0] * max(x.shape[1], cfg.channels or 1) * cfg.image_size ** 2 * 4
        available = available_memory()
        if available is not None and nbytes > available:  # a model's input size fills image_size unasked
            raise InputError(f"{x.shape[0]} images resized to {cfg.image_size}x{cfg.image_size} need "
                             f"{readable_size(nbytes)}, more than the {readable_size(available)} of memory available")
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    if x.dim() == 4 and cfg.channels is not None and x.shape[1] != cfg.channels:
        if x.shape[1] == 1:
            x = x.repeat(1, cfg.channels, 1, 1)
        elif cfg.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise InputError(f"cannot convert {x.shape[1]} channels to {cfg.channels}")
    if x.dim() != 4 and (cfg.image_size or cfg.channels):
        raise InputError(f"image_size and channels apply to images (N, C, H, W); the data has shape {tuple(x.shape)}")
    return x.contiguous()


def _digits(cfg: DataConfig) -> Dataset:
    import numpy as np
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    return _tensor_split(cfg, "digits", x[:, None, :, :], bunch.target.astype(np.int64))


def _npz(cfg: DataConfig, path: Path) -> Dataset:
    import numpy as np

    if not path.is_file():
        raise InputError(f"data file {path} is a directory, not an .npz file" if path.is_dir()
                         else f"data file {path} does not exist")
    _check_npz(path)
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"cannot read {path} as .npz: {first_line(exc)}") from exc
    with arrays:
        names = set(arrays.files)
        if not {"x", "y"} <= names:
            raise InputError(f"{path} must hold arrays 'x' and 'y'; it holds {sorted(names)}")
        try:
            x, y = arrays["x"], arrays["y"]
            x_val, y_val = (arrays[k] if k in names else None for k in ("x_val", "y_val"))
        except Exception as exc:  # a damaged archive: bad CRC, truncated data
            raise InputError(f"cannot read {path} as .npz: {first_line(exc)}") from None
    for label, xs, ys in (("x/y", x, y), ("x_val/y_val", x_val, y_val)):
        if xs is None:
            continue
        if ys is None:
            raise InputError(f"{path}: x_val is given without y_val")
        if not np.issubdtype(ys.dtype, np.integer) or ys.ndim != 1:
            raise InputError(f"{path}: labels must be a 1-D integer array, got {ys.dtype} {ys.shape}")
        if len(xs) != len(ys):
            raise InputError(f"{path}: {label} have different lengths ({len(xs)} vs {len(ys)})")
        if not len(ys):
            raise InputError(f"{path}: {label} hold no samples")
        if ys.min() < 0 or ys.max() >= MAX_CLASSES:
            raise InputError(f"{path}: labels must be class indices 0..{MAX_CLASSES - 1}, found "
                             f"{ys.min() if ys.min() < 0 else ys.max()}")
        if not np.issubdtype(xs.dtype, np.number) or np.issubdtype(xs.dtype, np.complexfloating):
            raise InputError(f"{path}: x must be real numbers, got {xs.dtype}")
    if len(y) < 2:
        raise InputError(f"{path}: needs at least 2 samples")
    return _tensor_split(cfg, f"npz:{path}", x.astype(np.float32), y.astype(np.int64),
                         None if x_val is None else x_val.astype(np.float32),
                         None if y_val is None else y_val.astype(np.int64))


NPZ_ARRAYS = ("x", "y", "x_val", "y_val")
#: Labels are class indices below this (a larger one would size a classifier head, and its counts, by itself).
MAX_CLASSES = 1_000_000


def _check_npz(path: Path) -> None:
    """Read only the arrays' headers: refuse pickled objects and arrays larger than memory before loading any."""
    import zipfile

    import numpy as np
    from numpy.lib import format as npy

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"cannot read {path} as .npz: not a zip archive of .npy arrays ({first_line(exc)})") from None
    total = 0
    with archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if name not in NPZ_ARRAYS:
                continue  # never read
            try:
                with archive.open(info) as f:
                    version = npy.read_magic(f)
                    read_header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
                    shape, _, dtype = read_header(f, max_header_size=10_000)
            except Exception as exc:
                raise InputError(f"cannot read {path} as .npz: array {name!r} has no valid .npy header ({first_line(exc)})") from None
            if dtype.hasobject:
                raise InputError(f"{path}: array {name!r} holds pickled Python objects; mlopt reads plain numeric "
                                 "arrays only (save them with a numeric dtype, e.g. x.astype('float32'))")
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if nbytes > info.file_size:
                raise InputError(f"{path}: array {name!r} declares shape {tuple(shape)} ({readable_size(nbytes)}) "
                                 f"but the archive holds {readable_size(info.file_size)} for it (truncated or forged)")
            total += nbytes
    available = available_memory()
    if available is not None and total > available:
        raise InputError(f"{path}: its arrays need {readable_size(total)} once unpacked, more than the "
                         f"{readable_size(available)} of memory available")


class _ImageFiles:
    """A lazily loaded list of (image path, label); a torch-style map dataset."""

    def __init__(self, items: list[tuple[Path, int]], size: int, channels: int):
        self.items, self.size, self.channels = items, size, channels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        import warnings

        import torch
        from PIL import Image
        from torchvision.transforms.functional import normalize, pil_to_tensor, resize

        path, label = self.items[i]
        try:
            # Past PIL's warning size (89 Mpx) an image is refused, not decoded: it is far larger than any
            # image_size, and a small file declaring it is a decompression bomb.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    img = img.convert("L" if self.channels == 1 else "RGB")
                    t = pil_to_tensor(img).float() / 255.0
        except Exception as exc:
            raise InputError(f"cannot read image {path}: {first_line(exc)}") from None
        t = resize(t, [self.size, self.size], antialias=True)
        mean = IMAGENET_MEAN if self.channels == 3 else (sum(IMAGENET_MEAN) / 3,)
        std = IMAGENET_STD if self.channels == 3 else (sum(IMAGENET_STD) / 3,)
        return normalize(t, mean, std), torch.tensor(label, dtype=torch.long)


def _list_images(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    items = []
    for label, cls in enumerate(classes):
        folder = root / cls
        if folder.is_dir():
            items += [(p, label) for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    return items


def _imagefolder(cfg: DataConfig, root: Path) -> Dataset:
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    split = (root / "train").is_dir() and (root / "val").is_dir()
    class_root = root / "train" if split else root
    classes = sorted(p.name for p in class_root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise InputError(f"image folder {class_root} needs one sub-folder per class (found {len(classes)})")
    size = cfg.image_size or 224
    channels = cfg.channels or 3
    if split:
        extra = sorted(p.name for p in (root / "val").iterdir() if p.is_dir() and p.name not in classes)
        if extra:  # its images would be dropped without a word: the classes are train/'s folders
            raise InputError(f"image folder {root / 'val'} has class folder(s) that {root / 'train'} lacks: "
                             f"{', '.join(extra[:5])}")
        train, val = _list_images(root / "train", classes), _list_images(root / "val", classes)
    else:
        train, val = _split_list(_list_images(root, classes), cfg)
    if not train or not val:
        raise InputError(f"image folder {root} has too few images for a train and a validation split")
    return Dataset(name=f"imagefolder:{root}", train=_ImageFiles(train, size, channels),
                   val=_ImageFiles(val, size, channels), sample_shape=(channels, size, size), num_classes=len(classes))


def _random(cfg: DataConfig, shape_text: str) -> Dataset:
    import torch
    from torch.utils.data import TensorDataset

    shape = parse_shape(shape_text)
    ds = TensorDataset(torch.randn((cfg.samples, *shape), generator=torch.Generator().manual_seed(cfg.seed)))
    return Dataset(name=f"random:{shape_text}", train=ds, val=ds, sample_shape=shape, num_classes=None)




def _read_lines(path: Path, limit: int) -> list[str]:
    """The file's lines, each cut at `limit` characters as it is read: one enormous line (a file of one
    30 MB line took two minutes and 4 GB to tokenize) costs no more than a normal one."""
    import codecs

    lines = []
    with open(path, "rb") as f:
        while True:
            raw = f.readline(4 * limit)  # a UTF-8 character is at most 4 bytes
            if not raw:
                break
            cut = len(raw) == 4 * limit and not raw.endswith(b"\n")
            rest = raw if cut else b""
            while rest and not rest.endswith(b"\n"):  # skip the rest of a line longer than the limit
                rest = f.readline(1 << 20)
            try:  # a cut line may end inside a character: the incremental decoder keeps that tail back
                text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=not cut)
            except UnicodeDecodeError as exc:
                raise InputError(f"{path} is not UTF-8 text ({exc.reason} on line {len(lines) + 1})") from None
            if "\0" in text:  # tokenizers differ on it: onnxruntime-genai's stops reading at the first one
                raise InputError(f"{path} is not text: line {len(lines) + 1} holds a NUL byte")
            lines.append(text.rstrip("\r\n")[:limit])
    return lines


def _split_list(items: list, cfg: DataConfig) -> tuple[list, list]:
    """Train and validation items, split at random (seeded) and each kept in the items' order."""
    import numpy as np

    order = np.random.default_rng(cfg.seed).permutation(len(items))
    n_val = max(1, int(round(len(items) * cfg.val_fraction)))
    return [items[i] for i in sorted(order[n_val:])], [items[i] for i in sorted(order[:n_val])]


def _text(cfg: DataConfig, path: Path) -> Dataset:
    if cfg.image_size is not None or cfg.channels is not None:
        raise InputError("image_size and channels apply to images, not to text:FILE")
    if not path.is_file():
        raise InputError(f"text file {path} is a directory" if path.is_dir() else f"text file {path} does not exist")
    lines = [line.strip() for line in _read_lines(path, cfg.max_length * CHARS_PER_TOKEN)]
    lines = [line for line in lines if line]
    if len(lines) < 2:
        raise InputError(f"{path} needs at least 2 non-empty lines (one example a line); it has {len(lines)}")
    train, val = _split_list(lines, cfg)
    return Dataset(name=f"text:{path}", train=train, val=val, sample_shape=(), num_classes=None, text=True)


def inputs_of(batch: Any) -> Any:
    """The model inputs of a loader batch: a tensor, or for tokenized text a dict of tensors."""
    return batch if isinstance(batch, dict) else batch[0]


def labels_of(batch: Any) -> Any:
    return None if isinstance(batch, dict) or len(batch) < 2 else batch[1]


def count(inputs: Any) -> int:
    return len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)


def take(inputs: Any, start: int, stop: int) -> Any:
    return {k: v[start:stop] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[start:stop]


def to_numpy(inputs: Any) -> Any:
    return {k: v.numpy() for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.numpy()


def loader(dataset: Any, batch_size: int, shuffle: bool = False, seed: int = 0) -> Any:
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed),
                      num_workers=0)


BATCH_ELEMENTS = 1 << 22  # input elements per batch where a step picks its own batch size (16 MB of float32)


def batch_within(inputs: Any, cap: int) -> int:
    """A batch size of at most `cap` whose inputs hold at most BATCH_ELEMENTS values: 32 images of 3x224x224, one
    video clip of 3x16x224x224. Activations grow with the input: MViT's parity check in batches of 32 clips went past
    12 GB; a step that sizes its own batches (parity, ptq's scoring) does so by this."""
    import math

    sample = next(iter(inputs.values()))[0] if isinstance(inputs, dict) else inputs[0]
    numel = sample.numel() if hasattr(sample, "numel") else math.prod(getattr(sample, "shape", ())) or 1
    return max(1, min(cap, BATCH_ELEMENTS // max(1, numel)))


def check_labels(data: Dataset, num_classes: int | None) -> None:
    """Labels outside the model's classes are an input error, not a CUDA assert or a silent wrap. (A model with a
    dense output has no classes: `inputs_only` takes such data's labels away.)"""
    if data.num_classes is not None and num_classes is not None and data.num_classes > num_classes:
        raise InputError(f"data {data.name!r} has labels up to {data.num_classes - 1} but the model has "
                         f"{num_classes} classes")


def first_inputs(data: Dataset, n: int) -> Any:
    """Up to n real inputs from the validation split, as one tensor (for text, a dict of tensors)."""
    import torch

    xs, seen = [], 0
    for batch in loader(data.val, batch_size=min(n, 256)):
        xs.append(inputs_of(batch))
        seen += count(xs[-1])
        if seen >= n:
            break
    if isinstance(xs[0], dict):
        return {k: torch.cat([x[k] for x in xs])[:n] for k in xs[0]}
    return torch.cat(xs)[:n]
