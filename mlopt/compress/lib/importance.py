"""How channels are scored for structured pruning: names -> Torch-Pruning importance criteria."""

from __future__ import annotations

from typing import Any

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
