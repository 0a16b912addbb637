"""Decoder export: an HF *ForCausalLM folder (or a GGUF file) becomes an onnxruntime-genai folder that loads and
generates; what the exporter cannot take is refused in one line (exit 2) before anything is written."""

import json

import pytest
from typer.testing import CliRunner

from mlopt.cli.main import app

from decoders import og_greedy

pytest.importorskip("onnxruntime_genai")
runner = CliRunner()
pytestmark = pytest.mark.slow


def _export(model, out, *extra):
    return runner.invoke(app, ["export", "--model", model, "--out", str(out), "--quiet", *extra])


def test_export_writes_a_genai_folder_that_generates_like_the_builder(llama_dir, llama_genai_dir, tmp_path):
    out = tmp_path / "exported"
    result = _export(f"hf:{llama_dir}", out)
    assert result.exit_code == 0, result.output
    for name in ("genai_config.json", "model.onnx", "tokenizer.json", "model.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "genai" and meta["builder"]["decoder"]["architecture"] == "LlamaForCausalLM"
    report = json.loads((out / "report.json").read_text())
    metrics = report["steps"][0]["metrics"] if "steps" in report else report["step"]["metrics"]
    assert metrics["architecture"] == "LlamaForCausalLM" and metrics["check_tokens"] > 0
    # Its logits were compared with transformers' at every position of a passage.
    assert metrics["parity_tokens"] >= 32 and metrics["max_abs_error"] <= metrics["tolerance"] < 0.1
    assert metrics["top1_agreement"] == 1.0
    # Prefill runs the LM head on the last token only; the builder's default graph runs it on every token.
    assert metrics["last_token_logits"] is True and _logits_rows(out) == 1 and _logits_rows(llama_genai_dir) is None
    # The folder mlopt wrote generates exactly what the builder's own output does.
    prompt = "The module provides functions"
    assert og_greedy(out, prompt, 12) == og_greedy(llama_genai_dir, prompt, 12)


def test_gguf_file_exports_like_its_hf_folder(llama_gguf, llama_genai_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "from-gguf"
    result = _export(f"gguf:{llama_gguf}", out)
    assert result.exit_code == 0, result.output
    prompt = "Return the value"
    assert og_greedy(out, prompt, 10) == og_greedy(llama_genai_dir, prompt, 10)


def _logits_rows(folder):
    """The logits output's fixed sequence dimension (None: symbolic, every position)."""
    import onnx

    dims = [o for o in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.output
            if o.name == "logits"][0].type.tensor_type.shape.dim
    return dims[1].dim_value if dims[1].HasField("dim_value") else None


def _tampered(genai_dir, tmp_path, factor):
    """A copy of a genai folder whose final norm's weight is scaled by `factor`: it loads, generates, and computes
    other logits."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "tampered"
    shutil.copytree(genai_dir, out)
    model = onnx.load(str(out / "model.onnx"))
    norm = [n for n in model.graph.node if "LayerNorm" in n.op_type][-1]
    weight = next(i for i in model.graph.initializer if i.name == norm.input[-1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(factor), weight.name))
    for f in out.glob("model.onnx*"):
        f.unlink()
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return out


def test_parity_catches_a_graph_that_computes_other_logits(llama_dir, llama_genai_dir, tmp_path):
    from mlopt.core.errors import ParityError
    from mlopt.export.lib.decoder import check_parity

    assert check_parity(llama_dir, llama_genai_dir, 1e-4, 1e-3)["top1_agreement"] == 1.0
    tampered = _tampered(llama_genai_dir, tmp_path, 1.02)
    with pytest.raises(ParityError, match="computes other logits than transformers: max abs error"):
        check_parity(llama_dir, tampered, 1e-4, 1e-3)
    relaxed = check_parity(llama_dir, tampered, 1e-4, 0.5)  # --rtol: the user's call, measured all the same
    assert 1e-3 < relaxed["max_abs_error"] <= relaxed["tolerance"]


def test_parity_is_skipped_with_a_note_when_memory_is_short(llama_dir, tmp_path, monkeypatch):
    from mlopt.core import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    result = _export(f"hf:{llama_dir}", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    step = report["steps"][0] if "steps" in report else report["step"]
    assert "max_abs_error" not in step["metrics"]
    assert any("parity with transformers not checked" in n and "is available" in n for n in step["notes"])


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3", "Phi3", "Lfm2", "Gemma"])
def test_other_families_export_with_their_logits_checked(family, decoder_tokenizer, tmp_path):
    """Small random models of more of the builder's families: each export passes the parity check (its logits
    are transformers' at every position, the same top-1 token everywhere), LFM2's convolution state fed as zeros."""
    import torch
    import transformers

    tok = decoder_tokenizer
    config = getattr(transformers, f"{family}Config")(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        **({"layer_types": ["conv", "full_attention"]} if family == "Lfm2" else {}))  # LFM2: a convolution state
    config.original_max_position_embeddings = 4096  # Phi-3: no LongRoPE
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    with torch.no_grad():  # weights four times the initializer's: logits that differ from token to token
        for p in model.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    result = _export(f"hf:{tmp_path / 'hf'}", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    metrics = (report["steps"][0] if "steps" in report else report["step"])["metrics"]
    assert metrics["architecture"] == f"{family}ForCausalLM"
    assert metrics["max_abs_error"] <= metrics["tolerance"] and metrics["top1_agreement"] == 1.0


def test_a_builder_graph_that_differs_from_the_model_fails_the_export(decoder_tokenizer, tmp_path):
    """onnxruntime-genai 0.18's builder writes OLMo's non-parametric LayerNorm as an RMSNorm: the folder loads and
    generates, and its logits are not OLMo's. The export fails (exit 1) and writes nothing. Should the builder get
    OLMo right, this test fails: make it a plain export test then."""
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    config = OlmoConfig(vocab_size=len(decoder_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=decoder_tokenizer.bos_token_id, eos_token_id=decoder_tokenizer.eos_token_id)
    torch.manual_seed(0)
    OlmoForCausalLM(config).save_pretrained(tmp_path / "olmo")
    decoder_tokenizer.save_pretrained(tmp_path / "olmo")
    result = runner.invoke(app, ["export", "--model", f"hf:{tmp_path / 'olmo'}", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "computes other logits than transformers" in result.output
    assert not (tmp_path / "out").exists()


def _save_gpt2(out):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(out)
    return out


def test_an_architecture_the_builder_lacks_is_one_line_with_the_supported_list(tmp_path):
    out = tmp_path / "out"
    result = _export(f"hf:{_save_gpt2(tmp_path / 'gpt2')}", out)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1
    assert "GPT2LMHeadModel is not an architecture" in message and "LlamaForCausalLM" in message
    assert not out.exists()  # nothing half-written


def test_exporting_an_exported_decoder_is_refused(llama_genai_dir, tmp_path):
    result = _export(str(llama_genai_dir), tmp_path / "again")
    assert result.exit_code == 2 and "already an exported decoder" in result.output


@pytest.mark.parametrize("step", [["prune", "--ratio", "0.5", "--model"], ["train", "--model"],
                                  ["distill", "--teacher", "torchvision:resnet18", "--student"], ["qat", "--model"]])
def test_steps_that_do_not_run_on_decoders_say_so(llama_dir, step, tmp_path, decoder_text):
    result = runner.invoke(app, [*step, f"hf:{llama_dir}", "--data", f"text:{decoder_text}",
                                 "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert f"step '{step[0]}' does not run on decoder language models" in result.output
    assert not (tmp_path / "o").exists()


def test_a_decoder_with_image_data_is_refused(llama_dir, tmp_path):
    result = runner.invoke(app, ["ptq", "--model", f"hf:{llama_dir}", "--data", "digits", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2 and "text:FILE" in result.output


def test_a_corrupt_gguf_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    result = _export(f"gguf:{bad}", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1


def _save_gemma(out, family, tok):
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    config_class, model_class = {"gemma2": (Gemma2Config, Gemma2ForCausalLM),
                                 "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[family]
    config = config_class(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          sliding_window=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model_class(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_window_families_export_and_match_torch(family, decoder_tokenizer, decoder_text, tmp_path):
    """Gemma 3's per-layer-type rotary settings (transformers 5) stop the builder unless mlopt flattens them; a
    64-token sliding window needs a KV buffer that long even for an 8-token check. The exported perplexity over
    128-token windows (past the sliding window) equals torch's."""
    hf_dir = _save_gemma(tmp_path / family, family, decoder_tokenizer)
    out = tmp_path / "exported"
    assert _export(f"hf:{hf_dir}", out).exit_code == 0
    assert _logits_rows(out) == 1  # the graph computes the last token's logits; perplexity widens it back
    ppl = []
    for model in (f"hf:{hf_dir}", str(out)):
        result = runner.invoke(app, ["eval", "--model", model, "--data", f"text:{decoder_text}", "--json", "--quiet"])
        assert result.exit_code == 0, result.output
        ppl.append(json.loads(result.output)["perplexity"])
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-5)


def test_a_decoder_folder_whose_graph_links_out_of_it_is_refused(llama_genai_dir, decoder_text, tmp_path):
    import shutil

    from mlopt.runtime.decoder import onnx_name

    folder = tmp_path / "linked"
    shutil.copytree(llama_genai_dir, folder)
    graph = folder / onnx_name(folder)
    graph.unlink()
    graph.symlink_to(llama_genai_dir / graph.name)  # the same graph, elsewhere
    result = runner.invoke(app, ["eval", "--model", str(folder), "--data", f"text:{decoder_text}", "--quiet"])
    assert result.exit_code == 2 and "outside the decoder's folder" in result.stderr, result.output


@pytest.mark.parametrize("damage", ["no tokenizer.json", "empty vocabulary"])
def test_a_decoder_folder_whose_tokenizer_is_missing_or_empty_is_one_line_exit_2(damage, llama_genai_dir,
                                                                                  decoder_text, tmp_path):
    """onnxruntime-genai's tokenizer raised deep inside (exit 1), or gave no tokens to score."""
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(llama_genai_dir, folder)
    tok = folder / "tokenizer.json"
    if damage == "no tokenizer.json":
        tok.unlink()
    else:
        spec = json.loads(tok.read_text())
        spec["model"]["vocab"] = {} if isinstance(spec["model"].get("vocab"), dict) else []
        spec["model"]["merges"] = []
        spec["added_tokens"] = []
        tok.write_text(json.dumps(spec))
    result = runner.invoke(app, ["eval", "--model", str(folder), "--data", f"text:{decoder_text}", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "tokenizer in" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_decoder_folder_holding_another_graph_is_one_line_exit_2(llama_genai_dir, decoder_text, tmp_path):
    """A genai folder whose graph is not a decoder's (an encoder's, here a one-node graph): eval failed inside
    onnxruntime (exit 1), where bench already refused it."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    from mlopt.runtime.decoder import onnx_name

    folder = tmp_path / "other"
    shutil.copytree(llama_genai_dir, folder)
    graph = folder / onnx_name(folder)
    for data in folder.glob(graph.name + ".data"):
        data.unlink()
    node = helper.make_node("Identity", ["input_ids"], ["last_hidden_state"])
    other = helper.make_graph([node], "encoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"])],
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.INT64, ["N", "S"])])
    onnx.save(helper.make_model(other, opset_imports=[helper.make_opsetid("", 17)]), graph)
    result = runner.invoke(app, ["eval", "--model", str(folder), "--data", f"text:{decoder_text}", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "is not a decoder language model's graph" in result.stderr, result.stderr
