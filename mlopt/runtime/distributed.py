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
            # torchrun keeps its store across elastic restarts; without a per-attempt prefix the
            # restarted ranks read the dead ranks' addresses and fail to connect.
            store, rank, world = next(td.rendezvous("env://"))
            store = td.PrefixStore(f"mlopt/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            td.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
        _initialised = True
    return d


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


def barrier() -> None:
    if _initialised:
        import torch.distributed as td

        td.barrier()


def restarted() -> bool:
    """True in a worker that torchrun restarted after a failure (elastic --max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


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
