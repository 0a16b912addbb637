"""The report schema: what report.json holds, as pydantic models (`mlopt report schema` prints it).

The runner writes step and run reports as plain JSON; `parse` validates one against these models
and hands back typed objects, which the Markdown, HTML and compare code read. Batch sizes are
ints here whether a report comes fresh from memory or back from JSON (where keys are strings).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from mlopt.core.errors import RunError
from mlopt.core.sections import Bars, Latency, Scatter, Section, Table

SCHEMA_VERSION = 2
Scalar = Union[bool, int, float, str, None]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    format: str
    lineage: list[str]
    files: list[str] = Field(default_factory=list, description="the model files the step wrote")


class StepReport(_Strict):
    index: int
    dir: str
    type: str
    config: dict[str, Any]
    inputs_sha256: str
    input: ModelRef
    output: ModelRef
    metrics: dict[str, Scalar] = Field(description="scalars only: anything with structure is a section")
    notes: list[str]
    latency: list[Latency] = Field(default_factory=list)
    sections: list[Section] = Field(default_factory=list)
    duration_s: float


class ChainModel(_Strict):
    step: str
    model: str | None
    format: str
    accuracy: float | None
    size_mb: float
    latency_ms: dict[int, float] = Field(description="batch size -> best round's median, ms")
    geomean_ms: float
    speedup: dict[int, float] = Field(description="batch size -> baseline latency / this model's")
    eligible: bool
    best: bool
    fastest_at: list[int]


class Chain(_Strict):
    method: str
    provider: str
    batch_sizes: list[int]
    rounds: int
    iterations_per_round: int
    accuracy_method: str | None
    accuracy_tolerance: float
    accuracy_tolerance_from: str
    tie: float
    rule: str
    baseline: str
    final: str
    models: list[ChainModel]
    best: str
    final_is_best: bool
    verdict: str
    duration_s: float


class GateResult(_Strict):
    gate: str
    expected: str
    measured: float
    baseline: float | None = None
    final: float | None = None
    passed: bool


class Gates(_Strict):
    passed: bool
    results: list[GateResult]
    baseline: str | None


class Environment(_Strict):
    python: str
    platform: str
    cpu: str | None
    cpu_count: int | None
    isa: list[str]
    libraries: dict[str, str]


class StepReportFile(_Strict):
    schema_version: Literal[2]
    kind: Literal["step"]
    step: StepReport
    environment: Environment


class RunReport(_Strict):
    schema_version: Literal[2]
    kind: Literal["run"]
    recipe_file: str | None
    recipe: dict[str, Any]
    steps: list[StepReport]
    environment: Environment
    chain: Chain | None = None
    gates: Gates | None = None


Report = Annotated[Union[StepReportFile, RunReport], Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Report)


def json_schema() -> dict[str, Any]:
    return _ADAPTER.json_schema()


def parse(report: Any) -> StepReportFile | RunReport:
    """A report (dict or JSON text) as typed objects; RunError naming the first problems if it does not fit."""
    try:
        return _ADAPTER.validate_json(report) if isinstance(report, (str, bytes)) else _ADAPTER.validate_python(report)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise RunError(f"the report does not fit the report schema (version {SCHEMA_VERSION}): {problems}") from None


def as_table(section: Table | Bars | Scatter) -> Table:
    """Any section as rows and columns (Markdown shows every section this way, HTML the long ones)."""
    if isinstance(section, Table):
        return section
    if isinstance(section, Bars):
        rows = [[label, *(values[i] for values in section.series.values())] for i, label in enumerate(section.labels)]
        unit = f" ({section.unit})" if section.unit else ""
        return Table(title=section.title, columns=["", *(f"{s}{unit}" for s in section.series)], rows=rows,
                     note=section.note)
    return Table(title=section.title, columns=["", section.xlabel, section.ylabel],
                 rows=[[p.label, p.x, p.y] for p in section.points], note=section.note)


def latency_table(latency: list[Latency]) -> Table | None:
    if not latency:
        return None
    named = any(lat.model for lat in latency)
    methods = list(dict.fromkeys(lat.method for lat in latency))
    rows = [[*([lat.model] if named else []), lat.batch_size, lat.p50_ms, lat.mean_ms, lat.p90_ms, lat.p99_ms,
             *([lat.method] if len(methods) > 1 else [])] for lat in latency]
    return Table(title="latency", columns=[*(["model"] if named else []), "batch", "p50 ms", "mean ms", "p90 ms",
                                           "p99 ms", *(["method"] if len(methods) > 1 else [])],
                 rows=rows, note=f"timing: {methods[0]}" if len(methods) == 1 else None)


def step_latency(step: StepReport) -> dict[int, float]:
    """p50 per batch size of the step's first timed model (the step's own measurement)."""
    if not step.latency:
        return {}
    first = step.latency[0].model
    return {lat.batch_size: lat.p50_ms for lat in step.latency if lat.model == first}
