"""The --out directory: mlopt writes there only what it records, and removes only what it recorded.

The contract is the README's ("Output folders are safe to point anywhere"): every entry mlopt writes is
recorded in a marker file (`.mlopt-output.json`; checkpoints and staging folders as whole trees, before
they are created); --overwrite and --resume refuse a folder holding anything unrecorded; one run at a
time holds an flock on the folder itself, which the kernel releases however the process ends.

The marker is read defensively: entries that are absolute, hold `..`, or are not strings are
ignored (so a hand-edited marker cannot make mlopt remove anything outside the folder), and removal
walks the real tree without following links, so a recorded name that has become a symbolic link is
unlinked, never followed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from mlopt.core import console
from mlopt.core.errors import InputError
from mlopt.core.fsutil import atomic_write_json, atomic_write_target

MARKER = ".mlopt-output.json"
MARKER_VERSION = 1


def _valid_rel(entry: object) -> bool:
    if not isinstance(entry, str) or not entry:
        return False
    p = PurePosixPath(entry)
    return not p.is_absolute() and ".." not in p.parts and "." not in p.parts and entry == str(p)


class OutputDir:
    """An --out folder as mlopt sees it: what it recorded writing there, under an exclusive lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.created = False  # this run made the folder (and removes it again if it writes nothing)
        self._fd: int | None = None
        self._entries: set[str] = set()  # files and folders mlopt wrote (relative POSIX paths)
        self._trees: set[str] = set()  # folders whose whole content is mlopt's (checkpoints, staging)

    def _read_marker(self) -> bool:
        """Load the marker; False when there is none (or it is unreadable: then nothing is recorded)."""
        self._entries, self._trees = set(), set()
        try:
            raw = json.loads((self.path / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(raw, dict) or raw.get("mlopt_output") != MARKER_VERSION:
            return False
        for key, target in (("entries", self._entries), ("trees", self._trees)):
            values = raw.get(key)
            if isinstance(values, list):
                target.update(v for v in values if _valid_rel(v))
        return True

    def owns(self, rel: str) -> bool:
        """Whether mlopt recorded writing `rel`; also the temporary file of an atomic write of such an entry
        (`atomic_write_target`) that a killed run left unfinished."""
        target = atomic_write_target(rel)
        return any(r == MARKER or r in self._entries or _under(r, self._trees) for r in (rel, target) if r)

    def _walk(self, rel_dir: str = "") -> Iterator[tuple[str, os.DirEntry]]:
        """Every entry below the folder (sorted, parents first), never descending into a link."""
        top = self.path / rel_dir if rel_dir else self.path
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            yield rel, e
            if e.is_dir(follow_symlinks=False):
                yield from self._walk(rel)

    def first_foreign(self) -> str | None:
        """The first entry mlopt did not record writing (a folder before what it holds), or None.

        A symbolic link counts as foreign unless it lies inside a recorded tree: mlopt writes none."""
        for rel, e in self._walk():
            if not self.owns(rel) or (e.is_symlink() and not _under(rel, self._trees, inclusive=False)):
                return rel
        return None

    def check(self, replace: bool, resume: bool = False) -> None:
        """Refuse what this run may not write into, before any work starts.

        replace: --overwrite or --resume was given (an earlier mlopt output may be there).
        """
        out = self.path
        if out.is_symlink() and not out.exists():
            raise InputError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist")
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
        if out.is_dir():
            self._check_contents(replace, resume)
        parent = next((p for p in [out.absolute(), *out.absolute().parents] if p.exists()), Path("/"))
        if not parent.is_dir():
            raise InputError(f"cannot create --out {out}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"cannot write to {parent}: permission denied")

    def _check_contents(self, replace: bool, resume: bool) -> None:
        out = self.path
        try:
            empty = not any(out.iterdir())
        except OSError as exc:
            raise InputError(f"cannot read --out {out}: {exc.strerror or exc}") from None
        if empty:
            return
        marked = self._read_marker()
        foreign = self.first_foreign()
        if foreign is not None:
            what = "a symbolic link" if (out / foreign).is_symlink() else (
                "a folder" if (out / foreign).is_dir() else "a file")
            whose = "that no mlopt run recorded writing" if marked else "and no record of an mlopt run"
            raise InputError(f"--out {out} holds {what} {foreign!r} {whose}; --overwrite replaces only mlopt's own "
                             "output: choose a new or empty folder, or move that entry away")
        if not replace:
            interrupted = any(self.owns(n) and (out / n).exists() for n in (".checkpoint", ".checkpoints", "report.json"))
            hint = ("pass --resume to continue the interrupted run or --overwrite to replace it"
                    if interrupted and not resume else "pass --overwrite to replace it")
            raise InputError(f"--out {out} exists and is not empty ({hint})")

    def open(self, replace: bool, resume: bool = False) -> "OutputDir":
        """Create the folder if needed, take its lock, check it again under the lock, write the marker."""
        out = self.path
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.mkdir()
            self.created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise InputError(f"cannot create --out {out}: {exc.strerror or exc}") from None
        try:
            self._lock()
            self._check_contents(replace, resume)  # another run may have written here since the check
            self._read_marker()
            for stale in sorted(t for t in self._trees if t.endswith(".partial")):
                self.remove(stale)  # a step a killed run left half-written: nobody else holds the lock
            for rel, entry in list(self._walk()):
                if atomic_write_target(rel) and entry.is_file(follow_symlinks=False) and self.owns(rel):
                    self.remove(rel)  # a write a killed run left unfinished (its final file is whole or absent)
            self._write_marker()
        except BaseException:
            self.close()
            raise
        return self

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: runs are not serialised
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"--out {self.path} is being written by another mlopt run; wait for it to finish or "
                             "choose another folder") from None
        except OSError as exc:  # a file system without locks (some network and FUSE mounts): carry on unlocked
            os.close(fd)
            console.warn(f"cannot lock --out {self.path} ({exc.strerror or exc}): two runs on it at once would "
                         "not be refused")
            return
        self._fd = fd

    def _write_marker(self) -> None:
        atomic_write_json(self.path / MARKER, {"mlopt_output": MARKER_VERSION, "entries": sorted(self._entries),
                                               "trees": sorted(self._trees)})

    def claim_tree(self, rel: str) -> Path:
        """Record a folder as wholly mlopt's before it is created (checkpoints); return its path."""
        if rel not in self._trees:
            self._trees.add(rel)
            self._write_marker()
        return self.path / rel

    def staging(self, name: str) -> Path:
        """A fresh, recorded, empty folder inside --out to write a step into before it is committed."""
        while True:
            rel = f".{name or 'out'}.{secrets.token_hex(4)}.partial"
            if not (self.path / rel).exists():
                break
        path = self.claim_tree(rel)
        path.mkdir()
        return path

    def commit(self, staged: Path, rel: str) -> None:
        """Move a finished staging folder into place as `rel` ('' = the folder itself, a flat output).

        A step folder replaces the recorded one of the same name; a flat output is moved in file by
        file, then what the earlier output recorded and this one does not write is removed.
        """
        staged_rel = staged.name
        if rel:
            if (self.path / rel).exists() or (self.path / rel).is_symlink():
                self.remove(rel)
            os.replace(staged, self.path / rel)
            names = [rel]
        else:
            names = sorted(p.name for p in staged.iterdir())
            for name in names:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    self.remove(name)
                os.replace(staged / name, target)  # replaces a file (or a link: never what it points to)
            staged.rmdir()
            for old in sorted({e.split("/")[0] for e in self._entries} - set(names)):
                self.remove(old)  # what the earlier output recorded and this one does not write
        self._trees.discard(staged_rel)
        self._entries.update(names)
        self._entries.update(sub for name in names for sub, _ in self._walk(name))
        self._write_marker()

    def record(self, rel: str) -> None:
        """Record a file written straight into the folder (reports)."""
        if rel not in self._entries:
            self._entries.add(rel)
            self._write_marker()

    def remove(self, rel: str) -> None:
        """Remove a recorded entry (a file, or a folder and what it recorded inside); links are unlinked,
        never followed; anything unrecorded inside is left where it is."""
        path = self.path / rel
        if not self.owns(rel):
            return
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.is_dir() and _under(rel, self._trees):
            shutil.rmtree(path, ignore_errors=True)  # rmtree never follows links inside the tree
        elif path.is_dir():
            for sub, e in sorted(self._walk(rel), key=lambda x: -x[0].count("/")):  # deepest first
                if not self.owns(sub):
                    continue
                if e.is_dir(follow_symlinks=False):
                    with contextlib.suppress(OSError):  # something unrecorded inside: left there
                        os.rmdir(self.path / sub)
                else:
                    (self.path / sub).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.rmdir()
        self._entries = {e for e in self._entries if not _under(e, [rel])}
        self._trees = {t for t in self._trees if not _under(t, [rel])}

    def remove_tree(self, rel: str) -> None:
        """Remove a recorded tree (a finished step's checkpoints, a failed step's staging) and forget it."""
        self.remove(rel)
        self._write_marker()

    def clear(self) -> None:
        """--overwrite of a recipe run: remove everything an earlier run recorded."""
        for name in sorted({e.split("/")[0] for e in self._entries | self._trees}):
            if name != MARKER:
                self.remove(name)
        self._entries, self._trees = set(), set()
        self._write_marker()

    def close(self) -> None:
        """Release the lock; a folder this run created and wrote nothing into is removed again, and a
        marker with nothing recorded is not left in a folder of the user's."""
        try:
            if not self._entries and not any((self.path / t).exists() for t in self._trees):
                only_marker = [p.name for p in self.path.iterdir()] in ([], [MARKER])
                if only_marker:
                    (self.path / MARKER).unlink(missing_ok=True)
                    if self.created:
                        self.path.rmdir()
        except OSError:
            pass
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _under(rel: str, roots: Any, inclusive: bool = True) -> bool:
    """Whether `rel` lies inside one of the relative folders `roots` (or is one, when inclusive)."""
    return any((inclusive and rel == r) or rel.startswith(r + "/") for r in roots)


def check_replaceable_file(path: Path, written_by_mlopt: Callable[[str], bool], overwrite: bool, what: str) -> None:
    """A single file mlopt is asked to write (--save-recipe, --junit): an existing one is replaced only
    when it is mlopt's own kind of file (or --overwrite says so); never a folder or a link's target."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise InputError(f"{what} {path} exists and is not a plain file; choose another path")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{what} {path}: {folder} is not an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: cannot write in {folder} (permission denied)")
    if not path.exists() or overwrite:
        return
    try:
        ours = written_by_mlopt(path.read_text(encoding="utf-8", errors="replace")[:65536])
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not ours:
        raise InputError(f"{what} {path} exists and mlopt did not write it; choose another path")
