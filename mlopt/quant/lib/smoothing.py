"""SmoothQuant for static INT8 on transformer graphs (Xiao et al., 2023).

Static INT8 quantizes each activation with one scale fixed at calibration. A few input channels of a
transformer's linear layers carry outliers 10-100x larger than the rest, so that one scale leaves the
other channels a handful of levels: static QDQ on all-MiniLM-L6-v2 fell to cosine 0.34 against FP32.
SmoothQuant moves the outliers into the weights, which are quantized per output channel and take them
well: for each input channel j of a MatMul, X_j is divided by s_j and row j of the weight multiplied
by it, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); the product is unchanged.

Where X is the output of a LayerNormalization that feeds nothing but such MatMuls, 1/s is folded into
the norm's scale and bias; elsewhere (a post-norm encoder's norm output is also its residual) a Mul by
1/s is inserted before the MatMuls, which costs one elementwise pass.

Written by hand on the ONNX graph: onnxruntime's own SmoothQuant runs Intel Neural Compressor's ONNX code,
which is being deprecated, and would make it a dependency for one transform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlopt.runtime.graph_edit import probe_session, readers, save_like

MS = "com.microsoft"
NORMS = {("", "LayerNormalization"): (1, 2), (MS, "SkipLayerNormalization"): (2, 3)}  # scale, bias input indices


def _linear_weight(node: Any, inits: dict[str, Any]) -> str | None:
    """The 2-D float weight a MatMul (input 1) or com.microsoft Attention (input 1) applies to its input 0."""
    import onnx

    if (node.domain, node.op_type) not in (("", "MatMul"), ("ai.onnx", "MatMul"), (MS, "Attention")):
        return None
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
        return None
    return node.input[1]


def _groups(model: Any) -> dict[str, list[Any]]:
    """Activation -> the linear nodes that read it, for activations whose every reader of a weight owns it."""
    inits = {i.name: i for i in model.graph.initializer}
    uses = readers(model)
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        weight = _linear_weight(node, inits)
        if weight and len(uses[weight]) == 1 and node.input[0] not in inits:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def _channel_max(model: Any, names: list[str], feeds: list[dict[str, Any]]) -> dict[str, Any]:
    """max |x| per last-axis channel of each named tensor over the calibration feeds (onnxruntime, CPU)."""
    import numpy as np

    session = probe_session(model, names)
    wanted = {i.name for i in session.get_inputs()}
    peak: dict[str, Any] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(None, {k: v for k, v in feed.items() if k in wanted})):
            flat = np.abs(value.reshape(-1, value.shape[-1])).max(0)
            peak[name] = flat if name not in peak else np.maximum(peak[name], flat)
    return peak


def smooth(src: Path, dst: Path, feeds: list[dict[str, Any]], alpha: float = 0.5) -> int:
    """Write `src` smoothed for static INT8 to `dst` (see the module's docstring). Returns how many activations
    were smoothed; 0 (nothing written) when no MatMul weight qualifies."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    groups = _groups(model)
    if not groups or not feeds:
        return 0
    peaks = _channel_max(model, sorted(groups), feeds)
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    reads = {name: len(nodes) for name, nodes in readers(model).items()}
    outputs = {o.name for o in model.graph.output}
    replaced: dict[str, Any] = {}
    inserted: list[tuple[Any, Any]] = []  # (node to insert before, Mul)
    smoothed = 0
    for name, nodes in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        channels = peaks[name].shape[0]
        if any(w.shape[0] != channels for w in weights):
            continue
        w_peak = np.max([np.abs(w).max(1) for w in weights], axis=0)
        scale = np.where((peaks[name] > 0) & (w_peak > 0),
                         peaks[name] ** alpha / np.maximum(w_peak, 1e-12) ** (1 - alpha), 1.0)
        scale = np.clip(scale, 1e-5, 1e5).astype(np.float32)
        for node, w in zip(nodes, weights):
            replaced[node.input[1]] = numpy_helper.from_array((w * scale[:, None]).astype(np.float32), node.input[1])
        norm = producer.get(name)
        where = NORMS.get((norm.domain if norm is not None else "", norm.op_type if norm is not None else ""))
        foldable = (where is not None and norm.output[0] == name and reads.get(name) == len(nodes)
                    and name not in outputs and all(i < len(norm.input) and norm.input[i] in inits
                                                    and reads.get(norm.input[i]) == 1 for i in where))
        if foldable:
            for i in where:
                values = numpy_helper.to_array(inits[norm.input[i]])
                replaced[norm.input[i]] = numpy_helper.from_array((values / scale).astype(np.float32), norm.input[i])
        else:
            inverse = f"{name}/smooth_inverse"
            model.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
            mul = helper.make_node("Mul", [name, inverse], [f"{name}/smoothed"], name=f"{name}/smooth")
            for node in nodes:
                node.input[0] = mul.output[0]
            inserted.append((nodes[0], mul))
        smoothed += 1
    if not smoothed:
        return 0
    for init in model.graph.initializer:
        if init.name in replaced:
            init.CopyFrom(replaced[init.name])
    order = list(model.graph.node)
    for before, mul in inserted:  # each Mul right before the first of its MatMuls (graph order stays topological)
        order.insert(order.index(before), mul)
    del model.graph.node[:]
    model.graph.node.extend(order)
    save_like(model, src, dst)
    return smoothed
