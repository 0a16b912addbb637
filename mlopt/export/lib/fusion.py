"""The graph onnxruntime runs fastest: candidates to an export, each checked against PyTorch, timed, one kept.

The candidates are the graph as exported, graphs exported otherwise (the caller's: for transformer
encoders the other exporter's), and each of these with onnxruntime's fused operators (attention, skip
layer norm, bias GELU), and each fused graph with its layer norms and GELUs split again where onnxruntime
runs the fused kernels slower (`rewrite.split_fusions`). torch's dynamo exporter spells attention in ways onnxruntime's own transformer
optimizer does not match (it fuses no Attention on current transformers models); onnxscript's
ort_fusions rewriter matches them: on all-MiniLM-L6-v2 it fuses one Attention per layer. Its constant
folding stops at 262,144 output elements, which leaves each layer's packed query/key/value weight as
a Concat computed at every run; mlopt folds it with a limit of its own.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from mlopt.core import console
from mlopt.core.errors import MloptError, first_line
from mlopt.core.sections import Table
from mlopt.export.lib.rewrite import split_fusions

# The operators whose count the report gives (those a fusion creates), in the order shown.
FUSED_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "SkipLayerNormalization",
             "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "EmbedLayerNormalization",
             "BiasGelu", "FastGelu", "Gelu", "RotaryEmbedding", "QAttention")
_FOLD_LIMIT = 1 << 26  # elements: a packed QKV weight of a large encoder folds too


def fused_ops(path: Path) -> dict[str, int]:
    """How many of each fused operator (com.microsoft domain) the graph holds."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = {op: 0 for op in FUSED_OPS}
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type in counts:
            counts[node.op_type] += 1
    return {op: n for op, n in counts.items() if n}


def float_attention(model: Any) -> int:
    """How many fused attention nodes of an ONNX model onnxruntime's dynamic quantization leaves in float: its
    QAttention takes neither an attention bias (input 5) nor qkv_hidden_sizes, and MultiHeadAttention has no
    INT8 form."""
    def stays_float(node: Any) -> bool:
        return node.op_type == "MultiHeadAttention" or (len(node.input) > 5 and bool(node.input[5])) or any(
            a.name == "qkv_hidden_sizes" for a in node.attribute)

    return sum(1 for n in model.graph.node if n.domain == "com.microsoft"
               and n.op_type in ("Attention", "MultiHeadAttention") and stays_float(n))


def fuse(src: Path, dst: Path) -> dict[str, int]:
    """Write `src` with onnxruntime's fused operators to `dst`; return the fused operators it holds (empty
    when no fusion applied or the rewriter failed: then `dst` is not written)."""
    import onnx_ir as ir
    import onnxscript.optimizer as optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    before = fused_ops(src)
    try:
        with console.muted_loggers("onnxscript"):
            model, _ = optimize_for_ort(ir.load(str(src)))
            optimizer.fold_constants(model, input_size_limit=_FOLD_LIMIT, output_size_limit=_FOLD_LIMIT)
            optimizer.remove_unused_nodes(model)
            external = src.with_name(src.name + ".data").exists()
            ir.save(model, str(dst), external_data=dst.name + ".data" if external else None)
    except Exception as exc:  # the rewriter is best effort: the plain graph stays
        console.warn(f"onnxruntime fusions could not be applied ({type(exc).__name__}: {first_line(exc)[:120]}); "
                     "kept the graph as exported")
        _remove(dst)
        return {}
    after = fused_ops(dst)
    if after == before:
        _remove(dst)
        return {}
    return after


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def fastest(latency: list[dict[int, float]]) -> int:
    """The index of the fastest graph over the batch sizes timed (the lowest geometric mean latency)."""
    return min(range(len(latency)), key=lambda i: sum(math.log(ms) for ms in latency[i].values()))


def per_batch_note(batch: int, best: str, best_ms: float, kept: str, kept_ms: float) -> str:
    """Where one batch size alone would have chosen otherwise: one file serves every batch size, so the kept one
    is chosen over all of them, and the report says what that costs at this one."""
    return (f"at batch {batch} alone the fastest was {best} ({best_ms:.3f} ms); kept {kept} ({kept_ms:.3f} ms, "
            f"{kept_ms / best_ms:.2f}x), chosen over all batch sizes timed")


def _move(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    data = src.with_name(src.name + ".data")
    if data.exists():
        os.replace(data, dst.with_name(dst.name + ".data"))


def _listed(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {op}" for op, n in counts.items()) or "none"


def choose(module: Any, path: Path, others: list[tuple[str, Path]], inputs: Any, atol: float, rtol: float, mode: str,
           sample_shape: Any, batch_sizes: list[int], iterations: int) -> tuple[dict[str, Any], list[str], list[Any]]:
    """Pick the graph to keep in `path` (the export, checked already) among it, `others` (label, graph exported
    otherwise, not yet checked) and each one's fused version. mode "on": the fused export, whenever it passes
    parity; "auto": whichever onnxruntime runs fastest, timed in interleaved rounds. Returns metrics (with the
    kept graph's parity when it is not the export), notes and report sections."""
    from mlopt.export.lib.parity import compare
    from mlopt.export.lib.timing import interleaved_latency

    notes: list[str] = []
    graphs: list[tuple[str, Path, dict[str, int]]] = [("the graph as exported", path, {})]
    parity: dict[Path, dict[str, Any]] = {}

    def check(label: str, candidate: Path, counts: dict[str, int]) -> None:
        try:
            parity[candidate] = compare(module, candidate, inputs, atol, rtol)
            graphs.append((label, candidate, counts))
        except MloptError as exc:  # parity, or onnxruntime refusing the graph: the export stands without it
            notes.append(f"{label}: not a candidate ({exc})")
            _remove(candidate)

    for label, other in others:
        check(label, other, {})
    for label, base, _ in list(graphs):
        fused = base.with_name("fused-" + base.name)
        counts = fuse(base, fused)
        if counts:
            check(f"{label}, fused", fused, counts)
            if graphs[-1][1] != fused:  # the fused graph was no candidate (parity, or onnxruntime refused it)
                continue
            # The same graph with the fused layer norms and GELUs split again (rewrite.split_fusions): on some
            # CPUs onnxruntime runs those fused kernels slower than the plain operators.
            split = base.with_name("split-" + base.name)
            try:
                changed = split_fusions(fused, split)
            except Exception as exc:  # a candidate, not the export
                notes.append(f"{label}, fused, layer norm and GELU split: not a candidate ({first_line(exc)[:120]})")
                changed = {}
            if changed.get("SkipLayerNormalization") or changed.get("BiasGelu"):
                check(f"{label}, fused, layer norm and GELU split", split, fused_ops(split))
            else:
                _remove(split)
    if len(graphs) == 1:
        return {"fused_graph": False}, [*notes, "onnxruntime fusions: none apply to this graph"], []

    sections: list[Any] = []
    if mode == "on":
        keep = next((i for i, g in enumerate(graphs) if g[2] and g[1].name == "fused-" + path.name), 0)
        why = "--fuse on"
    else:
        latency = interleaved_latency([g[1] for g in graphs], sample_shape, "cpu", batch_sizes, iterations)
        keep = fastest(latency)
        sections.append(Table(title="graph candidates (onnxruntime, CPU)",
                              columns=["graph", "fused operators", *(f"batch {b} ms" for b in batch_sizes),
                                       "speed-up over the export"],
                              rows=[[label, _listed(counts), *(round(lat[b], 3) for b in batch_sizes),
                                     round(math.exp(sum(math.log(latency[0][b] / lat[b]) for b in batch_sizes)
                                                    / len(batch_sizes)), 3)]
                                    for (label, _, counts), lat in zip(graphs, latency)],
                              note="median of the best of interleaved rounds; speed-up: geometric mean over the "
                                   "batch sizes"))
        why = ", ".join(f"{latency[0][b] / latency[keep][b]:.2f}x the export at batch {b}" for b in batch_sizes)
        notes.extend(per_batch_note(b, graphs[i][0], latency[i][b], graphs[keep][0], latency[keep][b])
                     for b in batch_sizes for i in [min(range(len(graphs)), key=lambda i: latency[i][b])] if i != keep)
    label, chosen, counts = graphs[keep]
    for i, (_, other, _) in enumerate(graphs):
        if i != keep and other != path:
            _remove(other)
    if chosen != path:
        _remove(path)
        _move(chosen, path)
    note = f"kept {label} ({_listed(counts)} fused; {why})"
    console.info(note)
    metrics = {**parity.get(chosen, {}), "fused_graph": bool(counts), "graph_kept": label,
               "fused_attention": sum(counts.get(op, 0) for op in FUSED_OPS[:3])}
    return metrics, [*notes, note], sections
