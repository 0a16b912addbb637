from __future__ import annotations

from typing import Annotated

import typer

from mlopt.cli import options as o
from mlopt.cli.common import build_recipe, execute, handle_errors


@handle_errors
def export(
    model: o.Model,
    out: o.Out,
    data: o.OptionalData = None,
    input_shape: o.InputShape = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (17-23).")] = 18,
    exporter: Annotated[str, typer.Option("--exporter", help="dynamo (torch.export) or torchscript.")] = "dynamo",
    atol: Annotated[float, typer.Option("--atol", help="Parity: absolute tolerance.")] = 1e-4,
    rtol: Annotated[float, typer.Option("--rtol", help="Parity: tolerance relative to the largest output.")] = 1e-3,
    debug_metadata: Annotated[bool, typer.Option("--debug-metadata", help="Keep the exporter's per-node metadata (stack traces).")] = False,
    image_size: o.ImageSize = None,
    channels: o.Channels = None,
    max_length: o.MaxLength = None,
    num_classes: o.NumClasses = None,
    weights: o.Weights = None,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
    save_recipe: o.SaveRecipe = None,
) -> None:
    """Export to ONNX (dynamic batch), check it, and compare onnxruntime with PyTorch on real inputs."""
    recipe = build_recipe(
        {"spec": model, "num_classes": num_classes, "weights": weights, "input_shape": input_shape},
        {"source": data, "image_size": image_size, "channels": channels, "max_length": max_length},
        {"type": "export", "opset": opset, "exporter": exporter, "atol": atol, "rtol": rtol,
         "debug_metadata": debug_metadata},
    )
    execute(recipe, out, overwrite, quiet, save_recipe, json_out=json_out)
