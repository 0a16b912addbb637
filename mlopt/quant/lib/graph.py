"""Facts about ONNX graphs that quantization needs: is it quantized, does it have float weights,
which compute kernels onnxruntime runs in integer and which it leaves in float."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import Any

QUANT_OPS = {
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
    "DynamicQuantizeLinear", "QGemm", "QLinearAdd", "QLinearMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
}
INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm",
                   "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"}
FLOAT_KERNELS = {"Conv", "MatMul", "Gemm", "ConvTranspose", "FusedConv", "FusedMatMul", "FusedGemm", "NchwcConv",
                 "Attention", "MultiHeadAttention"}


def load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False)


def quantized_ops(model: Any) -> list[str]:
    return sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS})


def has_float_weights(model: Any) -> bool:
    import onnx

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    types = {i.name: i.data_type for i in model.graph.initializer}
    weights = [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")
               and len(n.input) > 1]
    return any(types.get(name) in floats for name in weights)


def kernel_counts(path: Path) -> dict[str, Any]:
    """Integer and float compute kernels after onnxruntime's own graph optimisation (what actually runs on
    the CPU); an unfused QDQ pair leaves a float one."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt_path = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(opt_path)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        model = onnx.load(str(opt_path), load_external_data=False)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return {"integer": sum(v for k, v in counts.items() if k in INTEGER_KERNELS),
            "float": sum(v for k, v in counts.items() if k in FLOAT_KERNELS),
            "float_ops": sorted(k for k in counts if k in FLOAT_KERNELS)}
