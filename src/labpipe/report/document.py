"""A report as blocks under the five headings seed 004 asked for, and its two forms.

    report.md     the text, each figure linked as <name>.png and each table and figure's data as <name>.csv,
                  all beside it
    report.html   the same, self-contained: every figure embedded as a base64 data: URI, no other resource

A figure's CSV holds what it draws, as drawn (long form: one row per point), so its numbers can be read back.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
from pathlib import Path

import pandas as pd

from labpipe.plotting import save_figure

SECTIONS = ("Summary", "Setup", "Results", "Observations", "How to reproduce")


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str  # <name>.png beside the report (saved by `figure`), its data in <name>.csv
    caption: str
    data: pd.DataFrame


@dataclasses.dataclass(frozen=True)
class Table:
    name: str  # <name>.csv
    caption: str
    frame: pd.DataFrame


@dataclasses.dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclasses.dataclass(frozen=True)
class Code:
    lines: list[str]


Block = str | Figure | Table | Bullets | Code  # a str is a paragraph


@dataclasses.dataclass(frozen=True)
class Findings:
    """What a line's builder finds: the summary's sentences, the results' blocks, the observations."""

    headline: list[str]
    results: list[Block]
    observations: list[str]


@dataclasses.dataclass(frozen=True)
class Report:
    title: str
    sections: dict[str, list[Block]]  # by SECTIONS


def figure(out: Path, name: str, caption: str, data: pd.DataFrame, drawn) -> Figure:
    """Save the matplotlib figure `drawn` as out/<name>.png (checked by labpipe.plotting) and describe it."""
    save_figure(drawn, out / f"{name}.png")
    return Figure(name, caption, data)


def write(report: Report, out: Path) -> None:
    """report.md, report.html and every block's CSV in `out`, where the figures' PNGs already are."""
    blocks = [block for section in report.sections.values() for block in section]
    for block in blocks:
        if isinstance(block, Figure | Table):
            frame = block.data if isinstance(block, Figure) else block.frame
            frame.to_csv(out / f"{block.name}.csv", index=False)
    (out / "report.md").write_text(markdown(report))
    (out / "report.html").write_text(page(report, out))


def cell(value) -> str:
    """A table cell: 4 significant digits for floats, blank for missing."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- Markdown


def markdown(report: Report) -> str:
    lines = [f"# {report.title}", ""]
    for heading in SECTIONS:
        lines += [f"## {heading}", ""]
        for block in report.sections[heading]:
            lines += md_block(block) + [""]
    return "\n".join(lines)


def md_block(block: Block) -> list[str]:
    if isinstance(block, str):
        return [block]
    if isinstance(block, Bullets):
        return [f"- {item}" for item in block.items]
    if isinstance(block, Code):
        return ["```bash", *block.lines, "```"]
    if isinstance(block, Figure):
        return [f"![{block.caption}]({block.name}.png)", "", f"*{block.caption}* ([data]({block.name}.csv))"]
    header = [str(c) for c in block.frame.columns]
    rows = [[cell(v).replace("|", "\\|") for v in row] for row in block.frame.itertuples(index=False)]
    return [f"*{block.caption}* ([csv]({block.name}.csv))", "", "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows)]


# ----------------------------------------------------------------------------- HTML

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f2f2f2}caption{text-align:left;font-style:italic;padding:4px 0}img{max-width:100%}
figure{margin:1em 0}figcaption{font-style:italic}pre{background:#f6f6f6;padding:0.6em;overflow-x:auto}"""


def page(report: Report, out: Path) -> str:
    body = [f"<h1>{html.escape(report.title)}</h1>"]
    for heading in SECTIONS:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body += [html_block(block, out) for block in report.sections[heading]]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(report.title)}'
            f"</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def html_block(block: Block, out: Path) -> str:
    if isinstance(block, str):
        return f"<p>{html.escape(block)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Code):
        return "<pre><code>" + html.escape("\n".join(block.lines)) + "</code></pre>"
    if isinstance(block, Figure):
        encoded = base64.b64encode((out / f"{block.name}.png").read_bytes()).decode()
        return (f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(block.caption)}">'
                f"<figcaption>{html.escape(block.caption)} (data: <code>{block.name}.csv</code>)</figcaption>"
                "</figure>")
    header = "".join(f"<th>{html.escape(str(c))}</th>" for c in block.frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>"
                   for row in block.frame.itertuples(index=False))
    return (f"<table><caption>{html.escape(block.caption)} (<code>{block.name}.csv</code>)</caption>"
            f"<thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>")
