"""The chain comparison: every model a recipe made, measured one way in one run, and the best named.

Steps time their models in different ways (a sequential bench, interleaved rounds against one
other model, different iteration counts, at different moments of a shared machine), so their
figures cannot be set side by side. When a recipe times something (a bench step or a latency gate),
this module measures every model of the chain alike, as an ONNX file on onnxruntime: latency in
interleaved rounds at the bench steps' and the gates' batch sizes, and top-1 on the validation split.

The best model is the fastest one whose accuracy is within the tolerance of the baseline's.
"Fastest" across batch sizes is the lowest geometric mean, so every batch size counts alike, by
ratio, and models are compared round by round (their per-round latency ratio, which a slow spell of
a shared machine weighs on alike). Differences under TIE (5%), or under that ratio's noise when larger
(up to 10%), count as equally fast, and the latest of them is named. A final model timed slower than
the best is timed again beside it before the verdict says so. The gates read their figures from this
measurement, so the chain table and the gates cannot disagree.
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
from mlopt.export.lib.timing import NOISE_CAP, TIMING_ROUNDS, best_of, interleaved_rounds, paired_ratio, spread_of
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
                set_timing(row, medians)
    return rows


def set_timing(row: dict[str, Any], medians: dict[int, list[float]]) -> None:
    """A row's timing from its rounds' medians: each round's, the best round's, their geometric mean and spread."""
    lat = best_of(medians)
    row["rounds_ms"] = {str(b): [round(v, 6) for v in medians[b]] for b in medians}
    row["spread"] = round(spread_of(medians), 4)
    row["latency_ms"] = {str(b): lat[b] for b in medians}
    row["geomean_ms"] = math.exp(sum(math.log(v) for v in lat.values()) / len(lat))


def retime(comparison: dict[str, Any], members: list[tuple[str, "Artifact"]], provider: str, per_round: int) -> None:
    """The final model judged slower than the best one: time the two again together, in as many rounds more, and
    record their per-round latency ratio over all rounds (`retimed_ratio`, `retimed_noise`), from which `judge`
    decides. A warning that the model a recipe hands back is not its best must not come from one slow spell of a
    shared machine (a CI run once judged a model 1.22x slower than one that times within 5% of it here). The rows'
    own figures stay those of the rounds every model shared, so the table and the gates compare like with like."""
    rows = {r["step"]: r for r in comparison["models"]}
    pair = [comparison["best"], comparison["final"]]
    artifacts = dict(members)
    sizes = comparison["batch_sizes"]
    console.info(f"{pair[1]} timed slower than {pair[0]}: timing the two again in {comparison['rounds']} more "
                 "interleaved rounds")
    with tempfile.TemporaryDirectory(prefix="mlopt-chain-") as tmp:
        with console.quieted():
            paths = [as_onnx(artifacts[label], Path(tmp) / f"{i}.onnx") for i, label in enumerate(pair)]
        more = interleaved_rounds(paths, artifacts[pair[1]].sample_shape, provider, sizes,
                                  per_round * comparison["rounds"], comparison["rounds"])
    best, final = ({b: [*rows[label]["rounds_ms"][str(b)], *medians[b]] for b in sizes}
                   for label, medians in zip(pair, more))
    ratio, noise = paired_ratio(best, final)
    comparison.update(retimed=pair, retimed_ratio=round(ratio, 4), retimed_noise=round(noise, 4))


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
                 f"best, or of their per-round ratio) when that is larger, up to {100 * NOISE_CAP:.0f}%, count as "
                 "equally fast and the latest of them is named; a final model timed slower than the best is timed "
                 "again beside it before the verdict"),
        "baseline": baseline_label, "final": final_label, "models": rows,
    }
    judge(comparison)
    final = next(r for r in rows if r["step"] == final_label)
    if not comparison["final_is_best"] and final["eligible"] and cfg["batch_sizes"]:
        retime(comparison, members, cfg["provider"], cfg["per_round"])
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

    def as_fast(r: dict[str, Any], ref: dict[str, Any], sizes: list[str]) -> bool:
        """Whether r is as fast as ref at these batch sizes, as far as the timing can tell: within the tie, or the
        timing noise when larger (up to 10%: a busy machine's noise is a tie too). Rows timed in the same rounds
        are compared round by round (`paired_ratio`), others by their best rounds and spreads."""
        paired = None
        if "rounds_ms" in r and "rounds_ms" in ref:
            paired = paired_ratio({b: ref["rounds_ms"][b] for b in sizes}, {b: r["rounds_ms"][b] for b in sizes})
        if paired is not None:
            slower, noise = paired[0] - 1, paired[1]
        else:
            geomean = [math.exp(sum(math.log(x["latency_ms"][b]) for b in sizes) / len(sizes)) for x in (r, ref)]
            slower, noise = geomean[0] / geomean[1] - 1, max(r.get("spread", 0.0), ref.get("spread", 0.0))
        return slower <= max(comparison["tie"], min(NOISE_CAP, noise)) + 1e-12

    sizes = comparison["batch_sizes"]
    keys = [str(b) for b in sizes]

    def typical(r: dict[str, Any], sizes: list[str]) -> float:
        """Where rounds were kept, the geometric mean of the median rounds (one quiet round does not make a model
        the reference the others are held to); else of the best rounds."""
        import statistics

        values = [statistics.median(r["rounds_ms"][b]) if "rounds_ms" in r else r["latency_ms"][b] for b in sizes]
        return math.exp(sum(math.log(v) for v in values) / len(values))

    fastest = min(eligible, key=lambda r: typical(r, keys))
    best = [r for r in eligible if as_fast(r, fastest, keys)][-1]
    retimed = comparison.get("retimed")
    if retimed and retimed[1] == final["step"] and final["eligible"] and comparison["retimed_ratio"] - 1 <= max(
            comparison["tie"], min(NOISE_CAP, comparison["retimed_noise"])) + 1e-12:
        best = final  # as fast as the model it was timed again beside, round by round over all their rounds
    fastest_at = {b: min(eligible, key=lambda r: typical(r, [str(b)])) for b in sizes}
    for r in rows:
        r["best"] = r is best
        r["fastest_at"] = [b for b in sizes if r["eligible"] and as_fast(r, fastest_at[b], [str(b)])]
    comparison["best"] = best["step"]
    comparison["final_is_best"] = best is final
    again = ""
    if retimed:
        again = (f"timed again beside {retimed[0]}, {2 * comparison['rounds']} rounds in all: final/{retimed[0]} "
                 f"latency {comparison['retimed_ratio']:.2f}x round by round (noise {comparison['retimed_noise']:.2f})")
    if best is final:
        comparison["verdict"] = f"the final model ({final['step']}) is the best of its chain" + (
            f" ({again})" if again else "")
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
    if again:
        why += f"; {again}"
    comparison["verdict"] = (f"the final model ({final['step']}) is NOT the best of its chain: {why}; "
                             f"the best model is {best['model'] or best['step']}")
