"""Two torchrun nodes on one machine (over loopback), training one model into a shared --out folder.

Each node is its own `torchrun --nnodes 2` launcher with one worker, as on two machines sharing a
filesystem. The launchers start in their own sessions and their workers in sessions of their own
(torchrun's), so every process a test starts carries a marker in its environment, and the cleanup
kills every process that has it.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import TOY

pytestmark = pytest.mark.slow

TRAIN = ["train", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--batch-size", "32", "--lr", "0.02",
         "--epochs", "2", "--device", "cpu", "--checkpoint-every", "4"]
MARKER = "MLOPT_MULTINODE_TEST"
TIMEOUT = 240  # seconds for a whole job (about 15 s on two idle cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _pids_with(key: str, value: str) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _environ(int(p)).get(key) == value]


class Node:
    """One torchrun launcher; its stdout and stderr go to files (read while it runs)."""

    def __init__(self, proc: subprocess.Popen, log: Path, run_id: str):
        self.proc, self.log, self.run_id = proc, log, run_id

    @property
    def stdout(self) -> str:
        return self.log.with_suffix(".out").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.log.with_suffix(".err").read_text(errors="replace")

    def worker(self) -> tuple[int, int]:
        """(pid, global rank) of this node's running worker."""
        for pid in _pids_with("TORCHELASTIC_RUN_ID", self.run_id):
            env = _environ(pid)
            if env.get("GROUP_RANK") is not None and self._is_child(pid):
                return pid, int(env["RANK"])
        raise AssertionError(f"no worker of launcher {self.proc.pid} found")

    def _is_child(self, pid: int) -> bool:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid


@contextlib.contextmanager
def two_nodes(out: Path, flags: list[str] = (), *, max_restarts: int | None = None, logs: Path | None = None):
    """Start node 0 and node 1 of one torchrun job (`mlopt TRAIN *flags --out out`); kill all they left on exit.

    `flags`: more mlopt options (both nodes get the same command line)."""
    port, job = _free_port(), f"mlopt-test-{uuid.uuid4().hex[:12]}"
    logs = logs or out.parent
    env = dict(os.environ, **{MARKER: job}, LOGLEVEL="INFO")  # INFO: torchrun logs its restart counts
    nodes = []
    try:
        for rank in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                   "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", job, *([f"--max-restarts={max_restarts}"] if max_restarts is not None else []),
                   "-m", "mlopt", *TRAIN, *map(str, flags), "--out", str(out)]
            log = logs / f"{out.name}-node{rank}"
            with open(log.with_suffix(".out"), "w") as so, open(log.with_suffix(".err"), "w") as se:
                proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env, start_new_session=True)
            nodes.append(Node(proc, log, job))
        yield nodes
    finally:
        for n in nodes:  # freeze the launchers first, so that they start no worker while we kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(n.proc.pid, signal.SIGSTOP)
        for pid in _pids_with(MARKER, job):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for n in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(n.proc.pid, signal.SIGKILL)
            n.proc.wait(timeout=30)


def _wait(nodes: list[Node]) -> None:
    deadline = time.time() + TIMEOUT
    for n in nodes:
        try:
            n.proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the two-node job did not finish in {TIMEOUT} s; node stderr:\n"
                        + "\n".join(m.stderr[-3000:] for m in nodes))


def _wait_for(what, predicate, nodes, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline or any(n.proc.poll() is not None for n in nodes):
            pytest.fail(f"never saw {what}; node stderr:\n" + "\n".join(n.stderr[-3000:] for n in nodes))
        time.sleep(0.005)


def _assert_succeeded(nodes: list[Node]) -> None:
    for rank, n in enumerate(nodes):
        assert n.proc.returncode == 0, f"node {rank} exited {n.proc.returncode}:\n{n.stderr[-4000:]}"


def _metrics(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())["step"]["metrics"]


def _assert_same_model(a: Path, b: Path) -> None:
    sa, sb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5), k


MODES = {"ddp": [], "shard": ["--shard"]}


def _checkpointed(out: Path, mode: str) -> bool:
    """A whole checkpoint exists: DDP's file, or a sharded folder with its completion marker."""
    if mode == "ddp":
        return (out / ".checkpoint" / "checkpoint.pt").exists()
    from mlopt.runtime.sharded_checkpoint import ShardedCheckpoints

    return ShardedCheckpoints(out / ".checkpoint").latest()[0] is not None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Callable[[str], tuple[Path, list[Node]]]:
    """One uninterrupted two-node job (--json) per mode, replicated (DDP) or sharded (FSDP2), run when first asked
    for and kept for the module: the reference for the restarted ones. (A parametrized module fixture would be
    torn down and run again whenever the tests' order alternates between its values.)"""
    jobs: dict[str, tuple[Path, list[Node]]] = {}

    def job(mode: str) -> tuple[Path, list[Node]]:
        if mode not in jobs:
            out = tmp_path_factory.mktemp("multinode") / f"uninterrupted-{mode}"
            with two_nodes(out, [*MODES[mode], "--json"]) as nodes:
                _wait(nodes)
            jobs[mode] = out, nodes
        return jobs[mode]

    return job


@pytest.mark.parametrize("mode", list(MODES))
def test_two_nodes_train_one_model(uninterrupted, mode):
    out, nodes = uninterrupted(mode)
    _assert_succeeded(nodes)
    printed = [n.stdout for n in nodes if n.stdout.strip()]
    assert len(printed) == 1, "exactly one node (the one with rank 0) prints the metrics"
    metrics = json.loads(printed[0])
    assert metrics["processes"] == 2 and metrics["backend"] == "gloo"
    assert metrics["sharded"] is (mode == "shard")
    assert metrics["replica_max_abs_diff"] == 0.0  # the replicas (or every node's gathered model) agree
    assert metrics["accuracy"] > 0.7
    assert _metrics(out)["processes"] == 2 and _metrics(out)["replica_max_abs_diff"] == 0.0
    assert sorted(p.name for p in out.iterdir()) == [".mlopt-output.json", "model.json", "model.pt", "report.json",
                                                     "report.md"]


@pytest.mark.parametrize("mode,killed_rank", [("ddp", 1), ("shard", 0)])
def test_two_nodes_resume_when_only_the_failed_node_counts_a_restart(tmp_path, uninterrupted, mode, killed_rank):
    """torchrun --max-restarts on both nodes, one worker killed (SIGKILL) mid-epoch after the first checkpoint.

    torchrun counts a restart only on the node whose worker failed; the other node's agent restarts its
    worker uncounted, because the membership changed. Its worker is held (SIGSTOP) until its agent has
    begun that restart, so that it cannot fail on its own (which the agent would count) and the two nodes'
    TORCHELASTIC_RESTART_COUNT differ in the restarted round, every time. One case each: replicated with the
    worker of rank 1 killed, sharded with that of rank 0 (the one that writes the checkpoint's marker); the restart
    logic is the same, the checkpoint is not."""
    reference, _ = uninterrupted(mode)
    out = tmp_path / "restarted"
    with two_nodes(out, MODES[mode], max_restarts=1) as nodes:
        _wait_for("the first checkpoint", lambda: _checkpointed(out, mode), nodes)
        workers = [n.worker() for n in nodes]
        victim = next(i for i, (_, rank) in enumerate(workers) if rank == killed_rank)
        held, held_pid = nodes[1 - victim], workers[1 - victim][0]
        os.kill(held_pid, signal.SIGSTOP)
        os.kill(workers[victim][0], signal.SIGKILL)
        _wait_for("the held worker's agent restart it", lambda: f"Sending process {held_pid} closing signal"
                  in held.stderr, nodes)
        os.kill(held_pid, signal.SIGCONT)  # it dies of the pending SIGTERM
        _wait(nodes)
    _assert_succeeded(nodes)
    both = nodes[0].stderr + nodes[1].stderr
    assert "error:" not in both, both[-4000:]  # no restarted worker refused the folder, or failed
    assert "resuming from" in both
    # The case under test: the held node restarted its worker once, without counting a restart.
    assert "Detected 1 new nodes" in held.stderr
    assert held.stderr.count("restart_count=0") == 2 and "restart_count=1" not in held.stderr
    assert "restart_count=1" in nodes[victim].stderr
    assert _metrics(out)["processes"] == 2 and _metrics(out)["replica_max_abs_diff"] == 0.0
    assert _metrics(out)["sharded"] is (mode == "shard")
    _assert_same_model(reference, out)  # the loss curve went on from the checkpoint: the same model
