"""onnxruntime sessions: provider names, availability checks and running a batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlopt.errors import InputError, RunError, first_line

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def available_providers() -> list[str]:
    import onnxruntime as ort

    names = {v: k for k, v in PROVIDERS.items()}
    return [names[p] for p in ort.get_available_providers() if p in names]


def make_session(path: Path | str, provider: str = "cpu", threads: int | None = None, spinning: bool = True) -> Any:
    """An InferenceSession on exactly the requested provider.

    onnxruntime silently falls back to the CPU when a GPU provider fails to load (missing CUDA or
    cuDNN libraries); mlopt checks and raises instead, so a CUDA benchmark is never a CPU one.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise InputError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    available = available_providers()
    if provider not in available:
        raise InputError(
            f"provider {provider!r} is not available in this onnxruntime; available: {', '.join(available)}"
            + (" (install onnxruntime-gpu for cuda/tensorrt)" if provider != "cpu" else "")
        )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chain = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=chain)
    except Exception as exc:
        first = first_line(exc)
        raise InputError(f"onnxruntime cannot load {path}: {first}") from exc
    if session.get_providers()[0] != PROVIDERS[provider]:
        raise RunError(
            f"onnxruntime could not start {PROVIDERS[provider]} (it fell back to {session.get_providers()[0]}); "
            "check the CUDA/cuDNN/TensorRT libraries"
        )
    return session


def input_spec(session: Any) -> tuple[str, list[Any], Any]:
    """Name, shape (ints or symbolic names) and numpy dtype of the session's first input."""
    import numpy as np

    meta = session.get_inputs()[0]
    dtypes = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(double)": np.float64,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(uint8)": np.uint8,
        "tensor(int8)": np.int8,
    }
    if meta.type not in dtypes:
        raise InputError(f"unsupported model input type {meta.type}")
    return meta.name, list(meta.shape), dtypes[meta.type]


def run_session(session: Any, x: Any) -> Any:
    """Run a single-input model on a numpy array; returns the first output."""
    name, _, dtype = input_spec(session)
    try:
        return session.run(None, {name: x.astype(dtype, copy=False)})[0]
    except Exception as exc:
        first = first_line(exc)
        raise InputError(f"onnxruntime rejected an input of shape {tuple(x.shape)}: {first}") from exc
