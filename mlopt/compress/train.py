"""The `train` pass: supervised training of the current torch model."""

from __future__ import annotations

from typing import Any, Literal

from mlopt.compress.lib.engine import TrainingConfig, fit, history_table
from mlopt.core import console
from mlopt.core.contracts import Pass, StepResult


class TrainConfig(TrainingConfig):
    """Train (or fine-tune) the current model on the recipe's data."""

    type: Literal["train"] = "train"


class TrainPass(Pass):
    name = "train"
    config_class = TrainConfig
    needs_data = True
    trains = True
    cli_help = """Train a model on labelled data. Writes model.pt, model.json and a report.

    Mixed precision with --amp, data parallelism with --nproc (or torchrun), checkpoints and --resume.
    """

    def run(self, artifact: Any, config: TrainConfig, ctx: Any) -> StepResult:
        module = artifact.require_torch("train")
        batch = config.batch_size or ctx.batch_size
        result = fit(module, ctx.data, config, batch, checkpoint_dir=ctx.checkpoint_dir, resume=ctx.resume)
        history, notes = result.pop("history"), result.pop("notes")
        new = artifact.derive("train", module=module)
        result.update(params=new.params(), size_mb=new.size_mb())
        console.info(f"validation accuracy {result['accuracy']:.4f} after {config.epochs} epoch(s)")
        return StepResult(artifact=new, metrics=result, notes=notes, sections=[history_table(history)])
