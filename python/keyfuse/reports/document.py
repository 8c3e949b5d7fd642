"""The report document: sections of blocks, rendered to one self-contained HTML page."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from keyfuse.errors import InvalidArgumentError, KeyfuseIOError

# ------------------------------------------------------------------------ the document


@dataclass
class _Figure:
    png: bytes
    caption: str
    alt: str
    width: int
    height: int


@dataclass
class _Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str | None


@dataclass
class _Metrics:
    items: list[tuple[str, str]]
    caption: str | None


@dataclass
class _Text:
    text: str
    kind: str  # "p" or "note"


Block = _Figure | _Table | _Metrics | _Text


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, n = base, 2
    while slug in taken:
        slug, n = f"{base}-{n}", n + 1
    taken.add(slug)
    return slug


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not np.isfinite(v):
            return "–"
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(value)


@dataclass
class Section:
    """One section of a report: a title, an optional introduction and blocks."""

    title: str
    intro: str = ""
    blocks: list[Block] = field(default_factory=list)

    def figure(self, fig: Any, caption: str = "", alt: str | None = None) -> Section:
        """Add a matplotlib figure (embedded as PNG); closes nothing, keeps no reference."""
        from keyfuse.plotting import figure_to_bytes

        png = figure_to_bytes(fig)
        w, h = struct.unpack(">II", png[16:24])  # the IHDR chunk's width and height
        self.blocks.append(_Figure(png, caption, alt or caption or self.title, w, h))
        return self

    def table(
        self, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None
    ) -> Section:
        """Add a table (values formatted: floats to 3 decimals)."""
        cols = [str(c) for c in columns]
        body = [list(r) for r in rows]
        if any(len(r) != len(cols) for r in body):
            raise InvalidArgumentError("every table row needs one value per column")
        self.blocks.append(_Table(cols, body, caption))
        return self

    def metrics(self, values: Mapping[str, Any], caption: str | None = None) -> Section:
        """Add key figures (``name → value``) shown as a compact grid."""
        self.blocks.append(_Metrics([(str(k), _fmt(v)) for k, v in values.items()], caption))
        return self

    def text(self, text: str) -> Section:
        """Add a paragraph (plain text, escaped)."""
        self.blocks.append(_Text(text, "p"))
        return self

    def note(self, text: str) -> Section:
        """Add a highlighted note (e.g. why a part could not be drawn)."""
        self.blocks.append(_Text(text, "note"))
        return self


_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: #1d2330; background: #f4f5f7; }
header { background: #1d2330; color: #fff; padding: 20px 32px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 0; color: #c9cfdb; font-size: 14px; }
nav { padding: 10px 32px; background: #fff; border-bottom: 1px solid #dde1e8;
  font-size: 15px; }
nav a { margin-right: 18px; color: #2557c7; text-decoration: none; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 24px 40px; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px;
  margin: 20px 0; padding: 16px 24px; }
h2 { font-size: 21px; margin: 4px 0 8px; }
.intro { color: #4a5263; margin-top: 0; }
figure { margin: 14px 0; }
figure img { display: block; max-width: 100%; height: auto; border-radius: 3px; }
figcaption { font-size: 14px; color: #4a5263; margin-top: 6px; }
table { border-collapse: collapse; margin: 10px 0; font-size: 15px; }
caption { text-align: left; font-size: 14px; color: #4a5263; padding-bottom: 4px; }
th, td { padding: 4px 12px; border-bottom: 1px solid #e6e9ee; text-align: left; }
th { background: #f0f2f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.metrics { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr));
  gap: 8px 18px; margin: 10px 0; }
.metric { border-left: 3px solid #2557c7; padding: 2px 10px; }
.metric .k { font-size: 14px; color: #4a5263; }
.metric .v { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
.note { background: #fff7e0; border-left: 3px solid #e0a800; padding: 8px 12px; }
footer { max-width: 1180px; margin: 0 auto; padding: 0 24px 30px; font-size: 13px;
  color: #6b7385; }
"""


class Report:
    """An HTML report: ``title``, a subtitle line and sections, rendered by :meth:`html`.

    >>> rep = Report("sub-01")
    >>> rep.section("Keypoints").figure(fig, "keypoints over orthogonal slices")
    >>> rep.write("sub-01.html")
    """

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self.sections: list[Section] = []

    def section(self, title: str, intro: str = "") -> Section:
        """Append a new section and return it."""
        sec = Section(title, intro)
        self.sections.append(sec)
        return sec

    def extend(self, other: Report) -> Report:
        """Append the sections of another report (e.g. to combine reports on one page)."""
        self.sections.extend(other.sections)
        return self

    def html(self) -> str:
        """The page as one HTML string (images as base64 ``data:`` URIs, inline CSS)."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("keyfuse")
        except PackageNotFoundError:
            ver = "dev"
        e = html.escape
        taken: set[str] = set()
        ids = [_slug(s.title, taken) for s in self.sections]
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{e(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<header><h1>{e(self.title)}</h1><p>{e(self.subtitle)}</p></header>",
        ]
        if len(self.sections) > 1:
            links = "".join(
                f'<a href="#{i}">{e(s.title)}</a>' for i, s in zip(ids, self.sections, strict=True)
            )
            out.append(f"<nav>{links}</nav>")
        out.append("<main>")
        for sid, sec in zip(ids, self.sections, strict=True):
            out.append(f'<section id="{sid}"><h2>{e(sec.title)}</h2>')
            if sec.intro:
                out.append(f'<p class="intro">{e(sec.intro)}</p>')
            out.extend(_render(b) for b in sec.blocks)
            out.append("</section>")
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        out.append(
            f"</main><footer>keyfuse {e(ver)} · {stamp} · a self-contained page: every image "
            "is embedded, nothing is loaded from the network.</footer></body></html>"
        )
        return "\n".join(out)

    def write(self, path: str | PathLike[str]) -> Path:
        """Write the page to ``path`` (atomically); returns the path."""
        from keyfuse._io import atomic_path

        out = Path(path)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out) as tmp:
                Path(tmp).write_text(self.html(), encoding="utf-8")
        except OSError as exc:
            raise KeyfuseIOError(f"cannot write report to {out}: {exc}") from exc
        return out


def _render(block: Block) -> str:
    e = html.escape
    if isinstance(block, _Figure):
        uri = "data:image/png;base64," + base64.b64encode(block.png).decode("ascii")
        cap = f"<figcaption>{e(block.caption)}</figcaption>" if block.caption else ""
        return (
            f'<figure><img src="{uri}" alt="{e(block.alt)}" width="{block.width}" '
            f'height="{block.height}">{cap}</figure>'
        )
    if isinstance(block, _Table):
        head = "".join(f"<th>{e(c)}</th>" for c in block.columns)
        rows = "".join(
            "<tr>"
            + "".join(
                f'<td class="num">{e(_fmt(v))}</td>'
                if isinstance(v, (int, float, np.number))
                else f"<td>{e(_fmt(v))}</td>"
                for v in r
            )
            + "</tr>"
            for r in block.rows
        )
        cap = f"<caption>{e(block.caption)}</caption>" if block.caption else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if isinstance(block, _Metrics):
        cells = "".join(
            f'<div class="metric"><div class="k">{e(k)}</div><div class="v">{e(v)}</div></div>'
            for k, v in block.items
        )
        cap = f'<p class="intro">{e(block.caption)}</p>' if block.caption else ""
        return f'{cap}<div class="metrics">{cells}</div>'
    cls = ' class="note"' if block.kind == "note" else ""
    return f"<p{cls}>{e(block.text)}</p>"
