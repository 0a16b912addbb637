from __future__ import annotations

from mlopt.cli import options as o
from mlopt.cli.common import build_recipe, execute, handle_errors


@handle_errors
def eval_(
    model: o.Model,
    data: o.Data,
    batch_size: o.BatchSize = None,
    image_size: o.ImageSize = None,
    channels: o.Channels = None,
    num_classes: o.NumClasses = None,
    weights: o.Weights = None,
    out: o.OptionalOut = None,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
    save_recipe: o.SaveRecipe = None,
) -> None:
    """Top-1 accuracy and loss on the validation split, for a torch model, an mlopt DIR or FILE.onnx."""
    recipe = build_recipe(
        {"spec": model, "num_classes": num_classes, "weights": weights},
        {"source": data, "image_size": image_size, "channels": channels, "batch_size": batch_size},
        {"type": "eval"},
    )
    execute(recipe, out, overwrite, quiet, save_recipe, json_out=json_out,
            json_view=lambda step: {k: step["metrics"][k] for k in ("accuracy", "loss", "samples")})
