"""The `qat` step: quantization-aware training whose INT8 ONNX onnxruntime fully fuses.

The simulation (`mlopt.quant.lib.simulation`) follows onnxruntime's fastest CPU scheme (QDQ, U8S8,
per-channel) at exactly the tensors onnxruntime's quantizer picks for this model, located in the
module's torch.fx graph by value (`mlopt.quant.lib.points`); a model torch.fx cannot trace is
simulated at its layer inputs only. Layers with weights other than Conv, Linear and normalization
keep float weights; the report lists them.

The export is the trained model in FP32, quantized by onnxruntime's own quantizer (static QDQ U8S8
per-channel) with every learned range handed over as a TensorQuantOverride: onnxruntime turns that
graph into QLinearConv/QGemm kernels, so QAT runs exactly as fast as PTQ, on the scales the model
trained with; a tensor without a range is calibrated by onnxruntime and listed. The report checks
it (`mlopt.quant.lib.alignment`): integer and float kernel counts, per tensor the simulation against
onnxruntime (in quantization steps), the int8 weight codes that differ, the top-1 agreement.
QAT starts from PTQ's static min/max model, and hands back what `_finish` says.

On hf: text encoders (`--data text:FILE`, no labels) QAT follows onnxruntime's dynamic INT8 instead, the scheme it
runs fastest there (`mlopt.quant.lib.dynamic_sim`): the model learns the FP32 model's outputs through the simulation
(label-free distillation, as `distill` on text), and the trained model goes through ptq's search of dynamic INT8
graphs (`mlopt.quant.lib.search`), scored against the FP32 model it started from.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from mlopt.compress.lib.distillation import distillation_objective, text_distillation_objective
from mlopt.compress.lib.engine import Objective, TrainingConfig, cross_entropy, fit, history_table
from mlopt.core import console
from mlopt.core.contracts import Pass, StepResult, cli
from mlopt.core.errors import InputError
from mlopt.core.sections import BatchSize, Table
from mlopt.export.lib.onnx import ExportOptions, export_checked
from mlopt.export.lib.timing import interleaved_latency
from mlopt.quant.lib import graph, points
from mlopt.quant.lib.alignment import (RUNTIME_SCHEME, RuntimePoints, export_fp32, point_tensors, range_overrides,
                                       runtime_points, runtime_ranges, simulation_error_sections, simulation_errors,
                                       weight_grid)
from mlopt.quant.lib.quantize import (INT8_RULE, Quality, Scheme, latency_entries, not_faster_at, quantize,
                                      reduce_range_for, speedups)
from mlopt.quant.lib.simulation import Simulation, batchnorm_layers, not_simulated
from mlopt.runtime import distributed, hf
from mlopt.runtime.data import first_inputs, require_labels
from mlopt.runtime.evaluation import evaluate_torch, predict_logits


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
    batch_sizes: list[BatchSize] = Field(default_factory=lambda: [1, 32], min_length=1,
                                   description="batch sizes at which INT8 and FP32 are timed against each other",
                                   json_schema_extra=cli(flag="--bench-batch-size"))
    iterations: int = Field(30, gt=0, description="timed runs per batch size (in three interleaved rounds)")
    keep_int8: bool = Field(False, description="hand back the INT8 model even where it is not faster than the FP32 model "
                            f"QAT started from; by default FP32 is handed back then ({INT8_RULE})")

    @field_validator("shard")
    @classmethod
    def _no_shard(cls, value: bool) -> bool:
        if value:  # the observers hook into the module the simulation wraps; a sharded copy would bypass them
            raise ValueError("qat does not shard (--shard): its quantization observers must see the whole model; "
                             "run it data-parallel with --nproc instead")
        return value


class QATPass(Pass):
    name = "qat"
    config_class = QATConfig
    needs_data = True
    compresses = True
    trains = True
    text_ok = True  # hf: encoders on text:FILE: dynamic INT8, learning the FP32 model's outputs
    cli_help = """Quantization-aware training; writes an INT8 ONNX model that onnxruntime fully fuses.

    Hands back the better (validation top-1) of the trained model and its calibrated starting point,
    and the FP32 model it started from where INT8 is not faster (unless --keep-int8). On hf: encoders
    with text:FILE: dynamic INT8, trained on the FP32 model's outputs (no labels), scored by cosine.
    """

    @classmethod
    def check_text(cls, config: QATConfig) -> None:
        """On text, QAT simulates dynamic INT8 and learns the FP32 model's outputs: options of the static CNN
        scheme, and training without the teacher, are refused, not ignored."""
        static = ("observer", "freeze_observers_after", "freeze_bn_after", "ema", "calibration_samples",
                  "runtime_points", "export_ranges")
        given = [f for f in static if f in config.model_fields_set]
        if given:
            raise InputError(f"qat on text: {given[0].replace('_', '-')} is not supported (it sets the static "
                             "activation ranges of image models; an encoder's dynamic INT8 computes its ranges as it runs)")
        if not config.teacher:
            raise InputError("qat on text: no-teacher is not supported (text:FILE has no labels; the model learns the "
                             "FP32 model's outputs)")

    def run(self, artifact: Any, config: QATConfig, ctx: Any) -> StepResult:
        if artifact.format != "torch":
            done = graph.quantized_ops(graph.load(artifact.onnx_path))
            if done:
                raise InputError(f"qat trains a PyTorch model; {artifact.origin} is an ONNX model that is already "
                                 f"quantized ({', '.join(done[:3])}): start from the FP32 PyTorch model it came from")
            raise InputError(f"qat trains a PyTorch model; {artifact.origin} is ONNX (use ptq for ONNX files)")

        if getattr(ctx.data, "text", False):
            self.check_text(config)
            if not hf.is_text_artifact(artifact):
                raise InputError("qat on text:FILE needs an hf: model")
            with tempfile.TemporaryDirectory(prefix="mlopt-qat-", ignore_cleanup_errors=True) as work:
                return _run_text(artifact, config, ctx, Path(work))
        require_labels(ctx.data, "QAT")
        with tempfile.TemporaryDirectory(prefix="mlopt-qat-", ignore_cleanup_errors=True) as work:
            state = _prepare(artifact, config, ctx, Path(work))
            fitted = _train(state, config, ctx)
            _export_trained(state, config)
            return _finish(state, config, fitted, Path(ctx.out_dir) / "model.onnx")


@dataclass
class QATState:
    """What the phases of a QAT run share. `_prepare` fills the first block, `_train` the simulated
    accuracy, `_export_trained` the trained INT8 model and its checks."""

    artifact: Any
    data: Any
    batch: int
    work: Path
    fp32_module: Any  # the FP32 module QAT starts from (teacher, reference)
    sim: Simulation  # sim.module: the copy that trains
    found: RuntimePoints
    feeds: list[dict[str, Any]]  # calibration batches (torch ranges and onnxruntime's)
    probe: Any  # a few validation inputs for locating and comparing tensors
    start_fp32: Path  # the FP32 model as exported before training
    start_int8: Path  # PTQ's static min/max model of it: QAT's starting point
    floating: list[str]  # layers whose weights the simulation does not quantize
    fp32_acc: float
    sim_before: float
    sim_acc: float = 0.0
    sim_logits: Any = None
    trained_int8: Path | None = None
    unfolded: list[str] = field(default_factory=list)  # batch norms onnxruntime cannot fold
    handed: dict[str, Any] = field(default_factory=dict)  # ranges handed to onnxruntime's quantizer
    quantized_tensors: int = 0
    calibrated: list[str] = field(default_factory=list)  # quantized tensors onnxruntime calibrated itself
    kernels: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    grid: dict[str, int] = field(default_factory=dict)


def _prepare(artifact: Any, config: QATConfig, ctx: Any, work: Path) -> QATState:
    """The simulation placed where onnxruntime quantizes, its ranges started from PTQ's static min/max model."""
    import torch

    from mlopt.quant.lib.calibration import calibration_batches

    data, batch = ctx.data, config.batch_size or ctx.batch_size
    fp32_module = copy.deepcopy(artifact.module).eval()
    module = copy.deepcopy(artifact.module)
    floating = not_simulated(module)
    if floating:
        console.warn(f"QAT quantizes the weights of Conv, Linear and LayerNorm layers only; {len(floating)} layer(s) keep "
                     "float weights while training: " + ", ".join(floating[:5]) + (" ..." if len(floating) > 5 else ""))
    # The same calibration batches start the torch ranges and onnxruntime's (for tensors not handed over).
    feeds = calibration_batches(data, "input", ["batch", *artifact.sample_shape], config.calibration_samples)
    probe = first_inputs(data, 64)
    # The FP32 model as onnxruntime runs it: where it quantizes, the starting point, the FP32 fallback.
    start_fp32, start_pre = export_fp32(artifact, fp32_module, data, work, "start")
    found = runtime_points(module, config.runtime_points, start_pre, feeds, probe[:4], work)
    sim = Simulation(module, config.ema, learned=config.observer == "lsq")
    if found.groups:
        sim.place(found.gm, found.groups)
    else:
        sim.hook_layer_inputs()
    if found.why:
        console.warn(f"QAT simulates the inputs of Conv and Linear layers only: {found.why}")
    unplaced = [t for t in found.tensors if t not in found.nodes]
    if unplaced:
        console.warn(f"{len(unplaced)} tensor(s) onnxruntime quantizes have no counterpart in the torch graph and "
                     f"are calibrated by onnxruntime: {', '.join(unplaced[:5])}{' ...' if len(unplaced) > 5 else ''}")
    sim.calibrate([torch.as_tensor(f["input"]) for f in feeds])
    # The observers start from PTQ's static min/max ranges where onnxruntime quantizes the same tensors (the
    # torch calibration above sees int8 weights and differs slightly; it remains for the rest).
    start_int8 = work / "start-int8.onnx"
    quantize(start_pre, start_int8, RUNTIME_SCHEME, feeds, False)
    sim.set_ranges(runtime_ranges(start_int8, point_tensors(sim, start_pre, found, probe)))
    fp32_acc = evaluate_torch(fp32_module, data, batch)["accuracy"]
    sim_before = evaluate_torch(sim.model, data, batch)["accuracy"]
    console.info(f"FP32 top-1 {fp32_acc:.4f}; simulated INT8 before QAT {sim_before:.4f}")
    return QATState(artifact, data, batch, work, fp32_module, sim, found, feeds, probe, start_fp32, start_int8, floating,
                    fp32_acc, sim_before)


def _train(st: QATState, config: QATConfig, ctx: Any) -> dict[str, Any]:
    """Fine-tune the simulated model (distilling from FP32 unless told not to); returns `fit`'s result."""
    import torch

    model, data, batch, sim = st.sim.model, st.data, st.batch, st.sim
    objective = (distillation_objective(copy.deepcopy(st.fp32_module), model, data, batch, temperature=2.0, alpha=0.5)
                 if config.teacher else None)
    steps_per_epoch = math.ceil(len(data.train) / (batch * distributed.current().world_size))
    clock = torch.nn.Module()  # the count of training steps taken, in a buffer so checkpoints keep it
    clock.register_buffer("steps", torch.tensor(0, dtype=torch.long))
    bn_layers = batchnorm_layers(sim.module)
    base_loss = objective.loss if objective else cross_entropy

    def loss(model: Any, x: Any, y: Any, idx: Any) -> Any:
        if model.training:
            clock.steps += 1
        epoch = (int(clock.steps) - 1) // steps_per_epoch  # the epoch this step belongs to
        # The engine puts the model in training mode each epoch; batch norm follows its own schedule.
        for bn in bn_layers:
            bn.train(model.training and epoch < config.freeze_bn_after)
        sim.freeze(epoch >= config.freeze_observers_after)
        return base_loss(model, x, y, idx)

    # The observers ride along as extra modules: moved to the device and kept in checkpoints.
    obj = Objective(loss=loss, modules=[*(objective.modules if objective else []), *sim.all_observers(), clock],
                    to_device=objective.to_device if objective else None)
    ckpt = ctx.checkpoint_dir / "qat" if ctx.checkpoint_dir else None
    train_cfg = TrainingConfig(**config.model_dump(include=set(TrainingConfig.model_fields)))
    result = fit(model, data, train_cfg, batch, objective=obj, checkpoint_dir=ckpt, resume=ctx.resume,
                 label="qat", fingerprint_extra=["qat"])
    sim.freeze()
    st.sim_acc = evaluate_torch(model, data, batch)["accuracy"]
    st.sim_logits = predict_logits(model, data.val, 64).numpy()
    sim.remove()
    sim.module.eval()
    return result


def _export_trained(st: QATState, config: QATConfig) -> None:
    """The trained model exported and quantized by onnxruntime with the learned ranges, and checked against the simulation."""
    _, pre = export_fp32(st.artifact, st.sim.module, st.data, st.work, "trained")
    st.trained_int8 = st.work / "trained-int8.onnx"
    # A batch norm that follows no convolution cannot be folded: onnxruntime runs it as its own node with
    # quantized scale and bias, which the simulation, holding batch norm in float, does not model.
    st.unfolded = [n.name or n.output[0] for n in graph.load(pre).graph.node if n.op_type == "BatchNormalization"]
    tensors = point_tensors(st.sim, pre, st.found, st.probe)
    st.handed = range_overrides(st.sim, tensors) if config.export_ranges else {}
    quantize(pre, st.trained_int8, RUNTIME_SCHEME, st.feeds, False, overrides=st.handed)
    final = set(points.quantized_tensors(st.trained_int8))
    st.quantized_tensors, st.calibrated = len(final), sorted(final - set(st.handed))
    st.kernels = graph.kernel_counts(st.trained_int8)
    st.sim.attach()
    st.errors = simulation_errors(st.sim, st.trained_int8, tensors, st.probe)
    st.sim.remove()
    st.grid = weight_grid(st.sim, st.trained_int8)


def _finish(st: QATState, config: QATConfig, fitted: dict[str, Any], out: Path) -> StepResult:
    """Trained or starting point (the better INT8 top-1 on onnxruntime), then INT8 or FP32 (faster at every batch
    size), handed back with scalar metrics, notes, both models' latencies and the report sections."""
    import numpy as np

    quality = Quality(st.start_fp32, st.data)  # onnxruntime, batches of 64, as sim_logits
    trained_outputs = quality.outputs(st.trained_int8)
    trained_acc = quality.metrics(trained_outputs)["accuracy"]
    start_acc = quality.score(st.start_int8)["accuracy"]
    agreement = float((np.concatenate([outs[0] for outs in trained_outputs]).argmax(1) == st.sim_logits.argmax(1)).mean())
    # Never worse than its own starting point: training is kept unless it lost accuracy (a tie keeps it).
    chosen = "trained" if trained_acc >= start_acc else "start"
    int8, int8_acc = (st.trained_int8, trained_acc) if chosen == "trained" else (st.start_int8, start_acc)
    fp32_latency, int8_latency = interleaved_latency([st.start_fp32, int8], st.artifact.sample_shape, "cpu",
                                                     config.batch_sizes, config.iterations)
    slower = not_faster_at(int8_latency, fp32_latency)  # batch sizes at which INT8 is not faster
    quantized = config.keep_int8 or not slower
    fp32_onnx_acc = quality.baseline["accuracy"]
    accuracy = int8_acc if quantized else fp32_onnx_acc
    shutil.copyfile(int8 if quantized else st.start_fp32, out)
    new = st.artifact.derive("qat", format="onnx", module=None, onnx_path=out)
    metrics = {
        "quantized": quantized, "chosen": chosen,
        "start_accuracy": start_acc, "trained_accuracy": trained_acc,
        "fp32_accuracy": st.fp32_acc, "fp32_onnx_accuracy": fp32_onnx_acc,
        "simulated_accuracy_before": st.sim_before, "simulated_accuracy": st.sim_acc,
        "accuracy": accuracy, "accuracy_drop": st.fp32_acc - accuracy,
        "simulation_top1_agreement": agreement,
        "integer_kernels": st.kernels["integer"], "float_kernels": st.kernels["float"],
        "not_simulated": len(st.floating), "unfolded_batchnorms": len(st.unfolded),
        "simulated_points": "onnxruntime's quantized tensors" if st.sim.traced else "layer inputs",
        "activation_points": len(st.sim.points), "activation_ranges": len(st.sim.all_observers()),
        "quantized_tensors": st.quantized_tensors, "ranges_handed_to_onnxruntime": len(st.handed),
        "tensors_calibrated_by_onnxruntime": len(st.calibrated),
        "weight_layers": st.grid["layers"], "weight_codes": st.grid["codes"], "weight_codes_differing": st.grid["differing"],
        **speedups(fp32_latency, int8_latency),
        **{k: fitted[k] for k in ("train_samples_per_s", "processes", "replica_max_abs_diff", "precision")},
    }
    latency = (latency_entries(fp32_latency, "FP32", "cpu", output=not quantized)
               + latency_entries(int8_latency, "INT8", "cpu", output=quantized))
    # What runs in float, or outside the simulation, by name (the metrics count them).
    left_out = ([["kernel left in float by onnxruntime", op] for op in st.kernels["float_ops"]]
                + [["layer with float weights in the simulation", name] for name in st.floating]
                + [["batch norm not folded into a convolution", name] for name in st.unfolded]
                + [["tensor calibrated by onnxruntime", name] for name in st.calibrated])
    sections = simulation_error_sections(st.errors)
    if left_out:
        sections.append(Table(title="left in float or outside the simulation", columns=["what", "name"], rows=left_out))
    sections.append(history_table(fitted["history"]))
    if chosen == "trained":
        picked = (f"kept the trained model: INT8 top-1 {trained_acc:.4f} after QAT against {start_acc:.4f} at its "
                  "calibrated starting point (onnxruntime, validation split; a tie keeps the trained model)")
    else:
        picked = (f"handed back the calibrated starting point: QAT training LOWERED INT8 top-1 to {trained_acc:.4f} "
                  f"from {start_acc:.4f} before training (onnxruntime, validation split)")
    timing = ", ".join(f"batch {b}: INT8 {int8_latency[b]:.3f} ms, FP32 {ms:.3f} ms" for b, ms in fp32_latency.items())
    if not slower:
        precision = f"INT8 is faster than the FP32 model QAT started from ({timing})"
    elif config.keep_int8:
        precision = (f"kept INT8 as asked (keep_int8) although it is NOT faster than the FP32 model QAT started from "
                     f"at batch size {', '.join(map(str, slower))} ({timing})")
    else:
        precision = (f"handed back the FP32 model QAT started from (top-1 {fp32_onnx_acc:.4f}): the INT8 model "
                     f"(top-1 {int8_acc:.4f}) is NOT faster at batch size {', '.join(map(str, slower))} "
                     f"({timing}; {INT8_RULE}); --keep-int8 forces INT8")
    (console.info if chosen == "trained" else console.warn)(picked)
    (console.info if not slower else console.warn)(precision)
    notes = [picked, precision, *_simulation_notes(st, agreement)]
    console.info(f"QAT: handed back {'INT8' if quantized else 'FP32'}, top-1 {accuracy:.4f} (FP32 "
                 f"{st.fp32_acc:.4f}); {notes[2]}; {notes[3]}")
    return StepResult(artifact=new, metrics=metrics, notes=notes, latency=latency, sections=sections)


def _simulation_notes(st: QATState, agreement: float) -> list[str]:
    """How well the simulation matches onnxruntime, and what it leaves out (also on the console)."""
    kernels, errors, grid = st.kernels, st.errors, st.grid
    notes = [f"onnxruntime runs {kernels['integer']} integer and {kernels['float']} float Conv/MatMul/Gemm kernels "
             "in the trained INT8 model",
             f"torch simulation and onnxruntime INT8 agree on {100 * agreement:.2f}% of validation top-1 predictions"]
    if errors:
        worst = max(errors, key=lambda r: r["local_max_error_steps"])
        deepest = max(errors, key=lambda r: r["max_error_steps"])
        notes.append(f"{len(errors)} quantized tensors, torch simulation against onnxruntime on {len(st.probe)} validation "
                     f"samples: each computed from onnxruntime's own inputs, at most {worst['local_max_error_steps']:.0f} "
                     f"quantization step(s) apart ({100 * max(r['local_mismatch'] for r in errors):.2f}% of values at "
                     f"most); run end to end, at most {deepest['max_error_steps']:.0f} steps ({deepest['point']}), as "
                     "one-step differences grow through the layers after them")
    if grid["codes"]:
        notes.append(f"int8 weights (batch norm folded by onnxruntime) equal the simulation's on "
                     f"{grid['codes'] - grid['differing']} of {grid['codes']} codes in {grid['layers']} layers")
    if kernels["float"]:
        console.warn(f"onnxruntime left {kernels['float']} kernel(s) in float: {', '.join(kernels['float_ops'])}")
    if st.unfolded:
        text = (f"{len(st.unfolded)} batch norm(s) could not be folded into a convolution ({', '.join(st.unfolded[:3])}"
                f"{' ...' if len(st.unfolded) > 3 else ''}): onnxruntime quantizes them as separate nodes, which "
                "the simulation does not model; expect a larger gap between simulated and INT8 accuracy")
        console.warn(text)
        notes.append(text)
    return notes


def _run_text(artifact: Any, config: QATConfig, ctx: Any, work: Path) -> StepResult:
    """QAT of an hf: encoder for onnxruntime's dynamic INT8: the Linear layers onnxruntime quantizes are located in
    the exported model and simulated; the model learns the FP32 model's outputs through the simulation; then the
    trained model or the one it started from (whichever onnxruntime's INT8 keeps closer to the FP32 model: training
    is kept on a tie) goes through ptq's search of dynamic INT8 graphs, scored against the FP32 model. The fastest
    INT8 graph is handed back where it is faster than FP32 (or --keep-int8), else the FP32 model QAT started from."""
    import torch

    from mlopt.quant.lib import search
    from mlopt.quant.lib.dynamic_sim import DynamicSimulation, locate

    data, batch = ctx.data, config.batch_size or ctx.batch_size
    teacher = copy.deepcopy(artifact.require_torch("qat")).eval()
    student = copy.deepcopy(teacher).train()
    # No dropout while learning the FP32 model's own outputs: its noise dwarfs the quantization error to correct
    # (measured on a tiny BERT: training loss 1.1 with dropout against a validation loss of 0.1). Dropout modules,
    # and the dropout rates some attention blocks hold as plain floats (CLIP, BART), go to 0. The student is not
    # handed on as a torch model, only its ONNX export, which has no dropout.
    for m in student.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if "dropout" in name and type(value) is float:
                setattr(m, name, 0.0)
    reduce_range = reduce_range_for("auto")
    scheme = Scheme("dynamic", "qoperator", "uint8", "int8", True, None)
    start_fp32, start_int8 = work / "start-fp32.onnx", work / "start-int8.onnx"
    export_checked(artifact.derive("qat-start", module=teacher), data, start_fp32, ExportOptions())
    quantize(start_fp32, start_int8, scheme, [], reduce_range)
    found = locate(start_fp32, start_int8, student)
    modules = dict(student.named_modules())
    tables = sum(isinstance(modules[name], torch.nn.Embedding) for name in found.layers)
    notes = [f"onnxruntime's dynamic INT8 quantizes the weights and inputs of {len(found.layers) - tables} Linear "
             f"layer(s) and {tables} embedding table(s), located by weight value in the exported model; the "
             "simulation fake-quantizes exactly those"]
    if found.float_layers:
        notes.append(f"{len(found.float_layers)} Linear layer(s) stay float in onnxruntime and in the simulation: "
                     + ", ".join(found.float_layers[:5]) + (" ..." if len(found.float_layers) > 5 else ""))
    if found.unmatched:
        notes.append(f"{len(found.unmatched)} weight(s) onnxruntime quantizes belong to no Linear or Embedding layer "
                     "and are not simulated: " + ", ".join(found.unmatched[:5]))
        console.warn(notes[-1])
    quality = Quality(start_fp32, data, max_drop=1.0, min_cosine=0.0)  # no budget: QAT keeps the closer model
    start_cosine = quality.score(start_int8)["cosine_mean"]
    sim = DynamicSimulation(student, list(found.layers), reduce_range)
    sim.attach()
    try:
        objective = text_distillation_objective(teacher, student, data, batch, 2.0)
        simulated_before = objective.validate(student, torch.device("cpu"))["cosine"]
        console.info(f"dynamic INT8 on onnxruntime before QAT: cosine {start_cosine:.5f} to FP32; simulated "
                     f"{simulated_before:.5f}")
        ckpt = ctx.checkpoint_dir / "qat" if ctx.checkpoint_dir else None
        train_cfg = TrainingConfig(**config.model_dump(include=set(TrainingConfig.model_fields)))
        fitted = fit(student, data, train_cfg, batch, objective=objective, checkpoint_dir=ckpt, resume=ctx.resume,
                     label="qat", fingerprint_extra=["qat", "text", sim.qmax])
    finally:
        sim.remove()
    student.eval()
    trained_fp32, trained_int8 = work / "trained-fp32.onnx", work / "trained-int8.onnx"
    exported = export_checked(artifact.derive("qat", module=student), data, trained_fp32, ExportOptions())
    quantize(trained_fp32, trained_int8, scheme, [], reduce_range)
    trained_cosine = quality.score(trained_int8)["cosine_mean"]
    codes = sim.weight_codes(trained_int8, found)
    chosen = "trained" if trained_cosine >= start_cosine else "start"
    picked = (f"kept the trained model: dynamic INT8 cosine to FP32 {trained_cosine:.5f} after QAT against "
              f"{start_cosine:.5f} for ptq of the model it started from (onnxruntime, validation lines)"
              if chosen == "trained" else
              f"QAT training LOWERED the dynamic INT8 cosine to FP32 to {trained_cosine:.5f} from {start_cosine:.5f} "
              "(ptq of the model it started from): the model it started from is quantized instead")
    (console.info if chosen == "trained" else console.warn)(picked)
    source = exported.artifact if chosen == "trained" else artifact.derive("qat-start", format="onnx", module=None,
                                                                        onnx_path=start_fp32)
    out = Path(ctx.out_dir) / "model.onnx"
    if not distributed.current().is_main:
        # Under torchrun the other ranks wait while rank 0 times the INT8 graphs alone (their sessions would share
        # its cores); they carry on with the model as exported, which only their own later steps read.
        shutil.copyfile(trained_int8 if chosen == "trained" else start_int8, out)
        distributed.barrier()
        return StepResult(artifact=artifact.derive("qat", format="onnx", module=None, onnx_path=out),
                          metrics={"chosen": chosen}, notes=[picked])
    settings = search.Settings(batch_sizes=config.batch_sizes, iterations=config.iterations)
    (work / "search").mkdir()
    plan = search.prepare(source, settings, data, work / "search")
    search.measure(plan, settings, data, quality)
    plan.fp32_row.quality = quality.score(plan.fp32)  # the FP32 model searched: trained or QAT's start
    plan.fp32_row.name = f"FP32 ({'trained' if chosen == 'trained' else 'as QAT started'})"
    tie = search.settle(plan, settings)  # times near-equal graphs again: it can find one no faster than FP32
    faster = [r for r in plan.candidates if r.faster_than_fp32]
    best = tie or (search.fastest(faster) if faster else None)
    if best is None and config.keep_int8:
        best = search.fastest(plan.candidates)
    distributed.barrier()
    shutil.copyfile(best.path if best else start_fp32, out)
    fp32_row = plan.fp32_row
    timing = ", ".join(f"batch {b}: FP32 {ms:.3f} ms" for b, ms in fp32_row.latency.items())
    if best is None:
        precision = (f"handed back the FP32 model QAT started from: no dynamic INT8 graph ran faster ({timing}; "
                     f"{INT8_RULE}); --keep-int8 forces INT8")
    else:
        speed = speedups(fp32_row.latency, best.latency)
        precision = (f"handed back {best.name}: " + ", ".join(f"{s:.2f}x {'faster' if s >= 1 else 'SLOWER'} at batch {b}"
                                                              for b, s in zip(fp32_row.latency, speed.values()))
                     + f", cosine {best.quality['cosine_mean']:.5f} to the FP32 model")
    (console.info if best is not None and best.faster_than_fp32 else console.warn)(precision)
    notes += [picked, precision, f"int8 weights equal the simulation's on {codes['codes'] - codes['differing']} of "
              f"{codes['codes']} codes in {codes['layers']} layers", *plan.notes]
    handed = best.quality if best else {"cosine_mean": 1.0, "cosine_min": 1.0}
    metrics = {
        "quantized": best is not None, "chosen": chosen, "graph": best.name if best else "FP32",
        "start_cosine": start_cosine, "trained_cosine": trained_cosine,
        "simulated_cosine_before": simulated_before, "simulated_cosine": fitted["cosine"],
        "cosine_mean": handed["cosine_mean"], "cosine_min": handed["cosine_min"],
        "simulated_layers": len(found.layers), "float_layers": len(found.float_layers),
        "weight_layers": codes["layers"], "weight_codes": codes["codes"], "weight_codes_differing": codes["differing"],
        "integer_kernels": best.kernels["integer"] if best else 0, "float_kernels": (best or fp32_row).kernels["float"],
        "size_mb": (best or fp32_row).size_mb, "sequence_length": artifact.sample_shape[0],
        **(speedups(fp32_row.latency, best.latency) if best else {}),
        **{k: fitted[k] for k in ("train_samples_per_s", "processes", "replica_max_abs_diff", "precision")},
    }
    latency = [entry for row in [fp32_row, *plan.candidates]
               for entry in latency_entries(row.latency, row.name, "cpu", output=row is (best or fp32_row))]
    new = artifact.derive("qat", format="onnx", module=None, onnx_path=out)
    return StepResult(artifact=new, metrics=metrics, notes=[*fitted["notes"], *notes], latency=latency,
                      sections=[*search.sections(plan), history_table(fitted["history"])])
