import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).parent
TOY = TESTS / "toy_models.py"
sys.path.insert(0, str(TESTS))

# Session fixtures of tiny trained decoder LMs and their English text.
pytest_plugins = ["decoders"]

# The key mlopt signs its model folders with lives outside the user's home during tests (subprocesses
# inherit it).
if "MLOPT_KEY_FILE" not in os.environ:
    os.environ["MLOPT_KEY_FILE"] = str(Path(tempfile.mkdtemp(prefix="mlopt-tests-")) / "provenance.key")


@pytest.fixture(autouse=True)
def _reset_console():
    from mlopt.core import console

    console.set_quiet(False)
    yield
    console.set_quiet(False)


@pytest.fixture(autouse=True)
def _reports_fit_the_schema(request):
    """After each test, every report.json under its tmp_path validates against the report schema."""
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp is not None:
        from mlopt.report.schema import parse

        for path in tmp.rglob("report.json"):
            parse(path.read_text())


@pytest.fixture
def tiny_spec() -> str:
    return f"{TOY}:tiny_cnn"


@pytest.fixture
def npz_file(tmp_path) -> Path:
    """A separable 4-class problem on 1x8x8 images."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=200)
    x = rng.normal(0, 0.3, size=(200, 1, 8, 8)).astype(np.float32)
    for c in range(4):
        x[y == c] += 0.8 * c  # brightness separates the classes
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    """A TinyCNN trained for three epochs on digits, saved as an mlopt output directory."""
    from mlopt.cli.main import app
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("trained") / "model"
    result = CliRunner().invoke(
        app, ["train", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--epochs", "3", "--lr", "0.02", "--batch-size", "32", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def exported_dir(tmp_path_factory, trained_dir) -> Path:
    from mlopt.cli.main import app
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("exported") / "onnx"
    result = CliRunner().invoke(app, ["export", "--model", str(trained_dir), "--data", "digits", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def kill_once_checkpointed(args, checkpoint: Path, timeout: float = 180) -> None:
    """Run `mlopt ARGS` in a subprocess and SIGKILL it as soon as `checkpoint` exists."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-m", "mlopt", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def section(step: dict, title: str) -> dict:
    """The section of a step report (report.json's `step`) with this title."""
    return next(s for s in step["sections"] if s["title"] == title)


def table_rows(step: dict, title: str) -> list[dict]:
    """A table section's rows as {column: value}."""
    table = section(step, title)
    return [dict(zip(table["columns"], row)) for row in table["rows"]]


def latency_of(step: dict, model: str) -> dict[int, float]:
    """{batch size: p50 ms} of one model among a step report's latencies."""
    return {lat["batch_size"]: lat["p50_ms"] for lat in step["latency"] if lat["model"] == model}


ENVIRONMENT = {"python": "3.12.0", "platform": "Linux", "cpu": "test cpu", "cpu_count": 2, "isa": ["avx2"],
               "libraries": {"mlopt": "0"}}


def step_report(dir="01-train", type="train", **fields):
    """A step report as the runner writes it (report.json's `step`), with `fields` replaced."""
    index = int(dir.split("-")[0])
    return {"index": index, "dir": dir, "type": type, "config": {"type": type}, "inputs_sha256": "0" * 64,
            "input": {"format": "torch", "lineage": []}, "output": {"format": "torch", "lineage": [type], "files": []},
            "metrics": {}, "notes": [], "latency": [], "sections": [], "duration_s": 1.0, **fields}


def run_report(steps, **fields):
    return {"schema_version": 2, "kind": "run", "recipe_file": None, "recipe": {}, "steps": steps,
            "environment": ENVIRONMENT, **fields}
