"""mlopt's exceptions. Each carries the process exit code the CLI turns it into.

Exit codes (documented in the README and relied on by CI users):
0 success, 1 runtime failure, 2 invalid input/usage/config, 3 a gate or regression check failed.
"""

from __future__ import annotations

import re

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
    text = without_colours(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def without_colours(text: str) -> str:
    """`text` without terminal colour codes (libraries colour their messages for a terminal: torch.onnx does)."""
    return _ANSI.sub("", text)


def format_shape(shape: tuple[int | None, ...] | list[int | None]) -> str:
    """A shape as messages spell it: 1x3x224x224 (an unknown dimension is ?)."""
    return "x".join("?" if d is None else str(d) for d in shape)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


#: Why a write failed, for the errors that are about the place written to, not about mlopt.
_STORAGE_REASONS = {
    "ENOSPC": "no space left on the device",
    "EDQUOT": "disk quota exceeded",
    "EROFS": "the file system is read-only",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EFBIG": "the file is larger than the file system or a limit allows",
}


def storage_error(exc: BaseException, path: object = None) -> InputError | None:
    """A write that failed for lack of space, quota or permission, as one line naming the path (exit 2).

    Looks through the exceptions that caused `exc` too (exporters wrap the OSError they hit).
    None when no such OSError is involved.
    """
    import errno

    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            name = errno.errorcode.get(current.errno, "")
            if name in _STORAGE_REASONS:
                verb = "access" if name in ("EACCES", "EPERM") else "write"  # the two a read can meet too
                where = current.filename or path or "the output"
                return InputError(f"cannot {verb} {where}: {_STORAGE_REASONS[name]}")
        current = current.__cause__ or current.__context__
    return None


def pickled_objects_error(what: str, exc: BaseException) -> InputError:
    """torch.load(weights_only=True) refused a pickle: say so, without its advice to turn the check off."""
    named = re.search(r"GLOBAL ([\w.]+)", str(exc))
    names = f", naming {named.group(1)}" if named else ""
    return InputError(
        f"cannot read {what}: they hold pickled Python objects{names}, not only tensors; mlopt reads plain "
        "state dicts (torch.load with weights_only=True) and never runs code from a weights file"
    )


def refused_pickle(exc: BaseException) -> bool:
    """torch.load(weights_only=True) found objects it does not load (not merely a damaged file)."""
    import pickle

    return isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc) and "GLOBAL" in str(exc)
