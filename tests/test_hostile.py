"""Hostile or broken input: every case ends in one line on stderr and exit 2, writes nothing, and takes
little work (no alias bomb expanded, no pickle run, no array allocated for a forged shape).

Each case builds its input under tmp_path/in and gets its --out under tmp_path; the whole of tmp_path
is compared before and after, so a created --out, a staging directory, a partial file or a marker
written by code mlopt must not run all fail the test.
"""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlopt.cli.main import app

from conftest import TOY

runner = CliRunner()
MARKER = "PWNED"  # what the code planted in hostile files would write, if it ever ran
SECONDS = 5.0  # of work for a refusal, imports done; the cases take well under a second on an idle machine


@pytest.fixture(scope="module", autouse=True)
def _imports_done():
    """Import the heavy libraries once, so that the time of each refusal is its own work."""
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import PIL.Image  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import torchvision  # noqa: F401

    runner.invoke(app, ["eval", "--model", "torchvision:resnet18", "--data", "digits", "-q"])


def _evil_py(folder: Path) -> Path:
    """A Python file that leaves a marker when imported: proof that code was (not) run."""
    path = folder / "evil.py"
    path.write_text(f"open({str(folder.parent / MARKER)!r}, 'w').write('ran')\n"
                    "import torch\ndef make(num_classes=10):\n    return torch.nn.Linear(64, num_classes)\n")
    return path


def _recipe(text: str):
    def make(d: Path):
        (d / "r.yaml").write_text(text)
        return ["recipe", "validate", d / "r.yaml"]
    return make


def _alias_bomb(d: Path) -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefghi", "bcdefghij"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")  # 10^9 values in all
    return "\n".join(lines + ["version: 1", "model: {spec: torchvision:resnet18}", "steps: [{type: eval}]"]) + "\n"


def case_alias_bomb_validate(d):
    return _recipe(_alias_bomb(d))(d), "alias bomb"


def case_alias_bomb_run(d):
    (d / "r.yaml").write_text(_alias_bomb(d))
    return ["run", d / "r.yaml", "--out", d.parent / "out", "-q"], "alias bomb"


def case_recipe_binary(d):
    (d / "r.yaml").write_bytes(b"version: 1\n\xff\xfe\x00model: \x80\x81\n")
    return ["recipe", "validate", d / "r.yaml"], "is not UTF-8 text (byte 0xff at offset 11)"


def case_recipe_directory(d):
    (d / "r.yaml").mkdir()
    return ["run", d / "r.yaml", "--out", d.parent / "out", "-q"], "is a directory"


def case_recipe_deep_nesting(d):
    return _recipe("version: 1\nmodel: " + "[" * 3000 + "]" * 3000 + "\n")(d), "nested more than 32 levels"


def case_recipe_nested_past_limit(d):
    return _recipe("version: 1\nmodel: " + "[" * 40 + "]" * 40 + "\n")(d), "nested more than 32 levels"


def case_recipe_huge(d):
    return _recipe("# padding\n" * 200_000)(d), "larger than 1 MiB"


def _npz(d: Path, **arrays) -> list:
    np.savez(d / "data.npz", **arrays)
    return ["eval", "--model", f"{TOY}:tiny_cnn", "--data", f"npz:{d / 'data.npz'}", "-q"]


def _npy_header(shape, dtype) -> bytes:
    from numpy.lib import format as npy

    out = io.BytesIO()
    npy.write_array_header_1_0(out, {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return out.getvalue()


def case_npz_pickled_objects(d):
    args = _npz(d, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    return args, "holds pickled Python objects; mlopt reads plain numeric arrays only"


def case_npz_forged_shape(d):
    with zipfile.ZipFile(d / "data.npz", "w") as z:  # declares 4 TB, holds 64 bytes
        z.writestr("x.npy", _npy_header((10**6, 1, 1000, 1000), "float32") + bytes(64))
        z.writestr("y.npy", _npy_header((2,), "int64") + bytes(16))
    return ["eval", "--model", f"{TOY}:tiny_cnn", "--data", f"npz:{d / 'data.npz'}", "-q"], "declares shape (1000000, 1, 1000, 1000) (4 TB)"


def case_npz_not_a_zip(d):
    (d / "data.npz").write_bytes(b"\x80\x04garbage" * 10)
    return ["eval", "--model", f"{TOY}:tiny_cnn", "--data", f"npz:{d / 'data.npz'}", "-q"], "not a zip archive"


def case_npz_is_a_directory(d):
    (d / "data.npz").mkdir()
    return ["eval", "--model", f"{TOY}:tiny_cnn", "--data", f"npz:{d / 'data.npz'}", "-q"], "is a directory"


def _evil_weights(d: Path) -> Path:
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d.parent / MARKER}",))

    torch.save({"w": Evil()}, d / "w.pt")
    return d / "w.pt"


def case_weights_run_code(d):
    args = ["eval", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--weights", _evil_weights(d), "-q"]
    return args, "w.pt: they hold pickled Python objects, naming posix.system"


def case_weights_plain_pickle(d):
    import pickle

    (d / "w.pt").write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    args = ["eval", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--weights", d / "w.pt", "-q"]
    return args, "w.pt: not a valid PyTorch state dict (Unsupported operand 149)"


def case_weights_truncated(d):
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(100)}, buf)
    (d / "w.pt").write_bytes(buf.getvalue()[:200])
    args = ["eval", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--weights", d / "w.pt", "-q"]
    return args, "not a valid PyTorch state dict"


def _onnx(path: Path, dims=("N", 1, 8, 8), location: str | None = None) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((64, 10), np.float32), "W")
    if location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in {"location": location, "offset": "0", "length": "2560"}.items():
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None if dims is None else list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def case_onnx_garbage(d):
    (d / "m.onnx").write_bytes(b"\x08\x07garbage" * 50)
    return ["bench", d / "m.onnx", "--out", d.parent / "out", "-q"], "not a valid ONNX file"


def case_onnx_truncated(d):
    data = _onnx(d / "m.onnx").read_bytes()
    (d / "m.onnx").write_bytes(data[: len(data) // 2])
    return ["eval", "--model", d / "m.onnx", "--data", "digits", "-q"], "not a valid ONNX file"


def case_onnx_external_data_climbs_out(d):
    _onnx(d / "m.onnx", location="../../../../../../../../etc/passwd")
    return ["eval", "--model", d / "m.onnx", "--data", "digits", "-q"], "outside the model's folder"


def case_onnx_external_data_absolute(d):
    _onnx(d / "m.onnx", location="/etc/passwd")
    return ["bench", d / "m.onnx", "--out", d.parent / "out", "-q"], "outside the model's folder"


def case_onnx_external_data_symlink(d):
    (d / "w.bin").symlink_to("/etc/passwd")
    _onnx(d / "m.onnx", location="w.bin")
    return ["eval", "--model", d / "m.onnx", "--data", "digits", "-q"], "(a link to /etc/passwd), outside the model's folder"


def case_onnx_absurd_dims(d):
    _onnx(d / "m.onnx", dims=("N", 1, 100_000, 100_000))
    return ["eval", "--model", d / "m.onnx", "--data", "digits", "-q"], "holds 10,000,000,000 values"


def case_onnx_negative_dims(d):
    _onnx(d / "m.onnx", dims=("N", -1, 8, 8))
    return ["bench", d / "m.onnx", "--out", d.parent / "out", "-q"], "declares a negative dimension"


def case_input_shape_absurd(d):
    args = ["export", "--model", "torchvision:resnet18", "--input-shape", "1x3x100000x100000", "--out", d.parent / "out", "-q"]
    return args, "holds 30,000,000,000 values"


def _png(width: int, height: int) -> bytes:
    """An 8x8 PNG whose header claims width x height (the CRC fixed, so PIL believes it)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _image_folder(d: Path, bad_name: str, bad: bytes) -> list:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (d / "img" / split / cls).mkdir(parents=True)
            Image.new("L", (8, 8), color=40 if cls == "a" else 200).save(d / "img" / split / cls / "0.png")
    (d / "img" / "val" / "a" / bad_name).write_bytes(bad)
    return ["eval", "--model", f"{TOY}:tiny_cnn", "--data", f"imagefolder:{d / 'img'}", "--channels", "1",
            "--image-size", "8", "-q"]


def case_image_decompression_bomb(d):
    return _image_folder(d, "bomb.png", _png(20_000, 20_000)), "could be decompression bomb"


def case_image_past_warning_size(d):  # PIL only warns below twice its limit; mlopt refuses
    return _image_folder(d, "big.png", _png(10_000, 10_000)), "Image size (100000000 pixels) exceeds limit"


def case_image_truncated(d):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color=(1, 2, 3)).save(buf, "JPEG")
    return _image_folder(d, "cut.jpg", buf.getvalue()[:300]), "cannot read image"


def case_image_class_only_in_val(d):  # its images would have been dropped in silence
    args = _image_folder(d, "1.png", _png(8, 8))
    (d / "img" / "val" / "c").mkdir()
    (d / "img" / "val" / "c" / "0.png").write_bytes(_png(8, 8))
    return args, "has class folder(s) that"


def case_onnx_whose_input_size_would_resize_digits_past_memory(d):  # its input fills image_size unasked
    return ["eval", "--model", _onnx(d / "m.onnx", dims=("N", 1, 16000, 16000)), "--data", "digits", "-q"], \
        "images resized to 16000x16000 need"


def case_onnx_of_four_channels_on_digits(d):  # images convert to 1 or 3 channels, never repeated to 4
    return ["eval", "--model", _onnx(d / "m.onnx", dims=("N", 4, 8, 8)), "--data", "digits", "-q"], \
        "takes inputs of shape 4x8x8 per sample, but the data gives 1x8x8"


def case_text_for_an_image_model(d):  # not "image_size and channels apply to images": neither was given
    (d / "t.txt").write_text("a line\nanother line\n")
    return ["bench", _onnx(d / "m.onnx"), "--data", f"text:{d / 't.txt'}", "-q"], "needs an hf: model"


def case_hf_config_of_a_million_layers(d):  # transformers would build them for minutes, memory climbing
    (d / "m").mkdir()
    (d / "m" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                                      "num_hidden_layers": 10**6, "hidden_size": 32}))
    (d / "t.txt").write_text("a line\nanother line\n")
    args = ["export", "--model", f"hf:{d / 'm'}", "--data", f"text:{d / 't.txt'}", "--out", d.parent / "out", "-q"]
    return args, "describes 1,000,000 layers; mlopt builds models of at most 4,096"


def case_hf_config_larger_than_memory(d):
    (d / "m").mkdir()
    (d / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                      "num_hidden_layers": 2, "hidden_size": 10**6,
                                                      "vocab_size": 10**6}))
    return ["export", "--model", f"hf:{d / 'm'}", "--out", d.parent / "out", "-q"], "more than 8 times the"


def _decoder_config(d: Path) -> Path:
    """A decoder's folder as far as mlopt reads it before any weight: its config."""
    (d / "llama").mkdir()
    (d / "llama" / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 300}))
    return d / "llama"


def case_hf_decoder_weights_cut_short(d):  # the builder failed deep inside (exit 1)
    folder = _decoder_config(d)
    header = json.dumps({"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(100))
    return ["export", "--model", f"hf:{folder}", "--out", d.parent / "out", "-q"], \
        "model.safetensors: it is cut short: its tensors end at byte"


def case_hf_config_vocab_size_zero(d):
    return _hf_folder(d, {"model_type": "bert", "vocab_size": 0}), "config.json: vocab_size is 0; a model needs at least 1"


def case_hf_unknown_model_type(d):
    return _hf_folder(d, {"model_type": "nosuchbert", "architectures": ["BertModel"]}), \
        "model_type 'nosuchbert' is not one transformers"


@pytest.mark.parametrize("option", [["--fuse", "on"], ["--opset", "21"], ["--exporter", "torchscript"],
                                    ["--parity-samples", "3"], ["--fuse-batch-size", "4"], ["--debug-metadata"]])
def test_export_settings_a_decoder_export_does_not_read_are_refused(option, tmp_path):
    """onnxruntime-genai's builder writes a decoder's graph: these settings would be dropped without a word."""
    args = ["export", "--model", f"hf:{_decoder_config(tmp_path)}", "--out", tmp_path / "out", *option, "-q"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and "does not apply to a decoder language model" in _one_error_line(result)
    assert not (tmp_path / "out").exists()


def case_data_option_without_data(d):  # it was dropped in silence
    return ["bench", _onnx(d / "m.onnx"), "--image-size", "8", "-q"], "--image-size applies to the data: give --data"


def case_text_with_a_nul_byte(d):  # onnxruntime-genai's tokenizer dropped everything after it
    (d / "t.txt").write_bytes(b"a fine line\nhalf a line\x00 and the rest\n")
    return ["export", "--model", "hf:nowhere", "--data", f"text:{d / 't.txt'}", "--out", d.parent / "out", "-q"], \
        "is not text: line 2 holds a NUL byte"


def case_text_not_utf8(d):
    (d / "t.txt").write_bytes(b"a fine line\n\xff\xfe binary\n")
    return ["export", "--model", "hf:nowhere", "--data", f"text:{d / 't.txt'}", "--out", d.parent / "out", "-q"], \
        "not UTF-8 text (invalid start byte on line 2)"


def _hf_folder(d: Path, config: str | dict, tokenizer: dict | None = None) -> list:
    folder = d / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if tokenizer is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    _evil_py(folder)
    (d / "t.txt").write_text("one line\nanother line\n")
    return ["export", "--model", f"hf:{folder}", "--data", f"text:{d / 't.txt'}", "--out", d.parent / "out", "-q"]


def case_hf_encoder_without_tokenizer_files(d):  # transformers built an empty tokenizer: every word [UNK]
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(d / "m")
    (d / "t.txt").write_text("one line\nanother line\n")
    args = ["ptq", "--model", f"hf:{d / 'm'}", "--data", f"text:{d / 't.txt'}", "--out", d.parent / "out", "-q"]
    return args, "has no tokenizer vocabulary (no tokenizer.json, vocab.txt or the like; only 5 special tokens)"


def case_hf_weights_that_do_not_fit_the_config(d):  # transformers pointed at a log the user did not see
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "one", "line", "another"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(d / "m")
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(d / "m")
    config = json.loads((d / "m" / "config.json").read_text())
    (d / "m" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 10**7}))
    (d / "t.txt").write_text("one line\nanother line\n")
    args = ["export", "--model", f"hf:{d / 'm'}", "--data", f"text:{d / 't.txt'}", "--out", d.parent / "out", "-q"]
    return args, ("its weights do not fit its config.json: embeddings.position_embeddings.weight is 32x16 in "
                  "model.safetensors, 10000000x16 by config.json")


def case_hf_remote_code(d):
    args = _hf_folder(d, {"model_type": "evilbert", "auto_map": {"AutoModel": "evil.make"}})
    return args, "names code shipped with the model (auto_map: evil.make)"


def case_hf_remote_code_in_tokenizer(d):
    args = _hf_folder(d, {"model_type": "bert"}, {"auto_map": {"AutoTokenizer": ["evil.make", None]}})
    return args, "tokenizer_config.json names code shipped with the model"


def case_hf_malformed_json(d):
    return _hf_folder(d, '{"model_type": '), "config.json is not valid JSON"


def case_hf_config_not_an_object(d):
    return _hf_folder(d, "[1, 2]"), "must hold a JSON object, not list"


def _model_folder(d: Path, meta: dict) -> list:
    import torch

    folder = d / "model"
    folder.mkdir()
    torch.save(torch.nn.Linear(64, 10).state_dict(), folder / "model.pt")
    (folder / "model.json").write_text(json.dumps({"mlopt_model_version": 1, "format": "torch", "sample_shape": [1, 8, 8],
                                                   "num_classes": 10, "lineage": ["train"], **meta}))
    return ["eval", "--model", folder, "--data", "digits", "-q"]


def case_model_folder_runs_its_file(d):
    spec = f"{_evil_py(d)}:make"
    return _model_folder(d, {"builder": {"spec": spec, "num_classes": 10}}), "was not written by mlopt for this user"


def case_model_folder_forged_signature(d):
    spec = f"{_evil_py(d)}:make"
    meta = {"builder": {"spec": spec, "num_classes": 10}, "builder_signature": "0" * 64}
    return _model_folder(d, meta), f"name it yourself: --model {spec} --weights"


def case_model_folder_runs_a_module(d):  # builtins:input would wait on stdin for ever
    return _model_folder(d, {"builder": {"spec": "builtins:input"}}), "rebuilds the model by running code (builtins:input)"


def case_model_json_corrupt(d):
    args = _model_folder(d, {})
    (d / "model" / "model.json").write_text('{"format": "torch", ')
    return args, "model.json is corrupt"


def case_model_json_absurd_shape(d):
    meta = {"builder": {"spec": "torchvision:resnet18"}, "sample_shape": [3, 100_000, 100_000]}
    return _model_folder(d, meta), "sample_shape holds 30,000,000,000 values"


def case_model_json_sets_a_method(d):  # the pruned shapes may set size attributes only
    meta = {"builder": {"spec": "torchvision:resnet18", "pruned": {"conv1": {"forward": 3}}}}
    return _model_folder(d, meta), "records forward=3 for 'conv1', which is not one of its size attributes"


def case_model_folder_weights_link_elsewhere(d):  # a model.pt that is a link to some other file of the user's
    args = _model_folder(d, {"builder": {"spec": "torchvision:resnet18"}})
    (d / "model" / "model.pt").unlink()
    (d / "model" / "model.pt").symlink_to("/etc/passwd")
    return args, "model.pt: not a valid PyTorch state dict"


def case_channels_differ_from_first_conv(d):
    args = ["train", "--model", "torchvision:resnet18", "--data", "digits", "--out", d.parent / "out", "-q"]
    return args, "its first convolution (conv1) takes 3 channels but the data has 1: give --channels 3"


def case_bench_for_ever(d):  # nan fails gt=0 by itself; infinity passed it and timed for ever
    return ["bench", _onnx(d / "m.onnx"), "--duration", "inf", "-q"], "duration_s: Input should be a finite number"


def case_bench_on_a_hundred_thousand_threads(d):
    return ["bench", _onnx(d / "m.onnx"), "--threads", "100000", "-q"], "threads: Input should be less than or equal"


def case_bench_at_an_absurd_batch_size(d):
    return ["bench", _onnx(d / "m.onnx"), "-b", str(10**12), "-q"], "batch_sizes.0: Input should be less than or equal"


def case_bench_without_an_input_rank(d):
    return ["bench", _onnx(d / "m.onnx", dims=None), "-q"], "does not say its input's shape (no rank): give --input-shape"


def case_onnx_named_in_another_encoding(d):
    path = _onnx(d / os.fsdecode(b"\xff.onnx"))
    return ["bench", path, "-q"], "the path is not valid UTF-8; rename it"


def case_ptq_at_batch_size_zero(d):
    args = ["ptq", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "-b", "0", "--out", d.parent / "out", "-q"]
    return args, "ptq.batch_sizes.0: Input should be greater than 0"


def case_qat_benching_at_batch_size_zero(d):  # refused before it trains (and leaves a checkpoint)
    args = ["qat", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--bench-batch-size", "0", "--out", d.parent / "out",
            "-q"]
    return args, "qat.batch_sizes.0: Input should be greater than 0"


def case_export_fusing_at_a_negative_batch_size(d):
    args = ["export", "--model", f"{TOY}:tiny_cnn", "--fuse-batch-size", "-3", "--out", d.parent / "out", "-q"]
    return args, "export.fuse_batch_sizes.0: Input should be greater than 0"


def case_train_at_an_infinite_rate(d):
    args = ["train", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--lr", "inf", "--out", d.parent / "out", "-q"]
    return args, "train.lr: Input should be a finite number"


def case_train_with_a_negative_seed(d):
    args = ["train", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--seed", "-1", "--out", d.parent / "out", "-q"]
    return args, "seed: Input should be greater than or equal to 0"


def case_recipe_with_a_seed_past_32_bits(d):
    text = "version: 1\nmodel: {spec: torchvision:resnet18}\ndata: {source: digits, seed: 4294967296}\nsteps: [{type: eval}]\n"
    return _recipe(text)(d), "data.seed: Input should be less than 4294967296"


def case_images_resized_past_the_limit(d):
    return ["eval", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--image-size", "100000", "-q"], "image_size"


def case_a_hundred_billion_classes(d):
    args = ["eval", "--model", "torchvision:resnet18", "--data", "digits", "--channels", "3", "--num-classes",
            str(10**11), "-q"]
    return args, "model.num_classes: Input should be less than or equal to 1000000"


def case_compare_with_a_nan_tolerance(d):  # every comparison with NaN is false: nothing would ever regress
    return ["report", "compare", d, d, "--accuracy-tolerance", "nan"], "--accuracy-tolerance must be a finite number"


def case_compare_with_a_negative_tolerance(d):
    return ["report", "compare", d, d, "--tolerance", "-1"], "--tolerance must be a finite number >= 0"


def case_junit_in_a_missing_folder(d):  # checked before the run, not after it
    (d / "r.yaml").write_text("version: 1\nmodel: {spec: torchvision:resnet18}\nsteps: [{type: eval}]\n")
    args = ["run", d / "r.yaml", "--out", d.parent / "out", "--junit", d / "nodir" / "j.xml", "-q"]
    return args, "nodir is not an existing folder"


def case_junit_under_a_file(d):
    (d / "r.yaml").write_text("version: 1\nmodel: {spec: torchvision:resnet18}\nsteps: [{type: eval}]\n")
    (d / "j.xml").write_text("mine")
    return ["run", d / "r.yaml", "--out", d.parent / "out", "--junit", d / "j.xml" / "x.xml", "-q"], "is not an existing folder"


def case_recipe_with_a_key_given_twice(d):  # YAML keeps the last: the first setting would be lost in silence
    text = "version: 1\nmodel: {spec: torchvision:resnet18}\nsteps:\n  - type: train\n    epochs: 5\n    epochs: 1\n"
    return _recipe(text)(d), "r.yaml:6: key 'epochs' is given twice in one mapping"


def case_recipe_with_an_unknown_data_source(d):  # told by recipe validate, not only by run
    text = "version: 1\nmodel: {spec: torchvision:resnet18}\ndata: {source: mnist}\nsteps: [{type: eval}]\n"
    return _recipe(text)(d), "unrecognised data 'mnist'"


def case_npz_without_samples(d):
    return _npz(d, x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64)), "x/y hold no samples"


def case_npz_with_a_label_past_the_class_limit(d):
    y = np.arange(4) * 10**12
    return _npz(d, x=np.zeros((4, 1, 8, 8), np.float32), y=y), "labels must be class indices 0..999999, found 3000000000000"


def case_npz_with_unsigned_labels_past_int64(d):
    y = np.arange(4, dtype=np.uint64) + np.uint64(2**63 + 5)
    return _npz(d, x=np.zeros((4, 1, 8, 8), np.float32), y=y), "labels must be class indices 0..999999"


def case_npz_of_complex_numbers(d):
    return _npz(d, x=np.zeros((4, 1, 8, 8), np.complex64), y=np.arange(4)), "x must be real numbers, got complex64"


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_in_one_line(case, tmp_path, monkeypatch):
    monkeypatch.setenv("MLOPT_KEY_FILE", str(tmp_path.parent / f"{tmp_path.name}.key"))
    monkeypatch.chdir(tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    args, expected = CASES[case](inputs)
    before = _tree(tmp_path)
    started = time.perf_counter()
    result = runner.invoke(app, [str(a) for a in args])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    assert expected in _one_error_line(result)
    assert _tree(tmp_path) == before  # no --out, no staging directory, no partial file, no marker
    assert elapsed < SECONDS


def test_npz_larger_than_memory_is_refused_before_loading(tmp_path, monkeypatch):
    from mlopt.runtime import data

    np.savez_compressed(tmp_path / "zeros.npz", x=np.zeros((1000, 1, 32, 32), np.float32), y=np.zeros(1000, np.int64))
    monkeypatch.setattr(data, "available_memory", lambda: 1_000_000)  # 4 MB of zeros in a 20 kB file
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("loaded"))
    result = runner.invoke(app, ["eval", "--model", f"{TOY}:tiny_cnn", "--data", f"npz:{tmp_path / 'zeros.npz'}", "-q"])
    assert result.exit_code == 2
    assert "its arrays need 4.1 MB once unpacked, more than the 1 MB of memory available" in _one_error_line(result)


def test_enormous_text_line_is_cut_before_tokenizing(tmp_path):
    from mlopt.runtime.data import CHARS_PER_TOKEN, DataConfig, load_data

    path = tmp_path / "t.txt"
    path.write_bytes(b"first line\n" + "é".encode() * 5_000_000 + b"\nlast line")
    started = time.perf_counter()
    data = load_data(DataConfig(source=f"text:{path}", max_length=16, val_fraction=0.4))
    assert time.perf_counter() - started < SECONDS
    lines = sorted(list(data.train) + list(data.val), key=len)
    assert lines == ["last line", "first line", "é" * (16 * CHARS_PER_TOKEN)]


# --- the disk fills up (or is read-only) while mlopt writes --------------------------------------

def _failing_writes(monkeypatch, names: tuple[str, ...], code: int) -> None:
    """Files with these names accept a few bytes, then fail as a full (or read-only...) disk does."""
    import builtins

    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and Path(str(file)).name in names:
            write = f.write

            def failing(data):
                write(data[:10])
                raise OSError(code, os.strerror(code))

            f.write = failing
        return f

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize(
    "args,code,written",
    [
        (["export", "--model", f"{TOY}:tiny_cnn", "--input-shape", "1x1x8x8"], errno.ENOSPC, "model.onnx"),
        (["export", "--model", f"{TOY}:tiny_cnn", "--input-shape", "1x1x8x8", "--exporter", "torchscript"],
         errno.EROFS, "model.onnx"),
        (["prune", "--model", f"{TOY}:tiny_cnn", "--input-shape", "1x1x8x8", "--ratio", "0.5", "--no-latency"],
         errno.EDQUOT, "model.pt"),
        (["prune", "--model", f"{TOY}:tiny_cnn", "--input-shape", "1x1x8x8", "--ratio", "0.5", "--no-latency"],
         errno.EACCES, "model.pt"),
    ],
    ids=["enospc-dynamo-onnx", "erofs-torchscript-onnx", "edquot-model-pt", "eacces-model-pt"],
)
def test_full_disk_names_the_file_and_leaves_nothing(args, code, written, tmp_path, monkeypatch):
    _failing_writes(monkeypatch, (written,), code)
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    reason = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
              errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied"}[code]
    assert line.endswith(f"{written}: {reason}") and "exporter" not in line
    assert list(tmp_path.iterdir()) == []  # no --out, no staging directory, no partial file


def test_full_disk_while_writing_the_report(tmp_path, monkeypatch):
    from mlopt.report import files as report

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "atomic_write_json", full)
    result = runner.invoke(app, ["export", "--model", f"{TOY}:tiny_cnn", "--input-shape", "1x1x8x8",
                                 "--exporter", "torchscript", "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2
    assert "no space left on the device" in _one_error_line(result)
    assert list(tmp_path.iterdir()) == []


# --- model folders: code runs only from folders mlopt wrote for this user -------------------------

def test_model_folder_written_by_mlopt_still_rebuilds_from_user_code(trained_dir, tmp_path, monkeypatch):
    result = runner.invoke(app, ["eval", "--model", str(trained_dir), "--data", "digits", "--json"])
    assert result.exit_code == 0, result.output
    meta = json.loads((trained_dir / "model.json").read_text())
    assert meta["builder"]["spec"].endswith("toy_models.py:tiny_cnn") and len(meta["builder_signature"]) == 64
    monkeypatch.setenv("MLOPT_KEY_FILE", str(tmp_path / "another-users.key"))  # the same folder, handed over
    result = runner.invoke(app, ["eval", "--model", str(trained_dir), "--data", "digits"])
    assert result.exit_code == 2 and "was not written by mlopt for this user" in _one_error_line(result)


def test_model_folder_with_an_edited_spec_is_refused(trained_dir, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(trained_dir, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["builder"]["spec"] = f"{_evil_py(tmp_path)}:make"  # keeps mlopt's signature of the old spec
    (folder / "model.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["eval", "--model", str(folder), "--data", "digits"])
    assert result.exit_code == 2 and "was not written by mlopt for this user" in _one_error_line(result)
    assert not (tmp_path.parent / MARKER).exists()


# --- the data's channels differ from the model's first convolution --------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(
    "spec,expected",
    [
        ("torchvision:mobilenet_v2", "its first convolution (features.0.0) takes 3 channels but the data has 1: "
         "give --channels 3 (in a recipe, data.channels: 3), which repeats the grey channel; "
         "mobilenet_v2 was built for 224x224 images (--image-size 224)"),
        ("torchvision:efficientnet_b3", "efficientnet_b3 was built for 300x300 images (--image-size 300)"),
        ("torchvision:vit_b_16", "its first convolution (conv_proj) takes 3 channels but the data has 1: give "
         "--channels 3 (in a recipe, data.channels: 3), which repeats the grey channel; vit_b_16 was built for "
         "224x224 images (--image-size 224)"),  # it checks the size first: the conv it declares first decides
        ("torchvision:vit_b_16 --channels 3", "the model rejects input of shape 1x3x8x8: Wrong image height! "
         "Expected 224 but got 8!; vit_b_16 was built for 224x224 images (--image-size 224)"),
        (f"{TOY}:tiny_cnn_rgb", "its first convolution (features.0) takes 3 channels but the data has 1: give --channels 3"),
    ],
)
def test_channel_mismatch_names_the_fix(spec, expected, tmp_path):
    spec, *extra = spec.split()
    result = runner.invoke(app, ["eval", "--model", spec, "--data", "digits", "--num-classes", "10", "-q", *extra])
    assert result.exit_code == 2
    assert expected in _one_error_line(result)


def test_channel_hint_leaves_other_models_alone():
    import torch

    from mlopt.core.errors import InputError
    from mlopt.runtime.models import probe_output

    with pytest.raises(InputError) as linear:  # no convolution: what the model said, nothing more
        probe_output(torch.nn.Linear(64, 10), (1, 8, 8))
    assert "mat1 and mat2 shapes cannot be multiplied" in str(linear.value) and "convolution" not in str(linear.value)
    grey_first = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(InputError) as later:  # the data reached the first convolution fine: a later one failed
        probe_output(grey_first, (1, 8, 8))
    assert "first convolution" not in str(later.value)
    assert probe_output(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)),
                        (3, 8, 8)) == 5
