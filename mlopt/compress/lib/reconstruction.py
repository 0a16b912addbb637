"""The least-squares refit after structured pruning ("reconstruction"): each Linear that alone reads pruned
channels (an attention block's output projection, a feed-forward's second layer) is refitted on calibration inputs
so that it hands on what it did before the cut. Labels are never read: it works on text as on images.

Torch-Pruning 1.6 has no refit, so it is written here. The method is the layer-wise least-squares step of
post-training pruning of transformers (Kwon et al., 2022, "A Fast Post-Training Pruning Framework for
Transformers"); the channels it follows are chosen by importance.py (activation importance, Wanda's ||W column|| x
||input|| score, or any other). The refit runs on the model before its channels are cut: the reader's pruned
columns are set to zero (which is what cutting them does, when that Linear is the only reader of those channels)
and its kept columns and bias are solved for, one reader at a time in the order the model runs them, each on the
inputs the model (already refitted up to there) hands it.
"""

from __future__ import annotations

from typing import Any

from mlopt.compress.lib.calibration import Calibration, batch_mask, run_model, token_rows
from mlopt.core.memory import available_memory

#: Ridge term of the least-squares refit, relative to the mean diagonal of the kept channels' Gram matrix:
#: keeps the solve well posed when kept channels are nearly collinear on the calibration tokens.
RIDGE = 1e-3

#: Share of the memory the machine can give that one Linear's refit may take: its (C+1)^2 float64 Gram matrix and
#: the kept block solved from it, about twice the Gram at the peak. A Linear wider than that is cut without a refit.
MEMORY_SHARE = 0.5


class _Stop(Exception):
    """Raised in a hook once it has what it came for: the rest of the forward pass is not needed."""


def sole_reader(group: Any) -> tuple[Any, list[int]] | None:
    """The Linear that alone reads a group's channels and the channel indices it loses, when the group is channels
    Linear layers write (their outputs) and one Linear reads (its inputs), nothing else holding parameters: cutting
    them is then the same as zeroing that Linear's columns. Else None (a norm between them, a residual stream,
    convolutions): such groups are cut without a refit."""
    import torch
    from torch_pruning.pruner import function

    reader = None
    for dep, idxs in group:
        layer, fn = dep.layer, dep.pruning_fn
        if fn == function.prune_linear_in_channels:
            if reader is not None or not isinstance(layer, torch.nn.Linear):
                return None
            reader = (layer, list(idxs))
        elif fn == function.prune_linear_out_channels:
            continue
        elif isinstance(layer, torch.nn.Module) and next(layer.parameters(recurse=False), None) is not None:
            return None
    return reader


def refit(module: Any, cuts: dict[Any, list[int]], cal: Calibration) -> None:
    """Zero each Linear's cut input columns and solve its kept columns and bias by least squares for the output it
    had on the calibration tokens (before any cut), one Linear at a time in the order the model runs them."""
    import torch

    names = {m: n for n, m in module.named_modules()}
    calls: dict[Any, int] = {}  # in the order of first calls; a Linear shared across layers is called more than once

    def count_call(m: Any, inputs: tuple) -> None:
        calls[m] = calls.get(m, 0) + 1

    handles = [m.register_forward_pre_hook(count_call) for m in cuts]
    module.eval()
    try:
        with torch.no_grad():
            run_model(module, cal.batches[0])
    finally:
        for h in handles:
            h.remove()
    budget = available_memory()
    cal.refitted, cal.too_wide = [], []
    for layer, n in calls.items():
        need = refit_bytes(layer)
        if budget is not None and need > MEMORY_SHARE * budget:
            cal.too_wide.append((names[layer], need))
        elif _refit_one(module, layer, cuts[layer], cal, shared=n > 1):
            cal.refitted.append(names[layer])


def refit_bytes(layer: Any) -> int:
    """Peak memory of one Linear's refit: the float64 Gram of its inputs (and bias) and the kept block of it."""
    width = layer.in_features + (layer.bias is not None)
    return 2 * 8 * width * width


def _refit_one(module: Any, layer: Any, cut: list[int], cal: Calibration, shared: bool = False) -> bool:
    """Refit `layer`; False where it was left as it was (never reached on the inputs, or no finite solution). A
    `shared` Linear (called more than once per forward pass, as ALBERT's layers are) is fitted on every call's
    inputs; else the forward pass stops at its first call."""
    import torch

    state: dict[str, Any] = {"gram": None}

    def capture(m: Any, inputs: tuple) -> None:
        rows = token_rows(inputs[0].detach(), state["mask"]).double()
        if layer.bias is not None:
            rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
        if state["gram"] is None:
            state["gram"] = rows.T @ rows
        else:
            state["gram"].addmm_(rows.T, rows)  # in place: one Gram matrix in memory, not two
        if not shared:
            raise _Stop

    handle = layer.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            for x in cal.batches:
                state["mask"] = batch_mask(x)
                try:
                    run_model(module, x)
                except _Stop:
                    pass
    finally:
        handle.remove()
    gram = state["gram"]
    if gram is None:  # never reached on these inputs: leave it, the cut still happens
        return False
    weight = layer.weight.detach().double()
    full = torch.cat([weight, layer.bias.detach().double()[:, None]], 1) if layer.bias is not None else weight
    keep = torch.ones(full.shape[1], dtype=torch.bool)
    keep[torch.tensor(cut, dtype=torch.long)] = False
    # min_W' sum over tokens ||W x - W' x_kept||^2:  W' (G_kk + ridge I) = W G_:k
    target = (full @ gram)[:, keep]
    idx = keep.nonzero().squeeze(1)
    kept_gram = gram[idx[:, None], idx]  # one copy of the kept block (gram[keep][:, keep] made two)
    del gram, state["gram"]
    kept_gram.diagonal().add_(RIDGE * kept_gram.diagonal().mean().clamp_min(1e-12))
    solved = torch.linalg.solve(kept_gram, target.T).T
    if not bool(torch.isfinite(solved).all()):
        return False
    new = torch.zeros_like(full)
    new[:, keep] = solved
    with torch.no_grad():
        layer.weight.copy_(new[:, :weight.shape[1]].to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(new[:, -1].to(layer.bias.dtype))
    return True
