"""The building blocks of the HTML report: embedded figures, tables, sections, and reading result files."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any


def img(path: Path, alt: str) -> str:
    """An ``<img>`` with the PNG at ``path`` embedded as a data URI."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img class="fig" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table (cells escaped; floats to 4 significant digits)."""
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def fmt(v: Any) -> str:
    """A table cell's text."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def section(title: str, caption: str, body: str) -> str:
    """A report section: heading, caption and body (HTML)."""
    return f'<section><h2>{html.escape(title)}</h2><p class="cap">{html.escape(caption)}</p>{body}</section>'


def load_json(path: Path) -> Any | None:
    """The JSON file at ``path``, or ``None`` when there is none."""
    return json.loads(path.read_text()) if path.exists() else None
