"""Tiny decoder language models that mean something, for the decoder tests (export, ptq, eval, bench).

- ``english_lines()`` (benchmarks/english.py): English prose, the docstrings of Python standard-library modules. Every CPython
  has them, so a fresh machine builds the same kind of text offline (the exact lines follow the Python
  version; tests compare models on the same text, never against fixed numbers).
- ``train_tokenizer(lines)``: a byte-level BPE of 512 tokens with ``<s>``/``</s>``, as transformers'
  PreTrainedTokenizerFast; transformers and onnxruntime-genai encode with it alike.
- ``save_decoder(folder, family, tok, lines)``: a tiny Llama (untied lm_head) or Qwen3 (tied
  embeddings), hidden 128, 2 layers, trained with AdamW on the lines (seeded, one thread, so the
  same on every run), saved with ``save_pretrained`` beside the tokenizer.
- ``build_genai(hf_dir, out, cache)`` runs onnxruntime-genai's builder; ``og_greedy(folder, prompt, n)``
  generates with the result. ``write_llama_gguf(model, tok, path)`` writes a Llama as a float32 GGUF
  file (llama.cpp's tensor names and tokenizer keys) that transformers loads.

The pytest fixtures at the end are session-scoped, so each model is trained once per test session;
tests/conftest.py loads this module as a plugin. The models train on ``split_lines(...)[0]``; the text file the
``decoder_text`` fixture writes holds only the held-out lines, so perplexity on it is on unseen text.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from conftest import TESTS

# The English text is shared with benchmarks/decoder.py.
_spec = importlib.util.spec_from_file_location("english", TESTS.parent / "benchmarks" / "english.py")
_english = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_english)
english_lines = _english.english_lines

VOCAB_SIZE = 512
BOS, EOS = "<s>", "</s>"
SEQ_LEN, BATCH = 64, 16
# family: (config class, model class, extra config, training steps). Qwen3 ties its embeddings, Llama does not.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}, 400),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True, "head_dim": 32}, 150),
}


def split_lines(lines: list[str]) -> tuple[list[str], list[str]]:
    """(training lines, held-out lines): every fifth line is held out."""
    return [x for i, x in enumerate(lines) if i % 5], lines[::5]


def write_text(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_tokenizer(lines: list[str]):
    """A byte-level BPE (GPT-2 style) of VOCAB_SIZE tokens; adds no BOS/EOS when encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def token_stream(tok, lines: list[str]):
    """The lines' tokens as one int64 tensor, each line followed by EOS."""
    import torch

    ids = []
    for ids_of_line in tok(lines)["input_ids"]:
        ids += ids_of_line + [tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def build_decoder(family: str, tok, seed: int = 0):
    """An untrained tiny decoder of `family` (a key of FAMILIES), its weights drawn from `seed`."""
    import torch
    import transformers

    config_class, model_class, extra, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()


def train(model, ids, steps: int, seed: int = 0, lr: float = 3e-3):
    """AdamW on random SEQ_LEN windows of `ids` (warm-up then linear decay), on one thread: the same
    weights on every run and no slower when other processes share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (BATCH,), generator=gen)
            x = torch.stack([ids[s:s + SEQ_LEN] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def perplexity(model, ids, window: int = 128) -> float:
    """Teacher-forced perplexity of `model` on `ids` cut into non-overlapping windows."""
    import torch

    n = (len(ids) - 1) // window
    x = ids[:n * window].view(n, window)
    with torch.no_grad():
        return math.exp(model(input_ids=x, labels=x).loss.item())


def save_decoder(folder: Path, family: str, tok, lines: list[str], steps: int | None = None) -> Path:
    """A tiny `family` decoder trained on `lines` (FAMILIES' step count unless given), saved with its tokenizer."""
    model = build_decoder(family, tok)
    steps = FAMILIES[family][3] if steps is None else steps
    if steps:
        train(model, token_stream(tok, lines), steps)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def build_genai(hf_dir: Path, out: Path, cache: Path, precision: str = "fp32") -> Path:
    """onnxruntime-genai's model builder run on an HF folder, offline: the genai folder it writes."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(out)


def og_greedy(folder: Path, prompt: str, new_tokens: int, exact: bool = False) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy continuation) from onnxruntime-genai on a genai folder; `exact`: all `new_tokens` of
    it, end-of-sequence held back (min_length), as transformers' min_new_tokens does."""
    from mlopt.runtime.decoder import genai

    og = genai()
    model = og.Model(str(folder))
    ids = [int(i) for i in og.Tokenizer(model).encode(prompt)]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False,
                              **({"min_length": len(ids) + new_tokens} if exact else {}))
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return ids, [int(i) for i in gen.get_sequence(0)][len(ids):]


def _gguf_permute(weight, n_head: int):
    """llama.cpp's row order for q/k projections (the inverse of what transformers undoes on load)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_tokenizer(writer, tok) -> None:
    """The byte-level BPE as llama.cpp's "gpt2" tokenizer: tokens by id, merges, special tokens as control."""
    import json

    import gguf

    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in data["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_add_bos_token(False)


def write_llama_gguf(model, tok, path: Path, architecture: str = "llama", kinds: dict[str, str] | None = None) -> Path:
    """A transformers Llama and its tokenizer as a GGUF file, named as llama.cpp names them: float32 tensors, or
    `kinds` maps "embedding" (token_embd and output) and "weights" (the block projections) to a gguf block format
    (e.g. "Q8_0", "Q4_1"), quantized by the gguf package as llama.cpp's quantizer stores them."""
    import gguf
    from gguf.quants import quantize

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if kinds else gguf.LlamaFileType.ALL_F32)
    _gguf_tokenizer(writer, tok)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        weight = tensor.detach().float().numpy()
        if base.endswith(("q_proj", "k_proj")):
            weight = _gguf_permute(weight, cfg.num_attention_heads if base.endswith("q_proj") else cfg.num_key_value_heads)
        gguf_name = names.get_name(base)
        kind = (kinds or {}).get("embedding" if gguf_name in ("token_embd", "output") else "weights")
        if kind and weight.ndim == 2:
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            writer.add_tensor(f"{gguf_name}.{suffix}", quantize(weight, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(f"{gguf_name}.{suffix}", weight.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


@pytest.fixture(scope="session")
def decoder_lines() -> tuple[list[str], list[str]]:
    """(training lines, held-out lines) of the English text."""
    return split_lines(english_lines())


@pytest.fixture(scope="session")
def decoder_tokenizer(decoder_lines):
    return train_tokenizer(decoder_lines[0])


@pytest.fixture(scope="session")
def decoder_text(tmp_path_factory, decoder_lines) -> Path:
    """A text file of the held-out lines (about 280 lines, 16k tokens) the fixture models never saw."""
    return write_text(tmp_path_factory.mktemp("decoder-text") / "english.txt", decoder_lines[1])


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, decoder_tokenizer, decoder_lines) -> Path:
    """A tiny Llama trained on the English text: an HF folder (config, safetensors, tokenizer)."""
    return save_decoder(tmp_path_factory.mktemp("llama") / "hf", "llama", decoder_tokenizer, decoder_lines[0])


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory, decoder_tokenizer, decoder_lines) -> Path:
    """A tiny Qwen3 with tied embeddings, trained briefly on the English text: an HF folder."""
    return save_decoder(tmp_path_factory.mktemp("qwen3") / "hf", "qwen3", decoder_tokenizer, decoder_lines[0])


@pytest.fixture(scope="session")
def llama_genai_dir(tmp_path_factory, llama_dir) -> Path:
    """The trained Llama as an fp32 onnxruntime-genai folder, written by the builder directly."""
    root = tmp_path_factory.mktemp("llama-genai")
    return build_genai(llama_dir, root / "fp32", root / "cache")


@pytest.fixture(scope="session")
def llama_gguf(tmp_path_factory, llama_dir, decoder_tokenizer) -> Path:
    """The trained Llama as a GGUF file (float32 tensors, its tokenizer inside), for gguf:FILE."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    return write_llama_gguf(model, decoder_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf")
