"""What machine and libraries a measurement was taken on: recorded in every report."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16", "asimd", "sve")


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of `keys`."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(keys)), None)
    except OSError:
        return None


@lru_cache(maxsize=1)
def cpu_flags() -> tuple[str, ...]:
    """The instruction-set extensions that matter for INT8/BF16 kernels, read from /proc/cpuinfo."""
    present = set((_cpuinfo("flags", "Features") or "").split())
    return tuple(flag for flag in _ISA_FLAGS if flag in present)


def cpu_name() -> str:
    name = _cpuinfo("model name")
    return name if name is not None else platform.processor() or platform.machine()


def describe() -> dict[str, Any]:
    import contextlib
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for name in ("mlopt", "torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(PackageNotFoundError):
            libs[name] = version(name)
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "isa": list(cpu_flags()), "libraries": libs}
