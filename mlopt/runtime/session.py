"""onnxruntime sessions: provider names, availability checks and running a batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlopt.core.errors import InputError, RunError, first_line

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def available_providers() -> list[str]:
    import onnxruntime as ort

    names = {v: k for k, v in PROVIDERS.items()}
    return [names[p] for p in ort.get_available_providers() if p in names]


def make_session(path: Path | str | bytes, provider: str = "cpu", threads: int | None = None, spinning: bool = True,
                 weights_dir: Path | None = None) -> Any:
    """An InferenceSession on exactly the requested provider. `path` may be a serialized model instead, whose
    external weights lie in `weights_dir`.

    onnxruntime silently falls back to the CPU when a GPU provider fails to load (missing CUDA or
    cuDNN libraries); mlopt checks and raises instead, so a CUDA benchmark is never a CPU one.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise InputError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    available = available_providers()
    if provider not in available:
        hint = " (install onnxruntime-gpu for cuda/tensorrt)" if provider != "cpu" else ""
        raise InputError(f"provider {provider!r} is not available in this onnxruntime; available: "
                         f"{', '.join(available)}{hint}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if weights_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    chain = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    source = path if isinstance(path, bytes) else str(path)
    if isinstance(source, str) and not source.isascii():
        try:
            source.encode("utf-8")
        except UnicodeEncodeError:  # a name in another encoding: onnxruntime takes UTF-8 paths only
            raise InputError(f"onnxruntime cannot open {source!r}: the path is not valid UTF-8; rename it") from None
    try:
        session = ort.InferenceSession(source, sess_options=opts, providers=chain)
    except Exception as exc:
        shown = f"the graph of {weights_dir}" if isinstance(path, bytes) else path
        raise InputError(f"onnxruntime cannot load {shown}: {first_line(exc)}") from exc
    if session.get_providers()[0] != PROVIDERS[provider]:
        raise RunError(f"onnxruntime could not start {PROVIDERS[provider]} (it fell back to "
                       f"{session.get_providers()[0]}); check the CUDA/cuDNN/TensorRT libraries")
    return session


_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}


def input_specs(session: Any) -> list[tuple[str, list[Any], Any]]:
    """Name, shape (ints or symbolic names) and numpy dtype of each of the session's inputs."""
    import numpy as np

    specs = []
    for meta in session.get_inputs():
        if meta.type not in _DTYPES:
            raise InputError(f"unsupported model input type {meta.type} ({meta.name})")
        specs.append((meta.name, list(meta.shape), np.dtype(_DTYPES[meta.type])))
    return specs


def value_info_specs(values: Any) -> list[tuple[str, list[Any], Any]]:
    """`input_specs` of an ONNX graph's inputs (ValueInfoProtos) without a session: a dimension is its size where
    fixed, else its symbolic name."""
    from onnx.helper import tensor_dtype_to_np_dtype

    return [(v.name, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim],
             tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)) for v in values]


def make_feed(session: Any, x: Any) -> dict[str, Any]:
    """The feed for one batch: a numpy array for a single-input model, or a dict by input name."""
    specs = input_specs(session)
    if isinstance(x, dict):
        missing = [name for name, _, _ in specs if name not in x]
        if missing:
            raise InputError(f"the model's input {missing[0]!r} is not in the data (it gives {', '.join(x)})")
        return {name: x[name].astype(dtype, copy=False) for name, _, dtype in specs}
    if len(specs) != 1:
        raise InputError(f"the model takes {len(specs)} inputs ({', '.join(s[0] for s in specs)}); the data gives one")
    return {specs[0][0]: x.astype(specs[0][2], copy=False)}


def synthetic_feed(session: Any, batch: int, sample_shape: tuple[int, ...], rng: Any) -> dict[str, Any]:
    """Inputs for timing: Gaussian floats; for token models, token ids, an all-ones mask, zero type ids; for an
    integer input mlopt exported with its vocabulary (`VOCAB_KEY`), ids below it."""
    import numpy as np

    from mlopt.runtime.models import VOCAB_KEY, parse_vocabulary

    feed, full = {}, (batch, *sample_shape)
    vocab = parse_vocabulary(session.get_modelmeta().custom_metadata_map.get(VOCAB_KEY))
    for name, _, dtype in input_specs(session):
        if np.issubdtype(dtype, np.floating):
            feed[name] = rng.standard_normal(full).astype(dtype)
        elif "mask" in name:
            feed[name] = np.ones(full, dtype)
        elif "type" in name or "position" in name:
            feed[name] = np.zeros(full, dtype)
        elif "ids" in name:
            # Ids below 5 exist in every vocabulary; a transformer's cost does not depend on the tokens.
            feed[name] = rng.integers(0, 5, size=full).astype(dtype)
        elif vocab is not None:  # token ids of a model mlopt exported (its input's vocabulary)
            feed[name] = rng.integers(0, vocab, size=full).astype(dtype)
        else:  # an integer input of unknown meaning: most often ids into a table, and 0..4 index any of them
            feed[name] = rng.integers(0, 5, size=full).astype(dtype)
    return feed


def run_session(session: Any, x: Any) -> Any:
    """Run a model on one batch (numpy array, or dict of arrays by input name); returns the first output."""
    return run_session_all(session, x)[0]


def run_session_all(session: Any, x: Any) -> list[Any]:
    """Run a model on one batch; returns every output, in the graph's order."""
    feed = make_feed(session, x)
    try:
        return session.run(None, feed)
    except Exception as exc:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feed.items())
        raise InputError(f"onnxruntime rejected an input of shape {shapes}: {first_line(exc)}") from exc
