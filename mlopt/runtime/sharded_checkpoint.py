"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written so that a half-written one is never loaded.

Layout under the step's checkpoint folder:

    sharded/step-000000120/            a finished checkpoint
        .metadata, __0_0.distcp, ...   DCP's files: every rank writes its own shards
        rank-0.pt, rank-1.pt, ...      each rank's own state (RNG, scheduler, position in the epoch)
        complete.json                  written last: the file list with sizes, and what was saved
    sharded/step-000000160.partial/    one being written (or left by a kill): never loaded

Every rank writes into the `.partial` folder; once all have finished, rank 0 writes `complete.json`
and renames the folder. A folder whose `complete.json` is missing, or whose files do not match it,
is half-written: it is skipped, the newest whole checkpoint is loaded instead, and the caller is
told which ones were skipped. DCP reshards on load, so a checkpoint written by N processes loads
into M processes (or into one plain, unsharded module).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

from mlopt.core.errors import InputError, first_line, storage_error
from mlopt.core.fsutil import atomic_write_json
from mlopt.runtime import distributed

MARKER = "complete.json"
_PARTIAL = ".partial"


class ShardedCheckpoints:
    """The sharded checkpoints of one training run, in `folder`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder) / "sharded"

    def save(self, step: int, state: dict[str, Any], rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write a checkpoint (a collective: every rank calls it); older ones are removed once it is whole."""
        import torch
        import torch.distributed.checkpoint as dcp

        dist = distributed.current()
        name = f"step-{step:09d}"
        partial, final = self.folder / (name + _PARTIAL), self.folder / name
        if dist.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        distributed.barrier()
        try:
            with _single_process_quiet():
                dcp.save(state, checkpoint_id=str(partial))
        except Exception as exc:
            error = _storage_error(exc, partial)
            if error is None:
                raise
            raise error from exc
        with open(partial / f"rank-{dist.rank}.pt", "wb") as f:
            torch.save(rank_state, f)
        distributed.barrier()
        if dist.is_main:
            files = {p.name: p.stat().st_size for p in sorted(partial.iterdir())}
            atomic_write_json(partial / MARKER, {**meta, "step": step, "world_size": dist.world_size, "files": files})
            if final.exists():  # the same step written again after a restart
                shutil.rmtree(final)
            os.replace(partial, final)
            for old in self.folder.iterdir():
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return final

    def latest(self) -> tuple[Path | None, list[str]]:
        """The newest whole checkpoint, and the names of the half-written ones passed over. Rank 0 looks and
        tells the others (a collective under torchrun), so that nodes whose view of a shared filesystem
        lags cannot pick different ones."""
        found: tuple[Path | None, list[str]] = (None, [])
        if distributed.current().is_main and self.folder.is_dir():
            whole, half = [], []
            for d in sorted(self.folder.iterdir()):
                if d.is_dir() and d.name.startswith("step-"):
                    (whole if _is_whole(d) else half).append(d)
            newest = whole[-1] if whole else None
            found = newest, [d.name for d in half if newest is None or d.name > newest.name]
        return distributed.broadcast_object(found)

    @staticmethod
    def marker(path: Path) -> dict[str, Any]:
        return json.loads((path / MARKER).read_text())

    @staticmethod
    def load(path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Load the checkpoint into `state` in place (a collective), resharding as needed; return this
        rank's own state (rank 0's when the checkpoint was written by another number of processes)."""
        import torch
        import torch.distributed.checkpoint as dcp

        dist = distributed.current()
        saved_world = ShardedCheckpoints.marker(path)["world_size"]
        try:
            with _single_process_quiet():
                dcp.load(state, checkpoint_id=str(path))
        except Exception as exc:
            raise _storage_error(exc, path) or InputError(
                f"the sharded checkpoint {path} could not be read ({type(exc).__name__}: {first_line(exc)[:160]}); "
                "rerun with --overwrite to start again") from exc
        rank = dist.rank if saved_world == dist.world_size else 0
        return torch.load(path / f"rank-{rank}.pt", map_location="cpu", weights_only=True)


def _storage_error(exc: BaseException, path: Path) -> InputError | None:
    """A full disk or a refused write, also behind DCP's CheckpointException (which holds each rank's failure)."""
    failures = [exc, *(failure[0] for failure in getattr(exc, "failures", {}).values())]
    return next(filter(None, (storage_error(f, path) for f in failures)), None)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it works "in a single process" without a process group: that is what mlopt meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _is_whole(path: Path) -> bool:
    if path.name.endswith(_PARTIAL):
        return False
    try:
        files = json.loads((path / MARKER).read_text())["files"]
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False
