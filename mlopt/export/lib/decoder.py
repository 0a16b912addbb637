"""A decoder (an HF ``*ForCausalLM`` folder) -> an onnxruntime-genai folder, checked before it is handed on.

onnxruntime-genai's model builder writes the graph (KV cache, GroupQueryAttention, rotary
embeddings) for the architectures it knows; mlopt never writes a second exporter. What mlopt adds:
the architecture is checked before anything runs (one line with the supported list instead of a
traceback), the builder runs offline in a child process (its crashes and its output stay there),
and the folder it writes must load and generate with onnxruntime-genai before export succeeds:
the builder has exited 0 on models that then failed to load, and the logits of the graph it writes must
match transformers' on one passage (`check_parity`): it has written graphs that load, generate and compute
something else (OLMo's non-parametric LayerNorm as an RMSNorm).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlopt.core import console
from mlopt.core.errors import InputError, ParityError, RunError, first_line
from mlopt.runtime import decoder

#: the builder's "precision" for an exported model that later steps quantize themselves.
FP32 = "fp32"
CHECK_TOKENS = 8  # tokens generated from a prompt to prove the written folder runs
PARITY_TOKENS = 64  # the longest passage whose logits are compared with transformers'
#: the passage compared (any tokenizer encodes English; the ids, not their meaning, are what is checked)
PARITY_TEXT = ("The module provides a portable way of using operating system dependent functionality. If you just "
               "want to read or write a file, see open(); if you want to manipulate paths, see the path module; and "
               "if you want to read all the lines in all the files on the command line, see the fileinput module.")


def check_architecture(config: dict[str, Any], origin: str) -> str:
    """The model's architecture, or a one-line refusal naming the ones the builder exports."""
    arch = str((config.get("architectures") or ["(none)"])[0])
    supported = decoder.supported_architectures()
    if not supported:
        raise InputError('decoder export needs onnxruntime-genai\'s model builder: pip install "mlopt[llm]"')
    if arch not in supported:
        names = ", ".join(a for a in supported if a.endswith(decoder.CAUSAL_SUFFIXES))
        raise InputError(f"{origin}: {arch} is not an architecture onnxruntime-genai's model builder exports; "
                         f"it exports: {names}")
    return arch


def build(src: Path, out: Path, precision: str = FP32, provider: str = "cpu",
          options: dict[str, str] | None = None) -> None:
    """Run the model builder on the HF folder `src`, writing the genai folder `out`; `options`: its extra options.

    A child process: the builder prints progress on stdout, may call sys.exit, and loads native
    libraries in an order that must not leak into mlopt's process (onnxruntime_genai before
    onnxruntime aborts). HF_HUB_OFFLINE keeps it from the network, like every mlopt load.
    """
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with tempfile.TemporaryDirectory(prefix="mlopt-builder-") as cache:
        cmd = [sys.executable, "-c", _BUILDER, "-i", str(src), "-o", str(out), "-p", precision, "-e", provider,
               "-c", cache, *(["--extra_options", *(f"{k}={v}" for k, v in options.items())] if options else [])]
        started = time.time()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace")
    if proc.returncode != 0:
        raise RunError(f"onnxruntime-genai's model builder failed on {src}: {_last_error(proc.stdout)}")
    console.info(f"onnxruntime-genai's model builder wrote {out} ({precision}, {time.time() - started:.0f} s)")


#: The builder's command line, run with one fix: transformers 5 nests the rotary settings of models with
#: sliding and full attention layers per layer type (Gemma 3: rope_parameters = {"full_attention": {...},
#: "sliding_attention": {...}}), and the builder's base class reads rope_parameters["rope_type"] (KeyError).
#: The config is flattened as it loads: the full-attention settings at the top, the sliding layers' theta
#: as rope_local_base_freq, where the builder's Gemma 3 reads it.
_BUILDER = """
import runpy, sys
import transformers

_load = transformers.AutoConfig.from_pretrained.__func__

def _flat(config):
    for c in (config, getattr(config, "text_config", None)):
        rope = getattr(c, "rope_parameters", None)
        if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):
            full = rope.get("full_attention") or next(iter(rope.values()))
            if "sliding_attention" in rope and getattr(c, "rope_local_base_freq", None) is None:
                c.rope_local_base_freq = rope["sliding_attention"].get("rope_theta")
            c.rope_parameters = dict(full)
    return config

transformers.AutoConfig.from_pretrained = classmethod(lambda cls, *a, **k: _flat(_load(cls, *a, **k)))
sys.argv[0] = "builder"
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""


def _last_error(output: str) -> str:
    """The line of a builder failure that says what went wrong (the last non-empty one, shortened)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return ((errors or lines or ["no output"])[-1])[:300]


def check_generates(folder: Path, prompt: str = "The") -> list[int]:
    """Load the folder with onnxruntime-genai and generate a few tokens greedily; a failure is a RunError.

    Returns the generated token ids (the caller may compare them with another model's)."""
    from mlopt.runtime import generation

    try:
        model = generation.load_model(folder)
        ids = generation.token_ids(folder, [prompt], model) or [0]
        return generation.greedy(folder, ids, CHECK_TOKENS, model)
    except Exception as exc:  # onnxruntime-genai raises RuntimeError from its kernels
        raise RunError(f"the decoder written to {folder} does not run in onnxruntime-genai: {first_line(exc)}") from exc


def check_parity(src: Path, out: Path, atol: float, rtol: float) -> dict[str, Any]:
    """The exported graph's logits at every position of PARITY_TEXT (BOS first where the tokenizer adds one, cut to
    the model's context) against transformers' float32 model on the same ids: a ParityError where any differs by
    more than atol + rtol * max |transformers' logit|, as the encoder export checks. Skipped, with the reason in
    "skipped", where the memory available would not hold one model's weights with room to run (transformers'
    copy, then onnxruntime's), where transformers cannot load the model class (a vision-language folder), or
    where the graph wants state inputs beside its KV cache that a plain session is not fed (convolution states)."""
    from mlopt.core.fsutil import file_size_mb
    from mlopt.export.lib.parity import within_tolerance
    from mlopt.runtime import generation
    from mlopt.core.memory import available_memory, readable_size

    needed, available = int(1.5 * file_size_mb(out / decoder.onnx_name(out)) * 1e6), available_memory()
    if available is not None and needed > available:
        return {"skipped": f"it needs about {readable_size(needed)} of memory, {readable_size(available)} is available"}
    try:
        model, tokenizer = generation.load_causal_lm(f"hf:{src}")
    except InputError as exc:
        return {"skipped": f"transformers does not load this model as a causal LM ({first_line(exc)[:160]})"}
    bos = generation.bos_token(out)
    ids = ([] if bos is None else [bos]) + tokenizer(PARITY_TEXT, add_special_tokens=False)["input_ids"][:PARITY_TOKENS]
    context = generation.context_length(out)
    ids = ids[:context] if context else ids
    ref = generation.torch_logits(model)(ids)
    del model
    try:
        got = generation.window_logits(out)(ids)
    except (RunError, InputError) as exc:
        return {"skipped": f"onnxruntime does not run the graph on its own ({first_line(exc)[:160]})"}
    if got.shape != ref.shape:
        raise ParityError(f"the exported decoder's logits have shape {got.shape}, transformers' {ref.shape}")
    error, largest = float(abs(got - ref).max()), float(abs(ref).max())
    agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    tolerance = within_tolerance("the decoder onnxruntime-genai's model builder wrote computes other logits than "
                                 "transformers", error, largest, atol, rtol, agreement,
                                 f" over {len(ids)} tokens (--atol/--rtol relax the check)")
    return {"max_abs_error": error, "max_abs_output": largest, "tolerance": tolerance, "top1_agreement": agreement,
            "parity_tokens": len(ids)}


def export_decoder(artifact: Any, out: Path, options: Any = None) -> Any:
    """The export step on a causal-lm artifact: build the genai folder into `out`, check that it generates and
    that its logits match transformers' (`check_parity`, with the tolerances of `options`, an ExportOptions)."""
    from mlopt.export.lib.onnx import ExportOptions

    options = options or ExportOptions()
    from mlopt.core.contracts import StepResult
    from mlopt.runtime import hf

    spec = artifact.builder["spec"]
    src = hf.model_dir(spec)
    arch = check_architecture(hf.check_folder(spec), artifact.origin)
    last_only = _build_last_token(src, out)
    tokens = check_generates(out)
    parity = check_parity(src, out, options.atol, options.rtol)
    exported = artifact.derive("export", format="genai", onnx_path=out / "model.onnx")
    size = exported.size_mb()
    console.info(f"{arch} exported to an onnxruntime-genai folder ({size:.1f} MB); it loads and generates")
    notes = [f"onnxruntime-genai's model builder wrote the graph; onnxruntime-genai loaded it and "
             f"generated {len(tokens)} tokens greedily before the step succeeded"]
    if "skipped" in parity:
        notes.append(f"parity with transformers not checked: {parity['skipped']}")
        console.warn(notes[-1])
    else:
        notes.append(f"parity checked on the logits of {parity['parity_tokens']} tokens: max abs error "
                     f"{parity['max_abs_error']:.3g} (tolerance {parity['tolerance']:.3g}), top-1 agreement "
                     f"{parity['top1_agreement']:.3f}")
        console.info(f"parity: {notes[-1].removeprefix('parity checked on ')}")
    if last_only:
        notes.append("the LM head runs on the last prompt token only (the builder's prune_lm_head): the first token "
                     "comes sooner, generation is unchanged, and perplexity is scored on every position as before")
    return StepResult(artifact=exported, metrics={"architecture": arch, "precision": FP32, "size_mb": round(size, 3),
                                                  "check_tokens": len(tokens), "last_token_logits": last_only,
                                                  **{k: v for k, v in parity.items() if k != "skipped"}},
                      notes=notes)


def _build_last_token(src: Path, out: Path) -> bool:
    """Build with the LM head on the last prompt token only where the builder can and mlopt can widen the graph
    back for perplexity; else build the builder's default graph. Returns whether the head runs on the last only."""
    import onnx

    try:
        build(src, out, FP32, options={decoder.PRUNE_LM_HEAD: "true"})
        model = onnx.load(str(out / decoder.onnx_name(out)), load_external_data=False)
        if not decoder.last_token_only(model):
            return False
        decoder.all_positions(model)
        return True
    except (RunError, InputError) as exc:  # an architecture the option does not combine with (Qwen3.5 with MTP)
        if isinstance(exc, RunError) and "prune" not in str(exc).lower():
            raise
        console.warn(f"building the LM head for the last token only failed ({first_line(exc)}); building every token's")
    build(src, out, FP32)
    return False
