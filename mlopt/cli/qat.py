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
    epochs: Annotated[Optional[int], typer.Option("--epochs", "-e", help="Training epochs (default 2).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default 5e-5).")] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="adamw (default) or sgd.")] = None,
    freeze_observers_after: Annotated[Optional[int], typer.Option("--freeze-observers-after", help="Epochs before activation ranges freeze (default 1).")] = None,
    observer: Annotated[Optional[str], typer.Option("--observer", help="Activation ranges: ema (min/max observers, the default) or lsq (learned scale and zero point).")] = None,
    freeze_bn_after: Annotated[Optional[int], typer.Option("--freeze-bn-after", help="Epochs during which batch-norm statistics still update (default 0: frozen).")] = None,
    teacher: Annotated[Optional[bool], typer.Option("--teacher/--no-teacher", help="Distil from the FP32 model while training (default: on).")] = None,
    calibration_samples: Annotated[Optional[int], typer.Option("--calibration-samples", help="Samples for the initial ranges (default 256).")] = None,
    batch_sizes: Annotated[Optional[List[int]], typer.Option("--bench-batch-size", help="Batch sizes at which INT8 is timed against FP32 (default 1 and 32).")] = None,
    keep_int8: Annotated[bool, typer.Option("--keep-int8", help="Hand back the INT8 model even where it is not faster "
                                            "than the FP32 model QAT started from. By default FP32 is handed back then: "
                                            "INT8 is kept only when faster at every --bench-batch-size, timed in "
                                            "interleaved rounds (a tie counts as not faster).")] = False,
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
    """Quantization-aware training; writes an INT8 ONNX model that onnxruntime fully fuses.

    Hands back the better (validation top-1) of the trained model and its calibrated starting point,
    and the FP32 model it started from where INT8 is not faster (unless --keep-int8).
    """
    relaunch_under_torchrun(nproc, save_recipe)
    recipe = build_recipe(
        {"spec": model, "num_classes": num_classes, "weights": weights, "seed": seed},
        {"source": data, "image_size": image_size, "channels": channels, "batch_size": batch_size, "seed": seed},
        {"type": "qat", "epochs": epochs, "lr": lr, "optimizer": optimizer, "freeze_observers_after": freeze_observers_after,
         "freeze_bn_after": freeze_bn_after, "observer": observer,
         "teacher": teacher, "calibration_samples": calibration_samples, "batch_sizes": batch_sizes, "keep_int8": keep_int8 or None,
         "amp": amp, "device": device, "checkpoint_every": checkpoint_every, "seed": seed},
    )
    execute(recipe, out, overwrite, quiet, save_recipe, resume=resume, json_out=json_out)
