"""How channels are scored for structured pruning: names -> Torch-Pruning importance criteria, and the
data-aware one written here (activation importance: Torch-Pruning 1.6 scores by weights or gradients only)."""

from __future__ import annotations

from typing import Any

from mlopt.compress.lib.calibration import Calibration, batch_mask, run_model, token_rows
from mlopt.runtime.data import loader


def make_importance(name: str) -> Any:
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn-scale": tp.importance.BNScaleImportance,
        "taylor": tp.importance.GroupTaylorImportance,
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "random": tp.importance.RandomImportance,
    }[name]()


def accumulate_gradients(module: Any, data: Any, batch_size: int, batches: int = 4) -> None:
    """Taylor importance scores weight x gradient: fill .grad from a few labelled training batches."""
    import torch.nn.functional as F

    module.zero_grad(set_to_none=True)
    module.eval()  # batch-norm statistics stay as trained
    for i, (x, y) in enumerate(loader(data.train, batch_size, shuffle=True)):
        if i >= batches:
            break
        F.cross_entropy(module(x), y).backward()


def measure_energy(module: Any, cal: Calibration) -> None:
    """Fill cal.energy: every Linear's mean square per input channel over the calibration tokens."""
    import torch

    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    state: dict[str, Any] = {}

    def hook(name: str) -> Any:
        def record(m: Any, inputs: tuple) -> None:
            rows = token_rows(inputs[0].detach(), state["mask"]).double()
            sums[name] = sums.get(name, 0) + (rows ** 2).sum(0)
            counts[name] = counts.get(name, 0) + rows.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in module.named_modules()
               if isinstance(m, torch.nn.Linear)]
    module.eval()
    try:
        with torch.no_grad():
            for x in cal.batches:
                state["mask"] = batch_mask(x)
                run_model(module, x)
    finally:
        for h in handles:
            h.remove()
    cal.energy = {n: (sums[n] / max(counts[n], 1)).float() for n in sums}


def activation_importance(module: Any, cal: Calibration) -> Any:
    """A Torch-Pruning importance scoring each channel of a group by the energy it hands the Linears that read it
    (||weight column||^2 x mean square of the input channel, summed over those Linears); a group no measured Linear
    reads (a convolution's channels) falls back to the weights' L2 magnitude."""
    import torch
    import torch_pruning as tp
    from torch_pruning.pruner import function

    names = {m: n for n, m in module.named_modules()}
    fallback = tp.importance.GroupMagnitudeImportance(p=2)

    class ActivationImportance(tp.importance.Importance):
        @torch.no_grad()
        def __call__(self, group: Any) -> Any:
            total = None
            for i, (dep, idxs) in enumerate(group):
                layer = dep.layer
                energy = cal.energy.get(names.get(layer, ""))
                if dep.pruning_fn != function.prune_linear_in_channels or energy is None:
                    continue
                root = group[i].root_idxs
                if any(r is None for r in root):
                    continue
                score = (layer.weight.detach().float()[:, idxs] ** 2).sum(0) * energy[idxs]
                if total is None:
                    total = torch.zeros(len(group[0].idxs))
                total.scatter_add_(0, torch.tensor(root), score)
            if total is None:
                return fallback(group)
            return total / total.mean().clamp_min(1e-30)  # Torch-Pruning's default 'mean' normalization

    return ActivationImportance()
