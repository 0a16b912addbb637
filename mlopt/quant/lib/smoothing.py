"""SmoothQuant for static INT8 on transformer graphs (Xiao et al., 2023).

Static INT8 quantizes each activation with one scale fixed at calibration. A few input channels of a
transformer's linear layers carry outliers 10-100x larger than the rest, so that one scale leaves the
other channels a handful of levels: static QDQ on all-MiniLM-L6-v2 fell to cosine 0.34 against FP32.
SmoothQuant moves the outliers into the weights, which are quantized per output channel and take them
well: for each input channel j of a MatMul, X_j is divided by s_j and row j of the weight multiplied
by it, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); the product is unchanged.

Where X is the output of a LayerNormalization (or RMS norm: SimplifiedLayerNormalization and its Skip
form) that feeds nothing but such MatMuls, 1/s is folded into the norm's scale and bias; also through
the last-position pick before an LM head that runs on the last token only. Where X is a gated MLP's
product act(gate) * up, 1/s is folded into the columns of the up projection's weight. Where the weight
is also the token embedding table (tied embeddings: the LM head's, read through a Transpose), a Mul by
1/s after the embedding Gather gives the embeddings back their values.
Elsewhere (a post-norm encoder's norm output is also its residual) a Mul by 1/s is inserted before the
MatMuls, which costs one elementwise pass; `fold_only` leaves such activations alone instead (on two
decoders, folding the attention output's scale into the value projection, one s per key-value head,
gained nothing measurable, so it is not done).

Decoders' weight-only INT8 at accuracy level 4 uses it too: onnxruntime's MatMulNBits kernels quantize
each row of the activation in blocks along K, and an outlier channel flattens the rest of its block.

Written by hand on the ONNX graph: onnxruntime's own SmoothQuant runs Intel Neural Compressor's ONNX code,
which is being deprecated, and would make it a dependency for one transform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlopt.runtime.graph_edit import attribute, constants, probe_session, readers, save_like

MS = "com.microsoft"
NORMS = {("", "LayerNormalization"): (1, 2), (MS, "SkipLayerNormalization"): (2, 3),  # scale, bias input indices
         ("", "SimplifiedLayerNormalization"): (1,), (MS, "SimplifiedLayerNormalization"): (1,),
         (MS, "SkipSimplifiedLayerNormalization"): (2,)}


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
    """Activation -> the linear nodes that read it, for activations whose every reader of a weight owns it (or
    shares it only with a tied embedding table: `_table_gathers`)."""
    inits = {i.name: i for i in model.graph.initializer}
    uses = readers(model)
    outputs = {o.name for o in model.graph.output}
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        weight = _linear_weight(node, inits)
        if weight and node.input[0] not in inits and (len(uses[weight]) == 1
                                                      or _table_gathers(weight, node, uses, outputs)):
            groups.setdefault(node.input[0], []).append(node)
    return groups


def _table_gathers(weight: str, node: Any, uses: dict[str, list[Any]], outputs: set[str]) -> list[Any]:
    """Where a linear node's [K, N] weight is also an embedding table read through a Transpose (tied embeddings:
    an LM head and the token embedding), the Gathers that read it; [] when the weight has any other reader. Row j
    of the weight is channel j of those Gathers' outputs, so a Mul by 1/s after them undoes the head's smoothing
    for the embedding: one elementwise pass over the prompt's embeddings, not one per layer."""
    others = [n for n in uses.get(weight, []) if n is not node]
    if len(others) != 1 or others[0].op_type != "Transpose" or others[0].domain not in ("", "ai.onnx"):
        return []
    transpose = others[0]
    perm = attribute(transpose, "perm", [1, 0])
    gathers = uses.get(transpose.output[0], [])
    if perm != [1, 0] or transpose.output[0] in outputs or not gathers or any(
            g.op_type != "Gather" or g.input[0] != transpose.output[0] or g.output[0] in outputs
            or not uses.get(g.output[0]) or attribute(g, "axis", 0) != 0
            for g in gathers):
        return []
    return gathers


def _channel_max(model: Any, names: list[str], feeds: list[dict[str, Any]], weights_dir: Path) -> dict[str, Any]:
    """max |x| per last-axis channel of each named tensor over the calibration feeds (onnxruntime, CPU)."""
    import numpy as np

    session = probe_session(model, names, weights_dir)
    wanted = {i.name for i in session.get_inputs()}
    peak: dict[str, Any] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(None, {k: v for k, v in feed.items() if k in wanted})):
            flat = np.abs(value.reshape(-1, value.shape[-1])).max(0)
            peak[name] = flat if name not in peak else np.maximum(peak[name], flat)
    return peak


def _gated_up_weight(name: str, producer: dict[str, Any], reads: dict[str, int], inits: dict[str, Any],
                     outputs: set[str]) -> str | None:
    """The weight of the MatMul whose output is one factor of the Mul writing `name` (a gated MLP's up
    projection), when that weight and that output have no other reader: its columns can take 1/s."""
    mul = producer.get(name)
    if mul is None or (mul.domain, mul.op_type) not in (("", "Mul"), ("ai.onnx", "Mul")) or len(mul.input) != 2:
        return None
    if mul.input[0] == mul.input[1]:
        return None
    for factor in mul.input:
        up = producer.get(factor)
        weight = _linear_weight(up, inits) if up is not None and up.op_type == "MatMul" else None
        if weight and reads.get(factor) == 1 and factor not in outputs and reads.get(weight) == 1 \
                and up.input[0] not in inits:
            return weight
    return None


def _position_pick(name: str, producer: dict[str, Any], reads: dict[str, int], known: dict[str, Any],
                   outputs: set[str]) -> str | None:
    """The tensor `name` was picked from by positions along axis 1 (Gather with a constant index, then Unsqueeze
    of axis 1: the input of an LM head that runs on the last token only), when the Gather's output has no other
    reader and neither it nor `name` is a graph output; the channels (the last axis) are the same, so a norm that
    wrote that tensor can take 1/s (the caller checks that the norm's scale has as many). Else None."""
    from onnx import numpy_helper

    unsqueeze = producer.get(name)
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or unsqueeze.domain not in ("", "ai.onnx"):
        return None
    axes = known.get(unsqueeze.input[1]) if len(unsqueeze.input) > 1 else None
    axes = numpy_helper.to_array(axes).tolist() if axes is not None else \
        attribute(unsqueeze, "axes")
    gather = producer.get(unsqueeze.input[0])
    if axes not in ([1], 1) or gather is None or gather.op_type != "Gather" or reads.get(gather.output[0]) != 1 \
            or {name, gather.output[0]} & outputs:
        return None
    index = known.get(gather.input[1])
    axis = attribute(gather, "axis", 0)
    if axis != 1 or index is None or len(index.dims) > 1:
        return None
    return gather.input[0]


def _after(name: str, readers_of: list[Any], inverse: Any, tag: str = "smooth") -> tuple[Any, Any, Any]:
    """A Mul of tensor `name` by the constant `inverse` (`name`/`tag`_inverse), read by `readers_of` in its place;
    returns (the first of them in graph order, the Mul, its constant), neither in the graph yet. `tag` keeps two
    Muls after one tensor apart (a tied embedding's output that is also a smoothed activation)."""
    import numpy as np
    from onnx import helper, numpy_helper

    constant = numpy_helper.from_array(np.asarray(inverse, np.float32), f"{name}/{tag}_inverse")
    mul = helper.make_node("Mul", [name, constant.name], [f"{name}/{tag}ed"], name=f"{name}/{tag}")
    for node in readers_of:
        node.input[:] = [mul.output[0] if i == name else i for i in node.input]
    return readers_of[0], mul, constant


def _scale(act: Any, w_peak: Any, alpha: float) -> Any:
    """SmoothQuant's s = max|X_j|^alpha / max|W_j|^(1 - alpha), 1 where either is zero, kept within 1e-5..1e5."""
    import numpy as np

    scale = np.where((act > 0) & (w_peak > 0), act ** alpha / np.maximum(w_peak, 1e-12) ** (1 - alpha), 1.0)
    return np.clip(scale, 1e-5, 1e5).astype(np.float32)


def smooth(src: Path, dst: Path, feeds: list[dict[str, Any]], alpha: float = 0.5, fold_only: bool = False) -> int:
    """Write `src` smoothed to `dst` (see the module's docstring). Returns how many activations were smoothed;
    0 (nothing written) when no MatMul weight qualifies. `fold_only`: smooth only where 1/s folds into a norm
    or an up projection (no Mul inserted, but the one after a tied embedding's Gather, once per token)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src), load_external_data=False)  # the probe reads the weights where they lie (> 2 GB)
    groups = _groups(model)
    if not groups or not feeds:
        return 0
    producer = {o: n for n in model.graph.node for o in n.output}
    uses = readers(model)
    reads = {name: len(nodes) for name, nodes in uses.items()}
    outputs = {o.name for o in model.graph.output}
    known = constants(model)
    # a last-token head's input is one position per window: its ranges are read on the norm output it was picked
    # from, every position of the same channels
    picks = {name: _position_pick(name, producer, reads, known, outputs) if reads.get(name) == len(nodes) else None
             for name, nodes in groups.items()}
    probed = _channel_max(model, sorted({picks[n] or n for n in groups}), feeds, Path(src).parent)
    peaks = {name: probed[picks[name] or name] for name in groups}
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(Path(src).parent))
    inits = {i.name: i for i in model.graph.initializer}
    arrays: dict[str, Any] = {}  # the weights changed so far (a row scale and a column scale may meet in one)

    def _scaled(name: str, factor: Any) -> None:
        base = arrays[name] if name in arrays else numpy_helper.to_array(inits[name])
        arrays[name] = (base * factor).astype(np.float32)

    inserted: list[tuple[Any, Any, Any]] = []  # (node to insert before, Mul, its constant 1/s)
    smoothed = 0
    for name, nodes in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        channels = peaks[name].shape[0]
        if any(w.shape[0] != channels for w in weights):
            continue
        picked = picks[name]
        source = picked or name  # the norm output a last-token head's input was picked from, or the input itself
        norm = producer.get(source)
        where = NORMS.get((norm.domain if norm is not None else "", norm.op_type if norm is not None else ""))
        foldable = (where is not None and norm.output[0] == source and reads.get(name) == len(nodes)
                    and (picked is None or reads.get(source) == 1)
                    and source not in outputs and all(i < len(norm.input) and norm.input[i] in inits
                                                      and reads.get(norm.input[i]) == 1
                                                      and list(inits[norm.input[i]].dims)[-1:] == [channels]
                                                      for i in where))
        up = None if foldable or reads.get(name) != len(nodes) or name in outputs \
            else _gated_up_weight(name, producer, reads, inits, outputs)
        if up is not None and list(inits[up].dims)[-1] != channels:
            up = None
        if fold_only and not foldable and up is None:
            continue
        w_peak = np.max([np.abs(w).max(1) for w in weights], axis=0)
        scale = _scale(peaks[name], w_peak, alpha)
        for node in nodes:
            _scaled(node.input[1], scale[:, None])
            for gather in _table_gathers(node.input[1], node, uses, outputs):
                inserted.append(_after(gather.output[0], uses[gather.output[0]], 1.0 / scale, tag="untie_smooth"))
        if up is not None:
            _scaled(up, 1.0 / scale[None, :])
        elif foldable:
            for i in where:
                _scaled(norm.input[i], 1.0 / scale)
        else:
            inserted.append(_after(name, nodes, 1.0 / scale))
        smoothed += 1
    if not smoothed:
        return 0
    for init in model.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    model.graph.initializer.extend(constant for _, _, constant in inserted)
    order = list(model.graph.node)
    for before, mul, _ in inserted:  # each Mul right before the first reader of its input (order stays topological)
        order.insert(order.index(before), mul)
    del model.graph.node[:]
    model.graph.node.extend(order)
    save_like(model, src, dst)
    return smoothed
