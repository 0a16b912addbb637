"""Calibration data for onnxruntime's static quantization, drawn from the train split (imported at run
time only: it imports onnxruntime)."""

from __future__ import annotations

from typing import Any

from onnxruntime.quantization import CalibrationDataReader

from mlopt.core import console
from mlopt.core.errors import InputError, format_shape
from mlopt.runtime.data import count, inputs_of, loader, take, to_numpy


def calibration_batches(data: Any, input_name: str, model_shape: list[Any], n: int, batch: int = 16,
                        dtype: Any = None) -> list[dict[str, Any]]:
    """Up to `n` training inputs in feeds of `batch`, checked against the model's input; token ids are handed over
    in the input's integer type (`dtype`: int32 for some models from elsewhere)."""
    import numpy as np

    expected = [d if isinstance(d, int) and d > 0 else None for d in model_shape[1:]]
    sample = list(data.sample_shape)
    if len(expected) != len(sample) or any(e is not None and e != s for e, s in zip(expected, sample)):
        raise InputError(f"calibration data {data.name!r} gives samples of shape {format_shape(sample)}, but "
                         f"the model expects {format_shape(expected)}")
    feeds, seen = [], 0
    for items in loader(data.train, batch):
        x = to_numpy(inputs_of(items))
        if not isinstance(x, dict) and x.dtype not in (np.float32, np.int64):  # images and features; token ids
            raise InputError(f"calibration data must be float32 (or int64 token ids), got {x.dtype}")
        if not isinstance(x, dict) and x.dtype == np.int64 and dtype is not None and np.issubdtype(dtype, np.integer):
            x = x.astype(dtype)
        size = min(count(x), n - seen)
        # token models feed every input by name; image models their one input
        feeds.append(take(x, 0, size) if isinstance(x, dict) else {input_name: x[:size]})
        seen += size
        if seen >= n:
            break
    if seen < n:
        console.warn(f"asked for {n} calibration samples but {data.name!r} has only {seen} training samples; using {seen}")
    return feeds


class FeedReader(CalibrationDataReader):
    """onnxruntime's CalibrationDataReader protocol over a list of feeds, read once."""

    def __init__(self, feeds: list[dict[str, Any]]):
        self._it = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)
