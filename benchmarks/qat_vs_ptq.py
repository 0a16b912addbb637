"""QAT against PTQ on digits-trained networks, measured in one run.

    python benchmarks/qat_vs_ptq.py [--models resnet18,mobilenet_v2,encoder]

Each network is trained on digits (resnet18 and mobilenet_v2 on 3x32x32, the small transformer
encoder of benchmarks/encoder.py on the native 1x8x8), then quantized twice from the same
weights: PTQ (static QDQ U8S8 per-channel, min/max) and QAT (2 epochs with the FP32 model as
teacher). Top-1 on the validation split; onnxruntime latency (CPU) of FP32, PTQ and QAT models at
batch 1 and 32 timed in interleaved rounds (`--rounds` sessions of them, each model keeping its
best); how closely the torch simulation follows onnxruntime, per quantized tensor.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def main() -> None:
    from mlopt import console
    from mlopt.evaluate import evaluate_onnx
    from mlopt.export.bench import interleaved_latency
    from mlopt.pipeline import run_recipe
    from mlopt.recipe import recipe_from_dict

    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--qat-lr", type=float, default=5e-5)
    p.add_argument("--no-teacher", action="store_true")
    p.add_argument("--observer", choices=["ema", "lsq"], default="ema")
    p.add_argument("--no-runtime-points", action="store_true",
                   help="simulate layer inputs only (not every tensor onnxruntime quantizes)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing sessions; each model keeps its best")
    p.add_argument("--models", default="resnet18,mobilenet_v2,encoder",
                   help="comma-separated: resnet18, mobilenet_v2 (3x32x32 digits), encoder (a small transformer "
                        "encoder on 1x8x8 digits, benchmarks/encoder.py)")
    args = p.parse_args()
    console.set_quiet(True)
    images = {"source": "digits", "image_size": 32, "channels": 3, "batch_size": 64}
    encoder = f"{Path(__file__).parent / 'encoder.py'}:digits_encoder"
    networks = {  # name: model spec, data, sample shape, training (epochs, peak learning rate)
        "resnet18": ("torchvision:resnet18", images, (3, 32, 32), {"epochs": 8}),
        "mobilenet_v2": ("torchvision:mobilenet_v2", images, (3, 32, 32), {"epochs": 8}),
        "encoder": (encoder, {"source": "digits", "batch_size": 64}, (1, 8, 8), {"epochs": 30}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            spec, data, shape, training = networks[name]
            root = Path(tmp) / name
            recipe = recipe_from_dict({
                "version": 1, "model": {"spec": spec}, "data": data,
                "steps": [{"type": "train", **training}, {"type": "export"}],
            }, "train")
            report = run_recipe(recipe, root / "fp32").report
            fp32_acc = report["steps"][0]["metrics"]["accuracy"]
            trained = str(root / "fp32" / "01-train")
            run_recipe(recipe_from_dict({"version": 1, "model": {"spec": trained}, "data": data, "steps": [
                {"type": "ptq", "mode": "static", "calibration": "minmax"}]}, "ptq"), root / "ptq", flat=True)
            qat = run_recipe(recipe_from_dict({"version": 1, "model": {"spec": trained}, "data": data, "steps": [
                {"type": "qat", "epochs": args.qat_epochs, "lr": args.qat_lr, "teacher": not args.no_teacher,
                 "observer": args.observer, "runtime_points": not args.no_runtime_points}]}, "qat"),
                root / "qat", flat=True)
            from mlopt.data import DataConfig, load_data

            d = load_data(DataConfig(**data))
            paths = [root / "fp32" / "02-export" / "model.onnx", root / "ptq" / "model.onnx", root / "qat" / "model.onnx"]
            acc = [evaluate_onnx(p, d, 64)["accuracy"] for p in paths]
            # Several interleaved sessions, each model keeping its best: PTQ and QAT have the same
            # graph structure, so any gap between them is the shared machine's noise.
            lat = [{1: float("inf"), 32: float("inf")} for _ in paths]
            for _ in range(args.rounds):
                for best, now in zip(lat, interleaved_latency(paths, shape, "cpu", [1, 32], 90)):
                    for b in best:
                        best[b] = min(best[b], now[b])
            q = qat.report["step"]["metrics"]
            print(f"{name}: top-1 FP32 {acc[0]:.4f} (torch {fp32_acc:.4f}), PTQ {acc[1]:.4f}, QAT {acc[2]:.4f}; "
                  f"QAT kernels {q['integer_kernels']} integer / {q['float_kernels']} float; "
                  f"simulation agreement {q['simulation_top1_agreement']:.4f}")
            errors = q["simulation_error"]
            print(f"  simulated tensors: {q['simulated_points']}, {q['activation_points']} of the {q['quantized_tensors']} "
                  f"onnxruntime quantizes; int8 weight codes differing from the simulation's: "
                  f"{q['weight_codes']['differing']} of {q['weight_codes']['codes']}")
            print(f"  simulation vs onnxruntime, per tensor: local max {max(r['local_max_error_steps'] for r in errors):.0f} "
                  f"step(s) on at most {100 * max(r['local_mismatch'] for r in errors):.2f}% of values; end to end mean "
                  f"{sum(r['mean_error_steps'] for r in errors) / len(errors):.3f} steps, max "
                  f"{max(r['max_error_steps'] for r in errors):.0f}")
            for b in (1, 32):
                print(f"  batch {b}: FP32 {lat[0][b]:.3f} ms, PTQ {lat[1][b]:.3f} ms, QAT {lat[2][b]:.3f} ms "
                      f"(QAT/PTQ {lat[2][b] / lat[1][b]:.3f})")


if __name__ == "__main__":
    main()
