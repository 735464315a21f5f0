"""The view and the JSON document of `attn heads`: every head at a glance, and its scores.

The view, top to bottom: the header, the input, the overview (one thumbnail per head, layers as
rows and heads as columns, drawn by render_thumbnails), one small [layers × heads] grid per
score, and the table of every head. Colors follow the heatmaps (viridis, 0–1); without color
the thumbnails use the legend's height ramp and the numbers carry everything.
"""

from __future__ import annotations

import math

import numpy as np
import orjson
from rich.color import Color
from rich.console import Console
from rich.style import Style
from rich.text import Text

from attn_tracer import __version__
from attn_tracer.analysis.head_definitions import DEFINITIONS, SCORES
from attn_tracer.model import tokenizer as tokenizers
from attn_tracer.render import formats
from attn_tracer.render import thumbnails as render_thumbnails
from attn_tracer.render.json_doc import config_json, input_json
from attn_tracer.render.layout import cell_style, flow, grid
from attn_tracer.render.layout import color as viridis
from attn_tracer.render.terminal import header, show, token_notes, token_strip

SCHEMA = "attn-heads/1"
GAP_CELLS = 1  # between two thumbnails of a row
MIN_CELLS, MAX_CELLS = 3, 12  # a thumbnail's width in cells
SHORT = {"previous_token": "previous token", "duplicate_token": "duplicate token",
         "induction": "induction", "first_token": "first token", "self": "self",
         "entropy": "entropy bits", "entropy_norm": "entropy norm"}


def name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def colored(console: Console) -> bool:
    return console.color_system is not None and not console.no_color


def _label_width(layers: int) -> int:
    return len(f"L{layers - 1}") + 1


def view_box(width: int, heads: int, color: bool, layers: int = 100) -> tuple[int, int]:
    """(pattern rows, key columns) of each thumbnail in a view `width` columns wide.

    As wide as the heads fit beside the layer labels (between MIN_CELLS and MAX_CELLS), and
    square: a line holds two pattern rows in color, one in plain text.
    """
    room = width - _label_width(layers)
    cells = (room + GAP_CELLS) // heads - GAP_CELLS
    cells = max(MIN_CELLS, min(MAX_CELLS, cells))
    return render_thumbnails.pixels(math.ceil(cells / 2), color), cells


# ── the view ──────────────────────────────────────────────────────────────────────────────────

def input_lines(result, width: int) -> list[Text]:
    o = result.options
    out = []
    tok = tokenizers.of(result.trace.config)
    if o.repeat is not None:
        bos = f"{tok.bos_text()}, then " if o.with_bos else ""
        out.append(Text(f"induction probe (--repeat {o.repeat}): {bos}{o.repeat} random word "
                        f"tokens (seed {result.seed}), then the same {o.repeat} again",
                        style="bold"))
    elif o.with_bos:
        out.append(Text(f"--bos: {tok.bos_text()} before each text", style="dim"))
    for b, inp in enumerate(result.trace.inputs):
        title = f"text {b}" if len(result.trace.inputs) > 1 else "tokens"
        out.append(token_strip(inp, title, width))
    out.extend(token_notes(result.trace.inputs, tok))
    return out


def overview(result, width: int, color: bool) -> Text:
    """Every head's thumbnail (text 0): layers as rows, heads as columns, labelled L·H·."""
    c = result.trace.config
    values, drawn, sizes = result.thumbnails["view"]
    rows, cols = int(sizes[0, 0]), int(sizes[0, 1])
    label = _label_width(c.layers)
    cell = max(cols, len(f"H{c.heads - 1}"))
    per_band = max(1, (width - label + GAP_CELLS) // (cell + GAP_CELLS))
    out = Text(no_wrap=True, overflow="crop")
    for start in range(0, c.heads, per_band):
        band = range(start, min(start + per_band, c.heads))
        out.append(" " * label)
        out.append(" ".join(f"H{h}".ljust(cell) for h in band).rstrip(), style="cyan")
        out.append("\n")
        for layer in range(c.layers):
            if layer:
                out.append("\n")  # a blank line: two layers' thumbnails never touch
            pictures = [render_thumbnails.lines(values[layer, 0, h, :rows, :cols],
                                                drawn[0, :rows, :cols], color) for h in band]
            for i in range(len(pictures[0])):
                out.append(f"L{layer}".ljust(label) if i == 0 else " " * label,
                           style="cyan" if i == 0 else "")
                for n, picture in enumerate(pictures):
                    out.append_text(picture[i])
                    if n < len(pictures) - 1:
                        out.append(" " * (cell - picture[i].cell_len + GAP_CELLS))
                out.append("\n")
    return out


def overview_title(result, width: int) -> Text:
    which = " (text 0)" if len(result.trace.inputs) > 1 else ""
    parts = [Text("a row per layer, a column per head;", style="dim"),
             Text("in each, queries down and keys across", style="dim")]
    return flow(parts, width, sep=" ", first=Text(f"every head's pattern{which}: ", style="bold"))


def thumbnail_legend(result, width: int, color: bool) -> Text:
    _, _, sizes = result.thumbnails["view"]
    length = result.trace.inputs[0].length
    rows, cols = int(sizes[0, 0]), int(sizes[0, 1])
    if rows == length and cols == length:
        scale = "one cell per query and key"
    else:
        scale = (f"{length} queries in {rows} rows, {length} keys in {cols} columns: a cell is "
                 "the weight a query gives that block of keys, averaged over the block's queries")
    ramp = Text("weight  0 ")
    if color:
        for i in range(16):
            ramp.append("█", style=_fg(i / 15))
    else:
        ramp.append(render_thumbnails.RAMP)
    ramp.append(" 1")
    items = [Text(scale, style="dim"), ramp, Text("blank: masked", style="dim")]
    return flow(items, width, sep="    ")


def _fg(value: float) -> Style:
    return Style(color=Color.from_rgb(*viridis(value)))


def score_grid(result, score: str) -> Text:
    """One score of every head: [layers × heads], each cell on the viridis scale."""
    c = result.trace.config
    values = result.scores[score]
    norm = result.scores["entropy_norm"] if score == "entropy" else values
    label = _label_width(c.layers)
    cell = max(3, len(f"H{c.heads - 1}"))
    out = Text(no_wrap=True, overflow="crop")
    out.append(f"{score}\n", style="bold")
    out.append(" " * label)
    out.append(" ".join(f"H{h}".rjust(cell) for h in range(c.heads)), style="cyan")
    out.append("\n")
    for layer in range(c.layers):
        out.append(f"L{layer}".ljust(label), style="cyan")
        for h in range(c.heads):
            v = float(values[layer, h])
            out.append(" " * (cell - 3))
            out.append(formats.score(v, score), style=cell_style(float(norm[layer, h])))
            if h < c.heads - 1:
                out.append(" ")
        out.append("\n")
    return out


def order(result) -> list[tuple[int, int]]:
    """(layer, head) in the table's order: --sort's score highest first, then --top's cut."""
    c = result.trace.config
    heads = [(layer, h) for layer in range(c.layers) for h in range(c.heads)]
    sort = result.options.sort
    if sort != "layer":
        values = result.scores[sort]
        heads.sort(key=lambda lh: -values[lh])  # stable: ties stay in layer order
    top = result.options.top
    return heads[:top] if top is not None else heads


def table(result, width: int) -> Text:
    c = result.trace.config
    sort = result.options.sort
    first = max(4, len(name(c.layers - 1, c.heads - 1)))
    column = 10
    out = Text(no_wrap=True, overflow="crop")
    top, bottom = Text(" " * first), Text("head".ljust(first))
    for score in SCORES:
        words = SHORT[score].split(" ")
        style = "bold" if score == sort else ""
        top.append((words[0] if len(words) > 1 else "").rjust(column), style=style)
        bottom.append(words[-1].rjust(column), style=style)
    top.rstrip()
    out.append_text(top)
    out.append("\n")
    out.append_text(bottom)
    out.append("\n")
    out.append("─" * min(width, first + column * len(SCORES)) + "\n", style="dim")
    for layer, h in order(result):
        out.append(name(layer, h).ljust(first), style="cyan")
        for score in SCORES:
            v = float(result.scores[score][layer, h])
            out.append(f"{v:.3f}".rjust(column), style="bold" if score == sort else "")
        out.append("\n")
    return out


def table_title(result) -> Text:
    c = result.trace.config
    total = c.layers * c.heads
    shown = len(order(result))
    sort = result.options.sort
    how = "in layer order" if sort == "layer" else f"by {sort}, highest first"
    cut = "" if shown == total else f", top {shown} of {total}"
    return Text(f"every head's scores ({how}{cut}; definitions: attn heads --help)",
                style="bold")


def render(result, console: Console) -> None:
    width = console.width
    color = colored(console)
    show(console, header(result.trace, width, title="attn heads"))
    console.print()
    for line in input_lines(result, width):
        show(console, line)
    console.print()
    show(console, overview_title(result, width))
    thumbnails = overview(result, width, color)
    thumbnails.rstrip()
    show(console, thumbnails)
    console.print()
    show(console, thumbnail_legend(result, width, color))
    console.print()
    console.print(Text("scores (rows: layers, columns: heads)", style="bold"))
    grids = grid([score_grid(result, s) for s in SCORES], width)
    grids.rstrip()
    show(console, grids)
    console.print()
    show(console, table_title(result))
    show(console, table(result, width))


# ── JSON ──────────────────────────────────────────────────────────────────────────────────────

def document(result) -> bytes:
    """The attn-heads/1 document (schema: data/heads.schema.json)."""
    trace = result.trace
    c = trace.config
    o = result.options
    config = config_json(trace)
    config.update({"bos": o.with_bos, "repeat": o.repeat})
    scores = {s: result.scores[s].tolist() for s in SCORES}
    doc = {
        "schema": SCHEMA,
        "version": __version__,
        "config": config,
        "inputs": [input_json(i) for i in trace.inputs],
        "definitions": {s: {"formula": f, "meaning": m} for s, (f, m) in DEFINITIONS.items()},
        "scores": scores,
        "heads": [{"layer": layer, "head": h, "name": name(layer, h),
                   **{s: scores[s][layer][h] for s in SCORES}}
                  for layer in range(c.layers) for h in range(c.heads)],
    }
    if "json" in result.thumbnails:
        values, drawn, sizes = result.thumbnails["json"]
        texts = []
        for b, (rows, cols) in enumerate(sizes.tolist()):
            mask = drawn[b, :rows, :cols]
            texts.append({"batch": b, "rows": rows, "cols": cols, "patterns": [
                [np.where(mask, np.round(values[layer, b, h, :rows, :cols].astype(np.float64), 6),
                          None).tolist()
                 for h in range(c.heads)] for layer in range(c.layers)]})
        doc["thumbnails"] = texts
    return orjson.dumps(doc) + b"\n"

