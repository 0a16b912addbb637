"""The `eval` step: top-1 accuracy and loss on the validation split, on torch or onnxruntime."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mlopt.core import console
from mlopt.core.contracts import Pass, StepResult
from mlopt.core.errors import InputError
from mlopt.core.sections import Config
from mlopt.runtime.evaluation import evaluate_artifact
from mlopt.runtime.generation import artifact_perplexity

class EvalConfig(Config):
    """Measure top-1 accuracy and cross-entropy loss on the validation split (perplexity for decoders)."""

    type: Literal["eval"] = "eval"
    batch_size: int | None = Field(None, gt=0, description="defaults to the data's batch_size")
    window: int = Field(128, ge=2, description="decoders: tokens per perplexity window (fixed, non-overlapping)")


class EvalPass(Pass):
    name = "eval"
    config_class = EvalConfig
    produces_model = False
    needs_data = True
    decoder_ok = True  # perplexity on text
    cli_help = ("Top-1 accuracy and loss on the validation split, for a torch model, an mlopt DIR or FILE.onnx; "
                "perplexity on the text's validation lines for a decoder.")

    @classmethod
    def cli_json(cls, step: dict[str, Any]) -> Any:
        keys = ("perplexity", "nll", "windows", "window", "tokens") if "perplexity" in step["metrics"] else \
            ("accuracy", "loss", "samples")
        return {k: step["metrics"][k] for k in keys}

    @classmethod
    def check_family(cls, config: EvalConfig, decoder: bool) -> None:
        wrong = "batch_size" if decoder else "window"
        if wrong in config.model_fields_set:
            kind = "a decoder language model" if decoder else "a model that is not a decoder language model"
            raise InputError(f"eval's {wrong} does not apply to {kind}")

    def run(self, artifact: Any, config: EvalConfig, ctx: Any) -> StepResult:
        if artifact.is_decoder:
            return self._run_decoder(artifact, config, ctx)
        metrics = evaluate_artifact(artifact, ctx.data, config.batch_size or ctx.batch_size)
        console.info(f"accuracy {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}  ({metrics['samples']} samples)")
        return StepResult(artifact=artifact, metrics=metrics)

    def _run_decoder(self, artifact: Any, config: EvalConfig, ctx: Any) -> StepResult:
        if not ctx.data.text:
            raise InputError(f"perplexity of a decoder needs text:FILE data, not {ctx.data.name}")
        metrics = artifact_perplexity(artifact, ctx.data.val, config.window)
        metrics.pop("window_nll", None)  # per-window figures (for paired intervals) stay out of the report
        console.info(f"perplexity {metrics['perplexity']:.3f}  nll {metrics['nll']:.4f}  ({metrics['windows']} windows "
                     f"of {metrics['window']} tokens, {metrics['tokens']} scored)")
        return StepResult(artifact=artifact, metrics=metrics)
