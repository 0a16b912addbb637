"""onnxruntime's fused SkipLayerNormalization against the operators it replaces, on this machine's CPU.

    python benchmarks/layer_norm_kernels.py [--threads 2] [--hidden 384] [--seq 128]

Why mlopt measures its graphs with the layer norms split again (mlopt/export/lib/rewrite.py): each
of three one-node-or-two graphs is timed at batch 1 and 16, with all of onnxruntime's graph
optimizations on (as a user's session runs it):

- SkipLayerNormalization (com.microsoft), the fused kernel;
- Add + LayerNormalization, which the session itself fuses into the kernel above;
- Sum + LayerNormalization, the same arithmetic spelled so that the session leaves it alone (mlopt's
  split form).

Prints mean ms per run of each; the ratio of the first to the third is what the split saves.
"""

from __future__ import annotations

import argparse
import time


def graph(kind: str, hidden: int, seq: int) -> bytes:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", seq, hidden])
    skip = helper.make_tensor_value_info("skip", TensorProto.FLOAT, ["b", seq, hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.random(hidden).astype(np.float32), n) for n in ("gamma", "beta")]
    if kind == "SkipLayerNormalization":
        nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"],
                                  domain="com.microsoft", epsilon=1e-12)]
    else:
        add = "Add" if kind.startswith("Add") else "Sum"
        nodes = [helper.make_node(add, ["x", "skip"], ["s"]),
                 helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, skip], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def main() -> None:
    import numpy as np
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    kinds = ("SkipLayerNormalization", "Add + LayerNormalization", "Sum + LayerNormalization")
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, sequence {args.seq}, hidden {args.hidden}")
    print("| graph | batch 1 ms | batch 16 ms |")
    print("| --- | --- | --- |")
    results = {}
    for kind in kinds:
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.log_severity_level = 3
        session = ort.InferenceSession(graph(kind, args.hidden, args.seq), so, providers=["CPUExecutionProvider"])
        for batch in (1, 16):
            rng = np.random.default_rng(1)
            feed = {n: rng.random((batch, args.seq, args.hidden)).astype(np.float32) for n in ("x", "skip")}
            for _ in range(20):
                session.run(None, feed)
            runs = max(50, 2000 // batch)
            start = time.perf_counter()
            for _ in range(runs):
                session.run(None, feed)
            results[kind, batch] = (time.perf_counter() - start) / runs * 1000
        print(f"| {kind} | {results[kind, 1]:.3f} | {results[kind, 16]:.3f} |")
    for batch in (1, 16):
        print(f"batch {batch}: the fused kernel takes {results[kinds[0], batch] / results[kinds[2], batch]:.2f}x "
              "the time of the split form")


if __name__ == "__main__":
    main()
