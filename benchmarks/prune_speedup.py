"""Structured pruning: onnxruntime FP32 latency and top-1, measured in one run.

    python benchmarks/prune_speedup.py [--part imagenet-shape|digits|all]

imagenet-shape: `mlopt prune --model torchvision:resnet18 --ratio 0.5 --importance l1` at
1x3x224x224; the pass exports the model before and after and times both on onnxruntime (CPU,
batch 1) in interleaved rounds.
digits: resnet18 and mobilenet_v2 trained on digits (3x32x32), then 50% of the channels pruned in
2 steps with 8 epochs of fine-tuning after each; top-1 before and after on the validation split.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    from mlopt.core import console
    from mlopt.run.runner import run_recipe
    from mlopt.run.recipe import recipe_from_dict

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["imagenet-shape", "digits", "all"], default="all")
    p.add_argument("--finetune-epochs", type=int, default=8, help="per step")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.002)
    args = p.parse_args()
    console.set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("imagenet-shape", "all"):
            recipe = recipe_from_dict({"version": 1,
                                       "model": {"spec": "torchvision:resnet18", "input_shape": "1x3x224x224"},
                                       "steps": [{"type": "prune", "ratio": 0.5, "importance": "l1"}]}, "prune")
            step = run_recipe(recipe, Path(tmp) / "r18", flat=True).report["step"]
            m, ms = step["metrics"], {lat["model"]: lat["p50_ms"] for lat in step["latency"]}
            print(f"resnet18 1x3x224x224, ratio 0.5, l1: MACs {m['macs_ratio']:.2f}x fewer, params "
                  f"{m['params_ratio']:.2f}x fewer; onnxruntime batch 1 {ms['before']:.2f} -> "
                  f"{ms['after']:.2f} ms ({m['latency_speedup']:.2f}x faster)")
        if args.part in ("digits", "all"):
            data = {"source": "digits", "image_size": 32, "channels": 3, "batch_size": 64}
            for name in ("resnet18", "mobilenet_v2"):
                recipe = recipe_from_dict({
                    "version": 1, "model": {"spec": f"torchvision:{name}"}, "data": data,
                    "steps": [{"type": "train", "epochs": 8},
                              {"type": "prune", "ratio": 0.5, "finetune_epochs": args.finetune_epochs,
                               "steps": args.steps, "finetune": {"lr": args.lr}}],
                }, "prune")
                step = run_recipe(recipe, Path(tmp) / name).report["steps"][1]["metrics"]
                print(f"{name} on digits, 50% channels in {args.steps} steps, {args.finetune_epochs} fine-tuning epochs "
                      f"each: top-1 "
                      f"{step['accuracy_before']:.4f} -> {step['accuracy']:.4f} ({-100 * step['accuracy_drop']:+.2f} pt); "
                      f"MACs {step['macs_ratio']:.2f}x fewer; onnxruntime batch 1 {step['latency_speedup']:.2f}x faster")


if __name__ == "__main__":
    main()
