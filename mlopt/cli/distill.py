from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from mlopt.cli import options as o
from mlopt.cli.common import build_recipe, execute, handle_errors, relaunch_under_torchrun


@handle_errors
def distill(
    teacher: Annotated[str, typer.Option("--teacher", help="The teacher: a trained mlopt DIR (or a model spec).")],
    student: Annotated[str, typer.Option("--student", help="The student: a model spec or an mlopt DIR.")],
    data: o.Data,
    out: o.Out,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature.")] = 4.0,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the distillation loss (1 - alpha on labels).")] = 0.9,
    feature: Annotated[
        Optional[List[str]], typer.Option("--feature", help="TEACHER_LAYER:STUDENT_LAYER for feature distillation; repeatable.")
    ] = None,
    feature_weight: Annotated[float, typer.Option("--feature-weight", help="Weight of the feature losses.")] = 1.0,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Also train the student without distillation.")] = True,
    epochs: o.Epochs = 5,
    lr: o.Lr = 2e-3,
    optimizer: o.Optimizer = "adamw",
    weight_decay: o.WeightDecay = 1e-4,
    schedule: o.Schedule = "cosine",
    warmup_epochs: o.WarmupEpochs = 0.0,
    grad_clip: o.GradClip = None,
    early_stopping: o.EarlyStopping = None,
    amp: o.Amp = "off",
    device: o.Device = "auto",
    checkpoint_every: o.CheckpointEvery = None,
    batch_size: o.BatchSize = None,
    image_size: o.ImageSize = None,
    channels: o.Channels = None,
    seed: o.Seed = 0,
    resume: o.Resume = False,
    nproc: o.Nproc = 1,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
    save_recipe: o.SaveRecipe = None,
) -> None:
    """Knowledge distillation: train the student to match the teacher's logits (and named features).

    The report compares the student with the same student trained without distillation.
    """
    relaunch_under_torchrun(nproc, save_recipe)
    recipe = build_recipe(
        {"spec": student, "seed": seed},
        {"source": data, "image_size": image_size, "channels": channels, "batch_size": batch_size, "seed": seed},
        {"type": "distill", "teacher": teacher, "temperature": temperature, "alpha": alpha, "features": feature or [],
         "feature_weight": feature_weight, "baseline": baseline, "epochs": epochs, "lr": lr, "optimizer": optimizer,
         "weight_decay": weight_decay, "schedule": schedule, "warmup_epochs": warmup_epochs, "grad_clip": grad_clip,
         "early_stopping": early_stopping, "amp": amp, "device": device, "checkpoint_every": checkpoint_every,
         "seed": seed},
    )
    execute(recipe, out, overwrite, quiet, save_recipe, resume=resume, json_out=json_out)
