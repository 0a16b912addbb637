"""Sharded training (--shard: FSDP2 on gloo) and its sharded checkpoints (torch.distributed.checkpoint)."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.compress.lib.engine import TrainingConfig, fit
from mlopt.core.errors import InputError
from mlopt.runtime.data import DataConfig, load_data
from mlopt.runtime.sharded_checkpoint import ShardedCheckpoints
from mlopt.runtime.sharding import gather_into, self_contained, shard, training_copy, units

from conftest import TOY

ARGS = ["--model", f"{TOY}:tiny_vit", "--data", "digits", "--batch-size", "32", "--lr", "0.01", "--epochs", "2",
        "--device", "cpu"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _train(out, nproc, *extra, **popen):
    """`mlopt train` on `nproc` processes (torchrun for more than one), in its own process group."""
    launch = [*TORCHRUN, f"--nproc-per-node={nproc}", "-m", "mlopt"] if nproc > 1 else [sys.executable, "-m", "mlopt"]
    return subprocess.Popen([*launch, "train", *ARGS, *map(str, extra), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def _finish(proc, timeout=300):
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout, stderr


def _whole_checkpoint(folder):
    return ShardedCheckpoints(folder).latest()[0]


def _wait_for_checkpoint(proc, out, timeout=180):
    deadline = time.time() + timeout
    while _whole_checkpoint(out / ".checkpoint") is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before its first checkpoint"


def _workers(proc):
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _kill_all(proc):
    """SIGKILL the run, its torchrun workers too (they run in sessions of their own), and wait until all are gone."""
    pids = [*_workers(proc), proc.pid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds no lock
    except OSError:
        return False


def _max_diff(a_dir, b_dir):
    a = torch.load(a_dir / "model.pt", weights_only=True)
    b = torch.load(b_dir / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _step(out):
    return json.loads((out / "report.json").read_text())["step"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """An uninterrupted two-process sharded run: its output folder and metrics."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    stdout, _ = _finish(_train(out, 2, "--shard", "--checkpoint-every", 6, "--json"))
    return out, json.loads(stdout)


def test_units_are_blocks_that_run_forward():
    import torchvision

    from toy_models import tiny_bert_like, tiny_cnn

    assert [type(u).__name__ for u in units(torchvision.models.resnet18())] == ["BasicBlock"] * 8
    # Blocks held in a ModuleDict: the dict is never called, so its members are the units.
    assert [type(u).__name__ for u in units(tiny_bert_like())] == ["BertSelfAttention", "Linear", "LayerNorm"] * 2
    assert [type(u).__name__ for u in units(tiny_cnn())] == ["Sequential", "Linear"]  # no blocks: the top children


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process, in this process: FSDP2 shards across it like across many."""
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    td.destroy_process_group()


def test_norm_layers_that_are_units_are_sharded_once_in_bf16(one_process_group):
    from toy_models import tiny_bert_like

    model = tiny_bert_like()
    # Two LayerNorms are both units (members of a ModuleDict) and float32 norm units under bf16.
    count = shard(model, "cpu", "bf16", torch.randn(2, 1, 8, 8))
    assert count == 2 + 4 + 1  # the norms, the attention and output Linears of the two blocks, the root
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_a_tied_parameter_comes_back_tied(one_process_group):
    from torch import nn

    host = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    host[2].weight = host[0].weight
    worker = training_copy(host)
    assert host[0].weight.is_meta and host[0].weight is host[2].weight
    shard(worker, "cpu", sample=torch.randn(2, 8))
    gather_into(worker, host)
    assert not host[0].weight.is_meta and host[0].weight is host[2].weight
    assert len(list(host.parameters())) == 3  # one weight, two biases


def test_units_that_share_weights_are_left_to_their_parent():
    from toy_models import tied_net

    model = tied_net()
    blocks = units(model)
    assert len(blocks) == 4
    kept = self_contained(model, blocks, torch.randn(2, 1, 8, 8))
    assert kept == {id(model.blocks[3])}  # 0 and 1 share a Linear; the parent reads 2's weight
    assert model.training  # the probe ran in eval mode and put the mode back


@pytest.mark.slow
def test_tied_weights_train_sharded_as_ddp_does(tmp_path):
    runs = {}
    for mode in ("ddp", "shard"):
        out = tmp_path / mode
        proc = subprocess.run([*TORCHRUN, "--nproc-per-node=2", "-m", "mlopt", "train", "--model", f"{TOY}:tied_net",
                               "--data", "digits", "--batch-size", "32", "--lr", "0.003", "--epochs", "1",
                               "--device", "cpu", *(["--shard"] if mode == "shard" else []), "--out", str(out),
                               "--json"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = json.loads(proc.stdout)
    assert runs["shard"]["sharded"] is True and runs["shard"]["shard_units"] == 2  # the fourth block and the root
    assert runs["shard"]["replica_max_abs_diff"] == 0.0
    assert _max_diff(tmp_path / "ddp", tmp_path / "shard") < 1e-5


@pytest.mark.slow
def test_sharded_training_matches_ddp_with_half_the_bytes(sharded, tmp_path):
    out, metrics = sharded
    ddp_out = tmp_path / "ddp"
    ddp = json.loads(_finish(_train(ddp_out, 2, "--json"))[0])
    assert metrics["sharded"] is True and metrics["processes"] == 2 and metrics["backend"] == "gloo"
    assert metrics["shard_units"] == 9  # the four modules of each of the two blocks, and the root
    assert ddp["sharded"] is False
    # Same seed, same data order, rank 0's buffers: the sharded run computes what DDP does.
    assert _max_diff(out, ddp_out) < 1e-5
    assert abs(metrics["accuracy"] - ddp["accuracy"]) <= 0.01
    assert metrics["replica_max_abs_diff"] == 0.0  # every rank gathered the same model
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "model_optimizer_bytes"):
        assert metrics[key] <= 0.6 * ddp[key], key
    assert ddp["param_bytes"] == 4 * metrics["params"]  # unsharded: every parameter, float32
    # The final model is one plain state dict, like any other run's.
    assert sorted(p.name for p in out.iterdir()) == [".mlopt-output.json", "model.json", "model.pt", "report.json",
                                                     "report.md"]


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_sharded_checkpoint_resumes_on_another_number_of_processes(before, after, tmp_path):
    out = tmp_path / "run"
    proc = _train(out, before, "--shard", "--checkpoint-every", 6)
    try:
        _wait_for_checkpoint(proc, out)
    finally:
        _kill_all(proc)
    _, stderr = _finish(_train(out, after, "--shard", "--resume"))
    resumed = re.search(r"step-(\d+) \(epoch (\d+), batch (\d+), written by (\d+) process", stderr)
    assert resumed, stderr[-2000:]
    step, epoch, batch, written = map(int, resumed.groups())
    assert written == before and epoch == 1  # killed right after the first checkpoint, in the first epoch
    assert batch == step * before // after  # the same samples seen, counted in the new processes' steps
    step = _step(out)
    assert f"resumed on {after} process(es) from a checkpoint of {before}" in step["notes"]
    assert step["metrics"]["sharded"] is (after > 1) and step["metrics"]["processes"] == after
    assert step["metrics"]["accuracy"] > 0.5  # it went on learning from the checkpoint's weights


def _digits():
    return load_data(DataConfig(source="digits"))


def test_half_written_checkpoints_are_passed_over(tmp_path):
    from toy_models import tiny_cnn

    cfg = TrainingConfig(epochs=2, lr=0.02, device="cpu", shard=True, checkpoint_every=20)
    torch.manual_seed(0)
    first = fit(tiny_cnn(), _digits(), cfg, 32, checkpoint_dir=tmp_path)
    assert "--shard with one process does nothing: trained unsharded" in first["notes"]
    whole = _whole_checkpoint(tmp_path)
    assert [p.name for p in whole.parent.iterdir()] == [whole.name]  # older checkpoints are removed
    no_marker = whole.parent / "step-999999999"
    shutil.copytree(whole, no_marker)
    (no_marker / "complete.json").unlink()
    truncated = whole.parent / "step-999999998"
    shutil.copytree(whole, truncated)
    shard = next(truncated.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    shutil.copytree(whole, whole.parent / "step-999999997.partial")

    model = tiny_cnn()
    again = fit(model, _digits(), cfg, 32, checkpoint_dir=tmp_path, resume=True)
    assert (f"half-written sharded checkpoint(s) ignored: step-999999997.partial, step-999999998, step-999999999; "
            f"resumed from {whole.name}") in again["notes"]
    assert again["history"] == first["history"]  # the whole checkpoint's run, not a fresh one
    assert again["grad_bytes"] == 0  # nothing was left to train


@pytest.mark.parametrize("change,match", [
    ({"width": 8}, "another model or optimizer"),
    ({"optimizer": "sgd"}, "another model or optimizer"),
    ({"lr": 0.05}, "different configuration"),
])
def test_resuming_with_a_changed_model_or_optimizer_is_refused(change, match, tmp_path):
    from toy_models import TinyCNN

    cfg = TrainingConfig(epochs=1, lr=0.02, device="cpu", shard=True)
    fit(TinyCNN(), _digits(), cfg, 32, checkpoint_dir=tmp_path)
    model = TinyCNN(width=change.pop("width", 16))
    with pytest.raises(InputError, match=match):
        fit(model, _digits(), cfg.model_copy(update=change), 32, checkpoint_dir=tmp_path, resume=True)


@pytest.mark.parametrize("args,message", [
    (["train", "--model", f"{TOY}:no_params", "--data", "digits", "--shard"], "no trainable parameters to shard"),
    (["qat", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--shard"], "qat does not shard"),
])
def test_shard_refusals(args, message, tmp_path):
    result = CliRunner().invoke(app, [*args, "--quiet", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_distill_with_a_sharded_teacher_in_bf16(trained_dir, tmp_path):
    out = tmp_path / "student"
    proc = subprocess.run([*TORCHRUN, "--nproc-per-node=2", "-m", "mlopt", "distill", "--student", f"{TOY}:tiny_cnn",
                           "--teacher", str(trained_dir), "--data", "digits", "--batch-size", "32", "--lr", "0.02",
                           "--epochs", "2", "--device", "cpu", "--shard", "--shard-teacher", "--amp", "bf16",
                           "--no-baseline", "--out", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)
    assert metrics["sharded"] is True and metrics["precision"] == "bf16"
    assert metrics["teacher_param_bytes"] <= 0.6 * 4 * metrics["teacher_params"]  # about half the float32 teacher
    assert metrics["replica_max_abs_diff"] == 0.0
    assert metrics["accuracy"] > 0.6
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(t.dtype in (torch.float32, torch.int64) for t in state.values())  # float32 masters are what is saved
