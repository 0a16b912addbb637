"""onnxruntime's fused operators on an exported graph (attention, skip layer norm, bias GELU), kept when measured faster.

torch's dynamo exporter spells attention in ways onnxruntime's own transformer optimizer does not
match (it fuses no Attention on current transformers models). onnxscript's ort_fusions rewriter
matches them: on all-MiniLM-L6-v2 it fuses one Attention per layer. Its constant folding stops at
262,144 output elements, which leaves each layer's packed query/key/value weight as a Concat computed
at every run; mlopt folds it with a limit of its own. A fused graph is checked against PyTorch like
the export itself and timed against the plain one on onnxruntime: the export keeps whichever is
faster, and says which.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from mlopt.core import console
from mlopt.core.errors import ParityError, first_line
from mlopt.core.sections import Table

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


def keep_faster(latency: list[dict[int, float]]) -> bool:
    """Whether the fused graph is the one to keep: faster over the batch sizes timed (geometric mean)."""
    ratios = [latency[0][b] / latency[1][b] for b in latency[0]]
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) > 1.0


def choose(module: Any, path: Path, inputs: Any, atol: float, rtol: float, mode: str, sample_shape: Any,
           batch_sizes: list[int], iterations: int) -> tuple[dict[str, Any], list[str], list[Any]]:
    """Fuse the exported graph at `path`, check it, and keep it in `path` when `mode` is "on", or when "auto"
    and it is measured faster. Returns metrics, notes and report sections."""
    from mlopt.export.lib.parity import compare
    from mlopt.export.lib.timing import interleaved_latency

    fused_path = path.with_name("fused-" + path.name)
    counts = fuse(path, fused_path)
    if not counts:
        return {"fused_graph": False}, ["onnxruntime fusions: none apply to this graph"], []
    listed = ", ".join(f"{n} {op}" for op, n in counts.items())
    sections: list[Any] = [Table(title="onnxruntime fusions in the fused graph", columns=["operator", "count"],
                                 rows=[[op, n] for op, n in counts.items()])]
    try:
        parity = compare(module, fused_path, inputs, atol, rtol)
    except ParityError as exc:
        _remove(fused_path)
        if mode == "on":
            raise
        return {"fused_graph": False}, [f"the fused graph ({listed}) was not kept: {exc}"], sections
    metrics: dict[str, Any] = {"fused_max_abs_error": parity["max_abs_error"]}
    if mode == "on":
        keep, why = True, "--fuse on"
    else:
        latency = interleaved_latency([path, fused_path], sample_shape, "cpu", batch_sizes, iterations)
        keep = keep_faster(latency)
        sections.append(Table(title="plain against fused graph (onnxruntime, CPU)",
                              columns=["batch", "plain ms", "fused ms", "fused speed-up"],
                              rows=[[b, round(latency[0][b], 3), round(latency[1][b], 3),
                                     round(latency[0][b] / latency[1][b], 3)] for b in batch_sizes],
                              note="median of the best of interleaved rounds"))
        why = ", ".join(f"{latency[0][b] / latency[1][b]:.2f}x at batch {b}" for b in batch_sizes)
        metrics.update({f"fused_speedup_b{b}": latency[0][b] / latency[1][b] for b in batch_sizes})
    if keep:
        os.replace(fused_path, path)
        data = fused_path.with_name(fused_path.name + ".data")
        if data.exists():
            os.replace(data, path.with_name(path.name + ".data"))
        note = f"kept the fused graph ({listed}; {why})"
    else:
        _remove(fused_path)
        note = f"kept the graph as exported: the fused one ({listed}) was not faster ({why})"
    console.info(note)
    metrics.update({"fused_graph": keep, "fused_attention": sum(counts.get(op, 0) for op in FUSED_OPS[:3])})
    return metrics, [note], sections
