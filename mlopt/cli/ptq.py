from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from mlopt.cli import options as o
from mlopt.cli.common import build_recipe, execute, handle_errors


@handle_errors
def ptq(
    model: o.Model,
    data: o.Data,
    out: o.Out,
    mode: Annotated[str, typer.Option("--mode", help="auto (measure candidates, keep the fastest within budget), static or dynamic.")] = "auto",
    calibration: Annotated[str, typer.Option("--calibration", help="auto, minmax, percentile or entropy.")] = "auto",
    calibration_samples: Annotated[int, typer.Option("--calibration-samples", help="Training samples used to calibrate.")] = 256,
    per_channel: Annotated[Optional[bool], typer.Option("--per-channel/--per-tensor", help="Weight scales (static/dynamic modes; default per-channel).")] = None,
    activation_type: Annotated[Optional[str], typer.Option("--activation-type", help="uint8 or int8 (static mode; default uint8).")] = None,
    weight_type: Annotated[Optional[str], typer.Option("--weight-type", help="int8 or uint8 (static/dynamic modes; default int8).")] = None,
    quant_format: Annotated[Optional[str], typer.Option("--format", help="qdq or qoperator (static mode; default qdq).")] = None,
    reduce_range: Annotated[str, typer.Option("--reduce-range", help="auto (on without VNNI), on or off.")] = "auto",
    max_drop: Annotated[float, typer.Option("--max-drop", help="Allowed top-1 drop as a fraction (0.01 = 1 point).")] = 0.01,
    min_cosine: Annotated[float, typer.Option("--min-cosine", help="Fidelity floor for unlabelled data.")] = 0.99,
    fallback: Annotated[bool, typer.Option("--fallback/--no-fallback", help="Keep sensitive nodes in float to meet the budget.")] = True,
    provider: Annotated[str, typer.Option("--provider", help="Where candidates are timed: cpu, cuda or tensorrt.")] = "cpu",
    batch_size: Annotated[Optional[List[int]], typer.Option("--batch-size", "-b", help="Batch sizes timed (default 1 and 32).")] = None,
    iterations: Annotated[int, typer.Option("--iterations", "-n", help="Timed runs per candidate and batch size.")] = 30,
    input_shape: o.InputShape = None,
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
    """Post-training INT8 quantization (onnxruntime), kept only when measured faster and within budget."""
    recipe = build_recipe(
        {"spec": model, "num_classes": num_classes, "weights": weights, "input_shape": input_shape},
        {"source": data, "image_size": image_size, "channels": channels, "max_length": max_length},
        {"type": "ptq", "mode": mode, "calibration": calibration, "calibration_samples": calibration_samples,
         "per_channel": per_channel, "activation_type": activation_type, "weight_type": weight_type,
         "format": quant_format, "reduce_range": reduce_range, "max_drop": max_drop, "min_cosine": min_cosine,
         "fallback": fallback, "provider": provider, "batch_sizes": batch_size or [1, 32], "iterations": iterations},
    )
    execute(recipe, out, overwrite, quiet, save_recipe, json_out=json_out)
