from __future__ import annotations

from typing import Annotated

import typer

from mlopt.cli import options as o
from mlopt.cli.common import build_recipe, execute, handle_errors


@handle_errors
def train(
    model: o.Model,
    data: o.Data,
    out: o.Out,
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="Training epochs.")] = 5,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 2e-3,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw or sgd.")] = "adamw",
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 1e-4,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine or constant.")] = "cosine",
    batch_size: o.BatchSize = None,
    image_size: o.ImageSize = None,
    channels: o.Channels = None,
    num_classes: o.NumClasses = None,
    weights: o.Weights = None,
    seed: o.Seed = 0,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
    save_recipe: o.SaveRecipe = None,
) -> None:
    """Train a model on labelled data (fp32, one process). Writes model.pt, model.json and a report."""
    recipe = build_recipe(
        {"spec": model, "num_classes": num_classes, "weights": weights},
        {"source": data, "image_size": image_size, "channels": channels, "batch_size": batch_size, "seed": seed},
        {"type": "train", "epochs": epochs, "lr": lr, "optimizer": optimizer, "weight_decay": weight_decay,
         "schedule": schedule, "seed": seed},
    )
    result = execute(recipe, out, overwrite, quiet or json_out, save_recipe)
    if json_out:
        from mlopt import console

        console.emit_json(result.report["step"]["metrics"])
