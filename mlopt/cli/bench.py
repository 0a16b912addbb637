from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from mlopt.cli import options as o
from mlopt.cli.common import build_recipe, execute, handle_errors


@handle_errors
def bench(
    models: Annotated[List[Path], typer.Argument(help="ONNX files (or mlopt output directories); the first is the baseline.")],
    provider: Annotated[str, typer.Option("--provider", help="cpu, cuda or tensorrt.")] = "cpu",
    threads: Annotated[Optional[int], typer.Option("--threads", help="Intra-op threads.")] = None,
    batch_size: Annotated[Optional[List[int]], typer.Option("--batch-size", "-b", help="Batch size; repeat for several.")] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs first.")] = 10,
    iterations: Annotated[Optional[int], typer.Option("--iterations", "-n", help="Timed runs per model and batch size (default 100).")] = None,
    duration: Annotated[Optional[float], typer.Option("--duration", help="Seconds per model and batch size (instead of --iterations).")] = None,
    input_shape: o.InputShape = None,
    out: o.OptionalOut = None,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
    save_recipe: o.SaveRecipe = None,
) -> None:
    """onnxruntime latency and throughput of one or more ONNX models, side by side."""
    from mlopt.runtime.artifacts import ONNX_FILE

    paths = [str(p / ONNX_FILE) if p.is_dir() else str(p) for p in models]
    recipe = build_recipe(
        {"spec": paths[0], "input_shape": input_shape},
        None,
        {"type": "bench", "provider": provider, "threads": threads, "batch_sizes": batch_size or [1],
         "warmup": warmup, "iterations": iterations, "duration_s": duration, "compare": paths[1:]},
    )
    execute(recipe, out, overwrite, quiet, save_recipe, json_out=json_out,
            json_view=lambda step: {"latency": step["latency"], "table": step["sections"][0]})
