"""Unstructured (magnitude) and 2:4 semi-structured sparsity masks on Linear and Conv weights.

Masks are torch.nn.utils.prune re-parametrisations while fine-tuning (the zeros stay zero) and
are made permanent before the model is saved or exported.
"""

from __future__ import annotations

from typing import Any


def prunable(module: Any, ignore: set[str]) -> list[tuple[str, Any]]:
    import torch

    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and n not in ignore]


def cubic_schedule(final: float, step: int, steps: int) -> float:
    """Gradual pruning (Zhu & Gupta, 2017): sparsity after `step` of `steps`."""
    return final * (1 - (1 - step / steps) ** 3)


def apply_magnitude(module: Any, sparsity: float, ignore: set[str], global_ranking: bool) -> None:
    import torch.nn.utils.prune as prune

    layers = prunable(module, ignore)
    make_permanent(module)  # re-rank on the current weights
    if global_ranking:
        prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured, amount=sparsity)
    else:
        for _, m in layers:
            prune.l1_unstructured(m, "weight", amount=sparsity)


def two_four_mask(weight: Any) -> Any:
    """Keep the 2 largest of every 4 consecutive weights along the input dimension."""
    import torch

    flat = weight.detach().reshape(weight.shape[0], -1)
    cols = flat.shape[1]
    pad = (-cols) % 4
    padded = torch.nn.functional.pad(flat.abs(), (0, pad), value=-1.0)  # padding never beats a real weight
    groups = padded.reshape(flat.shape[0], -1, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0).reshape(flat.shape[0], -1)[:, :cols]
    return mask.reshape(weight.shape)


def apply_two_four(module: Any, ignore: set[str]) -> None:
    import torch.nn.utils.prune as prune

    for _, m in prunable(module, ignore):
        prune.custom_from_mask(m, "weight", two_four_mask(m.weight))


def make_permanent(module: Any) -> None:
    import torch.nn.utils.prune as prune

    for m in module.modules():
        if hasattr(m, "weight_orig"):
            prune.remove(m, "weight")


def zero_fraction(module: Any, ignore: set[str]) -> float:
    layers = prunable(module, ignore)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    total = sum(m.weight.numel() for _, m in layers)
    return zeros / total if total else 0.0


def gzip_mb(path: Any) -> float:
    import gzip

    with open(path, "rb") as f:
        return len(gzip.compress(f.read(), compresslevel=6)) / 1e6
