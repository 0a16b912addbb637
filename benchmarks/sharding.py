"""Sharded training (--shard, FSDP2) against replicated training (DDP): memory per process and accuracy, in one run.

    python benchmarks/sharding.py [--procs 1 2 4] [--only memory|accuracy]

Memory: `mlopt train` for one epoch on digits with 1, 2 and 4 processes on this machine (gloo on the
CPU), replicated and sharded, for torchvision's resnet18 (3x32x32 inputs) and a small transformer
encoder (benchmarks/students.py:small_transformer). Each row is what one process held at the end:
parameter, gradient and optimizer-state bytes, and its peak RSS. The last column is the sharded
parameter + optimizer bytes as a share of the replicated run's with the same processes.

Accuracy (the same seed, two processes, replicated then sharded):
- distillation of a resnet18 student from a resnet18 teacher trained here first;
- training of the small transformer encoder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESNET = ["--model", "torchvision:resnet18", "--image-size", "32", "--channels", "3"]
TRANSFORMER = ["--model", f"{HERE / 'students.py'}:small_transformer"]
COMMON = ["--data", "digits", "--batch-size", "32", "--device", "cpu", "--quiet", "--json"]


def mlopt(nproc: int, command: str, *args: str) -> dict:
    """Run an mlopt command on `nproc` processes and return its --json metrics."""
    cmd = [sys.executable, "-m", "mlopt", command, *COMMON, *args] + (["--nproc", str(nproc)] if nproc > 1 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def memory(procs: list[int], tmp: Path) -> None:
    print("| model | processes | mode | params MB | grads MB | optimizer MB | peak RSS MB | params+optimizer vs replicated |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, model in (("resnet18", RESNET), ("small transformer", TRANSFORMER)):
        for n in procs:
            replicated = None
            for mode in (["replicated"] if n == 1 else ["replicated", "sharded"]):
                extra = ["--shard"] if mode == "sharded" else []
                m = mlopt(n, "train", *model, "--epochs", "1", "--lr", "0.001", *extra,
                          "--out", str(tmp / f"mem-{name}-{n}-{mode}".replace(" ", "_")))
                replicated = replicated or m
                share = m["model_optimizer_bytes"] / replicated["model_optimizer_bytes"]
                print(f"| {name} | {n} | {mode} | {mb(m['param_bytes'])} | {mb(m['grad_bytes'])} | "
                      f"{mb(m['optimizer_bytes'])} | {m['peak_rss_mb']:.0f} | {share:.2f}x |", flush=True)


def accuracy(tmp: Path) -> None:
    teacher = tmp / "teacher"
    t = mlopt(1, "train", *RESNET, "--epochs", "4", "--lr", "0.002", "--out", str(teacher))
    print(f"\nteacher: resnet18, top-1 {t['accuracy']:.4f}\n")
    print("| job | replicated top-1 | sharded top-1 | difference | params+optimizer per process, sharded vs replicated |")
    print("| --- | --- | --- | --- | --- |")
    jobs = {
        "distill resnet18 <- resnet18 teacher, 3 epochs": ["distill", "--student", "torchvision:resnet18",
                                                           "--teacher", str(teacher), "--image-size", "32",
                                                           "--channels", "3", "--epochs", "3", "--lr", "0.002",
                                                           "--no-baseline"],
        "train small transformer, 5 epochs": ["train", *TRANSFORMER, "--epochs", "5", "--lr", "0.003",
                                              "--warmup-epochs", "1"],
    }
    for i, (job, args) in enumerate(jobs.items()):
        ddp = mlopt(2, *args, "--out", str(tmp / f"acc{i}-ddp"))
        fsdp = mlopt(2, *args, "--shard", "--out", str(tmp / f"acc{i}-shard"))
        print(f"| {job} | {ddp['accuracy']:.4f} | {fsdp['accuracy']:.4f} | {fsdp['accuracy'] - ddp['accuracy']:+.4f} | "
              f"{fsdp['model_optimizer_bytes'] / ddp['model_optimizer_bytes']:.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--only", choices=["memory", "accuracy"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "accuracy":
            memory(args.procs, Path(tmp))
        if args.only != "memory":
            accuracy(Path(tmp))


if __name__ == "__main__":
    main()
