"""mlopt's exceptions. Each carries the process exit code the CLI turns it into.

Exit codes (documented in the README and relied on by CI users):
0 success, 1 runtime failure, 2 invalid input/usage/config, 3 a gate or regression check failed.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INPUT = 2
EXIT_GATE = 3


class MloptError(Exception):
    """Base class: a failure mlopt understands and can explain in one line."""

    exit_code = EXIT_FAILURE


class InputError(MloptError):
    """Bad input: a missing file, an unknown model, a malformed spec or config (exit 2)."""

    exit_code = EXIT_INPUT


class RunError(MloptError):
    """The input was valid but the work failed: export mismatch, runtime crash (exit 1)."""

    exit_code = EXIT_FAILURE


class ParityError(RunError):
    """onnxruntime's outputs disagree with PyTorch's beyond the tolerance."""


class GateError(MloptError):
    """A gate or regression check failed (exit 3)."""

    exit_code = EXIT_GATE


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name): for one-line error messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
