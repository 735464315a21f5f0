"""The terminal view of a Trace (Rich): tokens, the shape trace, heatmaps, stages, values.

Nothing here touches an engine's arrays: the trace hands over plain NumPy. User text always
goes through `rich.text.Text`, never markup, so a sentence containing `[red]` stays a sentence.
Everything is laid out for the console's width: lines break between items (header, token strip),
blocks go side by side only as far as their real widths allow, and a formula is never cut.
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

from attn_tracer.tokens import ENDOFTEXT_ID, split_characters
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
GAP = 2  # cells between blocks side by side, and between items of a line
MIN_FORMULA = 24  # the shape trace changes layout rather than give a formula less room
BAR = 30  # cells of a probability-1 bar in the predictions


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


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def flow(items: list[Text], width: int, sep: str = " · ", first: Text | None = None) -> Text:
    """`items` joined by `sep`, a new line only between two items, never inside one.

    An item wider than the whole line gets a line of its own (and Rich folds it there).
    """
    out = first.copy() if first is not None else Text()
    used, fresh = out.cell_len, True
    for item in items:
        if not fresh and used + cell_len(sep) + item.cell_len > width:
            out.append("\n")
            used = 0
        elif not fresh:
            out.append(sep, style="dim")
            used += cell_len(sep)
        out.append_text(item)
        used += item.cell_len
        fresh = False
    return out


# ── the mask, from plain data ─────────────────────────────────────────────────────────────────

def allowed_mask(trace: Trace, kind: str, b: int) -> np.ndarray:
    """allowed [q_len, k_len] of batch row `b`: where the mask lets a query look at a key.

    Self-attention: both positions hold real tokens, and k ≤ q under a causal mask.
    Cross-attention: the query and the key (of the cross text) hold real tokens.
    A weight of exactly 0 elsewhere is a softmax that underflowed, not a mask.
    """
    valid_q = trace.inputs[b].valid
    if kind == "cross_attn":
        return valid_q[:, None] & trace.cross[b].valid[None, :]  # type: ignore[index]
    allowed = valid_q[:, None] & valid_q[None, :]
    if trace.config.mask == "causal":
        allowed &= np.tri(len(valid_q), dtype=bool)
    return allowed


# ── header, tokens ────────────────────────────────────────────────────────────────────────────

def header(trace: Trace, width: int = 120) -> Text:
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
    first = Text("attn trace", style="bold")
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


# ── the shape trace ───────────────────────────────────────────────────────────────────────────

def shape_table(steps: list[Step], width: int = 120) -> RenderableType:
    """Every step; layers after the first fold into one line where they repeat layer 0.

    A formula is never cut, and gets at least MIN_FORMULA cells before it wraps (between words):
    from 100 columns the dims have a column of their own; below, they go under the shape; where
    that leaves the formula too little room, the dims wrap under the shape; and in the narrowest
    terminals each step takes its own lines, its formula indented under its name.
    """
    rows = _shape_rows(steps)
    name_w = max(cell_len("step"), *(name.cell_len for name, *_ in rows))
    shaped = [(_shape(shape), ", ".join(dims)) for _, _, shape, dims in rows if shape is not None]
    shape_w = max(cell_len("shape · dims"), *(len(s) for s, _ in shaped))
    dims_w = max(len(d) for _, d in shaped)
    rich_gap = 3  # a Rich table column's padding on both sides and the (blank) rule between
    if width >= 100 and width - name_w - shape_w - dims_w - 3 * rich_gap >= MIN_FORMULA:
        return _table(rows, narrow=False)
    if width - name_w - max(shape_w, dims_w) - 2 * rich_gap >= MIN_FORMULA:
        return _table(rows, narrow=True)
    if width - name_w - shape_w - 2 * GAP >= MIN_FORMULA:
        return _columns(rows, width, name_w, shape_w)
    return _stacked(rows, width)


def _table(rows: list[tuple], narrow: bool) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=False)
    # Only the formula wraps (between words; fold: a long word is broken, never cut with …): a
    # shape or its dims split over two lines no longer reads as one.
    table.add_column("step", style="cyan", no_wrap=True)
    table.add_column("formula", ratio=1, overflow="fold")
    table.add_column("shape · dims" if narrow else "shape", justify="right", no_wrap=True,
                     style="bold")
    if not narrow:
        table.add_column("dims", style="dim", no_wrap=True)
    for name, op, shape, dims in rows:
        if shape is None:
            table.add_row(name, "", "", *([] if narrow else [""]))
        elif narrow:
            cell = Text(_shape(shape) + "\n")
            cell.append(", ".join(dims), style="dim")
            table.add_row(name, Text(op), cell)
        else:
            table.add_row(name, Text(op), _shape(shape), Text(", ".join(dims)))
    return table


def _columns(rows: list[tuple], width: int, name_w: int, right_w: int) -> Text:
    """step · formula · shape, with the dims wrapped under the shape in its narrow column."""
    formula_w = width - name_w - right_w - 2 * GAP
    gap = " " * GAP
    t = Text()
    t.append(f"{'step':<{name_w}}{gap}{'formula':<{formula_w}}{gap}{'shape · dims':>{right_w}}\n",
             style="bold")
    t.append("─" * width + "\n", style="dim")
    for name, op, shape, dims in rows:
        if shape is None:
            t.append_text(name)
            t.append("\n")
            continue
        formula = _wrap(op, formula_w)
        right = [_shape(shape), *_wrap(", ".join(dims), right_w)]
        for i in range(max(len(formula), len(right))):
            t.append_text(name if i == 0 else Text())
            t.append(" " * ((name_w - name.cell_len if i == 0 else name_w) + GAP))
            f = formula[i] if i < len(formula) else ""
            t.append(f + " " * (formula_w - cell_len(f) + GAP))
            r = right[i] if i < len(right) else ""
            t.append(f"{r:>{right_w}}", style="bold" if i == 0 else "dim")
            t.append("\n")
    t.rstrip()
    return t


def _stacked(rows: list[tuple], width: int) -> Text:
    """The narrowest layout: the step and its shape, then its formula indented, then its dims."""
    indent = "  "
    t = Text()
    t.append("step", style="bold")
    t.append(f"{'shape':>{width - 4}}\n", style="bold")
    t.append(indent + "formula", style="bold")
    t.append(f"{'dims':>{width - 9}}\n", style="dim")
    t.append("─" * width + "\n", style="dim")
    for name, op, shape, dims in rows:
        t.append_text(name)
        if shape is None:
            t.append("\n")
            continue
        s = _shape(shape)
        if name.cell_len + GAP + len(s) <= width:
            t.append(" " * (width - name.cell_len - len(s)))
        else:
            t.append("\n" + " " * max(width - len(s), 0))
        t.append(s + "\n", style="bold")
        formula = _wrap(op, width - len(indent))
        dim_lines = _wrap(", ".join(dims), width)
        for i, f in enumerate(formula):
            t.append(indent + f)
            last = indent + f
            if i == len(formula) - 1 and len(dim_lines) == 1 and (
                    cell_len(last) + GAP + len(dim_lines[0]) <= width):
                t.append(f"{dim_lines[0]:>{width - cell_len(last)}}", style="dim")
                dim_lines = []
            t.append("\n")
        for d in dim_lines:
            t.append(f"{d:>{width}}\n", style="dim")
    t.rstrip()
    return t


def _wrap(s: str, width: int) -> list[str]:
    """Greedy lines of at most `width` cells, broken between words; a longer word is folded."""
    lines: list[str] = []
    line = ""
    for word in s.split(" "):
        while cell_len(word) > width:  # fold, never cut
            if line:
                lines.append(line)
                line = ""
            head = set_cell_size(word, width).rstrip() or word[0]
            lines.append(head)
            word = word[len(head):]
        if line and cell_len(line) + 1 + cell_len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line or not lines else lines


def _shape_rows(steps: list[Step]) -> list[tuple]:
    """(name, formula, shape or None for a layer's title, dims), layers repeating layer 0 folded."""
    out: list[tuple] = []
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
                    out.append((Text(_layer_range(folded), style="cyan"),
                                f"same {len(layer0)} steps as blocks.0", mine[-1].shape,
                                mine[-1].dims))
                    folded = []
                continue
        name = s.name
        if layer is not None:
            if layer != current:
                out.append((Text(f"blocks.{layer}", style="bold cyan"), "", None, ()))
                current = layer
            name = "  " + s.name.split(".", 2)[2]
        out.append((Text(name, style="cyan"), s.op, s.shape, s.dims))
        i += 1
    return out


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
            pad_cols: np.ndarray | None = None,
            allowed: np.ndarray | None = None) -> RenderableType:
    """One attention pattern [q_len, k_len]: rows are queries, columns keys, cells colored.

    `allowed` [q_len, k_len] says where the mask lets a query see a key (None: everywhere);
    only the other cells are drawn ·. An allowed weight that rounds to 0 is drawn .00.
    """
    q_len, k_len = weights.shape
    cell = 4
    row_start = max(0, q_len - MAX_ROWS)
    fits = LABEL_WIDTH + 1 + k_len * cell <= max_width
    if not fits:
        return topk_view(weights, rows, cols, title, max_width, row_start, pad_rows, allowed)
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
            if allowed is not None and not allowed[q, k]:  # the mask: −∞ before softmax
                lines.append(f"{MASKED:>{cell - 1}} ", style="dim")
            else:
                lines.append(f"{_fmt01(w):>{cell - 1}}", style=cell_style(w))
                lines.append(" ")
        lines.append("\n")
    if row_start:
        lines.append(f"({_first_rows(row_start)} not shown)\n", style="dim italic")
    return lines


def _first_rows(n: int) -> str:
    return "first query row" if n == 1 else f"first {n} query rows"


def _fmt01(w: float) -> str:
    if w >= 0.995:
        return "1.0"
    return f"{w:.2f}"[1:]  # ".42": two decimals in three characters


def topk_view(weights: np.ndarray, rows: list[str], cols: list[str], title: str,
              max_width: int, row_start: int, pad_rows, allowed=None) -> RenderableType:
    """For a key axis too wide to draw: each query's strongest keys, in order.

    The explanation wraps like any sentence; the rows stay one line each (cut with …).
    """
    q_len, k_len = weights.shape
    per_key = 16
    k = max(1, (max_width - LABEL_WIDTH - 6) // per_key)
    which = "the strongest key of each query" if k == 1 else (
        f"the {k} strongest keys of each query, strongest first")
    note = Text(f"{k_len} keys do not fit in {max_width} columns: {which}", style="dim italic")
    out = Text(no_wrap=True, overflow="ellipsis")
    for q in range(row_start, q_len):
        out.append(f"{q:>5} {fit(rows[q], LABEL_WIDTH - 6):>{LABEL_WIDTH - 6}} ", style="cyan")
        if pad_rows is not None and pad_rows[q]:
            out.append("pad query: no keys\n", style="dim")
            continue
        # A masked key sorts after every allowed one, even after an allowed weight of 0.
        order = weights[q] if allowed is None else np.where(allowed[q], weights[q], -1.0)
        for j in np.argsort(-order, kind="stable")[:k]:
            if allowed is not None and not allowed[q, j]:
                break
            w = float(weights[q, j])
            out.append(f"{j}:", style="dim")
            out.append(set_cell_size(cols[j], 6), style="cyan")
            out.append(f"{_fmt01(w):>4}", style=cell_style(w))
            out.append("  ")
        out.rstrip()
        out.append("\n")
    parts: list[RenderableType] = [Text(title, style="bold", no_wrap=True, overflow="ellipsis"),
                                   note, out]
    if row_start:
        parts.append(Text(f"({_first_rows(row_start)} not shown; --json has every row)",
                          style="dim italic"))
    return Group(*parts)


def legend(padded: bool = False, width: int = 120) -> Text:
    ramp_text = Text("weight  0 ")
    ramp = "▁▂▃▄▅▆▇█"  # heights carry the scale where colors are off
    for i in range(16):
        ramp_text.append(ramp[i * len(ramp) // 16],
                         style=Style(color=Color.from_rgb(*color(i / 15))))
    ramp_text.append(" 1")
    masked = Text(f"{MASKED} masked (exactly 0: −∞ before softmax)", style="dim")
    small = Text(".00 allowed, below 0.005", style="dim")
    t = flow([ramp_text, masked, small], width, sep="    ")
    if padded:  # a line of its own: it never wraps between its mark and its words
        t.append(f"\n<pad> {PAD_ROW * 3} pad query: attends to nothing (row of 0)", style="dim")
    return t


def grid(items: list[Text], width: int) -> Text:
    """Blocks of text side by side, as many as their real widths fit in `width`, GAP apart.

    A block is as wide as its widest line, its title included. Joined line by line rather than
    laid out by a Rich Table: the blocks are laid out already, and a table's layout pass was
    most of the default view's rendering time.
    """
    blocks = [item.split("\n", allow_blank=True) for item in items]
    widths = [max((line.cell_len for line in lines), default=0) for lines in blocks]
    rows: list[list[int]] = []
    used = 0
    for i, w in enumerate(widths):
        if rows and rows[-1] and used + GAP + w <= width:
            rows[-1].append(i)
            used += GAP + w
        else:
            rows.append([i])
            used = w
    out = Text(no_wrap=True, overflow="crop")
    for row_of in rows:
        for r in range(max(len(blocks[i]) for i in row_of)):
            row = Text()
            for n, i in enumerate(row_of):
                line = blocks[i][r] if r < len(blocks[i]) else Text()
                row.append_text(line)
                if n < len(row_of) - 1:
                    row.append(" " * (widths[i] - line.cell_len + GAP))
            out.append_text(row.rstrip() or row)
            out.append("\n")
        if any(widths[i] > width for i in row_of):
            out.append(f"(cut at {width} columns; --json has every number)\n",
                       style="dim italic")
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
            allowed = allowed_mask(trace, kind, b)
            items = []
            for i, h in enumerate(heads):
                where = f" · text {b}" if len(trace.inputs) > 1 else ""
                items.append(heatmap(pattern[b, i], rows, cols,
                                     f"{kind} layer {layer} head {h}{where}", width,
                                     ~q_inp.valid, ~k_inp.valid, allowed))
            drawn = all(isinstance(item, Text) for item in items)  # not the strongest-keys view
            out.append(grid(items, width) if drawn else Group(*items))  # type: ignore[arg-type]
    return out


# ── stages and values ─────────────────────────────────────────────────────────────────────────

def stages(trace: Trace, layer: int, head: int, width: int, batch: int = 0) -> RenderableType:
    """One head's scores → scaled → masked → pattern, side by side."""
    index = trace.selection.heads.index(head)
    inp = trace.inputs[batch]
    allowed = allowed_mask(trace, "attn", batch)
    items = []
    for name in ("scores", "scaled", "masked", "pattern"):
        key = f"blocks.{layer}.attn.{name}"
        if key not in trace.tensors:
            continue
        m = trace.tensors[key][batch, index]
        items.append(matrix(m, labels(inp), labels(inp), f"{name}  {trace.step(key).op}",
                            probability=name == "pattern", allowed=allowed))
    return grid(items, width)


def matrix(m: np.ndarray, rows: list[str], cols: list[str], title: str,
           probability: bool = False, cell: int = 6,
           allowed: np.ndarray | None = None) -> Text:
    """A matrix of any reals, colored by its own finite range; −∞ drawn as such.

    Every number of one matrix has the same decimals, chosen from its widest value. For a
    probability matrix, `allowed` says where the mask lets a query see a key: · elsewhere.
    """
    finite = m[np.isfinite(m)]
    lo, hi = (0.0, 1.0) if probability or not finite.size else (float(finite.min()),
                                                                 float(finite.max()))
    span = hi - lo or 1.0
    digits = _decimals(finite, cell - 1)
    t = Text(no_wrap=True, overflow="crop")
    t.append(f"{title}\n", style="bold")
    if cols:
        t.append(" " * (LABEL_WIDTH + 1))
        for c in cols:
            t.append(f"{fit(c, cell - 1)} ", style="cyan")
        t.append("\n")
    for i in range(m.shape[0]):
        t.append(f"{fit(rows[i], LABEL_WIDTH)} ", style="cyan")
        for j, v in enumerate(m[i]):
            if not math.isfinite(v):
                t.append(f"{'−∞':>{cell - 1}} ", style="dim")
            elif probability and allowed is not None and not allowed[i, j]:
                t.append(f"{MASKED:>{cell - 1}} ", style="dim")
            else:
                t.append(f"{_fmt(float(v), digits):>{cell - 1}}",
                         style=cell_style((v - lo) / span))
                t.append(" ")
        t.append("\n")
    return t


def _decimals(finite: np.ndarray, width: int) -> int | None:
    """The most decimals (2, 1, 0) at which the widest value of a matrix fits `width`; None:
    not even 0 do, and the matrix is written in powers of ten."""
    if not finite.size:
        return 2
    extremes = (float(finite.min()), float(finite.max()))
    for digits in (2, 1, 0):
        if all(len(f"{v:.{digits}f}") <= width for v in extremes):
            return digits
    return None


def _fmt(v: float, digits: int | None) -> str:
    if digits is not None:
        return f"{v:.{digits}f}"
    mantissa, exponent = f"{v:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def attention_input(trace: Trace, layer: int) -> str:
    """The step name of what layer `layer`'s attention reads: X in Q = X·W_Q + b_Q."""
    if trace.config.arch == "gpt2":
        return f"blocks.{layer}.ln_1"
    return "resid_pre" if layer == 0 else f"blocks.{layer - 1}.resid_post"


def values(trace: Trace, weights: dict[str, np.ndarray], layer: int, width: int) -> list:
    """The actual numbers of one layer, for configurations small enough to read by hand:
    X, W_Q with b_Q under it, Q = X·W_Q + b_Q, the same for K and V, the stages, Z, W_O, out."""
    inp = trace.inputs[0]
    rows = labels(inp)
    prefix = f"blocks.{layer}.attn"
    dims = [str(i) for i in range(trace.config.d_model)]
    d_head = trace.config.d_head
    # Columns named head.dim: the split into heads is just this grouping of d_model.
    by_head = [f"h{i // d_head}.{i % d_head}" for i in range(trace.config.d_model)]
    out: list[RenderableType] = []
    x_name = attention_input(trace, layer)
    if x_name in trace.tensors:
        out.append(matrix(trace.tensors[x_name][0], rows, dims,
                          f"X  the input of {prefix}: {x_name}, {trace.step(x_name).op}"))
    else:
        out.append(Text(f"X ({x_name}) was not captured: not shown", style="dim italic"))

    def weight(n: str, w_cols: list[str]) -> None:
        w, b = weights.get(f"{prefix}.W_{n}"), weights.get(f"{prefix}.b_{n}")
        if w is None:
            return
        title = f"W_{n}  [d_model, d_model]" + (f" and b_{n}  [d_model]" if b is not None else "")
        block = matrix(w, dims, w_cols, title)
        if b is not None:  # the bias under W's columns: add it after the product, by column
            block.append_text(matrix(b[None, :], [f"b_{n}"], [], ""))
        out.append(block)

    for n in "QKV":
        weight(n, dims)
        key = f"{prefix}.{n.lower()}"
        if key in trace.tensors:
            out.append(matrix(trace.tensors[key][0], rows, by_head,
                              f"{n}  {trace.step(key).op}"))
    heads = trace.selection.heads
    allowed = allowed_mask(trace, "attn", 0)
    for name in ("scores", "scaled", "masked", "pattern"):
        key = f"{prefix}.{name}"
        if key in trace.tensors:
            out.append(grid([matrix(trace.tensors[key][0, i], rows, rows, f"{name} head {h}",
                                    probability=name == "pattern", allowed=allowed)
                             for i, h in enumerate(heads)], width))
    if f"{prefix}.z.merge" in trace.tensors:
        out.append(matrix(trace.tensors[f"{prefix}.z.merge"][0], rows, by_head,
                          "Z, heads merged  [len, d_model]"))
    weight("O", dims)
    if f"{prefix}.out" in trace.tensors:
        out.append(matrix(trace.tensors[f"{prefix}.out"][0], rows, dims,
                          f"out  {trace.step(f'{prefix}.out').op}"))
    return out


def _prob(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 or p == 0 else f"{p:.1e}"


def predictions(trace: Trace, width: int = 120,
                batch_rows: list[int] | None = None) -> RenderableType:
    """The next-token table of each batch row (of `batch_rows` when given)."""
    items: list[RenderableType] = []
    repeated = False
    for p in trace.predictions or []:
        if batch_rows is not None and p.batch not in batch_rows:
            continue
        inp = trace.inputs[p.batch]
        # The token's index among the text's real tokens, as in the token strip (with left
        # padding its batch position is further right).
        index = int(np.count_nonzero(inp.valid[: p.position + 1])) - 1
        last = inp.tokens[index]
        repeated |= bool(p.top) and p.top[0]["id"] == last.id
        where = f"text {p.batch}, " if len(trace.inputs) > 1 else ""
        title = Text("next token after “", style="bold")
        title.append(last.text, style="bold cyan")
        title.append(f"” ({where}position {index}, T = {trace.temperature:g})", style="bold")
        if items:
            items.append(Text(""))
        items.append(title)  # above the table: a table's title is only as wide as the table
        cols = [[str(len(p.top))], [t["text"] for t in p.top], [str(t["id"]) for t in p.top],
                [_prob(t["prob"]) for t in p.top], [f"{t['logit']:.3f}" for t in p.top]]
        numbers = sum(max(cell_len(c) for c in col) for col in cols) if p.top else 0
        # The bar gives way to the numbers: BAR cells at probability 1 where they fit (a Rich
        # column takes 3 more cells: its padding and the blank rule between columns).
        bar = min(BAR, width - numbers - 3 * len(cols))
        bar = bar if bar >= 5 else 0
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("#", justify="right", style="dim", no_wrap=True)
        table.add_column("token", style="cyan")
        table.add_column("id", justify="right", style="dim", no_wrap=True)
        table.add_column("prob", justify="right", no_wrap=True)
        table.add_column("logit", justify="right", style="dim", no_wrap=True)
        if bar:
            table.add_column("", no_wrap=True, overflow="crop")
        for rank, t in enumerate(p.top):
            # Rounded half up: no bar at all below 1/(2·BAR) = 1/60 at full size.
            cells = ["█" * int(t["prob"] * bar + 0.5)] if bar else []
            table.add_row(str(rank + 1), Text(t["text"]), str(t["id"]), _prob(t["prob"]),
                          f"{t['logit']:.3f}", *(Text(c, style="green") for c in cells))
        items.append(table)
    if not trace.config.weights:
        items.append(Text("These weights are random: the model is untrained, so these predictions"
                          " mean nothing. Use --weights for a real GPT-2.", style="yellow"))
        if repeated:
            items.append(Text("Why the last token again? Tied embeddings: h is dominated by "
                              "its own embedding, so h·W_Eᵀ peaks at it.", style="dim"))
    return Group(*items)


# ── the whole view ────────────────────────────────────────────────────────────────────────────

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
