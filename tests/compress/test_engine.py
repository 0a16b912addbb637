import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.compress.lib.engine import TrainingConfig, _lr_factor, fit
from mlopt.runtime.data import DataConfig, load_data
from mlopt.core.errors import InputError

from conftest import TOY, kill_once_checkpointed

TRAIN = ["train", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--batch-size", "32", "--lr", "0.02"]


def _mlopt(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "mlopt", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_bf16_autocast_on_cpu():
    from toy_models import tiny_cnn

    data = load_data(DataConfig(source="digits"))
    torch.manual_seed(0)
    m = tiny_cnn()
    result = fit(m, data, TrainingConfig(epochs=2, lr=0.02, amp="bf16", device="cpu"), 32)
    assert result["precision"] == "bf16" and result["accuracy"] > 0.7
    assert all(p.dtype == torch.float32 for p in m.parameters())  # master weights stay fp32


def test_fp16_on_cpu_is_an_error():
    result = CliRunner().invoke(app, [*TRAIN, "--amp", "fp16", "--device", "cpu", "--out", "x"])
    assert result.exit_code == 2 and "fp16 mixed precision needs CUDA" in result.stderr


@pytest.mark.parametrize(
    "schedule,expect",
    [("cosine", [0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.0]), ("step", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.1]),
     ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])],
)
def test_schedules_with_warmup(schedule, expect):
    cfg = TrainingConfig(epochs=2, schedule=schedule, warmup_epochs=1, step_epochs=1, step_gamma=0.1)
    f = _lr_factor(cfg, steps_per_epoch=4)
    got = [f(s) for s in (0, 1, 2, 3, 4, 6, 8)]
    assert got == pytest.approx(expect, abs=1e-6)


def test_early_stopping_stops_when_accuracy_stalls(tmp_path):
    # At this learning rate the weights barely move: the validation accuracy of epoch 2 cannot beat
    # epoch 1's, so one stale epoch must stop the run.
    out = tmp_path / "m"
    result = CliRunner().invoke(app, [*TRAIN, "--epochs", 12, "--lr", "1e-9", "--early-stopping", 1, "--out", out,
                                      "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    table = json.loads((out / "report.json").read_text())["step"]["sections"][0]
    history = [dict(zip(table["columns"], row)) for row in table["rows"]]
    assert m["stopped_early"] is True and m["epochs"] == len(history) == 2 and m["best_epoch"] == 1
    assert m["accuracy"] == history[0]["val_accuracy"]


def test_early_stopping_restores_the_best_weights():
    """One epoch of descent, then ascent on the loss: epoch 2 is worse, training stops, epoch 1's weights come back."""
    import torch.nn.functional as F
    from toy_models import tiny_cnn

    from mlopt.compress.lib.engine import Objective
    from mlopt.runtime.evaluation import evaluate_torch

    data = load_data(DataConfig(source="digits"))
    steps_per_epoch = -(-len(data.train) // 32)
    calls = []

    def loss(model, x, y, indices):
        calls.append(1)
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return (ce if len(calls) <= steps_per_epoch else -ce), logits

    cfg = TrainingConfig(epochs=5, lr=0.02, schedule="constant", early_stopping=1, device="cpu")
    m = tiny_cnn()
    result = fit(m, data, cfg, 32, objective=Objective(loss=loss))
    first, second = result["history"]
    assert second["val_accuracy"] < first["val_accuracy"]
    assert result["stopped_early"] is True and result["best_epoch"] == 1 and result["accuracy"] == first["val_accuracy"]
    assert evaluate_torch(m, data, 32, torch.device("cpu"))["accuracy"] == first["val_accuracy"]


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    args = [*TRAIN, "--epochs", 4, "--checkpoint-every", 5, "--quiet"]
    full = tmp_path / "full"
    assert CliRunner().invoke(app, [*args, "--out", full]).exit_code == 0

    out = tmp_path / "killed"
    kill_once_checkpointed([*args, "--out", out], out / ".checkpoint" / "checkpoint.pt", timeout=120)
    assert not (out / "model.pt").exists()

    refused = CliRunner().invoke(app, [*args, "--out", out])
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    resumed = CliRunner().invoke(app, [*args, "--out", out, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a = torch.load(full / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (out / ".checkpoint").exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "m"
    ckpt_dir = out / ".checkpoint"
    data = load_data(DataConfig(source="digits"))
    from toy_models import tiny_cnn

    fit(tiny_cnn(), data, TrainingConfig(epochs=1, lr=0.02), 32, checkpoint_dir=ckpt_dir)
    with pytest.raises(InputError, match="different configuration"):
        fit(tiny_cnn(), data, TrainingConfig(epochs=1, lr=0.05), 32, checkpoint_dir=ckpt_dir, resume=True)


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    proc = _mlopt(*TRAIN, "--epochs", 2, "--device", "cpu", "--nproc", 2, "--out", out, "--json")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    metrics = json.loads(stdout)
    assert metrics["processes"] == 2 and metrics["backend"] == "gloo"
    assert metrics["replica_max_abs_diff"] == 0.0
    assert metrics["accuracy"] > 0.7
    assert sorted(p.name for p in out.iterdir()) == [".mlopt-output.json", "model.json", "model.pt", "report.json", "report.md"]


def _children(pid):
    kids = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(stat))
    return kids


@pytest.mark.slow
def test_torchrun_restart_resumes_from_checkpoint(tmp_path):
    """A worker killed under torchrun --max-restarts: the restarted workers resume by themselves."""
    common = [*TRAIN[1:], "--epochs", 4, "--device", "cpu", "--checkpoint-every", 4]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]

    full = tmp_path / "full"
    subprocess.run([*launch, "-m", "mlopt", "train", *map(str, common), "--out", str(full)], check=True,
                   capture_output=True, timeout=300)

    out = tmp_path / "restarted"
    proc = subprocess.Popen([*launch, "--max-restarts=1", "-m", "mlopt", "train", *map(str, common), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = out / ".checkpoint" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    workers = _children(proc.pid)
    assert workers, "no worker processes found"
    os.kill(workers[-1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resuming from" in stderr  # the restarted workers continued; they did not start again
    a = torch.load(full / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
