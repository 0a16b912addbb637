"""The report schema: what report.json holds, as pydantic models (`mlopt report schema` prints it).

The runner writes step and run reports as plain JSON; `parse` validates one against these models
and hands back typed objects, which the Markdown, HTML and compare code read. Batch sizes are
ints here whether a report comes fresh from memory or back from JSON (where keys are strings).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError

from mlopt.core.errors import RunError
from mlopt.core.sections import Latency, Section, Strict

SCHEMA_VERSION = 2
Scalar = Union[bool, int, float, str, None]


class ModelRef(Strict):
    format: str
    lineage: list[str]
    files: list[str] = Field(default_factory=list, description="the model files the step wrote")


class StepReport(Strict):
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


class ChainModel(Strict):
    step: str
    model: str | None
    format: str
    accuracy: float | None
    cosine: float | None = Field(None, description="text encoders: mean cosine of the mean-pooled outputs to the "
                                 "baseline's on the validation text")
    size_mb: float
    latency_ms: dict[int, float] = Field(description="batch size -> best round's median, ms")
    geomean_ms: float
    speedup: dict[int, float] = Field(description="batch size -> baseline latency / this model's")
    eligible: bool
    best: bool
    fastest_at: list[int]
    spread: float = Field(0.0, description="timing noise: the median round over the best, minus 1")
    rounds_ms: dict[int, list[float]] = Field(default_factory=dict, description="batch size -> each interleaved "
                                              "round's median, ms (models are compared round by round)")


class Chain(Strict):
    method: str
    provider: str
    batch_sizes: list[int]
    rounds: int
    iterations_per_round: int
    accuracy_method: str | None
    accuracy_tolerance: float
    accuracy_tolerance_from: str
    min_cosine: float | None = None  # text encoders: the fidelity a model needs to be eligible
    tie: float
    rule: str
    baseline: str
    final: str
    models: list[ChainModel]
    best: str
    final_is_best: bool
    verdict: str
    retimed: list[str] = Field(default_factory=list, description="the best and the final model, when the final one "
                               "timed slower and the two were timed again together before the verdict")
    retimed_ratio: float | None = Field(None, description="the final model's latency over the best one's, median "
                                        "per-round ratio over all their rounds (geometric mean over batch sizes)")
    retimed_noise: float | None = Field(None, description="that ratio's noise: twice its median's standard error")
    duration_s: float


class GateResult(Strict):
    gate: str
    expected: str
    measured: float
    baseline: float | None = None
    final: float | None = None
    passed: bool


class Gates(Strict):
    passed: bool
    results: list[GateResult]
    baseline: str | None


class Environment(Strict):
    python: str
    platform: str
    cpu: str | None
    cpu_count: int | None
    isa: list[str]
    libraries: dict[str, str]


class StepReportFile(Strict):
    schema_version: Literal[2]
    kind: Literal["step"]
    step: StepReport
    environment: Environment


class RunReport(Strict):
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
