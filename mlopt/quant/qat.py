"""The `qat` pass: quantization-aware training whose INT8 ONNX onnxruntime fully fuses.

The simulation follows onnxruntime's fastest CPU scheme (QDQ, U8S8, per-channel): weights of every
Conv and Linear are fake-quantized per output channel, symmetric int8 (scale = max|w| / 127), and
their input activations per tensor, asymmetric uint8, with ranges from EMA min/max observers that
start from calibration (min/max over calibration batches) and are frozen after
`freeze_observers_after` epochs. Batch-norm statistics keep updating for `freeze_bn_after` epochs
(default 0: frozen from the start, eval mode), then freeze: onnxruntime folds batch norm into the
convolution, and per-channel symmetric quantization of a folded weight is the same grid as of the
unfolded one, up to the positive per-channel factor. Layers with weights other than Conv2d,
Linear and batch norm are not simulated; the report lists them.

The export is the trained model in FP32, quantized by onnxruntime's own quantizer (static QDQ
U8S8 per-channel): the graph onnxruntime turns into QLinearConv/QGemm kernels, so the QAT model
runs exactly as fast as the PTQ one. The learned input range of every simulated layer is handed
to the quantizer as a TensorQuantOverride, so the runtime uses the scales the model trained with;
tensors the simulation does not cover (residual adds, pooling outputs) are calibrated by
onnxruntime (min/max). The report checks it: integer and float kernel counts after onnxruntime's
optimisation, how many ranges were handed over, and the top-1 agreement between the torch
simulation and the onnxruntime INT8 model on the validation split.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mlopt import console
from mlopt.compress.engine import TrainingConfig
from mlopt.errors import InputError
from mlopt.pipeline import Pass, StepResult


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
    runtime_points: bool = Field(True, description="also fake-quantize the other tensors onnxruntime quantizes: "
                                 "pooling inputs and both inputs of residual adds")
    export_ranges: bool = Field(True, description="hand the learned input ranges to onnxruntime's quantizer "
                                "(otherwise it calibrates the trained model afresh)")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1)
    iterations: int = Field(30, gt=0, description="timed runs per batch size for the report")


def weight_fake_quant() -> Any:
    """A parametrization module: per-output-channel symmetric int8 fake quantization (straight-through).

    Defined inside a function so that importing this file (for the recipe schema) imports no torch.
    """
    import torch

    class WeightFakeQuant(torch.nn.Module):
        def forward(self, w: Any) -> Any:
            flat = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1)
            scale = torch.clamp(flat / 127.0, min=1e-12).float()
            zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
            return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -127, 127).to(w.dtype)

    return WeightFakeQuant()


def uint8_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of an asymmetric uint8 grid over [lo, hi], stretched to hold zero
    (as onnxruntime computes them)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-12)
    return scale, int(round(-lo / scale))


def activation_observer(ema: float, learned: bool = False) -> Any:
    """An nn.Module watching one layer's input and fake-quantizing it to uint8 (asymmetric).

    EMA mode: min/max ranges in buffers (so checkpoints keep them), moved by an exponential
    average while training. Learned mode (LSQ+): the scale and zero point are parameters, started
    from the calibration range and trained with the model (gradient scaled by 1/sqrt(N x 255)).
    `hook` is the forward pre-hook.
    """
    import math

    import torch

    class ActivationObserver(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("lo", torch.tensor(float("nan")))
            self.register_buffer("hi", torch.tensor(float("nan")))
            self.register_buffer("updates", torch.tensor(0, dtype=torch.long))
            self.learned = learned
            if learned:
                self.scale = torch.nn.Parameter(torch.tensor([1.0]))
                self.zero_point = torch.nn.Parameter(torch.tensor([0.0]))
            self.frozen = False
            self.calibrating = False

        def qparams(self) -> tuple[float, int]:
            if self.learned:
                scale, zero = float(self.scale.detach()), float(self.zero_point.detach())
                return max(scale, 1e-12), min(max(int(round(zero)), 0), 255)
            return uint8_qparams(float(self.lo), float(self.hi))

        def range(self) -> tuple[float, float]:
            """The real-valued range the uint8 grid covers."""
            scale, zero = self.qparams()
            return -zero * scale, (255 - zero) * scale

        def start_learning(self) -> None:
            """Learned mode: take the calibrated range as the starting scale and zero point."""
            if self.learned and not torch.isnan(self.lo):
                scale, zero = uint8_qparams(float(self.lo), float(self.hi))
                with torch.no_grad():
                    self.scale.fill_(scale)
                    self.zero_point.fill_(zero)

        def set_frozen(self, frozen: bool) -> None:
            self.frozen = frozen
            if self.learned:
                self.scale.requires_grad_(not frozen)
                self.zero_point.requires_grad_(not frozen)

        def hook(self, module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
            x = inputs[0]
            if self.calibrating or (module.training and not self.frozen and not self.learned):
                lo, hi = x.detach().min().to(self.lo), x.detach().max().to(self.hi)
                with torch.no_grad():
                    if torch.isnan(self.lo) or self.calibrating:
                        self.lo.copy_(lo if torch.isnan(self.lo) else torch.minimum(self.lo, lo))
                        self.hi.copy_(hi if torch.isnan(self.hi) else torch.maximum(self.hi, hi))
                    else:
                        self.lo.mul_(ema).add_((1 - ema) * lo)
                        self.hi.mul_(ema).add_((1 - ema) * hi)
                    self.updates += 1
            if self.calibrating or torch.isnan(self.lo):
                return inputs
            if self.learned:
                with torch.no_grad():
                    self.scale.clamp_(min=1e-8)
                    self.zero_point.clamp_(0, 255)
                grad_factor = 1.0 / math.sqrt(x[0].numel() * 255)
                fq = torch._fake_quantize_learnable_per_tensor_affine(
                    x.float(), self.scale, self.zero_point, 0, 255, grad_factor)
                return (fq.to(x.dtype), *inputs[1:])
            scale, zero = self.qparams()
            fq = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, 255).to(x.dtype)
            return (fq, *inputs[1:])

    return ActivationObserver()


def quant_point(observer: Any) -> Any:
    """A module that fake-quantizes what passes through it with `observer` (kept by reference, not
    as a child, so the traced model's state dict stays the module's own)."""
    import torch

    class QuantPoint(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._observer = [observer]

        @property
        def observer(self) -> Any:
            return self._observer[0]

        def forward(self, x: Any) -> Any:
            return self.observer.hook(self, (x,))[0]

    return QuantPoint()


POOLS_ONNX = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")


class Simulation:
    """Fake quantization attached to a torch module (and removable, leaving plain FP32 weights)."""

    def __init__(self, module: Any, ema: float, learned: bool = False, runtime_points: bool = True):
        import torch
        import torch.nn.utils.parametrize as P

        self.module = module  # the plain module (exported after remove())
        self.model = module  # what runs the simulation: the module, or its traced copy with quantized adds
        self.layers = [(n, m) for n, m in module.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        if not self.layers:
            raise InputError("QAT found no Conv2d or Linear layer to simulate")
        self.observers: dict[str, Any] = {}  # layer name -> the observer of its input
        self.points: dict[str, Any] = {}  # more tensors onnxruntime quantizes: pooling and residual-add inputs
        self.pools: list[tuple[str, Any]] = []
        self.adds = 0
        self.notes: list[str] = []
        self.handles = []
        for name, m in self.layers:
            P.register_parametrization(m, "weight", weight_fake_quant())
            obs = activation_observer(ema, learned)
            self.observers[name] = obs
            self.handles.append(m.register_forward_pre_hook(obs.hook))
        if runtime_points:
            self._pooling_inputs(ema, learned)
            self._residual_adds(ema, learned)

    def _pooling_inputs(self, ema: float, learned: bool) -> None:
        """onnxruntime quantizes a pooling node's input (the ReLU before it is folded into that range)."""
        import torch

        kinds = (torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d)
        for name, m in self.module.named_modules():
            if isinstance(m, kinds):
                obs = activation_observer(ema, learned)
                self.points[f"pool {name}"] = obs
                self.pools.append((name, m))
                self.handles.append(m.register_forward_pre_hook(obs.hook))

    def _residual_adds(self, ema: float, learned: bool) -> None:
        """onnxruntime quantizes both inputs of a tensor + tensor Add (a convolution branch's output
        among them; the output's range is the next layer's input, already simulated).

        Adds are functions, not modules, so no hook sees them: the module is traced with torch.fx
        and a fake quantization is put on each input of each add of two tensors (written by hand:
        no library simulates onnxruntime's QDQ placement). A model fx cannot trace trains without it.
        """
        import operator

        import torch
        import torch.fx as fx

        try:
            gm = fx.symbolic_trace(self.module)
        except Exception as exc:
            self.notes.append(f"residual adds are not simulated: torch.fx cannot trace the model ({type(exc).__name__})")
            return

        def tensor_add(n: Any) -> bool:
            is_add = (n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add)) or (
                n.op == "call_method" and n.target in ("add", "add_"))
            return is_add and len(n.args) >= 2 and all(isinstance(a, fx.Node) for a in n.args[:2])

        adds = [n for n in gm.graph.nodes if tensor_add(n)]
        for i, node in enumerate(adds):
            quantized = []
            for k, arg in enumerate(node.args[:2]):
                point = quant_point(activation_observer(ema, learned))
                target = f"mlopt_add{i}_{k}"
                gm.add_submodule(target, point)
                self.points[f"add {i} input {k}"] = point.observer
                with gm.graph.inserting_before(node):
                    quantized.append(gm.graph.call_module(target, (arg,)))
            node.args = (*quantized, *node.args[2:])
        if adds:
            gm.recompile()
            self.model = gm
            self.adds = len(adds)

    def all_observers(self) -> list[Any]:
        return [*self.observers.values(), *self.points.values()]

    def calibrate(self, feeds: list[Any]) -> None:
        import torch

        for obs in self.all_observers():
            obs.calibrating = True
        self.model.eval()
        with torch.no_grad():
            for x in feeds:
                self.model(x)
        for obs in self.all_observers():
            obs.calibrating = False
            obs.start_learning()

    def freeze(self, frozen: bool = True) -> None:
        for obs in self.all_observers():
            obs.set_frozen(frozen)

    def _forward_recording(self, model: Any, x: Any, record: Any, modules: list[tuple[str, Any]] | None = None) -> None:
        """One eval-mode forward pass of `x` through `model`, calling `record(name, input)` as each of
        `modules` (default: the simulated layers) runs; after the observers' hooks, so while
        simulating it sees the quantized input."""
        import torch

        def hook_for(name: str) -> Any:
            def hook(mod: Any, inputs: tuple[Any, ...]) -> None:  # returns None: leaves the inputs alone
                record(name, inputs[0])
            return hook

        hooks = [m.register_forward_pre_hook(hook_for(name)) for name, m in (modules or self.layers)]
        model.eval()
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()

    def execution_order(self, x: Any, modules: list[tuple[str, Any]] | None = None) -> list[str]:
        """The names of `modules` (default: the simulated layers) in the order one forward pass of
        the plain module calls them."""
        calls: list[str] = []
        self._forward_recording(self.module, x, lambda name, _: calls.append(name), modules)
        return calls

    def capture_inputs(self, x: Any) -> dict[str, Any]:
        """Each simulated layer's (fake-quantized) input for one batch, as numpy arrays."""
        seen: dict[str, Any] = {}
        self._forward_recording(self.model, x, lambda name, t: seen.setdefault(name, t.detach().float().cpu().numpy()))
        return seen

    def remove(self) -> None:
        import torch.nn.utils.parametrize as P

        for h in self.handles:
            h.remove()
        for _, m in self.layers:
            P.remove_parametrizations(m, "weight", leave_parametrized=False)


def batchnorm_layers(module: Any) -> list[Any]:
    import torch

    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def not_simulated(module: Any) -> list[str]:
    """Layers with their own weights that the simulation does not cover (they train in float)."""
    import torch

    covered = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.modules.batchnorm._BatchNorm)
    return [f"{name} ({type(m).__name__})" for name, m in module.named_modules()
            if not isinstance(m, covered) and any(True for _ in m.parameters(recurse=False))]


def match_layers(model: Any, order: list[str], sim: Simulation) -> tuple[dict[str, str], list[str]]:
    """Which ONNX tensor feeds each simulated layer: {layer name: tensor name}, and the unmatched layers.

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


def match_points(model: Any, sim: Simulation, pool_order: list[str]) -> dict[str, str]:
    """Which ONNX tensor each simulated pooling and add input is: {point name: tensor name}.

    Matched in order, as the layers are: the k-th pooling node of the graph is the k-th pooling
    module called, the k-th Add of two computed tensors the k-th traced add. Where the counts
    differ, nothing is matched (onnxruntime calibrates those tensors).
    """
    constants = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    found: dict[str, str] = {}
    pools = [n for n in model.graph.node if n.op_type in POOLS_ONNX]
    if len(pools) == len(pool_order):
        found.update({f"pool {name}": node.input[0] for name, node in zip(pool_order, pools)})
    adds = [n for n in model.graph.node if n.op_type == "Add" and len(n.input) == 2
            and not any(i in constants for i in n.input)]
    if len(adds) == sim.adds:
        for i, node in enumerate(adds):
            found.update({f"add {i} input {k}": node.input[k] for k in (0, 1)})
    return found


def range_overrides(sim: Simulation, layer_tensors: dict[str, str]) -> dict[str, Any]:
    """The learned input ranges as onnxruntime TensorQuantOverrides (uint8 scale and zero point).

    A tensor feeding several layers gets the union of their ranges.
    """
    import numpy as np

    ranges: dict[str, tuple[float, float]] = {}
    for name, tensor in layer_tensors.items():
        obs = sim.observers.get(name) or sim.points[name]
        if np.isnan(float(obs.lo)):
            continue
        lo, hi = obs.range()
        old = ranges.get(tensor)
        ranges[tensor] = (min(lo, old[0]), max(hi, old[1])) if old else (lo, hi)
    overrides = {}
    for tensor, (lo, hi) in ranges.items():
        scale, zero = uint8_qparams(lo, hi)
        overrides[tensor] = [{"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(zero, dtype=np.uint8)}]
    return overrides


def layer_errors(int8_path: Path, layer_tensors: dict[str, str], torch_inputs: dict[str, Any], x: Any) -> list[dict[str, Any]]:
    """Per layer, the simulated INT8 input in torch against onnxruntime's (the DequantizeLinear output
    feeding the same layer in the QDQ model, run without graph fusion so the tensor exists).

    Error in units of the runtime's quantization step: 0 means the same grid point everywhere.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(int8_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    by_input: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i in node.input:
            by_input.setdefault(i, []).append(node)
    targets: dict[str, tuple[str, float]] = {}
    for name, tensor in layer_tensors.items():
        q = next((n for n in by_input.get(tensor, []) if n.op_type == "QuantizeLinear"), None)
        dq = next((n for n in by_input.get(q.output[0], []) if n.op_type == "DequantizeLinear"), None) if q else None
        if dq is not None and q.input[1] in inits:
            targets[name] = (dq.output[0], float(inits[q.input[1]]))
    if not targets:
        return []
    known = {o.name for o in model.graph.output}
    for out_name in sorted({t for t, _ in targets.values()} - known):
        model.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))
    rows = []
    for name, (tensor, scale) in targets.items():
        a, b = np.asarray(torch_inputs[name], dtype=np.float64), values[tensor].astype(np.float64)
        if a.shape != b.shape:
            continue
        diff = np.abs(a - b)
        noise = float((diff ** 2).sum())
        rows.append({
            "layer": name, "onnx_tensor": tensor,
            "max_error_steps": float(diff.max() / scale), "mean_error_steps": float(diff.mean() / scale),
            "sqnr_db": None if noise == 0 else float(10 * np.log10(max((a ** 2).sum(), 1e-30) / noise)),  # None: identical
        })
    return rows


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
        import numpy as np
        import torch
        from onnxruntime.quantization import quant_pre_process

        from mlopt import distributed
        from mlopt.compress.distill import DistillConfig, distillation_objective
        from mlopt.compress.engine import Objective, fit
        from mlopt.data import first_inputs, require_labels
        from mlopt.evaluate import evaluate_torch, predict_logits
        from mlopt.export.onnx import ExportConfig, export_checked
        from mlopt.quant import graph
        from mlopt.quant.calibration import calibration_batches
        from mlopt.quant.ptq import PTQConfig, Quality, Scheme, latencies, quantize

        if artifact.format != "torch":
            raise InputError(f"qat trains a PyTorch model; {artifact.origin} is ONNX (use ptq for ONNX files)")
        require_labels(ctx.data, "QAT")
        data = ctx.data
        batch = config.batch_size or ctx.recipe.data.batch_size
        fp32_module = copy.deepcopy(artifact.module).eval()
        module = copy.deepcopy(artifact.module)
        floating = not_simulated(module)
        if floating:
            console.warn(f"QAT simulates Conv2d and Linear layers only; {len(floating)} layer(s) train in float: "
                         + ", ".join(floating[:5]) + (" ..." if len(floating) > 5 else ""))
        sim = Simulation(module, config.ema, learned=config.observer == "lsq", runtime_points=config.runtime_points)
        for note in sim.notes:
            console.warn(note)
        model = sim.model  # runs the simulation (the traced copy with quantized adds, where fx traces it)
        # The same calibration batches start the torch ranges and onnxruntime's (for tensors not handed over).
        feeds = calibration_batches(data, "input", ["batch", *artifact.sample_shape], config.calibration_samples)
        sim.calibrate([torch.as_tensor(f["input"]) for f in feeds])
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
        probe = first_inputs(data, 64)
        sim_inputs = sim.capture_inputs(probe)
        sim.remove()
        module.eval()
        order = sim.execution_order(probe[:1])
        pool_order = sim.execution_order(probe[:1], sim.pools) if sim.pools else []

        work = Path(tempfile.mkdtemp(prefix="mlopt-qat-"))
        try:
            trained = artifact.derive("qat-train", module=module)
            export_checked(trained, data, work / "fp32.onnx", ExportConfig())
            out = Path(ctx.out_dir) / "model.onnx"
            exported = graph.load(work / "fp32.onnx")
            layer_tensors, unmatched = match_layers(exported, order, sim)
            point_tensors = match_points(exported, sim, pool_order)
            quant_pre_process(str(work / "fp32.onnx"), str(work / "pre.onnx"))
            # Pre-processing keeps the names of the tensors that feed Conv/Gemm, Add and pooling; a
            # layer whose tensor it removed is left to onnxruntime's calibration.
            pre_nodes = graph.load(work / "pre.onnx").graph.node
            pre_inputs = {i for n in pre_nodes for i in n.input}
            # A batch norm that follows no convolution cannot be folded: onnxruntime runs it as its
            # own (quantized) node, which the simulation, holding batch norm in float, does not model.
            unfolded = [n.name or n.output[0] for n in pre_nodes if n.op_type == "BatchNormalization"]
            unmatched += [n for n, t in layer_tensors.items() if t not in pre_inputs]
            layer_tensors = {n: t for n, t in layer_tensors.items() if t in pre_inputs}
            point_tensors = {n: t for n, t in point_tensors.items() if t in pre_inputs}
            handed = range_overrides(sim, {**layer_tensors, **point_tensors}) if config.export_ranges else {}
            quantize(work / "pre.onnx", out, Scheme("static", "qdq", "uint8", "int8", True, "minmax"), feeds, False,
                     overrides=handed)
            kernels = graph.kernel_counts(out)
            errors = layer_errors(out, layer_tensors, sim_inputs, probe.numpy())
            pcfg = PTQConfig(batch_sizes=config.batch_sizes, iterations=config.iterations)
            quality = Quality(work / "fp32.onnx", data, pcfg)  # batches of 64, as sim_logits
            int8_outputs = quality.outputs(out)
            q = quality.metrics(int8_outputs)
            fp32_lat, int8_lat = latencies([work / "fp32.onnx", out], artifact.sample_shape, pcfg)
            agreement = float((np.concatenate(int8_outputs).argmax(1) == sim_logits.argmax(1)).mean())
        finally:
            shutil.rmtree(work, ignore_errors=True)
        new = artifact.derive("qat", format="onnx", module=None, onnx_path=out)
        metrics = {
            "fp32_accuracy": fp32_acc,
            "simulated_accuracy_before": sim_before,
            "simulated_accuracy": sim_acc,
            "accuracy": q["accuracy"],
            "accuracy_drop": fp32_acc - q["accuracy"],
            "simulation_top1_agreement": agreement,
            "integer_kernels": kernels["integer"],
            "float_kernels": kernels["float"],
            "left_in_float": kernels["float_ops"],
            "not_simulated": floating,
            "unfolded_batchnorms": unfolded,
            "runtime_points_simulated": len(sim.points),
            "runtime_points_handed_to_onnxruntime": len(point_tensors),
            "ranges_handed_to_onnxruntime": len(handed),
            "layers_calibrated_by_onnxruntime": unmatched,
            "layer_error": errors,
            "fp32_latency_ms": fp32_lat,
            "latency_ms": int8_lat,
            "speedup": {b: fp32_lat[b] / int8_lat[b] for b in fp32_lat},
            "train_samples_per_s": result["train_samples_per_s"],
            "processes": result["processes"],
            "replica_max_abs_diff": result["replica_max_abs_diff"],
            "precision": result["precision"],
        }
        notes = [f"onnxruntime runs {kernels['integer']} integer and {kernels['float']} float Conv/MatMul/Gemm kernels",
                 f"torch simulation and onnxruntime INT8 agree on {100 * agreement:.2f}% of validation top-1 predictions"]
        if errors:
            worst = max(errors, key=lambda r: r["max_error_steps"])
            notes.append(f"per-layer inputs, torch simulation against onnxruntime on {len(probe)} validation samples: "
                         f"largest difference {worst['max_error_steps']:.2f} quantization steps ({worst['layer']})"
                         + (f", lowest SQNR {min(r['sqnr_db'] for r in errors if r['sqnr_db'] is not None):.1f} dB"
                            if any(r["sqnr_db"] is not None for r in errors) else ", identical"))
        if kernels["float"]:
            console.warn(f"onnxruntime left {kernels['float']} kernel(s) in float: {', '.join(kernels['float_ops'])}")
        warnings = []
        if unfolded:
            warnings.append(f"{len(unfolded)} batch norm(s) could not be folded into a convolution ({', '.join(unfolded[:3])}"
                            f"{' ...' if len(unfolded) > 3 else ''}): onnxruntime quantizes them as separate nodes, which "
                            "the simulation does not model; expect a larger gap between simulated and INT8 accuracy")
        slower = [b for b in fp32_lat if int8_lat[b] >= fp32_lat[b]]
        if slower:
            warnings.append(f"the INT8 model is NOT faster than FP32 at batch size {', '.join(map(str, slower))} on this "
                            f"machine ({', '.join(f'{int8_lat[b]:.3f} vs {fp32_lat[b]:.3f} ms' for b in slower)}); it is "
                            "small enough that quantize/dequantize overhead outweighs the integer arithmetic")
        for text in warnings:
            console.warn(text)
            notes.append(text)
        console.info(f"QAT INT8 top-1 {q['accuracy']:.4f} (FP32 {fp32_acc:.4f}); {notes[0]}; {notes[1]}")
        return StepResult(artifact=new, metrics=metrics, notes=notes, extra={"history": result["history"]})
