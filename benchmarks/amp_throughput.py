"""Mixed-precision training throughput against fp32, measured as a ratio in one run.

    python benchmarks/amp_throughput.py                                   # CPU: bf16 vs fp32, resnet18, batch 16
    python benchmarks/amp_throughput.py --device cuda --model resnet50 --batch-size 64 --amp fp16

Both precisions run through mlopt's training engine (`mlopt.compress.lib.engine.fit`) on the same
synthetic labelled batches, one after the other, each after an untimed warm-up; the engine
reports training samples per second (evaluation excluded).
"""

from __future__ import annotations

import argparse


def main() -> None:
    import torch
    from torch.utils.data import TensorDataset

    from mlopt.core import console
    from mlopt.compress.lib.engine import TrainingConfig, fit
    from mlopt.runtime.data import Dataset
    from mlopt.runtime.models import build_module

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=8, help="timed steps per precision")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16"])
    args = p.parse_args()

    console.set_quiet(True)
    g = torch.Generator().manual_seed(0)
    n = args.steps * args.batch_size
    x = torch.randn((n, 3, args.image_size, args.image_size), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    ds = TensorDataset(x, y)
    tiny = TensorDataset(x[: args.batch_size], y[: args.batch_size])
    data = Dataset("synthetic", ds, tiny, (3, args.image_size, args.image_size), 10)
    warm = Dataset("synthetic", TensorDataset(x[: 2 * args.batch_size], y[: 2 * args.batch_size]), tiny, data.sample_shape, 10)

    rates = {}
    for precision in ("off", args.amp):
        torch.manual_seed(0)
        module = build_module(f"torchvision:{args.model}", 10)
        cfg = TrainingConfig(epochs=1, lr=1e-3, amp=precision, device=args.device, optimizer="sgd")
        fit(module, warm, cfg, args.batch_size)  # untimed warm-up (kernel selection, allocator)
        rates[precision] = fit(module, data, cfg, args.batch_size)["train_samples_per_s"]
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} batch {args.batch_size} at {args.image_size}x{args.image_size} on {name}")
    print(f"fp32: {rates['off']:.1f} samples/s")
    print(f"{args.amp}: {rates[args.amp]:.1f} samples/s")
    print(f"{args.amp}/fp32 step-throughput ratio: {rates[args.amp] / rates['off']:.2f}x")


if __name__ == "__main__":
    main()
