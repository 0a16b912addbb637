"""QAT against PTQ on digits-trained networks, measured in one run.

    python benchmarks/qat_vs_ptq.py [--models resnet18,mobilenet_v2,encoder] [--seeds 0,1,2]

For each seed, each network is trained on digits (resnet18 and mobilenet_v2 on 3x32x32 for 6
epochs, as `mlopt train --model torchvision:mobilenet_v2 --num-classes 10 --data digits --channels 3
--image-size 32 --epochs 6 --seed S` does; the small transformer encoder of benchmarks/encoder.py
on the native 1x8x8 for 30), the seed setting the model's initialisation, the training and the
train/validation split. It is then quantized twice from the same weights: PTQ (static QDQ U8S8
per-channel, min/max: the scheme QAT's INT8 model uses) and QAT with mlopt's default options
(flags below override them). Top-1 on the validation split on onnxruntime; QAT's INT8 model (the
better of its calibrated start and the trained model) and the model QAT hands back (FP32 where
INT8 is not faster); onnxruntime latency (CPU) of FP32, PTQ and QAT models at batch 1 and 32 timed
in interleaved rounds (`--rounds` sessions of them, each model keeping its best); how closely the
torch simulation follows onnxruntime. The last lines say whether QAT >= PTQ on every seed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def step_latency(step: dict, model: str, b: int) -> float:
    """A step report's median latency of one of its models at batch size b."""
    return next(r["p50_ms"] for r in step["latency"] if r["model"] == model and r["batch_size"] == b)


def main() -> None:
    from mlopt.core import console
    from mlopt.runtime.data import DataConfig, load_data
    from mlopt.runtime.evaluation import evaluate_onnx
    from mlopt.export.lib.timing import interleaved_latency
    from mlopt.run.runner import run_recipe
    from mlopt.run.recipe import recipe_from_dict

    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qat-epochs", type=int, help="default: QAT's own (2)")
    p.add_argument("--qat-lr", type=float, help="default: QAT's own (5e-5)")
    p.add_argument("--no-teacher", action="store_true")
    p.add_argument("--observer", choices=["ema", "lsq"], help="default: QAT's own (ema)")
    p.add_argument("--no-runtime-points", action="store_true",
                   help="simulate layer inputs only (not every tensor onnxruntime quantizes)")
    p.add_argument("--keep-int8", action="store_true", help="QAT hands back INT8 even where it is not faster")
    p.add_argument("--train-epochs", type=int, default=6, help="training of resnet18 and mobilenet_v2")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (model initialisation, training, data split)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing sessions; each model keeps its best")
    p.add_argument("--models", default="resnet18,mobilenet_v2,encoder",
                   help="comma-separated: resnet18, mobilenet_v2 (3x32x32 digits), encoder (a small transformer "
                        "encoder on 1x8x8 digits, benchmarks/encoder.py)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    qat_options = {k: v for k, v in {
        "epochs": args.qat_epochs, "lr": args.qat_lr, "observer": args.observer,
        "teacher": False if args.no_teacher else None, "runtime_points": False if args.no_runtime_points else None,
        "keep_int8": True if args.keep_int8 else None}.items() if v is not None}
    console.set_quiet(True)
    images = {"source": "digits", "image_size": 32, "channels": 3, "batch_size": 64}
    encoder = f"{Path(__file__).parent / 'encoder.py'}:digits_encoder"
    networks = {  # name: model spec, data, sample shape, training (epochs, peak learning rate)
        "resnet18": ("torchvision:resnet18", images, (3, 32, 32), {"epochs": args.train_epochs}),
        "mobilenet_v2": ("torchvision:mobilenet_v2", images, (3, 32, 32), {"epochs": args.train_epochs}),
        "encoder": (encoder, {"source": "digits", "batch_size": 64}, (1, 8, 8), {"epochs": 30}),
    }
    print(f"QAT options: {qat_options or 'the defaults'}; PTQ: static QDQ U8S8 per-channel min/max", flush=True)
    outcome: dict[str, list[tuple[int, float, float, float]]] = {}  # name: (seed, PTQ, QAT INT8, QAT handed back)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name in args.models.split(","):
                spec, data, shape, training = networks[name]
                data = {**data, "seed": seed}
                model = {"spec": spec, "seed": seed}
                root = Path(tmp) / f"{name}-{seed}"
                recipe = recipe_from_dict({
                    "version": 1, "model": model, "data": data,
                    "steps": [{"type": "train", "seed": seed, **training}, {"type": "export"}],
                }, "train")
                report = run_recipe(recipe, root / "fp32").report
                fp32_acc = report["steps"][0]["metrics"]["accuracy"]
                trained = str(root / "fp32" / "01-train")
                run_recipe(recipe_from_dict({"version": 1, "model": {"spec": trained}, "data": data, "steps": [
                    {"type": "ptq", "mode": "static", "calibration": "minmax"}]}, "ptq"), root / "ptq", flat=True)
                qat = run_recipe(recipe_from_dict({"version": 1, "model": {"spec": trained}, "data": data, "steps": [
                    {"type": "qat", **qat_options}]}, "qat"), root / "qat", flat=True)
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
                step = qat.report["step"]
                q = step["metrics"]
                int8_acc = max(q["start_accuracy"], q["trained_accuracy"])
                outcome.setdefault(name, []).append((seed, acc[1], int8_acc, acc[2]))
                print(f"{name} seed {seed}: top-1 FP32 {acc[0]:.4f} (torch {fp32_acc:.4f}), PTQ {acc[1]:.4f}, "
                      f"QAT INT8 {int8_acc:.4f} ({q['chosen']}: start {q['start_accuracy']:.4f}, trained "
                      f"{q['trained_accuracy']:.4f}), QAT handed back {'INT8' if q['quantized'] else 'FP32'} {acc[2]:.4f}; "
                      f"QAT kernels {q['integer_kernels']} integer / {q['float_kernels']} float; "
                      f"simulation agreement {q['simulation_top1_agreement']:.4f}")
                table = next(s for s in step["sections"] if s["title"] == "simulation vs onnxruntime, per quantized tensor")
                errors = [dict(zip(table["columns"], r)) for r in table["rows"]]
                print(f"  simulated tensors: {q['simulated_points']}, {q['activation_points']} of the {q['quantized_tensors']} "
                      f"onnxruntime quantizes; int8 weight codes differing from the simulation's: "
                      f"{q['weight_codes_differing']} of {q['weight_codes']}")
                print(f"  simulation vs onnxruntime, per tensor: local max {max(r['local max steps'] for r in errors):.0f} "
                      f"step(s) on at most {max(r['local values off %'] for r in errors):.2f}% of values; end to end mean "
                      f"{sum(r['end-to-end mean steps'] for r in errors) / len(errors):.3f} steps, max "
                      f"{max(r['end-to-end max steps'] for r in errors):.0f}")
                for b in (1, 32):
                    print(f"  batch {b}: FP32 {lat[0][b]:.3f} ms, PTQ {lat[1][b]:.3f} ms, QAT {lat[2][b]:.3f} ms "
                          f"(QAT/PTQ {lat[2][b] / lat[1][b]:.3f}; the QAT step's own timing: INT8 "
                          f"{step_latency(step, 'INT8', b):.3f} ms, FP32 {step_latency(step, 'FP32', b):.3f} ms)", flush=True)
    for name, rows in outcome.items():
        int8_ok = all(qi >= ptq for _, ptq, qi, _ in rows)
        back_ok = all(qb >= ptq for _, ptq, _, qb in rows)
        print(f"{name}: QAT INT8 top-1 >= PTQ top-1 on every seed ({', '.join(str(r[0]) for r in rows)}): "
              f"{'yes' if int8_ok else 'NO'}; the model QAT hands back >= PTQ on every seed: {'yes' if back_ok else 'NO'}")


if __name__ == "__main__":
    main()
