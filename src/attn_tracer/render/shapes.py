"""The shape trace: every step with its formula, shape and dimension names, laid out for the
terminal's width (a shape is never split; a formula is wrapped between words, never cut)."""

from __future__ import annotations

from rich import box
from rich.cells import cell_len
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from attn_tracer.model.trace import Step
from attn_tracer.render.layout import GAP, wrap_words

MIN_FORMULA = 24  # the shape trace changes layout rather than give a formula less room


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
        formula = wrap_words(op, formula_w)
        right = [_shape(shape), *wrap_words(", ".join(dims), right_w)]
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
        formula = wrap_words(op, width - len(indent))
        dim_lines = wrap_words(", ".join(dims), width)
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


def _shape_rows(steps: list[Step]) -> list[tuple]:
    """(name, formula, shape or None for a layer's title, dims), layers repeating layer 0 folded.

    One pass over the steps (grouped by layer first): comparing each layer with layer 0 by
    scanning the whole list made the view quadratic in layers (98 s at 2,000 layers).
    """
    by_layer: dict[int, list[Step]] = {}
    for s in steps:
        if s.name.startswith("blocks."):
            by_layer.setdefault(int(s.name.split(".")[1]), []).append(s)
    layer0 = [_unlayered(s) for s in by_layer.get(0, [])]
    same = {layer: [_unlayered(x) for x in mine] == layer0 for layer, mine in by_layer.items()}
    out: list[tuple] = []
    folded: list[int] = []
    current = None
    i = 0
    while i < len(steps):
        s = steps[i]
        layer = int(s.name.split(".")[1]) if s.name.startswith("blocks.") else None
        if layer and same[layer]:
            mine = by_layer[layer]
            folded.append(layer)
            i += len(mine)
            nxt = steps[i] if i < len(steps) else None
            nxt_layer = int(nxt.name.split(".")[1]) if nxt and nxt.name.startswith(
                "blocks.") else None
            if not nxt_layer or not same[nxt_layer]:
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


def _unlayered(s: Step) -> tuple:
    return (s.name.split(".", 2)[2], s.op, s.shape, s.dims)


def _layer_range(layers: list[int]) -> str:
    return f"blocks.{layers[0]}" if len(layers) == 1 else f"blocks.{layers[0]}–{layers[-1]}"


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


# ── --cost: what each step costs, and how that grows with the text ────────────────────────────

GROWTH = {0: "1", 1: "len", 2: "len²"}


def _growth(power: int) -> Text:
    return Text(GROWTH.get(power, f"len^{power}"), style="bold yellow" if power >= 2 else "dim")


def cost_rows(steps: list[Step], costs: list) -> list[tuple]:
    """(name, shape, bytes, bytes power, multiply-adds, their power) a row; a layer's title
    has shape None; the layers that repeat layer 0 fold into one row holding their sums."""
    layer0 = [_unlayered(s) for s in steps if s.name.startswith("blocks.0.")]
    # Runs of steps: one step outside the layers, or a whole layer.
    runs: list[tuple[int | None, list[int]]] = []
    for i, s in enumerate(steps):
        layer = int(s.name.split(".")[1]) if s.name.startswith("blocks.") else None
        if layer is not None and runs and runs[-1][0] == layer:
            runs[-1][1].append(i)
        else:
            runs.append((layer, [i]))
    out: list[tuple] = []
    folded: list[tuple[int, list[int]]] = []

    def close() -> None:
        if folded:
            idx = [i for _, run in folded for i in run]
            out.append((Text(_layer_range([layer for layer, _ in folded]), style="cyan"),
                        "as blocks.0", sum(costs[i].bytes for i in idx),
                        max(costs[i].bytes_power for i in idx),
                        sum(costs[i].multiply_adds for i in idx),
                        max(costs[i].macs_power for i in idx)))
            folded.clear()

    for layer, run in runs:
        if layer and [_unlayered(steps[i]) for i in run] == layer0:
            folded.append((layer, run))
            continue
        close()
        if layer is not None:
            out.append((Text(f"blocks.{layer}", style="bold cyan"), None, 0, 0, 0, 0))
        for i in run:
            s, c = steps[i], costs[i]
            name = s.name if layer is None else "  " + s.name.split(".", 2)[2]
            out.append((Text(name, style="cyan"), _shape(s.shape), c.bytes, c.bytes_power,
                        c.multiply_adds, c.macs_power))
    close()
    return out


def cost_table(steps: list[Step], costs: list, width: int = 120) -> Table:
    """Each step's bytes and multiply-adds, with how each grows with the text's length (len²:
    the score matrices, and the product pattern·V that reads them). The shapes (in the shape
    trace above) give way first where the terminal is too narrow for them."""
    rows = cost_rows(steps, costs)
    cells = [(r[0].plain, r[1] or "", f"{r[2]:,}", f"{r[4]:,}") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    natural = (max(widths[0], 4) + max(widths[1], 5) + max(widths[2], 5) + 4
               + max(widths[3], 13) + 4 + 5 * 3)
    with_shape = natural <= width
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=False)
    table.add_column("step", style="cyan", no_wrap=True)
    if with_shape:
        table.add_column("shape", justify="right", no_wrap=True, style="bold")
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("∝", no_wrap=True, min_width=4)
    table.add_column("multiply-adds", justify="right", no_wrap=True)
    table.add_column("∝", no_wrap=True, min_width=4)
    for name, shape, size, bp, macs, mp in rows:
        lead = [name, *([shape or ""] if with_shape else [])]
        if shape is None:
            table.add_row(*lead, "", "", "", "")
            continue
        table.add_row(*lead, f"{size:,}", _growth(bp), f"{macs:,}" if macs else "—",
                      _growth(mp) if macs else Text(""))
    return table


def cost_summary(costs: list, length: int, peak: int, peak_doubled: int) -> Text:
    """One line: the totals, and what doubling the text does to them (each step's figure times
    2^power)."""
    from attn_tracer.model.memory import human

    size = sum(c.bytes for c in costs)
    macs = sum(c.multiply_adds for c in costs)
    size2 = sum(c.bytes * 2**c.bytes_power for c in costs)
    macs2 = sum(c.multiply_adds * 2**c.macs_power for c in costs)
    t = Text(f"total: {human(size)} in the steps' tensors, {_count(macs)} multiply-adds; peak "
             f"memory estimate {human(peak)} (the figure --max-memory checks). Doubling the text "
             f"({length} → {2 * length} tokens) multiplies each len² figure by 4 (the scores' "
             "bytes and multiply-adds, pattern·V's multiply-adds) and each len figure by 2: bytes "
             f"×{size2 / size:.2f}, multiply-adds ×{macs2 / macs if macs else 1:.2f}, peak "
             f"estimate {human(peak_doubled)}.", style="dim")
    return t


def kv_saving(config, length: int) -> Text:
    """What grouped-query attention saves against multi-head attention of the same heads."""
    d, w, kv, layers = config.d_model, config.d_attn, config.d_kv, config.layers
    return Text(
        f"grouped-query attention: K and V are kv_heads·d_head = {config.kv_heads}·"
        f"{config.d_head} = {kv} wide where Q is {w}: W_K and W_V hold {2 * d * kv:,} numbers a "
        f"layer instead of {2 * d * w:,}, K and V {2 * length * kv:,} a text instead of "
        f"{2 * length * w:,} ({layers} layer{'s' if layers > 1 else ''}: a K/V cache "
        f"{config.groups}× smaller); repeat_kv then copies each K/V head for its "
        f"{config.groups} query heads, so the scores and Z cost what they cost before.",
        style="dim")


def _count(n: float) -> str:
    for unit in ("", " thousand", " million", " billion"):
        if n < 1000:
            return f"{n:.0f}{unit}" if not unit else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f} trillion"


# ── --circuits: each head's value circuit, shapes, counts and rank, at any size ───────────────

def circuits_table(weights: dict, config, layers: tuple[int, ...], heads: tuple[int, ...],
                   kinds: tuple[str, ...] = ("attn",)) -> RenderableType:
    """Each shown head's value circuit: the shapes (the same for every head), then a row per
    head with its rank and the singular values that set it, then the parameter counts."""
    from rich.console import Group

    from attn_tracer.analysis.circuits import value_circuit

    d, dh = config.d_model, config.d_head
    shapes = Text(f"value down W_V[:, h] [{d}, {dh}] · value up W_O[h] [{dh}, {d}] = "
                  f"W_OV [{d}, {d}]")
    grouped = config.kv_heads != config.heads
    if grouped:  # W_V holds kv_heads blocks: each serves `groups` query heads
        shapes.append(f"; grouped-query: query head h reads W_V's block of K/V head "
                      f"⌊h / {config.groups}⌋ (column kv), shared with its group")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=False)
    table.add_column("head", style="cyan", no_wrap=True)
    if grouped:
        table.add_column("kv", justify="right", no_wrap=True)
    table.add_column("rank", justify="right", no_wrap=True, style="bold")
    table.add_column("≤", justify="right", no_wrap=True, style="dim")
    table.add_column("σ_max", justify="right", no_wrap=True)
    table.add_column("σ_min", justify="right", no_wrap=True)
    table.add_column("tolerance", justify="right", no_wrap=True, style="dim")
    for kind in kinds:
        for layer in layers:
            W_V = weights.get(f"blocks.{layer}.{kind}.W_V")
            W_O = weights.get(f"blocks.{layer}.{kind}.W_O")
            if W_V is None or W_O is None:
                continue
            for h in heads:
                vc = value_circuit(W_V, W_O, config.heads, h, config.kv_heads)
                name = f"L{layer}H{h}" + (" cross" if kind == "cross_attn" else "")
                sigma = vc.singular_values
                kv = [str(h // config.groups)] if grouped else []
                table.add_row(name, *kv, str(vc.rank), str(min(d, dh)), f"{sigma.max():.3g}",
                              f"{sigma.min():.3g}", f"{vc.tolerance:.1e}")
    full, factored = d * d, 2 * d * dh
    counts = Text(
        f"parameters of one head's value map: {full:,} as a full d_model² matrix, {factored:,} "
        f"as its two factors 2·d_model·d_head — the same as the head's share of W_Q and W_K "
        f"({d * dh:,} + {d * dh:,}). rank: the singular values of W_OV above the tolerance "
        "σ_max·d_model·ε_float32 (numpy.linalg.matrix_rank's rule, ε_float32 = 2⁻²³); σ_min is "
        f"the smallest of the top min(d_head, d_model). Stacked, the value-up matrices of all "
        f"heads are W_O [{config.attn_dim}, d_model].", style="dim")
    return Group(shapes, table, counts)
