"""The one place that writes to the terminal.

Passes never print: they call these helpers. Human-facing output (messages, progress bars,
tables) goes to stderr so that `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


@contextlib.contextmanager
def quieted(quiet: bool = True) -> Iterator[None]:
    """Temporarily silence (or, with quiet=False, un-silence) messages and progress bars."""
    global _quiet
    was, _quiet = _quiet, quiet
    try:
        yield
    finally:
        _quiet = was


@contextlib.contextmanager
def muted_loggers(*names: str) -> Iterator[None]:
    """Show only errors of these libraries' loggers ("" is the root logger) for a while."""
    import logging

    levels = {lg: lg.level for lg in (logging.getLogger(name or None) for name in names)}
    for lg in levels:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in levels.items():
            lg.setLevel(level)


def _stderr():
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    # Logs and CI job output: wide enough that tables are not truncated.
    return console if console.is_terminal else Console(stderr=True, highlight=False, width=160)


def info(message: str) -> None:
    if not _quiet:
        _stderr().print(message, soft_wrap=True)


def warn(message: str) -> None:
    """Warnings are shown even with --quiet: they say something the user must know."""
    _stderr().print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


def error(message: str) -> None:
    from rich.markup import escape

    _stderr().print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


def table(rich_table: Any) -> None:
    if not _quiet:
        _stderr().print(rich_table)


def emit_json(data: Any) -> None:
    """Print data as JSON on stdout (always, even with --quiet: it was asked for)."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


class _NullProgress:
    def advance(self, n: int = 1, **fields: Any) -> None:
        pass


class _RichProgress:
    def __init__(self, progress: Any, task: Any):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields: Any) -> None:
        status = "  ".join(f"{k} {v}" for k, v in fields.items())
        self._progress.update(self._task, advance=n, status=status)


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[_NullProgress | _RichProgress]:
    """A progress bar on stderr; a no-op with --quiet."""
    if _quiet:
        yield _NullProgress()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), console=_stderr(), transient=False) as bar:
        task = bar.add_task(description, total=total, status="")
        yield _RichProgress(bar, task)
