"""How much memory this machine can give, and sizes in words: what refusals of oversized input say."""

from __future__ import annotations


def readable_size(nbytes: int) -> str:
    """1234567 -> '1.23 MB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


def available_memory() -> int | None:
    """Memory the system can give without swapping: MemAvailable (free memory counts the page cache as
    used, and would refuse ordinary files on a machine that has read a lot), else the physical total."""
    import contextlib
    import os

    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
