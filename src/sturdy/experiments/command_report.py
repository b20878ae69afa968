"""``<command>_report.html`` beside every command's results: its figures, its figures of merit and what the
results were made from, readable without a server (the report module of the demo; docs/design.md, "Your own
model and data"). Each command's page has its own name, so commands sharing a folder never replace each
other's pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from sturdy.report import Report

__all__ = ["write_command_report", "REPORT_NAMES"]

REPORT_NAMES: Mapping[str, str] = {
    "train": "train_report.html",
    "lipschitz certify": "certify_report.html",
    "fourier heatmap": "heatmap_report.html",
    "fourier attack": "attack_report.html",
    "flatness measure": "measures_report.html",
}


def _rows(summary: Mapping[str, Any], prefix: str = "") -> List[Tuple[str, Any]]:
    """The numbers and short strings of ``summary`` (one level of nested dicts flattened)."""
    rows: List[Tuple[str, Any]] = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= 120):
            rows.append((name, value))
        elif isinstance(value, dict) and not prefix:
            rows += _rows(value, prefix=f"{name} ")
    return rows


def write_command_report(out: str | Path, command: str, *, title: str, summary: Mapping[str, Any],
                         figures: Sequence[str | Path] = (),
                         tables: Optional[Mapping[str, Tuple[List[str], List[List[Any]]]]] = None) -> Path:
    """Write ``out/<command>_report.html`` (:data:`REPORT_NAMES`) and return its path."""
    report = Report(title)
    if figures:
        sec = report.section("Figures")
        for fig in figures:
            if Path(fig).is_file():
                sec.png(fig)
    results = report.section("Results")
    results.table(header=["quantity", "value"], rows=[list(r) for r in _rows(summary)])
    for caption, (header, rows) in (tables or {}).items():
        results.table(header=header, rows=rows, caption=caption)
    sources: Dict[str, Any] = dict(summary.get("sources") or {})
    if sources:
        made = report.section("Made from")
        for part, record in sources.items():
            if isinstance(record, dict):
                made.table(header=[part, ""], rows=[[k, v] for k, v in _rows(record)])
    return report.write(Path(out) / REPORT_NAMES[command])
