"""The `bench` step: onnxruntime latency and throughput, models side by side (mlopt.export.lib.timing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mlopt.core.contracts import Pass, StepResult, names_file
from mlopt.core.errors import InputError
from mlopt.core.sections import Latency, Table
from mlopt.export.lib import decoder_bench
from mlopt.export.lib.timing import TimingSettings, timing_note, bench_models, show_table
from mlopt.runtime.artifacts import ONNX_FILE, load_onnx_file
from mlopt.runtime.decoder import is_genai_folder


class BenchConfig(TimingSettings):
    """Time the current ONNX model (and any others named in `compare`) on onnxruntime."""

    type: Literal["bench"] = "bench"
    compare: list[str] = Field(default_factory=list, json_schema_extra=names_file(), description="more ONNX files timed after the current model")
    prompt_tokens: list[int] = Field(default_factory=lambda: [128], min_length=1,
                                     description="decoders: prompt lengths timed (tokens)")
    new_tokens: list[int] = Field(default_factory=lambda: [128], min_length=1,
                                  description="decoders: tokens generated after each prompt")
    rounds: int = Field(5, gt=0, description="decoders: timed generations per model (the models take turns)")

    @model_validator(mode="after")
    def _check(self) -> "BenchConfig":
        if any(n <= 0 for n in self.prompt_tokens) or any(n < 2 for n in self.new_tokens):
            raise ValueError("prompt_tokens must be positive and new_tokens at least 2")
        if self.duration_s is not None:
            if "iterations" in self.model_fields_set and self.iterations is not None:
                raise ValueError("give iterations or duration_s, not both")
            self.iterations = None
        return self


class BenchPass(Pass):
    name = "bench"
    config_class = BenchConfig
    produces_model = False
    text_ok = True
    decoder_ok = True  # onnxruntime-genai folders: generation speed
    uses_data = True  # text:FILE: a decoder's prompt is real text
    cli_help = "onnxruntime latency and throughput of one or more ONNX models, side by side."
    cli_models_help = "ONNX files (or mlopt output directories); the first is the baseline."

    @classmethod
    def cli_models(cls, models: list[str], step: dict[str, Any]) -> str:
        paths = [str(Path(p) / ONNX_FILE) if Path(p).is_dir() and not is_genai_folder(p) else p
                 for p in [*models, *step.get("compare", [])]]
        step["compare"] = paths[1:]
        return paths[0]

    @classmethod
    def cli_json(cls, step: dict[str, Any]) -> Any:
        """`bench --json`: one result per model and batch size, with its latency percentiles (ms); for
        decoders one per model and (prompt, new tokens) pair, latency_ms timing the whole generation."""
        table = step["sections"][0]
        if "ttft_ms.p50" in table["columns"]:
            return {"results": decoder_bench.results_of_table(table["columns"], table["rows"]),
                    "timing": decoder_bench.DECODER_TIMING}
        latency = {(lat["model"], lat["batch_size"]): lat for lat in step["latency"]}
        results = []
        for row in (dict(zip(table["columns"], r)) for r in table["rows"]):
            lat = latency[row["model"], row["batch_size"]]
            results.append({**row, "latency_ms": {k: lat[f"{k}_ms"] for k in ("mean", "p50", "p90", "p99")}})
        return {"results": results, "timing": next(iter(latency.values()))["method"]}

    @classmethod
    def check_family(cls, config: BenchConfig, decoder: bool) -> None:
        decoder_bench.check_settings(config, decoder)

    def run(self, artifact: Any, config: BenchConfig, ctx: Any) -> StepResult:
        decoders = decoder_bench.decoder_models(artifact, config.compare)
        decoder_bench.check_settings(config, decoders is not None)
        if decoders is not None:
            return self._run_decoders(artifact, decoders, config, ctx)
        path = artifact.require_onnx("bench")
        models = [(artifact.origin or str(path), Path(path), artifact.sample_shape)]
        for other in config.compare:
            extra = load_onnx_file(Path(other))
            models.append((other, Path(other), extra.sample_shape or artifact.sample_shape))
        labels = [m[0] for m in models]
        if len(set(labels)) != len(labels):
            raise InputError("the same model is named twice in bench")
        results = bench_models(models, config)
        show_table(results)
        first = results[0]
        metrics = {"throughput_per_s": first["throughput_per_s"], "size_mb": first["size_mb"], "provider": config.provider}
        latency = [Latency(batch_size=r["batch_size"], method=timing_note(config.spinning), model=r["model"], output=r["model"] == labels[0],
                           **{f"{k}_ms": ms for k, ms in r["latency_ms"].items()}) for r in results]
        columns = ["model", "provider", "batch_size", "throughput_per_s", "size_mb", "speedup"]
        table = Table(title="throughput and speed-up (mean latency against the first model's)", columns=columns,
                      rows=[[r[c] for c in columns] for r in results])
        return StepResult(artifact=artifact, metrics=metrics, latency=latency, sections=[table])

    def _run_decoders(self, artifact: Any, models: list[tuple[str, Path]], config: BenchConfig, ctx: Any) -> StepResult:
        results = decoder_bench.bench_decoders(models, config, ctx.data)
        decoder_bench.show_decoder_table(results)
        first = results[0]
        metrics = {k: first[k] for k in ("decode_tokens_per_s", "prompt_tokens_per_s", "peak_rss_mb", "size_mb")}
        metrics |= {"ttft_p50_ms": first["ttft_ms"]["p50"], "provider": config.provider}
        pair = first["prompt_tokens"], first["new_tokens"]  # reports read one latency per model: the first pair's
        method = f"{pair[0]}-token prompt and {pair[1]} new tokens; {decoder_bench.DECODER_TIMING}"
        latency = [Latency(batch_size=1, method=method, model=r["model"], output=r["model"] == models[0][0],
                           **{f"{k}_ms": ms for k, ms in r["latency_ms"].items()})
                   for r in results if (r["prompt_tokens"], r["new_tokens"]) == pair]
        table = Table(title="generation speed and speed-ups (against the first model)",
                      columns=decoder_bench.COLUMNS, rows=decoder_bench.table_rows(results))
        return StepResult(artifact=artifact, metrics=metrics, latency=latency, sections=[table])
