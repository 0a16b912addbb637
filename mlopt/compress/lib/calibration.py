"""Calibration inputs: unlabelled batches of what a model takes, read by the data-aware pruning steps (activation
importance in importance.py, the least-squares refit in reconstruction.py), and how a Linear's input is read off them
one row per real token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlopt.runtime.data import count, inputs_of, loader, take


@dataclass
class Calibration:
    """Unlabelled calibration inputs (batches of what the model takes), and what was learnt from them."""

    batches: list[Any]
    reconstruct: bool = False
    energy: dict[str, Any] = field(default_factory=dict)  # Linear name -> mean square of each input channel
    refitted: list[str] = field(default_factory=list)  # Linears refitted, by name (filled by reconstruction.refit)
    too_wide: list[tuple[str, int]] = field(default_factory=list)  # Linears cut without a refit: name, bytes needed


def calibration(data: Any, batch_size: int, samples: int, reconstruct: bool) -> Calibration:
    """The first `samples` training inputs (labels dropped), in batches."""
    batches, seen = [], 0
    for batch in loader(data.train, batch_size):
        x = inputs_of(batch)
        n = min(count(x), samples - seen)
        batches.append(take(x, 0, n))
        seen += n
        if seen >= samples:
            break
    return Calibration(batches=batches, reconstruct=reconstruct)


def run_model(module: Any, x: Any) -> None:
    module(**x) if isinstance(x, dict) else module(x)


def token_rows(x: Any, mask: Any) -> Any:
    """A Linear's input as one row per token: (batch, tokens, C) keeps the real tokens where the batch has an
    attention mask of (batch, tokens); anything else is flattened to (-1, C)."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def batch_mask(x: Any) -> Any:
    """The batch's attention mask (token inputs), else None."""
    return x.get("attention_mask") if isinstance(x, dict) else None
