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
from mlopt.runtime.graph_edit import attribute

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


#: The extra option that makes onnxruntime-genai's model builder compute logits for the last token only: prefill
#: then runs the LM head on one row instead of every prompt token (exact, and onnxruntime-genai reads such
#: graphs as they are). mlopt's export asks for it.
PRUNE_LM_HEAD = "prune_lm_head"


def last_token_only(model: Any) -> bool:
    """Whether a decoder graph's logits output covers the last position only (its dimension 1 is fixed at 1)."""
    return any(output.name == "logits" and _one_position(output) for output in model.graph.output)


def all_positions(model: Any) -> bool:
    """Undo the builder's LM-head pruning in `model` (in memory) so that its logits cover every position again, as
    teacher-forced perplexity needs: the Gather(axis=1, index -1) + Unsqueeze(axis 1) before the head is
    bypassed. Returns False when the graph is not pruned; a pruned graph in another shape is refused."""
    from onnx import numpy_helper

    from mlopt.runtime.graph_edit import constants, drop_dead, readers

    if not last_token_only(model):
        return False
    producer = {o: n for n in model.graph.node for o in n.output}
    known = constants(model)

    def picks_last(gather: Any) -> bool:
        axis = attribute(gather, "axis", 0)
        index = known.get(gather.input[1])
        return axis == 1 and index is not None and numpy_helper.to_array(index).tolist() in (-1, [-1])

    heads = ("MatMul", "MatMulNBits", "Gemm")
    read_by = readers(model)
    # The selection: Gather(axis 1, index -1) + Unsqueeze, read by the LM head (a MatMul with a weight).
    found = [(producer[u.input[0]], u) for u in model.graph.node if u.op_type == "Unsqueeze"
             and u.input[0] in producer and producer[u.input[0]].op_type == "Gather" and picks_last(producer[u.input[0]])
             and any(r.op_type in heads for r in read_by.get(u.output[0], []))]
    if len(found) != 1:
        raise InputError("the decoder's logits cover only the last token, in a graph mlopt cannot widen back to every "
                         "position (perplexity needs them all)")
    gather, unsqueeze = found[0]
    for node in read_by[unsqueeze.output[0]]:
        node.input[:] = [gather.input[0] if i == unsqueeze.output[0] else i for i in node.input]
    for output in model.graph.output:
        if output.name == "logits":
            output.type.tensor_type.shape.dim[1].dim_param = "sequence_length"
    # shapes recorded with one position (the head's tensors): onnxruntime infers them again
    kept = [v for v in model.graph.value_info if not _one_position(v)]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    drop_dead(model)
    return True


def _one_position(value: Any) -> bool:
    dims = value.type.tensor_type.shape.dim
    return len(dims) == 3 and dims[1].HasField("dim_value") and dims[1].dim_value == 1


def lm_head(model: Any) -> str | None:
    """The name of the LM head (the MatMul or MatMulNBits whose output the logits come from), or None. Walks up from
    the logits through what follows the head (casts, bias, soft-capping, a vocabulary mask), following at each node
    the one input another node computes, the data input where there are several."""
    heads = ("MatMul", "MatMulNBits", "Gemm")
    producer = {o: n for n in model.graph.node for o in n.output}
    name = "logits"
    for _ in range(16):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type in heads:
            return node.name
        computed = [i for i in node.input if i in producer and producer[i].op_type != "Constant"]
        if not computed:
            return None
        name = computed[-1] if node.op_type == "Where" else computed[0]  # Where(mask, fill, x)
    return None
