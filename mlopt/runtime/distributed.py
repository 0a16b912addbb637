"""torch.distributed as mlopt uses it: one process per rank under torchrun, or a single process.

Under `torchrun` (WORLD_SIZE > 1) the process group is initialised once, with nccl on CUDA and
gloo on CPU. Only rank 0 writes artifacts, checkpoints and reports; metrics are summed across
ranks. A single process needs no process group at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from mlopt.core.errors import InputError

_initialised = False


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    launched: bool = False  # started by torchrun (even with a single process)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), launched)


def init(device_type: str) -> Dist:
    """Join the process group (once) when running under torchrun; return this rank's place."""
    global _initialised
    d = current()
    if d.enabled and not _initialised:
        import torch.distributed as td

        if not td.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            # torchrun keeps its store across elastic restarts; without a per-round prefix the
            # restarted ranks read the dead ranks' addresses and fail to connect.
            store, rank, world, round_, _ = _join_round()
            store = td.PrefixStore(f"mlopt/round{round_}", store)
            td.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
        _initialised = True
    return d


_round: tuple[Any, int, int, int, bool] | None = None  # _join_round's answer, once agreed


def _join_round(timeout: float = 600.0) -> tuple[Any, int, int, int, bool]:
    """(store, rank, world size, round, restarted): the number of this process's rendezvous round
    (1, 2, ...) and whether torchrun restarted the workers, both the same on every rank of the round.

    TORCHELASTIC_RESTART_COUNT can be neither across nodes: an agent counts a restart only when its
    own workers failed, and restarts the workers of the other nodes, uncounted, because the
    membership changed. Rank 0 takes the next number from a counter in torchrun's store (which
    outlives the rounds) and hands it to the other ranks: each asks under a fresh random key, which
    no earlier round can have answered, and acknowledges under the new number, so rank 0 keeps
    answering until every rank of this round has it (what dead ranks left in the store misleads
    neither side).
    """
    global _round
    if _round is None:
        import secrets
        import time
        from datetime import timedelta

        import torch.distributed as td

        store, rank, world = next(td.rendezvous("env://"))
        if rank == 0:
            round_ = store.add("mlopt/rounds", 1)
            counted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
            answer = f"{round_} {int(round_ > 1 or counted)}"
            waiting, answered, deadline = set(range(1, world)), {}, time.monotonic() + timeout
            while waiting:
                for r in sorted(waiting):
                    if store.check([f"mlopt/round{round_}/ack{r}"]):
                        waiting.discard(r)
                    elif store.check([f"mlopt/hello{r}"]):
                        key = store.get(f"mlopt/hello{r}").decode()
                        if answered.get(r) != key:  # rank r of this round, or a dead one of an earlier round
                            store.set(f"mlopt/welcome/{key}", answer)
                            answered[r] = key
                if waiting:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"ranks {sorted(waiting)} did not start within {timeout:.0f} s")
                    time.sleep(0.02)
        else:
            key = secrets.token_hex(16)
            store.set(f"mlopt/hello{rank}", key)
            store.wait([f"mlopt/welcome/{key}"], timedelta(seconds=timeout))
            answer = store.get(f"mlopt/welcome/{key}").decode()
            store.set(f"mlopt/round{answer.split()[0]}/ack{rank}", "1")
        round_, restarted_ = answer.split()
        _round = (store, rank, world, int(round_), restarted_ == "1")
    return _round


def backend() -> str | None:
    if not _initialised:
        return None
    import torch.distributed as td

    return td.get_backend()


def average_grads(params: list[Any]) -> None:
    """Average the gradients of parameters outside DistributedDataParallel across the ranks."""
    import torch.distributed as td

    world = td.get_world_size()
    for p in params:
        if p.grad is not None:
            td.all_reduce(p.grad)
            p.grad.div_(world)


def all_reduce_sum(values: list[float], device: Any) -> list[float]:
    """Sum a few scalars across ranks (a no-op in one process)."""
    if not _initialised:
        return values
    import torch
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t)
    return t.tolist()


def replica_max_diff(*modules: Any) -> float:
    """Largest difference between this rank's parameters and rank 0's, over all ranks.

    DistributedDataParallel keeps the parameters of all replicas identical, and mlopt averages the
    gradients of trained modules outside it; this checks both instead of assuming them. (Buffers
    such as batch-norm statistics are rank 0's by DDP's convention.)
    """
    import torch
    import torch.distributed as td

    worst = torch.zeros((), dtype=torch.float64, device=next(modules[0].parameters()).device)
    for p in (p for m in modules for p in m.parameters()):
        ref = p.detach().clone()
        td.broadcast(ref, src=0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max().double())
    td.all_reduce(worst, op=td.ReduceOp.MAX)
    return float(worst)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (picklable) on every rank; the object itself in one process."""
    if not _initialised:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _initialised:
        import torch.distributed as td

        td.barrier()


def restarted() -> bool:
    """True in the workers of a torchrun job that restarted them (elastic --max-restarts), on every node.

    Agreed by all ranks (see _join_round), so every rank calls it, or none."""
    return current().enabled and _join_round()[4]


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run this mlopt command under torchrun with `nproc` processes on this machine."""
    if nproc < 1:
        raise InputError("--nproc must be at least 1")
    if current().launched:
        raise InputError("--nproc cannot be used inside torchrun; torchrun already started the processes")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "mlopt", *argv]
    return subprocess.call(cmd)


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without '--nproc N' / '--nproc=N', for the processes torchrun starts."""
    drop = {i for i, arg in enumerate(argv) if arg == "--nproc"}
    return [a for i, a in enumerate(argv) if i not in drop and i - 1 not in drop and not a.startswith("--nproc=")]
