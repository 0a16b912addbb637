"""The `qat` step: quantization-aware training whose INT8 ONNX onnxruntime fully fuses.

The simulation (`mlopt.quant.lib.simulation`) follows onnxruntime's fastest CPU scheme (QDQ, U8S8,
per-channel) at exactly the tensors onnxruntime's quantizer picks for this model: before training
the FP32 export is quantized once, and each quantized tensor is located in the module's torch.fx
graph by value (`mlopt.quant.lib.points`). A model torch.fx cannot trace is simulated at its layer
inputs only. Observers freeze after `freeze_observers_after` epochs and batch-norm statistics after
`freeze_bn_after` (default 0: frozen from the start). Layers with weights other than Conv, Linear
and normalization keep float weights; the report lists them.

The export is the trained model in FP32, quantized by onnxruntime's own quantizer (static QDQ
U8S8 per-channel): the graph onnxruntime turns into QLinearConv/QGemm kernels, so the QAT model
runs exactly as fast as the PTQ one. Every learned range is handed to the quantizer as a
TensorQuantOverride, so the runtime uses the scales the model trained with; a tensor without one is
calibrated by onnxruntime (min/max) and listed. The report checks it: integer and float kernel
counts after onnxruntime's optimisation, per tensor the torch simulation against onnxruntime
(local and end-to-end error, in quantization steps), the int8 weight codes that differ, and the
top-1 agreement between the two on the validation split.

Never worse without saying so. QAT starts from PTQ's static min/max model: onnxruntime calibrates
the FP32 model on the calibration batches, and the observers start from its ranges. That starting
point and the trained model are both scored on the validation split on onnxruntime. The trained one is
handed back unless the starting point scores strictly higher (a tie keeps the trained model), so
QAT is never below its own start. Then, as PTQ's auto mode does (`mlopt.quant.ptq.not_faster_at`,
the one rule both use), the INT8 model is timed against the FP32 model QAT started from, in
interleaved rounds at `batch_sizes`; unless it is faster at every one of them, the FP32 model is
handed back (`keep_int8` forces INT8). The metrics and notes say which model came back and why.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mlopt.core import console
from mlopt.compress.lib.engine import TrainingConfig
from mlopt.core.errors import InputError
from mlopt.core.contracts import Pass, StepResult, cli
from mlopt.quant.lib.alignment import (export_fp32, point_tensors, quantize_with_ranges, runtime_points, runtime_ranges,
                                       runtime_scheme, simulation_errors, weight_grid)
from mlopt.quant.lib.simulation import Simulation, batchnorm_layers, not_simulated


class QATConfig(TrainingConfig):
    """Fine-tune with simulated INT8, then export an INT8 ONNX model onnxruntime fully fuses."""

    type: Literal["qat"] = "qat"
    epochs: int = Field(2, gt=0, description="training epochs", json_schema_extra=cli(short="-e"))
    lr: float = Field(5e-5, gt=0, description="peak learning rate")
    observer: Literal["ema", "lsq"] = Field(
        "ema", description="activation ranges: EMA min/max observers, or a scale and zero point learned by gradient (LSQ+)")
    freeze_observers_after: int = Field(1, ge=0, description="epochs after which activation ranges stop moving")
    freeze_bn_after: int = Field(0, ge=0, description="epochs during which batch-norm statistics still update")
    ema: float = Field(0.9, gt=0, lt=1, description="observer momentum")
    teacher: bool = Field(True, description="distil from the FP32 model while training (logits, T=2, alpha=0.5)")
    calibration_samples: int = Field(256, gt=0, description="samples for the initial ranges")
    runtime_points: bool = Field(True, description="fake-quantize activations at every tensor onnxruntime's quantizer "
                                 "picks (found in the torch.fx graph); false: at Conv/Linear inputs only")
    export_ranges: bool = Field(True, description="hand the learned input ranges to onnxruntime's quantizer "
                                "(otherwise it calibrates the trained model afresh)")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1,
                                   description="batch sizes at which INT8 and FP32 are timed against each other",
                                   json_schema_extra=cli(flag="--bench-batch-size"))
    iterations: int = Field(30, gt=0, description="timed runs per batch size (in three interleaved rounds)")
    keep_int8: bool = Field(False, description="hand back the INT8 model even where it is not faster than the FP32 model "
                            "QAT started from; by default FP32 is handed back then (INT8 is kept only when it is "
                            "faster at every batch size in batch_sizes, timed in interleaved rounds, one session alive "
                            "at a time, each model keeping its best round; a tie counts as not faster)")


def step_clock() -> Any:
    """A module holding the count of training steps taken (a buffer, so checkpoints keep it)."""
    import torch

    class StepClock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("steps", torch.tensor(0, dtype=torch.long))

    return StepClock()


class QATPass(Pass):
    name = "qat"
    config_class = QATConfig
    needs_data = True
    compresses = True
    trains = True
    cli_help = """Quantization-aware training; writes an INT8 ONNX model that onnxruntime fully fuses.

    Hands back the better (validation top-1) of the trained model and its calibrated starting point,
    and the FP32 model it started from where INT8 is not faster (unless --keep-int8).
    """

    def run(self, artifact: Any, config: QATConfig, ctx: Any) -> StepResult:
        if artifact.format != "torch":
            from mlopt.quant.lib import graph

            done = graph.quantized_ops(graph.load(artifact.onnx_path))
            if done:
                raise InputError(f"qat trains a PyTorch model; {artifact.origin} is an ONNX model that is already "
                                 f"quantized ({', '.join(done[:3])}): start from the FP32 PyTorch model it came from")
            raise InputError(f"qat trains a PyTorch model; {artifact.origin} is ONNX (use ptq for ONNX files)")
        from mlopt.runtime.data import require_labels

        require_labels(ctx.data, "QAT")
        work = Path(tempfile.mkdtemp(prefix="mlopt-qat-"))
        try:
            return self._run(artifact, config, ctx, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _run(self, artifact: Any, config: QATConfig, ctx: Any, work: Path) -> StepResult:
        import numpy as np
        import torch

        from mlopt.runtime import distributed
        from mlopt.compress.lib.distillation import distillation_objective
        from mlopt.compress.lib.engine import Objective, fit
        from mlopt.runtime.data import first_inputs
        from mlopt.runtime.evaluation import evaluate_torch, predict_logits
        from mlopt.quant.lib import graph, points
        from mlopt.quant.lib.calibration import calibration_batches
        from mlopt.quant.lib.quantize import INT8_RULE, Quality, latencies, not_faster_at, quantize

        data = ctx.data
        batch = config.batch_size or ctx.batch_size
        fp32_module = copy.deepcopy(artifact.module).eval()
        module = copy.deepcopy(artifact.module)
        floating = not_simulated(module)
        if floating:
            console.warn(f"QAT quantizes the weights of Conv, Linear and LayerNorm layers only; {len(floating)} layer(s) keep float "
                         "weights while training: "
                         + ", ".join(floating[:5]) + (" ..." if len(floating) > 5 else ""))
        # The same calibration batches start the torch ranges and onnxruntime's (for tensors not handed over).
        feeds = calibration_batches(data, "input", ["batch", *artifact.sample_shape], config.calibration_samples)
        probe = first_inputs(data, 64)
        # The FP32 model QAT starts from, as onnxruntime runs it: where it quantizes, the starting
        # point's INT8 model, and the FP32 model handed back when INT8 is not faster.
        start_fp32, start_pre = export_fp32(artifact, fp32_module, data, work, "start")
        found = runtime_points(module, config.runtime_points, start_pre, feeds, probe[:4], work)
        sim = Simulation(module, config.ema, learned=config.observer == "lsq")
        if found.groups:
            sim.place(found.gm, found.groups)
        else:
            sim.hook_layer_inputs()
        if found.why:
            console.warn(f"QAT simulates the inputs of Conv and Linear layers only: {found.why}")
        unplaced = found.unplaced
        if unplaced:
            console.warn(f"{len(unplaced)} tensor(s) onnxruntime quantizes have no counterpart in the torch graph and "
                         f"are calibrated by onnxruntime: {', '.join(unplaced[:5])}{' ...' if len(unplaced) > 5 else ''}")
        model = sim.model  # runs the simulation (the traced graph with its quantization points, or the hooked module)
        sim.calibrate([torch.as_tensor(f["input"]) for f in feeds])
        # The starting point is PTQ's static min/max model: onnxruntime calibrates the FP32 model on the
        # same batches, and the observers start from its ranges where it quantizes the same tensors
        # (the torch calibration above sees int8 weights and differs slightly; it remains for the rest).
        start_int8 = work / "start-int8.onnx"
        quantize(start_pre, start_int8, runtime_scheme(), feeds, False)
        sim.set_ranges(runtime_ranges(start_int8, point_tensors(sim, start_pre, found, probe)))
        bn_layers = batchnorm_layers(module)
        fp32_acc = evaluate_torch(fp32_module, data, batch)["accuracy"]
        sim_before = evaluate_torch(model, data, batch)["accuracy"]
        console.info(f"FP32 top-1 {fp32_acc:.4f}; simulated INT8 before QAT {sim_before:.4f}")

        objective = None
        if config.teacher:
            objective = distillation_objective(copy.deepcopy(fp32_module), model, data, batch, temperature=2.0, alpha=0.5)
        steps_per_epoch = math.ceil(len(data.train) / (batch * distributed.current().world_size))
        clock = step_clock()
        base_loss = objective.loss if objective else None

        def loss(model: Any, x: Any, y: Any, idx: Any) -> Any:
            if model.training:
                clock.steps += 1
            epoch = (int(clock.steps) - 1) // steps_per_epoch  # the epoch this step belongs to
            # The engine puts the model in training mode each epoch; batch norm follows its own schedule.
            for bn in bn_layers:
                bn.train(model.training and epoch < config.freeze_bn_after)
            sim.freeze(epoch >= config.freeze_observers_after)
            if base_loss is not None:
                return base_loss(model, x, y, idx)
            logits = model(x)
            return torch.nn.functional.cross_entropy(logits.float(), y), logits

        # The observers ride along as extra modules: moved to the device and kept in checkpoints.
        obj = Objective(loss=loss, modules=[*(objective.modules if objective else []), *sim.all_observers(), clock],
                        to_device=objective.to_device if objective else None)
        ckpt = ctx.checkpoint_dir / "qat" if ctx.checkpoint_dir else None
        train_cfg = TrainingConfig(**config.model_dump(include=set(TrainingConfig.model_fields)))
        result = fit(model, data, train_cfg, batch, objective=obj, checkpoint_dir=ckpt, resume=ctx.resume,
                     label="qat", fingerprint_extra=["qat"])
        sim.freeze()
        sim_acc = evaluate_torch(model, data, batch)["accuracy"]
        sim_logits = predict_logits(model, data.val, 64).numpy()
        sim.remove()
        module.eval()

        _, pre = export_fp32(artifact, module, data, work, "trained")
        trained_int8 = work / "trained-int8.onnx"
        # A batch norm that follows no convolution cannot be folded: onnxruntime runs it as its
        # own node with quantized scale and bias, which the simulation, holding batch norm in
        # float, does not model.
        unfolded = [n.name or n.output[0] for n in graph.load(pre).graph.node if n.op_type == "BatchNormalization"]
        tensors, handed = quantize_with_ranges(sim, pre, found, probe, feeds, config.export_ranges, trained_int8)
        final = set(points.quantized_tensors(trained_int8))
        calibrated = sorted(final - set(handed))
        kernels = graph.kernel_counts(trained_int8)
        sim.attach()
        errors = simulation_errors(sim, trained_int8, tensors, probe)
        sim.remove()
        grid = weight_grid(sim, trained_int8)
        quality = Quality(start_fp32, data)  # onnxruntime, batches of 64, as sim_logits
        trained_outputs = quality.outputs(trained_int8)
        trained_acc = quality.metrics(trained_outputs)["accuracy"]
        start_acc = quality.score(start_int8)["accuracy"]
        agreement = float((np.concatenate(trained_outputs).argmax(1) == sim_logits.argmax(1)).mean())
        # Never worse than its own starting point: training is kept unless it lost accuracy (a tie keeps it).
        chosen = "trained" if trained_acc >= start_acc else "start"
        int8 = trained_int8 if chosen == "trained" else start_int8
        fp32_lat, int8_lat = latencies([start_fp32, int8], artifact.sample_shape, "cpu", config.batch_sizes, config.iterations)
        slower = not_faster_at(int8_lat, fp32_lat)
        quantized = config.keep_int8 or not slower
        out = Path(ctx.out_dir) / "model.onnx"
        shutil.copyfile(int8 if quantized else start_fp32, out)
        new = artifact.derive("qat", format="onnx", module=None, onnx_path=out)
        int8_acc = trained_acc if chosen == "trained" else start_acc
        accuracy = int8_acc if quantized else quality.baseline["accuracy"]
        metrics = {
            "quantized": quantized,
            "chosen": chosen,
            "start_accuracy": start_acc,
            "trained_accuracy": trained_acc,
            "fp32_accuracy": fp32_acc,
            "fp32_onnx_accuracy": quality.baseline["accuracy"],
            "simulated_accuracy_before": sim_before,
            "simulated_accuracy": sim_acc,
            "accuracy": accuracy,
            "accuracy_drop": fp32_acc - accuracy,
            "simulation_top1_agreement": agreement,
            "integer_kernels": kernels["integer"],
            "float_kernels": kernels["float"],
            "left_in_float": kernels["float_ops"],
            "not_simulated": floating,
            "unfolded_batchnorms": unfolded,
            "simulated_points": "onnxruntime's quantized tensors" if sim.traced else "layer inputs",
            "activation_points": len(sim.points),
            "activation_ranges": len(sim.all_observers()),
            "quantized_tensors": len(final),
            "ranges_handed_to_onnxruntime": len(handed),
            "tensors_calibrated_by_onnxruntime": calibrated,
            "simulation_error": errors,
            "weight_codes": grid,
            "fp32_latency_ms": fp32_lat,
            "int8_latency_ms": int8_lat,
            "latency_ms": int8_lat if quantized else fp32_lat,
            "speedup": {b: fp32_lat[b] / int8_lat[b] for b in fp32_lat},
            "train_samples_per_s": result["train_samples_per_s"],
            "processes": result["processes"],
            "replica_max_abs_diff": result["replica_max_abs_diff"],
            "precision": result["precision"],
        }
        if chosen == "trained":
            picked = (f"kept the trained model: INT8 top-1 {trained_acc:.4f} after QAT against {start_acc:.4f} at its "
                      "calibrated starting point (onnxruntime, validation split; a tie keeps the trained model)")
        else:
            picked = (f"handed back the calibrated starting point: QAT training LOWERED INT8 top-1 to {trained_acc:.4f} "
                      f"from {start_acc:.4f} before training (onnxruntime, validation split)")
        timing = ", ".join(f"batch {b}: INT8 {int8_lat[b]:.3f} ms, FP32 {fp32_lat[b]:.3f} ms" for b in fp32_lat)
        if not slower:
            precision = f"INT8 is faster than the FP32 model QAT started from ({timing})"
        elif config.keep_int8:
            precision = (f"kept INT8 as asked (keep_int8) although it is NOT faster than the FP32 model QAT started from "
                         f"at batch size {', '.join(map(str, slower))} ({timing})")
        else:
            precision = (f"handed back the FP32 model QAT started from (top-1 {quality.baseline['accuracy']:.4f}): the "
                         f"INT8 model (top-1 {int8_acc:.4f}) is NOT faster at batch size {', '.join(map(str, slower))} "
                         f"({timing}; {INT8_RULE}); --keep-int8 forces INT8")
        notes = [picked, precision,
                 f"onnxruntime runs {kernels['integer']} integer and {kernels['float']} float Conv/MatMul/Gemm kernels "
                 "in the trained INT8 model",
                 f"torch simulation and onnxruntime INT8 agree on {100 * agreement:.2f}% of validation top-1 predictions"]
        (console.info if chosen == "trained" else console.warn)(picked)
        (console.info if not slower else console.warn)(precision)
        if errors:
            worst = max(errors, key=lambda r: r["local_max_error_steps"])
            deepest = max(errors, key=lambda r: r["max_error_steps"])
            notes.append(f"{len(errors)} quantized tensors, torch simulation against onnxruntime on {len(probe)} validation "
                         f"samples: each computed from onnxruntime's own inputs, at most {worst['local_max_error_steps']:.0f} "
                         f"quantization step(s) apart ({100 * max(r['local_mismatch'] for r in errors):.2f}% of values at "
                         f"most); run end to end, at most {deepest['max_error_steps']:.0f} steps ({deepest['point']}), as "
                         "one-step differences grow through the layers after them")
        if grid["codes"]:
            notes.append(f"int8 weights (batch norm folded by onnxruntime) equal the simulation's on "
                         f"{grid['codes'] - grid['differing']} of {grid['codes']} codes in {grid['layers']} layers")
        if kernels["float"]:
            console.warn(f"onnxruntime left {kernels['float']} kernel(s) in float: {', '.join(kernels['float_ops'])}")
        if unfolded:
            text = (f"{len(unfolded)} batch norm(s) could not be folded into a convolution ({', '.join(unfolded[:3])}"
                    f"{' ...' if len(unfolded) > 3 else ''}): onnxruntime quantizes them as separate nodes, which "
                    "the simulation does not model; expect a larger gap between simulated and INT8 accuracy")
            console.warn(text)
            notes.append(text)
        console.info(f"QAT: handed back {'INT8' if quantized else 'FP32'}, top-1 {accuracy:.4f} (FP32 {fp32_acc:.4f}); "
                     f"{notes[2]}; {notes[3]}")
        return StepResult(artifact=new, metrics=metrics, notes=notes, sections={"history": result["history"]})
