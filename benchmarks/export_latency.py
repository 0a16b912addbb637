"""Export parity and onnxruntime FP32 latency against torch eager, measured as ratios in one run.

    python benchmarks/export_latency.py [--models resnet18 mobilenet_v2] [--iterations 50]

For each torchvision model at 1x3x224x224 (random weights: latency and parity do not depend on
training), mlopt exports it to ONNX, checks parity on 16 random inputs, then times torch eager
and onnxruntime (CPU, batch 1) one after the other in this process. Ratios are what to compare
across machines; absolute milliseconds depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def time_fn(fn, iterations: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main() -> None:
    import torch

    from mlopt.export.lib.onnx import export_onnx
    from mlopt.export.lib.parity import compare
    from mlopt.runtime.session import make_session
    from mlopt.runtime.models import build_module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<14}{'max abs err':>12}{'rel err':>10}{'top-1 agree':>13}{'torch ms':>10}{'ort ms':>9}{'ort speed-up':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            torch.manual_seed(0)
            module = build_module(f"torchvision:{name}", 1000).eval()
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(module, (3, 224, 224), path, opset=18, exporter="dynamo")
            parity = compare(module, path, torch.randn(16, 3, 224, 224), atol=1e-4, rtol=1e-3)
            x = torch.randn(1, 3, 224, 224)
            with torch.inference_mode():
                torch_ms = time_fn(lambda: module(x), args.iterations)
            session = make_session(path, "cpu")
            feed = {session.get_inputs()[0].name: x.numpy()}
            ort_ms = time_fn(lambda: session.run(None, feed), args.iterations)
            session = None  # release it before the next model is timed
            print(
                f"{name:<14}{parity['max_abs_error']:>12.2e}"
                f"{parity['max_abs_error'] / parity['max_abs_output']:>10.1e}{parity['top1_agreement']:>13.3f}"
                f"{torch_ms:>10.2f}{ort_ms:>9.2f}{torch_ms / ort_ms:>13.2f}x"
            )


if __name__ == "__main__":
    main()
