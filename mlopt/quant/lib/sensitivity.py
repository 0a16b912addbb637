"""Per-node quantization sensitivity: the SQNR (dB) of each activation a QDQ model quantizes against its
dequantized value (what onnxruntime's qdq_loss_debug calls qdq_err), or that dynamic INT8 quantizes at run time;
PTQ keeps the lowest in float when it misses its budget.

Written by hand rather than with qdq_loss_debug: that helper makes every intermediate tensor of the float and
the QDQ models a graph output and keeps them all, for every input, in memory. On a 110M-parameter encoder with
two batches of 128-token text that passed 24 GB. Here only the quantized activations and their dequantized
values are read, from the QDQ model alone, on the first ROWS rows of each batch, and summed batch by batch.
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
    import onnx

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
    totals = _accumulate(qdq, Path(qdq_path).parent, [name for pair in pairs.items() for name in pair], feeds,
                         lambda values: {t: (values[t], values[after]) for t, after in pairs.items()})
    return _ranked(totals, producers, readers)


def dynamic_sqnr(float_path: Path, feeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same ranking for dynamic INT8: the tensors onnxruntime's dynamic quantizer quantizes at run time (the
    inputs of the nodes with a weight it quantizes: MatMul, Attention, Conv), each on the uint8 grid of its own
    range as DynamicQuantizeLinear puts it, measured on the float model; "readers": the nodes that read it."""
    import onnx

    model = onnx.load(str(float_path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    producers = {out: node.name for node in model.graph.node for out in node.output}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Attention", "Conv") and len(node.input) > 1 and node.input[1] in weights \
                and node.name and producers.get(node.input[0]):
            readers.setdefault(node.input[0], []).append(node.name)
    totals = _accumulate(model, Path(float_path).parent, list(readers), feeds,
                         lambda values: {t: (values[t], _dynamic_uint8(values[t])) for t in readers})
    return _ranked(totals, producers, readers)


def _dynamic_uint8(x: Any) -> Any:
    """x through DynamicQuantizeLinear and back: the grid QAT simulates (dynamic_sim.dynamic_fake_quant)."""
    import numpy as np
    import torch

    from mlopt.quant.lib.dynamic_sim import dynamic_fake_quant

    return dynamic_fake_quant(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def _accumulate(model: Any, weights_dir: Path, names: list[str], feeds: list[dict[str, Any]],
                pairs_of: Any) -> dict[str, list[float]]:
    """Run `model` with the tensors `names` as outputs on a few rows of each feed; `pairs_of(values)` gives each
    measured tensor's (value, value after quantization). Returns tensor -> [signal energy, noise energy]."""
    import numpy as np

    from mlopt.runtime.graph_edit import probe_session

    if not names:
        return {}
    names = list(dict.fromkeys(names))
    session = probe_session(model, names, weights_dir)
    wanted = {i.name for i in session.get_inputs()}
    totals: dict[str, list[float]] = {}
    for feed in feeds:
        values = dict(zip(names, session.run(names, {k: _rows(v) for k, v in feed.items() if k in wanted})))
        for tensor, (before, after) in pairs_of(values).items():
            x = before.astype(np.float64)
            total = totals.setdefault(tensor, [0.0, 0.0])
            total[0] += float(np.sum(x * x))
            total[1] += float(np.sum((x - after) ** 2))
    return totals


def _ranked(totals: dict[str, list[float]], producers: dict[str, str],
            readers: dict[str, list[str]]) -> list[dict[str, Any]]:
    import math

    eps = 1.1920929e-07  # float32's, as onnxruntime's SQNR helper floors both norms
    rows = [{"node": producers[tensor], "tensor": tensor,
             "sqnr_db": 10 * math.log10(max(signal, eps ** 2) / max(noise, eps ** 2)),
             "readers": readers.get(tensor, [])} for tensor, (signal, noise) in totals.items()]
    return sorted(rows, key=lambda r: r["sqnr_db"])


def _rows(value: Any) -> Any:
    import numpy as np

    value = np.asarray(value)
    return value[:ROWS] if value.ndim else value
