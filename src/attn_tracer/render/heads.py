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
# Beyond this many heads (GPT-2 small has 144), the default view is the overview and each
# score's strongest heads: every grid and the table of every head are asked for (--score, --top).
COMPACT_HEADS = 48
STRONGEST = 4  # heads named per score in that summary
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
    """Every head's scores; narrower than its seven columns, the scores go in blocks of columns
    one under the other, each with the head names (never cropped at the edge)."""
    c = result.trace.config
    sort = result.options.sort
    first = max(4, len(name(c.layers - 1, c.heads - 1)))
    column = 10
    per_block = max(1, min(len(SCORES), (width - first) // column))
    out = Text(no_wrap=True, overflow="crop")
    for start in range(0, len(SCORES), per_block):
        scores = SCORES[start:start + per_block]
        if start:
            out.append("\n")
        top, bottom = Text(" " * first), Text("head".ljust(first))
        for score in scores:
            words = SHORT[score].split(" ")
            style = "bold" if score == sort else ""
            top.append((words[0] if len(words) > 1 else "").rjust(column), style=style)
            bottom.append(words[-1].rjust(column), style=style)
        top.rstrip()
        out.append_text(top)
        out.append("\n")
        out.append_text(bottom)
        out.append("\n")
        out.append("─" * min(width, first + column * len(scores)) + "\n", style="dim")
        for layer, h in order(result):
            out.append(name(layer, h).ljust(first), style="cyan")
            for score in scores:
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


def compact(result) -> bool:
    """Whether the view is the short one: a big model, and neither --score nor --top asked."""
    c = result.trace.config
    o = result.options
    return c.layers * c.heads > COMPACT_HEADS and not o.score and o.top is None \
        and o.sort == "layer"


def strongest(result, width: int) -> Text:
    """Each score's STRONGEST heads, highest first: one line a score."""
    c = result.trace.config
    label = max(len(SHORT[s]) for s in SCORES)
    out = Text()
    out.append(f"the strongest heads of each score (of {c.layers * c.heads}, highest first)\n",
               style="bold")
    for score in SCORES:
        values = result.scores[score]
        heads = sorted(((layer, h) for layer in range(c.layers) for h in range(c.heads)),
                       key=lambda lh: -values[lh])[:STRONGEST]
        items = []
        for layer, h in heads:
            item = Text(name(layer, h), style="cyan")
            item.append(" ")
            norm = result.scores["entropy_norm"] if score == "entropy" else values
            item.append(formats.score(float(values[layer, h]), score),
                        style=cell_style(float(norm[layer, h])))
            items.append(item)
        out.append_text(flow(items, width, sep="  ", first=Text(SHORT[score].ljust(label + 2))))
        out.append("\n")
    hint = ("every score as a layers × heads grid: --score NAME (repeatable) or --score all; "
            "every head's scores: --top N or --sort NAME; all of it: --json")
    out.append_text(flow([Text(w, style="dim") for w in hint.split(" ")], width, sep=" "))
    return out


def render(result, console: Console) -> None:
    width = console.width
    color = colored(console)
    o = result.options
    show(console, header(result.trace, width, title="attn heads"))
    console.print()
    for line in input_lines(result, width):
        show(console, line)
    console.print()
    if "view" in result.thumbnails:
        show(console, overview_title(result, width))
        thumbnails = overview(result, width, color)
        thumbnails.rstrip()
        show(console, thumbnails)
        console.print()
        show(console, thumbnail_legend(result, width, color))
        console.print()
    if compact(result):
        show(console, strongest(result, width))
        return
    console.print(Text("scores (rows: layers, columns: heads)", style="bold"))
    grids = grid([score_grid(result, s) for s in (o.scores if o.score else SCORES)], width)
    grids.rstrip()
    show(console, grids)
    c = result.trace.config
    if o.score and o.top is None and o.sort == "layer" and c.layers * c.heads > COMPACT_HEADS:
        return  # --score alone on a big model: its grids, not a table of every head
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



# ── many texts (attn heads --corpus, attn heads merge) ─────────────────────────────────────────

WEIGHTING = ("each text counts once: a head's score is the mean over the texts of each text's "
             "score, whatever its length")
INTERVAL = "± the 95% confidence interval of the mean, 1.96 · sd / √texts"
EXAMPLE_HEADS = 10  # heads whose top texts the view lists (the first of the table)


def corpus_header(result, width: int) -> Text:
    c = result.trace.config
    s = result.stats
    sizes = [f"{s.n:,} text{'s' if s.n != 1 else ''}", f"{s.tokens:,} tokens",
             f"{c.layers} layer{'s' if c.layers != 1 else ''} × {c.heads} head"
             f"{'s' if c.heads != 1 else ''}", f"d_model {c.d_model}", f"d_head {c.d_head}"]
    first = Text("attn heads --corpus", style="bold")
    first.append("  ")
    t = flow([Text(i, style="dim") for i in sizes], width, first=first)
    t.append("\n")
    items = [f"arch {c.arch}", f"pos {c.pos}", f"mask {c.mask}"]
    if not c.scale:
        items.append("NO SCALE")
    t.append_text(flow([Text(i, style="dim") for i in items], width))
    t.append("\n")
    what = (f"GPT-2 weights from {c.weights}" if c.weights
            else f"random weights, seed {c.seed} (untrained)")
    e = result.trace.engine
    t.append_text(flow([Text(i, style="dim") for i in
                        (what, f"{e['engine']} on {e['device']}", e["dtype"])], width))
    return t


def corpus_lines(result, width: int) -> list[Text]:
    k = result.corpus
    counts = k["counts"]
    kind = {"txt": "one text per line", "jsonl": f"JSON lines, field {k.get('text_field')!r}",
            "folder": "a text per .txt file"}[k["kind"]]
    parts = [Text(f"{k['source']} ({kind})"), Text(f"{counts['records']:,} records")]
    if k.get("merged"):
        parts.append(Text(f"merged from {k['merged']} shards"))
    elif k["shards"][1] > 1:
        parts.append(Text(f"shard {k['shards'][0]}/{k['shards'][1]}"))
    for key, words in (("empty", "empty"), ("bad", "bad (skipped)"), ("cut", "cut")):
        if counts[key]:
            parts.append(Text(f"{counts[key]:,} {words}"))
    if result.options.with_bos:
        parts.append(Text("<|endoftext|> before each text"))
    out = [flow(parts, width, sep=" · ", first=Text("corpus: ", style="bold"))]
    out.append(flow([Text(WEIGHTING, style="dim")], width))
    return out


def corpus_thumbnails(result, width: int, color: bool) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """The corpus mean thumbnails cut to the view's box, as overview() reads them: values
    [layers, 1, heads, r, c], drawn [1, r, c], sizes [[r, c]]."""
    c = result.trace.config
    values, drawn = result.stats.thumbnails()
    rows, cols = view_box(width, c.heads, color, c.layers)
    box_r, box_c = values.shape[-2:]
    # Rows: the mean over a block of the 16 rows; columns: the sum over a block of the 16
    # columns (render/thumbnails.py's blocks, one level coarser).
    R = render_thumbnails.indicator(box_r, rows)
    R = R / R.sum(axis=1, keepdims=True)
    C = render_thumbnails.indicator(box_c, cols).T
    small = R @ values @ C
    shown = (R @ drawn.astype(np.float64) @ C) > 0
    r, k = shown.shape
    return small[:, None], shown[None], np.array([[r, k]])


def corpus_table(result, width: int) -> Text:
    """Every head's mean of each score, ± its 95% interval, in --sort's order."""
    c = result.trace.config
    sort = result.options.sort
    ci = result.stats.ci95()
    first = max(4, len(name(c.layers - 1, c.heads - 1)))
    wide = width >= first + 11 * len(SCORES)  # "0.412±.013" and a space, or two lines
    column = 11 if wide else 10
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
        cells = []
        for score in SCORES:
            v = float(result.scores[score][layer, h])
            e = float(ci[score][layer, h])
            half = f"{e:.3f}" if e >= 1 else f"{e:.3f}"[1:]
            cells.append((f"{v:.3f}", f"±{half}", "bold" if score == sort else ""))
        if wide:
            for value, half, style in cells:
                out.append(f"{value}{half}".rjust(column), style=style)
        else:  # the interval on a dim line of its own, under each mean
            for value, _, style in cells:
                out.append(value.rjust(column), style=style)
            out.append("\n" + " " * first)
            for _, half, _ in cells:
                out.append(half.rjust(column), style="dim")
        out.append("\n")
    return out


def examples_block(result, width: int) -> Text:
    """The texts where the first heads of the table score highest on --sort's score."""
    sort = result.options.sort
    out = Text(no_wrap=True, overflow="ellipsis")
    if sort == "layer" or result.stats.k == 0:
        hint = ("--sort SCORE lists the texts where each head scores highest" if
                result.stats.k else "--examples 0: no examples kept")
        out.append(hint, style="dim")
        return out
    heads = order(result)[:EXAMPLE_HEADS]
    more = "" if len(heads) == len(order(result)) else f" (the first {len(heads)} heads)"
    out.append(f"where each head scores highest on {sort}{more}\n", style="bold")
    for layer, h in heads:
        out.append(name(layer, h), style="cyan")
        out.append("\n")
        for e in result.stats.top(sort, layer, h):
            place = f"{e['source']} line {e['line']}" if e["line"] is not None else e["source"]
            out.append(f"  {e['score']:.3f}  ", style="bold")
            out.append(f"{place}  ", style="dim")
            out.append(" ".join(e["text"].split()))
            out.append("\n")
    out.rstrip()
    return out


def render_corpus(result, console: Console) -> None:
    width = console.width
    color = colored(console)
    show(console, corpus_header(result, width))
    console.print()
    for line in corpus_lines(result, width):
        show(console, line)
    console.print()
    values, drawn, sizes = corpus_thumbnails(result, width, color)
    result.thumbnails = {"view": (values, drawn, sizes)}
    show(console, flow([Text("a row per layer, a column per head;", style="dim"),
                        Text("in each, queries down and keys across", style="dim")], width,
                       sep=" ", first=Text(f"every head's pattern, averaged over "
                                           f"{result.stats.n:,} texts: ", style="bold")))
    thumbnails = overview(result, width, color)
    thumbnails.rstrip()
    show(console, thumbnails)
    console.print()
    ramp = Text("weight  0 ")
    if color:
        for i in range(16):
            ramp.append("█", style=_fg(i / 15))
    else:
        ramp.append(render_thumbnails.RAMP)
    ramp.append(" 1")
    scale = ("each text's queries and keys cut into 16 blocks (a short text: one per token), "
             "each cell the mean over the texts that reach it")
    show(console, flow([Text(scale, style="dim"), ramp, Text("blank: masked", style="dim")],
                       width, sep="    "))
    console.print()
    console.print(Text("mean scores (rows: layers, columns: heads)", style="bold"))
    grids = grid([score_grid(result, s) for s in SCORES], width)
    grids.rstrip()
    show(console, grids)
    console.print()
    title = table_title(result)
    title.append(f"; {INTERVAL}", style="dim")
    show(console, title)
    show(console, corpus_table(result, width))
    console.print()
    show(console, examples_block(result, width))


def corpus_document(result) -> bytes:
    """attn-heads/1 for a corpus: the mean scores where one run has its batch's, `inputs`
    empty, and two more fields: `corpus` (counts, std and the 95% interval of every score) and
    `examples` (each head's top texts per score)."""
    c = result.trace.config
    s = result.stats
    o = result.options
    config = c.to_dict()
    config.update(result.trace.engine)
    config["mask_description"] = {
        "causal": c.mask == "causal", "padding": True, "pad_id": 50256,
        "masked_value": "-inf before softmax, exactly 0 after",
        "pad_query_rows": "all 0: a pad query attends to nothing"}
    config.update({"cross": False, "bos": o.with_bos, "repeat": None})
    scores = {k: v.tolist() for k, v in s.means().items()}
    std = {k: v.tolist() for k, v in s.std().items()}
    ci = {k: v.tolist() for k, v in s.ci95().items()}
    counts = result.corpus["counts"]
    corpus = {
        "source": result.corpus["source"], "kind": result.corpus["kind"],
        "text_field": result.corpus.get("text_field"),
        "shard": result.corpus["shards"], "merged": result.corpus.get("merged"),
        "texts": s.n, "tokens": s.tokens, "records": counts["records"],
        "skipped_empty": counts["empty"], "skipped_bad": counts["bad"],
        "bad": counts["bad_lines"], "cut": counts["cut"],
        "weighting": WEIGHTING, "interval": INTERVAL, "std": std, "ci95": ci,
    }
    if o.thumbnails:
        values, drawn = s.thumbnails()
        corpus["thumbnails"] = {"rows": int(drawn.shape[0]), "cols": int(drawn.shape[1]),
                                "patterns": [
            [np.where(drawn, np.round(values[layer, h], 6), None).tolist()
             for h in range(c.heads)] for layer in range(c.layers)]}
    doc = {
        "schema": SCHEMA,
        "version": __version__,
        "config": config,
        "inputs": [],
        "definitions": {k: {"formula": f, "meaning": m} for k, (f, m) in DEFINITIONS.items()},
        "scores": scores,
        "heads": [{"layer": layer, "head": h, "name": name(layer, h),
                   **{k: scores[k][layer][h] for k in SCORES},
                   "ci95": {k: ci[k][layer][h] for k in SCORES}}
                  for layer in range(c.layers) for h in range(c.heads)],
        "corpus": corpus,
        "examples": {k: [[s.top(k, layer, h) for h in range(c.heads)]
                         for layer in range(c.layers)] for k in SCORES},
    }
    return orjson.dumps(doc) + b"\n"
