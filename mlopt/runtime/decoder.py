"""Decoder language models: what marks one, and the onnxruntime-genai folder mlopt writes for it.

A decoder comes in as ``hf:DIR`` (a folder whose config names a ``*ForCausalLM``) or
``gguf:FILE`` (dequantized by transformers into an HF folder once, in a cache), and leaves
``mlopt export`` as an onnxruntime-genai folder: ``genai_config.json``, ``model.onnx`` with its
external data, and the tokenizer files. Every later decoder step (ptq, eval, bench) reads that folder.

Needs ``pip install "mlopt[llm]"`` (onnxruntime-genai, and gguf for ``gguf:`` files).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mlopt.core.errors import InputError

GENAI_CONFIG = "genai_config.json"
GGUF_PREFIX = "gguf:"
# The suffixes of a generative language model's class in transformers.
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(config: dict[str, Any]) -> bool:
    """Whether a transformers config.json describes a decoder that generates text: a *ForCausalLM or
    *LMHeadModel, or any other architecture onnxruntime-genai's builder exports as a decoder (Gemma 3 from
    4B up is a Gemma3ForConditionalGeneration)."""
    names = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith(CAUSAL_SUFFIXES) for a in names):
        return True
    return any(a.endswith("ForConditionalGeneration") and a in supported_architectures() and not a.startswith("Whisper")
               for a in names)


def is_genai_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / GENAI_CONFIG).is_file()


def onnx_name(folder: str | Path) -> str:
    """The decoder graph's file name in a genai folder: genai_config.json's model.decoder.filename (folders made
    elsewhere name it as they like), model.onnx when it names none. A name that leaves the folder is refused."""
    import json

    try:
        config = json.loads((Path(folder) / GENAI_CONFIG).read_text(encoding="utf-8"))
        name = config.get("model", {}).get("decoder", {}).get("filename") or "model.onnx"
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{Path(folder) / GENAI_CONFIG} is not a readable onnxruntime-genai config: {exc}") from None
    if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
        raise InputError(f"{Path(folder) / GENAI_CONFIG} names the decoder file {name!r}; it must be a file in that folder")
    return name


def genai() -> Any:
    """The onnxruntime_genai module. onnxruntime is imported first: the other order aborts the process."""
    import importlib

    importlib.import_module("onnxruntime")  # must be loaded before onnxruntime_genai
    try:
        import onnxruntime_genai
    except ImportError:
        raise InputError('decoder models need onnxruntime-genai: pip install "mlopt[llm]"') from None
    return onnxruntime_genai


def supported_architectures() -> list[str]:
    """The architectures the installed onnxruntime-genai model builder exports, read from its source.

    Reading the source (instead of keeping a copy of the list) keeps the message true for whichever
    version is installed; the builder has no API that lists them.
    """
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or spec.origin is None:
        return []
    text = Path(spec.origin).read_text(encoding="utf-8", errors="replace")
    return sorted(set(re.findall(r'architectures\[0\] == "(\w+)"', text)))
