"""onnxruntime latency: one model at a time, or several in interleaved rounds.

Models are timed one after another with a single session alive at a time. Two live sessions
interfere: idle intra-op threads of one spin and steal the cores of the other, which made an
INT8 model look 40% slower than it is when timed alternately. Every report says how it timed.

Intra-op threads do not spin while they wait (onnxruntime's default is to spin), unless asked. Beside another
CPU-bound process a spinning thread holds a core while the thread it waits for is descheduled: measured on a
MiniLM encoder (2 cores, one `while True: pass` beside it), FP32 at batch 16 went from 207 ms idle to 360-497 ms with
spinning and from 210 ms to 260 ms without, and the quantized candidates changed order with spinning only. Idle,
spinning off costs 2-6% on the same models and keeps their order. A decision (ptq's choice, the chain's verdict,
a gate) must not turn on who else uses the machine, so every timing runs without spinning.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mlopt.core import console
from mlopt.core.contracts import cli
from mlopt.core.errors import InputError, first_line
from mlopt.core.fsutil import file_size_mb
from mlopt.core.sections import BatchSize, Config
from mlopt.runtime.session import input_specs, make_session, synthetic_feed


def timing_note(spinning: bool = False) -> str:
    """How `time_model` timed, for reports."""
    return f"sequential: one onnxruntime session alive at a time, intra-op thread spinning {'on' if spinning else 'off'}"


class TimingSettings(Config):
    """How models are timed: the options of the `bench` step (BenchConfig), used by other steps too."""

    provider: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    threads: int | None = Field(None, gt=0, le=1024, description="intra-op threads (default: onnxruntime's choice)")
    batch_sizes: list[BatchSize] = Field(default_factory=lambda: [1], min_length=1, description="batch sizes timed",
                                   json_schema_extra=cli(flag="--batch-size", short="-b"))
    warmup: int = Field(10, ge=0, description="untimed runs before timing")
    iterations: int | None = Field(100, gt=0, description="timed runs per model and batch size",
                                   json_schema_extra=cli(short="-n"))
    duration_s: float | None = Field(None, gt=0, description="time budget per model and batch size instead of "
                                     "iterations", json_schema_extra=cli(flag="--duration"))
    spinning: bool = Field(False, description="spin the intra-op threads while they wait (onnxruntime's default): a few "
                           "percent faster on an idle machine, far slower and noisier beside other processes")


def time_model(path: Path, sample_shape: tuple[int, ...] | None, cfg: TimingSettings,
               label: str) -> list[dict[str, Any]]:
    """Time one ONNX file at every batch size in cfg; the session is released afterwards."""
    import numpy as np

    session = make_session(path, cfg.provider, cfg.threads, spinning=cfg.spinning)
    _, shape, _ = input_specs(session)[0]
    if sample_shape is None:
        if not shape:
            raise InputError(f"{path} does not say its input's shape (no rank): give --input-shape")
        if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            raise InputError(f"{path} has symbolic input dimensions {shape}: give --input-shape")
        sample_shape = tuple(shape[1:])
    if shape and isinstance(shape[0], int) and shape[0] > 0 and any(b != shape[0] for b in cfg.batch_sizes):
        raise InputError(f"{path} has a fixed batch size of {shape[0]}; it cannot run batch sizes {cfg.batch_sizes}")
    rng = np.random.default_rng(0)
    results = []
    for batch in cfg.batch_sizes:
        feed = synthetic_feed(session, batch, tuple(sample_shape), rng)
        try:
            for _ in range(cfg.warmup):
                session.run(None, feed)
        except Exception as exc:
            raise InputError(f"onnxruntime rejected input of shape {(batch, *sample_shape)} for {path}: "
                             f"{first_line(exc)}") from exc
        times: list[float] = []
        with console.progress(f"bench {label} batch {batch}", total=cfg.iterations) as bar:
            deadline = time.perf_counter() + (cfg.duration_s or 0)
            while True:
                t0 = time.perf_counter()
                session.run(None, feed)
                times.append((time.perf_counter() - t0) * 1000)
                bar.advance(1)
                if cfg.iterations is not None and len(times) >= cfg.iterations:
                    break
                if cfg.duration_s is not None and time.perf_counter() >= deadline and len(times) >= 3:
                    break
        mean = sum(times) / len(times)
        p50, p90, p99 = (float(v) for v in np.percentile(times, (50, 90, 99)))
        results.append({"model": label, "provider": cfg.provider, "batch_size": batch,
                        "latency_ms": {"mean": mean, "p50": p50, "p90": p90, "p99": p99},
                        "throughput_per_s": batch * 1000.0 / mean, "size_mb": file_size_mb(path),
                        "iterations": len(times), "spinning": cfg.spinning})
    # The session is freed here by reference counting (it is in no cycle), its threads with it. No gc.collect() per
    # model: with torch and transformers loaded one took 0.4 s, longer than timing a small model (see _collected).
    del session
    return results


def _collected() -> None:
    """Before a measurement: free any session of an earlier step left in a reference cycle, whose idle intra-op
    threads would spin and slow the models timed now."""
    import gc

    gc.collect()


TIMING_ROUNDS = 3


def interleaved_rounds(paths: list[Path], sample_shape: Any, provider: str, batch_sizes: list[int],
                       iterations: int, rounds: int = TIMING_ROUNDS) -> list[dict[int, list[float]]]:
    """Each model's median latency (ms) per batch size in each of `rounds` rounds: the models take turns,
    sharing `iterations`, so that a slow spell of a shared machine hits every model alike instead of one."""
    per_round = max(3, iterations // rounds)
    cfg = TimingSettings(provider=provider, batch_sizes=batch_sizes, warmup=3, iterations=per_round)
    medians: list[dict[int, list[float]]] = [{} for _ in paths]
    _collected()
    with console.quieted():
        for _ in range(rounds):
            for i in range(len(paths)):
                for result in time_model(Path(paths[i]), sample_shape, cfg, Path(paths[i]).name):
                    medians[i].setdefault(result["batch_size"], []).append(result["latency_ms"]["p50"])
    return medians


def best_of(medians: dict[int, list[float]]) -> dict[int, float]:
    """A model's best round per batch size: what `interleaved_latency` reports."""
    return {b: min(v) for b, v in medians.items()}


NOISE_CAP = 0.10  # timing noise widens a tie up to this much, never further: a burst of load must not make a slow
# model "equal" (ptq's choice and the chain's verdict)


def spread_of(medians: dict[int, list[float]]) -> float:
    """How far a typical round of a model is above its best one: the median round over the best, minus 1, at the
    batch size where that is largest (the timing noise its best-round latency carries)."""
    import statistics

    return max(statistics.median(v) / min(v) - 1 for v in medians.values())


def paired_ratio(a: dict[int, list[float]], b: dict[int, list[float]]) -> tuple[float, float] | None:
    """b's latency over a's, round by round, for two models timed in the same interleaved rounds (each round's
    median per batch size): each round times the models one after the other, so a slow spell of a shared machine
    weighs on both, and their ratio keeps what their own medians lose. Returns the geometric mean over batch sizes
    of the median per-round ratio, and its noise: twice the standard error of that median (about a 95% interval;
    from the median absolute deviation of the ratios, 1.4826 MAD estimating sigma and 1.253 sigma / sqrt(rounds) a
    median's error), at the batch size where it is largest. None where the rounds do not pair up."""
    import statistics

    if not a or set(a) != set(b) or any(len(a[k]) != len(b[k]) for k in a):
        return None
    medians, errors = [], []
    for k in a:
        ratios = [y / x for x, y in zip(a[k], b[k])]
        m = statistics.median(ratios)
        mad = statistics.median(abs(r - m) for r in ratios)
        medians.append(m)
        errors.append(1.253 * 1.4826 * mad / m / math.sqrt(len(ratios)))
    return math.prod(medians) ** (1 / len(medians)), 2 * max(errors)


def interleaved_latency(paths: list[Path], sample_shape: Any, provider: str, batch_sizes: list[int],
                        iterations: int, rounds: int = TIMING_ROUNDS) -> list[dict[int, float]]:
    """Median latency (ms) per batch size of each model, for deciding which is faster: interleaved rounds
    (`interleaved_rounds`), each model keeping its best round."""
    return [best_of(m) for m in interleaved_rounds(paths, sample_shape, provider, batch_sizes, iterations, rounds)]


def bench_models(models: list[tuple[str, Path, tuple[int, ...] | None]], cfg: TimingSettings) -> list[dict[str, Any]]:
    """Time each (label, path, sample shape) in turn; add each row's speed-up over the first model."""
    results: list[dict[str, Any]] = []
    _collected()
    for label, path, shape in models:
        results += time_model(path, shape, cfg, label)
    first = models[0][0]
    base = {r["batch_size"]: r["latency_ms"]["mean"] for r in results if r["model"] == first}
    for r in results:
        r["speedup"] = base[r["batch_size"]] / r["latency_ms"]["mean"]
    return results


def show_table(results: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title=f"onnxruntime latency ({timing_note(results[0].get('spinning', False))})")
    for col in ("model", "provider", "batch", "mean ms", "p50 ms", "p90 ms", "p99 ms", "items/s", "size MB", "speed-up"):
        table.add_column(col, justify="left" if col in ("model", "provider") else "right")
    for r in results:
        lat = r["latency_ms"]
        table.add_row(r["model"], r["provider"], str(r["batch_size"]), f"{lat['mean']:.3f}", f"{lat['p50']:.3f}",
                      f"{lat['p90']:.3f}", f"{lat['p99']:.3f}", f"{r['throughput_per_s']:.1f}", f"{r['size_mb']:.2f}",
                      f"{r['speedup']:.2f}x")
    console.table(table)
