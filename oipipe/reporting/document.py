"""Documents built from blocks (heading, paragraph, list, table, image), rendered to Markdown and
to self-contained HTML by one Jinja2 template each (`templates/` here), and the cell formatting
they share.

A library module (CONVENTIONS 11): the `report` stage and the `compare` entry point both build
their documents here, so the two render alike and neither imports the other. Headings, paragraphs
and list items hold the little inline Markdown the stages write (`code`, **bold**,
[text](https://...)), which `inline_html` turns into HTML; table cells and captions are plain
text. The HTML template escapes every value (autoescape); the Markdown one escapes table cells so
that a `|` in a class name or an error keeps its row. Images are linked by relative path in
Markdown and inlined as base64 PNGs in HTML, so an HTML file can be mailed on its own. Nothing here
imports torch.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import jinja2
from markupsafe import Markup, escape

from oipipe.measure.intervals import wilson

DASH = "—"  # an empty cell: the value was not recorded


# --- document blocks: data only; the templates say how each kind looks ------------------------


@dataclass
class Heading:
    kind: ClassVar[str] = "heading"
    level: int
    text: str  # inline Markdown


@dataclass
class Para:
    kind: ClassVar[str] = "para"
    text: str  # inline Markdown


@dataclass
class Bullets:
    kind: ClassVar[str] = "bullets"
    items: list[str]  # inline Markdown


@dataclass
class Table:
    kind: ClassVar[str] = "table"
    header: list[str]
    rows: list[list[str]]  # plain text cells, escaped by the renderer
    numeric: set[int] = field(default_factory=set)  # right-aligned column indices
    row_class: list[str] = field(default_factory=list)  # per row, e.g. the status (HTML only)


@dataclass
class Image:
    kind: ClassVar[str] = "image"
    file: Path
    alt: str


Block = Heading | Para | Bullets | Table | Image


# --- rendering ---------------------------------------------------------------------------------


_INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|\[([^\]]+)\]\((https?://[^)\s]+)\)")


def inline_html(text: str) -> Markup:
    """The inline Markdown this module's users write (`code`, **bold**, [text](https://...)) as
    HTML, everything else escaped."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(escape(text[pos : m.start()]))
        code, bold, label, url = m.groups()
        if code is not None:
            out.append(Markup("<code>%s</code>") % code)
        elif bold is not None:
            out.append(Markup("<strong>%s</strong>") % inline_html(bold))  # may hold `code`
        else:
            out.append(Markup('<a href="%s">%s</a>') % (url, label))
        pos = m.end()
    out.append(escape(text[pos:]))
    return Markup("").join(out)


_HTML_START = re.compile(r"<(?=[A-Za-z/!?])")  # where raw HTML would begin


def md_cell(text: Any) -> str:
    """Plain text made safe for one Markdown table cell.

    GFM splits a row on every `|` not escaped by a backslash, and reads `\\\\` as one escaped
    backslash, so backslashes are doubled first, then pipes escaped; a newline would end the row,
    and `<` before a letter, `/`, `!` or `?` opens raw HTML (a class named `<script>` would vanish
    from the rendered page), so it is escaped too; `<0.001` stays as it is.
    """
    text = " ".join(str(text).split())
    return _HTML_START.sub(r"\\<", text.replace("\\", "\\\\").replace("|", "\\|"))


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("oipipe.reporting"),
    autoescape=jinja2.select_autoescape(["html.j2"], default=False),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_TEMPLATES.filters.update(
    inline=inline_html,
    md_cell=md_cell,
    relpath=lambda file, base: Path(os.path.relpath(file, base)).as_posix(),
    base64=lambda file: base64.b64encode(file.read_bytes()).decode("ascii"),
)


def render_markdown(blocks: list[Block], base: Path) -> str:
    """Markdown; images linked relative to `base`, the folder the document is written to."""
    return _TEMPLATES.get_template("document.md.j2").render(blocks=blocks, base=base)


def render_html(blocks: list[Block], title: str) -> str:
    return _TEMPLATES.get_template("document.html.j2").render(blocks=blocks, title=title)


# --- cell formatting ---------------------------------------------------------------------------


def num(v: Any, digits: int | None = None, suffix: str = "") -> str:
    """A number for a table cell: fixed `digits` when given, else 4 significant digits."""
    if v is None or v == "":
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v}{suffix}"
    if isinstance(v, float):
        if digits is not None:
            return f"{v:.{digits}f}{suffix}"
        return f"{v:.0f}{suffix}" if abs(v) >= 1e4 else f"{v:.4g}{suffix}"
    return str(v)


def accuracy_text(top1: Any, low: Any = None, high: Any = None, n: Any = None) -> str:
    """An accuracy in percent with its 95% interval and number of images:
    `94.4% [81.9, 98.5], n=36`. The stages record the interval; where a record has the count
    but not the interval (a file from before intervals), the Wilson interval is computed from
    them, the same one the stages use."""
    if top1 is None:
        return DASH
    text = f"{float(top1):.1f}%"
    if (low is None or high is None) and isinstance(n, int) and n > 0:
        correct = min(n, max(0, round(float(top1) * n / 100)))
        low, high = (100 * x for x in wilson(correct, n))
    if low is not None and high is not None:
        text += f" [{float(low):.1f}, {float(high):.1f}]"
    return text + (f", n={n}" if n is not None else "")
