"""Where onnxruntime quantizes activations, found in a model's torch.fx graph.

onnxruntime's QDQ quantizer puts a QuantizeLinear on the inputs of every Conv and Gemm, and also on
residual-add, pooling, concatenation and resize inputs, the output of a ReLU or Clip it folds into the
layer before, and more (its operator registry); a simulation that agrees with the runtime must
fake-quantize exactly those tensors. No library maps ONNX tensors back to torch, so this matches them
by value: both graphs run on one probe batch, and each quantized ONNX tensor goes to the first fx node,
in execution order, computing the same values (the nodes after it that do, such as dropout in eval
mode or a ReLU after a ReLU6, pass the quantized values through unchanged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def quantized_tensors(qdq_path: Path) -> dict[str, str]:
    """The activation tensors onnxruntime's quantizer put a QuantizeLinear on, in graph order, each
    with the name of its scale: tensors with the same scale share it (the quantizer gives the output
    of a Reshape, Transpose or other 8-bit pass-through op its input's scale)."""
    import onnx

    model = onnx.load(str(qdq_path))
    weights = {i.name for i in model.graph.initializer}
    found: dict[str, str] = {}
    for node in model.graph.node:
        name = node.input[0]
        if node.op_type != "QuantizeLinear" or name in weights:
            continue
        # A quantized graph output: the quantizer renames the tensor that computes it.
        found.setdefault(name.removesuffix("_QuantizeLinear_Input"), node.input[1])
    return found


def onnx_values(path: Path, tensors: list[str], feed: dict[str, Any]) -> dict[str, Any]:
    """The values of `tensors` of the ONNX model at `path` for one feed (the graph is run unoptimised,
    so every named tensor exists)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    return {t: values[t] for t in tensors if t in values}


def match_by_value(gm: Any, x: Any, values: dict[str, Any]) -> dict[str, str]:
    """{ONNX tensor: fx node name} for each tensor of `values` some node of `gm` computes on `x`."""
    import numpy as np
    import torch
    import torch.fx as fx

    pending: dict[tuple[int, ...], list[str]] = {}
    for name, v in values.items():
        pending.setdefault(tuple(v.shape), []).append(name)
    found: dict[str, str] = {}

    class Matcher(fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and tuple(out.shape) in pending:
                a = out.detach().float().cpu().numpy()
                for name in list(pending[tuple(out.shape)]):
                    b = values[name]
                    if np.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(b).max()))):
                        found[name] = n.name
                        pending[tuple(out.shape)].remove(name)
            return out

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            Matcher(gm).run(x)
    finally:
        gm.train(was_training)
    return found


def consumers(node: Any) -> str:
    """What reads an fx node's value, for people: module names, else function or method names."""
    names = []
    for user in node.users:
        if user.op == "call_function" and user.target is getattr or user.op == "call_method" and user.target in (
                "size", "dim"):
            continue  # reads the shape, not the values
        if user.meta.get("layer"):  # a Linear split into product and bias (mlopt.quant.lib.simulation.split_linear_bias)
            names.append(user.meta["layer"])
        elif user.op == "call_module":
            names.append(str(user.target))
        elif user.op == "output":
            names.append("output")
        else:
            names.append(getattr(user.target, "__name__", str(user.target)))
    return ", ".join(dict.fromkeys(names))
