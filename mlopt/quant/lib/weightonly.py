"""Weight-only quantization of a decoder's genai folder with onnxruntime's MatMulNBits quantizer.

A scheme names the algorithm (rtn: onnxruntime's own round-to-nearest; hqq; gptq, calibrated on
text; k_quant), the bits (4 or 8), the block size, symmetric or not, the ``accuracy_level`` of the
MatMulNBits kernels (4: int8 activations, fastest on AVX512-VNNI and the riskiest) and which
groups of weights stay at 8 bits or in float (the embedding table, the LM head, the first and last
blocks, the attention or the MLP projections). onnxruntime does the quantizing; mlopt writes only
the folder around it and one graph change no quantizer makes (see `untie_embedding`).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from mlopt.core import console
from mlopt.core.errors import InputError, RunError, first_line
from mlopt.quant.lib.sourcegrid import tied_gather
from mlopt.runtime.artifacts import copy_genai_files
from mlopt.runtime.decoder import last_token_only, lm_head, onnx_name
from mlopt.runtime.graph_edit import attribute

Algorithm = Literal["rtn", "hqq", "gptq", "k_quant", "grid"]
Precision = Literal["int4", "int8"]
#: the groups of weights whose precision a scheme may raise, by what their nodes are named in the builder's graph
GROUPS = ("embedding", "lm_head", "first_block", "last_block", "attention", "mlp")


@dataclass(frozen=True)
class WeightScheme:
    algorithm: Algorithm = "rtn"
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    embedding: Literal["int4", "float"] = "int4"  # onnxruntime quantizes a Gather to 4 bits only
    lm_head: Precision = "int4"
    raised: tuple[str, ...] = field(default=())  # groups of MatMuls kept at 8 bits (mixed precision)
    smooth: float = 0.0  # SmoothQuant's alpha, applied to the FP32 graph before quantizing (0: none)
    fine: tuple[str, ...] = field(default=())  # roles (see block_roles) whose MatMuls get blocks of fine_block
    fine_block: int = 0

    @property
    def label(self) -> str:
        if self.algorithm == "grid":
            return f"grid (the weights' own 4/8-bit grid, the rest int8) acc{self.accuracy_level}"
        parts = [f"int{self.bits}", self.algorithm if self.bits == 4 else "", f"b{self.block_size}",
                 "sym" if self.symmetric else "asym", f"acc{self.accuracy_level}"]
        extras = [f"embedding:{self.embedding}"] if self.embedding != "int4" else []
        extras += [f"lm_head:{self.lm_head}"] if self.lm_head != f"int{self.bits}" else []
        extras += [f"{g}:int8" for g in self.raised]
        extras += [f"{role}:b{self.fine_block}" for role in self.fine]
        extras += [f"smoothed {self.smooth:g}"] if self.smooth else []
        return " ".join(p for p in parts if p) + (f" ({', '.join(extras)})" if extras else "")

    def with_raised(self, group: str) -> "WeightScheme":
        if group == "embedding":
            return replace(self, embedding="float")
        if group == "lm_head":
            return replace(self, lm_head="int8")
        return replace(self, raised=tuple(sorted({*self.raised, group})))


def int8_scheme(block_size: int = 32, accuracy_level: int = 4) -> WeightScheme:
    return WeightScheme(algorithm="rtn", bits=8, block_size=block_size, symmetric=True, accuracy_level=accuracy_level,
                        embedding="int4", lm_head="int8")


def _group_of(node_name: str, layers: int) -> set[str]:
    """The groups a MatMul of the builder's graph belongs to (its names: /model/layers.N/attn/..., /lm_head/MatMul)."""
    if "lm_head" in node_name:
        return {"lm_head"}
    match = re.search(r"layers\.(\d+)/", node_name)
    groups = set()
    if match:
        index = int(match.group(1))
        groups |= {"first_block"} if index == 0 else set()
        groups |= {"last_block"} if index == layers - 1 else set()
        groups |= {"attention"} if "/attn/" in node_name else {"mlp"} if "/mlp/" in node_name else set()
    return groups


def untie_embedding(model: Any) -> bool:
    """Give the token embedding Gather its own weight when it reads the LM head's through a Transpose.

    With tied embeddings the builder stores one [hidden, vocab] matrix for the LM head's MatMul and
    feeds the embedding Gather its transpose at run time. Once the MatMul is quantized, that float
    matrix stays in the file for the Gather alone, unquantizable (not a constant) and as large as
    the rest of a small decoder together. Written by hand: no quantizer or rewriter does this.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    tied = tied_gather(model)
    if tied is None:
        return False
    node, source = tied
    weight = numpy_helper.to_array(next(i for i in graph.initializer if i.name == source.input[0]))
    name = f"{source.input[0]}.embedding"
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
    node.input[0] = name
    if not any(source.output[0] in n.input for n in graph.node):
        graph.node.remove(source)
    return True


def _matmuls(model: Any) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]


def _embedding_gathers(model: Any) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in inits]


def _layer_count(names: Iterable[str]) -> int:
    found = [int(m.group(1)) for n in names for m in [re.search(r"layers\.(\d+)/", n)] if m]
    return max(found) + 1 if found else 0


def block_roles(model: Any) -> dict[str, list[str]]:
    """The MatMuls of the layers by role: one role per node name with the layer index taken out, merged with the
    roles whose nodes read the same activation (a gated MLP's gate and up projections), named by the projections'
    own names ("qkv_proj", "gate_proj+up_proj"; with their parents where two roles would share a name). The LM
    head is no role's. A finer block for a role's weights is a finer block for the activation its kernels quantize
    to int8 (accuracy level 4) too."""
    def role(name: str) -> str:
        return re.sub(r"layers\.\d+/", "layers.N/", name)

    matmuls = [name for name in _matmuls(model) if re.search(r"layers\.\d+/", name)]
    layered = set(matmuls)
    reads: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.name in layered:
            reads.setdefault(node.input[0], set()).add(role(node.name))
    merged: list[set[str]] = []
    for roles in reads.values():
        joined = [m for m in merged if m & roles]
        merged = [m for m in merged if not m & roles] + [set(roles).union(*joined)]

    def named(group: set[str], parts: int) -> str:
        return "+".join(sorted({"/".join(r.split("/")[-1 - parts:-1]) for r in group}))

    short = [named(group, 1) for group in merged]
    labels = {r: named(group, 2) if short.count(label) > 1 else label
              for group, label in zip(merged, short) for r in group}
    found: dict[str, list[str]] = {}
    for name in matmuls:
        found.setdefault(labels[role(name)], []).append(name)
    return found


def plan_nodes(model: Any, scheme: WeightScheme) -> dict[str, list[str]]:
    """Which nodes each pass of the quantizer takes: "low" at scheme.bits, "int8" (run before it, see `_quantize`),
    "fine" (roles at a finer block, INT8 only) and "int4" (an embedding Gather, which onnxruntime quantizes to 4 bits
    only) in passes of their own."""
    matmuls, gathers = _matmuls(model), _embedding_gathers(model)
    layers = _layer_count(matmuls)
    roles = block_roles(model) if scheme.fine else {}
    missing = [role for role in scheme.fine if role not in roles]
    if scheme.fine and scheme.bits != 8:
        raise RunError(f"finer blocks are for INT8 schemes, not int{scheme.bits}")
    if missing:
        raise RunError(f"no MatMuls of the role(s) {', '.join(missing)} in this graph (its roles: "
                       f"{', '.join(roles) or 'none'})")
    fine = [name for role in scheme.fine for name in roles[role]]
    taken = set(fine)
    matmuls = [name for name in matmuls if name not in taken]
    low, high = [], []
    for name in matmuls:
        groups = _group_of(name, layers)
        precision = scheme.lm_head if "lm_head" in groups else ("int8" if groups & set(scheme.raised) else f"int{scheme.bits}")
        (low if precision == f"int{scheme.bits}" else high).append(name)
    gather = gathers if scheme.embedding == "int4" else []
    if scheme.bits == 8:
        return {"low": low + high, "fine": fine, "int4": gather}
    return {"low": low + gather, "int8": high}


def _algo_config(scheme: WeightScheme, ops: tuple[str, ...], calibration: Any) -> Any:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if scheme.algorithm == "rtn" or scheme.bits == 8:
        return mnq.DefaultWeightOnlyQuantConfig(block_size=scheme.block_size, is_symmetric=scheme.symmetric,
                                                accuracy_level=scheme.accuracy_level, bits=scheme.bits,
                                                op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
    if scheme.algorithm == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=scheme.block_size, bits=4, op_types_to_quantize=ops,
                                            quant_axes=(("MatMul", 0), ("Gather", 1)))
    if scheme.algorithm == "k_quant":
        return mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
    if calibration is None:
        raise InputError("gptq needs calibration text: give --data text:FILE")
    return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration, block_size=scheme.block_size,
                                         op_types_to_quantize=("MatMul",))


def _quantize_pass(model: Any, scheme: WeightScheme, nodes: list[str], calibration: Any, work: Path) -> Any:
    """Run onnxruntime's MatMulNBitsQuantizer over exactly `nodes`; returns the new ModelProto.

    gptq and k_quant quantize MatMuls only: an embedding Gather among `nodes` gets round-to-nearest."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    types = {n.name: n.op_type for n in model.graph.node}
    wanted = set(nodes)
    if scheme.algorithm != "rtn" and scheme.bits == 4:  # hqq, gptq and k_quant quantize no Gather
        gathers = {n for n in wanted if types.get(n) == "Gather"}
        if gathers:
            model = _quantize_pass(model, replace(scheme, algorithm="rtn"), sorted(gathers), None, work)
            wanted -= gathers
    if not wanted:
        return model
    ops = tuple(sorted({types[n] for n in wanted}))
    config = _algo_config(scheme, ops, calibration)
    if config.algorithm in ("GPTQ", "k_quant"):  # their block layout needs whole blocks (a reshape error otherwise)
        _check_whole_blocks(model, wanted, scheme)
    excluded = sorted(n for n, op in types.items() if op in ops and n not in wanted)
    source: Any = model
    in_work = contextlib.nullcontext()
    if config.algorithm in ("GPTQ", "k_quant"):  # these read the model from a path, its data from the working directory
        source = str(work / "source.onnx")
        onnx.save_model(model, source, save_as_external_data=True, location="source.onnx.data")
        in_work = _working_directory(work)
    quantizer = MatMulNBitsQuantizer(source, bits=scheme.bits, block_size=scheme.block_size,
                                     is_symmetric=scheme.symmetric, accuracy_level=scheme.accuracy_level,
                                     nodes_to_exclude=excluded, algo_config=config)
    loggers = ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor")
    with in_work, console.muted_loggers(*loggers), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):  # k_quant and gptq print progress bars on stdout
        warnings.simplefilter("ignore")  # numpy's divide-by-zero on all-zero blocks, torch's read-only array notice
        quantizer.process()
        result = quantizer.model.model
        if source is not model:  # the result still points at source.onnx.data: read it in before work is removed
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(result, str(work))
    return result


def _check_whole_blocks(model: Any, nodes: set[str], scheme: WeightScheme) -> None:
    """onnxruntime's gptq and k_quant split each weight's input dimension K into whole blocks, and pack the 4-bit
    zero points (k_quant's, asymmetric gptq's) of all output columns as one run of nibbles before cutting it into
    a row per column, which holds only for an even number of blocks per column: either kind of K is one line here
    instead of numpy's reshape error from inside the quantizer (SmolLM2's K = 576 in blocks of 64: "cannot
    reshape array of size 4320")."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        dims = shapes.get(node.input[1]) if node.name in nodes and len(node.input) > 1 else None
        if not dims or len(dims) != 2:
            continue
        if dims[0] % scheme.block_size:
            raise RunError(f"{scheme.algorithm} needs whole blocks: {node.name} has K = {dims[0]}, not a multiple of "
                           f"the block size {scheme.block_size}")
        blocks = dims[0] // scheme.block_size
        if scheme.bits == 4 and blocks % 2 and dims[1] > 1 and (scheme.algorithm == "k_quant" or not scheme.symmetric):
            raise RunError(f"{scheme.algorithm} needs an even number of blocks per column at 4 bits: {node.name} has "
                           f"K = {dims[0]}, {blocks} blocks of {scheme.block_size} (onnxruntime packs the zero points "
                           "of all columns as one run of nibbles)")


@contextlib.contextmanager
def _working_directory(path: Path) -> Any:
    import os

    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


class TextCalibration:
    """GPTQ's calibration data: windows of token ids fed to the decoder graph with an empty KV cache
    (`generation.window_feed`)."""

    def __init__(self, feed_of: Callable[[list[int]], dict[str, Any]], windows: list[list[int]]):
        self._feed, self.windows = feed_of, windows
        self._iter: Any = None

    def get_next(self) -> dict[str, Any] | None:
        if self._iter is None:
            self._iter = iter(self.windows)
        ids = next(self._iter, None)
        return None if ids is None else self._feed(ids)

    def __iter__(self) -> Any:
        return (self._feed(ids) for ids in self.windows)

    def rewind(self) -> None:
        self._iter = None


def _check_bits(model: Any, scheme: WeightScheme, planned_int8: int) -> None:
    """The quantized graph keeps the planned MatMuls at 8 bits: gptq, for one, quantizes every MatMul whatever it
    was asked to leave out, and a mix it ignored must not be reported under the mix's name."""
    bits = [attribute(n, "bits", 4) for n in model.graph.node if n.op_type == "MatMulNBits"]
    if scheme.bits == 4 and bits.count(8) != planned_int8:
        raise RunError(f"{scheme.algorithm} quantized {bits.count(8)} MatMul(s) to 8 bits where {planned_int8} were "
                       "planned (it does not honour the layers left out)")


def _quantize(model: Any, scheme: WeightScheme, calibration: Any, work: Path) -> Any:
    """The passes of onnxruntime's quantizer a scheme asks for; returns the quantized ModelProto. A tied embedding
    reads the LM head's 8-bit codes when the head gets 8 bits (`share_tied_head`), else gets its own copy."""
    share = scheme.embedding != "float" and (scheme.bits == 8 or scheme.lm_head == "int8")
    head = _tied_head_output(model) if share else None
    if scheme.embedding != "float" and head is None:
        untie_embedding(model)
    nodes = plan_nodes(model, scheme)
    # The MatMuls a mix keeps at 8 bits go first: gptq quantizes every MatMul it finds, whatever it was asked to
    # leave out, and a MatMulNBits is no longer one.
    if nodes.get("int8"):
        model = _quantize_pass(model, int8_scheme(scheme.block_size, scheme.accuracy_level), nodes["int8"], None, work)
    if nodes.get("fine"):
        model = _quantize_pass(model, replace(scheme, block_size=scheme.fine_block, fine=()), nodes["fine"], None, work)
    last = lm_head(model) if scheme.algorithm == "gptq" and last_token_only(model) else None
    if last in nodes["low"]:
        # The LM head of a last-token graph sees one row per calibration window: too few for gptq's Hessian.
        model = _quantize_pass(model, replace(scheme, algorithm="rtn"), [last], None, work)
        nodes["low"] = [n for n in nodes["low"] if n != last]
    model = _quantize_pass(model, scheme, nodes["low"], calibration, work)
    if nodes.get("int4"):
        model = _quantize_pass(model, replace(scheme, bits=4, algorithm="rtn"), nodes["int4"], None, work)
    if head is not None and not share_tied_head(model, head) and untie_embedding(model):  # the head is not 8-bit
        model = _quantize_pass(model, replace(scheme, bits=4, algorithm="rtn"), _embedding_gathers(model), None, work)
    _check_bits(model, scheme, len(nodes.get("int8", [])))
    return model


def _tied_head_output(model: Any) -> str | None:
    """The output of the LM head's MatMul whose weight a tied embedding Gather reads (through a Transpose); the
    quantizer keeps that tensor's name on the node it writes in the MatMul's place."""
    tied = tied_gather(model)
    weight = tied[1].input[0] if tied is not None else None
    return next((n.output[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1:2] == [weight]), None)


def share_tied_head(model: Any, head_output: str) -> bool:
    """Where the embedding Gather reads the LM head's float matrix through a Transpose (tied embeddings) and the
    head (the node writing `head_output`) is now an 8-bit MatMulNBits, the Gather reads the head's codes instead
    (GatherBlockQuantized, as the builder's shared embeddings do) and the float matrix leaves the file: one
    8-bit copy serves both, where untying stores a second, 4-bit one. Returns whether it changed the graph."""
    from mlopt.quant.lib.sourcegrid import gather_from_head
    from mlopt.runtime.graph_edit import drop_unread

    graph = model.graph
    tied = tied_gather(model)
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and head_output in n.output), None)
    attrs = {a.name: a.i for a in head.attribute} if head is not None else {}
    if tied is None or attrs.get("bits") != 8 or any(head.input[3:]):  # no 8-bit head, or one with zero points
        return False
    node, source = tied
    index = list(graph.node).index(node)
    nodes, initializers = gather_from_head(head.input[1], head.input[2], attrs["N"], attrs["K"], attrs["block_size"],
                                           node.input[1], node.output[0], f"{node.name or node.output[0]}_Q8")
    graph.node.remove(node)
    for offset, new in enumerate(nodes):
        graph.node.insert(index + offset, new)
    graph.initializer.extend(initializers)
    drop_unread(model, {source.input[0]})  # the Transpose and the float matrix
    return True


def _store_grids(model: Any, scheme: WeightScheme, work: Path) -> None:
    """The "grid" scheme, in place: weights that lie on a block grid (a GGUF file's) stored on it exactly
    (`sourcegrid`); the MatMuls on none at 8 bits, and a table on no symmetric grid at 4 bits (rtn)."""
    from mlopt.quant.lib.sourcegrid import store_on_grids

    stored = store_on_grids(model, scheme.accuracy_level)
    if not stored.int4 and not stored.int8:
        raise RunError("no weight of this decoder lies on a block grid (it was not dequantized from one)")
    rest = _quantize_pass(model, int8_scheme(32, scheme.accuracy_level), stored.off_grid, None, work) \
        if stored.off_grid else model
    if scheme.embedding == "int4":
        untie_embedding(rest)  # a tied table on no symmetric grid gets its own copy, quantized as rtn's are
        if _embedding_gathers(rest):
            rest = _quantize_pass(rest, replace(scheme, algorithm="rtn", bits=4), _embedding_gathers(rest), None, work)
    if rest is not model:
        model.CopyFrom(rest)


def quantize_folder(src: Path, dst: Path, scheme: WeightScheme, calibration: Any = None) -> Path:
    """Write `dst`: the genai folder `src` with its weights quantized by `scheme`. Returns dst/model.onnx."""
    import onnx

    try:
        name = onnx_name(src)
        model = onnx.load(str(src / name))
    except Exception as exc:
        raise InputError(f"cannot read the decoder graph in {src}: {first_line(exc)}") from exc
    if any(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in model.graph.node):
        raise InputError(f"{src} is already quantized (MatMulNBits); give the FP32 decoder")
    dst.mkdir(parents=True, exist_ok=True)
    work = dst / ".work"
    work.mkdir(exist_ok=True)
    try:
        if scheme.algorithm == "grid":
            _store_grids(model, scheme, work)
        else:
            model = _quantize(model, scheme, calibration, work)
        onnx.save_model(model, str(dst / name), save_as_external_data=True, location=f"{name}.data")
    except (InputError, RunError):
        raise
    except Exception as exc:
        raise RunError(f"quantizing {scheme.label} failed: {type(exc).__name__}: {first_line(exc)[:200]}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    copy_genai_files(src, dst, weights=False)  # genai_config.json, the tokenizer files
    return dst / name
