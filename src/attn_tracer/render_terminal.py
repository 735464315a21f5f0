"""The terminal view of a Trace (Rich), in the order a reader meets it: the header, the tokens,
the shape trace, the numbers asked for, the heatmaps, the predictions.

Nothing here touches an engine's arrays: the trace hands over plain NumPy. User text always
goes through `rich.text.Text`, never markup, so a sentence containing `[red]` stays a sentence.
Everything is laid out for the console's width (render_layout): lines break between items,
blocks go side by side only as far as their real widths allow, and a formula is never cut.
"""

from __future__ import annotations

import numpy as np
from rich.cells import cell_len, set_cell_size
from rich.console import Console, RenderableType
from rich.text import Text

from attn_tracer.render_heatmaps import attention_maps, legend
from attn_tracer.render_layout import GAP, flow, plural
from attn_tracer.render_numbers import predictions, stages, values
from attn_tracer.render_shapes import shape_table
from attn_tracer.tokens import ENDOFTEXT_ID
from attn_tracer.trace import Input, Trace

STRIP_HEAD, STRIP_TAIL = 48, 16  # tokens listed before and after the … of a long text


def header(trace: Trace, width: int = 120, title: str = "attn trace") -> Text:
    c = trace.config
    rows = len(trace.inputs)
    lengths = ", ".join(str(i.length) for i in trace.inputs)
    tokens = plural(trace.inputs[0].length, "token") if rows == 1 else f"{lengths} tokens"
    items = [plural(rows, "text"), tokens,
             f"{plural(c.layers, 'layer')} × {plural(c.heads, 'head')}", f"d_model {c.d_model}",
             f"d_head {c.d_head}", c.arch, f"pos {c.pos}", f"mask {c.mask}"]
    if not c.scale:
        items.append("NO SCALE")
    if trace.cross:
        cross = trace.cross
        k = (plural(cross[0].length, "token") if len({i.text for i in cross}) == 1
             else f"{', '.join(str(i.length) for i in cross)} tokens")
        items.append(f"cross-attention over {k}")
    first = Text(title, style="bold")
    first.append("  ")
    t = flow([Text(i, style="dim") for i in items], width, first=first)
    t.append("\n")
    what = (f"GPT-2 weights from {c.weights}" if c.weights
            else f"random weights, seed {c.seed} (untrained)")
    e = trace.engine
    t.append_text(flow([Text(i, style="dim") for i in
                        (what, f"{e['engine']} on {e['device']}", e["dtype"])], width))
    return t


def token_strip(inp: Input, title: str, width: int = 120) -> Text:
    """`pos:label` items, laid out by width: a line breaks between two items, never in one.

    (Rich would break a label like `<f0 9f 91>` at its spaces, and it treats NBSP as a space.)
    """
    t = Text()
    t.append(f"{title} ", style="bold")
    t.append(f"({plural(inp.length, 'token')})\n", style="dim")
    n = len(inp.tokens)
    shown = list(range(n))
    if n > STRIP_HEAD + STRIP_TAIL:
        shown = [*range(STRIP_HEAD), *range(n - STRIP_TAIL, n)]
    used = 0
    for pos in shown:
        if pos == n - STRIP_TAIL and len(shown) < n:
            # A sentence, on a line of its own: Rich may wrap it between its words.
            t.append(("\n" if used else "") + f"… {n - len(shown)} tokens not shown "
                     "(attn tokens lists them all) …\n", style="dim")
            used = 0
        label = inp.tokens[pos].text
        room = width - len(f"{pos}:")
        if cell_len(label) > room:
            label = set_cell_size(label, max(room - 1, 0)) + "…"
        size = len(f"{pos}:") + cell_len(label)
        if used and used + GAP + size > width:
            t.append("\n")
            used = 0
        elif used:
            t.append(" " * GAP)
            used += GAP
        t.append(f"{pos}:", style="dim")
        t.append(label, style="bold cyan")
        used += size
    return t


def show(console: Console, renderable: RenderableType) -> None:
    """console.print, keeping a Text's no_wrap: print() joins the Texts it is given into a new
    one, which would wrap a block that was laid out to be cropped instead."""
    if isinstance(renderable, Text):
        console.print(renderable, no_wrap=renderable.no_wrap, overflow=renderable.overflow)
    else:
        console.print(renderable)


def render(trace: Trace, console: Console, *, show_stages: bool = False,
           weights: dict[str, np.ndarray] | None = None, show_values: bool = False,
           batch_rows: list[int] | None = None) -> None:
    width = console.width
    show(console, header(trace, width))
    console.print()
    for b, inp in enumerate(trace.inputs):
        title = f"text {b}" if len(trace.inputs) > 1 else "tokens"
        show(console, token_strip(inp, title, width))
        if inp.padding:
            console.print(Text(f"  + {inp.padding} <pad> ({inp.side}) — <|endoftext|>, id "
                               f"{ENDOFTEXT_ID},"
                               " masked out as a key; a pad query attends to nothing (row of 0)",
                               style="dim"))
    for b, inp in enumerate(trace.cross or []):
        if b == 0 or inp.text != trace.cross[0].text:  # type: ignore[index]
            console.print(token_strip(inp, f"cross text {b}", width))
    console.print()
    console.print(Text("shape trace", style="bold"))
    show(console, shape_table(trace.steps, width))
    if show_values and weights is not None:
        for layer in trace.selection.layers:
            console.print(Text(f"values of layer {layer} (text 0)", style="bold"))
            for item in values(trace, weights, layer, width):
                show(console, item)
    if show_stages:
        layer, heads = trace.selection.layers[0], trace.selection.heads
        head = heads[0]
        row = batch_rows[0] if batch_rows else 0  # the first batch row asked for
        where = f" (text {row})" if len(trace.inputs) > 1 else ""
        console.print(Text(f"stages of layer {layer} head {head}{where}: "
                           "scores → ÷√d_head → mask → softmax", style="bold"))
        if len(heads) > 1:
            console.print(Text(f"stages of head {head} (choose another with --head)",
                               style="dim"))
        show(console, stages(trace, layer, head, width, row))
    maps = attention_maps(trace, width, "attn", batch_rows)
    if trace.cross:
        maps += attention_maps(trace, width, "cross_attn", batch_rows)
    if maps:
        console.print(Text("attention patterns (rows: queries, columns: keys)", style="bold"))
        for m in maps:
            show(console, m)
        show(console, legend(any(i.padding for i in trace.inputs), width))
    if trace.predictions:
        console.print()
        console.print(predictions(trace, width, batch_rows))
