"""CI gates: compare the run's final model with its baseline, measured in the same run.

The baseline is the model before the first compressing step (prune, distill, ptq), or the final
model itself when the recipe compresses nothing. A failed gate still writes every artifact and
report, then exits with code 3; `--junit FILE` writes one JUnit test case per gate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlopt.core import console
from mlopt.core.errors import InputError
from mlopt.core.fsutil import file_size_mb
from mlopt.core.sections import Table
from mlopt.report.markdown import rich_table
from mlopt.run.chain import measure, runs_per_round
from mlopt.runtime.data import require_labels

if TYPE_CHECKING:
    from mlopt.run.recipe import GatesConfig


def evaluate_gates(gates: GatesConfig, baseline: Any, final: Any, data: Any,
                   comparison: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per gate (name, expected, measured, passed), from the chain comparison's figures (so the
    gates and the chain table never disagree). Without a comparison (a recipe that times nothing), the
    baseline and the final model are measured here alike, by the same function.
    """
    check_family(gates, final.is_decoder, data)
    if final.is_decoder:
        return decoder_gates(gates, baseline, final, data)
    if gates.max_accuracy_drop is not None:
        require_labels(data, "the max_accuracy_drop gate")
    console.info("checking gates against the baseline " + (baseline.origin or "model"))
    if comparison is not None:
        rows = {r["step"]: r for r in comparison["models"]}
        base, last = rows[comparison["baseline"]], rows[comparison["final"]]
    else:
        timed = gates.min_speedup is not None or gates.max_latency_ms is not None
        if timed or gates.max_accuracy_drop is not None or gates.min_cosine is not None:
            base, last = measure([("baseline", baseline), ("final", final)], data, gates.provider,
                                 [gates.batch_size] if timed else [], runs_per_round(gates.iterations))
    out: list[dict[str, Any]] = []
    if gates.max_accuracy_drop is not None:
        drop = base["accuracy"] - last["accuracy"]
        out.append({"gate": "max_accuracy_drop", "expected": f"<= {gates.max_accuracy_drop}",
                    "measured": round(drop, 6), "baseline": base["accuracy"], "final": last["accuracy"],
                    "passed": drop <= gates.max_accuracy_drop + 1e-12})
    if gates.min_cosine is not None:
        out.append({"gate": "min_cosine", "expected": f">= {gates.min_cosine}", "measured": round(last["cosine"], 6),
                    "passed": last["cosine"] >= gates.min_cosine - 1e-12})
    batch = str(gates.batch_size)
    if gates.min_speedup is not None:
        speedup = base["latency_ms"][batch] / last["latency_ms"][batch]
        out.append({"gate": "min_speedup", "expected": f">= {gates.min_speedup}", "measured": round(speedup, 3),
                    "baseline": base["latency_ms"][batch], "final": last["latency_ms"][batch],
                    "passed": speedup >= gates.min_speedup})
    if gates.max_latency_ms is not None:
        final_ms = last["latency_ms"][batch]
        out.append({"gate": "max_latency_ms", "expected": f"<= {gates.max_latency_ms}",
                    "measured": round(final_ms, 4), "passed": final_ms <= gates.max_latency_ms})
    if gates.max_size_mb is not None:
        size = file_size_mb(final.onnx_path) if final.format == "onnx" else final.size_mb()
        out.append({"gate": "max_size_mb", "expected": f"<= {gates.max_size_mb}", "measured": round(size, 4),
                    "passed": size <= gates.max_size_mb})
    show(out)
    return out


DECODER_GATES = ("min_decode_speedup", "max_ppl_increase")
OTHER_GATES = ("max_accuracy_drop", "min_speedup", "max_latency_ms", "min_cosine")


def check_family(gates: "GatesConfig", decoder: bool, data: Any = None, exported: bool = True) -> None:
    """Gates of the other model family are refused, and so are a decoder's gates that could not be measured
    (before any step runs: the runner calls this when planning, `exported` saying whether a step writes a
    genai folder)."""
    if decoder and gates.any():
        settings = sorted({"batch_size", "provider", "iterations"} & gates.model_fields_set)
        if settings:
            raise InputError(f"gates.{settings[0]} does not apply to a decoder language model (its gates time "
                             "generation with onnxruntime-genai)")
        if not exported:
            raise InputError("a decoder's gates measure the exported model: add an export or ptq step to the recipe")
        if gates.max_ppl_increase is not None and (data is None or not data.text):
            raise InputError("the max_ppl_increase gate needs text: add 'data: {source: text:FILE}' to the recipe")
    wrong = [g for g in (OTHER_GATES if decoder else DECODER_GATES) if getattr(gates, g) is not None]
    if wrong and decoder:
        raise InputError(f"the {wrong[0]} gate does not apply to a decoder language model; its gates are "
                         "min_decode_speedup, max_ppl_increase and max_size_mb")
    if wrong:
        raise InputError(f"the {wrong[0]} gate applies to decoder language models only")
    if gates.max_accuracy_drop is not None and data is not None and getattr(data, "text", False):
        raise InputError("the max_accuracy_drop gate needs labelled data, and text:FILE has none: the min_cosine "
                         "gate measures an encoder's fidelity to the baseline instead")
    if gates.min_cosine is not None and data is not None and data.labeled:
        raise InputError("the min_cosine gate compares outputs on unlabelled data (text:FILE for an encoder, "
                         "random:SHAPE, or the inputs of a model whose output labels cannot score): labelled data "
                         "has the max_accuracy_drop gate")
    if gates.min_cosine is not None and data is None:
        raise InputError("the min_cosine gate needs data to compare outputs on: add 'data: {source: text:FILE}' for an "
                         "encoder, or 'data: {source: random:SHAPE}' to the recipe")


def decoder_gates(gates: "GatesConfig", baseline: Any, final: Any, data: Any) -> list[dict[str, Any]]:
    """Decode speed-up and perplexity increase of the final decoder over the baseline (exported first when it is
    still an HF folder), measured here side by side: perplexity on the held-out lines, decode in interleaved rounds."""
    import tempfile
    from pathlib import Path

    from mlopt.export.lib.decoder import export_decoder
    from mlopt.export.lib.decoder_bench import prompt_source
    from mlopt.runtime import generation

    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mlopt-gates-") as work:
        if baseline.format == "causal-lm":
            with console.quieted():
                baseline = export_decoder(baseline, Path(work) / "baseline").artifact
        folders = [baseline.folder, final.folder]
        if gates.max_ppl_increase is not None:
            # the windows ptq's search scores by default, so both read one figure
            ppl = [generation.perplexity(f, generation.token_ids(f, list(data.val)), generation.WINDOW,
                                         generation.MAX_WINDOWS)["perplexity"] for f in folders]
            increase = ppl[1] / ppl[0] - 1
            out.append({"gate": "max_ppl_increase", "expected": f"<= {gates.max_ppl_increase}", "measured": round(increase, 5),
                        "baseline": ppl[0], "final": ppl[1], "passed": increase <= gates.max_ppl_increase + 1e-12})
        if gates.min_decode_speedup is not None:
            text = data if data is not None and data.text else None  # the prompt bench and ptq time with
            prompt = generation.prompt_of(prompt_source(folders[0], text, None), 128, real_text=text is not None)
            rates = [t["decode_tokens_per_s"] for t in
                     generation.time_generation(folders, prompt, generation.NEW_TOKENS, generation.ROUNDS)]
            speedup = rates[1] / rates[0]
            out.append({"gate": "min_decode_speedup", "expected": f">= {gates.min_decode_speedup}",
                        "measured": round(speedup, 3), "baseline": rates[0], "final": rates[1],
                        "passed": speedup >= gates.min_decode_speedup})
    if gates.max_size_mb is not None:
        size = final.size_mb()
        out.append({"gate": "max_size_mb", "expected": f"<= {gates.max_size_mb}", "measured": round(size, 4),
                    "passed": size <= gates.max_size_mb})
    show(out)
    return out


def show(rows: list[dict[str, Any]]) -> None:
    table = rich_table(Table(title="gates", columns=["gate", "expected", "measured", "result"],
                             rows=[[r["gate"], r["expected"], r["measured"], "pass" if r["passed"] else "FAIL"] for r in rows]))
    with console.quieted(console.is_quiet() and all(r["passed"] for r in rows)):  # a failure shows even with --quiet
        console.table(table)


JUNIT_CLASSNAME = "mlopt.gates"  # what CI dashboards group the cases by: kept across versions


def junit_xml(rows: list[dict[str, Any]], suite: str) -> str:
    from xml.sax.saxutils import quoteattr

    failures = sum(not r["passed"] for r in rows)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuite name={quoteattr(suite)} tests="{len(rows)}" failures="{failures}" errors="0">']
    for r in rows:
        lines.append(f'  <testcase classname="{JUNIT_CLASSNAME}" name={quoteattr(r["gate"])}>')
        if not r["passed"]:
            msg = f"expected {r['expected']}, measured {r['measured']}"
            lines.append(f"    <failure message={quoteattr(msg)}/>")
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    return "\n".join(lines) + "\n"
