"""Export validation: run PyTorch and onnxruntime on the same inputs and compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlopt.core.errors import ParityError
from mlopt.runtime.data import batch_within, count, take, to_numpy
from mlopt.runtime.models import flat_tensors
from mlopt.runtime.session import make_session, run_session_all


def compare(module: Any, onnx_path: Path, inputs: Any, atol: float, rtol: float, batch_size: int = 32) -> dict[str, Any]:
    """Max abs error and top-1 agreement of onnxruntime against torch on `inputs` (in batches of at most
    `batch_size`, fewer for large inputs: `batch_within`); a ParityError where any output differs by more than
    atol + rtol * max|torch output|."""
    import numpy as np
    import torch

    batch_size = batch_within(inputs, batch_size)
    session = make_session(onnx_path, "cpu")
    module.eval()
    max_err, max_ref, agree, n, logits = 0.0, 0.0, 0, 0, False
    for start in range(0, count(inputs), batch_size):
        x = take(inputs, start, start + batch_size)
        with torch.no_grad():
            refs = [t.float().numpy() for t in flat_tensors(module(**x) if isinstance(x, dict) else module(x))]
        gots = run_session_all(session, to_numpy(x))
        if len(gots) != len(refs):
            raise ParityError(f"onnxruntime returns {len(gots)} outputs and PyTorch {len(refs)}")
        for got, ref in zip(gots, refs):  # every output, in the order the exporter wrote them
            if got.shape != ref.shape:
                raise ParityError(f"onnxruntime output shape {got.shape} differs from PyTorch's {ref.shape}")
            max_err = max(max_err, float(np.abs(got - ref).max()))
            max_ref = max(max_ref, float(np.abs(ref).max()))
        logits = len(refs) == 1 and refs[0].ndim == 2
        if logits:
            agree += int((gots[0].argmax(1) == refs[0].argmax(1)).sum())
        n += len(refs[0])
    agreement = agree / n if n and logits else None
    tolerance = within_tolerance("exported model disagrees with PyTorch", max_err, max_ref, atol, rtol, agreement)
    return {"max_abs_error": max_err, "max_abs_output": max_ref, "tolerance": tolerance, "top1_agreement": agreement,
            "parity_samples": n}


def within_tolerance(subject: str, max_err: float, max_ref: float, atol: float, rtol: float,
                     agreement: float | None = None, hint: str = "") -> float:
    """The tolerance atol + rtol * max_ref; a ParityError, one line beginning with `subject`, where max_err is over
    it (or not finite)."""
    import math

    tolerance = atol + rtol * max_ref
    if not math.isfinite(max_err) or max_err > tolerance:
        agreed = "" if agreement is None else f"; top-1 agreement {agreement:.3f}"
        raise ParityError(f"{subject}: max abs error {max_err:.3g} > tolerance {tolerance:.3g} (atol {atol} + rtol "
                          f"{rtol} x max |output| {max_ref:.3g}){agreed}{hint}")
    return tolerance
