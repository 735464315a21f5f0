"""Attention patterns as heatmaps: queries as rows, keys as columns, cells on the viridis
scale, `·` only where the mask forbids a cell; the strongest keys per query when the keys do not
fit the width."""

from __future__ import annotations

import numpy as np
from rich.cells import set_cell_size
from rich.color import Color
from rich.console import Group, RenderableType
from rich.style import Style
from rich.text import Text

from attn_tracer.render_layout import cell_style, color, fit, flow, grid
from attn_tracer.tokens import split_characters
from attn_tracer.trace import Input, Trace

MASKED = "·"
PAD_ROW = "─"  # a pad query attends to nothing: its row is struck through
LABEL_WIDTH = 10
MAX_ROWS = 24  # query rows drawn per heatmap before switching to the last rows only


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
