"""English prose for decoder tests and benchmarks, made offline from the Python standard library's docstrings.

Every CPython ships these docstrings, so a fresh machine builds the same kind of text without a
download; the exact lines vary a little between Python versions, so callers compare ratios.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

# Standard-library modules whose docstrings are mostly prose (pure-Python modules document themselves).
MODULES = (
    "argparse", "ast", "asyncio.events", "calendar", "collections", "configparser", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "fractions", "ftplib", "functools", "gettext", "heapq",
    "http.client", "http.cookiejar", "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox",
    "multiprocessing.pool", "optparse", "pathlib", "pickle", "pydoc", "random", "shutil", "smtplib",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest.case", "urllib.parse", "urllib.request", "uuid", "zipfile",
)

_WORD = re.compile(r"[A-Za-z][a-z]*")


def _docstrings(module_name: str):
    with warnings.catch_warnings():  # some modules warn on import or on deprecated attributes
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
        return list(_docstrings_of(module))


def _docstrings_of(module):
    yield inspect.getdoc(module) or ""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_") and callable(member):
                    yield inspect.getdoc(member) or ""


def _prose(paragraph: str) -> str | None:
    """A paragraph as one line when it reads as English sentences (not code, a table or a signature)."""
    if paragraph.startswith((" ", ">>>")):
        return None
    text = " ".join(paragraph.split())
    words = text.split()
    if len(words) < 8 or not text[0].isupper() or not text.endswith("."):
        return None
    wordlike = sum(bool(_WORD.fullmatch(w.strip(".,;:()'\""))) for w in words)
    return text if wordlike >= 0.8 * len(words) else None


def english_lines() -> list[str]:
    """About 1,400 paragraphs (190k characters) of English prose, one a line, in a fixed order.

    Read in a fresh, isolated interpreter: a library imported into the caller's process can replace a standard
    module's function with one of its own (and its own docstring), which moved one line and so every held-out
    fifth after it, and with them the perplexity windows, between runs of one benchmark."""
    global _CACHED
    if _CACHED is None:
        import json
        import subprocess
        import sys

        done = subprocess.run([sys.executable, "-I", __file__], capture_output=True, text=True, check=True)
        _CACHED = json.loads(done.stdout)
    return list(_CACHED)


_CACHED: list[str] | None = None


def _english_lines_here() -> list[str]:
    """english_lines() of this process, as its imports leave the standard library."""
    lines, seen = [], set()
    for module_name in MODULES:
        try:
            docs = _docstrings(module_name)
        except ImportError:  # a module a later Python drops costs a few lines, nothing more
            continue
        for doc in docs:
            for paragraph in re.split(r"\n\s*\n", doc):
                line = _prose(paragraph)
                if line and line not in seen:
                    seen.add(line)
                    lines.append(line)
    return lines


def more_english_lines(limit: int | None = None) -> list[str]:
    """english_lines() followed by the prose paragraphs of every other docstring in the standard library's
    source (read with `ast`, nothing imported; test packages and site-packages left out), in a fixed order:
    about 5,000 lines more (6,500 in all on CPython 3.11), for training on text (distillation), where
    english_lines() is too little."""
    import ast
    import sysconfig
    from pathlib import Path

    lines = english_lines()
    seen = set(lines)
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for paragraph in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                line = _prose(paragraph)
                if line and line not in seen:
                    seen.add(line)
                    lines.append(line)
                    if limit is not None and len(lines) >= limit:
                        return lines
    return lines


if __name__ == "__main__":  # english_lines() runs this in a fresh interpreter
    import json

    print(json.dumps(_english_lines_here()))
