"""Option definitions shared by every command, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

MODEL_HELP = ("torchvision:NAME, FILE.py:FACTORY, package.module:FACTORY (imports your code), hf:DIR (a saved Hugging "
              "Face model; a *ForCausalLM is a decoder), gguf:FILE (a decoder), an mlopt output DIR, an "
              "onnxruntime-genai folder, or FILE.onnx.")
_DATA_HELP = "digits, npz:FILE, imagefolder:DIR, random:SHAPE or text:FILE (one example a line, for hf: models and decoders)."
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
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default 0).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last checkpoint.")]
Nproc = Annotated[int, typer.Option("--nproc", help="Launch N data-parallel processes on this machine (torchrun).")]
