from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from mlopt.cli import options as o
from mlopt.cli.common import build_recipe, execute, handle_errors


@handle_errors
def prune(
    model: o.Model,
    out: o.Out,
    data: o.OptionalData = None,
    sparsity: Annotated[str, typer.Option("--sparsity", help="structured (channels), unstructured or 2:4.")] = "structured",
    ratio: Annotated[Optional[float], typer.Option("--ratio", help="Fraction of channels (or weights) to remove, in (0, 1).")] = None,
    target_macs: Annotated[Optional[float], typer.Option("--target-macs", help="Keep this fraction of the MACs (searches the ratio).")] = None,
    target_params: Annotated[Optional[float], typer.Option("--target-params", help="Keep this fraction of the parameters.")] = None,
    head_ratio: Annotated[Optional[float], typer.Option("--head-ratio", help="Fraction of attention heads to remove (timm qkv + num_heads, or BERT query/key/value + num_attention_heads blocks).")] = None,
    importance: Annotated[str, typer.Option("--importance", help="l1, l2, bn-scale, taylor, lamp or random.")] = "l1",
    global_ranking: Annotated[bool, typer.Option("--global/--per-layer", help="Rank across layers or within each layer.")] = False,
    round_to: Annotated[Optional[int], typer.Option("--round-to", help="Keep channel counts multiples of N.")] = None,
    ignore: Annotated[Optional[List[str]], typer.Option("--ignore", help="Module name to leave untouched; repeatable.")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Prune in K steps, fine-tuning after each.")] = 1,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", help="Fine-tuning epochs after each step (needs --data).")] = 0,
    lr: o.Lr = 2e-3,
    amp: o.Amp = "off",
    device: o.Device = "auto",
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Time the model before and after on onnxruntime.")] = True,
    batch_size: o.BatchSize = None,
    input_shape: o.InputShape = None,
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
    """Prune channels with Torch-Pruning (or sparsify weights); the result reloads from its directory."""
    recipe = build_recipe(
        {"spec": model, "num_classes": num_classes, "weights": weights, "input_shape": input_shape, "seed": seed},
        {"source": data, "image_size": image_size, "channels": channels, "batch_size": batch_size, "seed": seed},
        {"type": "prune", "sparsity": sparsity, "ratio": ratio, "target_macs": target_macs,
         "target_params": target_params, "head_ratio": head_ratio, "importance": importance, "global_ranking": global_ranking,
         "round_to": round_to, "ignore": ignore or [], "steps": steps, "finetune_epochs": finetune_epochs,
         "finetune": {"lr": lr, "amp": amp, "device": device, "seed": seed}, "measure_latency": latency},
    )
    execute(recipe, out, overwrite, quiet, save_recipe, json_out=json_out)
