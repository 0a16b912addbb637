"""The `prune` step: structured (channel) pruning through Torch-Pruning, unstructured and 2:4 sparsity.

The pruned model reloads from its spec, the recorded pruned shapes and a plain state dict.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mlopt.compress.lib import sparsity as sp
from mlopt.compress.lib.calibration import calibration
from mlopt.compress.lib.engine import TrainingConfig, fit, history_table
from mlopt.compress.lib.importance import accumulate_gradients, measure_energy
from mlopt.compress.lib.pruning import (classifier_names, count_ops, head_counts, named_modules, prune_safely,
                                        search_ratio)
from mlopt.core import console
from mlopt.core.contracts import Pass, StepResult, cli
from mlopt.core.errors import InputError, RunError
from mlopt.core.memory import readable_size
from mlopt.core.sections import Bars, Config, Latency, Table
from mlopt.export.lib.onnx import export_either, text_options
from mlopt.export.lib.timing import interleaved_latency
from mlopt.runtime import hf
from mlopt.runtime.data import count, require_labels
from mlopt.runtime.evaluation import evaluate_torch
from mlopt.runtime.models import bake_reparametrized, changed_attributes, reparametrized, shape_attributes, synthetic_input


class PruneConfig(Config):
    """Remove channels (structured) or zero weights (unstructured, 2:4), with optional fine-tuning."""

    type: Literal["prune"] = "prune"
    sparsity: Literal["structured", "unstructured", "2:4"] = "structured"
    ratio: float | None = Field(None, gt=0, lt=1, description="structured: fraction of channels; unstructured: of weights")
    target_macs: float | None = Field(None, gt=0, lt=1, description="structured: keep this fraction of the MACs")
    target_params: float | None = Field(None, gt=0, lt=1, description="structured: keep this fraction of the parameters")
    head_ratio: float | None = Field(
        None, gt=0, lt=1, description="structured: fraction of attention heads to remove, in blocks with a `qkv` Linear "
        "and `num_heads` (timm's ViT layout) or separate query/key/value Linears and a head count (BERT's "
        "`query`/`key`/`value` and `num_attention_heads`, DistilBERT's `q_lin`/`k_lin`/`v_lin` and `n_heads`, ...)")
    importance: Literal["l1", "l2", "bn-scale", "taylor", "lamp", "random", "activation"] = Field(
        "l1", description="how channels are ranked: weight magnitude (l1, l2, lamp), batch-norm scale, weight x "
        "gradient (taylor: labelled data), random, or activation: the energy a channel hands the Linear that reads "
        "it on --data's inputs (labels unused; other channels by l2)")
    reconstruct: bool = Field(False, description="refit each Linear that alone reads pruned channels (an attention "
                              "output, a feed-forward's second layer) by least squares on --data's inputs, so it "
                              "keeps its output; labels unused",
                              json_schema_extra=cli(flag="--reconstruct/--no-reconstruct"))
    calibration_samples: int = Field(256, ge=1, le=65536,
                                     description="inputs that activation importance and the refit read")
    global_ranking: bool = Field(False, description="rank channels (or weights) across layers instead of per layer",
                                 json_schema_extra=cli(flag="--global/--per-layer"))
    round_to: int | None = Field(None, gt=0, description="keep channel counts multiples of this")
    ignore: list[str] = Field(default_factory=list, description="module names left untouched (the classifier always is)")
    steps: int = Field(1, gt=0, description="prune in this many steps, fine-tuning after each")
    finetune: TrainingConfig = Field(default_factory=TrainingConfig, json_schema_extra=cli(omit=("epochs",)),
                                     description="fine-tuning after each step (needs labelled data)")
    finetune_epochs: int = Field(0, ge=0, description="fine-tuning epochs after each step; 0 = none")
    measure_latency: bool = Field(True, description="time the FP32 model before and after on onnxruntime",
                                  json_schema_extra=cli(flag="--latency/--no-latency"))

    @model_validator(mode="after")
    def _targets(self) -> "PruneConfig":
        given = [n for n in ("ratio", "target_macs", "target_params") if getattr(self, n) is not None]
        if self.sparsity == "structured" and (len(given) > 1 or (not given and self.head_ratio is None)):
            raise ValueError("structured pruning needs exactly one of ratio, target_macs, target_params (or head_ratio alone)")
        if self.head_ratio is not None and self.sparsity != "structured":
            raise ValueError("head_ratio applies to structured pruning")
        if self.sparsity == "unstructured" and given != ["ratio"]:
            raise ValueError("unstructured sparsity needs ratio (the fraction of weights set to zero) and no target")
        if self.sparsity == "2:4" and given:
            raise ValueError("2:4 sparsity takes no ratio or target: it zeroes 2 of every 4 weights")
        if "epochs" in self.finetune.model_fields_set:
            raise ValueError("set finetune_epochs (epochs after each step), not finetune.epochs")
        return self


class PrunePass(Pass):
    name = "prune"
    config_class = PruneConfig
    compresses = True
    text_ok = True  # hf: encoders: heads (head_ratio) and widths; fine-tuning needs labels, so distil after it
    cli_help = "Prune channels with Torch-Pruning (or sparsify weights); the result reloads from its directory."

    @classmethod
    def check_text(cls, config: PruneConfig) -> None:
        if config.finetune_epochs:
            raise InputError("fine-tuning after pruning needs labelled data, and text:FILE has none: distil after "
                             "pruning instead (a distill step learns the unpruned model's outputs)")
        if config.importance == "taylor":
            raise InputError("importance 'taylor' needs labelled data (it scores weights by their gradients), and "
                             "text:FILE has none")

    def run(self, artifact: Any, config: PruneConfig, ctx: Any) -> StepResult:
        module = artifact.require_torch("prune")
        if config.sparsity != "structured":  # structured pruning works on copies; sparsity zeroes weights in place
            module = copy.deepcopy(module)
        shape = tuple(artifact.sample_shape)
        sample = (hf.example_inputs(artifact, 1) if hf.is_text_artifact(artifact)  # what pruning traces
                  else shape if artifact.vocab is None else synthetic_input((1, *shape), artifact.vocab, zeros=True))
        data = ctx.data
        labeled = data is not None and data.labeled
        if config.finetune_epochs and not labeled:
            _no_labels(data, "fine-tuning after pruning")
        if config.importance == "taylor" and not labeled:
            _no_labels(data, "importance 'taylor' (it scores weights by their gradients)")
        if (config.importance == "activation" or config.reconstruct) and data is None:
            raise InputError(f"{'--reconstruct' if config.reconstruct else 'importance activation'} reads the "
                             "model's inputs (labels unused): give --data")
        if config.reconstruct and config.sparsity != "structured":
            raise InputError("--reconstruct refits Linears after structured pruning; it does not apply to "
                             f"{config.sparsity} sparsity")
        ignore = [*config.ignore]
        named_modules(module, ignore)  # unknown names are an error before any work
        ignore += [n for n in classifier_names(module, artifact.num_classes, sample) if n not in ignore]
        batch = config.finetune.batch_size or ctx.batch_size
        metrics: dict[str, Any] = {"sparsity": config.sparsity}
        notes: list[str] = []

        metrics["macs_before"], metrics["params_before"] = count_ops(module, sample)
        if labeled:
            metrics["accuracy_before"] = evaluate_torch(module, data, batch)["accuracy"]
        onnx_before = (self._export_fp32(module, artifact, Path(ctx.out_dir) / ".before.onnx", "the model", notes)
                       if config.measure_latency else None)

        finetune_cfg = config.finetune.model_copy(update={"epochs": config.finetune_epochs or 1})
        history: list[dict[str, Any]] = []
        after_step: list[float] = []
        sections: list[Any] = []

        def finetune(module: Any, step: int) -> None:
            if not config.finetune_epochs:
                return
            ckpt = ctx.checkpoint_dir / f"finetune{step}" if ctx.checkpoint_dir else None
            result = fit(module, data, finetune_cfg, batch, checkpoint_dir=ckpt, resume=ctx.resume,
                         label=f"fine-tune {step}/{config.steps}", fingerprint_extra=["prune", step])
            history.extend({"prune step": step, **h} for h in result["history"])
            notes.extend(result["notes"])
            after_step.append(result["accuracy"])

        if config.sparsity == "structured":
            module, builder = self._structured(module, artifact, sample, config, ignore, batch, ctx, metrics, notes,
                                               sections, finetune)
        else:
            self._sparsify(module, config, set(ignore), metrics, notes, finetune)
            builder = artifact.builder

        module.eval()
        metrics["macs_after"], metrics["params_after"] = count_ops(module, sample)
        metrics["macs_ratio"] = metrics["macs_before"] / metrics["macs_after"]
        metrics["params_ratio"] = metrics["params_before"] / metrics["params_after"]
        if labeled:
            metrics["accuracy"] = evaluate_torch(module, data, batch)["accuracy"]
            metrics["accuracy_drop"] = metrics["accuracy_before"] - metrics["accuracy"]
        latency = self._latency_after(module, artifact, ctx, onnx_before, metrics, notes) if onnx_before else []
        if metrics.get("latency_speedup", 1.0) < 1.0 and config.sparsity == "structured":
            # fewer MACs need not run faster: odd channel counts can leave the runtime's kernels less efficient
            slower = (f"the pruned model ran slower than the original on onnxruntime (FP32, batch 1, measured side by "
                      f"side): {metrics['latency_speedup']:.2f}x the original's speed with {metrics['macs_ratio']:.2f}x "
                      "fewer MACs" + ("; channel counts kept to multiples of 8 (--round-to 8) often run faster"
                                      if config.round_to is None else ""))
            console.warn(slower)
            notes.append(slower)
        new = artifact.derive("prune", module=module, builder=builder)
        metrics["size_mb"] = new.size_mb()
        console.info(f"pruned: MACs {metrics['macs_ratio']:.2f}x fewer, parameters {metrics['params_ratio']:.2f}x fewer"
                     + (f", top-1 {metrics['accuracy_before']:.4f} -> {metrics['accuracy']:.4f}" if labeled else ""))
        if after_step:
            sections.append(Bars(title="top-1 after each prune step", labels=[f"step {i + 1}" for i in range(len(after_step))],
                                 series={"top-1": after_step}))
        if history:
            sections.append(history_table(history, "fine-tuning history"))
        return StepResult(artifact=new, metrics=metrics, notes=notes, latency=latency, sections=sections)

    def _structured(self, module: Any, artifact: Any, sample: Any, config: PruneConfig, ignore: list[str], batch: int,
                    ctx: Any, metrics: dict[str, Any], notes: list[str], sections: list[Any],
                    finetune: Any) -> tuple[Any, dict]:
        """Remove channels (and heads) in `config.steps` steps, each from a fresh graph of the model as it is then;
        returns the pruned model and the builder with its pruned shapes."""
        baked = []
        if reparametrized(module):  # weight norm and the like: pruned as the plain weights they compute, on a copy
            module = copy.deepcopy(module)
            baked = bake_reparametrized(module)
            notes.append(f"the reparametrized weights of {_listed(baked)} (weight norm, spectral norm, ...) were "
                         "replaced by the plain weights they compute (same outputs), so that their channels can be cut; "
                         "training after this step trains the plain weights")
            console.info(notes[-1])
        before_shapes, before_heads = shape_attributes(module), head_counts(module)
        ratio, kept = config.ratio, {}
        cal = None
        if config.importance == "activation" or config.reconstruct:
            cal = calibration(ctx.data, batch, config.calibration_samples, config.reconstruct)
            if config.importance == "activation":
                measure_energy(module, cal)
        if ratio is None and config.target_macs is None and config.target_params is None:
            ratio = 0.0  # head_ratio alone (the validator allows nothing else): heads only
        elif ratio is None:
            ratio, reached, kept = search_ratio(module, sample, config, ignore, cal)
            notes.append(f"searched channel ratio {ratio:.4f} (keeps {reached:.3f} of the "
                         f"{'MACs' if config.target_macs else 'parameters'})")
        metrics["ratio"] = ratio
        for step in range(1, config.steps + 1):
            if config.importance == "taylor":
                accumulate_gradients(module, ctx.data, batch)
            if cal is not None and config.importance == "activation" and step > 1:
                measure_energy(module, cal)  # the model as the last step left it
            outcome = prune_safely(module, sample, config, _step_ratio(ratio, step, config.steps),
                                   None if config.head_ratio is None else
                                   _step_ratio(config.head_ratio, step, config.steps), ignore, kept, cal)
            module.zero_grad(set_to_none=True)  # Taylor's gradients on the model pruned from
            module, kept = outcome.module, outcome.kept
            module.zero_grad(set_to_none=True)
            console.info(f"prune step {step}/{config.steps}: {count_ops(module, sample)[0] / metrics['macs_before']:.3f} "
                         f"of the MACs left" + (f", {len(kept)} groups kept whole" if kept else ""))
            if cal is not None and cal.reconstruct:
                console.info(f"prune step {step}/{config.steps}: refitted {len(cal.refitted)} Linears by least "
                             f"squares on {sum(count(b) for b in cal.batches)} inputs")
            finetune(module, step)
        metrics["groups_kept_whole"] = len(kept)
        if cal is not None:
            metrics["calibration_samples"] = sum(count(b) for b in cal.batches)
        if cal is not None and cal.reconstruct:
            metrics["refitted_linears"] = len(cal.refitted)
            if cal.refitted:
                notes.append(f"refitted {len(cal.refitted)} Linears that read pruned channels by least squares on "
                             f"{metrics['calibration_samples']} inputs (the last step's)")
            elif not cal.too_wide:
                notes.append("--reconstruct found no Linear that alone reads pruned channels: nothing was refitted")
            if cal.too_wide:
                metrics["linears_too_wide_to_refit"] = len(cal.too_wide)
                name, need = max(cal.too_wide, key=lambda t: t[1])
                message = (f"{len(cal.too_wide)} Linears that read pruned channels were not refitted (they lose "
                           f"those channels as they are): the refit needs more than half the memory this machine "
                           f"can give (up to {readable_size(need)}, for {name})")
                notes.append(message)
                console.warn(message)
        if kept:
            console.warn(f"{len(kept)} groups of layers kept whole (Torch-Pruning cannot prune them safely): "
                         + "; ".join(f"{k.layers[0]}: {k.reason}" for k in list(kept.values())[:3])
                         + ("; ..." if len(kept) > 3 else "") + " (all in the report)")
            sections.append(Table(title="groups kept whole", columns=["layers", "reason"],
                                  rows=[[", ".join(k.layers), k.reason] for k in kept.values()]))
        pruned = changed_attributes(before_shapes, shape_attributes(module))
        heads = head_counts(module)
        cut = [n for n, h in heads.items() if before_heads.get(n, h) != h]
        sections += [bars for bars in (
            _before_after(before_shapes, pruned, ("out_channels", "out_features", "embed_dim"), "output channels per layer"),
            Bars(title="attention heads per block", labels=cut,
                 series={"before": [before_heads[n] for n in cut], "after": [heads[n] for n in cut]}))
            if bars.labels]
        builder = {**artifact.builder, "pruned": {**(artifact.builder or {}).get("pruned", {}), **pruned}}
        if baked:  # a reload builds the reparametrized model and bakes these before loading the plain weights
            builder["baked"] = sorted({*(artifact.builder or {}).get("baked", []), *baked})
        if "hf" in builder and cut:  # onnxruntime's transformer optimizer fuses attention with this head count
            left = set(heads.values())
            builder["hf"] = {**builder["hf"], "num_heads": left.pop() if len(left) == 1 else 0}  # 0: its own guess
        return module, builder

    @staticmethod
    def _sparsify(module: Any, config: PruneConfig, ignored: set[str], metrics: dict[str, Any], notes: list[str],
                  finetune: Any) -> None:
        """Zero weights (magnitude on a cubic schedule, or 2:4) in `config.steps` steps, then make it permanent."""
        for step in range(1, config.steps + 1):
            if config.sparsity == "2:4":
                sp.apply_two_four(module, ignored)
            else:
                sp.apply_magnitude(module, sp.cubic_schedule(config.ratio, step, config.steps), ignored,
                                   config.global_ranking)
            finetune(module, step)
        sp.make_permanent(module)
        metrics["zero_fraction"] = sp.zero_fraction(module, ignored)
        notes.append("onnxruntime on the CPU runs zeroed weights as dense: sparsity shrinks the compressed "
                     "file, not the latency (both measured below)")

    def _export_fp32(self, module: Any, artifact: Any, path: Path, what: str, notes: list[str],
                     exporter: str = "dynamo") -> tuple[Path, str] | None:
        """(`path`, the exporter used) for the latency figures; None, with a warning, when neither exporter can
        export `what` (the latency is then not measured: pruning does not need it)."""
        text = text_options(artifact, hf.example_inputs(artifact, 2)) if hf.is_text_artifact(artifact) else {}
        try:  # no copy: memory is the limit on big models
            used, fell_back = export_either(module.eval(), tuple(artifact.sample_shape), path, 18, exporter,
                                            vocab=artifact.vocab, **text)
        except RunError as exc:
            path.unlink(missing_ok=True)
            message = f"latency not measured: {what} does not export to ONNX ({exc})"
            console.warn(message)
            notes.append(message)
            return None
        if fell_back:
            notes.append(fell_back)
        return path, used

    def _latency_after(self, module: Any, artifact: Any, ctx: Any, exported: tuple[Path, str],
                       metrics: dict[str, Any], notes: list[str]) -> list[Latency]:
        """onnxruntime FP32 latency and gzip size of the model before and after, measured side by side."""
        shape = tuple(artifact.sample_shape)
        before, exporter = exported
        done = self._export_fp32(module, artifact, Path(ctx.out_dir) / ".after.onnx", "the pruned model", notes,
                                 exporter)
        if done is None:
            before.unlink()
            return []
        after = done[0]
        lat_before, lat_after = interleaved_latency([before, after], shape, "cpu", [1], 30)
        metrics["latency_speedup"] = lat_before[1] / lat_after[1]
        metrics["onnx_gzip_mb_before"], metrics["onnx_gzip_mb_after"] = sp.gzip_mb(before), sp.gzip_mb(after)
        before.unlink()
        after.unlink()
        method = "onnxruntime FP32 on the CPU, before and after in interleaved rounds, best round's median"
        return [Latency(batch_size=1, p50_ms=lat[1], method=method, model=name, output=name == "after")
                for name, lat in (("before", lat_before), ("after", lat_after))]


def _step_ratio(ratio: float, step: int, steps: int) -> float:
    """The fraction of the remaining channels to prune at `step` so that `ratio` of the original is gone after
    `steps` equal steps."""
    done, goal = ratio * (step - 1) / steps, ratio * step / steps
    return (goal - done) / (1 - done)


def _before_after(before: dict[str, dict[str, Any]], pruned: dict[str, dict[str, Any]], keys: tuple[str, ...],
                  title: str) -> Bars:
    """What pruning changed of `keys` (channels, heads), per layer, before and after."""
    changed = [(name, key) for name, attrs in pruned.items() for key in keys if key in attrs]
    return Bars(title=title, labels=[name for name, _ in changed],
                series={"before": [before[n][k] for n, k in changed], "after": [pruned[n][k] for n, k in changed]})


def _no_labels(data: Any, why: str) -> None:
    """Refuse `why` for want of labels, saying why the data has none (require_labels), or that none was given."""
    if data is None:
        raise InputError(f"{why} needs labelled data: give --data")
    require_labels(data, why)


def _listed(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
