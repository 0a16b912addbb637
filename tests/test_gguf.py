"""gguf:FILE: a GGUF file dequantized by transformers into a cached Hugging Face folder."""

import json

import numpy as np
import pytest

import decoders
from mlopt.core.errors import EXIT_INPUT, InputError
from mlopt.runtime import gguf as gg


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _small_gguf(path, architecture="llama", tensors=True, blocks=0):
    """A valid GGUF file of a few float32 tensors and no block (not a loadable model), written without torch;
    `blocks`: the block count it declares."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(blocks)
    if tensors:
        writer.add_tensor("token_embd.weight", np.arange(64 * 16, dtype=np.float32).reshape(64, 16))
        writer.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _one_line_input_error(path, match):
    with pytest.raises(InputError, match=match) as info:
        gg.to_hf_folder(path)
    assert info.value.exit_code == EXIT_INPUT and "\n" not in str(info.value)
    return str(info.value)


def test_spec_helpers(tmp_path):
    assert gg.is_gguf_spec("gguf:/models/a.gguf") and not gg.is_gguf_spec("hf:/models/a") and not gg.is_gguf_spec(None)
    assert str(gg.gguf_file("gguf:~/a.gguf")).endswith("/a.gguf") and "~" not in str(gg.gguf_file("gguf:~/a.gguf"))
    assert gg.cache_root() == tmp_path / "cache" / "mlopt" / "gguf"


def _cut(fraction):
    def make(path):
        data = _small_gguf(path.with_suffix(".full")).read_bytes()
        path.write_bytes(data[:int(len(data) * fraction)])
    return make


BAD_FILES = {
    "missing": (lambda p: None, "does not exist"),
    "directory": (lambda p: p.mkdir(), "is a directory"),
    "empty": (lambda p: p.write_bytes(b""), "is empty, not a GGUF file"),
    "text": (lambda p: p.write_text("hello world\n"), r"not a GGUF file \(it starts with b'hell'"),
    "safetensors": (lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "), "not a GGUF file"),
    "cut in the header": (_cut(0.02), "truncated or corrupt GGUF"),
    "cut in the tensor table": (_cut(0.1), "truncated or corrupt GGUF"),
    "cut in the tensor data": (_cut(0.9), "truncated or corrupt GGUF"),
    "garbage after the magic": (lambda p: p.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(4000)),
                                "truncated or corrupt GGUF"),
    "vocabulary only": (lambda p: _small_gguf(p, tensors=False), "no tensors"),
    "a million blocks declared": (lambda p: _small_gguf(p, blocks=10**6),  # transformers would build them all
                                  "declares 1,000,000 blocks .llama.block_count. but holds tensors for 0"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_are_one_line_input_errors(case, tmp_path):
    make, match = BAD_FILES[case]
    path = tmp_path / "model.gguf"
    make(path)
    message = _one_line_input_error(path, match)
    assert str(path) in message
    assert not gg.cache_root().exists()  # nothing converted, nothing cached


def test_missing_packages_say_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    _one_line_input_error(_small_gguf(tmp_path / "m.gguf"), r'pip install "mlopt\[llm\]"')


@pytest.mark.slow
def test_an_architecture_transformers_cannot_load_is_named(tmp_path):
    message = _one_line_input_error(_small_gguf(tmp_path / "m.gguf", architecture="rwkv6"), "'rwkv6' model")
    assert "transformers cannot load" in message and "llama" in message and "qwen3" in message


@pytest.mark.slow
def test_gguf_converts_to_an_hf_folder_with_the_source_logits(llama_gguf, llama_dir, decoder_lines, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlopt.runtime import hf

    folder = gg.to_hf_folder(llama_gguf)
    assert folder.parent == gg.cache_root() and hf.model_dir(f"hf:{folder}") == folder
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    text = " ".join(decoder_lines[1][:3])
    source_tok, converted_tok = AutoTokenizer.from_pretrained(llama_dir), AutoTokenizer.from_pretrained(folder)
    ids = source_tok(text, return_tensors="pt")["input_ids"]
    assert converted_tok(text)["input_ids"] == ids[0].tolist()
    assert (converted_tok.bos_token, converted_tok.eos_token) == (decoders.BOS, decoders.EOS)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(llama_dir)(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_conversion_is_cached_by_content(llama_gguf, tmp_path, monkeypatch):
    folder = gg.to_hf_folder(llama_gguf)
    converted = []
    monkeypatch.setattr(gg, "_convert", lambda *args: converted.append(args))
    assert gg.to_hf_folder(llama_gguf) == folder and converted == []  # the same content: reused
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(llama_gguf.read_bytes())
    assert gg.to_hf_folder(copy) == folder and converted == []  # the name does not matter
    data = bytearray(llama_gguf.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    copy.write_bytes(bytes(data))
    assert gg.to_hf_folder(copy) != folder and len(converted) == 1  # other content: converted again


@pytest.mark.slow
def test_a_conversion_finished_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    def save(transformers, path, out):  # `out` is the temporary ".NAME.xxxx" beside the final NAME
        (out / "config.json").write_text('{"by": "us"}')
        folder = out.parent / out.name.split(".")[1]
        folder.mkdir()
        (folder / "config.json").write_text('{"by": "them"}')

    monkeypatch.setattr(gg, "_save", save)
    folder = gg.to_hf_folder(_small_gguf(tmp_path / "m.gguf"))
    assert json.loads((folder / "config.json").read_text()) == {"by": "them"}
    assert [p.name for p in gg.cache_root().iterdir()] == [folder.name]  # our temporary folder is gone


@pytest.mark.slow
def test_a_failed_conversion_leaves_nothing_and_says_why_in_one_line(tmp_path, monkeypatch):
    def save(transformers, path, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("unsupported ggml type 42\nmore details")

    monkeypatch.setattr(gg, "_save", save)
    _one_line_input_error(_small_gguf(tmp_path / "m.gguf"), "cannot convert the GGUF file .*: unsupported ggml type 42$")
    assert list(gg.cache_root().iterdir()) == []
    monkeypatch.setenv("XDG_CACHE_HOME", str(_small_gguf(tmp_path / "a-file")))
    _one_line_input_error(tmp_path / "m.gguf", "cannot create")


@pytest.mark.slow
def test_converted_folder_exports_and_generates_as_the_source(llama_gguf, llama_genai_dir, tmp_path):
    folder = gg.to_hf_folder(llama_gguf)
    out = decoders.build_genai(folder, tmp_path / "fp32", tmp_path / "builder-cache")
    prompt = "Return a new list of the"
    assert decoders.og_greedy(out, prompt, 12) == decoders.og_greedy(llama_genai_dir, prompt, 12)
