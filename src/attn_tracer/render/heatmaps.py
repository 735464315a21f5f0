"""Attention patterns as heatmaps: queries as rows, keys as columns, cells on the viridis scale.

Masked cells are drawn from the real mask, never from a weight of 0: `·` where the causal mask
forbids a key, `×` where padding does (a pad key, or any key of a pad query). Every query row of
the chosen range is drawn; when the keys do not fit the width, each query lists its strongest
keys instead, and the view says which rows it listed and how to see the others.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
from rich.cells import cell_len, set_cell_size
from rich.color import Color
from rich.console import Group, RenderableType
from rich.style import Style
from rich.text import Text

from attn_tracer.model.tokens import split_characters
from attn_tracer.model.trace import Input, Trace
from attn_tracer.render import formats
from attn_tracer.render.layout import cell_style, color, fit, flow, grid

MASKED = "·"  # the causal mask: a key after the query
PADDED = "×"  # the padding mask: a pad key, or every key of a pad query
WINDOW = "∘"  # the sliding window (--window W): a key W or more positions before the query
PAD_ROW = PADDED  # a pad query's row: every cell is the padding mask
PAD_LABEL = "pad"
LABEL_WIDTH = 10  # row labels of the --values and --stages matrices
MAX_LABEL = 16  # the widest a heatmap's row label grows
MIN_CELL, MAX_CELL = 4, 8  # cells of a heatmap column: "1.0 " at least, a short word at most
LISTED_ROWS = 24  # query rows listed by the strongest-keys view when no --query is given
SUBSCRIPTS = "₀₁₂₃₄₅₆₇₈₉"
PIECE = "₁"  # every split character has a first piece: its mark tells a view to explain


def allowed_mask(trace: Trace, kind: str, b: int) -> np.ndarray:
    """allowed [q_len, k_len] of batch row `b`: where the mask lets a query look at a key.

    Self-attention: both positions hold real tokens, and k ≤ q under a causal mask.
    Cross-attention: the query and the key (of the cross text) hold real tokens.
    A weight of exactly 0 elsewhere is a softmax that underflowed, not a mask.
    """
    valid_q = trace.inputs[b].valid
    if kind == "cross_attn":
        return valid_q[:, None] & trace.cross[b].valid[None, :]  # type: ignore[index]
    from attn_tracer.model.pipeline import causal_mask

    allowed = valid_q[:, None] & valid_q[None, :]
    if trace.config.mask == "causal":
        allowed &= causal_mask(len(valid_q), trace.config.window)
    return allowed


def mask_marks(trace: Trace, kind: str, b: int) -> np.ndarray:
    """[q_len, k_len] of "" (allowed), MASKED (the causal mask), WINDOW (outside the sliding
    window) or PADDED (the padding mask)."""
    valid_q = trace.inputs[b].valid
    valid_k = trace.cross[b].valid if kind == "cross_attn" else valid_q  # type: ignore[index]
    padded = ~(valid_q[:, None] & valid_k[None, :])
    marks = np.full(padded.shape, "", dtype=object)
    marks[~allowed_mask(trace, kind, b)] = MASKED
    if kind != "cross_attn" and trace.config.window is not None:
        length = len(valid_q)
        past = np.tri(length, dtype=bool) & ~np.tri(length, k=-trace.config.window, dtype=bool)
        marks[np.tri(length, dtype=bool) & ~past] = WINDOW
    marks[padded] = PADDED
    return marks


def labels(inp: Input) -> list[str]:
    """Exact row labels for every batch position (the --values and --stages matrices): the
    token's label, and for a token holding part of a character, that character first
    (`今₁ <e4 bb>`), so a cut label keeps it."""
    short = column_labels(inp)
    return [f"{s} {full}" if _has_piece(full) else full
            for s, full in zip(short, _exact(inp), strict=True)]


def reading_labels(inp: Input) -> list[str]:
    """Labels to read a text by (the token list, heatmap rows): exact, except that a piece of a
    character is that character and the piece's number, `␣今₁ 今₂`, its leading space kept."""
    return [("␣" if full.startswith("␣") else "") + s if _has_piece(full) else full
            for s, full in zip(column_labels(inp), _exact(inp), strict=True)]


def column_labels(inp: Input) -> list[str]:
    """Short labels for narrow columns: no ␣ (the rows have it), no brackets around <U+200D>,
    and a piece of a character as that character with the piece's number: `今₁ 今₂` reads as
    one 今, not two."""
    out = []
    seen: Counter[str] = Counter()
    previous = ""
    for label, part in _per_position(inp):
        if label is None:
            out.append(PAD_LABEL)
            previous = ""
            continue
        if part:
            seen[part] = seen[part] + 1 if part == previous else 1
            previous = part
            out.append(_unbracket(part) + _subscript(seen[part]))
        else:
            previous = ""
            out.append(_unbracket(label.removeprefix("␣") or label))
    return out


def _unbracket(label: str) -> str:
    return label.replace("<U+", "U+").replace(">", "") if "<U+" in label else label


def _exact(inp: Input) -> list[str]:
    return [PAD_LABEL if label is None else label for label, _ in _per_position(inp)]


_BYTES = re.compile(r"<[0-9a-f]{2}( [0-9a-f]{2})*>")  # tokens.label's bytes of a split character


def _has_piece(label: str) -> bool:
    return _BYTES.search(label) is not None


def _subscript(n: int) -> str:
    return "".join(SUBSCRIPTS[int(d)] for d in str(n))


def _per_position(inp: Input) -> list[tuple[str | None, str]]:
    """(label, the character it is part of) for every batch position; None at pad positions."""
    toks = iter(zip(inp.tokens, split_characters(inp.tokens), strict=True))
    out: list[tuple[str | None, str]] = []
    for real in inp.valid:
        if real:
            tok, part = next(toks)
            out.append((tok.text, part))
        else:
            out.append((None, ""))
    return out


def numbered(names: list[str], positions: range, always: bool = False) -> list[str]:
    """Labels with their position in front when two of them read the same (or `always`)."""
    real = [n for n in names if n != PAD_LABEL]  # pads repeat, and say so themselves
    if not always and len(set(real)) == len(real):
        return names
    return [f"{p} {n}" for p, n in zip(positions, names, strict=True)]


def heatmap(weights: np.ndarray, rows: list[str], cols: list[str], title: str,
            max_width: int, marks: np.ndarray, queries: range | None = None,
            keys: range | None = None, color: bool = True) -> RenderableType:
    """One attention pattern [q_len, k_len]: the rows `queries` and the columns `keys` of it.

    `marks` (mask_marks) says which cells a mask forbids; an allowed weight that rounds to 0 is
    drawn .00. Falls back to each query's strongest keys when the columns do not fit.
    """
    q_len, k_len = weights.shape
    queries = queries if queries is not None else range(q_len)
    keys = keys if keys is not None else range(k_len)
    # Positions in front when labels repeat, or when only some rows are drawn.
    every = numbered(rows, range(q_len), always=len(queries) < q_len)
    row_names = [every[q] for q in queries]
    col_names = [cols[k] for k in keys]
    label_width = min(max(cell_len(r) for r in row_names), MAX_LABEL, max(max_width // 4, 4))
    room = max_width - label_width - 1
    if len(keys) * MIN_CELL > room:
        return topk_view(weights, rows, cols, title, max_width, marks, queries, keys, color)
    # Columns as wide as their longest label needs, within the width there is.
    cell = max(MIN_CELL, min(MAX_CELL, max(cell_len(c) for c in col_names) + 1,
                             room // len(keys)))
    lines = Text(no_wrap=True, overflow="crop")
    lines.append(f"{title}\n", style="bold")
    real_cols = [c for c in col_names if c != PAD_LABEL]
    # Key positions above the labels when labels repeat, or when only some keys are drawn.
    if len(set(real_cols)) < len(real_cols) or len(keys) < k_len:
        lines.append(" " * (label_width + 1))
        lines.append("".join(f"{k:>{cell - 1}} " for k in keys).rstrip(), style="dim")
        lines.append("\n")
    lines.append(" " * (label_width + 1))
    for name in col_names:
        lines.append(f"{fit(name, cell - 1)} ", style="dim" if name == PAD_LABEL else "cyan")
    lines.rstrip()
    lines.append("\n")
    for q, name in zip(queries, row_names, strict=True):
        pad_row = bool((marks[q] == PADDED).all())
        lines.append(f"{fit(name, label_width)} ", style="dim" if pad_row else "cyan")
        for k in keys:
            if marks[q, k]:  # the mask: −∞ before softmax, exactly 0 after
                lines.append(f"{marks[q, k]:>{cell - 1}} ", style="dim")
            else:
                w = float(weights[q, k])
                lines.append(" " * (cell - 4))
                lines.append(f"{formats.unit(w):>3}", style=cell_style(w))
                lines.append(" ")
        lines.rstrip()
        lines.append("\n")
    return lines


def _ranges_note(queries: range, q_len: int, keys: range, k_len: int) -> str:
    parts = []
    if len(queries) < q_len:
        parts.append(f"{'query' if len(queries) == 1 else 'queries'} {_span(queries)} of "
                     f"0–{q_len - 1}")
    if len(keys) < k_len:
        parts.append(f"{'key' if len(keys) == 1 else 'keys'} {_span(keys)} of 0–{k_len - 1}")
    return " · ".join(parts)


def _span(r: range) -> str:
    return str(r.start) if len(r) == 1 else f"{r.start}–{r.stop - 1}"


def overview(weights: np.ndarray, marks: np.ndarray, queries: range, keys: range,
             max_width: int, color: bool) -> list[Text]:
    """The whole pattern (its `queries` × `keys`), downsampled to fit the width: the thumbnail
    renderer of `attn heads`, with query positions down the left and key positions below."""
    from attn_tracer.render.thumbnails import edges, pixels, thumbnail

    q_index, k_index = np.asarray(queries), np.asarray(keys)
    sub = weights[np.ix_(q_index, k_index)]
    allowed = marks[np.ix_(q_index, k_index)] == ""
    axis = len(str(queries.stop - 1)) + 1
    cols = max(1, min(len(keys), max_width - axis - 1))
    height = max(2, min(24, cols // 2 if color else cols // 4, len(queries)))
    drawn = thumbnail(sub, cols, height, allowed, color)
    q_edges = edges(len(queries), pixels(height, color))
    step = 2 if color else 1
    out = [Text(f"the whole pattern, {len(queries)} queries × {len(keys)} keys in "
                f"{len(drawn)} lines × {cols} cells (a cell: the weight a query gives a block of "
                "keys, averaged over the block's queries)", style="dim italic")]
    for line, t in enumerate(drawn):
        first = queries.start + int(q_edges[min(line * step, len(q_edges) - 1)])
        row = Text(f"{first:>{axis - 1}} ", style="dim")
        row.append_text(t)
        out.append(row)
    k_edges = edges(len(keys), cols)
    ticks = [" "] * cols
    for c in range(0, cols, 12):
        label = str(keys.start + int(k_edges[c]))
        if c + len(label) <= cols:
            ticks[c:c + len(label)] = list(label)
    out.append(Text(" " * axis + "".join(ticks).rstrip(), style="dim"))
    return out


def topk_view(weights: np.ndarray, rows: list[str], cols: list[str], title: str,
              max_width: int, marks: np.ndarray, queries: range, keys: range,
              color: bool = True) -> RenderableType:
    """For a key axis too wide to draw: each query's strongest keys, in order.

    Keys below 0.005 are not listed (they would all read .00). Without --query, the last
    LISTED_ROWS queries are listed and the note says how to list the others.
    """
    q_len, k_len = weights.shape
    asked = len(queries) < q_len
    listed = queries if asked or len(queries) <= LISTED_ROWS else range(
        queries.stop - LISTED_ROWS, queries.stop)
    key_index = np.asarray(keys)
    name_width = min(max(cell_len(rows[q]) for q in listed), 10)
    pos_width = len(str(listed.stop - 1))
    per_key = len(str(k_len - 1)) + 1 + 6 + 5  # "123:" + 6-cell label + " .42" + gap
    k = max(1, (max_width - pos_width - name_width - 2) // per_key)
    which = "the strongest key of each query" if k == 1 else (
        f"the {k} strongest keys of each query, strongest first (keys from 0.005)")
    note = Text(f"{len(keys)} keys do not fit in {max_width} columns: {which}",
                style="dim italic")
    out = Text(no_wrap=True, overflow="ellipsis")
    for q in listed:
        out.append(f"{q:>{pos_width}} {fit(rows[q], name_width)} ", style="cyan")
        if (marks[q] == PADDED).all():
            out.append("pad query: attends to nothing\n", style="dim")
            continue
        allowed = marks[q, key_index] == ""
        w_row = weights[q, key_index]
        # A masked key sorts after every allowed one, even after an allowed weight of 0.
        order = np.where(allowed, w_row, -1.0)
        for j in np.argsort(-order, kind="stable")[:k]:
            if not allowed[j] or w_row[j] < 0.005:
                break
            label = cut_label(cols[key_index[j]], 6)
            out.append(f"{key_index[j]:>{len(str(k_len - 1))}}:", style="dim")
            out.append(label, style="cyan")
            out.append(" " * (7 - cell_len(label)))  # padded by cells: CJK and emoji take two
            out.append(f"{formats.unit(float(w_row[j])):>3}", style=cell_style(float(w_row[j])))
            out.append("  ")
        out.rstrip()
        out.append("\n")
    parts: list[RenderableType] = [Text(title, style="bold", no_wrap=True, overflow="ellipsis"),
                                   *overview(weights, marks, queries, keys, max_width, color),
                                   note, out]
    if len(listed) < len(queries):
        first = listed.start
        parts.append(Text(f"(queries 0–{first - 1} not listed: list them with --query "
                          f"0:{first - 1}; --json has every row)", style="dim italic"))
    elif cut := _ranges_note(queries, q_len, keys, k_len):
        parts.append(Text(f"({cut})", style="dim italic"))
    return Group(*parts)


def legend(padded: bool = False, width: int = 120, *, causal: bool = True,
           colored: bool = True, window: int | None = None) -> Text:
    """What the marks and colors mean; only the marks this view can contain."""
    items = []
    if colored:  # without colors the cells are their numbers alone: a ramp would match nothing
        ramp_text = Text("weight  0 ")
        ramp = "▁▂▃▄▅▆▇█"
        for i in range(16):
            ramp_text.append(ramp[i * len(ramp) // 16],
                             style=Style(color=Color.from_rgb(*color(i / 15))))
        ramp_text.append(" 1")
        items.append(ramp_text)
    if causal:
        items.append(Text(f"{MASKED} causal mask", style="dim"))
    if window is not None:
        items.append(Text(f"{WINDOW} sliding window (a query sees its last {window} keys)",
                          style="dim"))
    if padded:
        items.append(Text(f"{PADDED} padding mask (pad key, or pad query)", style="dim"))
    if causal or padded:
        items.append(Text("masked = −∞ before softmax, exactly 0 after", style="dim"))
    items.append(Text(".00 allowed, below 0.005", style="dim"))
    items.append(Text("each row sums to 1 before rounding", style="dim"))
    return flow(items, width, sep="    ")


def attention_maps(trace: Trace, width: int, kind: str = "attn",
                   batch_rows: list[int] | None = None, queries: range | None = None,
                   keys: range | None = None, color: bool = True) -> list[RenderableType]:
    out: list[RenderableType] = []
    heads = trace.selection.heads
    keys_from = trace.cross if kind == "cross_attn" else trace.inputs
    for layer, pattern in trace.patterns(kind):
        for b in batch_rows if batch_rows is not None else range(pattern.shape[0]):
            q_inp, k_inp = trace.inputs[b], keys_from[b]  # type: ignore[index]
            rows, cols = reading_labels(q_inp), column_labels(k_inp)  # once per row
            marks = mask_marks(trace, kind, b)
            items = []
            for i, h in enumerate(heads):
                where = f" · text {b}" if len(trace.inputs) > 1 else ""
                items.append(heatmap(pattern[b, i], rows, cols, f"{kind} layer {layer} head {h}"
                                     f"{where}", width, marks, queries, keys, color))
            drawn = all(isinstance(item, Text) for item in items)  # not the strongest-keys view
            out.append(grid(items, width) if drawn else Group(*items))  # type: ignore[arg-type]
            q_len, k_len = len(q_inp.valid), len(k_inp.valid)
            if drawn and (cut := _ranges_note(queries or range(q_len), q_len,
                                              keys or range(k_len), k_len)):
                out.append(Text(f"({cut})", style="dim italic"))  # wraps, unlike the blocks
    return out


def shaded_text(weights: np.ndarray, labels_: list[str], marks: np.ndarray, query: int,
                width: int, numbers: bool) -> Text:
    """The text itself, each token on the color of the weight query `query` gives it.

    Masked keys are dim; `numbers` writes each weight after its token (always, without color,
    so the view still says what the colors would).
    """
    items = []
    for k, label in enumerate(labels_):
        if marks[query, k]:
            items.append(Text(label, style="dim"))
            continue
        w = float(weights[query, k])
        item = Text(label, style=cell_style(w))
        if numbers:
            item.append(f" {formats.unit(w)}", style="dim")
        items.append(item)
    return flow(items, width, sep=" ")


def cut_label(label: str, width: int) -> str:
    """`label` in at most `width` cells, cut with … (not right-aligned)."""
    if cell_len(label) <= width:
        return label
    return set_cell_size(label, width - 1) + "…"
