"""Atomic file and directory writes: nothing half-written is ever left under a final name."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any


#: The temporary file an atomic write fills before it takes the final name: "." + name + "." + mkstemp's eight
#: random characters + ".tmp". A process killed between the two (SIGKILL, a torchrun restart) leaves it behind.
_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a full disk is reported with the file it was writing
        raise


def atomic_write_target(name: str) -> str | None:
    """The file name an unfinished atomic write of `name` (a temporary file, see _TEMP) was to replace; None when
    `name` is not such a temporary file. Directories are kept: "a/.b.json.x1y2z3w4.tmp" gives "a/b.json"."""
    head, slash, base = name.rpartition("/")
    match = _TEMP.fullmatch(base)
    return f"{head}{slash}{match['name']}" if match else None


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def file_size_mb(path: Path) -> float:
    """Size of a model file plus any external-data files saved beside it with the same stem."""
    path = Path(path)
    return sum(p.stat().st_size for p in [path, *path.parent.glob(path.name + ".data")]) / 1e6


def path_fingerprint(path: Path) -> str | None:
    """What a step's input at `path` is: a file by its content; a directory by its listing (relative
    names, sizes and modification times: hashing every image of a dataset would take longer than
    some steps); None when nothing is there."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            rel = f.relative_to(path)
            if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                st = f.stat()
                h.update(os.fsencode(rel) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())  # any file name
        return h.hexdigest()
    return None


def digest(*parts: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
