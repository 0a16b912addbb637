"""GGUF files (``gguf:FILE``): dequantized once by transformers into a cached Hugging Face folder.

A GGUF file holds a decoder's weights (often quantized), its config and its tokenizer. transformers
reads it (with the ``gguf`` package) into a float32 model and tokenizer, which mlopt saves with
``save_pretrained`` into ``$XDG_CACHE_HOME/mlopt/gguf/<digest>`` (``~/.cache/mlopt/gguf/...`` without
it): the digest is that of the file's content and the transformers version that converted it, so a
file is converted once and an edited file or a new transformers converts again. The folder is
written under a temporary name and renamed, so a half-written one is never reused. From there the
model flows as ``hf:FOLDER``.

The header is read first (magic, then the whole metadata and tensor table with ``gguf``'s reader),
so a file that is not GGUF, is cut short or is corrupt fails in one line before transformers runs.

Needs ``pip install "mlopt[llm]"`` (transformers, gguf and accelerate).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlopt.core import console
from mlopt.core.errors import InputError, first_line, storage_error
from mlopt.core.fsutil import digest, path_fingerprint
from mlopt.runtime.decoder import GGUF_PREFIX

MAGIC = b"GGUF"
_INSTALL = 'gguf: files need transformers, gguf and accelerate: pip install "mlopt[llm]"'


def is_gguf_spec(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(GGUF_PREFIX)


def gguf_file(spec: str) -> Path:
    """The path a ``gguf:FILE`` spec names."""
    return Path(spec[len(GGUF_PREFIX):]).expanduser()


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlopt" / "gguf"


def _require_packages() -> None:
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("gguf", "accelerate", "transformers")):
        raise InputError(_INSTALL)


def _check_magic(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"GGUF file {path} is a directory" if path.is_dir() else f"GGUF file {path} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError as exc:
        raise storage_error(exc, path) or InputError(f"cannot read {path}: {first_line(exc)}") from None
    if not head:
        raise InputError(f"{path} is empty, not a GGUF file")
    if head != MAGIC:
        raise InputError(f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r})")


def read_architecture(path: Path) -> str:
    """The file's ``general.architecture``, after the whole header and tensor table have been read."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        architecture = str(field.contents()) if field is not None else None
        tensors = len(reader.tensors)
        count = reader.fields.get(f"{architecture}.block_count") if architecture else None
        declared = int(count.contents()) if count is not None else None
        blocks = {t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")}
    except Exception as exc:  # the reader raises ValueError, IndexError... on a cut or garbled file
        raise InputError(f"{path} is a truncated or corrupt GGUF file ({first_line(exc)})") from None
    if not architecture:
        raise InputError(f"{path} is a GGUF file without general.architecture; it does not describe a model")
    if tensors == 0:
        raise InputError(f"{path} is a GGUF file with no tensors (a vocabulary-only file?); it holds no model")
    if declared is not None and declared > len(blocks):  # transformers would build every declared block
        raise InputError(f"{path} declares {declared:,} blocks ({architecture}.block_count) but holds tensors for "
                         f"{len(blocks)}: a corrupt GGUF file")
    return architecture


def _check_architecture(path: Path, architecture: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint

    try:  # the metadata only; transformers knows its own aliases (qwen2moe, gpt-oss, a Mistral named in llama...)
        load_gguf_checkpoint(str(path))
    except Exception as exc:  # a missing key or an unknown type in a damaged file raises more than ValueError
        if not isinstance(exc, ValueError) or "not supported" not in str(exc):
            raise InputError(f"cannot read the GGUF file {path}: {first_line(exc)}") from None
        known = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise InputError(f"{path} holds a {architecture!r} model, which transformers cannot load from GGUF "
                         f"(it loads: {known})") from None


def to_hf_folder(path: str | Path) -> Path:
    """The Hugging Face folder (config, safetensors, tokenizer) of a GGUF file, converted once and cached."""
    from importlib.metadata import version

    path = Path(path).expanduser()
    _check_magic(path)
    _require_packages()
    folder = cache_root() / digest(path_fingerprint(path), version("transformers"))[:40]
    if (folder / "config.json").is_file():  # only a complete conversion is ever renamed to this name
        return folder
    architecture = read_architecture(path)
    from mlopt.runtime.hf import _transformers

    transformers = _transformers()
    _check_architecture(path, architecture)
    console.info(f"converting {path.name} ({architecture}) to float32 once; cached in {folder}")
    _convert(transformers, path, folder)
    return folder


def _convert(transformers: Any, path: Path, folder: Path) -> None:
    """Dequantize with transformers into a temporary folder beside `folder`, then rename it into place."""
    import shutil
    import tempfile

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    except OSError as exc:
        raise storage_error(exc, folder.parent) or InputError(f"cannot create {folder.parent}: {first_line(exc)}") from None
    try:
        _save(transformers, path, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process converted the same file meanwhile: keep its folder
            if not (folder / "config.json").is_file():
                raise
    except InputError:
        raise
    except Exception as exc:  # a full disk says so; anything else is the file transformers could not read
        raise storage_error(exc, folder) or InputError(f"cannot convert the GGUF file {path}: {first_line(exc)}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save(transformers: Any, path: Path, out: Path) -> None:
    import contextlib
    import io

    import torch

    kwargs = {"gguf_file": path.name, "local_files_only": True, "trust_remote_code": False}
    # transformers draws a progress bar per file on stderr that its logging switch does not reach.
    with contextlib.redirect_stderr(io.StringIO()):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    # The weights are plain float32 now; saving refuses a model still marked as GGUF-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
