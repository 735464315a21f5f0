"""The terminal view of a Trace (Rich): tokens, the shape trace, heatmaps, stages, values.

Nothing here touches an engine's arrays: the trace hands over plain NumPy. User text always
goes through `rich.text.Text`, never markup, so a sentence containing `[red]` stays a sentence.
"""

from __future__ import annotations

import math

import numpy as np
from rich import box
from rich.cells import cell_len, set_cell_size
from rich.color import Color
from rich.console import Console, Group, RenderableType
from rich.style import Style
from rich.table import Table
from rich.text import Text

from attn_tracer.tokens import split_characters
from attn_tracer.trace import Input, Step, Trace

# viridis, sampled: sequential, perceptually uniform and readable with every common color blindness.
VIRIDIS = [
    (68, 1, 84), (72, 35, 116), (64, 67, 135), (52, 94, 141), (41, 120, 142), (32, 144, 140),
    (34, 167, 132), (68, 190, 112), (121, 209, 81), (189, 222, 38), (253, 231, 37),
]
MASKED = "·"
PAD_ROW = "─"  # a pad query attends to nothing: its row is struck through
LABEL_WIDTH = 10
MAX_ROWS = 24  # query rows drawn per heatmap before switching to the last rows only
STRIP_HEAD, STRIP_TAIL = 48, 16  # tokens listed before and after the … of a long text


def color(t: float) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    a, b = VIRIDIS[i], VIRIDIS[i + 1]
    return tuple(round(a[c] + (b[c] - a[c]) * f) for c in range(3))  # type: ignore[return-value]


def cell_style(t: float) -> Style:
    r, g, b = color(t)
    light = 0.299 * r + 0.587 * g + 0.114 * b > 140
    return Style(bgcolor=Color.from_rgb(r, g, b), color="black" if light else "white")


def fit(label: str, width: int) -> str:
    """`label` right-aligned in `width` terminal cells (CJK and emoji take two), cut with …."""
    if cell_len(label) > width:
        label = set_cell_size(label, width - 1) + "…"
    return " " * (width - cell_len(label)) + label


# ── header, tokens ────────────────────────────────────────────────────────────────────────────

def header(trace: Trace) -> Text:
    c = trace.config
    rows = len(trace.inputs)
    lengths = ", ".join(str(i.length) for i in trace.inputs)
    what = (f"GPT-2 weights from {c.weights}" if c.weights
            else f"random weights, seed {c.seed} (untrained)")
    t = Text()
    t.append("attn trace", style="bold")
    t.append(f"  {rows} text{'s' if rows > 1 else ''} · {lengths} tokens · {c.layers} layers × "
             f"{c.heads} heads · d_model {c.d_model} · d_head {c.d_model // c.heads} · "
             f"{c.arch} · pos {c.pos} · mask {c.mask}{'' if c.scale else ' · NO SCALE'}\n",
             style="dim")
    e = trace.engine
    t.append(f"{what} · {e['engine']} on {e['device']} · {e['dtype']}", style="dim")
    return t


def token_strip(inp: Input, title: str) -> Text:
    t = Text()
    t.append(f"{title} ", style="bold")
    t.append(f"({inp.length} tokens)\n", style="dim")
    shown = range(len(inp.tokens))
    if len(inp.tokens) > STRIP_HEAD + STRIP_TAIL:
        shown = [*range(STRIP_HEAD), *range(len(inp.tokens) - STRIP_TAIL, len(inp.tokens))]
    for pos in shown:
        if pos == len(inp.tokens) - STRIP_TAIL and len(shown) < len(inp.tokens):
            hidden = len(inp.tokens) - len(shown)
            t.append(f"… {hidden} tokens not shown (attn tokens lists them all) …  ", style="dim")
        t.append(f"{pos}:", style="dim")
        t.append(inp.tokens[pos].text, style="bold cyan")
        t.append("  ")
    return t


# ── the shape trace ───────────────────────────────────────────────────────────────────────────

def shape_table(steps: list[Step], width: int = 120) -> Table:
    """Every step; layers after the first fold into one line where they repeat layer 0.

    Below 100 columns the dims go under the shape, so the formula keeps room to be read.
    """
    narrow = width < 100
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=False)
    # Only the formula wraps: a shape or its dims split over two lines no longer reads as one.
    table.add_column("step", style="cyan", no_wrap=True)
    table.add_column("formula", ratio=1)
    table.add_column("shape · dims" if narrow else "shape", justify="right", no_wrap=True,
                     style="bold")
    if not narrow:
        table.add_column("dims", style="dim", no_wrap=True)

    def row(name: Text | str, op: str, shape: tuple | None, dims: tuple) -> None:
        if shape is None:
            table.add_row(name, "", "", *([] if narrow else [""]))
        elif narrow:
            cell = Text(_shape(shape) + "\n")
            cell.append(", ".join(dims), style="dim")
            table.add_row(name, Text(op), cell)
        else:
            table.add_row(name, Text(op), _shape(shape), Text(", ".join(dims)))

    layer0 = [_unlayered(s) for s in steps if s.name.startswith("blocks.0.")]
    folded: list[int] = []
    current = None
    i = 0
    while i < len(steps):
        s = steps[i]
        layer = int(s.name.split(".")[1]) if s.name.startswith("blocks.") else None
        if layer:
            mine = [x for x in steps if x.name.startswith(f"blocks.{layer}.")]
            if [_unlayered(x) for x in mine] == layer0:
                folded.append(layer)
                i += len(mine)
                nxt = steps[i] if i < len(steps) else None
                if nxt is None or not nxt.name.startswith("blocks.") or not _same_as_layer0(
                        steps, int(nxt.name.split(".")[1]), layer0):
                    row(_layer_range(folded), f"same {len(layer0)} steps as blocks.0",
                        mine[-1].shape, mine[-1].dims)
                    folded = []
                continue
        name = s.name
        if layer is not None:
            if layer != current:
                row(Text(f"blocks.{layer}", style="bold"), "", None, ())
                current = layer
            name = "  " + s.name.split(".", 2)[2]
        row(Text(name), s.op, s.shape, s.dims)
        i += 1
    return table


def _same_as_layer0(steps, layer, layer0) -> bool:
    return [_unlayered(x) for x in steps if x.name.startswith(f"blocks.{layer}.")] == layer0


def _unlayered(s: Step) -> tuple:
    return (s.name.split(".", 2)[2], s.op, s.shape, s.dims)


def _layer_range(layers: list[int]) -> str:
    return f"blocks.{layers[0]}" if len(layers) == 1 else f"blocks.{layers[0]}–{layers[-1]}"


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


# ── heatmaps ──────────────────────────────────────────────────────────────────────────────────

def heatmap(weights: np.ndarray, rows: list[str], cols: list[str], title: str,
            max_width: int, pad_rows: np.ndarray | None = None,
            pad_cols: np.ndarray | None = None) -> RenderableType:
    """One attention pattern [q_len, k_len]: rows are queries, columns keys, cells colored."""
    q_len, k_len = weights.shape
    cell = 4
    row_start = max(0, q_len - MAX_ROWS)
    fits = LABEL_WIDTH + 1 + k_len * cell <= max_width
    if not fits:
        return topk_view(weights, rows, cols, title, max_width, row_start, pad_rows)
    lines = Text(no_wrap=True, overflow="crop")
    lines.append(f"{title}\n", style="bold")
    lines.append(" " * (LABEL_WIDTH + 1))
    for k in range(k_len):
        style = "dim" if pad_cols is not None and pad_cols[k] else "cyan"
        lines.append(f"{fit(cols[k], cell - 1)} ", style=style)
    lines.append("\n")
    for q in range(row_start, q_len):
        pad_row = pad_rows is not None and pad_rows[q]
        lines.append(f"{fit(rows[q], LABEL_WIDTH)} ",
                     style="dim strike" if pad_row else "cyan")
        if pad_row:  # no allowed key at all: a row of 0 by definition, drawn struck through
            lines.append(f"{PAD_ROW * (cell - 1)} " * k_len, style="dim")
            lines.append("\n")
            continue
        for k in range(k_len):
            w = float(weights[q, k])
            if w == 0.0:  # what the mask gives: −∞ before softmax
                lines.append(f"{MASKED:>{cell - 1}} ", style="dim")
            else:
                lines.append(f"{_fmt01(w):>{cell - 1}}", style=cell_style(w))
                lines.append(" ")
        lines.append("\n")
    if row_start:
        lines.append(f"(first {row_start} query rows not shown)\n", style="dim italic")
    return lines


def _fmt01(w: float) -> str:
    if w >= 0.995:
        return "1.0"
    return f"{w:.2f}"[1:]  # ".42": two decimals in three characters


def topk_view(weights: np.ndarray, rows: list[str], cols: list[str], title: str,
              max_width: int, row_start: int, pad_rows) -> Text:
    """For a key axis too wide to draw: each query's strongest keys, in order."""
    q_len, k_len = weights.shape
    per_key = 16
    k = max(1, (max_width - LABEL_WIDTH - 6) // per_key)
    out = Text(no_wrap=True, overflow="ellipsis")
    out.append(f"{title}\n", style="bold")
    out.append(f"{k_len} keys do not fit in {max_width} columns: the {k} strongest keys of each "
               f"query, strongest first\n", style="dim italic")
    for q in range(row_start, q_len):
        out.append(f"{q:>5} {fit(rows[q], LABEL_WIDTH - 6):>{LABEL_WIDTH - 6}} ", style="cyan")
        if pad_rows is not None and pad_rows[q]:
            out.append("pad query: no keys\n", style="dim")
            continue
        for j in np.argsort(-weights[q], kind="stable")[:k]:
            w = float(weights[q, j])
            if w == 0:
                break
            out.append(f"{j}:", style="dim")
            out.append(set_cell_size(cols[j], 6), style="cyan")
            out.append(f"{_fmt01(w):>4}", style=cell_style(w))
            out.append("  ")
        out.append("\n")
    if row_start:
        out.append(f"(first {row_start} query rows not shown; --json has every row)\n",
                   style="dim italic")
    return out


def legend(padded: bool = False) -> Text:
    t = Text("weight  0 ")
    ramp = "▁▂▃▄▅▆▇█"  # heights carry the scale where colors are off
    for i in range(16):
        t.append(ramp[i * len(ramp) // 16], style=Style(color=Color.from_rgb(*color(i / 15))))
    t.append(" 1    ")
    t.append(MASKED, style="dim")
    t.append(" masked (exactly 0: −∞ before softmax)", style="dim")
    if padded:
        t.append(f"    <pad> {PAD_ROW * 3}", style="dim")
        t.append(" pad query: attends to nothing (row of 0)", style="dim")
    return t


def grid(items: list[Text], item_width: int, width: int) -> Text:
    """Blocks of text side by side, as many as fit in `width`, two cells apart.

    Joined line by line rather than laid out by a Rich Table: the blocks have fixed widths
    already, and a table's layout pass was most of the default view's rendering time.
    """
    per_row = max(1, (width + 2) // (item_width + 2))
    out = Text(no_wrap=True, overflow="crop")
    for i in range(0, len(items), per_row):
        blocks = [item.split("\n", allow_blank=True) for item in items[i:i + per_row]]
        widths = [max((line.cell_len for line in lines), default=0) for lines in blocks]
        for r in range(max(len(lines) for lines in blocks)):
            row = Text()
            for j, lines in enumerate(blocks):
                line = lines[r] if r < len(lines) else Text()
                row.append_text(line)
                if j < len(blocks) - 1:
                    row.append(" " * (widths[j] - line.cell_len + 2))
            out.append_text(row.rstrip() or row)
            out.append("\n")
    return out


def labels(inp: Input) -> list[str]:
    """Row labels for every batch position: the exact token label, and for a token holding
    part of a character, that character too; pad positions included."""
    return _per_position(inp, "<pad>", lambda text, part: f"{text} {part}" if part else text)


def column_labels(inp: Input) -> list[str]:
    """Short labels for three-cell columns: the character a partial token belongs to, and no ␣
    (the rows carry the exact labels)."""
    return _per_position(inp, "pad", lambda text, part: part or text.removeprefix("␣") or text)


def _per_position(inp: Input, pad: str, label) -> list[str]:
    toks = iter(zip(inp.tokens, split_characters(inp.tokens), strict=True))
    out = []
    for real in inp.valid:
        if real:
            tok, part = next(toks)
            out.append(label(tok.text, part))
        else:
            out.append(pad)
    return out


def attention_maps(trace: Trace, width: int, kind: str = "attn",
                   batch_rows: list[int] | None = None) -> list[RenderableType]:
    out: list[RenderableType] = []
    heads = trace.selection.heads
    keys_from = trace.cross if kind == "cross_attn" else trace.inputs
    for layer, pattern in trace.patterns(kind):
        for b in batch_rows if batch_rows is not None else range(pattern.shape[0]):
            q_inp, k_inp = trace.inputs[b], keys_from[b]  # type: ignore[index]
            rows, cols = labels(q_inp), column_labels(k_inp)  # once per row, not per head
            items = []
            for i, h in enumerate(heads):
                where = f" · text {b}" if len(trace.inputs) > 1 else ""
                items.append(heatmap(pattern[b, i], rows, cols,
                                     f"{kind} layer {layer} head {h}{where}", width,
                                     ~q_inp.valid, ~k_inp.valid))
            k_len = pattern.shape[-1]
            item_width = LABEL_WIDTH + 1 + k_len * 4
            out.append(grid(items, item_width, width) if item_width <= width else Group(*items))
    return out


# ── stages and values ─────────────────────────────────────────────────────────────────────────

def stages(trace: Trace, layer: int, head: int, width: int, batch: int = 0) -> RenderableType:
    """One head's scores → scaled → masked → pattern, side by side."""
    index = trace.selection.heads.index(head)
    inp = trace.inputs[batch]
    names = ["scores", "scaled", "masked", "pattern"]
    items = []
    for name in names:
        key = f"blocks.{layer}.attn.{name}"
        if key not in trace.tensors:
            continue
        m = trace.tensors[key][batch, index]
        items.append(matrix(m, labels(inp), labels(inp), f"{name}  {trace.step(key).op}",
                            probability=name == "pattern"))
    n = len(inp.valid)
    item_width = LABEL_WIDTH + 1 + n * 6
    return grid(items, item_width, width)


def matrix(m: np.ndarray, rows: list[str], cols: list[str], title: str,
           probability: bool = False, cell: int = 6) -> Text:
    """A matrix of any reals, colored by its own finite range; −∞ drawn as such."""
    finite = m[np.isfinite(m)]
    lo, hi = (0.0, 1.0) if probability or not finite.size else (float(finite.min()),
                                                                 float(finite.max()))
    span = hi - lo or 1.0
    t = Text(no_wrap=True, overflow="crop")
    t.append(f"{title}\n", style="bold")
    if cols:
        t.append(" " * (LABEL_WIDTH + 1))
        for c in cols:
            t.append(f"{fit(c, cell - 1)} ", style="cyan")
        t.append("\n")
    for i in range(m.shape[0]):
        t.append(f"{fit(rows[i], LABEL_WIDTH)} ", style="cyan")
        for v in m[i]:
            if not math.isfinite(v):
                t.append(f"{'−∞':>{cell - 1}} ", style="dim")
            elif probability and v == 0:
                t.append(f"{MASKED:>{cell - 1}} ", style="dim")
            else:
                t.append(f"{_fmt(float(v), cell - 1):>{cell - 1}}",
                         style=cell_style((v - lo) / span))
                t.append(" ")
        t.append("\n")
    return t


def _fmt(v: float, width: int) -> str:
    for digits in (2, 1, 0):
        s = f"{v:.{digits}f}"
        if len(s) <= width:
            return s
    return f"{v:.0e}"


VALUE_LIMIT = 16


def values(trace: Trace, weights: dict[str, np.ndarray], layer: int, width: int) -> list:
    """The actual numbers of one layer, for configurations small enough to read by hand."""
    inp = trace.inputs[0]
    rows = labels(inp)
    prefix = f"blocks.{layer}.attn"
    dims = [str(i) for i in range(trace.config.d_model)]
    d_head = trace.config.d_head
    # Columns named head.dim: the split into heads is just this grouping of d_model.
    by_head = [f"h{i // d_head}.{i % d_head}" for i in range(trace.config.d_model)]
    out: list[RenderableType] = []
    x_name = "resid_pre" if layer == 0 else f"blocks.{layer - 1}.resid_post"
    if x_name in trace.tensors:
        out.append(matrix(trace.tensors[x_name][0], rows, dims, f"X  {trace.step(x_name).op}"))
    for n in "QKV":
        w = weights.get(f"{prefix}.W_{n}")
        if w is not None:
            out.append(matrix(w, dims, dims, f"W_{n}  [d_model, d_model]"))
        out.append(matrix(trace.tensors[f"{prefix}.{n.lower()}"][0], rows, by_head,
                          f"{n}  {trace.step(f'{prefix}.{n.lower()}').op}"))
    heads = trace.selection.heads
    for name in ("scores", "scaled", "masked", "pattern"):
        key = f"{prefix}.{name}"
        if key in trace.tensors:
            out.append(grid([matrix(trace.tensors[key][0, i], rows, rows, f"{name} head {h}",
                                    probability=name == "pattern")
                             for i, h in enumerate(heads)], LABEL_WIDTH + 1 + 6 * len(rows),
                            width))
    z = trace.tensors[f"{prefix}.z.merge"][0]
    out.append(matrix(z, rows, by_head, "Z, heads merged  [len, d_model]"))
    out.append(matrix(trace.tensors[f"{prefix}.out"][0], rows, dims,
                      f"out  {trace.step(f'{prefix}.out').op}"))
    return out


def _prob(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 or p == 0 else f"{p:.1e}"


def predictions(trace: Trace) -> RenderableType:
    items: list[RenderableType] = []
    for p in trace.predictions or []:
        inp = trace.inputs[p.batch]
        after = inp.tokens[-1].text if inp.tokens else ""
        table = Table(title=f"next token after “{after}” (text {p.batch}, position {p.position},"
                            f" T = {trace.temperature:g})", box=box.SIMPLE_HEAD,
                      title_justify="left")
        table.add_column("#", justify="right", style="dim")
        table.add_column("token", style="cyan")
        table.add_column("id", justify="right", style="dim")
        table.add_column("prob", justify="right")
        table.add_column("logit", justify="right", style="dim")
        table.add_column("")
        for rank, t in enumerate(p.top):
            table.add_row(str(rank + 1), Text(t["text"]), str(t["id"]), _prob(t["prob"]),
                          f"{t['logit']:.3f}", Text("█" * max(1, round(t["prob"] * 30)),
                                                    style="green"))
        items.append(table)
    if not trace.config.weights:
        items.append(Text("These weights are random: the model is untrained, so these predictions"
                          " mean nothing. Use --weights for a real GPT-2.", style="yellow"))
    return Group(*items)


# ── the whole view ────────────────────────────────────────────────────────────────────────────

def render(trace: Trace, console: Console, *, show_stages: bool = False,
           weights: dict[str, np.ndarray] | None = None, show_values: bool = False,
           batch_rows: list[int] | None = None) -> None:
    width = console.width
    console.print(header(trace))
    console.print()
    for b, inp in enumerate(trace.inputs):
        title = f"text {b}" if len(trace.inputs) > 1 else "tokens"
        console.print(token_strip(inp, title))
        if inp.padding:
            console.print(Text(f"  + {inp.padding} <pad> ({inp.side}) — <|endoftext|>, id 50256,"
                               " masked out as a key; a pad query attends to nothing (row of 0)",
                               style="dim"))
    for b, inp in enumerate(trace.cross or []):
        if b == 0 or inp.text != trace.cross[0].text:  # type: ignore[index]
            console.print(token_strip(inp, f"cross text {b}"))
    console.print()
    console.print(Text("shape trace", style="bold"))
    console.print(shape_table(trace.steps, width))
    if show_values and weights is not None:
        for layer in trace.selection.layers:
            console.print(Text(f"values of layer {layer} (text 0)", style="bold"))
            for item in values(trace, weights, layer, width):
                console.print(item)
    if show_stages:
        layer, head = trace.selection.layers[0], trace.selection.heads[0]
        row = batch_rows[0] if batch_rows else 0  # the first batch row asked for
        where = f" (text {row})" if len(trace.inputs) > 1 else ""
        console.print(Text(f"stages of layer {layer} head {head}{where}: "
                           "scores → ÷√d_head → mask → softmax", style="bold"))
        console.print(stages(trace, layer, head, width, row))
    maps = attention_maps(trace, width, "attn", batch_rows)
    if trace.cross:
        maps += attention_maps(trace, width, "cross_attn", batch_rows)
    if maps:
        console.print(Text("attention patterns (rows: queries, columns: keys)", style="bold"))
        for m in maps:
            console.print(m)
        console.print(legend(any(i.padding for i in trace.inputs)))
    if trace.predictions:
        console.print()
        console.print(predictions(trace))
