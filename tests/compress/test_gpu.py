"""Checks that need CUDA: skipped where it is absent (CI never has a GPU)."""

import json
import subprocess
import sys

import pytest
import torch

from mlopt.compress.lib.engine import TrainingConfig, fit
from mlopt.runtime.data import DataConfig, load_data

from conftest import TOY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("amp", ["fp16", "bf16", "off"])
def test_mixed_precision_on_cuda(amp):
    from toy_models import tiny_cnn

    data = load_data(DataConfig(source="digits"))
    torch.manual_seed(0)
    m = tiny_cnn()
    result = fit(m, data, TrainingConfig(epochs=3, lr=0.02, amp=amp, device="cuda"), 32)
    assert result["device"] == "cuda" and result["precision"] == (amp if amp != "off" else "fp32")
    assert result["accuracy"] > 0.8
    assert next(m.parameters()).device.type == "cpu"  # handed back on the CPU for saving and export


def test_one_gpu_nccl_run(tmp_path):
    out = tmp_path / "nccl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "mlopt",
           "train", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--epochs", "2", "--lr", "0.02",
           "--batch-size", "32", "--device", "cuda", "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)
    assert metrics["backend"] == "nccl" and metrics["processes"] == 1 and metrics["device"] == "cuda"
    assert metrics["replica_max_abs_diff"] == 0.0 and metrics["accuracy"] > 0.7
    assert (out / "model.pt").is_file()


def test_cuda_execution_provider(exported_dir):
    from mlopt.export.bench import BenchConfig
    from mlopt.export.lib.timing import bench_models
    from mlopt.runtime.session import available_providers

    if "cuda" not in available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    (r,) = bench_models([("m", exported_dir / "model.onnx", (1, 8, 8))], BenchConfig(provider="cuda", iterations=20))
    assert r["provider"] == "cuda" and r["latency_ms"]["mean"] > 0


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_sharded_training_on_cuda(amp, tmp_path):
    """--shard on every GPU there is. With two or more: FSDP2 over nccl, its mixed-precision policy, fp16's
    gradient scaler on sharded gradients, sharded checkpoints and the gathered model. With one, nccl cannot
    put two ranks on it: the run is unsharded and checks only the sharded checkpoints on CUDA."""
    out = tmp_path / "fsdp"
    n = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "mlopt",
           "train", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--epochs", "2", "--lr", "0.02",
           "--batch-size", "32", "--device", "cuda", "--amp", amp, "--shard", "--checkpoint-every", "10",
           "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)
    assert metrics["backend"] == "nccl" and metrics["device"] == "cuda" and metrics["precision"] == amp
    assert metrics["sharded"] is (n > 1) and metrics["cuda_peak_mb"] > 0
    assert metrics["replica_max_abs_diff"] == 0.0 and metrics["accuracy"] > 0.7
    assert (out / "model.pt").is_file()
