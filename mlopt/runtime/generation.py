"""Measuring decoder language models: perplexity, greedy continuations, generation speed and memory.

Perplexity is teacher-forced over fixed, non-overlapping windows of the token stream: every window
starts with an empty KV cache, and its first token is context only, so a window of W tokens scores
W - 1 predictions. The ONNX graph (onnxruntime-genai's ``model.onnx``) runs in a plain onnxruntime
session with an empty past; a transformers model runs the same windows, so the two are comparable
before and after export. Log-softmax is taken in float64.

Generation runs on onnxruntime-genai (greedy; end-of-sequence is suppressed with ``min_length`` so
every run produces exactly the tokens asked for, and models compare over the same length). Timing
loads every model once and runs them in interleaved rounds (A B C A B C ...) so that a slow spell of
a shared machine hits all of them alike. Intra-op thread spinning is off in every session mlopt
opens through onnxruntime-genai: with several models loaded, the spinning threads of the idle ones
took the cores of the one being timed (SmolLM2-135M in float32, two loaded, two cores: decode 29
tokens/s with spinning, 49 without). The user's genai_config.json is never edited: settings go through ``og.Config.overlay``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from mlopt.core import console
from mlopt.core.errors import InputError, RunError, first_line
from mlopt.runtime.decoder import GENAI_CONFIG, genai, onnx_name

# What a decoder is scored and timed on unless told otherwise (ptq's options and the recipe gates alike): perplexity
# on windows of WINDOW tokens (at most MAX_WINDOWS), decode timed over NEW_TOKENS in ROUNDS interleaved rounds.
WINDOW, MAX_WINDOWS, NEW_TOKENS, ROUNDS = 128, 40, 64, 3
# Rows of logits turned into float64 at once when scoring.
_ROWS = 16
# The timed parts of one generation, in seconds.
_PARTS = ("prefill", "ttft", "decode")


def _genai_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / GENAI_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable onnxruntime-genai config: {first_line(exc)}") from None


def context_length(folder: str | Path) -> int | None:
    """The longest sequence the folder's model takes (genai_config's context_length); None where it names none."""
    context = _genai_config(folder).get("model", {}).get("context_length")
    return context if isinstance(context, int) and context > 0 else None


def sliding_window(config: dict[str, Any]) -> int:
    """The sliding attention window a genai_config.json declares (0: none)."""
    return int((config.get("model", {}).get("decoder", {}).get("sliding_window") or {}).get("window_size") or 0)


def load_model(folder: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime-genai model of the folder, intra-op spinning off and `threads` intra-op threads."""
    og = genai()
    options: dict[str, Any] = {"session.intra_op.allow_spinning": "0"}
    if threads:
        options["intra_op_num_threads"] = threads
    try:
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        model = og.Model(config)
    except Exception as exc:
        raise InputError(f"onnxruntime-genai cannot load {folder}: {first_line(exc)}") from exc
    _WINDOWS[id(model)] = sliding_window(_genai_config(folder))
    return model


#: id(og.Model) -> its sliding attention window (0: none). onnxruntime-genai sizes the KV cache by the
#: generator's max_length and refuses one smaller than the window ("KV cache capacity (9) must be at least
#: local_window_size (64)" on a Gemma 2), so a short generation asks for the window's capacity and
#: stops after its tokens itself. og.Model takes no attributes of ours, hence this table.
_WINDOWS: dict[int, int] = {}


def token_ids(folder: str | Path, lines: Sequence[str], model: Any = None) -> list[int]:
    """The folder's tokenizer (onnxruntime-genai's) on the lines joined with newlines."""
    og = genai()
    model = model if model is not None else load_model(folder)
    text = "\n".join(lines)
    try:
        ids = [int(t) for t in og.Tokenizer(model).encode(text)]
    except Exception as exc:  # no tokenizer.json, or one onnxruntime-genai cannot read
        raise InputError(f"onnxruntime-genai cannot load or run the tokenizer in {folder}: {first_line(exc)}") from exc
    vocab = _genai_config(folder).get("model", {}).get("vocab_size")
    bad = [t for t in ids if t < 0 or (isinstance(vocab, int) and t >= vocab)]
    if bad:  # an empty vocabulary gives -1 for every token, and the graph gathered the last row for it
        raise InputError(f"the tokenizer in {folder} gives token ids outside the model's vocabulary (such as "
                         f"{bad[0]}, {len(bad):,} of {len(ids):,} tokens): its vocabulary is empty or not the model's")
    return ids


# ---------------------------------------------------------------------------------------- perplexity


def _windows(ids: Sequence[int], window: int, max_windows: int | None, bos: int | None = None) -> list[list[int]]:
    """Fixed windows of `window` tokens; with `bos`, each is the BOS token and window - 1 tokens of text."""
    if window < 2:
        raise InputError(f"a perplexity window needs at least 2 tokens, not {window}")
    text = window - 1 if bos is not None else window
    count = len(ids) // text
    if count == 0:
        raise InputError(f"the text has {len(ids)} tokens; one perplexity window needs {text} "
                         "(give more text or a smaller window)")
    if max_windows is not None:
        count = min(count, max_windows)
    head = [bos] if bos is not None else []
    return [head + list(ids[i * text:(i + 1) * text]) for i in range(count)]


def bos_token(folder: str | Path) -> int | None:
    """The BOS token id when the model's tokenizer starts every text with it (Gemma), else None.

    A model trained that way scores text without it as garbage (Gemma 3 270M: perplexity 250 without,
    37 with, on the same windows), so each perplexity window then starts with it. transformers' tokenizer
    of the folder says whether it adds one; onnxruntime-genai's encode does not add it."""
    from mlopt.runtime.hf import _transformers

    try:
        tok = _transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception:  # no tokenizer transformers reads: onnxruntime-genai's own encoding stands
        return None
    bos = getattr(tok, "bos_token_id", None)
    return bos if bos is not None and tok("a")["input_ids"][:1] == [bos] else None


def _scored(logits_of: Callable[[list[int]], Any], ids: Sequence[int], window: int,
            max_windows: int | None, label: str, bos: int | None = None) -> dict[str, Any]:
    """Mean next-token negative log-likelihood over the windows; logits_of gives a window's [seq, vocab] logits."""
    import numpy as np

    windows = _windows([t for t in ids if t != bos] if bos is not None else ids, window, max_windows, bos)
    total, scored, per_window = 0.0, 0, []
    with console.progress(f"perplexity {label}", total=len(windows)) as bar:
        for chunk in windows:
            logits, targets = logits_of(chunk)[:-1], np.asarray(chunk[1:])  # the last predicts past the window
            window_total = 0.0
            # float64 a few rows at a time: a 262k-token vocabulary makes a whole window's copy large.
            for row in range(0, len(targets), _ROWS):
                block = np.asarray(logits[row:row + _ROWS], dtype=np.float64)
                peak = block.max(axis=-1, keepdims=True)
                log_norm = peak[:, 0] + np.log(np.exp(block - peak).sum(axis=-1))
                window_total += float((log_norm - block[np.arange(len(block)), targets[row:row + _ROWS]]).sum())
            total += window_total
            scored += len(targets)
            per_window.append(window_total / max(len(targets), 1))
            bar.advance(1)
    nll = total / scored
    return {"perplexity": math.exp(nll), "nll": nll, "windows": len(windows), "window": window, "tokens": scored,
            "window_nll": per_window}


def ppl_change_interval(window_nll: Sequence[float], base_window_nll: Sequence[float]) -> tuple[float, float]:
    """A 95% interval of the relative perplexity change of a model against a base scored on the same windows
    (paired: the mean per-window NLL difference, +-1.96 standard errors, as exp(.) - 1). Two quantized models
    whose intervals overlap are not told apart by these windows. A normal approximation that treats windows as
    independent: with few windows (under about 30) or neighbouring windows that share a topic it is too narrow."""
    import numpy as np

    diff = np.asarray(window_nll, dtype=np.float64) - np.asarray(base_window_nll, dtype=np.float64)
    if diff.size < 2:
        raise InputError("a perplexity interval needs two windows or more")
    half = 1.96 * diff.std(ddof=1) / math.sqrt(diff.size)
    return math.exp(diff.mean() - half) - 1, math.exp(diff.mean() + half) - 1


def _past_shape(name: str, shape: Sequence[Any], config: dict[str, Any]) -> tuple[int, int]:
    """(kv_heads, head_dim) of a past_key_values input: its shape where fixed, else genai_config's."""
    decoder = config.get("model", {}).get("decoder", {})
    heads, dim = shape[1], shape[3]
    heads = heads if isinstance(heads, int) and heads > 0 else decoder.get("num_key_value_heads")
    dim = dim if isinstance(dim, int) and dim > 0 else decoder.get("head_size")
    if not (isinstance(heads, int) and isinstance(dim, int)):
        raise InputError(f"cannot tell the KV-cache shape of {name} (shape {list(shape)}; "
                         f"genai_config.json gives no num_key_value_heads/head_size)")
    return heads, dim


def _every_position_session(graph: Path, threads: int | None) -> Any:
    """An onnxruntime session on a genai folder's graph whose logits cover every position: a graph whose LM head
    runs on the last token only (mlopt's export) is widened back in memory; the folder is never written."""
    import onnx

    from mlopt.runtime.decoder import all_positions
    from mlopt.runtime.session import make_session

    model = onnx.load(str(graph), load_external_data=False)
    if not all_positions(model):
        return make_session(graph, "cpu", threads)
    return make_session(model.SerializeToString(), "cpu", threads, weights_dir=graph.parent)


def fresh_state(name: str, shape: Sequence[Any]) -> tuple[int, ...] | None:
    """The shape of a recurrent state input other than the KV cache (``past.N.conv``) for one sequence, where its
    dimensions past the batch are fixed; None where they are not (nothing mlopt knows how to feed)."""
    rest = list(shape)[1:]
    return (1, *rest) if name.startswith("past.") and rest and all(isinstance(d, int) and d > 0 for d in rest) else None


def window_feed(specs: Sequence[tuple[str, Sequence[Any], Any]],
                config: dict[str, Any]) -> Callable[[list[int]], dict[str, Any]]:
    """A function from one window of ids to the feed that runs it from an empty state, for a decoder graph whose
    inputs are `specs` (name, shape, numpy dtype: `session.input_specs`, `session.value_info_specs`) and whose
    genai_config.json is `config`. Scoring (perplexity, parity) and calibration (smoothing, gptq) share it."""
    import numpy as np

    dtypes = {name: dtype for name, _, dtype in specs}
    pasts = {name: _past_shape(name, shape, config) for name, shape, _ in specs if name.startswith("past_key_values")}
    # Other recurrent state of a fresh window (LFM2's convolution states, [batch, hidden, kernel - 1]): zeros.
    states = {name: state for name, shape, _ in specs
              if name.startswith("past.") and (state := fresh_state(name, shape)) is not None}
    # Sliding-window attention wants a KV buffer at least as long as its window, even when the past is empty
    # (the attention mask says how much of it is real: none).
    sliding = sliding_window(config)

    def feed_of(chunk: list[int]) -> dict[str, Any]:
        n = len(chunk)
        capacity = max(sliding, n) if sliding else 0
        feed = {"input_ids": np.asarray([chunk], np.int64), "attention_mask": np.ones((1, n), np.int64),
                **{name: np.zeros((1, heads, capacity, dim)) for name, (heads, dim) in pasts.items()},
                **{name: np.zeros(shape) for name, shape in states.items()}}
        if "position_ids" in dtypes:
            feed["position_ids"] = np.arange(n, dtype=np.int64)[None]
        return {k: v.astype(dtypes[k], copy=False) for k, v in feed.items() if k in dtypes}

    return feed_of


def window_logits(folder: Path, threads: int | None = None) -> Callable[[list[int]], Any]:
    """A function from one window of ids to its logits, on a plain onnxruntime session of model.onnx."""
    from mlopt.runtime.session import input_specs

    graph = folder / onnx_name(folder)
    session = _every_position_session(graph, threads)
    inputs, outputs = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
    if "input_ids" not in inputs or "logits" not in outputs:
        raise InputError(f"{graph} is not a decoder language model's graph: a decoder takes input_ids and gives "
                         f"logits; it takes {', '.join(sorted(inputs))} and gives {', '.join(sorted(outputs))}")
    feed_of = window_feed(input_specs(session), _genai_config(folder))

    def logits_of(chunk: list[int]) -> Any:
        try:
            return session.run(["logits"], feed_of(chunk))[0][0]
        except Exception as exc:
            raise RunError(f"onnxruntime failed on {graph}: {first_line(exc)}") from exc

    return logits_of


def perplexity(folder: str | Path, ids: Sequence[int], window: int = 128, max_windows: int | None = None,
               threads: int | None = None, bos: int | None | Literal["auto"] = "auto") -> dict[str, Any]:
    """Perplexity of an onnxruntime-genai folder's model.onnx on the ids (see the module docstring). `bos`: the
    BOS token each window starts with (None: none); "auto" reads it from the folder (see bos_token), which
    callers scoring many variants of one model do once instead."""
    folder = Path(folder)
    context = context_length(folder)
    if context and window > context:
        raise InputError(f"a perplexity window of {window} tokens is longer than {folder.name}'s context ({context})")
    bos = bos_token(folder) if bos == "auto" else bos
    return _scored(window_logits(folder, threads), ids, window, max_windows, folder.name, bos)


def perplexity_torch(model: Any, ids: Sequence[int], window: int = 128, max_windows: int | None = None,
                     bos: int | None = None) -> dict[str, Any]:
    """The same perplexity for a transformers causal LM in torch (before export)."""
    config = getattr(model, "config", None)
    context = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                      "max_position_embeddings", None)
    if isinstance(context, int) and 0 < context < window:  # as for an exported folder (perplexity)
        raise InputError(f"a perplexity window of {window} tokens is longer than the model's context ({context})")
    return _scored(torch_logits(model), ids, window, max_windows, type(model).__name__, bos)


def torch_logits(model: Any) -> Callable[[list[int]], Any]:
    """A function from one window of ids to a transformers causal LM's float32 logits (numpy, [tokens, vocab])."""
    import torch

    model.eval()

    def logits_of(chunk: list[int]) -> Any:
        with torch.no_grad():
            return model(input_ids=torch.tensor([chunk])).logits[0].float().numpy()

    return logits_of


def load_causal_lm(spec: str) -> tuple[Any, Any]:
    """The transformers causal LM and tokenizer of an ``hf:DIR`` spec, in float32 on the CPU."""
    from mlopt.runtime.hf import _transformers, model_dir, tokenizer

    path = model_dir(spec)
    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                                  trust_remote_code=False, dtype="float32")
    except Exception as exc:
        raise InputError(f"cannot load the causal language model in {path}: {first_line(exc)}") from exc
    return model.eval(), tokenizer(spec)


def artifact_perplexity(artifact: Any, lines: Sequence[str], window: int) -> dict[str, Any]:
    """Perplexity of a decoder artifact (format genai or causal-lm) on the text lines."""
    if artifact.format == "genai":
        folder = artifact.folder
        return perplexity(folder, token_ids(folder, lines), window)
    if artifact.format == "causal-lm":
        model, tok = load_causal_lm(artifact.builder["spec"])
        ids = tok("\n".join(lines), add_special_tokens=False)["input_ids"]
        return perplexity_torch(model, ids, window, bos=bos_token(artifact.builder["spec"][len("hf:"):]))
    raise InputError(f"perplexity needs a decoder language model; {artifact.origin} is {artifact.format}")


# ---------------------------------------------------------------------------------------- generation


def _generator(model: Any, prompt_ids: Sequence[int], new_tokens: int) -> Any:
    """A greedy generator that will produce exactly new_tokens tokens after the prompt."""
    og = genai()
    if new_tokens < 1 or not prompt_ids:
        raise InputError(f"generation needs a prompt and at least 1 new token (prompt {len(prompt_ids)}, new {new_tokens})")
    length = len(prompt_ids) + new_tokens
    params = og.GeneratorParams(model)
    try:
        params.set_search_options(max_length=max(length, _WINDOWS.get(id(model), 0)), min_length=length,
                                  do_sample=False)
        return og.Generator(model, params)
    except Exception as exc:
        raise InputError(f"cannot generate {new_tokens} tokens after a {len(prompt_ids)}-token prompt: "
                         f"{first_line(exc)}") from exc


def _prompt(prompt_ids: Sequence[int]) -> Any:
    import numpy as np

    return np.asarray(prompt_ids, dtype=np.int32)


def greedy(folder: str | Path, prompt_ids: Sequence[int], new_tokens: int, model: Any = None) -> list[int]:
    """The greedy continuation (new_tokens tokens, end-of-sequence suppressed) of the prompt."""
    generator = _generator(model if model is not None else load_model(folder), prompt_ids, new_tokens)
    generator.append_tokens(_prompt(prompt_ids))
    for _ in range(new_tokens):
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt_ids):]]


def agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """Strict agreement: the share of the reference's tokens before the first position where other differs.

    Once two greedy continuations diverge, each goes on from a different context, so later matches say
    little; this is the measure to gate on. position_agreement gives the lenient one.
    """
    if not reference:
        return 1.0
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / len(reference)


def position_agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """Lenient agreement: the share of the reference's positions where other has the same token."""
    if not reference:
        return 1.0
    return sum(a == b for a, b in zip(reference, other)) / len(reference)


def _timed(model: Any, prompt_ids: Sequence[int], new_tokens: int) -> dict[str, float]:
    """Seconds for one generation: prefill (append_tokens), ttft (prefill and the first token) and
    decode (the remaining new_tokens - 1 tokens, one model run each)."""
    generator = _generator(model, prompt_ids, new_tokens)
    prompt = _prompt(prompt_ids)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    prefilled = time.perf_counter()
    generator.generate_next_token()
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        generator.generate_next_token()
    return {"prefill": prefilled - start, "ttft": first - start, "decode": time.perf_counter() - first}


def _summary(label: str, runs: list[dict[str, float]], prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    import numpy as np

    median = {part: float(np.median([r[part] for r in runs])) for part in _PARTS}
    p50, p90 = (float(v) * 1000 for v in np.percentile([r["ttft"] for r in runs], (50, 90)))
    total = [(r["ttft"] + r["decode"]) * 1000 for r in runs]  # the whole generation
    latency = dict(zip(("p50", "p90", "p99"), (float(v) for v in np.percentile(total, (50, 90, 99)))))
    return {"model": label, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "ttft_ms": {"p50": p50, "p90": p90},
            "decode_tokens_per_s": (new_tokens - 1) / median["decode"],
            "prompt_tokens_per_s": prompt_tokens / median["prefill"],
            "latency_ms": {"mean": float(np.mean(total)), **latency},
            "throughput_per_s": new_tokens * 1000 / float(np.mean(total)), "rounds": len(runs)}


def time_generation(folders: Sequence[str | Path], prompt_ids: Sequence[int], new_tokens: int, rounds: int = 5,
                    threads: int | None = None, models: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """Time to first token (p50, p90 ms), decode and prompt tokens/s of each folder, in one list; also the
    whole generation's latency (ms: mean, p50, p90, p99) and its new tokens per second (throughput_per_s).

    Every model is loaded once (or given in `models`), warmed up once, then the models take turns
    for `rounds` rounds; the rates are those of each model's median round.
    """
    if rounds < 1 or new_tokens < 2:
        raise InputError(f"timing needs at least 1 round and 2 new tokens (the first token ends the prefill), "
                         f"not {rounds} and {new_tokens}")
    loaded = list(models) if models is not None else [load_model(f, threads) for f in folders]
    for model in loaded:
        _timed(model, prompt_ids, min(new_tokens, 2))
    runs: list[list[dict[str, float]]] = [[] for _ in loaded]
    with console.progress(f"generate {len(prompt_ids)}+{new_tokens} tokens", total=rounds * len(loaded)) as bar:
        for _ in range(rounds):
            for i, model in enumerate(loaded):
                runs[i].append(_timed(model, prompt_ids, new_tokens))
                bar.advance(1)
    return [_summary(str(f), r, len(prompt_ids), new_tokens) for f, r in zip(folders, runs)]


def prompts_from(ids: Sequence[int], count: int, length: int, bos: int | None = None) -> list[list[int]]:
    """`count` prompts of `length` tokens spread over the ids, each after the BOS token when the model's
    tokenizer starts every text with one (bos_token): greedy-agreement prompts."""
    step = max(1, (len(ids) - length) // count)
    head = [bos] if bos is not None else []
    return [head + list(ids[i * step:i * step + length]) for i in range(count)]


def prompt_of(ids: list[int], size: int, real_text: bool = True) -> list[int]:
    """A `size`-token prompt cut from the ids, which are repeated when shorter (said when they are real text)."""
    if len(ids) < size and real_text:
        console.warn(f"the text has {len(ids)} tokens; the {size}-token prompt repeats it")
    return (ids * (size // max(len(ids), 1) + 1))[:size]


def _child_peak_rss(folder: str, prompt_ids: list[int], new_tokens: int, threads: int | None) -> float:
    """Run in a fresh interpreter by peak_rss_mb: load, generate, and report this process's peak RSS (MB)."""
    import resource

    greedy(folder, prompt_ids, new_tokens, load_model(folder, threads))
    status = Path("/proc/self/status")
    if status.is_file():  # Linux: VmHWM is this program's own peak; ru_maxrss keeps the parent's across exec
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, kilobytes elsewhere
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


_CHILD = ("import json, sys\n"
          "from mlopt.runtime.generation import _child_peak_rss\n"
          "print(json.dumps(_child_peak_rss(**json.load(sys.stdin))))\n")


def peak_rss_mb(folder: str | Path, prompt_ids: Sequence[int], new_tokens: int, threads: int | None = None) -> float:
    """Peak resident memory (MB) of a fresh Python process that loads the folder and generates new_tokens
    after the prompt: the model's memory plus the interpreter's and onnxruntime's own (about 100 MB)."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    request = {"folder": str(folder), "prompt_ids": [int(t) for t in prompt_ids], "new_tokens": new_tokens,
               "threads": threads}
    proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(request), capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RunError(f"measuring the peak memory of {folder} failed: {lines[-1] if lines else proc.returncode}")
    return float(proc.stdout.strip().splitlines()[-1])
