"""The `qat` pass: quantization-aware training whose INT8 ONNX onnxruntime fully fuses.

The simulation follows onnxruntime's fastest CPU scheme (QDQ, U8S8, per-channel):
- weights of every Conv and Linear layer: fake-quantized per output channel, symmetric int8
  (scale = max|w| / 127). Batch norm stays a separate module while training (frozen, eval mode,
  after `freeze_bn_after` epochs, default 0); onnxruntime folds it into the convolution, and
  symmetric per-channel quantization of the folded weight w * g is the same grid as of w for any
  per-channel factor g, so the simulation needs no folding of its own (the report checks it layer
  by layer);
- activations: per tensor, asymmetric uint8, at exactly the tensors onnxruntime's quantizer picks
  for this model (conv and linear inputs, residual-add, pooling and concatenation inputs, the
  ReLU/Clip outputs it folds into the layer before, ...). They are found by quantizing the FP32
  export once and locating each quantized tensor in the module's torch.fx graph by value
  (`mlopt.quant.points`). A model torch.fx cannot trace is simulated at its layer inputs only.
  Ranges come from EMA min/max observers that start from calibration and freeze after
  `freeze_observers_after` epochs, or are learned (LSQ+).
LayerNorm scales are fake-quantized per tensor (symmetric int8), as onnxruntime quantizes them. A
Linear layer is split into its product and its bias in the fx graph, as the exporter writes it on
a 3-D input (MatMul, Add), so transformer encoders get the same treatment: every MatMul with a
weight, every activation-by-activation attention MatMul, softmax, residual add and LayerNorm
input is simulated where onnxruntime quantizes it.
Layers with weights other than Conv, Linear and normalization keep float weights; the report lists them.

The export is the trained model in FP32, quantized by onnxruntime's own quantizer (static QDQ
U8S8 per-channel): the graph onnxruntime turns into QLinearConv/QGemm kernels, so the QAT model
runs exactly as fast as the PTQ one. Every learned range is handed to the quantizer as a
TensorQuantOverride, so the runtime uses the scales the model trained with; a tensor without one is
calibrated by onnxruntime (min/max) and listed. The report checks it: integer and float kernel
counts after onnxruntime's optimisation, per tensor the torch simulation against onnxruntime
(accumulated and local error, in quantization steps), and the top-1 agreement between the two on
the validation split.
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
from mlopt.errors import InputError, first_line
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
    runtime_points: bool = Field(True, description="fake-quantize activations at every tensor onnxruntime's quantizer "
                                 "picks (found in the torch.fx graph); false: at Conv/Linear inputs only")
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


def norm_scale_fake_quant() -> Any:
    """A parametrization module: a LayerNorm's scale as onnxruntime quantizes it, per tensor,
    symmetric int8 (straight-through). Its bias becomes int32 at a far finer step; left in float."""
    import torch

    class NormScaleFakeQuant(torch.nn.Module):
        def forward(self, w: Any) -> Any:
            scale = max(float(w.detach().abs().max()) / 127.0, 1e-12)
            return torch.fake_quantize_per_tensor_affine(w.float(), scale, 0, -127, 127).to(w.dtype)

    return NormScaleFakeQuant()


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
                    x.float(), self.scale, self.zero_point, 0, 255, grad_factor).to(x.dtype)
            else:
                scale, zero = self.qparams()
                fq = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, 255).to(x.dtype)
            return (fq, *inputs[1:])

    return ActivationObserver()


def quant_point(observer: Any) -> Any:
    """A module that fake-quantizes one tensor with `observer`, which several points may share (as
    onnxruntime gives a Reshape's output its input's scale). The observer is kept by reference, not
    as a child, so the traced model's state dict stays the module's own. For the parity check it
    can record what it produced, or pass another tensor on instead."""
    import torch

    class QuantPoint(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._observer = [observer]
            self.recording = False
            self.recorded: Any = None  # with `recording`: the last fake-quantized value (numpy)
            self.replacement: Any = None  # a tensor passed on instead of the fake-quantized one

        @property
        def observer(self) -> Any:
            return self._observer[0]

        def forward(self, x: Any) -> Any:
            fq = self.observer.hook(self, (x,))[0]
            if self.recording:
                self.recorded = fq.detach().float().cpu().numpy()
            if self.replacement is not None:
                fq = self.replacement.to(device=x.device, dtype=x.dtype)
            return fq

        def pre_hook(self, module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
            self.train(module.training)
            return (self(inputs[0]), *inputs[1:])

    return QuantPoint()


WEIGHTED = ("Conv1d", "Conv2d", "Conv3d", "Linear")


class Simulation:
    """Fake quantization attached to a torch module (and removable, leaving plain FP32 weights).

    Weights of every Conv1d/2d/3d and Linear layer are fake-quantized per output channel, LayerNorm
    scales per tensor. Activations
    are fake-quantized at points, one per tensor (several may share one observer):
    - `place(gm, groups)`: after given nodes of the module's fx graph (the tensors onnxruntime
      quantizes, found by `mlopt.quant.points`; the nodes of a group share a scale); `self.model`
      is then that graph module;
    - `hook_layer_inputs()`: at the input of each weighted layer, by forward pre-hooks (for models
      torch.fx cannot trace, or when asked for layer inputs only); `self.model` is the module.
    """

    def __init__(self, module: Any, ema: float, learned: bool = False):
        import torch

        self.module = module  # the plain module (exported after remove())
        self.model = module  # what runs the simulation
        self.ema, self.learned = ema, learned
        self.layers = [(n, m) for n, m in module.named_modules() if type(m).__name__ in WEIGHTED
                       and isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))]
        if not self.layers:
            raise InputError("QAT found no Conv or Linear layer to simulate")
        self.norms = [m for m in module.modules() if isinstance(m, torch.nn.LayerNorm) and m.weight is not None]
        self.points: dict[str, Any] = {}  # point name -> its QuantPoint
        self.labels: dict[str, str] = {}  # point name -> what it quantizes, for people
        self.traced = False
        self.handles: list[Any] = []
        self.attach()

    def attach(self) -> None:
        """Fake-quantize the weights (and, in hook mode, the layer inputs)."""
        import torch.nn.utils.parametrize as P

        for _, m in self.layers:
            P.register_parametrization(m, "weight", weight_fake_quant())
        for m in self.norms:
            P.register_parametrization(m, "weight", norm_scale_fake_quant())
        if not self.traced:
            modules = dict(self.layers)
            self.handles = [modules[name].register_forward_pre_hook(p.pre_hook) for name, p in self.points.items()]

    def remove(self) -> None:
        """Back to plain FP32 weights and no hooks (the fx graph's points only run through `self.model`)."""
        import torch.nn.utils.parametrize as P

        for h in self.handles:
            h.remove()
        self.handles = []
        for m in [m for _, m in self.layers] + self.norms:
            P.remove_parametrizations(m, "weight", leave_parametrized=False)

    def hook_layer_inputs(self) -> None:
        for name, _ in self.layers:
            self.points[name] = quant_point(activation_observer(self.ema, self.learned))
            self.labels[name] = f"input of {name}"
        self.remove()
        self.attach()

    def place(self, gm: Any, groups: list[list[str]]) -> None:
        """Put a fake quantization after each node named in `groups` of `gm`, the fx graph of
        `self.module` (traced before the weights were parametrized, so it shares the layers); the
        nodes of one group share one observer."""
        by_name = {n.name: n for n in gm.graph.nodes}
        for names in groups:
            observer = activation_observer(self.ema, self.learned)
            for name in names:
                self._place(gm, by_name, name, observer)
        gm.recompile()
        self.model, self.traced = gm, True

    def _place(self, gm: Any, by_name: dict[str, Any], name: str, observer: Any) -> None:
        from mlopt.quant.points import consumers

        node = by_name[name]
        point = quant_point(observer)
        target = f"mlopt_quant{len(self.points)}"
        gm.add_submodule(target, point)
        self.points[name] = point
        producer = node.meta.get("label") or (node.target if node.op == "call_module" else name)
        self.labels[name] = f"{producer} -> {consumers(node)}"
        if node.meta.get("bias_add"):  # the product is quantized, so the Add quantizes the bias too
            add = by_name[node.meta["bias_add"]]
            with gm.graph.inserting_before(add):
                bias = gm.graph.call_function(bias_fake_quant, (add.args[1],))
            add.args = (add.args[0], bias)
        with gm.graph.inserting_after(node):
            quantized = gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(quantized, delete_user_cb=lambda user, q=quantized: user is not q)

    def all_observers(self) -> list[Any]:
        """Each observer once, in the order of the points."""
        return list({id(p.observer): p.observer for p in self.points.values()}.values())

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

    def record(self, x: Any, replacements: dict[str, Any] | None = None) -> dict[str, Any]:
        """Each point's fake-quantized value for one eval-mode batch, as numpy arrays. With
        `replacements` ({point: tensor}), those points pass the given tensors on instead of their own."""
        import torch

        for name, p in self.points.items():
            p.recording, p.recorded = True, None
            p.replacement = (replacements or {}).get(name)
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(x)
            return {name: p.recorded for name, p in self.points.items() if p.recorded is not None}
        finally:
            for p in self.points.values():
                p.recording, p.recorded, p.replacement = False, None, None

    def execution_order(self, x: Any) -> list[str]:
        """The names of the weighted layers in the order one forward pass of the module calls them."""
        import torch

        calls: list[str] = []
        hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: calls.append(name)) for name, m in self.layers]
        self.module.eval()
        try:
            with torch.no_grad():
                self.module(x)
        finally:
            for h in hooks:
                h.remove()
        return calls


def trace(module: Any) -> tuple[Any, str | None]:
    """The module's torch.fx graph module with each biased Linear split in two, or None and why not."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:
        return None, f"torch.fx cannot trace the model ({type(exc).__name__}: {first_line(exc)})"
    split_linear_bias(gm)
    split_gelu(gm)
    return gm, None


def split_gelu(gm: Any) -> None:
    """Each exact GELU (nn.GELU or F.gelu) becomes the five operations the exporter writes for it,
    x * (0.5 * (erf(x / sqrt 2) + 1)): onnxruntime quantizes the intermediate tensors of that chain
    (the inputs of its Add and Muls), so the simulation needs a node for each."""
    import operator

    import torch
    import torch.nn.functional as F

    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.GELU):
            exact = gm.get_submodule(node.target).approximate == "none"
        elif node.op == "call_function" and node.target is F.gelu:
            exact = node.kwargs.get("approximate", "none") == "none" and len(node.args) == 1
        else:
            continue
        if not exact or not node.args:
            continue
        x, label = node.args[0], str(node.target) if node.op == "call_module" else node.name
        with gm.graph.inserting_before(node):
            scaled = gm.graph.call_function(operator.truediv, (x, 2 ** 0.5))
            erf = gm.graph.call_function(torch.erf, (scaled,))
            plus = gm.graph.call_function(operator.add, (erf, 1.0))
            half = gm.graph.call_function(operator.mul, (0.5, plus))
            out = gm.graph.call_function(operator.mul, (x, half))
        for part, name in ((erf, "erf"), (plus, "erf + 1"), (half, "(erf + 1) / 2")):
            part.meta.update(label=f"{label}: {name}", layer=label)
        out.meta.update(label=label, layer=label)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    gm.recompile()


def split_linear_bias(gm: Any) -> None:
    """Each nn.Linear with a bias becomes `F.linear(x, weight) + bias`, as the exporter writes a
    Linear on a 3-D input (MatMul, then Add): onnxruntime then quantizes the product, the bias and
    the sum, and the simulation needs a node for each. A Linear on a 2-D input (one Gemm) loses nothing.
    The nodes are named after the layer, so every trace of the same model names them the same."""
    import operator

    import torch
    import torch.nn.functional as F

    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), torch.nn.Linear):
            continue
        if gm.get_submodule(node.target).bias is None or len(node.args) != 1 or node.kwargs:
            continue
        stem = str(node.target).replace(".", "_")
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            bias = gm.graph.get_attr(f"{node.target}.bias")
            product = gm.graph.create_node("call_function", F.linear, (node.args[0], weight), name=f"{stem}_matmul")
            total = gm.graph.create_node("call_function", operator.add, (product, bias), name=f"{stem}_biased")
        product.meta.update(label=f"{node.target} (no bias)", layer=str(node.target), bias_add=total.name)
        total.meta.update(label=str(node.target), layer=str(node.target))
        node.replace_all_uses_with(total)
        gm.graph.erase_node(node)
    gm.recompile()


def bias_fake_quant(b: Any) -> Any:
    """A bias as onnxruntime quantizes the constant input of a quantized Add: per tensor, asymmetric
    uint8 over its own range (straight-through)."""
    import torch

    scale, zero = uint8_qparams(float(b.detach().min()), float(b.detach().max()))
    return torch.fake_quantize_per_tensor_affine(b.float(), scale, zero, 0, 255).to(b.dtype)


def batchnorm_layers(module: Any) -> list[Any]:
    import torch

    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def not_simulated(module: Any) -> list[str]:
    """Layers with their own weights whose weights the simulation does not quantize (they train in float)."""
    import torch

    covered = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)
    return [f"{name} ({type(m).__name__})" for name, m in module.named_modules()
            if not (type(m).__name__ in WEIGHTED or isinstance(m, covered))
            and any(True for _ in m.parameters(recurse=False))]


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


def point_tensors(sim: Simulation, pre_path: Path, tensors: list[str], x: Any) -> dict[str, list[str]]:
    """The ONNX tensors (of the pre-processed FP32 model at `pre_path`) each simulation point stands for.

    Traced simulations: matched by value again, on the trained model (`tensors` are the ones
    onnxruntime quantized before training; export and pre-processing name them the same way).
    Layer-input hooks: matched by execution order and weight shape.
    """
    from mlopt.quant import graph
    from mlopt.quant.points import match_by_value, onnx_values

    found: dict[str, list[str]] = {}
    if sim.traced:
        gm, _ = trace(sim.module)
        for tensor, node in match_by_value(gm, x, onnx_values(pre_path, tensors, {"input": x.numpy()})).items():
            if node in sim.points:
                found.setdefault(node, []).append(tensor)
    else:
        layer_tensors, _ = match_layers(graph.load(pre_path), sim.execution_order(x[:1]), sim)
        found = {name: [t] for name, t in layer_tensors.items()}
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

    from mlopt.quant.points import onnx_values

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


def runtime_points(module: Any, fp32_module: Any, config: QATConfig, artifact: Any, feeds: list[Any], x: Any,
                   work: Path) -> tuple[list[str], list[list[str]], list[str], Any, str | None]:
    """Where to fake-quantize activations: the tensors onnxruntime's quantizer picks for this model
    (found by quantizing its FP32 export once), located in the module's fx graph by value.

    Returns the quantized ONNX tensors; the fx nodes to quantize after, in groups that share a
    scale (graph order); the tensors no node computes; the graph module; and why the simulation
    falls back to layer inputs (None if it does not).
    """
    from onnxruntime.quantization import quant_pre_process

    from mlopt.export.onnx import export_onnx
    from mlopt.quant.points import match_by_value, onnx_values, quantized_tensors
    from mlopt.quant.ptq import Scheme, quantize

    if not config.runtime_points:
        return [], [], [], None, None
    gm, why = trace(module)
    if gm is None:
        return [], [], [], None, why
    export_onnx(fp32_module, tuple(artifact.sample_shape), work / "fp32.onnx", 18, "dynamo")
    quant_pre_process(str(work / "fp32.onnx"), str(work / "pre.onnx"))
    quantize(work / "pre.onnx", work / "qdq.onnx", Scheme("static", "qdq", "uint8", "int8", True, "minmax"),
             feeds[:1], False)
    scales = quantized_tensors(work / "qdq.onnx")
    tensors = list(scales)
    found = match_by_value(gm, x, onnx_values(work / "pre.onnx", tensors, {"input": x.numpy()}))
    if not found:
        return tensors, [], tensors, None, "no tensor onnxruntime quantizes was found in the torch.fx graph"
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    groups: dict[str, list[str]] = {}
    for tensor, node in sorted(found.items(), key=lambda item: order[item[1]]):
        if not any(node in g for g in groups.values()):
            groups.setdefault(scales[tensor], []).append(node)
    return tensors, list(groups.values()), [t for t in tensors if t not in found], gm, None


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
        from mlopt.quant import graph, points
        from mlopt.quant.calibration import calibration_batches
        from mlopt.quant.ptq import PTQConfig, Quality, Scheme, latencies, quantize

        if artifact.format != "torch":
            done = graph.quantized_ops(graph.load(artifact.onnx_path))
            if done:
                raise InputError(f"qat trains a PyTorch model; {artifact.origin} is an ONNX model that is already "
                                 f"quantized ({', '.join(done[:3])}): start from the FP32 PyTorch model it came from")
            raise InputError(f"qat trains a PyTorch model; {artifact.origin} is ONNX (use ptq for ONNX files)")
        require_labels(ctx.data, "QAT")
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
        work = Path(tempfile.mkdtemp(prefix="mlopt-qat-"))
        try:
            quantized, groups, unplaced, gm, why = runtime_points(module, fp32_module, config, artifact, feeds, probe[:4], work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        sim = Simulation(module, config.ema, learned=config.observer == "lsq")
        if groups:
            sim.place(gm, groups)
        else:
            sim.hook_layer_inputs()
        if why:
            console.warn(f"QAT simulates the inputs of Conv and Linear layers only: {why}")
        if unplaced:
            console.warn(f"{len(unplaced)} tensor(s) onnxruntime quantizes have no counterpart in the torch graph and "
                         f"are calibrated by onnxruntime: {', '.join(unplaced[:5])}{' ...' if len(unplaced) > 5 else ''}")
        model = sim.model  # runs the simulation (the traced graph with its quantization points, or the hooked module)
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
        sim.remove()
        module.eval()

        work = Path(tempfile.mkdtemp(prefix="mlopt-qat-"))
        try:
            trained = artifact.derive("qat-train", module=module)
            export_checked(trained, data, work / "fp32.onnx", ExportConfig())
            out = Path(ctx.out_dir) / "model.onnx"
            quant_pre_process(str(work / "fp32.onnx"), str(work / "pre.onnx"))
            tensors = point_tensors(sim, work / "pre.onnx", quantized, probe)
            pre_nodes = graph.load(work / "pre.onnx").graph.node
            # A batch norm that follows no convolution cannot be folded: onnxruntime runs it as its
            # own node with quantized scale and bias, which the simulation, holding batch norm in
            # float, does not model.
            unfolded = [n.name or n.output[0] for n in pre_nodes if n.op_type == "BatchNormalization"]
            handed = range_overrides(sim, tensors) if config.export_ranges else {}
            quantize(work / "pre.onnx", out, Scheme("static", "qdq", "uint8", "int8", True, "minmax"), feeds, False,
                     overrides=handed)
            final = set(points.quantized_tensors(out))
            calibrated = sorted(final - set(handed))
            kernels = graph.kernel_counts(out)
            sim.attach()
            errors = simulation_errors(sim, out, tensors, probe)
            sim.remove()
            grid = weight_grid(sim, out)
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
            "simulated_points": "onnxruntime's quantized tensors" if sim.traced else "layer inputs",
            "activation_points": len(sim.points),
            "activation_ranges": len(sim.all_observers()),
            "quantized_tensors": len(final),
            "ranges_handed_to_onnxruntime": len(handed),
            "tensors_calibrated_by_onnxruntime": calibrated,
            "simulation_error": errors,
            "weight_codes": grid,
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
