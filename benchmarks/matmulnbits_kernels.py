"""onnxruntime's MatMulNBits kernels against its FP32 MatMul, one node at a time: where weight-only models lose time.

    python benchmarks/matmulnbits_kernels.py [--k 576] [--n 1536] [--rows 1 128]

One node per session (CPU provider, 2 intra-op threads, spinning off), random weights and inputs, best of 5
repeats of 20 runs each, for each row count (1: a decoded token; 128: a 128-token prompt): FP32 MatMul, then
MatMulNBits at 4 and 8 bits, blocks of 32 and 128, accuracy levels 0 and 4, without zero points, with
integer (packed uint8) zero points, and, at 4 bits, with float zero points (what hqq writes). The README's
figures for the decoder's time to first token and for hqq's slow kernel come from this script.
"""

from __future__ import annotations

import argparse
import time


def _session(nodes, inits, k):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def fp32(k, n, rng):
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(rng.random((k, n), dtype="float32"), "W")
    return _session([helper.make_node("MatMul", ["A", "W"], ["Y"])], [weight], k)


def nbits(k, n, bits, block, level, zero_points, rng):
    import numpy as np
    from onnx import helper, numpy_helper

    blocks = -(-k // block)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (n, blocks, block * bits // 8), dtype=np.uint8), "B"),
             numpy_helper.from_array((rng.random((n, blocks)) * 0.01).astype(np.float32), "S")]
    if zero_points == "integer":
        inits.append(numpy_helper.from_array(rng.integers(0, 255, (n, -(-blocks * bits // 8)), dtype=np.uint8), "Z"))
    elif zero_points == "float":
        inits.append(numpy_helper.from_array((rng.random((n, blocks)) * 15).astype(np.float32), "Z"))
    node = helper.make_node("MatMulNBits", ["A", "B", "S"] + (["Z"] if zero_points else []), ["Y"],
                            domain="com.microsoft", K=k, N=n, bits=bits, block_size=block, accuracy_level=level)
    return _session([node], inits, k)


def best_ms(session, rows, k, rng, repeats=5, runs=20):
    a = rng.random((rows, k), dtype="float32")
    for _ in range(3):
        session.run(None, {"A": a})
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(runs):
            session.run(None, {"A": a})
        best = min(best, (time.perf_counter() - started) / runs)
    return best * 1e3


def main() -> None:
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=576, help="input features (default 576: SmolLM2-135M's hidden size)")
    p.add_argument("--n", type=int, default=1536, help="output features (default 1536: its MLP width)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 128], help="rows of the input (default 1 128)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"K={args.k}, N={args.n}; best ms of one run at rows {', '.join(map(str, args.rows))}")
    print("| kernel | " + " | ".join(f"rows {r}" for r in args.rows) + " |")
    print("| --- |" + " --- |" * len(args.rows))
    session = fp32(args.k, args.n, rng)
    print("| FP32 MatMul | " + " | ".join(f"{best_ms(session, r, args.k, rng):.3f}" for r in args.rows) + " |")
    for bits in (4, 8):
        for block in (32, 128):
            for level in (0, 4):
                for zero_points in (None, "integer", *(["float"] if bits == 4 else [])):
                    session = nbits(args.k, args.n, bits, block, level, zero_points, rng)
                    label = f"{bits}-bit, block {block}, accuracy level {level}, {zero_points or 'no'} zero points"
                    print(f"| {label} | " + " | ".join(f"{best_ms(session, r, args.k, rng):.3f}" for r in args.rows)
                          + " |")


if __name__ == "__main__":
    main()
