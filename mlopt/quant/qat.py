"""The `qat` pass: quantization-aware training whose INT8 ONNX onnxruntime fully fuses.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mlopt.core import console
from mlopt.compress.lib.engine import TrainingConfig
from mlopt.core.errors import InputError
from mlopt.run.runner import Pass, StepResult
from mlopt.quant.lib.simulation import Simulation, batchnorm_layers, not_simulated, trace, uint8_qparams


class QATConfig(TrainingConfig):
    """Fine-tune with simulated INT8, then export an INT8 ONNX model onnxruntime fully fuses."""

    type: Literal["qat"] = "qat"
    epochs: int = Field(2, gt=0)
    lr: float = Field(5e-5, gt=0)
    observer: Literal["ema", "lsq"] = Field(
        "ema", description="activation ranges: EMA min/max observers, or a scale and zero point learned by gradient (LSQ+)")
    freeze_observers_after: int = Field(1, ge=0, description="epochs after which activation ranges stop moving")
    freeze_bn_after: int = Field(0, ge=0, description="epochs during which batch-norm statistics still update")
    ema: float = Field(0.9, gt=0, lt=1, description="observer momentum")
    teacher: bool = Field(True, description="distil from the FP32 model while training (logits, T=2, alpha=0.5)")
    calibration_samples: int = Field(256, gt=0)
    runtime_points: bool = Field(True, description="fake-quantize activations at every tensor onnxruntime's quantizer "
                                 "picks (found in the torch.fx graph); false: at Conv/Linear inputs only")
    export_ranges: bool = Field(True, description="hand the learned input ranges to onnxruntime's quantizer "
                                "(otherwise it calibrates the trained model afresh)")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1,
                                   description="batch sizes at which INT8 and FP32 are timed against each other")
    iterations: int = Field(30, gt=0, description="timed runs per batch size (in three interleaved rounds)")
    keep_int8: bool = Field(False, description="hand back the INT8 model even where it is not faster than the FP32 model "
                            "QAT started from; by default FP32 is handed back then (INT8 is kept only when it is "
                            "faster at every batch size in batch_sizes, timed in interleaved rounds, one session alive "
                            "at a time, each model keeping its best round; a tie counts as not faster)")


def match_layers(model: Any, order: list[str], sim: Simulation) -> tuple[dict[str, str], list[str]]:
    """Which ONNX tensor feeds each weighted layer: {layer name: tensor name}, and the unmatched layers.

    No library maps torch modules to ONNX tensors, so this does it by hand: the exporter emits
    nodes in execution order, so the k-th weighted Conv/Gemm/MatMul of the graph is the k-th layer
    call, which is checked by weight shape. `model` is the exported FP32 ONNX model.
    """
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
             and n.input[1] in weights]
    modules = dict(sim.layers)
    if len(nodes) != len(order):
        return {}, list(order)
    matched, unmatched = {}, []
    for name, node in zip(order, nodes):
        shape = tuple(modules[name].weight.shape)
        if weights[node.input[1]] in (shape, shape[::-1]):
            matched[name] = node.input[0]
        else:
            unmatched.append(name)
    return matched, unmatched


def point_tensors(sim: Simulation, pre_path: Path, points: RuntimePoints, x: Any) -> dict[str, list[str]]:
    """The ONNX tensors (of the pre-processed FP32 model at `pre_path`) each simulation point stands for.

    Traced simulations: the tensors found before training (export and pre-processing of the trained
    model name them the same way), where the trained graph has them. Layer-input hooks: matched by
    execution order and weight shape.
    """
    from mlopt.quant.lib import graph

    model = graph.load(pre_path)
    if not sim.traced:
        layer_tensors, _ = match_layers(model, sim.execution_order(x[:1]), sim)
        return {name: [t] for name, t in layer_tensors.items()}
    present = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    found: dict[str, list[str]] = {}
    for tensor, node in points.nodes.items():
        if tensor in present and node in sim.points:
            found.setdefault(node, []).append(tensor)
    return found


def range_overrides(sim: Simulation, tensors: dict[str, list[str]]) -> dict[str, Any]:
    """The learned ranges as onnxruntime TensorQuantOverrides (uint8 scale and zero point).

    A tensor several points stand for gets the union of their ranges.
    """
    import numpy as np

    ranges: dict[str, tuple[float, float]] = {}
    for name, names in tensors.items():
        obs = sim.points[name].observer
        if np.isnan(float(obs.lo)):
            continue
        lo, hi = obs.range()
        for tensor in names:
            old = ranges.get(tensor)
            ranges[tensor] = (min(lo, old[0]), max(hi, old[1])) if old else (lo, hi)
    overrides = {}
    for tensor, (lo, hi) in ranges.items():
        scale, zero = uint8_qparams(lo, hi)
        overrides[tensor] = [{"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(zero, dtype=np.uint8)}]
    return overrides


def simulation_errors(sim: Simulation, int8_path: Path, tensors: dict[str, list[str]], x: Any) -> list[dict[str, Any]]:
    """Per simulation point, its quantized value in torch against onnxruntime's (the DequantizeLinear
    output of the same tensor in the QDQ model, run without graph fusion so the tensor exists).

    In units of the runtime's quantization step, two ways:
    - accumulated: the torch simulation run on its own, so differences upstream carry into it;
    - local: each point computed in torch from onnxruntime's own values at the points before it, so
      only the segment since those points differs. A faithful simulation is within one step here
      (float rounding at grid boundaries); the accumulated error grows with depth as one-step
      differences are amplified by the layers after them.
    `sim` must be attached.
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    from mlopt.quant.lib.points import onnx_values

    model = onnx.load(str(int8_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    by_input: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i in node.input:
            by_input.setdefault(i, []).append(node)
    targets: dict[str, tuple[str, str, float]] = {}  # point -> (tensor, its DequantizeLinear output, scale)
    for name, names in tensors.items():
        for tensor in names:
            feeds = by_input.get(tensor, []) + by_input.get(f"{tensor}_QuantizeLinear_Input", [])  # a graph output
            q = next((n for n in feeds if n.op_type == "QuantizeLinear"), None)
            dq = next((n for n in by_input.get(q.output[0], []) if n.op_type == "DequantizeLinear"), None) if q else None
            if dq is not None and q.input[1] in inits:
                targets[name] = (tensor, dq.output[0], float(inits[q.input[1]]))
                break
    if not targets:
        return []
    values = onnx_values(int8_path, sorted({t[1] for t in targets.values()}), {"input": x.numpy()})
    accumulated = sim.record(x)
    local = sim.record(x, {name: torch.as_tensor(values[dq]) for name, (_, dq, _) in targets.items()})
    rows = []
    for name, (tensor, dq, scale) in targets.items():
        b = values[dq].astype(np.float64)
        if name not in accumulated or accumulated[name].shape != b.shape:
            continue
        a, c = accumulated[name].astype(np.float64), local[name].astype(np.float64)
        diff, off = np.abs(a - b) / scale, np.abs(c - b) / scale
        noise = float(((a - b) ** 2).sum())
        rows.append({
            "point": sim.labels[name], "onnx_tensor": tensor,
            "max_error_steps": float(diff.max()), "mean_error_steps": float(diff.mean()),
            "local_max_error_steps": float(off.max()), "local_mismatch": float((off > 0.5).mean()),
            "sqnr_db": None if noise == 0 else float(10 * np.log10(max((a ** 2).sum(), 1e-30) / noise)),  # None: identical
        })
    return rows


def weight_grid(sim: Simulation, int8_path: Path) -> dict[str, int]:
    """How many int8 weight codes of the runtime model differ from the simulation's.

    onnxruntime folds batch norm into the convolution before quantizing it; the simulation
    quantizes the unfolded weight. Symmetric per-channel quantization makes the two the same codes
    (negated in a channel whose batch-norm factor is negative); this counts where they are not
    (float rounding at a tie). A layer's weight is found by name (`<layer>.weight_quantized`), or,
    where the exporter renamed it (a Linear's transposed weight before a MatMul), as the int8
    weight of the same shape whose codes agree best.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(int8_path))
    dequantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    pool = {i.name: numpy_helper.to_array(i).astype(np.int64) for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and i.name in dequantized}
    layers = codes = differing = 0
    for name, m in sim.layers:
        w = m.weight.detach().float().cpu().numpy()
        flat = w.reshape(w.shape[0], -1)
        scale = np.maximum(np.abs(flat).max(1, keepdims=True) / 127.0, 1e-12).astype(np.float32)
        ours = np.clip(np.round(flat / scale), -127, 127).astype(np.int64)

        def off(theirs: Any) -> int:
            theirs = theirs.reshape(theirs.shape[0], -1)
            sign = np.where((theirs == ours).sum(1) >= (theirs == -ours).sum(1), 1, -1)[:, None]
            return int((theirs != sign * ours).sum())

        named = f"{name}.weight_quantized"
        if named in pool and pool[named].shape == w.shape:
            best, count = named, off(pool[named])
        else:
            shaped = {k: v.T for k, v in pool.items() if w.ndim == 2 and v.shape == w.shape[::-1]}
            scored = sorted((off(v), k) for k, v in shaped.items())
            if not scored or scored[0][0] > 0.01 * ours.size:
                continue
            count, best = scored[0]
        pool.pop(best)
        layers += 1
        codes += ours.size
        differing += count
    return {"layers": layers, "codes": codes, "differing": differing}


def runtime_scheme() -> Any:
    """onnxruntime's fastest CPU scheme, the one the simulation follows: static QDQ, U8S8, per-channel, min/max."""
    from mlopt.quant.ptq import Scheme

    return Scheme("static", "qdq", "uint8", "int8", True, "minmax")


@dataclass
class RuntimePoints:
    """Where onnxruntime quantizes this model's activations, and where those tensors are in its fx graph."""

    tensors: dict[str, str] = field(default_factory=dict)  # quantized ONNX tensor -> the name of its scale
    nodes: dict[str, str] = field(default_factory=dict)  # quantized ONNX tensor -> the fx node computing it
    groups: list[list[str]] = field(default_factory=list)  # fx nodes sharing a scale, in graph order
    gm: Any = None  # the fx graph module the nodes belong to
    why: str | None = None  # why the simulation falls back to layer inputs

    @property
    def unplaced(self) -> list[str]:
        """Quantized tensors no fx node computes (onnxruntime calibrates them)."""
        return [t for t in self.tensors if t not in self.nodes]


def runtime_points(module: Any, config: QATConfig, pre: Path, feeds: list[Any], x: Any, work: Path) -> RuntimePoints:
    """The tensors onnxruntime's quantizer picks for this model (found by quantizing its pre-processed
    FP32 export `pre` once), located in the module's fx graph by value; empty when asked for layer
    inputs only or when torch.fx cannot trace the model (then `why` says so)."""
    from mlopt.quant.lib.points import match_by_value, onnx_values, quantized_tensors
    from mlopt.quant.ptq import quantize

    if not config.runtime_points:
        return RuntimePoints()
    gm, why = trace(module)
    if gm is None:
        return RuntimePoints(why=why)
    quantize(pre, work / "qdq.onnx", runtime_scheme(), feeds[:1], False)
    scales = quantized_tensors(work / "qdq.onnx")
    found = match_by_value(gm, x, onnx_values(pre, list(scales), {"input": x.numpy()}))
    if not found:
        return RuntimePoints(scales, why="no tensor onnxruntime quantizes was found in the torch.fx graph")
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    groups: dict[str, list[str]] = {}
    for tensor, node in sorted(found.items(), key=lambda item: order[item[1]]):
        if not any(node in g for g in groups.values()):
            groups.setdefault(scales[tensor], []).append(node)
    return RuntimePoints(scales, found, list(groups.values()), gm)


def export_fp32(artifact: Any, module: Any, data: Any, work: Path, tag: str) -> tuple[Path, Path]:
    """`module` exported to ONNX (parity checked) and pre-processed by onnxruntime: (FP32 file, pre-processed file)."""
    from onnxruntime.quantization import quant_pre_process

    from mlopt.export.lib.onnx import ExportConfig, export_checked

    fp32, pre = work / f"{tag}-fp32.onnx", work / f"{tag}-pre.onnx"
    export_checked(artifact.derive(f"qat-{tag}", module=module), data, fp32, ExportConfig())
    quant_pre_process(str(fp32), str(pre))
    return fp32, pre


def runtime_ranges(int8_path: Path, tensors: dict[str, list[str]]) -> dict[str, tuple[float, float]]:
    """The range onnxruntime's uint8 grid covers at the tensors each simulation point stands for, in
    the QDQ model at `int8_path`: {point: (lo, hi)}, the union where a point stands for several."""
    import onnx
    from onnx import numpy_helper

    from mlopt.quant.lib.points import quantized_tensors

    model = onnx.load(str(int8_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zeros = {n.input[1]: n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    grid = {}
    for tensor, scale_name in quantized_tensors(int8_path).items():
        scale, zero = float(inits[scale_name]), int(inits[zeros[scale_name]])
        grid[tensor] = (-zero * scale, (255 - zero) * scale)
    ranges: dict[str, tuple[float, float]] = {}
    for name, names in tensors.items():
        spans = [grid[t] for t in names if t in grid]
        if spans:
            ranges[name] = (min(lo for lo, _ in spans), max(hi for _, hi in spans))
    return ranges


def quantize_with_ranges(sim: Simulation, pre: Path, found: RuntimePoints, probe: Any, feeds: list[Any],
                         config: QATConfig, dst: Path) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """The pre-processed FP32 model quantized by onnxruntime (static QDQ U8S8 per-channel) with the
    simulation's current ranges handed over: (tensors each point stands for, the ranges handed over)."""
    from mlopt.quant.ptq import quantize

    tensors = point_tensors(sim, pre, found, probe)
    handed = range_overrides(sim, tensors) if config.export_ranges else {}
    quantize(pre, dst, runtime_scheme(), feeds, False, overrides=handed)
    return tensors, handed


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
        from mlopt.compress.distill import DistillConfig, distillation_objective
        from mlopt.compress.lib.engine import Objective, fit
        from mlopt.runtime.data import first_inputs
        from mlopt.runtime.evaluation import evaluate_torch, predict_logits
        from mlopt.quant.lib import graph, points
        from mlopt.quant.lib.calibration import calibration_batches
        from mlopt.quant.ptq import INT8_RULE, PTQConfig, Quality, latencies, not_faster_at, quantize

        data = ctx.data
        batch = config.batch_size or ctx.recipe.data.batch_size
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
        found = runtime_points(module, config, start_pre, feeds, probe[:4], work)
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
            dcfg = DistillConfig(temperature=2.0, alpha=0.5, baseline=False)
            objective = distillation_objective(copy.deepcopy(fp32_module), model, data, dcfg, batch)
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
        tensors, handed = quantize_with_ranges(sim, pre, found, probe, feeds, config, trained_int8)
        final = set(points.quantized_tensors(trained_int8))
        calibrated = sorted(final - set(handed))
        kernels = graph.kernel_counts(trained_int8)
        sim.attach()
        errors = simulation_errors(sim, trained_int8, tensors, probe)
        sim.remove()
        grid = weight_grid(sim, trained_int8)
        pcfg = PTQConfig(batch_sizes=config.batch_sizes, iterations=config.iterations)
        quality = Quality(start_fp32, data, pcfg)  # onnxruntime, batches of 64, as sim_logits
        trained_outputs = quality.outputs(trained_int8)
        trained_acc = quality.metrics(trained_outputs)["accuracy"]
        start_acc = quality.score(start_int8)["accuracy"]
        agreement = float((np.concatenate(trained_outputs).argmax(1) == sim_logits.argmax(1)).mean())
        # Never worse than its own starting point: training is kept unless it lost accuracy (a tie keeps it).
        chosen = "trained" if trained_acc >= start_acc else "start"
        int8 = trained_int8 if chosen == "trained" else start_int8
        fp32_lat, int8_lat = latencies([start_fp32, int8], artifact.sample_shape, pcfg)
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
        return StepResult(artifact=new, metrics=metrics, notes=notes, extra={"history": result["history"]})
