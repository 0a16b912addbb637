"""Option definitions shared by every command, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Model = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="torchvision:NAME, FILE.py:FACTORY, package.module:FACTORY (imports your code), hf:DIR (a saved Hugging Face model), an mlopt output DIR, or FILE.onnx.",
    ),
]
_DATA_HELP = "digits, npz:FILE, imagefolder:DIR, random:SHAPE or text:FILE (one example a line, for hf: models)."
Data = Annotated[str, typer.Option("--data", "-d", help=_DATA_HELP)]
OptionalData = Annotated[Optional[str], typer.Option("--data", "-d", help=_DATA_HELP)]
MaxLength = Annotated[Optional[int], typer.Option("--max-length", help="text:FILE: tokens per example at most (default 128).")]
ImageSize = Annotated[Optional[int], typer.Option("--image-size", help="Resize images to SIZE x SIZE.")]
Channels = Annotated[Optional[int], typer.Option("--channels", help="Convert images to 1 or 3 channels.")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Batch size (default 64).")]
NumClasses = Annotated[Optional[int], typer.Option("--num-classes", help="Output classes (default: from the data).")]
Weights = Annotated[Optional[Path], typer.Option("--weights", help="State dict to load (read with weights_only=True).")]
InputShape = Annotated[Optional[str], typer.Option("--input-shape", help="Input shape with batch, e.g. 1x3x224x224.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output directory (artifact and report).")]
OptionalOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="Write report.json and report.md here.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages (warnings and errors still show).")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
SaveRecipe = Annotated[
    Optional[Path],
    typer.Option("--save-recipe", help="Write the recipe this command line is equivalent to, and exit without running."),
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]

# Training options shared by train and distill.
Epochs = Annotated[int, typer.Option("--epochs", "-e", help="Training epochs.")]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]
Optimizer = Annotated[str, typer.Option("--optimizer", help="adamw or sgd.")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="Weight decay.")]
Schedule = Annotated[str, typer.Option("--schedule", help="cosine, step or constant.")]
WarmupEpochs = Annotated[float, typer.Option("--warmup-epochs", help="Linear learning-rate warm-up, in epochs.")]
GradClip = Annotated[Optional[float], typer.Option("--grad-clip", help="Clip the gradient norm to this value.")]
EarlyStopping = Annotated[
    Optional[int], typer.Option("--early-stopping", help="Stop after N epochs without better validation accuracy; keep the best.")
]
Amp = Annotated[str, typer.Option("--amp", help="Mixed precision: off, bf16 (CPU or CUDA) or fp16 (CUDA).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
CheckpointEvery = Annotated[Optional[int], typer.Option("--checkpoint-every", help="Also checkpoint every N steps.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last checkpoint.")]
Nproc = Annotated[int, typer.Option("--nproc", help="Launch N data-parallel processes on this machine (torchrun).")]
