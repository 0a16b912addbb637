"""Structured pruning through Torch-Pruning: its dependency graph and groups decide what must change
together (not re-implemented here); importance.py scores the channels.

`cfg` is the prune step's config (mlopt.compress.prune.PruneConfig); this library reads its fields.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from mlopt.compress.lib.calibration import Calibration
from mlopt.compress.lib.importance import activation_importance, make_importance
from mlopt.compress.lib.reconstruction import refit, sole_reader
from mlopt.compress.lib.safety import (ROUNDS, Kept, Outcome, checked_importance, group_problem, guarded, keep,
                                       kept_group, kept_key, outputs, probe, screen)
from mlopt.core.errors import InputError, first_line
from mlopt.runtime.models import shape_attributes


Sample = Any  # one sample's shape (tuple[int, ...]: a float input of that shape), a model's named inputs
# (dict[str, Tensor], batch of 1: Hugging Face token models), or its one input (Tensor, batch of 1: token ids)


def example(sample: Sample) -> Any:
    """The input pruning traces and probes the model with: zeros of the sample's shape (batch 1), or the named
    inputs or the input tensor as given (`module(**inputs)`, `module(input)`)."""
    import torch

    if isinstance(sample, dict):
        return dict(sample)
    return sample if isinstance(sample, torch.Tensor) else torch.zeros((1, *sample))


def _quiet() -> Any:
    """Torch-Pruning prints warnings on stdout (a model called with named inputs only); keep stdout for --json."""
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())


@contextlib.contextmanager
def _unbind_along_dim_0() -> Iterator[None]:
    """While Torch-Pruning traces the model, `x.unbind(d)` of 2 or 3 (key/value or query/key/value) along a dim d
    other than the first and the last (an interleaved pair along the last is no split of channels) is spelt
    `x.movedim(d, 0).unbind(0)`: the same tensors. Torch-Pruning 1.6 maps an unbind's channels (thirds of a fused
    qkv Linear's output) only along dim 0, timm's `qkv.permute(2, 0, ...).unbind(0)`; ModernBERT's
    `qkv.view(..., 3, -1, head_dim).unbind(dim=-3)` splits the same thirds along another dim, and its heads mapped
    onto nothing. Written here because Torch-Pruning has no hook for it. Not for threads tracing at once."""
    import torch

    original = torch.Tensor.unbind

    def unbind(self: Any, dim: int = 0) -> Any:
        if dim % max(self.dim(), 1) not in (0, self.dim() - 1) and self.shape[dim] in (2, 3):
            return original(self.movedim(dim, 0), 0)
        return original(self, dim)

    torch.Tensor.unbind = unbind  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.unbind = original  # type: ignore[method-assign]


def submodule(module: Any, name: str, missing: str) -> Any:
    """`module`'s submodule called `name`; else an InputError `missing`, with the closest names."""
    modules = dict(module.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
        raise InputError(missing + (f"; did you mean {', '.join(close)}?" if close else ""))
    return modules[name]


def named_modules(module: Any, names: list[str]) -> list[Any]:
    return [submodule(module, name, f"--ignore {name!r}: the model has no module of that name") for name in names]


def classifier_names(module: Any, num_classes: int | None, sample: Sample) -> list[str]:
    """The layers that produce the output stay untouched: the last Linear or convolution to run, when its width is
    the output's (a final 1x1 convolution too), the last Linear with num_classes outputs, and the last layer with
    parameters and no submodules whose output is the model's output itself (an encoder's final LayerNorm: its
    width is the output's, which a pooler running after it would not keep)."""
    import torch

    ran: list[tuple[str, Any]] = []
    written: list[tuple[str, Any]] = []
    layer_types = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: ran.append((n, o)))
             for n, m in module.named_modules() if isinstance(m, layer_types)]
    hooks += [m.register_forward_hook(lambda m, i, o, n=n: written.append((n, o)))
              for n, m in module.named_modules()
              if not isinstance(m, layer_types) and next(m.children(), None) is None
              and next(m.parameters(recurse=False), None) is not None]  # leaves: a container's output is its last
    try:
        out = outputs(module, example(sample))
    finally:
        for h in hooks:
            h.remove()
    names = [n for n, m in module.named_modules()
             if isinstance(m, torch.nn.Linear) and num_classes is not None and m.out_features == num_classes][-1:]
    names += [n for n, o in written if out and o is out[0]][-1:]
    if len(out) > 1:  # several outputs (a tuple, a dict): every layer that writes one keeps its width
        names += [n for n, o in ran + written if any(o is t for t in out) and n not in names]
    if ran and out and isinstance(ran[-1][1], torch.Tensor) and ran[-1][1].dim() > 1:
        name, y = ran[-1]
        width = y.shape[-1] if isinstance(dict(module.named_modules())[name], torch.nn.Linear) else y.shape[1]
        if width in out[0].shape[1:] and name not in names:
            names.append(name)
    return names or [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)][-1:]


def count_ops(module: Any, sample: Sample) -> tuple[int, int]:
    import torch
    import torch_pruning as tp

    module.eval()
    with torch.no_grad():
        with _quiet():
            macs, params = tp.utils.count_ops_and_params(module, example(sample))
    return int(macs), int(params)


# Separate query/key/value Linears as Hugging Face encoders spell them (BERT, RoBERTa, ELECTRA; DistilBERT; MPNet;
# DeBERTa-v2; CLIP, BART, Whisper), and the attribute holding the head count. The head size stays (whole heads go).
QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q", "k", "v"),
             ("query_proj", "key_proj", "value_proj"), ("q_proj", "k_proj", "v_proj"))
# One Linear writing query, key and value (in thirds): timm's ViT `qkv`, ModernBERT's and MosaicBERT's `Wqkv`,
# Phi-3's `qkv_proj`.
FUSED_QKV_NAMES = ("qkv", "Wqkv", "qkv_proj")
HEAD_COUNTS = ("num_attention_heads", "n_heads", "num_heads")


class Block(NamedTuple):
    """A multi-head attention block whose heads can be pruned."""

    name: str
    module: Any
    layers: list[Any]  # its query/key/value Linears (one, when fused)
    attr: str | None  # the attribute holding its head count; None where its forward infers it (ModernBERT)
    heads: int


def attention_blocks(module: Any) -> list[Block]:
    """Multi-head attention blocks whose heads can be pruned.

    A fused query/key/value Linear (`FUSED_QKV_NAMES`) with a head count (`HEAD_COUNTS`, timm's ViT layout) or,
    without one, a `head_dim` (ModernBERT reshapes by head size and infers the count); or separate query, key and
    value Linears of equal width with a head count (`QKV_NAMES`: BERT's `query`/`key`/`value` and
    `num_attention_heads`, DistilBERT's `q_lin`/`k_lin`/`v_lin` and `n_heads`, ...). Blocks whose key/value heads
    differ from the query's (grouped-query attention) are not listed. A block whose forward still uses an old
    count after pruning fails the pruned model's trial run, and its heads are kept whole (prune_safely).
    """
    import torch

    def linear(m: Any, name: str) -> bool:
        return isinstance(getattr(m, name, None), torch.nn.Linear)

    found = []
    for n, m in module.named_modules():
        count = next((a for a in HEAD_COUNTS if type(vars(m).get(a)) is int and vars(m)[a] > 0), None)
        fused = next((getattr(m, k) for k in FUSED_QKV_NAMES if linear(m, k)), None)
        if fused is not None and fused.out_features % 3 == 0:
            width = fused.out_features // 3
            if _grouped_query(m):  # its qkv is not in thirds (Phi-3 with fewer key/value heads)
                continue
            if count and width % vars(m)[count] == 0:
                found.append(Block(n, m, [fused], count, vars(m)[count]))
            elif not count and type(vars(m).get("head_dim")) is int and 0 < m.head_dim <= width \
                    and width % m.head_dim == 0:
                found.append(Block(n, m, [fused], None, width // m.head_dim))
            continue
        names = next((q for q in QKV_NAMES if all(linear(m, k) for k in q)), None)
        if names and count:
            qkv = [getattr(m, k) for k in names]
            if len({l.out_features for l in qkv}) == 1 and qkv[0].out_features % vars(m)[count] == 0:
                found.append(Block(n, m, qkv, count, vars(m)[count]))
    return found


def _grouped_query(m: Any) -> bool:
    """Whether an attention block has fewer key/value heads than query heads (its own attributes or its config)."""
    if (vars(m).get("num_key_value_groups") or 1) != 1:
        return True
    config = getattr(m, "config", None)
    kv, q = getattr(config, "num_key_value_heads", None), getattr(config, "num_attention_heads", None)
    return isinstance(kv, int) and isinstance(q, int) and kv != q


def head_counts(module: Any) -> dict[str, int]:
    """Each prunable attention block's head count, by name."""
    return {b.name: b.heads for b in attention_blocks(module)}


class SharedBias(NamedTuple):
    """A relative position bias table (an Embedding with one column per head) that several attention blocks add
    to their scores: MPNet's encoder computes it once and hands it to every layer."""

    table: Any
    owner: Any  # the module holding the table (its head count attribute, if any, follows the table)
    blocks: list[Block]


def shared_position_biases(module: Any, blocks: list[Block]) -> list[SharedBias]:
    """The `relative_attention_bias` Embeddings whose columns are the heads of the attention blocks of their stack
    (the nearest module above the table that holds more than one block), every block with that head count."""
    import torch

    found = []
    for name, m in module.named_modules():
        if not isinstance(m, torch.nn.Embedding) or name.rpartition(".")[2] != "relative_attention_bias":
            continue
        parts, members = name.split(".")[:-1], []
        for i in range(len(parts), -1, -1):
            prefix = ".".join(parts[:i])
            members = [b for b in blocks if not prefix or b.name == prefix or b.name.startswith(prefix + ".")]
            if len(members) > 1:
                break
        if members and all(b.heads == m.embedding_dim and b.attr for b in members):
            found.append(SharedBias(m, module.get_submodule(".".join(parts)), members))
    return found


@contextlib.contextmanager
def _detached(tables: list[Any]) -> Iterator[None]:
    """While Torch-Pruning traces the model, these Embeddings' outputs are detached, so that its graph does not
    reach them: Torch-Pruning 1.6 maps a head's channels (head_dim of them) onto the bias table's one column of
    that head one to one, out of range, and kept every attention group whole. mlopt cuts the tables itself
    (slice_shared_biases). Written here because Torch-Pruning has no mapping from channels to heads."""
    import torch

    own = {t: vars(t)["forward"] for t in tables if "forward" in vars(t)}  # an instance's own forward, if any
    for t in tables:
        t.forward = (lambda f: lambda *a, **k: f(*a, **k).detach())(t.forward)
    try:
        yield
    finally:
        for t in tables:
            if t in own:
                t.forward = own[t]
            else:
                del t.forward  # back to the class's


def _shared_heads_importance(importance: Any, shared: list[SharedBias], module: Any, pruner_of: dict[str, Any]) -> Any:
    """`importance`, with every block of a shared bias table scored alike: a head group's channel scores are those
    of the same group in every block of the table (rooted at the same layer of each block, by name; each block's
    normalised to sum 1 so that every layer counts alike), summed. Torch-Pruning then takes the same heads out of
    every block, and the one table loses the same columns. The sum is the same for the same layer of every block:
    it is computed once per pruner (Torch-Pruning scores every group before it cuts any)."""
    import torch_pruning as tp

    names = {m: n for n, m in module.named_modules()}
    block_of = {layer: (i, block) for i, bias in enumerate(shared) for block in bias.blocks for layer in block.layers}
    sums: dict[Any, Any] = {}  # (table, layer name in its block, handler, width) -> the summed scores

    class SharedHeads(tp.importance.Importance):
        def __call__(self, group: Any) -> Any:
            if "pruner" not in pruner_of:
                return importance(group)
            if sums.get("pruner") is not pruner_of["pruner"]:  # a new pruner (a new round): new scores
                sums.clear()
                sums["pruner"] = pruner_of["pruner"]
            graph = pruner_of["pruner"].DG
            found = next((block_of[d.target.module] for d, _ in group if d.target.module in block_of
                          and graph.is_out_channel_pruning_fn(d.handler)), None)
            root, handler, idxs = group[0][0].target.module, group[0][0].handler, group[0][1]
            if found is None or not names.get(root, "").startswith(found[1].name + "."):
                return importance(group)
            suffix, total = names[root][len(found[1].name):], None
            key = (found[0], suffix, handler, len(idxs))
            if key in sums:
                return sums[key].clone()
            for block in shared[found[0]].blocks:
                layer = module.get_submodule(block.name + suffix)
                imp = importance(graph.get_pruning_group(layer, handler, list(range(len(idxs)))))
                if imp is None or (total is not None and imp.shape != total.shape):
                    return importance(group)
                imp = imp / imp.sum().clamp_min(1e-12)
                total = imp if total is None else total + imp
            sums[key] = total
            return total.clone()

    return SharedHeads()


def slice_shared_biases(pruner: Any, removed: dict[Any, list[int]]) -> dict[int, str]:
    """Cut from each shared bias table the columns of the heads its blocks lost (`removed`: the output channels
    each pruned layer lost, by layer), once every block lost the same heads. Returns the tables that cannot be cut
    (by index): "pending" while some blocks lost heads and others not yet (the model cannot run until all did),
    "mismatch" where blocks lost different heads."""
    import torch

    state: dict[int, str] = {}
    for index, bias in enumerate(getattr(pruner, "mlopt_shared_biases", [])):
        if bias.table.embedding_dim != bias.blocks[0].heads:
            continue  # cut already
        lost = []  # per block cut so far: the heads it lost whole (head dims cut by a ratio lose no head)
        for block in bias.blocks:  # block.heads: the count before pruning
            layer = block.layers[0]
            if layer not in removed:
                continue
            gone = set(removed[layer])
            head_dim = (len(gone) + layer.out_features) // ((3 if len(block.layers) == 1 else 1) * block.heads)
            lost.append([h for h in range(block.heads) if all(h * head_dim + d in gone for d in range(head_dim))])
        if not any(lost):
            continue
        if len(lost) < len(bias.blocks) or any(heads != lost[0] for heads in lost):
            state[index] = "pending" if len(lost) < len(bias.blocks) else "mismatch"
            continue
        keep = [h for h in range(bias.table.embedding_dim) if h not in set(lost[0])]
        with torch.no_grad():
            bias.table.weight = torch.nn.Parameter(bias.table.weight[:, keep].clone())
        old, bias.table.embedding_dim = bias.table.embedding_dim, len(keep)
        for attr in HEAD_COUNTS:  # MPNet's encoder.n_heads
            if vars(bias.owner).get(attr) == old:
                setattr(bias.owner, attr, len(keep))
    return state


def _shared_bias_kept(module: Any, pruner: Any, index: int) -> Kept:
    """All the attention blocks of a shared bias table kept whole at once (their heads could not go alike)."""
    names = {m: n for n, m in module.named_modules()}
    bias = pruner.mlopt_shared_biases[index]
    layers = [names[layer] for block in bias.blocks for layer in block.layers]
    return Kept(layers, f"its blocks share the position bias table {names[bias.table]} (a column per head) and "
                        "could not lose the same heads", layers)


WIDTH_ATTRIBUTES = ("hidden_dim", "embed_dim", "dim", "hidden_size", "num_features", "channels", "width")


def widths(module: Any) -> dict[str, int]:
    """Each layer's (module with its own parameters) output width, from its size attributes; by name."""
    sizes = shape_attributes(module)
    found = {}
    for n, m in module.named_modules():
        if next(m.parameters(recurse=False), None) is None:
            continue
        for attr in ("out_channels", "out_features", "embed_dim", "num_features", "normalized_shape"):
            value = sizes[n].get(attr)
            value = value[-1] if isinstance(value, list) and value else value
            if isinstance(value, int):
                found[n] = value
                break
    return found


def sync_attributes(module: Any, pruner: Any, before: dict[str, int]) -> None:
    """After pruning, tell blocks their new widths: attention blocks their head count and head size, and a module
    whose width attribute (`hidden_dim`, `embed_dim`, ...) held the old width of layers inside it that all
    changed to one new width (torchvision's ViT reshapes with `hidden_dim`)."""
    names = {m: n for n, m in module.named_modules()}
    for _, m, layers, attr, _ in attention_blocks(module):
        if before.get(names[layers[0]]) == layers[0].out_features:
            continue  # not cut (yet: the pruner counts a group's heads gone when it hands the group out)
        heads = int(pruner.num_heads[layers[0]])
        if attr is None:  # its forward infers the count from the width and its head size, which stays
            continue
        setattr(m, attr, heads)
        width = layers[0].out_features // (3 if len(layers) == 1 else 1)  # all heads' q width after pruning
        if type(vars(m).get("head_dim")) is int:
            m.head_dim = width // heads
        if type(vars(m).get("attention_head_size")) is int:
            m.attention_head_size = width // heads
        for attr in ("all_head_size", "inner_dim", "attn_dim"):  # BERT's, T5's, timm's ViT
            if type(vars(m).get(attr)) is int:
                setattr(m, attr, width)
    after = widths(module)
    changed = [(n, before[n], w) for n, w in after.items() if n in before and before[n] != w]
    if not changed:
        return
    for name, m in module.named_modules():
        for attr in WIDTH_ATTRIBUTES:
            old = vars(m).get(attr)
            if type(old) is not int or name in after:
                continue
            new = {w for n, was, w in changed if was == old and (not name or n.startswith(name + "."))}
            if len(new) == 1:
                setattr(m, attr, new.pop())


def make_pruner(module: Any, sample: Sample, cfg: Any, ratio: float, head_ratio: float | None,
                ignored: list[Any], cal: Calibration | None = None) -> Any:
    import torch_pruning as tp

    blocks = attention_blocks(module)
    if head_ratio is not None and not blocks:
        raise InputError("head_ratio: the model has no attention block with a fused `qkv` (or `Wqkv`, `qkv_proj`) "
                         "Linear and `num_heads` or `head_dim` (timm's ViT, ModernBERT) or separate query/key/value "
                         "Linears and a head count (`query`/`key`/`value` and `num_attention_heads` as in BERT, "
                         "`q_lin`/`k_lin`/`v_lin` and `n_heads`, `q_proj`/`k_proj`/`v_proj` and `num_heads`, ...); "
                         "nn.MultiheadAttention heads shrink with the width (ratio)")
    options: dict[str, Any] = {}
    ratios: dict[Any, float] = {}
    if blocks:
        # Torch-Pruning keeps heads whole: with heads given, it prunes the same dims in every head
        # (ratio) or whole heads (head_ratio); the q/k/v layers' own ratio triggers the head step.
        layers = {layer: block.heads for block in blocks for layer in block.layers}
        options["num_heads"] = layers
        if head_ratio is not None:
            options.update(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=head_ratio)
            ratios = {layer: head_ratio for layer in layers}
        else:  # a block that infers its head count reshapes by a fixed head size: its heads cannot lose dims
            ignored = [*ignored, *(layer for block in blocks if block.attr is None for layer in block.layers)]

    # Activation importance scores what a Linear reads and the rest by L2: a model without Linears (a U-Net) measures
    # no energy and is ranked by L2 alone.
    importance = activation_importance(module, cal) if cal is not None and cfg.importance == "activation" \
        else make_importance(cfg.importance)
    shared = shared_position_biases(module, blocks) if blocks else []
    pruner_of: dict[str, Any] = {}
    if shared and head_ratio is not None:
        importance = _shared_heads_importance(importance, shared, module, pruner_of)

    def build() -> Any:
        try:
            with _quiet(), _unbind_along_dim_0(), _detached([b.table for b in shared]):
                return tp.pruner.BasePruner(
                    module, example(sample), importance=importance,
                    global_pruning=cfg.global_ranking, pruning_ratio=ratio, max_pruning_ratio=0.95,
                    iterative_steps=1, ignored_layers=ignored, round_to=cfg.round_to,
                    **options, **({"pruning_ratio_dict": dict(ratios)} if ratios else {}),
                )
        except Exception as exc:
            raise InputError(f"Torch-Pruning cannot trace the model ({type(exc).__name__}: {first_line(exc)}); "
                             "leave the module that fails out with --ignore NAME") from exc

    pruner = pruner_of["pruner"] = build()
    pruner.mlopt_shared_biases = shared
    heads = options.get("num_heads", {})  # a fused qkv's thirds go together too; Torch-Pruning handles heads itself
    paired = {m: k for m, k in self_coupled(pruner).items() if m not in ratios and m not in heads}
    if not paired or ratio <= 0:
        return pruner
    ratios.update({m: ratio / k for m, k in paired.items()})
    importance = _paired_importance(importance, paired)
    pruner = pruner_of["pruner"] = build()
    pruner.mlopt_shared_biases = shared
    return pruner


def _paired_importance(importance: Any, paired: dict[Any, int]) -> Any:
    """`importance`, with the channels of a self-coupled layer (self_coupled: channel j goes with j + n/k, ...)
    scored as one: the first of each set takes the set's summed score and the others a score above every set's,
    so that Torch-Pruning picks whole sets by what they carry together and never one set twice."""
    import torch
    import torch_pruning as tp

    class Paired(tp.importance.Importance):
        def __call__(self, group: Any) -> Any:
            imp = importance(group)
            k = paired.get(group[0][0].target.module)
            if imp is None or k is None or len(imp) % k:
                return imp
            summed = imp.reshape(k, -1).sum(0)
            scores = imp.new_full(imp.shape, float(summed.max()) + 1.0)
            scores[:len(summed)] = summed
            return scores

    return Paired()


def self_coupled(pruner: Any) -> dict[Any, int]:
    """Layers whose output channels Torch-Pruning couples with others of the same layer, and how many go with each:
    a gated feed-forward's fused Linear (ModernBERT's `Wi`, Phi-3's `gate_up_proj`) whose output is chunked in two
    halves that multiply, so that channel i goes with channel i + half. Torch-Pruning 1.6 counts the ratio on all
    the layer's channels and then cuts each chosen one with its partner: twice the asked ratio. make_pruner divides
    the ratio of such a layer by the count, and the cut is what was asked for."""
    import torch
    from torch_pruning import ops

    layer_types = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    graph = pruner.DG
    # Only a layer whose output reaches a split (chunk, unbind) through parameter-free ops can pair its own channels:
    # a pruning group per layer of a large model would cost seconds on every trial.
    candidates, seen = set(), set()
    stack = [i for n in graph.module2node.values() if n.type in (ops.OPTYPE.SPLIT, ops.OPTYPE.UNBIND) for i in n.inputs]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, layer_types):
            candidates.add(node.module)
        elif next(iter(getattr(node.module, "parameters", lambda **_: iter(()))(recurse=False)), None) is None:
            stack.extend(node.inputs)
    found = {}
    for m in candidates:
        if m in pruner.ignored_layers:
            continue
        fn = graph.get_pruner_of_module(m).prune_out_channels
        try:
            group = graph.get_pruning_group(m, fn, [0])
        except Exception:  # a layer Torch-Pruning cannot group: the safety rounds deal with it
            continue
        own = sorted(int(i) for dep, idxs in group
                     if dep.target.module is m and graph.is_out_channel_pruning_fn(dep.handler) for i in idxs)
        # channel 0 goes with 0, n/k, 2n/k, ... (a chunk into k parts); another pattern is left to Torch-Pruning
        k, width = len(own), m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels
        if k > 1 and width % k == 0 and own == [i * (width // k) for i in range(k)]:
            found[m] = k
    return found


def prune_safely(module: Any, sample: Sample, cfg: Any, ratio: float, head_ratio: float | None,
                 ignore: list[str], kept: dict[str, Kept] | None = None, cal: Calibration | None = None) -> Outcome:
    """Prune a copy of `module` once at `ratio`, keeping whole every group that is unsafe (see safety.py); with
    `cal`, channels are scored on its inputs, and with cal.reconstruct the Linears that read them are refitted."""
    if cal is not None and cal.reconstruct:  # find the groups to keep whole without paying for a refit each round
        kept = prune_safely(module, sample, cfg, ratio, head_ratio, ignore, kept,
                            dataclasses.replace(cal, reconstruct=False)).kept
    x = example(sample)
    reference = [tuple(t.shape) for t in outputs(module, x)]
    before = widths(module)
    kept = dict(kept or {})
    probe_each = False
    for _ in range(ROUNDS):
        trial = copy.deepcopy(module)
        for copied, original in zip(trial.parameters(), module.parameters()):
            copied.grad = original.grad  # Taylor importance reads the gradients; a deep copy drops them
        layers = dict(trial.named_modules())
        ignored = [layers[n] for n in ignore] + [layers[n] for k in kept.values() for n in k.outputs]
        with guarded(trial) as trace:
            pruner = make_pruner(trial, sample, cfg, ratio, head_ratio, ignored, cal)
            screen(pruner, trace, kept)
            checked_importance(pruner, trace, kept)
            broke, pruned = _prune_groups(trial, pruner, trace, kept, x, reference, before, probe_each, cal)
        del pruner, trace, layers, ignored  # they hold the copy: free it before another round copies the model
        if broke is None:
            problem = probe(trial, x, reference)
            if problem is None:
                if not pruned and ratio > 0:
                    raise InputError(_nothing_prunable(kept))
                return Outcome(trial, kept)
            probe_each = True  # find the group that breaks the model
            del trial
        elif not broke.outputs:  # nothing to ignore that would skip it next time
            raise InputError(f"pruning the group of {', '.join(broke.layers[:3])} fails: {broke.reason}; "
                             "leave it out with --ignore NAME")
        else:
            kept.setdefault(kept_key(broke), _alike(module, broke, kept))
            del trial
    raise InputError(f"pruning still breaks the model after keeping {len(kept)} groups whole; "
                     "leave the failing modules out with --ignore NAME")


def _alike(module: Any, broke: Kept, kept: dict[str, Kept]) -> Kept:
    """The group that broke the pruned model, widened to the same layers of every repeated block when a group of
    the same layers of another block (the same names but for their indices, blocks.3.attn.qkv and blocks.7.attn.qkv,
    or for a numbered stage's, layer1.0.conv1 and layer2.0.conv1) broke it before: blocks built by the same code fail alike, and keeping one more group whole per round ran out
    of rounds on a 12-block ViT. One failure alone keeps only its group."""

    def pattern(name: str) -> str:  # indices, and numbers ending a container's name (layer1, stage2), made #
        *path, leaf = name.split(".")
        return ".".join([*(re.sub(r"\d+$", "#", part) for part in path), re.sub(r"^\d+$", "#", leaf)])

    shapes = {pattern(n) for n in broke.outputs}
    if not broke.outputs or not any({pattern(n) for n in k.outputs} == shapes for k in kept.values()):
        return broke
    outputs = [n for n, _ in module.named_modules() if n and pattern(n) in shapes]
    return Kept([*broke.layers, *(n for n in outputs if n not in broke.layers)],
                f"{broke.reason} (and so did the same layers of another repeated block: kept whole in every block)",
                outputs)


def _nothing_prunable(kept: dict[str, Kept]) -> str:
    if not kept:
        return "nothing can be pruned: no prunable layer outside --ignore and the classifier"
    shown = [f"{', '.join(k.layers[:3])}{' ...' if len(k.layers) > 3 else ''} ({k.reason})" for k in kept.values()]
    return (f"nothing can be pruned: all {len(kept)} groups of layers had to be kept whole: " + "; ".join(shown[:3])
            + ("; ..." if len(shown) > 3 else ""))


def _prune_groups(trial: Any, pruner: Any, trace: Any, kept: dict[str, Kept], x: Any, reference: Any,
                  before: dict[str, int], probe_each: bool,
                  cal: Calibration | None = None) -> tuple[Kept | None, int]:
    """Prune the pruner's groups one by one; returns (the group that broke the model, or None; groups pruned).
    With cal.reconstruct, every group is chosen first and the Linears that alone read a group's channels are
    refitted on the uncut model (reconstruction.py), then the groups are cut."""
    pruned = 0
    groups = pruner.step(interactive=True)
    if cal is not None and cal.reconstruct:
        groups = list(groups)
        cuts: dict[Any, list[int]] = {}
        for grp in groups:
            reader = sole_reader(grp) if group_problem(pruner.DG, grp, trace) is None else None
            if reader is not None:
                cuts.setdefault(reader[0], []).extend(reader[1])
        refit(trial, cuts, cal)
    removed: dict[Any, list[int]] = {}  # output channels the layers of shared-bias attention blocks lost
    watched = {layer for bias in getattr(pruner, "mlopt_shared_biases", []) for b in bias.blocks for layer in b.layers}
    extras = extra_out_parameters(trial)
    for grp in groups:
        problem = group_problem(pruner.DG, grp, trace)
        if problem is not None:
            keep(pruner, grp, problem, kept)
            continue
        unpruned = kept_group(pruner.DG, grp, "")
        lost = {dep.target.module: [int(i) for i in idxs] for dep, idxs in grp
                if (dep.target.module in watched or dep.target.module in extras)
                and pruner.DG.is_out_channel_pruning_fn(dep.handler)}
        try:
            grp.prune()
        except Exception as exc:
            unpruned.reason = f"pruning it raised {type(exc).__name__}: {first_line(exc)[:120]}"
            return unpruned, pruned
        cut_extra_parameters(extras, lost)
        removed.update((m, idxs) for m, idxs in lost.items() if m in watched)
        pruned += 1
        if probe_each:
            state = slice_shared_biases(pruner, removed)
            if "mismatch" in state.values():
                return _shared_bias_kept(trial, pruner, next(i for i, v in state.items() if v == "mismatch")), pruned
            if state:
                continue  # a shared bias table's heads are cut in some of its blocks only: the model runs once all are
            sync_attributes(trial, pruner, before)
            problem = probe(trial, x, reference)
            if problem is not None:
                unpruned.reason = f"the model pruned with it {problem}"
                return unpruned, pruned
    state = slice_shared_biases(pruner, removed)
    if state:  # blocks of a table lost different heads, or some none: keep them all whole (the next round)
        return _shared_bias_kept(trial, pruner, next(iter(state))), pruned
    sync_attributes(trial, pruner, before)
    return None, pruned


def extra_out_parameters(module: Any) -> dict[Any, list[str]]:
    """Conv and Linear subclasses' own parameters besides weight and bias that run along their output channels
    (timm's ScaledStdConv2d `gain` in NFNet), by layer. Torch-Pruning counts them as the layer's and cuts only its
    weight and bias, so the pruned layer fails to run; cut_extra_parameters cuts them with the same channels.
    Written here: Torch-Pruning's only hook for them is a customized pruner per class, which would drop the
    coupling it builds for a (depthwise) convolution's channels."""
    import torch

    found = {}
    for m in module.modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) or getattr(m, "transposed", False):
            continue
        width = m.weight.shape[0]
        names = [n for n, p in m.named_parameters(recurse=False)
                 if n not in ("weight", "bias") and p.dim() > 0 and p.shape[0] == width]
        if names:
            found[m] = names
    return found


def cut_extra_parameters(extras: dict[Any, list[str]], lost: dict[Any, list[int]]) -> None:
    """Remove the output channels `lost[layer]` from the extra parameters (extra_out_parameters) of each layer."""
    import torch

    for layer, idxs in lost.items():
        gone = set(idxs)
        for name in extras.get(layer, []):
            param = getattr(layer, name)
            keep = torch.tensor([i for i in range(param.shape[0]) if i not in gone], dtype=torch.long)
            setattr(layer, name, torch.nn.Parameter(param.data[keep].clone(), requires_grad=param.requires_grad))


def search_ratio(module: Any, sample: Sample, cfg: Any, ignore: list[str],
                 cal: Calibration | None = None) -> tuple[float, float, dict[str, Kept]]:
    """Bisect the channel ratio whose pruned model keeps the target fraction of MACs (or params); returns the
    ratio, the fraction it keeps, and the groups kept whole. `cal` scores channels; nothing is refitted here."""
    cal = dataclasses.replace(cal, reconstruct=False) if cal is not None else None
    which, target = ("macs", cfg.target_macs) if cfg.target_macs is not None else ("params", cfg.target_params)
    base = count_ops(module, sample)[0 if which == "macs" else 1]
    kept: dict[str, Kept] = {}

    def fraction(ratio: float) -> float:
        outcome = prune_safely(module, sample, cfg, ratio, cfg.head_ratio, ignore, kept, cal)
        kept.update(outcome.kept)
        return count_ops(outcome.module, sample)[0 if which == "macs" else 1] / base

    lo, hi = 0.0, 0.9
    reachable = fraction(hi)
    if reachable > target:
        whole = f"; {len(kept)} groups had to be kept whole" if kept else ""
        raise InputError(f"target_{which} {target} cannot be reached: pruning 90% of the prunable channels still "
                         f"keeps {reachable:.3f} of the {which} (the ignored layers and the classifier stay whole{whole})")
    for _ in range(12):
        mid = (lo + hi) / 2
        if fraction(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi, fraction(hi), kept
