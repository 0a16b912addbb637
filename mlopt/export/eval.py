"""The `eval` step: top-1 accuracy and loss on the validation split, on torch or onnxruntime."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mlopt.core import console
from mlopt.core.contracts import Pass, StepResult
from mlopt.core.sections import Strict
from mlopt.runtime.evaluation import evaluate_artifact


class EvalConfig(Strict):
    """Measure top-1 accuracy and cross-entropy loss on the validation split."""

    type: Literal["eval"] = "eval"
    batch_size: int | None = Field(None, gt=0, description="defaults to the data's batch_size")


class EvalPass(Pass):
    name = "eval"
    config_class = EvalConfig
    produces_model = False
    needs_data = True
    cli_help = "Top-1 accuracy and loss on the validation split, for a torch model, an mlopt DIR or FILE.onnx."

    @classmethod
    def cli_json(cls, step: dict[str, Any]) -> Any:
        return {k: step["metrics"][k] for k in ("accuracy", "loss", "samples")}

    def run(self, artifact: Any, config: EvalConfig, ctx: Any) -> StepResult:
        metrics = evaluate_artifact(artifact, ctx.data, config.batch_size or ctx.batch_size)
        console.info(f"accuracy {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}  ({metrics['samples']} samples)")
        return StepResult(artifact=artifact, metrics=metrics)
