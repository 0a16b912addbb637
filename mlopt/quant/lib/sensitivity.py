"""Per-node quantization sensitivity: the SQNR (dB) of each activation a QDQ model quantizes against its
dequantized value (what onnxruntime's qdq_loss_debug calls qdq_err); PTQ keeps the lowest in float when it misses
its budget.

Written by hand rather than with qdq_loss_debug: that helper makes every intermediate tensor of the float and
the QDQ models a graph output and keeps them all, for every input, in memory. On a 110M-parameter encoder with
two batches of 128-token text that passed 24 GB. Here only the quantized activations and their dequantized
values are read, from the QDQ model alone, a few rows at a time, and summed as they come.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Rows of each input batch the measurement runs on (enough to rank nodes; bounded memory).
ROWS = 8


def node_sqnr(float_path: Path, qdq_path: Path, feeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """[{"node", "tensor", "sqnr_db", "readers"}] for the nodes whose outputs the QDQ model quantizes, worst
    first; "readers": the MatMul, Gemm and Conv nodes of the float model that read the tensor (where only those
    are quantized, keeping them in float is what leaves the tensor unquantized)."""
    import math

    import numpy as np
    import onnx
    from onnx import helper

    from mlopt.runtime.session import make_session

    nodes = onnx.load(str(float_path), load_external_data=False).graph.node
    producers = {out: node.name for node in nodes for out in node.output}
    readers: dict[str, list[str]] = {}
    for node in nodes:
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            for name in node.input:
                readers.setdefault(name, []).append(node.name)

    qdq = onnx.load(str(qdq_path), load_external_data=False)
    weights = {i.name for i in qdq.graph.initializer}
    dequantized = {n.input[0]: n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    pairs = {n.input[0]: dequantized[n.output[0]] for n in qdq.graph.node
             if n.op_type == "QuantizeLinear" and n.input[0] not in weights and n.output[0] in dequantized
             and producers.get(n.input[0])}
    if not pairs:
        return []
    declared = {o.name for o in qdq.graph.output}
    qdq.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                            for pair in pairs.items() for name in pair if name not in declared)
    session = make_session(qdq.SerializeToString(), "cpu", weights_dir=Path(qdq_path).parent)
    names = [name for pair in pairs.items() for name in pair]
    signal = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    for feed in feeds:
        values = dict(zip(names, session.run(names, {k: _rows(v) for k, v in feed.items()})))
        for tensor, after in pairs.items():
            x = values[tensor].astype(np.float64)
            signal[tensor] += float(np.sum(x * x))
            noise[tensor] += float(np.sum((x - values[after]) ** 2))
    eps = float(np.finfo(np.float32).eps)
    rows = []
    for tensor in pairs:
        sqnr = 10 * math.log10(max(signal[tensor], eps ** 2) / max(noise[tensor], eps ** 2))
        rows.append({"node": producers[tensor], "tensor": tensor, "sqnr_db": sqnr, "readers": readers.get(tensor, [])})
    return sorted(rows, key=lambda r: r["sqnr_db"])


def _rows(value: Any) -> Any:
    import numpy as np

    value = np.asarray(value)
    return value[:ROWS] if value.ndim else value
