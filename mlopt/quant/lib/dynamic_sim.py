"""The torch side of QAT for onnxruntime's dynamic INT8, the scheme it runs fastest on encoders.

onnxruntime's dynamic quantizer turns every MatMul with a weight into an integer kernel (MatMulInteger, or
QAttention inside a fused attention): the weight int8, symmetric, per output column (7 bits with reduce_range), the
input uint8 over the whole tensor's range as it runs (DynamicQuantizeLinear). Those MatMuls are the model's Linear
layers. It also stores the embedding tables (Gather) in uint8, per tensor, on a grid stretched to hold zero. Rather
than tracing the model (Hugging Face encoders defeat torch.fx), `locate` finds each quantized weight's layer by value
in the exported graph, so the simulation fake-quantizes exactly what onnxruntime quantizes and names what it does
not. The activation grid needs no range to learn or hand over: onnxruntime computes it per run, and so does the
simulation. Written by hand: torch.ao's dynamic quantization follows fbgemm's grid, not onnxruntime's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlopt.core.errors import InputError
from mlopt.quant.lib.simulation import weight_fake_quant

QUANTIZED_SUFFIX = "_quantized"  # onnxruntime's name for a quantized initializer (quant_utils.TENSOR_NAME_QUANT_SUFFIX)


@dataclass
class Located:
    """The Linear and Embedding layers whose weights onnxruntime quantizes ({layer: ONNX weight name}), the Linear
    layers it leaves in float, and quantized weights no layer holds (in a fused node, or a MatMul of constants)."""

    layers: dict[str, str]
    float_layers: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def locate(fp32: Path, int8: Path, module: Any) -> Located:
    """The Linear and Embedding layers of `module` whose weights onnxruntime quantized in `int8` (quantized from
    `fp32`), matched by the weight's values (an ONNX MatMul holds a Linear's weight transposed, a Gather an
    Embedding's as it is)."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    quantized = {i.name.removesuffix(QUANTIZED_SUFFIX) for i in onnx.load(str(int8), load_external_data=False).graph.initializer
                 if i.name.endswith(QUANTIZED_SUFFIX)}
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fp32)).graph.initializer if i.name in quantized}
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    by_shape: dict[tuple[int, ...], list[tuple[str, Any]]] = {}
    for name, m in layers:
        w = m.weight.detach().cpu().numpy()
        w = w.T if isinstance(m, torch.nn.Linear) else w
        by_shape.setdefault(w.shape, []).append((name, w))
    found = Located(layers={})
    for onnx_name, w in weights.items():
        match = next((n for n, t in by_shape.get(tuple(w.shape), []) if n not in found.layers and np.array_equal(t, w)),
                     None)
        if match is None:
            found.unmatched.append(onnx_name)
        else:
            found.layers[match] = onnx_name
    found.float_layers = [n for n, m in layers if n not in found.layers and isinstance(m, torch.nn.Linear)]
    if not any(isinstance(m, torch.nn.Linear) for n, m in layers if n in found.layers):
        raise InputError("qat found no Linear layer whose weight onnxruntime quantizes in the exported model")
    return found


def uint8_grid(x: Any) -> tuple[Any, Any]:
    """The scale and zero point of onnxruntime's asymmetric uint8 grid over x's range stretched to hold zero
    (DynamicQuantizeLinear at run time; the quantizer's for an embedding table)."""
    import torch

    lo = torch.clamp(x.detach().min(), max=0.0).float()
    hi = torch.clamp(x.detach().max(), min=0.0).float()
    scale = torch.clamp((hi - lo) / 255.0, min=1e-12)
    return scale, torch.clamp(torch.round(-lo / scale), 0, 255).to(torch.int32)


def dynamic_fake_quant(x: Any) -> Any:
    """x on the uint8 grid of its own range, with a straight-through gradient."""
    import torch

    scale, zero = uint8_grid(x)
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, 255).to(x.dtype)


def _table_fake_quant() -> Any:
    """A parametrization putting an embedding table on its uint8 grid."""
    import torch

    class TableFakeQuant(torch.nn.Module):
        def forward(self, w: Any) -> Any:
            return dynamic_fake_quant(w)

    return TableFakeQuant()


class DynamicSimulation:
    """Fake quantization of the located layers (a Linear's weight and input, an Embedding's table), attached and
    removed: `remove` leaves the trained float weights and no hooks."""

    def __init__(self, module: Any, layers: list[str], reduce_range: bool):
        modules = dict(module.named_modules())
        self.layers = [(name, modules[name]) for name in layers]
        self.qmax = 64 if reduce_range else 127
        self.handles: list[Any] = []

    def attach(self) -> None:
        import torch
        import torch.nn.utils.parametrize as P

        for _, m in self.layers:
            if isinstance(m, torch.nn.Embedding):
                P.register_parametrization(m, "weight", _table_fake_quant())
                continue
            P.register_parametrization(m, "weight", weight_fake_quant(qmax=self.qmax))
            self.handles.append(m.register_forward_pre_hook(lambda _, inputs: (dynamic_fake_quant(inputs[0]),
                                                                               *inputs[1:])))

    def remove(self) -> None:
        import torch.nn.utils.parametrize as P

        for h in self.handles:
            h.remove()
        self.handles = []
        for _, m in self.layers:
            if P.is_parametrized(m, "weight"):
                P.remove_parametrizations(m, "weight", leave_parametrized=False)

    def weight_codes(self, int8: Path, located: Located) -> dict[str, int]:
        """The int8 weight codes of the simulation against onnxruntime's in `int8`: layers, codes, codes that
        differ (a float rounding at a grid boundary makes one step of difference)."""
        import numpy as np
        import onnx
        import torch
        from onnx import numpy_helper

        theirs = {i.name.removesuffix(QUANTIZED_SUFFIX): i for i in onnx.load(str(int8)).graph.initializer
                  if i.name.endswith(QUANTIZED_SUFFIX)}
        codes = differing = layers = 0
        for name, m in self.layers:
            other = theirs.get(located.layers[name])
            if other is None:  # not quantized in this export (its weight is named otherwise): not compared
                continue
            w = torch.as_tensor(m.weight.detach().float().cpu())  # the float weight (after remove)
            if isinstance(m, torch.nn.Embedding):
                scale, zero = uint8_grid(w)
                mine = torch.clamp(torch.round(w / scale) + zero, 0, 255).numpy()
            else:
                w = w.T  # (in, out), as in ONNX
                scale = torch.clamp(w.abs().amax(dim=0) / self.qmax, min=1e-12)
                mine = torch.clamp(torch.round(w / scale), -self.qmax, self.qmax).numpy()
            other = numpy_helper.to_array(other).astype(np.float32)
            layers += 1
            codes += mine.size
            differing += int((mine != other).sum())
        return {"layers": layers, "codes": codes, "differing": differing}
