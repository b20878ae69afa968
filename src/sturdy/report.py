"""HTML reports: sections of text, tables and PNG figures (matplotlib).

Each part adds its own section; figures are written as PNG files next to the HTML page and
embedded in it (base64), so the page is self-contained and the PNGs stay usable on their own.
Figures are plain :class:`matplotlib.figure.Figure` objects (:func:`new_figure`), rendered with the
Agg canvas: importing this module never changes matplotlib's global backend (a notebook keeps its
own). Every file is written atomically, the HTML page last.

Example:
    >>> import tempfile, pathlib
    >>> report = Report("example")
    >>> sec = report.section("Numbers")
    >>> sec.table(header=["a", "b"], rows=[[1, 2.5]])
    >>> path = report.write(pathlib.Path(tempfile.mkdtemp()) / "report.html")
    >>> path.name
    'report.html'
"""

from __future__ import annotations

import base64
import html
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sturdy.errors import ConfigurationError
from sturdy.utils import atomic_write_bytes

__all__ = ["Report", "Section", "format_value", "new_figure", "plot_training_curves"]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
color:#222;padding:0 1em}h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:1em}
figcaption{font-size:90%;color:#555;max-width:520px}img{max-width:100%}p.note{color:#555}
"""


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> Tuple[Figure, Any]:
    """A figure and its axes (as ``Figure.subplots``) outside pyplot's global state; ``kwargs`` go to
    :class:`~matplotlib.figure.Figure` (e.g. ``figsize``), ``subplot_kw``/``squeeze`` to ``subplots``."""
    sub = {k: kwargs.pop(k) for k in ("subplot_kw", "squeeze", "sharex", "sharey") if k in kwargs}
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **sub)


def format_value(value: Any) -> str:
    """Human-readable cell text: floats with 4 significant digits, ``None`` as an en dash."""
    if value is None:
        return "\u2013"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class Section:
    """A titled block of the report. Items are rendered in the order they were added."""

    title: str
    items: List[Tuple[str, Any]] = field(default_factory=list)

    def text(self, text: str) -> None:
        """A paragraph of plain text (escaped)."""
        self.items.append(("text", text))

    def table(self, *, header: Sequence[Any], rows: Sequence[Sequence[Any]], caption: str = "") -> None:
        """A table; every row must have as many cells as the header."""
        for row in rows:
            if len(row) != len(header):
                raise ConfigurationError(f"table row {list(row)!r} has {len(row)} cells, header has {len(header)}")
        self.items.append(("table", (list(header), [list(r) for r in rows], caption)))

    def figure(self, fig: Figure, *, name: str, caption: str = "") -> None:
        """A matplotlib figure, saved as ``name`` (a .png file name) when the report is written."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+\.png", name):
            raise ConfigurationError(f"figure name must be a plain file name ending in .png, got {name!r}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        if "matplotlib.pyplot" in sys.modules:  # a figure made through pyplot: release it there
            sys.modules["matplotlib.pyplot"].close(fig)
        self.items.append(("figure", (name, buf.getvalue(), caption)))


    def png(self, path: str | Path, *, caption: str = "") -> None:
        """A PNG file already written (by the command the report describes), embedded under its own name."""
        path = Path(path)
        self.items.append(("figure", (path.name, path.read_bytes(), caption)))


class Report:
    """An HTML report made of sections."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.sections: List[Section] = []

    def section(self, title: str) -> Section:
        """Append and return a new section."""
        sec = Section(title)
        self.sections.append(sec)
        return sec

    def write(self, path: str | Path) -> Path:
        """Write the HTML page to ``path`` and every figure as a PNG beside it; returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"]
        for sec in self.sections:
            parts.append(f"<h2>{html.escape(sec.title)}</h2>")
            for kind, payload in sec.items:
                parts.append(self._render(kind, payload, path.parent))
        parts.append("</body></html>")
        return atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))

    @staticmethod
    def _render(kind: str, payload: Any, folder: Path) -> str:
        if kind == "text":
            return f"<p>{html.escape(payload)}</p>"
        if kind == "table":
            header, rows, caption = payload
            head = "".join(f"<th>{html.escape(format_value(h))}</th>" for h in header)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(format_value(c))}</td>" for c in row) + "</tr>" for row in rows
            )
            cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
            return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        name, png, caption = payload
        atomic_write_bytes(folder / name, png)
        data = base64.b64encode(png).decode("ascii")
        return (f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def plot_training_curves(histories: dict, *, title: Optional[str] = None) -> Figure:
    """Loss and accuracy per epoch for one or several runs.

    Args:
        histories: run label -> list of per-epoch dicts with ``epoch``, ``train_loss``,
            ``train_accuracy``, ``test_loss``, ``test_accuracy`` (as in ``results.json``).
    """
    fig, (ax_loss, ax_acc) = new_figure(1, 2, figsize=(10, 3.6))
    for label, history in histories.items():
        epochs = [h["epoch"] for h in history]
        line = ax_loss.plot(epochs, [h["train_loss"] for h in history], label=f"{label} train")[0]
        ax_acc.plot(epochs, [h["train_accuracy"] for h in history], color=line.get_color(), label=f"{label} train")
        if history and history[0].get("test_accuracy") is not None:
            ax_loss.plot(epochs, [h["test_loss"] for h in history], "--", color=line.get_color(), label=f"{label} test")
            ax_acc.plot(epochs, [h["test_accuracy"] for h in history], "--", color=line.get_color(),
                        label=f"{label} test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy (mean)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy")
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
