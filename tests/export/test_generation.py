"""Measuring decoders (mlopt.runtime.generation) and the eval and bench steps' decoder branches, on the
trained tiny Llama of tests/decoders.py exported by onnxruntime-genai's model builder."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlopt.core.errors import InputError
from mlopt.runtime import generation

pytest.importorskip("onnxruntime_genai")

@pytest.fixture(scope="session")
def tiny_decoder(llama_dir, llama_genai_dir, decoder_lines) -> SimpleNamespace:
    """The trained tiny Llama of tests/decoders.py (GQA, untied head) as an HF folder and as the
    onnxruntime-genai folder the builder made of it, and held-out lines of English."""
    return SimpleNamespace(hf=llama_dir, folder=llama_genai_dir, lines=decoder_lines[1][:40])


def test_agreement_measures():
    assert generation.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5  # strict: stops at the first divergence
    assert generation.position_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert generation.agreement([1, 2], [1, 2]) == 1.0
    assert generation.agreement([5, 6], [5]) == 0.5  # a shorter continuation agrees on what it has


def test_scorer_on_known_logits():
    import numpy as np

    uniform = generation._scored(lambda chunk: np.zeros((len(chunk), 50), np.float32), list(range(40)), 10, None, "u")
    assert uniform["perplexity"] == pytest.approx(50) and (uniform["windows"], uniform["tokens"]) == (4, 36)

    def sure_of_next(chunk):  # logit 20 on each next token, 0 elsewhere: p(next) = e^20 / (e^20 + 49)
        logits = np.zeros((len(chunk), 50), np.float32)
        logits[np.arange(len(chunk) - 1), chunk[1:]] = 20
        return logits

    sure = generation._scored(sure_of_next, [i % 50 for i in range(100)], 20, 2, "s")
    assert sure["nll"] == pytest.approx(np.log1p(49 * np.exp(-20.0)), rel=1e-6) and sure["tokens"] == 38


def test_per_window_nll_and_the_paired_interval():
    """Each window's mean NLL is kept; a model a constant 1% worse on every window has the interval [1%, 1%],
    one worse on some windows and better on others an interval that holds zero."""
    import math

    import numpy as np

    uniform = generation._scored(lambda chunk: np.zeros((len(chunk), 50), np.float32), list(range(40)), 10, None, "u")
    assert uniform["window_nll"] == pytest.approx([math.log(50)] * 4)
    base = [3.0, 3.2, 2.9, 3.1, 3.0]
    low, high = generation.ppl_change_interval([x + math.log(1.01) for x in base], base)
    assert low == pytest.approx(0.01) and high == pytest.approx(0.01)
    low, high = generation.ppl_change_interval([x + d for x, d in zip(base, (0.02, -0.02, 0.01, -0.01, 0.0))], base)
    assert low < 0 < high and math.log1p(high) == pytest.approx(-math.log1p(low))  # mean difference 0
    with pytest.raises(InputError, match="two windows or more"):
        generation.ppl_change_interval([1.0], [1.0])


def test_too_short_text_is_input_error():
    with pytest.raises(InputError, match="the text has 5 tokens; one perplexity window needs 8"):
        generation._windows(list(range(5)), 8, None)
    assert [len(w) for w in generation._windows(list(range(50)), 8, 3)] == [8, 8, 8]


@pytest.mark.slow
def test_onnx_perplexity_matches_torch(tiny_decoder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = generation.token_ids(tiny_decoder.folder, tiny_decoder.lines)
    hf_ids = AutoTokenizer.from_pretrained(tiny_decoder.hf)("\n".join(tiny_decoder.lines))["input_ids"]
    assert ids == hf_ids  # onnxruntime-genai's tokenizer reads the same tokenizer.json
    onnx = generation.perplexity(tiny_decoder.folder, ids, window=32, max_windows=5)
    torch_ppl = generation.perplexity_torch(AutoModelForCausalLM.from_pretrained(tiny_decoder.hf), ids, 32, 5)
    assert onnx["windows"] == torch_ppl["windows"] == 5 and onnx["tokens"] == 5 * 31 and onnx["window"] == 32
    assert onnx["perplexity"] == pytest.approx(torch_ppl["perplexity"], rel=1e-3)
    assert onnx["nll"] == pytest.approx(torch_ppl["nll"], rel=1e-3)
    assert onnx["perplexity"] < 100  # trained: far below its 512-token vocabulary
    with pytest.raises(InputError, match="the text has 20 tokens; one perplexity window needs 32"):
        generation.perplexity(tiny_decoder.folder, ids[:20], window=32)
    with pytest.raises(InputError, match="window of 600 tokens is longer than .*'s context \\(512\\)"):
        generation.perplexity(tiny_decoder.folder, ids * 2, window=600)
    with pytest.raises(InputError, match="max_length .* context_length"):
        generation.greedy(tiny_decoder.folder, (ids * 3)[:500], 20)
    with pytest.raises(InputError, match="cannot load"):
        generation.load_model(tiny_decoder.hf)


@pytest.mark.slow
def test_greedy_agrees_with_itself_and_with_torch(tiny_decoder):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = generation.token_ids(tiny_decoder.folder, tiny_decoder.lines[:2])
    tokens = generation.greedy(tiny_decoder.folder, prompt, 12)
    assert len(tokens) == 12
    assert generation.agreement(tokens, generation.greedy(tiny_decoder.folder, prompt, 12)) == 1.0
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder.hf)
    ids = torch.tensor([prompt])
    for _ in range(4):  # the first greedy tokens in torch, end-of-sequence suppressed as greedy does
        logits = model(ids).logits[:, -1:]
        logits[..., model.config.eos_token_id] = -float("inf")
        ids = torch.cat([ids, logits.argmax(-1)], dim=1)
    assert tokens[:4] == ids[0, len(prompt):].tolist()


@pytest.mark.slow
def test_time_generation_fields(tiny_decoder):
    prompt = generation.token_ids(tiny_decoder.folder, tiny_decoder.lines)[:24]
    first, second = generation.time_generation([tiny_decoder.folder, tiny_decoder.folder], prompt, 6, rounds=3)
    for r in (first, second):
        assert (r["prompt_tokens"], r["new_tokens"], r["rounds"]) == (24, 6, 3)
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p90"]
        assert r["decode_tokens_per_s"] > 0 and r["prompt_tokens_per_s"] > 0
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p90"] <= r["latency_ms"]["p99"]
        assert r["latency_ms"]["p50"] > r["ttft_ms"]["p50"] * 0.5  # the whole generation includes the first token
        assert r["throughput_per_s"] == pytest.approx(6000 / r["latency_ms"]["mean"])
    with pytest.raises(InputError, match="2 new tokens"):
        generation.time_generation([tiny_decoder.folder], prompt, 1)


@pytest.mark.slow
def test_peak_rss_is_the_child_s_own(tiny_decoder):
    prompt = generation.token_ids(tiny_decoder.folder, tiny_decoder.lines)[:16]
    peak = generation.peak_rss_mb(tiny_decoder.folder, prompt, 4)
    own = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:")).split()[1]) / 1024
    # The child loads only onnxruntime and the tiny model; this process has torch and transformers loaded.
    assert 20 < peak < own


def _artifact(folder: Path):
    from mlopt.runtime.artifacts import Artifact

    return Artifact(format="genai", sample_shape=None, num_classes=None, onnx_path=folder / "model.onnx", origin=str(folder))


def _ctx(lines: list[str] | None) -> SimpleNamespace:
    data = None if lines is None else SimpleNamespace(name="text:x", text=True, train=lines[: len(lines) // 2],
                                                      val=lines[len(lines) // 2:])
    return SimpleNamespace(data=data, batch_size=8)


@pytest.mark.slow
def test_eval_step_on_a_genai_folder(tiny_decoder):
    from mlopt.export.eval import EvalConfig, EvalPass

    ctx = _ctx(tiny_decoder.lines)
    result = EvalPass().run(_artifact(tiny_decoder.folder), EvalConfig(window=16), ctx)
    expected = generation.perplexity(tiny_decoder.folder, generation.token_ids(tiny_decoder.folder, ctx.data.val), 16)
    assert len(expected.pop("window_nll")) == expected["windows"]  # per-window figures stay out of the report
    assert result.metrics == expected
    shown = EvalPass.cli_json({"metrics": result.metrics})
    assert set(shown) == {"perplexity", "nll", "windows", "window", "tokens"} and shown["window"] == 16
    from mlopt.runtime.artifacts import Artifact

    causal = Artifact(format="causal-lm", sample_shape=None, num_classes=None, builder={"spec": f"hf:{tiny_decoder.hf}"},
                      origin="hf")
    before_export = EvalPass().run(causal, EvalConfig(window=16), ctx).metrics
    assert before_export["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-3)
    with pytest.raises(InputError, match="needs text:FILE"):
        EvalPass().run(_artifact(tiny_decoder.folder), EvalConfig(), SimpleNamespace(data=SimpleNamespace(
            text=False, name="digits")))


@pytest.mark.slow
def test_bench_step_on_genai_folders(tiny_decoder, tmp_path):
    import shutil

    from mlopt.export.bench import BenchConfig, BenchPass

    copy = tmp_path / "copy"
    shutil.copytree(tiny_decoder.folder, copy)
    size = sum(p.stat().st_size for p in copy.iterdir()) / 1e6
    for own in ("model.json", "report.md", ".mlopt-output.json"):  # an mlopt output folder: not counted
        (copy / own).write_text("{}")
    config = BenchConfig(compare=[str(copy)], prompt_tokens=[8, 20], new_tokens=[4], rounds=2)
    result = BenchPass().run(_artifact(tiny_decoder.folder), config, _ctx(tiny_decoder.lines))
    shown = BenchPass.cli_json({"sections": [s.model_dump() for s in result.sections],
                                "latency": [lat.model_dump() for lat in result.latency]})
    rows = shown["results"]
    assert [(r["model"], r["prompt_tokens"], r["new_tokens"]) for r in rows] == [
        (str(tiny_decoder.folder), 8, 4), (str(copy), 8, 4), (str(tiny_decoder.folder), 20, 4), (str(copy), 20, 4)]
    for r in rows:
        assert set(r["ttft_ms"]) == {"p50", "p90"} and set(r["latency_ms"]) == {"mean", "p50", "p90", "p99"}
        assert r["decode_tokens_per_s"] > 0 and r["prompt_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["size_mb"] == pytest.approx(size) and r["batch_size"] == 1
    assert rows[0]["decode_speedup"] == rows[0]["ttft_speedup"] == rows[0]["speedup"] == 1.0
    assert rows[1]["decode_speedup"] == pytest.approx(rows[1]["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"])
    assert [lat.output for lat in result.latency] == [True, False]  # reports read the first pair
    assert result.metrics["decode_tokens_per_s"] == rows[0]["decode_tokens_per_s"]
    json.dumps(shown)


def test_bench_refuses_mixing_decoders_and_plain_models(tmp_path):
    from mlopt.export.lib.decoder_bench import check_settings, decoder_models
    from mlopt.export.bench import BenchConfig

    folder = tmp_path / "dec"
    folder.mkdir()
    (folder / "genai_config.json").write_text("{}")
    (folder / "model.onnx").write_bytes(b"")
    plain = SimpleNamespace(format="onnx", onnx_path=tmp_path / "m.onnx", origin="m.onnx")
    with pytest.raises(InputError, match=r"decoder folders and plain models together \(m.onnx is not"):
        decoder_models(plain, [str(folder)])
    with pytest.raises(InputError, match=r"\(other.onnx is not"):
        decoder_models(_artifact(folder), ["other.onnx"])
    assert decoder_models(plain, ["other.onnx"]) is None
    with pytest.raises(InputError, match="export hf:x first"):
        decoder_models(SimpleNamespace(format="causal-lm", origin="hf:x"), [])
    assert decoder_models(_artifact(folder), [str(folder / "model.onnx")]) == [(str(folder), folder), (
        str(folder / "model.onnx"), folder)]
    with pytest.raises(InputError, match="batch_sizes do not apply to decoder folders"):
        check_settings(BenchConfig(batch_sizes=[4]), decoders=True)
    with pytest.raises(InputError, match="new_tokens do not apply to plain ONNX models"):
        check_settings(BenchConfig(new_tokens=[4]), decoders=False)
    check_settings(BenchConfig(), decoders=True)


@pytest.mark.slow
def test_thread_setting_reaches_onnxruntime(tiny_decoder):
    if not Path("/proc/self/task").is_dir():
        pytest.skip("counts threads through /proc")
    config = (tiny_decoder.folder / "genai_config.json").read_text()
    models = [generation.load_model(tiny_decoder.folder, 1)]  # the first load also starts shared threads
    counts = [len(os.listdir("/proc/self/task"))]
    for threads in (4, 2):
        models.append(generation.load_model(tiny_decoder.folder, threads))
        counts.append(len(os.listdir("/proc/self/task")))
    # A session's intra-op pool of n threads starts n - 1 workers.
    assert (counts[1] - counts[0], counts[2] - counts[1]) == (3, 1)
    # The user's genai_config.json is left as it was: the setting is an overlay.
    assert (tiny_decoder.folder / "genai_config.json").read_text() == config


@pytest.mark.slow
def test_bench_prompt_without_data_is_the_fixed_paragraph(tiny_decoder):
    from mlopt.export.lib.decoder_bench import FIXED_PROMPT, prompt_source

    model = generation.load_model(tiny_decoder.folder)
    ids = prompt_source(tiny_decoder.folder, None, model)
    assert ids == generation.token_ids(tiny_decoder.folder, [FIXED_PROMPT], model) and len(ids) > 100
    with pytest.raises(InputError, match="prompt comes from text:FILE data, not digits"):
        prompt_source(tiny_decoder.folder, SimpleNamespace(name="digits", text=False), model)


def test_prompt_repeats_a_short_text(capsys):
    from mlopt.export.lib.decoder_bench import prompt_of

    assert prompt_of([1, 2, 3], 7, real_text=True) == [1, 2, 3, 1, 2, 3, 1]
    assert "the text has 3 tokens; the 7-token prompt repeats it" in capsys.readouterr().err
    assert prompt_of(list(range(10)), 4, real_text=True) == [0, 1, 2, 3]


# The command line, on the trained tiny Llama of tests/decoders.py and its held-out English text.


def _mlopt(*args):
    from typer.testing import CliRunner

    from mlopt.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_eval_command_on_a_decoder_before_and_after_export(llama_dir, llama_genai_dir, decoder_text):
    shown = {}
    for model in (f"hf:{llama_dir}", llama_genai_dir):
        result = _mlopt("eval", "--model", model, "--data", f"text:{decoder_text}", "--window", 64, "--json", "-q")
        assert result.exit_code == 0, result.output
        shown[str(model)] = json.loads(result.stdout)
    torch_ppl, onnx_ppl = shown.values()
    assert set(onnx_ppl) == {"perplexity", "nll", "windows", "window", "tokens"}
    assert onnx_ppl["window"] == 64 and onnx_ppl["tokens"] == onnx_ppl["windows"] * 63 > 1000
    assert onnx_ppl["perplexity"] == pytest.approx(torch_ppl["perplexity"], rel=1e-3)
    assert onnx_ppl["windows"] == torch_ppl["windows"]  # the same tokens on both sides
    assert onnx_ppl["perplexity"] < 100  # trained: far below its 512-token vocabulary on text it never saw


@pytest.mark.slow
def test_eval_command_on_too_short_a_text(llama_genai_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A short line of text.\nAnother short line.\nAnd a third one.\n")
    result = _mlopt("eval", "--model", llama_genai_dir, "--data", f"text:{short}", "-q")
    assert result.exit_code == 2, result.output
    assert "one perplexity window needs 128" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_command_on_decoders(llama_genai_dir, decoder_text, exported_dir, tmp_path):
    import shutil

    copy = shutil.copytree(llama_genai_dir, tmp_path / "copy")
    result = _mlopt("bench", llama_genai_dir, copy, "--prompt-tokens", 32, "--new-tokens", 4, "--new-tokens", 8,
                    "--rounds", 2, "--data", f"text:{decoder_text}", "--json", "-q")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [(r["model"], r["new_tokens"]) for r in rows] == [
        (str(llama_genai_dir), 4), (str(copy), 4), (str(llama_genai_dir), 8), (str(copy), 8)]
    contract = {"model", "provider", "batch_size", "latency_ms", "throughput_per_s", "size_mb", "prompt_tokens",
                "new_tokens", "ttft_ms", "decode_tokens_per_s", "prompt_tokens_per_s", "peak_rss_mb"}
    assert all(contract <= set(r) and r["prompt_tokens"] == 32 and r["decode_tokens_per_s"] > 0 for r in rows)
    mixed = _mlopt("bench", llama_genai_dir, exported_dir, "-q")
    assert mixed.exit_code == 2 and "cannot time decoder folders and plain models together" in mixed.output
    assert len(mixed.output.strip().splitlines()) == 1


def test_windows_start_with_bos_when_the_tokenizer_adds_one(decoder_tokenizer, tmp_path):
    """A model whose tokenizer starts every text with BOS (Gemma) is scored on windows that start with it."""
    from tokenizers.processors import TemplateProcessing

    assert [w[0] for w in generation._windows(list(range(10, 40)), 8, None, bos=1)] == [1, 1, 1, 1]
    assert generation._windows(list(range(10, 40)), 8, None, bos=1)[1] == [1, *range(17, 24)]
    plain = tmp_path / "plain"
    decoder_tokenizer.save_pretrained(plain)
    assert generation.bos_token(plain) is None  # the fixture tokenizer adds no BOS
    with_bos = tmp_path / "bos"
    tok = decoder_tokenizer.__class__(tokenizer_object=decoder_tokenizer.backend_tokenizer.__class__.from_str(
        decoder_tokenizer.backend_tokenizer.to_str()), bos_token="<s>", eos_token="</s>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(with_bos)
    assert generation.bos_token(with_bos) == tok.bos_token_id


@pytest.mark.slow
def test_a_genai_folder_that_names_its_graph_otherwise(llama_genai_dir, tmp_path):
    """Folders made elsewhere name the graph in genai_config.json (model.decoder.filename); a name that leaves the
    folder is refused in one line."""
    import shutil

    from mlopt.quant.lib.weightonly import WeightScheme, quantize_folder
    from mlopt.runtime.artifacts import load_artifact

    folder = tmp_path / "renamed"
    shutil.copytree(llama_genai_dir, folder)
    (folder / "model.onnx").rename(folder / "decoder.onnx")  # its data file keeps its name
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"]["filename"] = "decoder.onnx"
    (folder / "genai_config.json").write_text(json.dumps(config))
    assert load_artifact(folder).onnx_path == folder / "decoder.onnx"
    ids = generation.token_ids(folder, ["The module provides functions to read and write files. " * 30])
    assert generation.perplexity(folder, ids, 64) == generation.perplexity(llama_genai_dir, ids, 64)
    out = quantize_folder(folder, tmp_path / "q", WeightScheme())
    assert out.name == "decoder.onnx" and len(generation.greedy(out.parent, ids[:8], 4)) == 4
    config["model"]["decoder"]["filename"] = "../outside.onnx"
    (folder / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="must be a file in that folder"):
        load_artifact(folder)


def _head_graph(select):
    """x [1, S, 4] -> (the selection `select` makes) -> MatMul -> Tanh -> logits [1, 1, 6]."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(-1, np.int64), "last"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array([-2], np.int64), "minus2")]
    nodes = {"gather": [helper.make_node("Gather", ["x", "last"], ["g"], axis=1),
                        helper.make_node("Unsqueeze", ["g", "axis1"], ["h"])],
             "second to last": [helper.make_node("Gather", ["x", "minus2"], ["g"], axis=1),
                                helper.make_node("Unsqueeze", ["g", "axis1"], ["h"])]}[select]
    # the head, then what builders put after it: a cast, a vocabulary mask (Where(mask, fill, x)), soft-capping
    inits.append(numpy_helper.from_array(np.array([True] * 5 + [False]), "keep"))
    inits.append(numpy_helper.from_array(np.array(-1e4, np.float32), "fill"))
    nodes += [helper.make_node("MatMul", ["h", "W"], ["z"], name="head"), helper.make_node("Cast", ["z"], ["c"], to=1),
              helper.make_node("Where", ["keep", "c", "fill"], ["m"]), helper.make_node("Tanh", ["m"], ["logits"])]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 6])], inits,
                              value_info=[helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, 1, 6])
                                          for t in ("z", "c", "m")])
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_last_token_head_is_widened_to_every_position_exactly():
    """mlopt's export computes the last token's logits only; perplexity widens the graph back in memory, and the
    widened graph's last row is the pruned graph's output."""
    import numpy as np
    import onnxruntime as ort

    from mlopt.runtime.decoder import all_positions, last_token_only, lm_head

    model = _head_graph("gather")
    assert last_token_only(model) and lm_head(model) == "head"
    x = np.random.default_rng(1).standard_normal((1, 5, 4)).astype(np.float32)
    pruned = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert all_positions(model) and not last_token_only(model)
    wide = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert pruned.shape == (1, 1, 6) and wide.shape == (1, 5, 6)
    np.testing.assert_allclose(wide[:, -1:], pruned, rtol=1e-6)
    assert not model.graph.value_info  # the shapes recorded with one position are gone
    assert not all_positions(model)  # already every position: nothing to do


def test_a_head_pruned_another_way_is_refused_in_one_line():
    from mlopt.runtime.decoder import all_positions

    with pytest.raises(InputError, match="cannot widen"):
        all_positions(_head_graph("second to last"))


def test_a_torch_window_longer_than_the_model_context_is_refused():
    """As for an exported folder: past its positions a model scores nonsense, without a word (it did, 303.4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, vocab_size=50, max_position_embeddings=16))
    with pytest.raises(InputError, match=r"window of 32 tokens is longer than the model's context \(16\)"):
        generation.perplexity_torch(model, list(range(40)) * 4, 32, 2)
    assert generation.perplexity_torch(model, list(range(40)) * 4, 16, 2)["windows"] == 2
