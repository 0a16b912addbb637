from __future__ import annotations

from mlopt.cli import options as o
from mlopt.cli.common import build_recipe, execute, handle_errors, relaunch_under_torchrun


@handle_errors
def train(
    model: o.Model,
    data: o.Data,
    out: o.Out,
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
    num_classes: o.NumClasses = None,
    weights: o.Weights = None,
    seed: o.Seed = 0,
    resume: o.Resume = False,
    nproc: o.Nproc = 1,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
    save_recipe: o.SaveRecipe = None,
) -> None:
    """Train a model on labelled data. Writes model.pt, model.json and a report.

    Mixed precision with --amp, data parallelism with --nproc (or torchrun), checkpoints and --resume.
    """
    relaunch_under_torchrun(nproc, save_recipe)
    recipe = build_recipe(
        {"spec": model, "num_classes": num_classes, "weights": weights, "seed": seed},
        {"source": data, "image_size": image_size, "channels": channels, "batch_size": batch_size, "seed": seed},
        {"type": "train", "epochs": epochs, "lr": lr, "optimizer": optimizer, "weight_decay": weight_decay,
         "schedule": schedule, "warmup_epochs": warmup_epochs, "grad_clip": grad_clip,
         "early_stopping": early_stopping, "amp": amp, "device": device, "checkpoint_every": checkpoint_every,
         "seed": seed},
    )
    execute(recipe, out, overwrite, quiet, save_recipe, resume=resume, json_out=json_out)
