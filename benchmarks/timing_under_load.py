"""ONNX models timed on an idle machine and beside a CPU-bound process, with onnxruntime's intra-op threads
spinning (its default) and not (mlopt's): how much load moves each model's latency, and whether it changes
their order.

    python benchmarks/timing_under_load.py MODEL.onnx [MODEL.onnx ...] [--batch 1 --batch 16] [--seq 128]

Token models (input_ids, ...) get random tokens of length --seq; others their own input shape. Each condition
runs 3 interleaved rounds (every model once per round, one session alive at a time) of --runs timed runs per
model and batch size, and prints each round's median ms. The README's figures (FP32 and three dynamic INT8 graphs
of all-MiniLM-L6-v2 from `mlopt ptq`'s candidates) came from this measurement.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def rounds(paths: list[Path], batch: int, seq: int, runs: int, spinning: bool) -> dict[str, list[float]]:
    import numpy as np

    from mlopt.runtime.session import input_specs, make_session, synthetic_feed

    out: dict[str, list[float]] = {}
    for _ in range(3):
        for path in paths:
            session = make_session(path, "cpu", None, spinning=spinning)
            shape = input_specs(session)[0][1]
            sample = (seq,) if len(shape) == 2 else tuple(shape[1:])
            feed = synthetic_feed(session, batch, sample, np.random.default_rng(0))
            for _ in range(3):
                session.run(None, feed)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                session.run(None, feed)
                times.append((time.perf_counter() - t0) * 1000)
            out.setdefault(str(path), []).append(statistics.median(times))
            del session
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 16)")
    p.add_argument("--seq", type=int, default=128, help="sequence length of token models (default 128)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model, batch size and round (default 20)")
    args = p.parse_args()
    for condition in ("idle", "busy"):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
        try:
            for spinning in (True, False):
                for batch in args.batch or [1, 16]:
                    timed = rounds(args.models, batch, args.seq, max(3, args.runs // (batch // 4 + 1)), spinning)
                    print(f"{condition}, spinning {'on' if spinning else 'off'}, batch {batch}: "
                          + "; ".join(f"{name} {', '.join(f'{ms:.2f}' for ms in v)} ms" for name, v in timed.items()),
                          flush=True)
        finally:
            if spinner is not None:
                spinner.kill()


if __name__ == "__main__":
    main()
