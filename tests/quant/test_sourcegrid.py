"""Weights that lie on a GGUF block grid are found on it and stored on it exactly (MatMulNBits,
GatherBlockQuantized), with the float rests of an offset grid added back."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlopt.quant.lib.sourcegrid import find_grid, lies_on_grids, store_on_grids

gguf_quants = pytest.importorskip("gguf.quants")


def _through(kind: str, weight: np.ndarray) -> np.ndarray:
    """`weight` ([K, N]) quantized and dequantized by the gguf package's own code, blocks along K as llama.cpp
    stores a [N, K] tensor."""
    qtype = getattr(gguf_quants.GGMLQuantizationType, kind)
    return gguf_quants.dequantize(gguf_quants.quantize(np.ascontiguousarray(weight.T), qtype), qtype).T.copy()


@pytest.mark.parametrize("kind,bits,symmetric", [("Q4_0", 4, True), ("Q4_1", 4, False), ("Q8_0", 8, True),
                                                 ("Q5_0", 8, True), ("Q5_1", 8, False)])
def test_gguf_formats_are_found_on_their_grid(kind, bits, symmetric):
    rng = np.random.default_rng(1)
    weight = _through(kind, rng.normal(0, 0.05, (256, 96)).astype(np.float32))
    grid = find_grid(weight, bits) if bits == 8 else find_grid(weight, 4)
    assert grid is not None and grid.bits == bits and grid.symmetric == symmetric
    assert np.abs(grid.dequantized() - weight).max() < 1e-7
    if bits == 8:  # a 5- or 8-bit grid is no 4-bit one
        assert find_grid(weight, 4) is None


@pytest.mark.parametrize("kind,size,bits", [("Q4_K", 144, 4), ("Q5_K", 176, 8)])
def test_k_quant_blocks_are_found_on_their_sub_block_grids(kind, size, bits):
    """k-quants: super-blocks of 256 with a 6-bit scale and minimum per sub-block of 32 (the gguf package cannot
    quantize to them, so random codes are dequantized; the scales in front are set to sane float16 values)."""
    rng = np.random.default_rng(6)
    raw = rng.integers(0, 256, (64, 512 // 256, size), dtype=np.uint8)
    raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    raw[..., 2:4] = np.frombuffer(np.float16(0.005).tobytes(), np.uint8)
    qtype = getattr(gguf_quants.GGMLQuantizationType, kind)
    weight = gguf_quants.dequantize(raw.reshape(64, -1), qtype).T.copy().astype(np.float32)
    grid = find_grid(weight, bits)
    assert grid is not None and not grid.symmetric
    assert np.abs(grid.dequantized() - weight).max() < 1e-7


def test_a_symmetric_block_with_one_outlier_stays_symmetric():
    """{0, 8d} fits the span over 15 levels too; the symmetric reading (no float rest) is the one kept."""
    weight = _through("Q4_0", np.random.default_rng(7).normal(0, 0.01, (128, 64)).astype(np.float32))
    weight[:32, 0] = 0.0
    weight[5, 0] = 0.5  # a block of zeros and one outlier
    weight = _through("Q4_0", weight)
    grid = find_grid(weight, 4)
    assert grid is not None and grid.symmetric
    assert np.abs(grid.dequantized() - weight).max() < 1e-7


def test_constant_and_zero_blocks_are_exact():
    weight = np.zeros((64, 8), np.float32)
    weight[32:, 1] = 0.25
    grid = find_grid(weight, 4)
    assert grid is not None and grid.symmetric and np.array_equal(grid.dequantized(), weight)
    assert find_grid(np.full((32, 4), np.nan, np.float32), 4) is None


def test_float_weights_and_odd_shapes_lie_on_no_grid():
    rng = np.random.default_rng(2)
    assert find_grid(rng.normal(size=(128, 64)).astype(np.float32), 4) is None
    assert find_grid(rng.normal(size=(128, 64)).astype(np.float32), 8) is None
    assert find_grid(_through("Q4_0", rng.normal(size=(128, 64)).astype(np.float32))[:100], 4) is None  # K % 32


def _model(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                   for o in outputs],
                              [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _run(model, feed):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def test_matmuls_and_tables_are_stored_exactly():
    rng = np.random.default_rng(3)
    k, n, vocab = 128, 96, 40
    w1 = _through("Q4_1", rng.normal(0, 0.05, (k, n)).astype(np.float32))  # float offsets: rests added back
    w0 = _through("Q4_0", rng.normal(0, 0.05, (k, n)).astype(np.float32))
    w8 = _through("Q8_0", rng.normal(0, 0.05, (k, n)).astype(np.float32))
    table = _through("Q8_0", rng.normal(0, 1, (k, vocab)).astype(np.float32)).T.copy()  # [V, H], blocks along H
    table4 = _through("Q4_0", rng.normal(0, 1, (k, vocab)).astype(np.float32)).T.copy()
    dense = rng.normal(size=(k, n)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e8"], name="embed8"),
             helper.make_node("Gather", ["table4", "ids"], ["e4"], name="embed4"),
             helper.make_node("Add", ["e8", "e4"], ["x"]),
             *(helper.make_node("MatMul", ["x", w], [f"y_{w}"], name=f"mm_{w}") for w in ("w1", "w0", "w8", "dense")),
             helper.make_node("MatMul", ["x", "w1"], ["y_again"], name="mm_again")]  # one weight, two readers
    outputs = ["y_w1", "y_w0", "y_w8", "y_dense", "y_again"]
    model = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7])], outputs,
                   {"table": table, "table4": table4, "w1": w1, "w0": w0, "w8": w8, "dense": dense})
    feed = {"ids": rng.integers(0, vocab, (2, 7))}
    expected = _run(model, feed)
    stored = store_on_grids(model, accuracy_level=0)
    assert stored.int4 == ["mm_w1", "mm_w0", "mm_again"] and stored.int8 == ["mm_w8"]
    assert stored.with_rests == ["mm_w1", "mm_again"] and stored.off_grid == ["mm_dense"]
    assert stored.tables == ["embed8", "embed4"]
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulNBits") == 4 and ops.count("GatherBlockQuantized") == 2
    assert ops.count("MatMul") == 1 + 1 + 2  # dense; one block sum shared by both readers of x; two rests
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names)) and not {"w1", "w0", "w8", "table", "table4"} & set(names)
    for got, want in zip(_run(model, feed), expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_a_tied_head_and_table_share_one_stored_matrix():
    rng = np.random.default_rng(4)
    head = _through("Q8_0", rng.normal(0, 0.5, (64, 50)).astype(np.float32))  # [H, V], as the builder ties them
    nodes = [helper.make_node("Transpose", ["head"], ["table"], perm=[1, 0]),
             helper.make_node("Gather", ["table", "ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "head"], ["logits"], name="lm_head")]
    model = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 9])], ["logits"],
                   {"head": head})
    feed = {"ids": rng.integers(0, 50, (1, 9))}
    expected = _run(model, feed)[0]
    stored = store_on_grids(model, accuracy_level=0)
    assert stored.int8 == ["lm_head"] and stored.tables == ["embed"]
    assert [i.name for i in model.graph.initializer if i.data_type == TensorProto.UINT8] == ["head_grid_q8"]
    assert "Transpose" not in [n.op_type for n in model.graph.node]
    np.testing.assert_allclose(_run(model, feed)[0], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_lies_on_grids_looks_at_the_matmul_weights(tmp_path):
    rng = np.random.default_rng(5)
    for weight, on in ((_through("Q4_1", rng.normal(size=(64, 80)).astype(np.float32)), True),
                       (rng.normal(size=(64, 80)).astype(np.float32), False)):
        model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])], ["y"], {"w": weight})
        onnx.save(model, str(tmp_path / "m.onnx"))
        assert lies_on_grids(tmp_path / "m.onnx") is on


def test_a_table_with_two_readers_and_weights_that_are_not_constants():
    """One table read by two Gathers is stored once; a weight that is also a graph input (it can be fed) and one
    a subgraph reads stay as they are."""
    rng = np.random.default_rng(8)
    table = _through("Q8_0", rng.normal(0, 1, (64, 30)).astype(np.float32)).T.copy()
    fed = _through("Q4_0", rng.normal(0, 0.05, (64, 16)).astype(np.float32))
    shared = _through("Q4_0", rng.normal(0, 0.05, (64, 16)).astype(np.float32))
    body = helper.make_graph([helper.make_node("Identity", ["shared"], ["from_body"])], "body", [],
                             [helper.make_tensor_value_info("from_body", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Gather", ["table", "ids"], ["a"], name="first"),
             helper.make_node("Gather", ["table", "ids"], ["b"], name="second"),
             helper.make_node("Add", ["a", "b"], ["x"]),
             helper.make_node("MatMul", ["x", "fed"], ["y"], name="fed_mm"),
             helper.make_node("MatMul", ["x", "shared"], ["z"], name="shared_mm"),
             helper.make_node("Constant", [], ["yes"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["yes"], ["w"], then_branch=body, else_branch=body)]
    model = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4]),
                           helper.make_tensor_value_info("fed", TensorProto.FLOAT, [64, 16])], ["y", "z", "w"],
                   {"table": table, "fed": fed, "shared": shared})
    feed = {"ids": np.array([[0, 5, 29, 7]])}
    expected = _run(model, feed)
    stored = store_on_grids(model, accuracy_level=0)
    assert stored.tables == ["first", "second"] and stored.int4 == ["shared_mm"] and not stored.off_grid
    assert next(n for n in model.graph.node if n.name == "fed_mm").op_type == "MatMul"  # not a constant: as it was
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names)) and "fed" in names and "shared" in names and "table" not in names
    assert [n.op_type for n in model.graph.node].count("GatherBlockQuantized") == 2
    for got, want in zip(_run(model, feed), expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_lies_on_grids_looks_past_a_first_weight_on_no_grid(tmp_path):
    """A GGUF file may keep some projections in a format of no 4/8-bit block grid (Q6_K): one of the first weights
    on a grid is enough."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("MatMul", ["x", "dense"], ["h"]), helper.make_node("MatMul", ["h", "q41"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])], ["y"],
                   {"dense": rng.normal(size=(64, 64)).astype(np.float32),
                    "q41": _through("Q4_1", rng.normal(size=(64, 80)).astype(np.float32))})
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert lies_on_grids(tmp_path / "m.onnx")
