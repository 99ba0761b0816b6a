"""Documents built from blocks (heading, paragraph, list, table, image) that render themselves
to Markdown and to self-contained HTML, and the cell formatting they share.

A library module (CONVENTIONS 11): the `report` stage and the `compare` entry point both build
their documents here, so the two render alike and neither imports the other. No Markdown library:
the blocks emit the little inline Markdown they use (`code`, **bold**, [text](url)) and convert
it to escaped HTML themselves. Images are linked by relative path in Markdown and inlined as
base64 PNGs in HTML, so an HTML file can be mailed on its own. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.statistics import wilson

DASH = "—"  # an empty cell: the value was not recorded


# --- document blocks: each renders to Markdown (relative to the document's folder) and HTML ----


_INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|\[([^\]]+)\]\(([^)\s]+)\)")


def inline_html(text: str) -> str:
    """The inline Markdown this module emits (`code`, **bold**, [text](url)) as escaped HTML."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        code, bold, label, url = m.groups()
        if code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        elif bold is not None:
            out.append(f"<strong>{inline_html(bold)}</strong>")  # may hold `code`
        else:
            out.append(f'<a href="{html.escape(url)}">{html.escape(label)}</a>')
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def md_cell(text: str) -> str:
    """Plain text made safe for one Markdown table cell.

    GFM splits a row on every `|` not escaped by a backslash, and reads `\\\\` as one escaped
    backslash, so backslashes are doubled first, then pipes escaped; a newline would end the row.
    """
    text = " ".join(str(text).split())
    return text.replace("\\", "\\\\").replace("|", "\\|")


@dataclass
class Heading:
    level: int
    text: str

    def md(self, base: Path) -> str:
        return f"{'#' * self.level} {self.text}"

    def html(self) -> str:
        return f"<h{self.level}>{inline_html(self.text)}</h{self.level}>"


@dataclass
class Para:
    text: str  # inline Markdown

    def md(self, base: Path) -> str:
        return self.text

    def html(self) -> str:
        return f"<p>{inline_html(self.text)}</p>"


@dataclass
class Bullets:
    items: list[str]  # inline Markdown

    def md(self, base: Path) -> str:
        return "\n".join(f"- {item}" for item in self.items)

    def html(self) -> str:
        return "<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in self.items) + "</ul>"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]  # plain text cells, escaped by the renderer
    numeric: set[int] = field(default_factory=set)  # right-aligned column indices
    row_class: list[str] = field(default_factory=list)  # per row, e.g. the status (HTML only)

    def md(self, base: Path) -> str:
        def line(cells: list[str]) -> str:
            return "| " + " | ".join(cells) + " |"

        align = ["---:" if i in self.numeric else "---" for i in range(len(self.header))]
        return "\n".join([line([md_cell(c) for c in self.header]), line(align),
                          *(line([md_cell(c) for c in row]) for row in self.rows)])

    def html(self) -> str:
        def cells(row: list[str], tag: str) -> str:
            return "".join(f'<{tag}{" class=num" if i in self.numeric else ""}>'
                           f"{html.escape(str(c))}</{tag}>" for i, c in enumerate(row))

        classes = self.row_class or [""] * len(self.rows)
        body = "".join(f'<tr class="{html.escape(k)}">{cells(r, "td")}</tr>' if k
                       else f"<tr>{cells(r, 'td')}</tr>" for r, k in zip(self.rows, classes,
                                                                          strict=True))
        return (f"<table><thead><tr>{cells(self.header, 'th')}</tr></thead>"
                f"<tbody>{body}</tbody></table>")


@dataclass
class Image:
    file: Path
    alt: str

    def md(self, base: Path) -> str:
        return f"![{self.alt}]({Path(os.path.relpath(self.file, base)).as_posix()})"

    def html(self) -> str:
        data = base64.b64encode(self.file.read_bytes()).decode("ascii")
        return (f'<figure><img alt="{html.escape(self.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(self.alt)}</figcaption></figure>")


Block = Heading | Para | Bullets | Table | Image

CSS = """
body { font: 15px/1.5 system-ui, sans-serif; color: #222; max-width: 72rem; margin: 2rem auto;
       padding: 0 1rem; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fdecec; } tr.skipped td { background: #f6f6f6; color: #666; }
tr.verdict-fail td { background: #fdecec; } tr.verdict-undecided td { background: #fff8e1; }
code { background: #f3f3f3; padding: 0 .2rem; border-radius: 3px; }
figure { margin: 1rem 0; } img { max-width: 100%; } figcaption { color: #666; font-size: 13px; }
"""


def render_markdown(blocks: list[Block], base: Path) -> str:
    return "\n\n".join(b.md(base) for b in blocks) + "\n"


def render_html(blocks: list[Block], title: str) -> str:
    body = "\n".join(b.html() for b in blocks)
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
            f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


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


def accuracy(top1: Any, low: Any = None, high: Any = None, n: Any = None) -> str:
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
