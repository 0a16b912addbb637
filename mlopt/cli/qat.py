from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from mlopt.cli import options as o
from mlopt.cli.common import build_recipe, execute, handle_errors, relaunch_under_torchrun


@handle_errors
def qat(
    model: o.Model,
    data: o.Data,
    out: o.Out,
    epochs: o.Epochs = 2,
    lr: o.Lr = 5e-5,
    optimizer: o.Optimizer = "adamw",
    freeze_observers_after: Annotated[int, typer.Option("--freeze-observers-after", help="Epochs before activation ranges freeze.")] = 1,
    observer: Annotated[str, typer.Option("--observer", help="Activation ranges: ema (min/max observers) or lsq (learned scale and zero point).")] = "ema",
    freeze_bn_after: Annotated[int, typer.Option("--freeze-bn-after", help="Epochs during which batch-norm statistics still update (0: frozen).")] = 0,
    teacher: Annotated[bool, typer.Option("--teacher/--no-teacher", help="Distil from the FP32 model while training.")] = True,
    calibration_samples: Annotated[int, typer.Option("--calibration-samples", help="Samples for the initial ranges.")] = 256,
    batch_sizes: Annotated[Optional[List[int]], typer.Option("--bench-batch-size", help="Batch sizes timed for the report.")] = None,
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
    """Quantization-aware training; writes an INT8 ONNX model that onnxruntime fully fuses."""
    relaunch_under_torchrun(nproc, save_recipe)
    recipe = build_recipe(
        {"spec": model, "num_classes": num_classes, "weights": weights, "seed": seed},
        {"source": data, "image_size": image_size, "channels": channels, "batch_size": batch_size, "seed": seed},
        {"type": "qat", "epochs": epochs, "lr": lr, "optimizer": optimizer, "freeze_observers_after": freeze_observers_after,
         "freeze_bn_after": freeze_bn_after, "observer": observer,
         "teacher": teacher, "calibration_samples": calibration_samples, "batch_sizes": batch_sizes or [1, 32],
         "amp": amp, "device": device, "checkpoint_every": checkpoint_every, "seed": seed},
    )
    execute(recipe, out, overwrite, quiet, save_recipe, resume=resume, json_out=json_out)
