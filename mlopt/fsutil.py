"""Atomic file and directory writes: nothing half-written is ever left under a final name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlopt.errors import InputError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_output_dir(out: Path, overwrite: bool, resumable: bool = False) -> None:
    """Refuse an existing non-empty output directory unless asked to overwrite; check writability.

    Called before any work starts so that a long run does not fail at the very end.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        interrupted = resumable and any((out / name).exists() for name in (".checkpoint", ".checkpoints", "report.json"))
        hint = "pass --resume to continue the interrupted run or --overwrite to replace it" if interrupted else "pass --overwrite to replace it"
        raise InputError(f"--out {out} exists and is not empty ({hint})")
    parent = _nearest_existing_parent(out)
    if not parent.is_dir():
        raise InputError(f"cannot create --out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {parent}: permission denied")


def _nearest_existing_parent(path: Path) -> Path:
    path = path.absolute()
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path("/")


def staging_dir(final: Path) -> Path:
    """A fresh empty directory beside `final` (same filesystem, so the rename is atomic)."""
    final = Path(final).absolute()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    except OSError as exc:
        raise InputError(f"cannot write to {final.parent}: {exc.strerror or exc}") from exc


def commit_dir(staged: Path, final: Path) -> None:
    """Move a finished staging directory into place, replacing whatever was at `final`."""
    final = Path(final)
    if final.exists():
        trash = Path(tempfile.mkdtemp(dir=final.absolute().parent, prefix=f".{final.name}.", suffix=".old"))
        os.replace(final, trash / final.name)
        os.replace(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, final)


def discard_dir(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)


def file_size_mb(path: Path) -> float:
    """Size of a model file plus any external-data files saved beside it with the same stem."""
    path = Path(path)
    total = path.stat().st_size
    for sibling in path.parent.glob(path.name + ".data"):
        total += sibling.stat().st_size
    return total / 1e6


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path_fingerprint(path: Path) -> str | None:
    """What a step's input at `path` is: a file by its content; a directory by its listing (relative
    names, sizes and modification times: hashing every image of a dataset would take longer than
    some steps); None when nothing is there."""
    import hashlib

    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.rglob("*")):
            rel = f.relative_to(path)
            if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                st = f.stat()
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    return None


def digest(*parts: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
