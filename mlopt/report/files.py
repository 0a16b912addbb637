"""Writing a report: report.json (the record), report.md and, for whole runs, report.html (renderings of it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlopt.core.fsutil import atomic_write_json, atomic_write_text
from mlopt.report.html import render_html
from mlopt.report.markdown import render_markdown
from mlopt.report.schema import parse


def write_reports(out_dir: Path, report: dict[str, Any]) -> list[str]:
    """report.json (checked against the report schema first), its Markdown rendering, and (for whole
    runs) the HTML page with plots; returns the names written."""
    typed = parse(report)
    atomic_write_json(Path(out_dir) / "report.json", report)
    atomic_write_text(Path(out_dir) / "report.md", render_markdown(typed))
    if report["kind"] != "run":
        return ["report.json", "report.md"]
    atomic_write_text(Path(out_dir) / "report.html", render_html(typed))
    return ["report.json", "report.md", "report.html"]
