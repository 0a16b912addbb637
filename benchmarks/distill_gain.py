"""Distillation gain on digits: student accuracy with and without distillation, mean over seeds.

    python benchmarks/distill_gain.py [--seeds 0 1 2] [--student-epochs 3]

Trains a resnet18 teacher on digits (3x32x32), then for each seed runs mlopt's distill pass on a
small CNN student (benchmarks/students.py); the seed changes the student's initialisation and
the order of its batches. The pass also trains the same student from the same
initial weights without distillation for the same epochs (its baseline), so the two accuracies in
each row come from one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    from mlopt.core import console
    from mlopt.run.runner import run_recipe
    from mlopt.run.recipe import recipe_from_dict

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--student-epochs", type=int, default=8)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    args = p.parse_args()
    console.set_quiet(True)

    data = {"source": "digits", "image_size": 32, "channels": 3, "batch_size": 64}
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = Path(tmp) / "teacher"
        teacher = recipe_from_dict({"version": 1, "model": {"spec": "torchvision:resnet18"}, "data": data,
                                    "steps": [{"type": "train", "epochs": args.teacher_epochs}]}, "teacher")
        run_recipe(teacher, teacher_dir, flat=True)
        rows = []
        for seed in args.seeds:
            recipe = recipe_from_dict({
                "version": 1,
                "model": {"spec": f"{HERE / 'students.py'}:small_cnn", "seed": seed},
                "data": data,  # the same split as the teacher's: its validation images stay unseen
                "steps": [{"type": "distill", "teacher": str(teacher_dir), "epochs": args.student_epochs,
                           "lr": 0.02, "seed": seed, "temperature": args.temperature, "alpha": args.alpha}],
            }, "distill")
            m = run_recipe(recipe, Path(tmp) / f"s{seed}", flat=True).report["step"]["metrics"]
            rows.append((seed, m["teacher_accuracy"], m["baseline_accuracy"], m["accuracy"]))
            print(f"seed {seed}: teacher {m['teacher_accuracy']:.4f}  student without distillation "
                  f"{m['baseline_accuracy']:.4f}  with distillation {m['accuracy']:.4f}")
    base = [r[2] for r in rows]
    kd = [r[3] for r in rows]
    print(f"mean over {len(rows)} seeds: without {statistics.mean(base):.4f}, with {statistics.mean(kd):.4f}, "
          f"gain {100 * (statistics.mean(kd) - statistics.mean(base)):+.2f} points "
          f"(params: student {m['params']:,}, teacher {m['teacher_params']:,})")


if __name__ == "__main__":
    main()
