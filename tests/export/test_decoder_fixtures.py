"""The tiny decoder fixtures (tests/decoders.py) mean something, and onnxruntime-genai's builder takes them."""

import json

import pytest

import decoders
from mlopt.runtime.decoder import genai

PROMPT = "Return a new list of the"  # mid-sentence: the models continue it rather than end the line


def test_english_lines_are_prose_and_fixed():
    lines = decoders.english_lines()
    assert len(lines) > 1000 and sum(map(len, lines)) > 150_000
    assert lines == decoders.english_lines()  # the same order every call
    assert all(line[0].isupper() and line.endswith(".") and "\n" not in line for line in lines)
    train, held_out = decoders.split_lines(lines)
    assert not set(train) & set(held_out) and len(train) + len(held_out) == len(lines)


@pytest.mark.slow
def test_text_file_holds_the_held_out_lines(decoder_text, decoder_lines):
    assert decoder_text.read_text(encoding="utf-8").splitlines() == decoder_lines[1]


@pytest.mark.slow
def test_tokenizer_round_trips_and_has_bos_eos(llama_dir, decoder_lines):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    assert len(tok) == decoders.VOCAB_SIZE
    assert (tok.bos_token, tok.eos_token) == (decoders.BOS, decoders.EOS)
    lines = decoder_lines[1][:50]
    encoded = tok(lines)["input_ids"]
    assert [tok.decode(ids) for ids in encoded] == lines
    # merges learned on English: fewer tokens than half the characters (bytes alone would be one a character)
    assert sum(map(len, encoded)) < sum(map(len, lines)) / 2


@pytest.mark.slow
def test_trained_llama_perplexity_is_far_below_untrained(llama_dir, decoder_tokenizer, decoder_lines):
    from transformers import AutoModelForCausalLM

    held_out = decoders.token_stream(decoder_tokenizer, decoder_lines[1])
    untrained = decoders.perplexity(decoders.build_decoder("llama", decoder_tokenizer), held_out)
    trained = decoders.perplexity(AutoModelForCausalLM.from_pretrained(llama_dir), held_out)
    assert untrained > 0.8 * decoders.VOCAB_SIZE  # random weights: about uniform over the vocabulary
    assert trained < 0.25 * untrained and trained < 40, (trained, untrained)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_builder_converts_the_fixture_and_genai_generates_as_transformers(family, request, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = request.getfixturevalue(f"{family}_dir")
    out = request.getfixturevalue("llama_genai_dir") if family == "llama" else \
        decoders.build_genai(hf_dir, tmp_path / "fp32", tmp_path / "cache")
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["type"] == family and config["model"]["decoder"]["num_hidden_layers"] == 2
    assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()

    # Both hold end-of-sequence back: how long a tiny model's continuation runs before it ends is not the point.
    ids, continuation = decoders.og_greedy(out, PROMPT, new_tokens=12, exact=True)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert ids == tok(PROMPT)["input_ids"]  # onnxruntime-genai's tokenizer encodes as transformers does
    og = genai()
    og_tok = og.Tokenizer(og.Model(str(out)))
    assert og_tok.decode(ids) == PROMPT and og_tok.decode(continuation) == tok.decode(continuation)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12,
                                  do_sample=False)[0, len(ids):].tolist()
    assert continuation == expected and len(continuation) == 12
    assert len(set(continuation)) > 2  # a trained model continues with words, not one repeated token


@pytest.mark.slow
def test_training_is_deterministic(decoder_tokenizer, decoder_lines):
    import torch

    ids = decoders.token_stream(decoder_tokenizer, decoder_lines[0][:200])
    initial = decoders.build_decoder("qwen3", decoder_tokenizer).state_dict()
    first, second = (decoders.train(decoders.build_decoder("qwen3", decoder_tokenizer), ids, steps=5).state_dict()
                     for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
