"""Sharded data parallelism with PyTorch FSDP2 (`fully_shard` on a one-dimensional device mesh).

Each process keeps 1/N of the parameters, gradients and optimiser state; a unit's full parameters
exist only while it runs. mlopt shards per block (the repeated layers of a transformer, the
repeated residual blocks of a CNN) and otherwise per top-level child, then the root.

Three things here are mlopt's own rather than FSDP2's:
- Batch-norm statistics: FSDP2 does not synchronise buffers. DistributedDataParallel broadcasts
  rank 0's buffers before every training forward; a hook does the same here, so a sharded run
  computes what the unsharded one does.
- Mixed precision: FSDP2's policy casts parameters to bf16/fp16; normalisation layers keep float32
  parameters in their own units, because batch norm refuses low-precision weights with float32
  running statistics.
- The caller's module: training happens on a copy that shares the caller's tensors (no copy is made
  of the weights), so that the caller's module object can receive the gathered weights at the end
  and stay a plain `nn.Module` for export and the other steps.
"""

from __future__ import annotations

import copy
from typing import Any

from mlopt.core.errors import InputError

_NORMS = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm", "LocalResponseNorm")


def _is_norm(module: Any) -> bool:
    return any(n in type(module).__name__ for n in _NORMS) and any(True for _ in module.parameters(recurse=False))


def _has_params(module: Any) -> bool:
    return any(True for _ in module.parameters())


def units(module: Any) -> list[Any]:
    """The submodules to shard as units (the root is not among them).

    Repeated blocks: non-leaf modules held in an nn.ModuleList or nn.Sequential next to at least one
    more of the same class (transformer layers, residual blocks); the outermost such blocks are used.
    Without any, each top-level child that has parameters. FSDP2 gathers a unit's weights when its
    forward runs, so a container that is never called (ModuleList, ModuleDict) is never a unit: its
    children are.
    """
    from torch import nn

    def callable_units(m: Any) -> list[Any]:
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            return [u for c in m.children() if _has_params(c) for u in callable_units(c)]
        return [m]

    blocks: list[Any] = []
    inside: set[int] = set()
    for container in module.modules():
        if id(container) in inside or not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(container.children())
        for child in children:
            same = sum(type(c) is type(child) for c in children)
            if same >= 2 and any(True for _ in child.children()) and _has_params(child) and id(child) not in inside:
                blocks.extend(callable_units(child))
                inside.update(id(m) for m in child.modules())
    if not blocks:
        blocks = [u for c in module.children() if _has_params(c) for u in callable_units(c)]
    return blocks


def shard(module: Any, device_type: str, amp: str = "off", sample: Any = None) -> int:
    """Shard `module` in place across every process of the default group; returns the number of units.

    amp "bf16"/"fp16": parameters are gathered and computed in that precision (gradients are reduced in
    float32); normalisation layers stay float32. `sample`: a real input, run once before sharding to find
    parameters that are used outside the forward of the unit that holds them (tied weights, a weight
    read by its parent's forward): such units are left to their parent.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    import torch.distributed as td

    if not any(True for _ in module.parameters()):
        raise InputError("--shard: the model has no parameters to shard")
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    norms = [m for m in module.modules() if m is not module and _is_norm(m)] if low is not None else []
    blocks = [b for b in units(module) if all(b is not n for n in norms)]  # a norm may be a unit itself
    _same_start(module, device_type)  # before the probe: every rank must choose the same units
    if sample is not None:
        kept = self_contained(module, [*norms, *blocks], sample)
        norms, blocks = [m for m in norms if id(m) in kept], [m for m in blocks if id(m) in kept]
    mesh = init_device_mesh(device_type, (td.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    for m in norms:  # their own float32 units, inside the blocks that hold them
        fully_shard(m, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    for unit in blocks:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    module.register_forward_pre_hook(_broadcast_buffers)
    return len(norms) + len(blocks) + 1


def self_contained(module: Any, candidates: list[Any], sample: Any) -> set[int]:
    """The ids of the candidate units whose parameters are used only while their own forward runs.

    FSDP2 holds a unit's parameters sharded outside its forward, so a parameter read anywhere else
    (a weight tied between two units, a weight its parent reads directly) would be read sharded. One
    forward of `sample` (eval mode, no gradients) under a torch-function mode sees every tensor each
    operation takes; a candidate whose parameter is taken while it is not running is dropped, and the
    check repeats until none is. Written by hand: FSDP2 reports only ties between units, at wrap time.
    """
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    kept = list(candidates)
    was_training = module.training
    depth = {id(m): name.count(".") for name, m in module.named_modules()}
    module.eval()
    try:
        while kept:
            owner: dict[int, int] = {}
            for i, unit in sorted(enumerate(kept), key=lambda iu: depth[id(iu[1])]):
                owner.update((id(p), i) for p in unit.parameters())  # the innermost unit owns a parameter
            active: list[int] = []
            strays: set[int] = set()

            class Watch(TorchFunctionMode):
                def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                    for t in tree_leaves((args, kwargs or {})):
                        i = owner.get(id(t)) if isinstance(t, torch.nn.Parameter) else None
                        if i is not None and i not in active:
                            strays.add(i)
                    return func(*args, **(kwargs or {}))

            hooks = []
            for i, unit in enumerate(kept):
                # First and last, as FSDP2's own hooks run: a unit's other hooks may read its weights.
                hooks.append(unit.register_forward_pre_hook(lambda m, a, i=i: active.append(i), prepend=True))
                hooks.append(unit.register_forward_hook(lambda m, a, o, i=i: active.remove(i)))
            try:
                # No gradients, and the random numbers put back: a model that draws some in eval mode
                # must train as it would without the probe.
                with torch.no_grad(), torch.random.fork_rng(devices=[]), Watch():
                    module(**sample) if isinstance(sample, dict) else module(sample)
            finally:
                for h in hooks:
                    h.remove()
            if not strays:
                break
            kept = [u for i, u in enumerate(kept) if i not in strays]
    finally:
        module.train(was_training)
    return {id(u) for u in kept}


def _same_start(module: Any, device_type: str) -> None:
    """Every rank starts from rank 0's weights and buffers, as DistributedDataParallel does."""
    _broadcast([t.data for t in module.state_dict().values()], device_type)


def _broadcast(tensors: list[Any], device_type: str, bucket_bytes: int = 256 * 2**20) -> None:
    """Rank 0's values of these tensors, a few broadcasts in all: the tensors of one dtype are sent
    together, up to `bucket_bytes` at a time (through the device for nccl), as DDP does."""
    import torch
    import torch.distributed as td

    groups: dict[Any, list[list[Any]]] = {}
    for t in tensors:
        buckets = groups.setdefault(t.dtype, [[]])
        if buckets[-1] and sum(b.numel() * b.element_size() for b in buckets[-1]) >= bucket_bytes:
            buckets.append([])
        buckets[-1].append(t)
    for same in (bucket for buckets in groups.values() for bucket in buckets):
        flat = torch.cat([t.reshape(-1) for t in same]).to(device_type)
        td.broadcast(flat, src=0)
        offset = 0
        for t in same:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _broadcast_buffers(module: Any, args: Any) -> None:
    """Rank 0's buffers (batch-norm statistics) before each training forward, as DDP does."""
    import torch

    if module.training and torch.is_grad_enabled():
        sync_buffers(module)


def sync_buffers(module: Any) -> None:
    """Every rank takes rank 0's buffers. Each rank's forward updates its own batch-norm statistics, so
    they differ after a step; validation, checkpoints and the gathered model use rank 0's, as DDP does."""
    buffers = [b.data for b in module.buffers()]
    if buffers:
        _broadcast(buffers, buffers[0].device.type)


def training_copy(module: Any) -> Any:
    """A copy of `module` that shares its parameter and buffer tensors (nothing is copied), whose
    parameters the caller's module then gives up (they move to the meta device): sharding the copy
    frees the full weights. `gather_into` gives them back, trained."""
    import torch

    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    worker = copy.deepcopy(module, memo)
    meta: dict[int, Any] = {}  # one stand-in per parameter: a weight tied between two modules stays tied
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                if id(p) not in meta:
                    meta[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                sub._parameters[name] = meta[id(p)]
    return worker


def gather_into(worker: Any, host: Any) -> None:
    """Gather the sharded `worker`'s full weights and rank 0's buffers into `host` (on the CPU), on every rank."""
    sync_buffers(worker)
    state = {k: full_tensor(v).detach().cpu() for k, v in worker.state_dict().items()}
    host.load_state_dict(state, assign=True)
    tied: dict[int, list[str]] = {}
    for name, p in worker.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    for names in (n for n in tied.values() if len(n) > 1):  # load_state_dict(assign=True) gave each its own
        first = host.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            host.get_submodule(owner)._parameters[attr] = first


def full_tensor(t: Any) -> Any:
    """A DTensor's whole value (a collective: every rank calls it), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_bytes(tensors: Any) -> int:
    """Bytes this process holds of these tensors (a DTensor's local shard only)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def training_bytes(params: list[Any], optimizer: Any) -> dict[str, int]:
    """Parameter, gradient and optimiser-state bytes held by this process."""
    import torch

    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {"param_bytes": local_bytes(params), "grad_bytes": local_bytes(p.grad for p in params),
            "optimizer_bytes": local_bytes(state)}
