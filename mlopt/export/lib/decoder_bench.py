"""The bench step's decoder branch: onnxruntime-genai folders side by side (mlopt.runtime.generation).

Per model and (prompt tokens, new tokens) pair: time to first token, decode and prompt tokens/s, the
whole generation's latency, peak memory of a fresh process, and the folder's size, with speed-ups
against the first model. The prompt is real text (the data's lines) when given, else a fixed English
paragraph; either is repeated when shorter than the prompt asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mlopt.core import console
from mlopt.core.errors import InputError
from mlopt.runtime.artifacts import folder_size_mb
from mlopt.runtime.decoder import is_genai_folder
from mlopt.runtime.generation import load_model, peak_rss_mb, prompt_of, time_generation, token_ids

DECODER_TIMING = ("interleaved rounds, every model loaded once, intra-op spinning off; a round is one greedy "
                  "generation of the prompt then the new tokens")
# Settings that time plain ONNX models and those that time decoders: each kind refuses the other's.
PLAIN_ONLY = ("batch_sizes", "iterations", "duration_s", "warmup", "spinning")  # decoders never spin (generation.py)
DECODER_ONLY = ("prompt_tokens", "new_tokens", "rounds")
FIXED_PROMPT = (
    "The river runs through the middle of the old town, and for most of its history the town has lived from it. "
    "Boats carried grain and timber down to the coast, and the mills along the banks ground flour for the villages "
    "in the hills. In the spring the water rises quickly when the snow melts, and the people who live near the "
    "bridge have learned to move their furniture upstairs when the bells ring. Today the mills are museums, the "
    "boats carry visitors instead of grain, and the market square fills every Saturday with farmers selling "
    "cheese, bread, apples and honey. Children learn to swim in the shallow bend below the church, and in the "
    "evening the light on the water turns from silver to gold before the lamps along the quay are lit."
)


def genai_folder(path: str | Path) -> Path | None:
    """The onnxruntime-genai folder that `path` is, or whose model.onnx it names; None for anything else."""
    path = Path(path)
    if is_genai_folder(path):
        return path
    return path.parent if path.is_file() and is_genai_folder(path.parent) else None


def decoder_models(artifact: Any, compare: Sequence[str]) -> list[tuple[str, Path]] | None:
    """(label, folder) of every model when the bench times decoders; None when it times plain ONNX models."""
    if artifact.format == "causal-lm":
        raise InputError(f"bench times exported decoders; export {artifact.origin} first (mlopt export)")
    first = artifact.folder if artifact.format == "genai" else None
    others = [genai_folder(c) for c in compare]
    if first is None and not any(others):
        return None
    if first is None or None in others:
        plain = artifact.origin if first is None else compare[others.index(None)]
        raise InputError(f"bench cannot time decoder folders and plain models together ({plain} is not an "
                         "onnxruntime-genai folder); bench them separately")
    models = [(artifact.origin or str(first), first), *zip(compare, others)]
    if len({label for label, _ in models}) != len(models):
        raise InputError("the same model is named twice in bench")
    _check_tokenizers(models)
    return models  # type: ignore[return-value]


def _check_tokenizers(models: list[tuple[str, Path]]) -> None:
    """All models get the same prompt token ids, so they must share a tokenizer."""
    first = (models[0][1] / "tokenizer.json").read_bytes() if (models[0][1] / "tokenizer.json").is_file() else None
    for label, folder in models[1:]:
        other = (folder / "tokenizer.json").read_bytes() if (folder / "tokenizer.json").is_file() else None
        if other != first:
            raise InputError(f"{label} has another tokenizer than {models[0][0]}; bench compares decoders that share "
                             "one (a model and its quantized variants)")


def check_settings(config: Any, decoders: bool) -> None:
    """Refuse settings of the other kind of bench instead of ignoring them."""
    given = [f for f in (PLAIN_ONLY if decoders else DECODER_ONLY) if f in config.model_fields_set]
    if given:
        kind = "decoder folders" if decoders else "plain ONNX models"
        raise InputError(f"{', '.join(given)} do not apply to {kind}; decoders take prompt_tokens, new_tokens and "
                         "rounds, plain models batch_sizes, iterations, duration_s, warmup and spinning")


def prompt_source(folder: Path, data: Any, model: Any) -> list[int]:
    """Token ids of the prompt text: the data's lines (validation first) or the fixed paragraph."""
    if data is not None and not getattr(data, "text", False):
        raise InputError(f"a decoder's prompt comes from text:FILE data, not {data.name}")
    lines = [*data.val, *data.train] if data is not None else [FIXED_PROMPT]
    return token_ids(folder, lines, model)


def bench_decoders(models: list[tuple[str, Path]], config: Any, data: Any) -> list[dict[str, Any]]:
    """One result per model and (prompt, new) pair, the pairs in order, the models in order within each."""
    if config.provider != "cpu":
        raise InputError("decoders are timed on the CPU (onnxruntime-genai reads its provider from genai_config.json)")
    folders = [folder for _, folder in models]
    loaded = [load_model(folder, config.threads) for folder in folders]
    text = prompt_source(folders[0], data, loaded[0])
    results: list[dict[str, Any]] = []
    for size in config.prompt_tokens:
        prompt = prompt_of(text, size, data is not None)
        for new in config.new_tokens:
            rows = time_generation(folders, prompt, new, config.rounds, models=loaded)
            for (label, folder), row in zip(models, rows):
                row.update(model=label, provider="cpu", batch_size=1, size_mb=folder_size_mb(folder),
                           peak_rss_mb=peak_rss_mb(folder, prompt, new, config.threads))
            results += _with_speedups(rows)
    return results


def _with_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row against the first: whole generation (mean), decode rate and time to first token (p50)."""
    first = rows[0]
    for row in rows:
        row["speedup"] = first["latency_ms"]["mean"] / row["latency_ms"]["mean"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / first["decode_tokens_per_s"]
        row["ttft_speedup"] = first["ttft_ms"]["p50"] / row["ttft_ms"]["p50"]
    return rows


# The flat columns of the decoder table; "a.b" columns hold the nested value row[a][b].
COLUMNS = ["model", "provider", "batch_size", "prompt_tokens", "new_tokens", "ttft_ms.p50", "ttft_ms.p90",
           "decode_tokens_per_s", "prompt_tokens_per_s", "latency_ms.mean", "latency_ms.p50", "latency_ms.p90",
           "latency_ms.p99", "throughput_per_s", "peak_rss_mb", "size_mb", "speedup", "decode_speedup", "ttft_speedup"]


def table_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    def cell(row: dict[str, Any], column: str) -> Any:
        key, _, sub = column.partition(".")
        return row[key][sub] if sub else row[key]

    return [[cell(r, c) for c in COLUMNS] for r in results]


def results_of_table(columns: list[str], rows: list[list[Any]]) -> list[dict[str, Any]]:
    """The --json results back from the table: the dotted columns nested again."""
    results = []
    for values in rows:
        result: dict[str, Any] = {}
        for column, value in zip(columns, values):
            key, _, sub = column.partition(".")
            if sub:
                result.setdefault(key, {})[sub] = value
            else:
                result[key] = value
        results.append(result)
    return results


def show_decoder_table(results: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="generation on onnxruntime-genai", caption=f"timing: {DECODER_TIMING}")
    heads = ("model", "prompt", "new", "TTFT p50 ms", "TTFT p90 ms", "decode tok/s", "prompt tok/s", "peak RSS MB",
             "size MB", "decode speed-up", "TTFT speed-up")
    for head in heads:
        table.add_column(head, justify="left" if head == "model" else "right")
    for r in results:
        table.add_row(r["model"], str(r["prompt_tokens"]), str(r["new_tokens"]), f"{r['ttft_ms']['p50']:.1f}",
                      f"{r['ttft_ms']['p90']:.1f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['prompt_tokens_per_s']:.1f}",
                      f"{r['peak_rss_mb']:.0f}", f"{r['size_mb']:.1f}", f"{r['decode_speedup']:.2f}x",
                      f"{r['ttft_speedup']:.2f}x")
    console.table(table)
