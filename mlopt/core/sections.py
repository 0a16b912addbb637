"""What a step reports besides its scalar metrics: latencies and generic report sections.

A pass describes what it measured with these types; the report renders them (Markdown tables,
HTML tables and plots) without knowing which pass made them, so a new step type needs no report
code. They are pydantic models: report.json validates against them (`mlopt report schema`).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Cell = Union[str, int, float, bool, None]


class Strict(BaseModel):
    """Every config and report record: an unknown key is an error, never ignored."""

    model_config = ConfigDict(extra="forbid")


class Config(Strict):
    """Every step's and recipe's configuration: besides an unknown key, an infinite or NaN number is an error (a
    bound such as gt=0 lets infinity through, which would time for ever or train on nothing)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


#: A batch size a step runs or times at: beyond 65536 onnxruntime and torch only fail to allocate.
BatchSize = Annotated[int, Field(gt=0, le=65536)]
#: A seed: numpy and scikit-learn take 0..2**32-1.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


class Latency(Strict):
    """One model's latency at one batch size, and how it was measured. A step that times several models times
    the one it started from first, and marks those of the one it hands on `output` (the summary and compare read them)."""

    batch_size: int = Field(gt=0)
    p50_ms: float
    mean_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    method: str = Field(description="how it was timed (sequential runs, interleaved rounds, ...)")
    model: str | None = Field(None, description="which model, where a step times several")
    output: bool = Field(False, description="this entry times the model the step hands on")


class Table(Strict):
    """Rows of values under named columns."""

    kind: Literal["table"] = "table"
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    note: str | None = None


class Bars(Strict):
    """One or more series of values over named items (drawn as horizontal bars, so long names stay legible)."""

    kind: Literal["bars"] = "bars"
    title: str
    labels: list[str]
    series: dict[str, list[float | None]] = Field(description="series name -> one value per label")
    unit: str = ""
    note: str | None = None


class Point(Strict):
    label: str
    x: float
    y: float


class Scatter(Strict):
    """Labelled points, e.g. accuracy against latency."""

    kind: Literal["scatter"] = "scatter"
    title: str
    xlabel: str
    ylabel: str
    points: list[Point]
    note: str | None = None


Section = Annotated[Union[Table, Bars, Scatter], Field(discriminator="kind")]
