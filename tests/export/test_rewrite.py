"""Graph rewrites for onnxruntime's CPU kernels (mlopt.export.lib.rewrite), on small graphs built here: the
rewritten graph computes the same outputs, onnxruntime does not fuse it back, and a graph a rewrite does not
fit is left alone."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlopt.export.lib.rewrite import attention_mask_index, split_fusions

HIDDEN, HEADS = 8, 2
RNG = np.random.default_rng(0)


def _init(name, shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _run(path, feed, optimize=False, optimized_to=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_to:
        so.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)


def _fused_block(path, opset=17):
    """x -> SkipLayerNormalization(x, skip, bias) -> MatMul -> BiasGelu, plus an Add -> LayerNormalization;
    the skip layer norm's sum output is a graph output too."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", HIDDEN])
    skip = helper.make_tensor_value_info("skip", TensorProto.FLOAT, ["b", "s", HIDDEN])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "total", "z")]
    nodes = [
        helper.make_node("SkipLayerNormalization", ["x", "skip", "g", "beta", "bias"], ["n1", "", "", "total"],
                         domain="com.microsoft", epsilon=1e-5),
        helper.make_node("MatMul", ["n1", "w"], ["h"]),
        helper.make_node("BiasGelu", ["h", "hb"], ["y"], domain="com.microsoft"),
        helper.make_node("Add", ["x", "skip"], ["a"]),
        helper.make_node("LayerNormalization", ["a", "g", "beta"], ["z"], axis=-1, epsilon=1e-5),
    ]
    inits = [_init("g", [HIDDEN]), _init("beta", [HIDDEN]), _init("bias", [HIDDEN]), _init("w", [HIDDEN, 16]),
             _init("hb", [16])]
    model = helper.make_model(helper.make_graph(nodes, "block", [x, skip], outs, inits),
                              opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path


def test_split_fusions_computes_the_same_and_onnxruntime_does_not_fuse_it_back(tmp_path):
    src = _fused_block(tmp_path / "fused.onnx")
    changed = split_fusions(src, tmp_path / "split.onnx")
    assert changed == {"SkipLayerNormalization": 1, "BiasGelu": 1, "Add as Sum": 1}
    feed = {"x": RNG.standard_normal((2, 5, HIDDEN)).astype(np.float32),
            "skip": RNG.standard_normal((2, 5, HIDDEN)).astype(np.float32)}
    for want, got in zip(_run(src, feed), _run(tmp_path / "split.onnx", feed)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    split_ops = [n.op_type for n in onnx.load(str(tmp_path / "split.onnx")).graph.node]
    assert "SkipLayerNormalization" not in split_ops and "BiasGelu" not in split_ops
    assert split_ops.count("Sum") == 2 and split_ops.count("LayerNormalization") == 2
    # With all of onnxruntime's graph optimizations on, the session keeps the split form.
    _run(tmp_path / "split.onnx", feed, optimize=True, optimized_to=tmp_path / "ort.onnx")
    assert "SkipLayerNormalization" not in {n.op_type for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node}
    # ...which it would not with the residual spelled Add (the reason for Sum): onnxruntime fuses Add + LayerNorm.
    model = onnx.load(str(tmp_path / "split.onnx"))
    for node in model.graph.node:
        if node.op_type == "Sum":
            node.op_type = "Add"
    onnx.save(model, str(tmp_path / "add.onnx"))
    _run(tmp_path / "add.onnx", feed, optimize=True, optimized_to=tmp_path / "ort-add.onnx")
    assert "SkipLayerNormalization" in {n.op_type for n in onnx.load(str(tmp_path / "ort-add.onnx")).graph.node}


def test_split_fusions_leaves_a_graph_it_cannot_or_need_not_change(tmp_path):
    old = _fused_block(tmp_path / "old.onnx", opset=16)  # no LayerNormalization before opset 17
    assert split_fusions(old, tmp_path / "out.onnx") == {} and not (tmp_path / "out.onnx").exists()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    plain = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    assert split_fusions(tmp_path / "plain.onnx", tmp_path / "out.onnx") == {}
    assert not (tmp_path / "out.onnx").exists()


def _attention_model(path, bias_kind):
    """One com.microsoft Attention whose attention bias (input 5) comes from the graph's attention_mask:
    "padding" (0 at kept keys, -10000 at masked ones, for every query), "causal" (padding and a causal
    triangle) or "other input" (read from another graph input)."""
    x = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "s", HIDDEN])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])
    inputs = [x, mask]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [_init("w", [HIDDEN, 3 * HIDDEN]), _init("wb", [3 * HIDDEN]),
             numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes12"),
             numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
             numpy_helper.from_array(np.array(-10000.0, dtype=np.float32), "neg")]
    inits += [numpy_helper.from_array(np.array([0], dtype=np.int64), "zero_i"),
              numpy_helper.from_array(np.array([1], dtype=np.int64), "one_i"),
              numpy_helper.from_array(np.array([2], dtype=np.int64), "two_i")]
    nodes = [helper.make_node("Cast", ["attention_mask"], ["keep"], to=TensorProto.BOOL),
             helper.make_node("Unsqueeze", ["keep", "axes12"], ["keep4"]),  # (b, 1, 1, s)
             helper.make_node("Shape", ["attention_mask"], ["bs"]),
             helper.make_node("Slice", ["bs", "zero_i", "one_i"], ["b"]),
             helper.make_node("Slice", ["bs", "one_i", "two_i"], ["s"]),
             helper.make_node("Concat", ["b", "one_i", "s", "s"], ["full"], axis=0)]  # Attention wants (b, 1, s, s)
    if bias_kind == "padding":
        nodes += [helper.make_node("Where", ["keep4", "zero", "neg"], ["pad"]),
                  helper.make_node("Expand", ["pad", "full"], ["bias"])]
    elif bias_kind == "causal":
        inits.append(numpy_helper.from_array(np.tril(np.ones((8, 8), dtype=bool)), "tril"))
        nodes += [helper.make_node("Slice", ["tril", "zero_i", "s", "zero_i"], ["tri0"]),
                  helper.make_node("Slice", ["tri0", "zero_i", "s", "one_i"], ["tri"]),
                  helper.make_node("And", ["keep4", "tri"], ["both"]),  # (b, 1, s, s)
                  helper.make_node("Where", ["both", "zero", "neg"], ["bias"])]
    elif bias_kind == "window":  # padding and a local window of 128 keys either side, as local attention layers use
        band = np.abs(np.arange(600)[:, None] - np.arange(600)[None, :]) <= 128
        inits.append(numpy_helper.from_array(band, "band"))
        nodes += [helper.make_node("Slice", ["band", "zero_i", "s", "zero_i"], ["band0"]),
                  helper.make_node("Slice", ["band0", "zero_i", "s", "one_i"], ["near"]),
                  helper.make_node("And", ["keep4", "near"], ["both"]),  # (b, 1, s, s)
                  helper.make_node("Where", ["both", "zero", "neg"], ["bias"])]
    else:
        inputs.append(helper.make_tensor_value_info("position_bias", TensorProto.FLOAT, ["b", 1, "s", "s"]))
        nodes += [helper.make_node("Where", ["keep4", "zero", "neg"], ["pad"]),
                  helper.make_node("Add", ["pad", "position_bias"], ["bias"])]  # (b, 1, s, s)
    nodes.append(helper.make_node("Attention", ["hidden", "w", "wb", "", "", "bias"], ["y"], domain="com.microsoft",
                                  num_heads=HEADS, qkv_hidden_sizes=[HIDDEN] * 3))
    model = helper.make_model(helper.make_graph(nodes, "attention", inputs, [out], inits),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path


def test_a_key_padding_attention_bias_becomes_a_mask_index_with_the_same_outputs(tmp_path):
    src = _attention_model(tmp_path / "a.onnx", "padding")
    assert attention_mask_index(src, tmp_path / "mi.onnx") == 1
    model = onnx.load(str(tmp_path / "mi.onnx"))
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    assert list(attention.input) == ["hidden", "w", "wb", "mask_index_int32"]
    assert not [a for a in attention.attribute if a.name == "qkv_hidden_sizes"]  # equal sizes: the default
    assert "Where" not in {n.op_type for n in model.graph.node}  # the bias subgraph is gone
    hidden = RNG.standard_normal((3, 6, HIDDEN)).astype(np.float32)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2, [1, 0, 1, 1, 0, 1]], dtype=np.int64)
    want = _run(src, {"hidden": hidden, "attention_mask": mask})[0]
    got = _run(tmp_path / "mi.onnx", {"hidden": hidden, "attention_mask": mask})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["causal", "other input", "window"])
def test_an_attention_bias_that_is_not_key_padding_is_left_alone(kind, tmp_path):
    src = _attention_model(tmp_path / "a.onnx", kind)
    assert attention_mask_index(src, tmp_path / "mi.onnx") == 0
    assert not (tmp_path / "mi.onnx").exists()
