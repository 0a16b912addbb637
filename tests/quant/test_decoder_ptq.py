"""Decoder PTQ: weight-only candidates (MatMulNBits) measured on perplexity and decode speed; the one kept is
within the perplexity budget, decodes faster than FP32 (or FP32 comes back with the reason), and generates."""

import json

import onnx
import pytest
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.quant.lib.weightonly import WeightScheme, int8_scheme, plan_nodes, quantize_folder, untie_embedding

from decoders import build_genai

pytest.importorskip("onnxruntime_genai")
runner = CliRunner()


def _ops(folder):
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return [n.op_type for n in model.graph.node]


def _report(out):
    report = json.loads((out / "report.json").read_text())
    return report["step"] if "step" in report else report["steps"][-1]


@pytest.mark.slow
def test_auto_keeps_a_candidate_within_budget_that_decodes_faster(llama_dir, decoder_text, tmp_path):
    out = tmp_path / "ptq"
    result = runner.invoke(app, ["ptq", "--model", f"hf:{llama_dir}", "--data", f"text:{decoder_text}", "--out", str(out),
                                 "--algorithm", "rtn", "--algorithm", "hqq", "--block-size", "32",
                                 "--accuracy-level", "4", "--max-windows", "8", "--new-tokens", "24", "--rounds", "2",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    step = _report(out)
    metrics = step["metrics"]
    table = step["sections"][0]
    names = [row[0] for row in table["rows"]]
    # every candidate is reported: FP32, INT8 and both INT4 algorithms at least
    assert names[0] == "FP32" and any(n.startswith("int8") for n in names)
    assert any("rtn" in n for n in names) and any("hqq" in n for n in names)
    assert metrics["ppl_increase"] <= 0.05 + 1e-9
    if metrics["quantized"]:
        assert metrics["decode_tokens_per_s"] > metrics["fp32_decode_tokens_per_s"]
        assert "MatMulNBits" in _ops(out)
        assert metrics["size_ratio"] > 1.5
    else:
        assert any("FP32 is handed back" in n for n in step["notes"])
    # what was written loads and generates in onnxruntime-genai
    from mlopt.runtime import generation

    ids = generation.token_ids(out, ["The function returns"])
    assert len(generation.greedy(out, ids, 8)) == 8


@pytest.mark.slow
def test_quantized_folder_keeps_perplexity_close_and_untied_embedding_is_quantized(qwen3_dir, tmp_path):
    """Qwen3 with tied embeddings: the embedding Gather gets its own (quantized) weight; int8 stays close."""
    from mlopt.runtime import generation

    fp32 = build_genai(qwen3_dir, tmp_path / "fp32", tmp_path / "cache")
    source = onnx.load(str(fp32 / "model.onnx"))
    assert untie_embedding(source)
    ids = generation.token_ids(fp32, ["The module provides a way to read and write files. " * 20])
    base = generation.perplexity(fp32, ids, 64)["perplexity"]
    q8 = quantize_folder(fp32, tmp_path / "int8", int8_scheme(32)).parent
    ops = _ops(q8)
    assert "GatherBlockQuantized" in ops and "MatMulNBits" in ops and "Transpose" not in ops
    assert generation.perplexity(q8, ids, 64)["perplexity"] <= base * 1.05
    size = lambda f: sum(p.stat().st_size for p in f.glob("model.onnx*"))  # noqa: E731
    assert size(q8) < 0.6 * size(fp32)


def test_mixed_precision_plan_routes_groups():
    """Which MatMuls a scheme keeps at 8 bits: by the builder's node names, first and last blocks included."""
    from onnx import TensorProto, helper

    names = [f"/model/layers.{i}/{part}/MatMul" for i in range(3) for part in ("attn/qkv_proj", "mlp/down_proj")]
    names.append("/lm_head/MatMul")
    inits = [helper.make_tensor(f"w{i}", TensorProto.FLOAT, [2, 2], [0.0] * 4) for i in range(len(names))]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=n) for i, n in enumerate(names)]
    model = helper.make_model(helper.make_graph(nodes, "g", [], [], initializer=inits))
    plan = plan_nodes(model, WeightScheme().with_raised("first_block").with_raised("lm_head"))
    assert set(plan["int8"]) == {"/model/layers.0/attn/qkv_proj/MatMul", "/model/layers.0/mlp/down_proj/MatMul",
                                 "/lm_head/MatMul"}
    assert "/model/layers.2/mlp/down_proj/MatMul" in plan["low"]
    plan = plan_nodes(model, WeightScheme().with_raised("mlp").with_raised("last_block"))
    assert set(plan["int8"]) == {n for n in names if "mlp" in n} | {"/model/layers.2/attn/qkv_proj/MatMul"}
    assert WeightScheme().with_raised("embedding").embedding == "float"


def test_decoder_options_on_an_encoder_are_refused(tmp_path):
    result = runner.invoke(app, ["ptq", "--model", "torchvision:resnet18", "--data", "digits", "--image-size", "32", "--channels", "3",
                                 "--max-ppl-increase", "0.1", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "--max-ppl-increase do not apply to a model that is not a decoder" in result.output


@pytest.mark.slow
def test_encoder_options_on_a_decoder_are_refused(llama_dir, decoder_text, tmp_path):
    result = runner.invoke(app, ["ptq", "--model", f"hf:{llama_dir}", "--data", f"text:{decoder_text}",
                                 "--calibration", "entropy", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "--calibration do not apply to a decoder language model" in result.output


@pytest.mark.slow
def test_shipped_decoder_recipe_runs_end_to_end_with_its_gates(llama_dir, decoder_text, tmp_path, monkeypatch):
    """recipes/decoder-int4.yaml on the trained tiny Llama: export, ptq, eval, bench, then the decoder gates,
    whose verdict is the exit code (0 all passed, 3 one failed: decode speed-ups of a 0.5M-parameter model vary)."""
    from conftest import TESTS

    monkeypatch.setenv("MODEL", f"hf:{llama_dir}")
    monkeypatch.setenv("TEXT", str(decoder_text))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(TESTS.parent / "recipes" / "decoder-int4.yaml"), "--out", str(out), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    report = json.loads((out / "report.json").read_text())
    assert [s["type"] for s in report["steps"]] == ["export", "ptq", "eval", "bench"]
    gates = {g["gate"]: g for g in report["gates"]["results"]}
    assert set(gates) == {"max_ppl_increase", "min_decode_speedup"}
    assert gates["max_ppl_increase"]["passed"] == (gates["max_ppl_increase"]["measured"] <= 0.05)
    assert result.exit_code == (0 if report["gates"]["passed"] else 3)
    ptq = report["steps"][1]["metrics"]
    assert ptq["ppl_increase"] <= 0.05 + 1e-9
    assert report["steps"][2]["metrics"]["perplexity"] == pytest.approx(ptq["perplexity"], rel=0.2)


@pytest.mark.slow
def test_a_text_too_short_for_one_perplexity_window_is_one_line(llama_genai_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("\n".join(["A short line of text."] * 10) + "\n")
    out = tmp_path / "o"
    result = runner.invoke(app, ["ptq", "--model", str(llama_genai_dir), "--data", f"text:{short}", "--out", str(out),
                                 "--quiet"])
    assert result.exit_code == 2, result.output
    assert "tokens; one perplexity window needs 128" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()
