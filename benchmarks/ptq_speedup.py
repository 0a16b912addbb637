"""INT8 post-training quantization against FP32 on onnxruntime (CPU), measured in one run.

    python benchmarks/ptq_speedup.py [--part imagenet-shape|digits|all]

imagenet-shape: torchvision resnet18 and mobilenet_v2 at 1x3x224x224 (random weights; latency does
not depend on training), `mlopt ptq --mode auto` calibrated on random inputs, timed at batch 1.
digits: the same networks trained on digits at 3x32x32, `mlopt ptq --mode auto` timed at batch 1
and 32, with top-1 on the validation split. Every figure comes from the PTQ pass's own report,
whose timings interleave the FP32 model and the candidates in rounds.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def run_ptq(model: str, data: dict, out: Path, batch_sizes: list[int], min_cosine: float = 0.99) -> dict:
    from mlopt.run.runner import run_recipe
    from mlopt.run.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "version": 1, "model": {"spec": model}, "data": data,
        "steps": [{"type": "ptq", "batch_sizes": batch_sizes, "calibration_samples": 128, "min_cosine": min_cosine}],
    }, "ptq")
    return run_recipe(recipe, out, flat=True).report["step"]


def show(name: str, step: dict) -> None:
    m = step["metrics"]
    lat: dict[str, dict[int, float]] = {}
    for r in step["latency"]:
        lat.setdefault(r["model"], {})[r["batch_size"]] = r["p50_ms"]
    fp32, chosen = lat["FP32"], lat[m["chosen"]]
    lat_text = "  ".join(
        f"batch {b}: FP32 {fp32[b]:.2f} ms, INT8 {chosen[b]:.2f} ms ({fp32[b] / chosen[b]:.2f}x)" for b in fp32
    )
    quality = (f"top-1 FP32 {m['fp32_accuracy']:.4f} INT8 {m['accuracy']:.4f} (drop {100 * m['accuracy_drop']:+.2f} pt)"
               if "fp32_accuracy" in m else f"cosine to FP32 {m.get('cosine_mean', 1):.4f}")
    size = f"size {m['fp32_size_mb']:.1f} -> {m['size_mb']:.1f} MB ({m['fp32_size_mb'] / m['size_mb']:.2f}x)"
    print(f"{name}: {m['chosen']}\n  {lat_text}\n  {quality}; {size}")
    table = next(s for s in step["sections"] if s["title"] == "PTQ candidates")
    for r in [dict(zip(table["columns"], row)) for row in table["rows"][1:]]:
        print(f"    candidate {r['model']}: " + ", ".join(f"b{b} {ms:.2f} ms" for b, ms in lat[r["model"]].items())
              + f", {r['integer kernels']} int / {r['float kernels']} float kernels")


def main() -> None:
    from mlopt.core import console

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["imagenet-shape", "digits", "all"], default="all")
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    args = p.parse_args()
    console.set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("imagenet-shape", "all"):
            for name in args.models:
                step = run_ptq(f"torchvision:{name}", {"source": "random:3x224x224", "samples": 128},
                               Path(tmp) / f"{name}-224", [1], min_cosine=0.9)
                show(f"{name} 1x3x224x224", step)
        if args.part in ("digits", "all"):
            from mlopt.run.runner import run_recipe
            from mlopt.run.recipe import recipe_from_dict

            data = {"source": "digits", "image_size": 32, "channels": 3, "batch_size": 64}
            for name in args.models:
                trained = Path(tmp) / f"{name}-digits"
                run_recipe(recipe_from_dict({"version": 1, "model": {"spec": f"torchvision:{name}"}, "data": data,
                                             "steps": [{"type": "train", "epochs": 8}]}, "train"), trained, flat=True)
                show(f"{name} trained on digits, 3x32x32", run_ptq(str(trained), data, Path(tmp) / f"{name}-q", [1, 32]))


if __name__ == "__main__":
    main()
