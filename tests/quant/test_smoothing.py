"""SmoothQuant on ONNX graphs (mlopt.quant.lib.smoothing): the smoothed graph computes the same outputs, the
scale folds into a LayerNormalization (or a decoder's RMS norms and gated up projection) only when nothing else
reads its output, and INT8 (static QDQ, or MatMulNBits' int8 activations) of a graph with an outlier activation
channel loses less after smoothing."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlopt.quant.lib.quantize import Scheme, quantize
from mlopt.quant.lib.smoothing import smooth

WIDTH = 16
RNG = np.random.default_rng(0)


def _model(path):
    """x -> LayerNormalization -> MatMul w1 -> Relu -> MatMul w2 -> y, and a residual x + LN(x) -> MatMul w3 -> z.
    LN1's output feeds only w1 (foldable); LN2's feeds w3 and the residual Add (a Mul is inserted)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", WIDTH])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")]
    gamma = np.ones(WIDTH, np.float32)
    gamma[3] = 40.0  # an outlier channel, as transformers' norms make
    beta = np.linspace(-1, 1, WIDTH).astype(np.float32)  # not zero: a fold must divide it too
    inits = [numpy_helper.from_array(gamma, "g1"), numpy_helper.from_array(beta, "b1"),
             numpy_helper.from_array(gamma.copy(), "g2"), numpy_helper.from_array(beta.copy(), "b2")]
    inits += [numpy_helper.from_array(RNG.standard_normal((WIDTH, WIDTH)).astype(np.float32) / 4, w)
              for w in ("w1", "w2", "w3")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["n1"], axis=-1, name="ln1"),
             helper.make_node("MatMul", ["n1", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
             helper.make_node("LayerNormalization", ["x", "g2", "b2"], ["n2"], axis=-1, name="ln2"),
             helper.make_node("Add", ["x", "n2"], ["res"], name="res"),
             helper.make_node("MatMul", ["n2", "w3"], ["m3"], name="mm3"),
             helper.make_node("Add", ["m3", "res"], ["z"], name="out")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _feeds(n=4):
    return [{"x": RNG.standard_normal((32, WIDTH)).astype(np.float32)} for _ in range(n)]


def _run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def test_smoothing_keeps_the_outputs_and_folds_only_where_nothing_else_reads(tmp_path):
    src = _model(tmp_path / "m.onnx")
    assert smooth(src, tmp_path / "s.onnx", _feeds(), alpha=0.5) == 3  # n1, r, n2
    feed = _feeds(1)[0]
    for want, got in zip(_run(src, feed), _run(tmp_path / "s.onnx", feed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    smoothed = onnx.load(str(tmp_path / "s.onnx"))
    values = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}
    assert values["g1"][3] < 40.0  # folded into the first norm: its outlier channel shrank
    assert values["g2"][3] == 40.0  # the second norm's output is also the residual: left as it was
    muls = [n for n in smoothed.graph.node if n.op_type == "Mul"]
    assert sorted(n.input[0] for n in muls) == ["n2", "r"]
    assert {n.name: n.input[0] for n in smoothed.graph.node}["mm3"] == "n2/smoothed"
    assert {n.name: n.input[0] for n in smoothed.graph.node}["res"] == "x"  # the residual reads n2 unsmoothed


def test_static_int8_loses_less_on_an_outlier_channel_after_smoothing(tmp_path):
    src = _model(tmp_path / "m.onnx")
    calib = _feeds(8)
    smooth(src, tmp_path / "s.onnx", calib, alpha=0.5)
    scheme = Scheme("static", "qdq", "uint8", "int8", True, "minmax", True)
    quantize(src, tmp_path / "q.onnx", scheme, calib, reduce_range=False)
    quantize(tmp_path / "s.onnx", tmp_path / "sq.onnx", scheme, calib, reduce_range=False)
    feed = _feeds(1)[0]
    want = _run(src, feed)[0]
    plain = np.abs(_run(tmp_path / "q.onnx", feed)[0] - want).mean()
    smoothed = np.abs(_run(tmp_path / "sq.onnx", feed)[0] - want).mean()
    assert smoothed < 0.7 * plain, (smoothed, plain)


def test_nothing_to_smooth_writes_nothing(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert smooth(tmp_path / "m.onnx", tmp_path / "s.onnx", [{"x": np.ones((2, 3), np.float32)}]) == 0
    assert not (tmp_path / "s.onnx").exists()


def _decoder_block(path, width=64, hidden=128, up_read_elsewhere=False):
    """A decoder block as onnxruntime-genai's builder writes it: RMS norm -> qkv MatMul -> (attention stand-in)
    -> o_proj; SkipSimplifiedLayerNormalization -> gate and up MatMuls -> SiLU(gate) * up -> down MatMul.
    Channel 5 of the residual stream carries an outlier, as trained decoders' do."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    rng = np.random.default_rng(1)
    weight = lambda k, n, name: numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), name)  # noqa: E731
    g1, g2 = np.ones(width, np.float32), np.ones(width, np.float32)
    g1[5] = g2[5] = 30.0
    inits = [numpy_helper.from_array(g1, "g1"), numpy_helper.from_array(g2, "g2"), weight(width, width, "wqkv"),
             weight(width, width, "wo"), weight(width, hidden, "wgate"), weight(width, hidden, "wup"),
             weight(hidden, width, "wdown")]
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "g1"], ["n1"], axis=-1, epsilon=1e-6, name="ln1"),
             helper.make_node("MatMul", ["n1", "wqkv"], ["qkv"], name="qkv_proj"),
             helper.make_node("Tanh", ["qkv"], ["attn"], name="attention"),
             helper.make_node("MatMul", ["attn", "wo"], ["o"], name="o_proj"),
             helper.make_node("SkipSimplifiedLayerNormalization", ["x", "o", "g2"], ["n2", "", "", "res"],
                              domain="com.microsoft", epsilon=1e-6, name="ln2"),
             helper.make_node("MatMul", ["n2", "wgate"], ["gate"], name="gate_proj"),
             helper.make_node("MatMul", ["n2", "wup"], ["up"], name="up_proj"),
             helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
             helper.make_node("Mul", ["gate", "sig"], ["act"], name="silu"),
             helper.make_node("Mul", ["act", "up"], ["prod"], name="gated"),
             helper.make_node("MatMul", ["prod", "wdown"], ["down"], name="down_proj"),
             helper.make_node("Add", ["res", "down"], ["y"], name="residual")]
    outputs = [y]
    if up_read_elsewhere:  # the up projection's output is also a graph output: its columns must keep their scale
        outputs.append(helper.make_tensor_value_info("up", TensorProto.FLOAT, None))
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path


def _stream(n=4, width=64):
    feeds = []
    for _ in range(n):
        x = RNG.standard_normal((16, width)).astype(np.float32)
        x[:, 5] *= 20.0
        feeds.append({"x": x})
    return feeds


def test_decoder_smoothing_folds_into_rms_norms_and_the_up_projection_only(tmp_path):
    """fold_only (decoders): the scales go into both RMS norms' weights and the up projection's columns, no Mul is
    inserted, o_proj (fed by attention) is left alone, and the block computes what it did."""
    src = _decoder_block(tmp_path / "d.onnx")
    assert smooth(src, tmp_path / "s.onnx", _stream(), alpha=0.5, fold_only=True) == 3  # n1, n2, prod
    feed = _stream(1)[0]
    np.testing.assert_allclose(_run(tmp_path / "s.onnx", feed)[0], _run(src, feed)[0], rtol=1e-4, atol=1e-3)
    smoothed = onnx.load(str(tmp_path / "s.onnx"))
    before = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(src)).graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}
    assert after["g1"][5] < 30.0 and after["g2"][5] < 30.0
    assert not np.allclose(after["wup"], before["wup"]) and not np.allclose(after["wdown"], before["wdown"])
    np.testing.assert_array_equal(after["wo"], before["wo"])
    assert [n.op_type for n in smoothed.graph.node].count("Mul") == 2  # SiLU's and the gate's, nothing inserted


def test_decoder_smoothing_leaves_an_up_projection_read_elsewhere(tmp_path):
    """Where the up projection's output has another reader, 1/s cannot go into its columns: the down projection's
    input is left alone (fold_only), the norms are still smoothed, and every output is what it was."""
    src = _decoder_block(tmp_path / "d.onnx", up_read_elsewhere=True)
    assert smooth(src, tmp_path / "s.onnx", _stream(), alpha=0.5, fold_only=True) == 2  # n1, n2
    feed = _stream(1)[0]
    for want, got in zip(_run(src, feed), _run(tmp_path / "s.onnx", feed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    after = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "s.onnx")).graph.initializer}
    before = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(src)).graph.initializer}
    np.testing.assert_array_equal(after["wdown"], before["wdown"])


def test_decoder_smoothing_lowers_the_error_of_int8_activation_kernels(tmp_path):
    """MatMulNBits at accuracy level 4 quantizes each activation row in blocks: with the outlier channel moved into
    the weights, the 8-bit block after smoothing is closer to float than the one before."""
    src = _decoder_block(tmp_path / "d.onnx")
    smooth(src, tmp_path / "s.onnx", _stream(8), alpha=0.5, fold_only=True)
    errors = _level4_errors(src, tmp_path / "s.onnx", _stream(1)[0])
    assert errors[1] < 0.8 * errors[0], errors


def _level4_errors(src, smoothed, feed):
    """Mean |error| of the first output against float `src`, for `src` and `smoothed` each quantized to INT8
    MatMulNBits with blocks of 32 at accuracy level 4 (int8 activations)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    errors = []
    for path in (src, smoothed):
        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=8)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), bits=8, block_size=32, is_symmetric=True,
                                         accuracy_level=4, algo_config=config)
        quantizer.process()
        onnx.save(quantizer.model.model, str(path) + ".q.onnx")
        errors.append(np.abs(_run(str(path) + ".q.onnx", feed)[0] - _run(src, feed)[0]).mean())
    return errors


def _tied_head(path, vocab=48, width=64):
    """Tied embeddings and a last-token LM head, as mlopt's decoder export writes them: ids -> Gather(Transpose(W))
    -> RMS norm (an outlier channel) -> Gather(axis 1, index -1) -> Unsqueeze(axis 1) -> MatMul W -> logits."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    rng = np.random.default_rng(2)
    gamma = np.ones(width, np.float32)
    gamma[5] = 30.0
    inits = [numpy_helper.from_array((rng.standard_normal((width, vocab)) / 8).astype(np.float32), "w"),
             numpy_helper.from_array(gamma, "g")]
    nodes = [helper.make_node("Transpose", ["w"], ["table"], perm=[1, 0], name="tie"),
             helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0, name="embed"),
             helper.make_node("SimplifiedLayerNormalization", ["emb", "g"], ["n"], axis=-1, epsilon=1e-6, name="norm"),
             helper.make_node("Constant", [], ["last"], value=numpy_helper.from_array(np.array(-1, np.int64))),
             helper.make_node("Constant", [], ["axis1"], value=numpy_helper.from_array(np.array([1], np.int64))),
             helper.make_node("Gather", ["n", "last"], ["picked"], axis=1, name="prune"),
             helper.make_node("Unsqueeze", ["picked", "axis1"], ["x"], name="unsqueeze"),
             helper.make_node("MatMul", ["x", "w"], ["logits"], name="lm_head")]
    model = helper.make_model(helper.make_graph(nodes, "g", [ids], [logits], inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path


def _ids(n, vocab=48):
    return [{"ids": RNG.integers(0, vocab, (2, 12)).astype(np.int64)} for _ in range(n)]


def test_a_tied_last_token_head_is_smoothed_through_its_norm_and_the_embedding_undone(tmp_path, monkeypatch):
    """The LM head of a tied decoder shares its weight with the token embedding, and reads the final norm through
    the last-position pick: the scale folds into the norm, the shared weight takes s, a Mul by 1/s after the
    embedding Gather gives the table back its values, and the logits are what they were. The level-4 (int8
    activation) head loses less after it."""
    import mlopt.quant.lib.smoothing as smoothing

    src = _tied_head(tmp_path / "t.onnx")
    probed = []
    real = smoothing._channel_max
    monkeypatch.setattr(smoothing, "_channel_max", lambda model, names, *a: probed.extend(names) or real(model, names, *a))
    assert smooth(src, tmp_path / "s.onnx", _ids(4), alpha=0.5, fold_only=True) == 1
    assert probed == ["n"]  # the ranges come from every position of the norm output, not the one picked
    feed = _ids(1)[0]
    np.testing.assert_allclose(_run(tmp_path / "s.onnx", feed)[0], _run(src, feed)[0], rtol=1e-4, atol=1e-4)
    smoothed = onnx.load(str(tmp_path / "s.onnx"))
    after = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}
    assert after["g"][5] < 30.0
    inserted = [n for n in smoothed.graph.node if n.op_type == "Mul"]
    assert [(n.input[0], n.input[1]) for n in inserted] == [("emb", "emb/untie_smooth_inverse")]  # one Mul
    assert next(n for n in smoothed.graph.node if n.name == "norm").input[0] == inserted[0].output[0]
    errors = _level4_errors(src, tmp_path / "s.onnx", feed)
    assert errors[1] < 0.8 * errors[0], errors


@pytest.mark.parametrize("also_out", ["n", "picked", "x"])
def test_a_head_whose_norm_output_is_read_elsewhere_is_left_alone(also_out, tmp_path):
    """When the norm output, the picked position or the head's input is also a graph output, 1/s cannot go into the
    norm without changing that output: nothing is smoothed and nothing is written."""
    src = _tied_head(tmp_path / "t.onnx")
    model = onnx.load(str(src))
    model.graph.output.append(helper.make_tensor_value_info(also_out, TensorProto.FLOAT, None))
    onnx.save(model, str(src))
    assert smooth(src, tmp_path / "s.onnx", _ids(2), alpha=0.5, fold_only=True) == 0
    assert not (tmp_path / "s.onnx").exists()
