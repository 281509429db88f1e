"""A self-contained HTML report of results (plotly.js inlined once: it opens offline). Every result
contributes what its protocol gives — summary, figures, the top of its head table, provenance — so the
CLI, the studies and the dashboard show the same thing."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from ..base.files import write_text

_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse;font-size:13px}"
          "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left} pre{white-space:pre-wrap}")  # fmt: skip


def result_sections(result, *, rows: int = 15) -> list[tuple[str, object]]:
    """A result as report sections: its summary, every figure, the top of its head/expert table, provenance."""
    name = type(result).__name__
    sections: list[tuple[str, object]] = [(f"{name}: summary", result.summary())]
    sections += [(f"{name}: {kind}", build()) for kind, build in result.figures().items()]
    table = result.heads() if hasattr(result, "heads") else result.to_frame()
    sections.append((f"{name}: top {rows} rows", table.head(rows)))
    sections.append((f"{name}: provenance", result.provenance))
    return sections


def write_html(path: str | Path, title: str, items: list) -> Path:
    """One HTML file from results and (heading, plotly figure | DataFrame | text) sections, in order.
    Every text is escaped: page content comes from models and files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sections = [s for it in items for s in (result_sections(it) if hasattr(it, "figures") else [it])]
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]  # fmt: skip
    first = True
    for heading, obj in sections:
        parts.append(f"<h2>{html.escape(str(heading))}</h2>")
        if hasattr(obj, "to_html") and hasattr(obj, "layout"):  # plotly figure
            parts.append(obj.to_html(full_html=False, include_plotlyjs=True if first else False))
            first = False
        elif isinstance(obj, pd.DataFrame):
            parts.append(obj.to_html(index=False, float_format=lambda x: f"{x:.3f}", escape=True, border=0))
        else:
            parts.append(f"<pre>{html.escape(str(obj))}</pre>")
    parts.append("</body></html>")
    return write_text(path, "\n".join(parts))  # atomic; a symlink at ``path`` is replaced, never written through
