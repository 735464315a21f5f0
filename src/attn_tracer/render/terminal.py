"""The terminal view of a Trace (Rich), in the order a reader meets it: the header, the tokens,
the shape trace, the numbers asked for, the heatmaps, the predictions.

Nothing here touches an engine's arrays: the trace hands over plain NumPy. User text always
goes through `rich.text.Text`, never markup, so a sentence containing `[red]` stays a sentence.
Everything is laid out for the console's width (render_layout): lines break between items,
blocks go side by side only as far as their real widths allow, and a formula is never cut.
"""

from __future__ import annotations

import re

import numpy as np
from rich.cells import cell_len, set_cell_size
from rich.console import Console, RenderableType
from rich.text import Text

from attn_tracer.model import tokenizer as tokenizers
from attn_tracer.model.memory import step_costs
from attn_tracer.model.trace import Input, Trace
from attn_tracer.render.heatmaps import (
    PAD_LABEL,
    PIECE,
    attention_maps,
    column_labels,
    legend,
    mask_marks,
    reading_labels,
    shaded_text,
)
from attn_tracer.render.layout import GAP, flow, plural
from attn_tracer.render.numbers import predictions, stages, values
from attn_tracer.render.shapes import (
    circuits_table,
    cost_summary,
    cost_table,
    kv_saving,
    shape_table,
)

STRIP_HEAD, STRIP_TAIL = 48, 16  # tokens listed before and after the … of a long text


def header(trace: Trace, width: int = 120, title: str = "attn trace") -> Text:
    c = trace.config
    rows = len(trace.inputs)
    lengths = ", ".join(str(i.length) for i in trace.inputs)
    tokens = plural(trace.inputs[0].length, "token") if rows == 1 else f"{lengths} tokens"
    sizes = [plural(rows, "text"), tokens,
             f"{plural(c.layers, 'layer')} × {plural(c.heads, 'head')}", f"d_model {c.d_model}",
             f"d_head {c.d_head}"]
    if c.d_attn != c.d_model:  # --d-head: the heads' concatenation is not d_model wide
        sizes.append(f"heads·d_head {c.d_attn}")
    # The switches on a line of their own: a name like "attn" alone after a wrap reads as noise.
    items = [f"arch {c.arch}", f"pos {c.pos}", f"mask {c.mask}"]
    items += modern_items(c)
    if not c.scale:
        items.append("NO SCALE")
    if trace.cross:
        cross = trace.cross
        k = (plural(cross[0].length, "token") if len({i.text for i in cross}) == 1
             else f"{', '.join(str(i.length) for i in cross)} tokens")
        items.append(f"cross-attention over {k}")
    first = Text(title, style="bold")
    first.append("  ")
    t = flow([Text(i, style="dim") for i in sizes], width, first=first)
    t.append("\n")
    t.append_text(flow([Text(i, style="dim") for i in items], width))
    t.append("\n")
    what = (f"{checkpoint_title(c)} weights from {c.weights}" if c.weights
            else f"random weights, seed {c.seed} (untrained)")
    e = trace.engine
    t.append_text(flow([Text(i, style="dim") for i in
                        (what, f"{e['engine']} on {e['device']}", e["dtype"])], width))
    if c.weights:  # random weights always use GPT-2's tokenizer (the JSON says so too)
        t.append("\n")
        t.append_text(flow([Text(f"tokenizer: {tokenizers.of(c).describe()}", style="dim")],
                           width))
    return t


def modern_items(c) -> list[str]:
    """The modern-attention switches a config sets (none for the classic stack)."""
    out = []
    if c.pos == "rotary":
        part = f" {c.rotary_dims}/{c.d_head} dims" if c.rotary_dims != c.d_head else ""
        out.append(f"rotary {c.rotary_style}{part} θ {c.rope_theta:g}")
    if c.kv_heads != c.heads:
        out.append(f"kv_heads {c.kv_heads} ({c.groups} query heads each)")
    if c.window is not None:
        out.append(f"window {c.window}")
    from attn_tracer.model.arch import family

    if family(c).full_block and c.norm != "layer":
        out.append("RMSNorm")
    if family(c).full_block and c.mlp != "gelu":
        out.append("SwiGLU")
    return out


def checkpoint_title(c) -> str:
    """What the weights are called: GPT-2, Llama, Mistral, Qwen2."""
    from attn_tracer.model.arch import family

    arch = family(c)
    return arch.titles.get(c.model_type or "", arch.title)
SPECIAL_STYLE = "bold magenta"  # a special token (<s>, <|endoftext|>): a control token, not text


def token_notes(inputs: list[Input], tok) -> list[Text]:
    """What the token list cannot say by itself (tokenizer.Tokenizer.notes), dimmed."""
    return [Text(n, style="dim") for n in tok.notes([t for inp in inputs for t in inp.tokens])]


def token_strip(inp: Input, title: str, width: int = 120) -> Text:
    """`pos:label` items, laid out by width: a line breaks between two items, never in one.

    (Rich would break a label like `<f0 9f 91>` at its spaces, and it treats NBSP as a space.)
    """
    t = Text()
    t.append(f"{title} ", style="bold")
    t.append(f"({plural(inp.length, 'token')})\n", style="dim")
    n = len(inp.tokens)
    names = [name for name, real in zip(reading_labels(inp), inp.valid, strict=True) if real]
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
        label = names[pos]
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
        t.append(label, style=SPECIAL_STYLE if inp.tokens[pos].special else "bold cyan")
        used += size
    return t


def show(console: Console, renderable: RenderableType) -> None:
    """console.print, keeping a Text's no_wrap: print() joins the Texts it is given into a new
    one, which would wrap a block that was laid out to be cropped instead."""
    if isinstance(renderable, Text):
        console.print(renderable, no_wrap=renderable.no_wrap, overflow=renderable.overflow)
    else:
        console.print(renderable)


ORIENTATION = ("Projections multiply row vectors: y = x·W + b, i.e. (Wᵀ)x + b in column form; "
               "W is [in, out]: W_Q, W_K, W_V are [d_model, {w}], W_O is [{w}, d_model].")


def render(trace: Trace, console: Console, *, show_stages: bool = False,
           weights: dict[str, np.ndarray] | None = None, show_values: bool = False,
           batch_rows: list[int] | None = None, queries: range | None = None,
           keys: range | None = None, numbers: bool = False, show_cost: bool = False,
           peaks: tuple[int, int] | None = None, show_circuits: bool = False) -> None:
    """`peaks`: the memory estimate of this run and of the text twice as long (--cost)."""
    width = console.width
    colored = console.color_system is not None and not console.no_color
    show(console, header(trace, width))
    console.print()
    tok = tokenizers.of(trace.config)
    for b, inp in enumerate(trace.inputs):
        title = f"text {b}" if len(trace.inputs) > 1 else "tokens"
        show(console, token_strip(inp, title, width))
        if inp.padding:
            console.print(Text(f"  + {plural(inp.padding, PAD_LABEL)} ({inp.side}): "
                               f"{tok.pad_text()}, id {tok.pad_id}, masked out as a key; a pad "
                               "query attends to nothing (a row of 0)", style="dim"))
    for b, inp in enumerate(trace.cross or []):
        if b == 0 or inp.text != trace.cross[0].text:  # type: ignore[index]
            console.print(token_strip(inp, f"cross text {b}", width))
    for note in token_notes([*trace.inputs, *(trace.cross or [])], tok):
        console.print(note)
    if any(PIECE in label for inp in [*trace.inputs, *(trace.cross or [])]
           for label in column_labels(inp)):
        console.print(Text(f"今₁ 今₂: the pieces of one character that {tok.who} split across "
                           "tokens (attn tokens shows their bytes)", style="dim"))
    console.print()
    console.print(Text("shape trace", style="bold"))
    show(console, shape_table(trace.steps, width))
    cfg = trace.config
    orientation = ORIENTATION.format(w=cfg.attn_dim)
    if cfg.kv_heads != cfg.heads:  # grouped-query: W_K and W_V are narrower than W_Q
        orientation = orientation.replace(
            f"W_Q, W_K, W_V are [d_model, {cfg.attn_dim}]",
            f"W_Q is [d_model, {cfg.attn_dim}], W_K and W_V [d_model, {cfg.kv_dim}]")
    console.print(Text(orientation, style="dim"))
    kinds = ("attn", "cross_attn") if trace.cross else ("attn",)
    rows = batch_rows or [0]  # the numbers of one text each: the first, unless asked
    if show_cost:
        costs = step_costs(trace.steps, trace.config, trace.engine["dtype"])
        console.print()
        console.print(Text("the cost of each step (bytes of its tensor, multiply-adds of the "
                           "product that makes it; ∝: how it grows with the text's length)",
                           style="bold"))
        show(console, cost_table(trace.steps, costs, width))
        if peaks is not None:
            length = trace.inputs[0].length + trace.inputs[0].padding
            console.print(cost_summary(costs, length, *peaks))
            if trace.config.kv_heads != trace.config.heads:
                console.print(kv_saving(trace.config, length))
        console.print()
    if show_circuits and weights is not None:
        console.print()
        console.print(Text("value circuits: W_OV = value down · value up, per head", style="bold"))
        show(console, circuits_table(weights, trace.config, trace.selection.layers,
                                     trace.selection.heads, kinds))
        console.print()
    if show_values and weights is not None:
        for layer in trace.selection.layers:
            for b in rows:
                for kind in kinds:
                    block = "cross-attention" if kind == "cross_attn" else "self-attention"
                    where = f"text {b}" + ("" if batch_rows else
                                           ", choose with --batch-index" if len(trace.inputs) > 1
                                           else "")
                    console.print()
                    console.print(Text(f"values of layer {layer} {block} ({where})",
                                       style="bold"))
                    for item in values(trace, weights, layer, width, kind, b):
                        show(console, item)
    if show_stages:
        layer, heads = trace.selection.layers[0], trace.selection.heads
        head = heads[0]
        row = rows[0]  # the first batch row asked for
        where = f" (text {row})" if len(trace.inputs) > 1 else ""
        for kind in kinds:
            block = "cross_attn " if kind == "cross_attn" else ""
            source = " (keys from the cross text, no causal mask)" if kind == "cross_attn" else ""
            console.print()
            console.print(Text(f"stages of {block}layer {layer} head {head}{where}{source}: "
                               "scores → ÷√d_head → + mask → softmax", style="bold"))
            if len(heads) > 1 and kind == "attn":
                console.print(Text(f"stages of head {head} (choose another with --head)",
                                   style="dim"))
            show(console, stages(trace, layer, head, width, row, kind))
    maps = [m for kind in kinds
            for m in attention_maps(trace, width, kind, batch_rows, queries, keys, colored)]
    if maps:
        console.print(Text("attention patterns (rows: queries, columns: keys)", style="bold"))
        for m in maps:
            show(console, m)
        if queries is not None and len(queries) == 1:
            for kind in kinds:
                for item in query_texts(trace, kind, queries.start, width, batch_rows,
                                        numbers or not colored):
                    show(console, item)
        show(console, legend(any(i.padding for i in trace.inputs) or bool(
            trace.cross and any(i.padding for i in trace.cross)), width,
            causal=trace.config.mask == "causal", colored=colored, window=trace.config.window))
    if trace.predictions:
        console.print()
        console.print(predictions(trace, width, batch_rows))


def query_texts(trace: Trace, kind: str, query: int, width: int,
                batch_rows: list[int] | None, numbers: bool) -> list[Text]:
    """For one query: the text its keys come from, each token shaded by the weight it gets."""
    out = []
    keys_from = trace.cross if kind == "cross_attn" else trace.inputs
    for layer, pattern in trace.patterns(kind):
        for b in batch_rows if batch_rows is not None else range(pattern.shape[0]):
            inp = keys_from[b]  # type: ignore[index]
            marks = mask_marks(trace, kind, b)
            for i, h in enumerate(trace.selection.heads):
                where = f" · text {b}" if len(trace.inputs) > 1 else ""
                block = Text()
                block.append(f"{kind} layer {layer} head {h}{where}: what query {query} "
                             f"({reading_labels(trace.inputs[b])[query]}) attends to\n",
                             style="bold")  # the title alone: the shaded tokens keep their own
                block.append_text(shaded_text(pattern[b, i], reading_labels(inp), marks, query,
                                              width, numbers))
                out.append(block)
    return out


def export_svg(console: Console, title: str) -> str:
    """The recorded view as SVG that renders offline, as it does on screen."""
    from rich._export_format import CONSOLE_SVG_FORMAT

    return console.export_svg(title=title, clear=False,
                              code_format=offline_svg(CONSOLE_SVG_FORMAT))


def offline_svg(svg: str) -> str:
    """Rich's SVG (its template, or an SVG made from it, as Textual's screenshots are) with the
    web font taken out: Rich's template fetches Fira Code from a CDN, and a saved view must not
    need the network, so the font is the machine's (local(), or its first monospace font)."""
    offline = re.sub(r',\s*url\("https?://[^"]*"\) format\("[^"]*"\)', "", svg)
    return offline.replace("font-family: Fira Code, monospace;",
                           "font-family: Fira Code, 'DejaVu Sans Mono', Menlo, Consolas, "
                           "'Noto Sans Mono CJK SC', 'Noto Color Emoji', monospace;")
