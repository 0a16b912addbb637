"""Hugging Face transformers models (``hf:DIR``) and the text they read (``text:FILE``).

Everything is offline: the model and its tokenizer come from a local directory (what
``save_pretrained`` writes), ``HF_HUB_OFFLINE=1`` is set before transformers is imported and
every load passes ``local_files_only=True``, so no hub access is ever attempted. Tokenized text
flows through mlopt as a dict of int64 tensors named as the model's inputs.

Needs the ``hf`` extra: ``pip install "mlopt[hf]"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlopt.core import console
from mlopt.core.errors import InputError, first_line, format_shape, pickled_objects_error, refused_pickle
from mlopt.core.memory import available_memory, readable_size

PREFIX = "hf:"
# The order of the exported model's inputs; a tokenizer that gives no token_type_ids drops it.
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


def is_hf_spec(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(PREFIX)


def is_text_artifact(artifact: Any) -> bool:
    return is_hf_spec((artifact.builder or {}).get("spec"))


def model_dir(spec: str) -> Path:
    path = Path(spec[len(PREFIX):]).expanduser()
    if not path.is_dir():
        raise InputError(f"{spec}: {path} is not a directory; hf: takes a local directory written by "
                         "save_pretrained (mlopt never downloads from the hub)")
    if not (path / "config.json").is_file():
        raise InputError(f"{spec}: {path} has no config.json; it is not a saved Hugging Face model")
    for name in ("config.json", "tokenizer_config.json"):
        if (path / name).is_file():
            auto_map = _read_json(path / name).get("auto_map")
            if auto_map:
                code = next(iter(auto_map.values())) if isinstance(auto_map, dict) else auto_map
                raise InputError(f"{spec}: {name} names code shipped with the model (auto_map: {code}); mlopt loads "
                                 "only architectures transformers implements and never runs code from a model folder")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # ValueError: bad JSON or not UTF-8
        raise InputError(f"{path} is not valid JSON: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _transformers() -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers
    except ImportError:
        raise InputError('hf: models need the transformers package: pip install "mlopt[hf]"') from None
    transformers.utils.logging.disable_progress_bar()
    return transformers


def read_config(spec: str) -> dict[str, Any]:
    path = model_dir(spec) / "config.json"
    config = _read_json(path)
    _check_size(config, path)
    return config


#: No tokenizer's token spans more characters than this (BERT's WordPiece gives up on longer words), so
#: a line cut at max_length times it keeps every token the tokenizer would keep.
CHARS_PER_TOKEN = 100

#: More layers than any released model has: transformers would build them one module at a time, without end.
MAX_LAYERS = 4096


#: A decoder larger than memory still exports (its parity check is skipped, said in the report); one larger than
#: this many times the memory cannot be loaded even in 16 bits a layer at a time.
MEMORY_FACTOR = 8


def _check_size(config: dict[str, Any], path: Path) -> None:
    """Refuse a config of absurd size before transformers builds it (it allocates layer by layer: a million layers
    grew memory for minutes before failing). The estimate is the embedding table and, per layer, four hidden x
    hidden projections and three hidden x intermediate ones."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def size(*keys: str) -> int:
        value = next((cfg[k] for k in keys if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)), 0)
        return max(value, 0)

    layers = size("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    if layers > MAX_LAYERS:
        raise InputError(f"{path} describes {layers:,} layers; mlopt builds models of at most {MAX_LAYERS:,}")
    hidden = size("hidden_size", "n_embd", "d_model", "dim")
    inner = size("intermediate_size", "n_inner", "ffn_dim", "hidden_dim") or 4 * hidden
    nbytes = 4 * (size("vocab_size") * hidden + layers * (4 * hidden * hidden + 3 * hidden * inner))
    available = available_memory()
    if available is not None and nbytes > MEMORY_FACTOR * available:
        raise InputError(f"{path} describes a model of about {readable_size(nbytes)} in float32, more than "
                         f"{MEMORY_FACTOR} times the {readable_size(available)} of memory available")


#: Config sizes that must be at least 1 where a config gives them (transformers and the decoder builder fail deep
#: inside, or build an empty model, on 0 or a negative size).
POSITIVE_SIZES = ("vocab_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer",
                  "num_attention_heads", "n_head", "intermediate_size")


def check_folder(spec: str) -> dict[str, Any]:
    """What can be told of an hf: folder before anything builds from it: its config (read_config's checks, sizes
    of at least 1, a model_type transformers knows) and its safetensors files whole. Returns the config."""
    path = model_dir(spec)
    config = read_config(spec)
    for cfg in (config, config.get("text_config")):
        for key in POSITIVE_SIZES if isinstance(cfg, dict) else ():
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise InputError(f"{path / 'config.json'}: {key} is {value}; a model needs at least 1")
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type not in _transformers().CONFIG_MAPPING:
        raise InputError(f"{path / 'config.json'}: model_type {model_type!r} is not one transformers "
                         f"{_transformers().__version__} knows")
    for weights in sorted(path.glob("*.safetensors")):
        _check_safetensors(weights)
    return config


#: A safetensors header larger than this is not one (the largest released checkpoints' are a few MB).
MAX_SAFETENSORS_HEADER = 100 * 2**20


def _check_safetensors(path: Path) -> dict[str, Any]:
    """The file holds its header and every tensor its header places (a copy cut short fails deep in the loader).
    Returns the header (each tensor's dtype, shape and offsets)."""
    size = path.stat().st_size
    problem = None
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > MAX_SAFETENSORS_HEADER or 8 + length > size:
            problem = "its header is cut short or not a safetensors header"
        else:
            try:
                header = json.loads(f.read(length).decode("utf-8"))
                ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                header, ends = None, []
            if not isinstance(header, dict):
                problem = "its header is not valid safetensors JSON"
            elif ends and 8 + length + max(ends) > size:
                problem = (f"it is cut short: its tensors end at byte {8 + length + max(ends):,} but the file has "
                           f"{size:,}")
    if problem:
        raise InputError(f"{path}: {problem}")
    return header


def _shape_mismatches(path: Path, auto: Any) -> list[str]:
    """The saved tensors whose shapes differ from those the folder's config.json builds (on the meta device, no
    memory), as 'NAME is AxB in FILE, CxD by config.json': transformers only points at a log. A checkpoint's
    names may carry the base model's prefix or lack it."""
    import torch

    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = f"{getattr(model, 'base_model_prefix', '') or ''}."
    found = []
    for weights in sorted(path.glob("*.safetensors")):
        for key, entry in _check_safetensors(weights).items():
            if key == "__metadata__" or not isinstance(entry, dict):
                continue
            saved = tuple(entry.get("shape", ()))
            for name in (key, key.removeprefix(prefix), prefix + key):
                if name in shapes:
                    if shapes[name] != saved:
                        found.append(f"{key} is {format_shape(saved) or 'a scalar'} in {weights.name}, "
                                     f"{format_shape(shapes[name]) or 'a scalar'} by config.json")
                    break
    return found


def is_classifier(config: dict[str, Any]) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _text_module_class() -> Any:
    import torch

    class TextModel(torch.nn.Module):
        """A transformers model with positional tensor inputs and one tensor output, for ONNX export."""

        def __init__(self, model: Any, output: str):
            super().__init__()
            self.model, self.output = model, output

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return getattr(self.model(**kwargs), self.output)

    return TextModel


def build(spec: str) -> Any:
    """The torch module of an ``hf:DIR`` spec, with its saved weights."""
    path = model_dir(spec)  # refuses a folder that names its own code before transformers is imported
    transformers = _transformers()
    config = check_folder(spec)
    auto = transformers.AutoModelForSequenceClassification if is_classifier(config) else transformers.AutoModel
    try:
        # Eager attention: the SDPA path's masking does not survive every exporter.
        model = auto.from_pretrained(str(path), local_files_only=True, trust_remote_code=False,
                                     attn_implementation="eager")
    except Exception as exc:
        if refused_pickle(exc):  # a pytorch_model.bin that is more than tensors
            raise pickled_objects_error(f"the weights in {path}", exc) from None
        mismatched = []
        if "mismatched" in str(exc):
            try:
                mismatched = _shape_mismatches(path, auto)
            except Exception:  # the message below stays as transformers gave it
                mismatched = []
        if mismatched:
            more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
            raise InputError(f"cannot load the Hugging Face model in {path}: its weights do not fit its config.json: "
                             f"{mismatched[0]}{more}") from None
        raise InputError(f"cannot load the Hugging Face model in {path}: {first_line(exc)}") from exc
    model.eval()
    return _text_module_class()(model, "logits" if is_classifier(config) else "last_hidden_state")


def tokenizer(spec: str) -> Any:
    path = model_dir(spec)
    check_folder(spec)  # the model's own faults first: they say more than its tokenizer's
    transformers = _transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise InputError(f"cannot load the tokenizer in {path}: {first_line(exc)}") from exc
    special = set(getattr(tok, "all_special_tokens", None) or [])
    if len(set(tok.get_vocab()) - special) == 0:  # transformers builds an empty one from config.json alone
        raise InputError(f"{path} has no tokenizer vocabulary (no tokenizer.json, vocab.txt or the like; only "
                         f"{len(special)} special tokens): every word would become unknown. Save the tokenizer "
                         "beside the model (tokenizer.save_pretrained)")
    return tok


def input_names(tok: Any) -> list[str]:
    """input_ids and attention_mask always; token_type_ids where the tokenizer produces them."""
    given = set(getattr(tok, "model_input_names", None) or [])
    return [n for n in INPUT_ORDER if n != "token_type_ids" or n in given]


def _max_positions(config: dict[str, Any]) -> int:
    return int(config.get("max_position_embeddings") or 512)


def model_info(spec: str) -> dict[str, Any]:
    """What later steps need to know about the model, kept in the artifact's builder."""
    config = read_config(spec)
    return {
        "model_type": config.get("model_type"),
        "num_heads": int(config.get("num_attention_heads") or 0),
        "hidden_size": int(config.get("hidden_size") or 0),
        "max_positions": _max_positions(config),
        "output": "logits" if is_classifier(config) else "last_hidden_state",
        "inputs": input_names(tokenizer(spec)),
    }


class TokenDataset:
    """Tokenized text: a torch-style map dataset of dicts {input name: int64 tensor (length,)}."""

    def __init__(self, tensors: dict[str, Any]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.tensors.items()}


def tokenize(data: Any, spec: str, max_length: int) -> Any:
    """Turn a text dataset's lines into token tensors with the model's tokenizer.

    Every line of the file is padded to the same length (the longest line, capped at
    `max_length`), which becomes the sample shape: timing and calibration use that length.
    """
    from dataclasses import replace

    tok = tokenizer(spec)
    names = input_names(tok)
    limit = min(max_length, _max_positions(read_config(spec)))
    chars = limit * CHARS_PER_TOKEN  # the lines were cut at --max-length's; the model may take far fewer tokens
    train, val = ([line[:chars] for line in lines] for lines in (data.train, data.val))
    length = max(len(ids) for ids in tok(train + val, truncation=True, max_length=limit)["input_ids"])

    def encode(lines: list[str]) -> TokenDataset:
        enc = tok(lines, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return TokenDataset({n: enc[n].long() for n in names})

    return replace(data, train=encode(train), val=encode(val), sample_shape=(length,))


def pooled(output: Any, inputs: dict[str, Any]) -> Any:
    """Mean of the token embeddings over real (unmasked) tokens; other outputs pass unchanged.

    numpy in, numpy out: how the fidelity of an encoder's sentence embeddings is scored.
    """
    import numpy as np

    if output.ndim != 3 or "attention_mask" not in inputs:
        return output.reshape(len(output), -1)
    mask = np.asarray(inputs["attention_mask"], dtype=np.float64)[..., None]
    return (output.astype(np.float64) * mask).sum(1) / np.maximum(mask.sum(1), 1.0)


def pooled_torch(states: Any, mask: Any) -> Any:
    """`pooled` in torch, differentiable: token states (N, L, H) averaged over the real tokens (attention mask 1);
    other outputs (logits) pass unchanged."""
    if states.dim() != 3:
        return states
    m = mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp_min(1.0)


def optimize(src: Path, dst: Path, info: dict[str, Any]) -> tuple[Path, dict[str, int], str | None]:
    """onnxruntime's transformer graph optimizer (attention, layer-norm and GELU fusions).

    Returns the path to quantize, the fusions it made, and a note when it could not run.
    """
    import contextlib
    import io

    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    model_type = info.get("model_type") if info.get("model_type") in MODEL_TYPES else "bert"
    try:
        with contextlib.redirect_stdout(io.StringIO()), console.muted_loggers("onnxruntime.transformers"):
            model = optimize_model(str(src), model_type=model_type, num_heads=info.get("num_heads", 0),
                                   hidden_size=info.get("hidden_size", 0))
            fused = {k: int(v) for k, v in (model.get_fused_operator_statistics() or {}).items() if v}
            model.save_model_to_file(str(dst))
        return dst, fused, None
    except Exception as exc:
        return src, {}, (f"onnxruntime's transformer optimizer failed ({type(exc).__name__}: "
                         f"{first_line(exc)[:120]}): its graph is no candidate; the model as exported is")


def example_inputs(artifact: Any, n: int) -> dict[str, Any]:
    """Fixed token inputs of the artifact's sequence length, for a model exported without data."""
    import torch

    values = {"input_ids": 1, "attention_mask": 1, "token_type_ids": 0}
    return {name: torch.full((n, artifact.sample_shape[0]), values[name], dtype=torch.long)
            for name in artifact.builder["hf"]["inputs"]}
