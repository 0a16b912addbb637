"""Structured pruning that survives the user's model: a group Torch-Pruning cannot handle is kept whole.

Torch-Pruning's dependency graph couples the layers that must lose the same channels and maps channel indices
through concatenations, splits and reshapes by rules that fail on some graphs: a rule raises, an index lands out
of its layer's range, index lists grow without bound through chains of reshapes, or the pruned model no longer
runs. No library checks this group by group, so it is written here:

1. While the graph is built (`guarded`), a mapping rule that raises marks its node unmapped, and a group whose
   index lists outgrow any layer of the model is stopped and marked failed.
2. Before pruning, every group is screened: no failed or unmapped node, every index within its layer's range; an
   importance that raises or is not finite keeps its group whole too.
3. Groups are pruned one by one on a copy of the model, which must then run on a probe batch with the same output
   shapes and finite values. If it does not, pruning starts again from the unpruned model, probing after each
   group; the group after which the probe fails is kept whole, and so on.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator
from unittest.mock import patch

from mlopt.core.errors import first_line
from mlopt.runtime.models import flat_tensors

ROUNDS = 12  # pruning attempts before giving up (each one keeps at least one more group whole)
MAX_GROUP_DEPS = 20_000  # a group with more dependencies than this is a runaway of the index mapping


class _Runaway(Exception):
    pass


@dataclass
class Kept:
    """A group of layers kept whole, and why."""

    layers: list[str]
    reason: str
    outputs: list[str] = field(default_factory=list)  # the layers whose output channels the group prunes


@dataclass
class Trace:
    """What went wrong while Torch-Pruning built its graph and groups (filled by `guarded`)."""

    unmapped: dict[Any, str] = field(default_factory=dict)  # graph node -> why its index mapping failed
    failed: dict[Any, str] = field(default_factory=dict)  # root module -> why its group could not be built


@dataclass
class Outcome:
    module: Any
    kept: dict[str, Kept]


@contextlib.contextmanager
def guarded(module: Any) -> Iterator[Trace]:
    """Patch Torch-Pruning while the block runs so that graph and group building fail per node and per group."""
    from torch_pruning import ops
    from torch_pruning.dependency import graph, group, index_mapping as im
    from torch_pruning.dependency.dependency import Dependency

    trace = Trace()
    widest = max((max(p.shape) for p in module.parameters() if p.dim()), default=1)
    updaters = {ops.OPTYPE.CONCAT: im.update_concat_index_mapping, ops.OPTYPE.SPLIT: im.update_split_index_mapping,
                ops.OPTYPE.RESHAPE: im.update_reshape_index_mapping, ops.OPTYPE.UNBIND: im.update_unbind_index_mapping,
                ops.OPTYPE.EXPAND: im.update_expand_index_mapping, ops.OPTYPE.SLICE: im.update_slice_index_mapping}

    def update_index_mapping(dg: Any) -> None:
        for node in list(dg.module2node.values()):
            update = updaters.get(node.type)
            if update is None or node in trace.unmapped:
                continue
            if node.type == ops.OPTYPE.SPLIT and _last_dim_split(node):
                # Torch-Pruning turns index mapping off for every split downstream of a 3-d parameter (a ViT's
                # position embedding) for the sake of a class-token concat along the tokens; a split along the
                # last dim (a gated feed-forward's chunk(2, dim=-1), EVA-02's) splits channels and needs it
                node.enable_index_mapping = True
            try:
                update(dg, node)
            except Exception as exc:
                trace.unmapped[node] = f"{type(exc).__name__}: {first_line(exc)[:120]}"

    add_dep, get_pruning_group = group.Group.add_dep, graph.DependencyGraph.get_pruning_group
    has_pruning_op = group.Group.has_pruning_op

    def bounded_add_dep(self: Any, dep: Any, idxs: Any) -> None:
        if len(idxs) > 4 * widest or len(self._group) > MAX_GROUP_DEPS:
            raise _Runaway(f"its channel indices multiply through reshapes past any layer's width ({len(idxs)} "
                           f"indices, {len(self._group)} dependencies)")
        add_dep(self, dep, idxs)
        ops_index = vars(self).setdefault("_mlopt_ops", [set(), 0])
        key = _op_key(dep, idxs)
        if key is None or ops_index[1] < 0:
            ops_index[1] = -1  # an index that is no plain integer: Torch-Pruning's own scan from now on
            return
        ops_index[0].add(key)
        ops_index[1] += 1

    def indexed_has_pruning_op(self: Any, dep: Any, idxs: Any) -> bool:
        # Torch-Pruning scans the whole group, comparing index lists, for every dependency it follows: quadratic,
        # minutes for one group of a DPN's dense concatenations. The same answer from a set of the group's operations.
        ops_index = vars(self).get("_mlopt_ops")
        key = _op_key(dep, idxs)
        if ops_index is None or ops_index[1] != len(self._group) or key is None:  # built another way: its own scan
            return has_pruning_op(self, dep, idxs)
        return key in ops_index[0]

    def safe_get_pruning_group(self: Any, module_: Any, pruning_fn: Any, idxs: Any) -> Any:
        try:
            return get_pruning_group(self, module_, pruning_fn, idxs)
        except Exception as exc:  # keep the root alone; the screen keeps this group whole
            trace.failed[module_] = (str(exc) if isinstance(exc, _Runaway)
                                     else f"building it raised {type(exc).__name__}: {first_line(exc)[:120]}")
            root = self.module2node[module_]
            alone = group.Group()
            alone._DG = self
            alone.add_dep(Dependency(pruning_fn, pruning_fn, source=root, target=root), list(idxs))
            return alone

    # Torch-Pruning's warnings are about the cases handled here
    with warnings.catch_warnings(), patch.object(im, "update_index_mapping", update_index_mapping), \
            patch.object(group.Group, "add_dep", bounded_add_dep), \
            patch.object(group.Group, "has_pruning_op", indexed_has_pruning_op), \
            patch.object(graph.DependencyGraph, "get_pruning_group", safe_get_pruning_group):
        warnings.simplefilter("ignore")
        yield trace


def _op_key(dep: Any, idxs: Any) -> tuple | None:
    """What Group.has_pruning_op compares: the node (by identity, as Torch-Pruning's Node compares), the
    handler, and the (index, root index) pairs; None when an index is not a plain integer."""
    if not all(type(v) is int for i in idxs for v in (i if isinstance(i, tuple) else (i,))):
        return None
    return id(dep.target), dep.handler, tuple(idxs)


def _last_dim_split(node: Any) -> bool:
    """Whether a split node of Torch-Pruning's graph splits its input's last dim (the channels of a Linear)."""
    dim, sizes = getattr(node.grad_fn, "_saved_dim", None), getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if not isinstance(dim, int) or sizes is None:
        return False
    dim = dim - 2**64 if dim >= 2**63 else dim  # autograd keeps dim=-1 as an unsigned 64-bit integer
    return dim in (-1, len(sizes) - 1)


def group_layers(dg: Any, grp: Any) -> list[str]:
    """Names of the modules and parameters a group changes, its root first."""
    names: list[str] = []
    for dep, _ in grp:
        target = dep.target.module
        name = dg._module2name.get(target) or dg._param_to_name.get(target)
        if name and name not in names:
            names.append(name)
    return names


def _name(dg: Any, node: Any) -> str:
    return dg._module2name.get(node.module) or node.name


def group_problem(dg: Any, grp: Any, trace: Trace) -> str | None:
    """Why a group cannot be pruned safely, or None."""
    root = grp[0].dep.target.module
    if root in trace.failed:
        return trace.failed[root]
    for dep, idxs in grp:
        for node in (dep.source, dep.target):
            if node in trace.unmapped:
                return f"Torch-Pruning cannot map channels through {_name(dg, node)} ({trace.unmapped[node]})"
        if not idxs:
            continue
        channels = (dg.get_out_channels(dep.target) if dg.is_out_channel_pruning_fn(dep.handler)
                    else dg.get_in_channels(dep.target) if dg.is_in_channel_pruning_fn(dep.handler) else None)
        if channels is not None and (max(idxs) >= channels or min(idxs) < 0):
            return f"Torch-Pruning maps channel {max(idxs)} onto {_name(dg, dep.target)}, which has {channels}"
    return None


def screen(pruner: Any, trace: Trace, kept: dict[str, Kept]) -> None:
    """Keep whole (add to the pruner's ignored layers) every group that fails the checks of `group_problem`."""
    dg = pruner.DG
    for grp in dg.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        problem = group_problem(dg, grp, trace)
        if problem is not None:
            keep(pruner, grp, problem, kept)


def kept_group(dg: Any, grp: Any, reason: str) -> Kept:
    import torch

    outputs = [dg._module2name.get(dep.target.module) for dep, _ in grp
               if isinstance(dep.target.module, torch.nn.Module) and dg.is_out_channel_pruning_fn(dep.handler)]
    return Kept(group_layers(dg, grp), reason, list(dict.fromkeys(n for n in outputs if n)))


def kept_key(record: Kept) -> str:
    """What a kept group is filed under: the layers whose outputs it prunes (two groups can start with the same
    layer: an attention's output projection reads one group's channels and writes the residual stream's)."""
    return " ".join(record.outputs) or " ".join(record.layers)


def keep(pruner: Any, grp: Any, reason: str, kept: dict[str, Kept]) -> None:
    """Keep a group whole: ignoring the layers whose output channels it prunes skips it."""
    record = kept_group(pruner.DG, grp, reason)
    kept.setdefault(kept_key(record), record)
    modules = dict(pruner.DG.model.named_modules())
    pruner.ignored_layers.extend(modules[n] for n in record.outputs)


def checked_importance(pruner: Any, trace: Trace, kept: dict[str, Kept]) -> None:
    """An importance that raises or is not finite keeps its group whole (Torch-Pruning skips a group scored None)."""
    import torch

    score = pruner.estimate_importance

    def estimate(grp: Any) -> Any:
        try:
            imp = score(grp)
        except Exception as exc:
            keep(pruner, grp, f"its importance raised {type(exc).__name__}: {first_line(exc)[:120]}", kept)
            return None
        if imp is not None and not bool(torch.isfinite(imp).all()):
            keep(pruner, grp, "its importance is not finite", kept)
            return None
        return imp

    pruner.estimate_importance = estimate


def outputs(module: Any, x: Any) -> list[Any]:
    """The tensors the module returns for x (named inputs when a dict; nested tuples, lists and dicts flattened)."""
    import torch

    module.eval()
    with torch.no_grad():
        return flat_tensors(module(**x) if isinstance(x, dict) else module(x))


def probe(module: Any, x: Any, reference: list[tuple[int, ...]]) -> str | None:
    """Why the pruned module does not behave like the original on x (shapes, finite values), or None."""
    import torch

    try:
        got = outputs(module, x)
    except Exception as exc:
        return f"fails to run ({type(exc).__name__}: {first_line(exc)[:160]})"
    shapes = [tuple(t.shape) for t in got]
    if shapes != reference:
        return f"returns shape {shapes[0] if len(shapes) == 1 else shapes} instead of " \
               f"{reference[0] if len(reference) == 1 else reference}"
    if not all(bool(torch.isfinite(t).all()) for t in got if t.is_floating_point()):
        return "returns values that are not finite"
    return None
