"""Structured pruning through Torch-Pruning: its dependency graph and groups decide what must change
together (not re-implemented here); importance.py scores the channels.

`cfg` is the prune step's config (mlopt.compress.prune.PruneConfig); this library reads its fields.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

from mlopt.compress.lib.importance import make_importance
from mlopt.core.errors import InputError, first_line


def submodule(module: Any, name: str, missing: str) -> Any:
    """`module`'s submodule called `name`; else an InputError `missing`, with the closest names."""
    modules = dict(module.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
        raise InputError(missing + (f"; did you mean {', '.join(close)}?" if close else ""))
    return modules[name]


def named_modules(module: Any, names: list[str]) -> list[Any]:
    return [submodule(module, name, f"--ignore {name!r}: the model has no module of that name") for name in names]


def classifier_names(module: Any, num_classes: int | None) -> list[str]:
    """The output layers (Linear or Conv with num_classes outputs, last of its kind) stay untouched."""
    import torch

    names = [n for n, m in module.named_modules()
             if isinstance(m, torch.nn.Linear) and num_classes is not None and m.out_features == num_classes]
    return names[-1:] or [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)][-1:]


def count_ops(module: Any, sample_shape: tuple[int, ...]) -> tuple[int, int]:
    import torch
    import torch_pruning as tp

    module.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(module, torch.zeros((1, *sample_shape)))
    return int(macs), int(params)


def attention_blocks(module: Any) -> list[tuple[str, Any, list[Any], str]]:
    """Multi-head attention blocks whose heads can be pruned: (name, block, its q/k/v Linears, head-count attribute).

    Two layouts: timm's ViT (a `qkv` Linear and `num_heads`, with `head_dim`) and BERT's self-attention
    (`query`, `key`, `value` Linears and `num_attention_heads`, with `attention_head_size` and `all_head_size`).
    """
    import torch

    def linear(m: Any, name: str) -> bool:
        return isinstance(getattr(m, name, None), torch.nn.Linear)

    found = []
    for n, m in module.named_modules():
        if linear(m, "qkv") and isinstance(getattr(m, "num_heads", None), int):
            found.append((n, m, [m.qkv], "num_heads"))
        elif all(linear(m, k) for k in ("query", "key", "value")) and isinstance(getattr(m, "num_attention_heads", None), int):
            found.append((n, m, [m.query, m.key, m.value], "num_attention_heads"))
    return found


def sync_heads(module: Any, pruner: Any) -> None:
    """After a pruning step, tell each attention block its new head count and head size."""
    for _, m, layers, attr in attention_blocks(module):
        heads = int(pruner.num_heads[layers[0]])
        setattr(m, attr, heads)
        if attr == "num_heads" and isinstance(getattr(m, "head_dim", None), int):
            m.head_dim = m.qkv.out_features // (3 * heads)
        if attr == "num_attention_heads":
            m.attention_head_size = m.query.out_features // heads
            m.all_head_size = m.query.out_features


def make_pruner(module: Any, sample_shape: tuple[int, ...], cfg: Any, ratio: float, ignored: list[Any],
                steps: int) -> Any:
    import torch
    import torch_pruning as tp

    blocks = attention_blocks(module)
    if cfg.head_ratio is not None and not blocks:
        raise InputError("head_ratio: the model has no attention block with a `qkv` Linear and `num_heads` (timm's "
                         "ViT layout) or `query`/`key`/`value` Linears and `num_attention_heads` (BERT's); "
                         "nn.MultiheadAttention heads shrink with the width (ratio)")
    heads: dict[str, Any] = {}
    if blocks:
        # Torch-Pruning keeps heads whole: with heads given, it prunes the same dims in every head
        # (ratio) or whole heads (head_ratio); the q/k/v layers' own ratio triggers the head step.
        layers = {layer: getattr(m, attr) for _, m, qkv, attr in blocks for layer in qkv}
        heads = {"num_heads": layers}
        if cfg.head_ratio is not None:
            heads.update(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=cfg.head_ratio,
                         pruning_ratio_dict={layer: cfg.head_ratio for layer in layers})
    try:
        return tp.pruner.BasePruner(
            module, torch.zeros((1, *sample_shape)), importance=make_importance(cfg.importance),
            global_pruning=cfg.global_ranking, pruning_ratio=ratio, max_pruning_ratio=0.95,
            iterative_steps=steps, ignored_layers=ignored, round_to=cfg.round_to, **heads,
        )
    except Exception as exc:
        raise InputError(f"Torch-Pruning cannot trace the model ({type(exc).__name__}: {first_line(exc)}); "
                         "leave the module that fails out with --ignore NAME") from exc


def check_forward(module: Any, sample_shape: tuple[int, ...]) -> None:
    import torch

    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros((1, *sample_shape)))
    except Exception as exc:
        hint = ("; attention blocks must reshape with num_heads and head_dim (or -1), not the input width"
                if attention_blocks(module) else "")
        raise InputError(f"the pruned model fails to run ({type(exc).__name__}: {first_line(exc)[:200]}){hint}") from exc


def search_ratio(module: Any, sample_shape: tuple[int, ...], cfg: Any, ignore: list[str]) -> tuple[float, float]:
    """Bisect the channel ratio whose pruned model keeps the target fraction of MACs (or params)."""
    which, target = ("macs", cfg.target_macs) if cfg.target_macs is not None else ("params", cfg.target_params)
    base = count_ops(module, sample_shape)[0 if which == "macs" else 1]

    def kept(ratio: float) -> float:
        trial = copy.deepcopy(module)
        pruner = make_pruner(trial, sample_shape, cfg, ratio, named_modules(trial, ignore), 1)
        pruner.step()
        sync_heads(trial, pruner)
        return count_ops(trial, sample_shape)[0 if which == "macs" else 1] / base

    lo, hi = 0.0, 0.9
    reachable = kept(hi)
    if reachable > target:
        raise InputError(f"target_{which} {target} cannot be reached: pruning 90% of the prunable channels still "
                         f"keeps {reachable:.3f} of the {which} (the ignored layers and the classifier stay whole)")
    for _ in range(12):
        mid = (lo + hi) / 2
        if kept(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi, kept(hi)
