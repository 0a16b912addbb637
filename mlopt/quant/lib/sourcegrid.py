"""Weights that already lie on a block-quantized grid, stored on that grid exactly.

A decoder shipped as a quantized GGUF file (Q4_0, Q4_1, Q4_K, Q8_0, ...) reaches mlopt as float
weights dequantized by transformers: in each block of 32 consecutive input features of an output
unit, the values are ``offset + step * q`` with q an integer of 4 (or 8) bits. Requantizing them with
round-to-nearest puts them on a different grid and loses quality a second time (on SmolLM2-135M's
Q4_1 weights, +32% perplexity at 4 bits). This module finds such grids and writes each MatMul as
onnxruntime's MatMulNBits on the very same integers:

    W = step * (q - 2**(bits-1)) + r        (MatMulNBits' default zero point, and a float rest r)

Where the grid's offset is a whole number of steps (symmetric grids: Q4_0, Q8_0) r is 0 and the
node is a plain MatMulNBits (with a negative step where a block spans -7..8 steps rather than -8..7). Where it is not (Q4_1 and the k-quants store a float minimum per block,
which MatMulNBits' integer zero points cannot hold, and its float zero points run on a slow kernel)
the rest is added back exactly: ``x @ W = MatMulNBits(x) + blocksums(x) @ R``, with blocksums(x) the
sum of x over each block (one small MatMul with a 0/1 matrix, shared by the MatMuls that read the
same x) and R the [blocks, N] rests. A table read by a Gather (the token embedding) is stored as
GatherBlockQuantized when its grid is symmetric.

Written by hand: onnxruntime's quantizers choose their own grids (round-to-nearest, HQQ, GPTQ,
k-quant) and none of them can be told to keep the one the weights came with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlopt.runtime.graph_edit import attribute, drop_unread

BLOCK = 32  # every GGUF block format that stores 4 or 8 bits groups 32 weights (k-quants: 32 per sub-block)


@dataclass
class Grid:
    """A [K, N] weight on a grid of `bits` bits in blocks of BLOCK along K."""

    bits: int
    codes: Any  # uint8 [N, K // BLOCK, BLOCK], each in 0 .. 2**bits - 1
    steps: Any  # float32 [N, K // BLOCK]
    rests: Any  # float32 [K // BLOCK, N]: W - step * (code - 2**(bits-1)); all zero on a symmetric grid

    @property
    def symmetric(self) -> bool:
        return not self.rests.any()

    def dequantized(self) -> Any:
        """The [K, N] weight this grid holds (for checks)."""
        import numpy as np

        n, blocks, _ = self.codes.shape
        zero = 1 << (self.bits - 1)
        values = self.steps[..., None] * (self.codes.astype(np.float32) - zero) + self.rests.T[..., None]
        return values.reshape(n, blocks * BLOCK).T


def find_grid(weight: Any, bits: int) -> Grid | None:
    """The grid of `bits` bits that `weight` ([K, N], float) lies on exactly, in blocks of BLOCK along K;
    None when K is not a whole number of blocks or any block is off every such grid."""
    import numpy as np

    if weight.ndim != 2 or weight.shape[0] % BLOCK or not np.issubdtype(weight.dtype, np.floating):
        return None
    k, n = weight.shape
    x = np.ascontiguousarray(weight.T, dtype=np.float64).reshape(n, k // BLOCK, BLOCK)
    lo, hi = x.min(-1), x.max(-1)
    span, amax = hi - lo, np.maximum(np.abs(lo), np.abs(hi))
    levels, zero = (1 << bits) - 1, 1 << (bits - 1)
    # Candidate steps, tried in turn on the blocks not placed yet: how ggml's formats set them (the largest
    # magnitude over the extreme code: Q8_0, Q4_0, Q5_0, first, so that a symmetric block such as {0, 8d} stays
    # symmetric; the span over all the levels of b bits: Q4_1, Q5_1), then the smallest gap between a block's
    # distinct values and its halves and thirds (k-quants, whose optimised scales need not reach the extremes).
    gaps = np.diff(np.sort(x, -1), axis=-1)
    gap = np.where(gaps > np.maximum(span, 1e-30)[..., None] * 1e-6, gaps, np.inf).min(-1)
    gap = np.where(np.isfinite(gap), gap, 0.0)
    del gaps
    candidates = [amax / c for b in range(bits, 1, -1) for c in ((1 << (b - 1)) - 1, 1 << (b - 1))]
    candidates += [span / ((1 << b) - 1) for b in range(bits, 1, -1)]
    candidates += [gap, gap / 2, gap / 3]
    step = np.zeros_like(lo)
    found = span == 0  # a constant block: one level
    step[found] = np.maximum(np.abs(lo[found]), 1e-30)
    for candidate in candidates:
        open_ = np.flatnonzero(~found & (candidate > 0))
        if not open_.size:
            continue
        size = candidate.reshape(-1)[open_]
        q = (x.reshape(-1, BLOCK)[open_] - lo.reshape(-1)[open_, None]) / size[:, None]
        # exact to float32's rounding, not merely close: a step 1e-4 off still rounds 15 levels to integers
        off = np.abs(q - np.rint(q)).max(-1) * size
        fits = (off <= 1e-6 * amax.reshape(-1)[open_]) & (np.rint(span.reshape(-1)[open_] / size) <= levels)
        step.reshape(-1)[open_[fits]] = size[fits]
        found.reshape(-1)[open_[fits]] = True
        if found.all():
            break
    if not found.all():
        return None
    q = np.rint((x - lo[..., None]) / step[..., None])
    count = np.rint(span / step)
    # Codes q + k with the whole shift k that brings the grid closest to MatMulNBits' zero point: the rest
    # lo - (k - zero) * step is then 0 on a symmetric grid and at most half a step otherwise (no cancellation).
    shift = np.clip(zero + np.rint(lo / step), 0, levels - count)
    rests = lo - (shift - zero) * step
    exact = np.abs(rests) <= 1e-6 * np.maximum(amax, 1e-30)  # float rounding of the step, not an offset
    # Or symmetric with a negative step: ggml's Q4_0 scales by the signed extreme, so a block may span -7..8 steps.
    flipped = np.rint(-lo / step - count)  # the code of the block's highest value, counted downwards from zero
    mirrored = ~exact & (np.abs(lo - np.rint(lo / step) * step) <= 1e-6 * np.maximum(amax, 1e-30)) & \
        (zero + flipped >= 0) & \
        (zero + flipped + count <= levels)
    codes = np.where(mirrored[..., None], zero - np.rint(x / step[..., None]), q + shift[..., None])
    rests = np.where(exact | mirrored, 0.0, rests)
    step = np.where(mirrored, -step, step)
    grid = Grid(bits, codes.astype(np.uint8), step.astype(np.float32), np.ascontiguousarray(rests.T, dtype=np.float32))
    error = np.abs(grid.dequantized() - weight).max(initial=0)
    if error > 1e-5 * max(float(np.abs(weight).max(initial=0)), 1e-30):
        return None
    return grid


def packed(grid: Grid) -> Any:
    """MatMulNBits' B layout: [N, blocks, BLOCK * bits / 8] uint8, two 4-bit codes a byte, the first in the low
    half."""
    import numpy as np

    if grid.bits == 8:
        return grid.codes
    low, high = grid.codes[..., 0::2], grid.codes[..., 1::2]
    return (low | (high << 4)).astype(np.uint8)


def _sample_fits(weight: Any, bits: int) -> bool:
    """A quick look before the whole tensor: do its first 64 output units lie on a grid?"""
    return weight.ndim == 2 and find_grid(weight[:, :64], bits) is not None


_CHUNK = 1 << 21  # weights searched at a time: find_grid holds several float64 copies of what it reads


def grid_of(weight: Any) -> Grid | None:
    """The weight's grid at 4 bits, else at 8; None when it lies on neither. Searched a slice of output units
    at a time, so that an LM head of a large vocabulary needs no more memory than a small matrix."""
    import numpy as np

    if weight.ndim != 2 or weight.dtype != np.float32:
        return None
    width = max(1, _CHUNK // max(weight.shape[0], 1))
    for bits in (4, 8):
        if not _sample_fits(weight, bits):
            continue
        parts = []
        for start in range(0, weight.shape[1], width):
            part = find_grid(weight[:, start:start + width], bits)
            if part is None:
                break
            parts.append(part)
        else:
            return Grid(bits, np.concatenate([p.codes for p in parts]), np.concatenate([p.steps for p in parts]),
                        np.concatenate([p.rests for p in parts], axis=1))
    return None


@dataclass
class Stored:
    """What `store_on_grids` wrote: node names by how each weight was stored."""

    int4: list[str]
    int8: list[str]
    with_rests: list[str]  # of those, the MatMuls whose grid needed the float rests added back
    tables: list[str]  # embedding Gathers stored as GatherBlockQuantized
    off_grid: list[str]  # MatMuls with a constant weight on no grid (the caller quantizes them otherwise)


def store_on_grids(model: Any, accuracy_level: int) -> Stored:
    """Rewrite, in place, each MatMul whose constant weight lies on a grid as MatMulNBits on that grid (with
    the rests added back where the grid has a float offset), and each embedding Gather whose table lies on a
    symmetric grid as GatherBlockQuantized."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    # A graph input with a default value (an initializer of that name) can be fed another: it is no constant
    inits = {i.name: i for i in graph.initializer if i.name not in {v.name for v in graph.input}}
    stored = Stored([], [], [], [], [])
    nodes: list[Any] = []
    added: list[Any] = []
    dropped: set[str] = set()
    blocksums: dict[str, str] = {}  # input tensor -> its block sums, shared by the MatMuls reading it
    grids: dict[str, Grid | None] = {}
    producers = {o: n for n in graph.node for o in n.output}
    written: set[str] = set()
    tables: dict[str, tuple[str, str]] = {}  # table -> (codes, scales) of its GatherBlockQuantized

    def grid_for(key: str, tensor: Any, transpose: bool) -> Grid | None:
        if key not in grids:  # a weight read by several nodes (tied) is searched once
            values = numpy_helper.to_array(tensor)
            grids[key] = grid_of(values.T if transpose and values.ndim == 2 else values)
        return grids[key]

    def matmul_initializers(name: str, grid: Grid) -> tuple[str, str]:
        codes, scales = f"{name}_grid_q{grid.bits}", f"{name}_grid_scales"
        if codes not in written:
            written.add(codes)
            added.extend([numpy_helper.from_array(packed(grid), codes), numpy_helper.from_array(grid.steps, scales)])
            if not grid.symmetric:
                added.append(numpy_helper.from_array(grid.rests, f"{name}_grid_rests"))
        return codes, scales

    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        source = table_source(node, inits, producers) if node.op_type == "Gather" and node.input else None
        if weight is not None:
            grid = grid_for(weight.name, weight, transpose=False)
            if grid is None:
                stored.off_grid.append(node.name)
                nodes.append(node)
                continue
            codes, scales = matmul_initializers(weight.name, grid)
            n, blocks, _ = grid.codes.shape
            k = blocks * BLOCK
            name = node.name or node.output[0]
            out = node.output[0] if grid.symmetric else f"{name}/grid_out"
            nodes.append(helper.make_node("MatMulNBits", [node.input[0], codes, scales], [out],
                                          name=f"{name}_Q{grid.bits}", domain="com.microsoft", K=k, N=n,
                                          bits=grid.bits, block_size=BLOCK, accuracy_level=accuracy_level))
            (stored.int4 if grid.bits == 4 else stored.int8).append(node.name)
            if not grid.symmetric:
                x = node.input[0]
                if x not in blocksums:
                    ones = f"grid_block_ones_{k}"
                    if ones not in inits:
                        indicator = np.kron(np.eye(k // BLOCK, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
                        inits[ones] = numpy_helper.from_array(indicator, ones)
                        added.append(inits[ones])
                    blocksums[x] = f"{name}/grid_blocksums"
                    nodes.append(helper.make_node("MatMul", [x, ones], [blocksums[x]], name=f"{name}/grid_blocksum"))
                nodes.append(helper.make_node("MatMul", [blocksums[x], f"{weight.name}_grid_rests"], [f"{name}/grid_rest"],
                                              name=f"{name}/grid_rest"))
                nodes.append(helper.make_node("Add", [out, f"{name}/grid_rest"], [node.output[0]],
                                              name=f"{name}/grid_add"))
                stored.with_rests.append(node.name)
            dropped.add(weight.name)
        elif source is not None and attribute(node, "axis", 0) == 0:
            matrix, via_transpose = source
            # through a Transpose the matrix is [H, V] already, the MatMul's layout; a table itself is [V, H]
            grid = grid_for(matrix.name if via_transpose else f"{matrix.name}:table", matrix, transpose=not via_transpose)
            if grid is None or not grid.symmetric:  # GatherBlockQuantized takes integer zero points only
                nodes.append(node)
                continue
            if matrix.name in tables:  # a table read by several Gathers is stored once
                data_name, scale_name = tables[matrix.name]
            elif via_transpose and grid.bits == 8:
                # A tied LM head: its MatMulNBits' 8-bit codes and scales are this table's, byte for byte
                codes, scale_name = matmul_initializers(matrix.name, grid)
                vocab, blocks, _ = grid.codes.shape
                more_nodes, more = gather_from_head(codes, scale_name, vocab, blocks * BLOCK, BLOCK, node.input[1],
                                                    node.output[0], f"{node.name or node.output[0]}_Q8")
                nodes += more_nodes
                added += more
                tables[matrix.name] = (f"{codes}_as_table", scale_name)  # for another reader of this table
                stored.tables.append(node.name or node.output[0])
                dropped.add(matrix.name)
                continue
            else:
                data, scales = _table_layout(grid)
                data.name, scale_name = f"{matrix.name}_table_q{grid.bits}", f"{matrix.name}_table_scales"
                data_name = data.name
                added += [data, numpy_helper.from_array(scales, scale_name)]
            tables[matrix.name] = (data_name, scale_name)
            nodes.append(helper.make_node("GatherBlockQuantized", [data_name, node.input[1], scale_name],
                                          list(node.output), name=f"{node.name or node.output[0]}_Q{grid.bits}",
                                          domain="com.microsoft", gather_axis=0, quantize_axis=1,
                                          block_size=BLOCK, **({"bits": 8} if grid.bits == 8 else {})))
            stored.tables.append(node.name or node.output[0])
            dropped.add(matrix.name)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    drop_unread(model, dropped)  # and the Transpose that fed a tied table to its Gather
    return stored


def tied_gather(model: Any) -> tuple[Any, Any] | None:
    """The embedding Gather that reads a constant [H, V] matrix through a Transpose (tied embeddings: the
    builder feeds it the LM head's weight), and that Transpose; None when no Gather does."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        source = table_source(node, inits, producers) if node.op_type == "Gather" and node.input else None
        if source is not None and source[1]:
            return node, producers[node.input[0]]
    return None


def table_source(node: Any, inits: dict[str, Any], producers: dict[str, Any]) -> tuple[Any, bool] | None:
    """The constant a Gather reads its rows from, and whether through a Transpose of it (a tied embedding: the
    LM head's [H, V] matrix)."""
    if node.input[0] in inits:
        return inits[node.input[0]], False
    source = producers.get(node.input[0])
    perm = attribute(source, "perm", [1, 0]) if source is not None else None
    if source is not None and source.op_type == "Transpose" and source.input[0] in inits and perm == [1, 0]:
        return inits[source.input[0]], True
    return None


def _table_layout(grid: Grid) -> tuple[Any, Any]:
    """GatherBlockQuantized's data ([V, H]: int4 signed codes, or uint8 with the zero point 128) and scales
    ([V, H / BLOCK]) for a symmetric grid found on a table's transpose."""
    import numpy as np
    from onnx import TensorProto, helper

    v, blocks, _ = grid.codes.shape
    if grid.bits == 8:
        codes = grid.codes.reshape(v, blocks * BLOCK)
        data = helper.make_tensor("", TensorProto.UINT8, codes.shape, codes.tobytes(), raw=True)
    else:
        signed = (grid.codes.astype(np.int16) - 8).reshape(v, blocks * BLOCK)
        nibbles = (signed & 0xF).astype(np.uint8)
        data = helper.make_tensor("", TensorProto.INT4, signed.shape, (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).tobytes(),
                                  raw=True)
    return data, grid.steps


_LOOKED_AT = 8  # MatMul weights lies_on_grids reads at most: a file may keep its first projections off every grid


def lies_on_grids(path: Any) -> bool:
    """Whether any of the first MatMul weights of the ONNX model at `path` lies on a block grid (a quick look at
    their first output units; only those tensors are read): the sign of a decoder dequantized from a GGUF file,
    where the "grid" candidate applies."""
    from pathlib import Path

    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]
    for name in list(dict.fromkeys(weights))[:_LOOKED_AT]:
        tensor = inits[name]
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(Path(path).parent))
        values = numpy_helper.to_array(tensor)
        if values.ndim == 2 and values.dtype == np.float32 and any(_sample_fits(values, b) for b in (4, 8)):
            return True
    return False


def gather_from_head(codes: str, scales: str, vocab: int, hidden: int, block: int, ids: str, output: str,
                     name: str) -> tuple[list[Any], list[Any]]:
    """The nodes and initializers of an embedding lookup that reads a tied LM head's 8-bit MatMulNBits codes
    ([V, blocks, block] uint8, zero point 128) and scales ([V, blocks]) as its table, as onnxruntime-genai's
    builder shares them: the codes seen as [V, blocks * block], GatherBlockQuantized, and the padding of the
    last block sliced off when the hidden size is not a whole number of blocks."""
    import numpy as np
    from onnx import helper, numpy_helper

    padded = -(-hidden // block) * block
    table, gathered = f"{codes}_as_table", output if padded == hidden else f"{name}/padded"
    initializers = [numpy_helper.from_array(np.array([vocab, padded], np.int64), f"{codes}_table_shape")]
    nodes = [helper.make_node("Reshape", [codes, initializers[0].name], [table], name=f"{table}/reshape"),
             helper.make_node("GatherBlockQuantized", [table, ids, scales], [gathered], name=name,
                              domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block, bits=8)]
    if padded != hidden:
        bounds = [numpy_helper.from_array(np.array([v], np.int64), f"{name}/{label}")
                  for v, label in ((0, "start"), (hidden, "end"), (-1, "axis"))]
        initializers += bounds
        nodes.append(helper.make_node("Slice", [gathered, *(b.name for b in bounds)], [output], name=f"{name}/slice"))
    return nodes, initializers
