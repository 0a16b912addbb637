"""Aligning QAT's torch simulation with the INT8 graph onnxruntime runs: where onnxruntime quantizes and
where that is in the fx graph, the ranges handed back to it, and the per-tensor comparison in the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlopt.core.sections import Bars, Table
from mlopt.export.lib.onnx import ExportOptions, export_checked
from mlopt.quant.lib import graph
from mlopt.quant.lib.points import match_by_value, onnx_values, quantized_tensors
from mlopt.quant.lib.quantize import Scheme, quantize
from mlopt.quant.lib.simulation import Simulation, trace, uint8_qparams


def match_layers(model: Any, order: list[str], sim: Simulation) -> tuple[dict[str, str], list[str]]:
    """Which tensor of the FP32 ONNX `model` feeds each weighted layer ({layer: tensor}), and the unmatched
    layers. The exporter emits nodes in execution order, so the k-th weighted Conv/Gemm/MatMul of the graph
    is the k-th layer call (checked by weight shape); no library maps torch modules to ONNX tensors."""
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
    """The ONNX tensors (of the pre-processed FP32 model at `pre_path`) each simulation point stands for:
    traced, those found before training (the trained model's export names them the same way) where the
    trained graph has them; hooked, by execution order and weight shape (`match_layers`)."""
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
    """The learned ranges as onnxruntime TensorQuantOverrides (uint8 scale and zero point); a tensor
    several points stand for gets the union of their ranges."""
    import numpy as np

    spans: dict[str, list[tuple[float, float]]] = {}
    for name, names in tensors.items():
        obs = sim.points[name].observer
        if not np.isnan(float(obs.lo)):
            for tensor in names:
                spans.setdefault(tensor, []).append(obs.range())
    overrides = {}
    for tensor, ranges in spans.items():
        scale, zero = uint8_qparams(min(lo for lo, _ in ranges), max(hi for _, hi in ranges))
        overrides[tensor] = [{"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(zero, dtype=np.uint8)}]
    return overrides


def simulation_errors(sim: Simulation, int8_path: Path, tensors: dict[str, list[str]], x: Any) -> list[dict[str, Any]]:
    """Per point of the attached `sim`, its quantized value in torch against onnxruntime's (the DequantizeLinear
    output of the same tensor, run unfused), in quantization steps: accumulated (the simulation run on its own)
    and local (each point computed from onnxruntime's own values at the points before it). A faithful simulation
    is within one step locally; the accumulated error grows with depth, amplified by the layers after it."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

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
    """How many int8 weight codes of the runtime model differ from the simulation's. onnxruntime quantizes
    the weight with batch norm folded in, the simulation the unfolded one: symmetric per-channel, the same
    codes (negated where the batch-norm factor is negative) but for float rounding at a tie. A layer's
    weight is found by name (`<layer>.weight_quantized`), or, where the exporter renamed it (a Linear's
    transposed weight before a MatMul), as the int8 weight of the same shape whose codes agree best."""
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
            scored = sorted((off(v.T), k) for k, v in pool.items() if w.ndim == 2 and v.shape == w.shape[::-1])
            if not scored or scored[0][0] > 0.01 * ours.size:
                continue
            count, best = scored[0]
        pool.pop(best)
        layers += 1
        codes += ours.size
        differing += count
    return {"layers": layers, "codes": codes, "differing": differing}


# onnxruntime's fastest CPU scheme, the one the simulation follows: static QDQ, U8S8, per-channel, min/max.
RUNTIME_SCHEME = Scheme("static", "qdq", "uint8", "int8", True, "minmax")


@dataclass
class RuntimePoints:
    """Where onnxruntime quantizes this model's activations, and where those tensors are in its fx graph."""

    tensors: dict[str, str] = field(default_factory=dict)  # quantized ONNX tensor -> the name of its scale
    nodes: dict[str, str] = field(default_factory=dict)  # quantized ONNX tensor -> the fx node computing it
    groups: list[list[str]] = field(default_factory=list)  # fx nodes sharing a scale, in graph order
    gm: Any = None  # the fx graph module the nodes belong to
    why: str | None = None  # why the simulation falls back to layer inputs


def runtime_points(module: Any, at_runtime_points: bool, pre: Path, feeds: list[Any], x: Any, work: Path) -> RuntimePoints:
    """The tensors onnxruntime's quantizer picks for this model (found by quantizing its pre-processed
    FP32 export `pre` once), located in the module's fx graph by value; empty when asked for layer
    inputs only or when torch.fx cannot trace the model (then `why` says so)."""
    if not at_runtime_points:
        return RuntimePoints()
    gm, why = trace(module)
    if gm is None:
        return RuntimePoints(why=why)
    quantize(pre, work / "qdq.onnx", RUNTIME_SCHEME, feeds[:1], False)
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

    fp32, pre = work / f"{tag}-fp32.onnx", work / f"{tag}-pre.onnx"
    export_checked(artifact.derive(f"qat-{tag}", module=module), data, fp32, ExportOptions())
    quant_pre_process(str(fp32), str(pre))
    return fp32, pre


def runtime_ranges(int8_path: Path, tensors: dict[str, list[str]]) -> dict[str, tuple[float, float]]:
    """The range onnxruntime's uint8 grid covers at the tensors each simulation point stands for, in
    the QDQ model at `int8_path`: {point: (lo, hi)}, the union where a point stands for several."""
    import onnx
    from onnx import numpy_helper

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


def simulation_error_sections(rows: list[dict[str, Any]]) -> list[Table | Bars]:
    """`simulation_errors` as a report table, and its end-to-end maximum per tensor as bars."""
    if not rows:
        return []
    title = "simulation vs onnxruntime, per quantized tensor"
    table = Table(
        title=title,
        columns=["tensor -> read by", "local max steps", "local values off %", "end-to-end max steps",
                 "end-to-end mean steps", "SQNR dB"],
        rows=[[r["point"], r["local_max_error_steps"], 100 * r["local_mismatch"], r["max_error_steps"],
               r["mean_error_steps"], r["sqnr_db"]] for r in rows],
        note="in quantization steps; local: computed from onnxruntime's own inputs; end to end: the simulation run "
             "on its own; SQNR empty: identical")
    bars = Bars(title=f"{title} (end to end)", labels=[r["point"] for r in rows],
                series={"max error": [r["max_error_steps"] for r in rows]}, unit="quantization steps")
    return [table, bars]
