"""Per-node quantization sensitivity from onnxruntime's QDQ debugging helpers: the SQNR (dB) of each
quantized activation against its float value; PTQ keeps the lowest in float when it misses its budget."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


def node_sqnr(float_path: Path, qdq_path: Path, feeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """[{"node", "tensor", "sqnr_db", "readers"}] for the nodes whose outputs the QDQ model quantizes, worst
    first; "readers": the MatMul, Gemm and Conv nodes that read the tensor (where only those are quantized,
    keeping them in float is what leaves the tensor unquantized)."""
    import math

    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    from mlopt.quant.lib.calibration import FeedReader

    nodes = onnx.load(str(float_path), load_external_data=False).graph.node
    producers = {out: node.name for node in nodes for out in node.output}
    readers: dict[str, list[str]] = {}
    for node in nodes:
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            for name in node.input:
                readers.setdefault(name, []).append(node.name)
    with tempfile.TemporaryDirectory() as tmp:
        aug_float, aug_qdq = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        modify_model_output_intermediate_tensors(str(float_path), str(aug_float))
        modify_model_output_intermediate_tensors(str(qdq_path), str(aug_qdq))
        float_acts = collect_activations(str(aug_float), FeedReader(feeds))
        qdq_acts = collect_activations(str(aug_qdq), FeedReader(feeds))
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    rows = []
    for tensor, err in errors.items():
        sqnr = err.get("qdq_err")
        if producers.get(tensor) and sqnr is not None and not math.isnan(sqnr):
            rows.append({"node": producers[tensor], "tensor": tensor, "sqnr_db": float(sqnr),
                         "readers": readers.get(tensor, [])})
    return sorted(rows, key=lambda r: r["sqnr_db"])
