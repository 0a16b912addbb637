"""The chain comparison: every model a recipe made, measured one way in one run, and the best named.

Steps time their models in different ways (a sequential bench, interleaved rounds against one
other model, different iteration counts, at different moments of a shared machine), so their
figures cannot be set side by side. When a recipe times something (a bench step or a latency gate),
this module measures every model of the chain alike, as an ONNX file on onnxruntime: latency in
interleaved rounds at the bench steps' and the gates' batch sizes, and top-1 on the validation split.

The best model is the fastest one whose accuracy is within the tolerance of the baseline's.
"Fastest" across batch sizes is the lowest geometric mean, so every batch size counts alike, by
ratio. Differences under TIE (5%) are within the noise of a shared machine: models that close to
the fastest count as equally fast, and the latest of them is named. The gates read their figures
from this measurement, so the chain table and the gates cannot disagree.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlopt.core import console
from mlopt.core.contracts import PASSES
from mlopt.core.fsutil import file_size_mb
from mlopt.export.lib.onnx import export_artifact
from mlopt.export.lib.timing import NOISE_CAP, TIMING_ROUNDS, best_of, interleaved_rounds, spread_of
from mlopt.report.markdown import chain_table, rich_table
from mlopt.report.schema import Chain
from mlopt.run.recipe import GatesConfig
from mlopt.runtime.artifacts import load_artifact
from mlopt.runtime.evaluation import evaluate_onnx

if TYPE_CHECKING:
    from mlopt.runtime.artifacts import Artifact
    from mlopt.runtime.data import Dataset
    from mlopt.run.recipe import Recipe

TIE = 0.05  # relative geometric-mean latency difference treated as noise
ROUNDS = 9  # interleaved rounds: more chances than the gates' default three for each model to meet a quiet spell
DEFAULT_ACCURACY_TOLERANCE = 0.01  # top-1 drop from the baseline allowed when the recipe has no accuracy gate
DEFAULT_MIN_COSINE = 0.99  # text encoders: fidelity to the baseline needed when the recipe has no min_cosine gate
ACCURACY_BATCH = 64
METHOD = ("onnxruntime, interleaved rounds with one session alive at a time, intra-op spinning off, each model "
          "keeping its best round's median; every model as an ONNX file (torch models exported for it)")


def wanted(recipe: "Recipe") -> bool:
    """Whether a run compares its chain: only when the recipe times something."""
    gates = recipe.gates
    timed_gate = gates is not None and (gates.min_speedup is not None or gates.max_latency_ms is not None)
    return timed_gate or any(step.type == "bench" for step in recipe.steps)


def settings(recipe: "Recipe") -> dict[str, Any]:
    """Provider, batch sizes, rounds and runs per round: the gates' (or their defaults), plus the bench steps' batch sizes."""
    gates = recipe.gates or GatesConfig()
    benches = [s for s in recipe.steps if s.type == "bench"]
    provider = gates.provider if recipe.gates is not None or not benches else benches[-1].provider
    sizes = sorted({gates.batch_size, *(b for s in benches for b in s.batch_sizes)})
    return {"provider": provider, "batch_sizes": sizes, "rounds": ROUNDS, "per_round": runs_per_round(gates.iterations)}


def runs_per_round(iterations: int) -> int:
    """Timed runs per round for the gates' `iterations`: as many as in one of the gates' former three rounds."""
    return max(3, iterations // TIMING_ROUNDS)


def as_onnx(artifact: "Artifact", path: Path) -> Path:
    """The artifact's ONNX file; a torch model is exported to `path` first."""
    if artifact.format == "onnx":
        return Path(artifact.onnx_path)
    export_artifact(artifact, path)
    return path


def measure(members: list[tuple[str, "Artifact"]], data: "Dataset | None", provider: str,
            batch_sizes: list[int], per_round: int, rounds: int = ROUNDS, reference: int = 0) -> list[dict[str, Any]]:
    """One row per (label, model): accuracy, latency per batch size and size, all measured alike.

    With no batch sizes nothing is timed (accuracy only); without labelled data accuracy is None. On text
    or any unlabelled data (random inputs; a dense or multi-output model's inputs) each row gets its cosine to the
    outputs of `members[reference]` (the baseline).
    """
    from mlopt.quant.lib.quantize import Quality

    labeled = data is not None and data.labeled
    with tempfile.TemporaryDirectory(prefix="mlopt-chain-") as tmp:
        with console.quieted():
            paths = [as_onnx(artifact, Path(tmp) / f"{i:02d}.onnx") for i, (_, artifact) in enumerate(members)]
        fidelity = Quality(paths[reference], data, batch=ACCURACY_BATCH) if data is not None and not labeled else None
        rows = []
        for (label, artifact), path in zip(members, paths):
            accuracy = None
            if labeled:
                with console.quieted():
                    accuracy = evaluate_onnx(path, data, ACCURACY_BATCH)["accuracy"]
            rows.append({"step": label, "model": artifact.origin, "format": artifact.format, "accuracy": accuracy,
                         "cosine": None if fidelity is None else round(fidelity.score(path)["cosine_mean"], 6),
                         "size_mb": round(file_size_mb(path), 4)})
        del fidelity  # its inputs and outputs, before timing
        if batch_sizes:
            console.info(f"timing {len(paths)} model(s) of the chain at batch size(s) "
                         f"{', '.join(map(str, batch_sizes))} ({provider}, interleaved rounds)")
            sample_shape = members[-1][1].sample_shape
            timed = interleaved_rounds(paths, sample_shape, provider, batch_sizes, per_round * rounds, rounds)
            for row, medians in zip(rows, timed):
                lat = best_of(medians)
                row["spread"] = round(spread_of(medians), 4)
                row["latency_ms"] = {str(b): lat[b] for b in batch_sizes}
                row["geomean_ms"] = math.exp(sum(math.log(lat[b]) for b in batch_sizes) / len(batch_sizes))
    return rows


def compare(recipe: "Recipe", run_dir: Path, steps: list[dict[str, Any]], fallback: "Artifact",
            data: "Dataset | None") -> dict[str, Any]:
    """Measure every model of the chain and name the best; warn when the final model is not it.

    The chain: the model of every step that made one (reloaded from its directory in `run_dir`: a
    later training step may have changed the in-memory one in place), preceded by the recipe's own
    model (`fallback`) when that is the baseline or no step made a model. The baseline is the model
    before the first compressing step, or the final model when nothing compresses.
    """
    import time

    started = time.time()
    members: list[tuple[str, Any]] = []
    baseline_label = None
    for step in steps:
        if baseline_label is None and PASSES[step["type"]].compresses:
            baseline_label = members[-1][0] if members else "input"
        if step["output"]["files"]:
            members.append((step["dir"], load_artifact(Path(run_dir) / step["dir"])))
    if baseline_label == "input" or not members:
        members.insert(0, ("input", fallback))
    final_label = members[-1][0]
    baseline_label = baseline_label or final_label
    cfg = settings(recipe)
    reference = [label for label, _ in members].index(baseline_label)
    rows = measure(members, data, cfg["provider"], cfg["batch_sizes"], cfg["per_round"], cfg["rounds"], reference)
    gates = recipe.gates
    min_cosine, cosine_from = None, ""
    if rows[0]["cosine"] is not None:
        gated = gates is not None and gates.min_cosine is not None
        min_cosine = gates.min_cosine if gated else DEFAULT_MIN_COSINE
        cosine_from = "the min_cosine gate" if gated else "the default: the recipe has no min_cosine gate"
    if gates is not None and gates.max_accuracy_drop is not None:
        tolerance, source = gates.max_accuracy_drop, "the max_accuracy_drop gate"
    else:
        tolerance, source = DEFAULT_ACCURACY_TOLERANCE, "the default (the recipe has no accuracy gate)"
    comparison = {
        "method": METHOD, "provider": cfg["provider"], "batch_sizes": cfg["batch_sizes"], "rounds": cfg["rounds"],
        "iterations_per_round": cfg["per_round"],
        "accuracy_method": None if rows[0]["accuracy"] is None else
        f"top-1 on the validation split, onnxruntime on the same ONNX files, batch {ACCURACY_BATCH}",
        "accuracy_tolerance": tolerance, "accuracy_tolerance_from": source, "tie": TIE, "min_cosine": min_cosine,
        "rule": (f"best: the lowest geometric mean latency over batch sizes {', '.join(map(str, cfg['batch_sizes']))} "
                 + (f"among the models whose top-1 is at most {tolerance} below the baseline's; " if min_cosine is None
                    else f"among the models whose cosine to the baseline is at least {min_cosine} ({cosine_from}); ")
                 + "models within "
                 f"{100 * TIE:.0f}% of the fastest, or within its or their timing noise (the median round over the "
                 f"best) when that is larger, up to {100 * NOISE_CAP:.0f}%, count as equally fast and the latest of "
                 "them is named"),
        "baseline": baseline_label, "final": final_label, "models": rows,
    }
    judge(comparison)
    comparison["duration_s"] = round(time.time() - started, 3)
    console.table(rich_table(chain_table(Chain.model_validate(comparison))))
    if not comparison["final_is_best"]:
        console.warn(comparison["verdict"])
    return comparison


def judge(comparison: dict[str, Any]) -> None:
    """Mark each model's speed-up and eligibility, name the best, and state whether the final model is it."""
    rows = comparison["models"]
    by_step = {r["step"]: r for r in rows}
    base, final = by_step[comparison["baseline"]], by_step[comparison["final"]]
    for r in rows:
        r["speedup"] = {b: base["latency_ms"][b] / ms for b, ms in r["latency_ms"].items()}
        r["eligible"] = (r["accuracy"] is None or base["accuracy"] is None
                         or base["accuracy"] - r["accuracy"] <= comparison["accuracy_tolerance"] + 1e-12)
        if r.get("cosine") is not None and comparison.get("min_cosine") is not None:
            r["eligible"] = r["eligible"] and r["cosine"] >= comparison["min_cosine"] - 1e-12
    eligible = [r for r in rows if r["eligible"]]

    def tie(r: dict[str, Any], other: dict[str, Any]) -> float:  # a busy machine's noise is a tie too, up to 10%
        return 1 + max(comparison["tie"], min(NOISE_CAP, max(r.get("spread", 0.0), other.get("spread", 0.0))))

    fastest = min(eligible, key=lambda r: r["geomean_ms"])
    best = [r for r in eligible if r["geomean_ms"] <= fastest["geomean_ms"] * tie(r, fastest)][-1]
    sizes = comparison["batch_sizes"]
    fastest_at = {b: min(eligible, key=lambda r: r["latency_ms"][str(b)]) for b in sizes}
    for r in rows:
        r["best"] = r is best
        r["fastest_at"] = [b for b in sizes if r["eligible"] and r["latency_ms"][str(b)]
                           <= fastest_at[b]["latency_ms"][str(b)] * tie(r, fastest_at[b])]
    comparison["best"] = best["step"]
    comparison["final_is_best"] = best is final
    if best is final:
        comparison["verdict"] = f"the final model ({final['step']}) is the best of its chain"
        # Best over all batch sizes, yet one model may still beat it at one of them: say so.
        comparison["verdict"] += "".join(
            f"; at batch {b}, {fastest_at[b]['step']} is faster ({final['latency_ms'][str(b)]:.3f} against "
            f"{fastest_at[b]['latency_ms'][str(b)]:.3f} ms)" for b in sizes if b not in final["fastest_at"])
        return
    ratios = ", ".join(f"{final['latency_ms'][str(b)] / best['latency_ms'][str(b)]:.2f}x at batch {b}" for b in sizes)
    why = f"{best['step']} is faster (final/{best['step']} latency: {ratios})"
    if not final["eligible"] and final.get("cosine") is not None and final["accuracy"] is None:
        why = (f"its cosine to the baseline, {final['cosine']:.4f}, is below {comparison['min_cosine']}; the best is "
               f"{best['step']}")
    elif not final["eligible"]:
        why = (f"its top-1 {final['accuracy']:.4f} is more than {comparison['accuracy_tolerance']} below the "
               f"baseline's {base['accuracy']:.4f}; the best is {best['step']}")
    elif best["accuracy"] is not None and final["accuracy"] is not None:
        why += f", top-1 {best['accuracy']:.4f} against {final['accuracy']:.4f}"
    comparison["verdict"] = (f"the final model ({final['step']}) is NOT the best of its chain: {why}; "
                             f"the best model is {best['model'] or best['step']}")
