"""The numbers themselves: one head's score stages side by side, a small layer's matrices for
`--values`, and the next-token predictions."""

from __future__ import annotations

import math

import numpy as np
from rich import box
from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from attn_tracer.render_heatmaps import LABEL_WIDTH, MASKED, allowed_mask, labels
from attn_tracer.render_layout import cell_style, fit, grid
from attn_tracer.trace import Trace

BAR = 30  # cells of a probability-1 bar in the predictions
# Rows of a prediction table drawn at most: beyond a few screens nobody reads them, and a Rich
# table costs milliseconds a row (--top-k 50257 took minutes). --json and --save have them all.
TOP_SHOWN = 100


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
        top = p.top[:TOP_SHOWN]
        cols = [[str(len(top))], [t["text"] for t in top], [str(t["id"]) for t in top],
                [_prob(t["prob"]) for t in top], [f"{t['logit']:.3f}" for t in top]]
        numbers = sum(max(cell_len(c) for c in col) for col in cols) if top else 0
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
        for rank, t in enumerate(top):
            # Rounded half up: no bar at all below 1/(2·BAR) = 1/60 at full size.
            cells = ["█" * int(t["prob"] * bar + 0.5)] if bar else []
            table.add_row(str(rank + 1), Text(t["text"]), str(t["id"]), _prob(t["prob"]),
                          f"{t['logit']:.3f}", *(Text(c, style="green") for c in cells))
        items.append(table)
        if len(top) < len(p.top):
            items.append(Text(f"showing the top {len(top)} of {len(p.top)} (--top-k); --json "
                              f"lists all {len(p.top)}", style="dim"))
    if not trace.config.weights:
        items.append(Text("These weights are random: the model is untrained, so these predictions"
                          " mean nothing. Use --weights for a real GPT-2.", style="yellow"))
        if repeated:
            items.append(Text("Why the last token again? Tied embeddings: h is dominated by "
                              "its own embedding, so h·W_Eᵀ peaks at it.", style="dim"))
    return Group(*items)
