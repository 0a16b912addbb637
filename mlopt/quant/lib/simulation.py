"""The torch side of QAT: fake quantization that follows onnxruntime's QDQ U8S8 per-channel scheme,
written by hand since no library simulates onnxruntime's placement of quantize/dequantize pairs.

Weights: symmetric int8 per output channel (Conv, Linear) or per tensor (LayerNorm scales). Batch norm
stays a separate module: onnxruntime folds it into the convolution, and symmetric per-channel
quantization of the folded weight w * g is the same grid as of w for any per-channel factor g.
Activations: asymmetric uint8 per tensor, after the fx nodes computing the tensors onnxruntime
quantizes (`mlopt.quant.lib.points`), or at each weighted layer's input (models torch.fx cannot trace).
"""

from __future__ import annotations

from typing import Any

from mlopt.core.errors import InputError, first_line
from mlopt.quant.lib.points import consumers


def weight_fake_quant(per_channel: bool = True, qmax: int = 127) -> Any:
    """A parametrization fake-quantizing a weight (straight-through) on a symmetric grid [-qmax, qmax] (64:
    onnxruntime's 7-bit weights, reduce_range); a LayerNorm's bias stays float (int32 at a far finer step in
    onnxruntime). Built in a function so that importing this file imports no torch."""
    import torch

    class WeightFakeQuant(torch.nn.Module):
        def forward(self, w: Any) -> Any:
            if not per_channel:
                scale = max(float(w.detach().abs().max()) / qmax, 1e-12)
                return torch.fake_quantize_per_tensor_affine(w.float(), scale, 0, -qmax, qmax).to(w.dtype)
            flat = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1)
            scale = torch.clamp(flat / qmax, min=1e-12).float()
            zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
            return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -qmax, qmax).to(w.dtype)

    return WeightFakeQuant()


def uint8_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of an asymmetric uint8 grid over [lo, hi], stretched to hold zero
    (as onnxruntime computes them)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-12)
    return scale, int(round(-lo / scale))


def activation_observer(ema: float, learned: bool = False) -> Any:
    """An nn.Module whose `quantize` observes one tensor and fake-quantizes it. EMA mode: min/max ranges in
    buffers (so checkpoints keep them), moved by an exponential average while training. Learned mode (LSQ+):
    scale and zero point are parameters started from the calibration range (gradient scaled by 1/sqrt(N x 255))."""
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

        def quantize(self, x: Any, training: bool) -> Any:
            if self.calibrating or (training and not self.frozen and not self.learned):
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
                return x
            if self.learned:
                with torch.no_grad():
                    self.scale.clamp_(min=1e-8)
                    self.zero_point.clamp_(0, 255)
                grad_factor = 1.0 / math.sqrt(x[0].numel() * 255)
                return torch._fake_quantize_learnable_per_tensor_affine(
                    x.float(), self.scale, self.zero_point, 0, 255, grad_factor).to(x.dtype)
            scale, zero = self.qparams()
            return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, 255).to(x.dtype)

    return ActivationObserver()


def quant_point(observer: Any) -> Any:
    """A module that fake-quantizes one tensor with `observer`, which several points may share (as onnxruntime
    gives a Reshape's output its input's scale), kept by reference so that the traced model's state dict stays
    the module's own. For the parity check it can record what it produced, or pass another tensor on instead."""
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
            fq = self.observer.quantize(x, self.training)
            if self.recording:
                self.recorded = fq.detach().float().cpu().numpy()
            if self.replacement is not None:
                fq = self.replacement.to(device=x.device, dtype=x.dtype)
            return fq

        def pre_hook(self, module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
            self.train(module.training)
            return (self(inputs[0]), *inputs[1:])

    return QuantPoint()


def is_weighted(m: Any) -> bool:
    """A layer whose weight is fake-quantized per output channel: Conv1d/2d/3d or Linear (exactly those
    types: transposed convolutions keep their channels on another axis)."""
    import torch

    return type(m).__name__ in ("Conv1d", "Conv2d", "Conv3d", "Linear") and isinstance(
        m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))


class Simulation:
    """Fake quantization attached to a torch module (and removable, leaving plain FP32 weights), its
    activation points set by `place` (`self.model` is then the fx graph module) or `hook_layer_inputs`."""

    def __init__(self, module: Any, ema: float, learned: bool = False):
        import torch

        self.module = module  # the plain module (exported after remove())
        self.model = module  # what runs the simulation
        self.ema, self.learned = ema, learned
        self.layers = [(n, m) for n, m in module.named_modules() if is_weighted(m)]
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
            P.register_parametrization(m, "weight", weight_fake_quant(per_channel=False))
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
        """Put a fake quantization after each node named in `groups` (one observer per group) of `gm`, the fx
        graph of `self.module` (traced before the weights were parametrized, so it shares the layers)."""
        by_name = {n.name: n for n in gm.graph.nodes}
        for names in groups:
            observer = activation_observer(self.ema, self.learned)
            for name in names:
                node, target = by_name[name], f"mlopt_quant{len(self.points)}"
                self.points[name] = quant_point(observer)
                gm.add_submodule(target, self.points[name])
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
        gm.recompile()
        self.model, self.traced = gm, True

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

    def set_ranges(self, ranges: dict[str, tuple[float, float]]) -> None:
        """Start the named points' observers from given (lo, hi) ranges instead of their own calibration."""
        for name, (lo, hi) in ranges.items():
            obs = self.points[name].observer
            obs.lo.fill_(lo)  # buffers: no gradient to keep out of
            obs.hi.fill_(hi)
            obs.start_learning()

    def freeze(self, frozen: bool = True) -> None:
        for obs in self.all_observers():
            obs.set_frozen(frozen)

    def record(self, x: Any, replacements: dict[str, Any] | None = None) -> dict[str, Any]:
        """Each point's fake-quantized value (numpy) for one eval-mode batch; the points in `replacements`
        ({point: tensor}) pass the given tensors on instead of their own."""
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
    gm.recompile()
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
            if not (is_weighted(m) or isinstance(m, covered))
            and any(True for _ in m.parameters(recurse=False))]
