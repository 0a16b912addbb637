import pytest

from mlopt.core.errors import InputError
from mlopt.export.bench import BenchConfig
from mlopt.export.lib.timing import bench_models
from mlopt.runtime.session import available_providers, make_session


def test_bench_two_models(exported_dir):
    path = exported_dir / "model.onnx"
    cfg = BenchConfig(batch_sizes=[1, 4], warmup=1, iterations=5)
    results = bench_models([("a", path, (1, 8, 8)), ("b", path, None)], cfg)
    assert [(r["model"], r["batch_size"]) for r in results] == [("a", 1), ("a", 4), ("b", 1), ("b", 4)]
    for r in results:
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["throughput_per_s"] == pytest.approx(r["batch_size"] * 1000 / lat["mean"])
        assert r["size_mb"] > 0 and r["iterations"] == 5
    a = {r["batch_size"]: r["latency_ms"]["mean"] for r in results if r["model"] == "a"}
    for r in results:  # each row against the first model at the same batch size
        assert r["speedup"] == pytest.approx(a[r["batch_size"]] / r["latency_ms"]["mean"])


def test_duration_budget(exported_dir):
    cfg = BenchConfig(warmup=0, duration_s=0.05)
    assert cfg.iterations is None
    (r,) = bench_models([("a", exported_dir / "model.onnx", (1, 8, 8))], cfg)
    assert r["iterations"] >= 3


def test_unavailable_provider_lists_available(exported_dir, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])  # a CPU-only build
    assert available_providers() == ["cpu"]
    with pytest.raises(InputError, match="provider 'cuda' is not available.*available: cpu"):
        make_session(exported_dir / "model.onnx", "cuda")


def test_decisions_time_without_spinning_threads(exported_dir, monkeypatch):
    """ptq's choice and the chain's verdict time in interleaved rounds, with no spinning thread to lose to a busy
    neighbour (mlopt.export.lib.timing's docstring has the measurement)."""
    from mlopt.export.lib import timing

    made = []
    real = timing.make_session
    monkeypatch.setattr(timing, "make_session", lambda *a, **k: made.append(k.get("spinning")) or real(*a, **k))
    medians = timing.interleaved_rounds([exported_dir / "model.onnx"] * 2, (1, 8, 8), "cpu", [1, 2], 6, rounds=2)
    assert made == [False] * 4
    assert [sorted(m) for m in medians] == [[1, 2], [1, 2]] and all(len(v) == 2 for m in medians for v in m.values())
