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

from attn_tracer.model.trace import Trace
from attn_tracer.model.weights import LOGIT_STD
from attn_tracer.render import formats
from attn_tracer.render.heatmaps import (
    LABEL_WIDTH,
    MASKED,
    allowed_mask,
    column_labels,
    labels,
    numbered,
)
from attn_tracer.render.layout import cell_style, fit, grid, wrap_words

BAR = 30  # cells of a probability-1 bar in the predictions
# Rows of a prediction table drawn at most: beyond a few screens nobody reads them, and a Rich
# table costs milliseconds a row (--top-k 50257 took minutes). --json and --save have them all.
TOP_SHOWN = 100


def stages(trace: Trace, layer: int, head: int, width: int, batch: int = 0,
           kind: str = "attn") -> RenderableType:
    """One head's scores → scaled → (the mask, added) → masked → pattern, side by side."""
    index = trace.selection.heads.index(head)
    inp = trace.inputs[batch]
    rows = numbered(labels(inp), range(len(inp.valid)))  # positions when tokens repeat
    cols = labels(trace.cross[batch]) if kind == "cross_attn" else rows  # type: ignore[index]
    allowed = allowed_mask(trace, kind, batch)
    items: list[Text] = []
    for name in ("scores", "scaled", "masked", "pattern"):
        key = f"blocks.{layer}.{kind}.{name}"
        if key not in trace.tensors:
            continue
        if name == "masked" or (name == "pattern" and f"blocks.{layer}.{kind}.masked"
                                not in trace.tensors):  # no mask at all: says so there
            items.extend(mask_blocks(trace, kind, batch, width))
        m = trace.tensors[key][batch, index]
        # Each stage wraps into blocks of columns at the console's width: never cut.
        items.append(matrix(m, rows, cols, f"{name}  {trace.step(key).op}",
                            probability=name == "pattern", allowed=allowed, width=width))
    out: list[RenderableType] = [grid(items, width), Text(MASK_NOTE, style="dim")]
    if (key := f"blocks.{layer}.{kind}.pattern") in trace.tensors:
        out.append(softmax_note(trace.tensors[key][batch, index], allowed, inp.valid))
    return Group(*out)


def matrix(m: np.ndarray, rows: list[str], cols: list[str], title: str,
           probability: bool = False, cell: int = 6,
           allowed: np.ndarray | None = None, *, width: int | None = None,
           group: int | None = None, footer: tuple[str, np.ndarray] | None = None) -> Text:
    """A matrix of any reals, colored by its own finite range; −∞ drawn as such.

    Every number of one matrix has the same decimals, chosen from its widest value. For a
    probability matrix, `allowed` says where the mask lets a query see a key: · elsewhere.
    `group`: columns come in groups of this many (a head's d_head), a blank apart.
    `footer`: a labelled row (a bias) printed under the matrix after a blank line, in its own
    decimals. `width`: a matrix wider than this wraps into blocks of whole columns, each headed
    by the columns it holds (never cut); the title wraps between words.
    """
    n = m.shape[1]
    group = group if group and group < n else None
    spans = _column_spans(n, cell, group, width)
    t = Text(no_wrap=True, overflow="crop")
    for line in (wrap_words(title, width) if width and title else [title] if title else []):
        t.append(f"{line}\n", style="bold")
    body = _Numbers(m, probability, cell, allowed)
    bias = _Numbers(footer[1][None, :], False, cell) if footer is not None else None
    for a, b in spans:
        if len(spans) > 1:
            named = cols and (cols[a], cols[b - 1]) != (str(a), str(b - 1))
            t.append((f"columns {cols[a]} … {cols[b - 1]} ({a}–{b - 1} of {n})" if named
                      else f"columns {a}–{b - 1} of {n}") + "\n", style="dim italic")
        if cols:
            t.append(" " * (LABEL_WIDTH + 1))
            for j in range(a, b):
                t.append(_gap(j, a, group) + f"{fit(cols[j], cell - 1)} ", style="cyan")
            t.append("\n")
        for i in range(m.shape[0]):
            t.append(f"{fit(rows[i], LABEL_WIDTH)} ", style="cyan")
            body.row(t, i, a, b, group)
        if bias is not None:
            t.append("\n")
            t.append(f"{fit(footer[0], LABEL_WIDTH)} ", style="cyan")  # type: ignore[index]
            bias.row(t, 0, a, b, group)
    return t


def _gap(j: int, start: int, group: int | None) -> str:
    return " " if group and j > start and j % group == 0 else ""


def _column_spans(n: int, cell: int, group: int | None, width: int | None
                  ) -> list[tuple[int, int]]:
    """[start, stop) of each block of columns: one block if it fits `width`, else the most
    columns a block can hold, whole groups where at least one group fits."""
    def span_width(count: int) -> int:
        gaps = (count - 1) // group if group else 0
        return LABEL_WIDTH + 1 + count * cell + gaps

    if width is None or span_width(n) <= width:
        return [(0, n)]
    per = max(1, (width - LABEL_WIDTH - 1) // cell)
    while per > 1 and span_width(per) > width:
        per -= 1
    if group and per >= group:
        per -= per % group
    return [(a, min(a + per, n)) for a in range(0, n, per)]


class _Numbers:
    """The cells of one matrix: its decimals and color range, chosen once for all of it."""

    def __init__(self, m: np.ndarray, probability: bool, cell: int,
                 allowed: np.ndarray | None = None) -> None:
        finite = m[np.isfinite(m)]
        self.lo, hi = (0.0, 1.0) if probability or not finite.size else (
            float(finite.min()), float(finite.max()))
        self.span = hi - self.lo or 1.0
        self.digits = formats.fitting_decimals(finite, cell - 1)
        self.m, self.cell, self.probability, self.allowed = m, cell, probability, allowed

    def row(self, t: Text, i: int, a: int, b: int, group: int | None) -> None:
        w = self.cell - 1
        for j in range(a, b):
            v = float(self.m[i, j])
            t.append(_gap(j, a, group))
            if not math.isfinite(v):
                t.append(f"{'−∞':>{w}} ", style="dim")
            elif self.probability and self.allowed is not None and not self.allowed[i, j]:
                t.append(f"{MASKED:>{w}} ", style="dim")
            else:
                t.append(f"{formats.number(v, self.digits):>{w}}",
                         style=cell_style((v - self.lo) / self.span))
                t.append(" ")
        t.append("\n")


# ── the mask, as the matrix that is added to the scores ─────────────────────────────────────

def causal_mask(length: int, window: int | None):
    from attn_tracer.model.pipeline import causal_mask

    return causal_mask(length, window)


def mask_blocks(trace: Trace, kind: str, b: int, width: int | None = None) -> list[Text]:
    """The additive mask [q_len, k_len] of batch row `b`: 0 where a query may see a key, −∞
    where not. With padding and a causal mask, the two parts first and then their sum."""
    inp = trace.inputs[b]
    rows = labels(inp)
    keys = trace.cross[b] if kind == "cross_attn" else inp  # type: ignore[index]
    cols = column_labels(keys)
    padding = inp.valid[:, None] & keys.valid[None, :]
    window = trace.config.window if kind == "attn" else None
    causal = (causal_mask(len(inp.valid), window)
              if kind == "attn" and trace.config.mask == "causal" else None)
    padded = not padding.all()
    if causal is None and not padded:
        why = "cross-attention has no causal mask" if kind == "cross_attn" else "--mask none"
        return [Text(f"mask: none ({why}, no padding): the scores pass unchanged", style="dim")]
    parts = []
    if causal is not None:
        parts.append(additive(causal, rows, cols, "causal mask (k > q)" if window is None
                              else f"causal mask, window {window} (k > q or q − k ≥ {window})",
                              width))
    if padded:
        parts.append(additive(padding, rows, cols, "padding mask (pad)", width))
    if len(parts) == 2:
        parts.append(additive(causal & padding, rows, cols,  # type: ignore[operator]
                              "mask = causal + padding", width))
    return parts


def additive(allowed: np.ndarray, rows: list[str], cols: list[str], title: str,
             width: int | None = None) -> Text:
    """A mask matrix: 0 where allowed, −∞ elsewhere (what is added to the scores); wider than
    `width`, it wraps into blocks of columns as `matrix` does."""
    cell = 4
    n = allowed.shape[1]
    spans = _column_spans(n, cell, None, width)
    t = Text(no_wrap=True, overflow="crop")
    t.append(f"{title}\n", style="bold")
    for a, b in spans:
        if len(spans) > 1:
            t.append(f"columns {a}–{b - 1} of {n}\n", style="dim italic")
        t.append(" " * (LABEL_WIDTH + 1))
        for c in cols[a:b]:
            t.append(f"{fit(c, cell - 1)} ", style="cyan")
        t.append("\n")
        for i, row in enumerate(allowed):
            t.append(f"{fit(rows[i], LABEL_WIDTH)} ", style="cyan")
            for ok in row[a:b]:
                t.append(f"{'0' if ok else '−∞':>{cell - 1}} ", style="" if ok else "dim")
            t.append("\n")
    return t


MASK_NOTE = ("the mask [q_len, k_len] is added to the scores: 0 where a query may see a key, "
             "−∞ where it may not — causal: a later key (k > q); padding: a pad key, and every "
             "key of a pad query")


def softmax_note(pattern: np.ndarray, allowed: np.ndarray, valid_q: np.ndarray) -> Text:
    """What softmax makes of the mask, read off these patterns [..., q_len, k_len]: masked
    entries exactly 0, rows summing to 1 (a pad query's row, which sees no key, to 0)."""
    masked = pattern[..., ~allowed]
    sums = pattern.astype(np.float64).sum(axis=-1)
    real = valid_q & allowed.any(axis=-1)
    off = float(np.abs(sums[..., real] - 1).max(initial=0.0))
    t = Text("after softmax: ", style="dim")
    if masked.size:
        exact = "all exactly 0" if np.all(masked == 0) else "NOT all 0"
        t.append(f"the {masked.size} masked entr{'y' if masked.size == 1 else 'ies'} (e^−∞ = 0) "
                 f"are {exact}; ", style="dim")
    t.append(f"each query's row still sums to 1 (largest |Σ − 1| here: {off:.1e})", style="dim")
    if not real.all():
        t.append("; a pad query's row is all 0: it sees no key", style="dim")
    return t


# ── --values: one layer's numbers, each step from the ones before ───────────────────────────

def attention_input(trace: Trace, layer: int) -> str:
    """The step name of what layer `layer`'s attention reads: X in Q = X·W_Q + b_Q."""
    from attn_tracer.model.arch import family

    return family(trace.config).attention_input(layer)


def block_input(layer: int) -> str:
    """The residual stream entering layer `layer`."""
    return "resid_pre" if layer == 0 else f"blocks.{layer - 1}.resid_post"


def values(trace: Trace, weights: dict[str, np.ndarray], layer: int, width: int,
           kind: str = "attn", batch: int = 0) -> list:
    """The actual numbers of one attention block, for configurations small enough to read by
    hand: X, W_Q with b_Q under it, Q = X·W_Q + b_Q, the same for K and V, the stages with the
    mask, each head's Z, the merged Z, W_O, out; then each head's change ΔE and the residual,
    and one head's value circuit. `kind`: the self-attention (attn) or cross_attn block."""
    c = trace.config
    inp = trace.inputs[batch]
    rows = labels(inp)
    cross = kind == "cross_attn"
    keys = labels(trace.cross[batch]) if cross else rows  # type: ignore[index]
    prefix = f"blocks.{layer}.{kind}"
    dims = [str(i) for i in range(c.d_model)]
    d_head, w, wide = c.d_head, c.d_attn, c.attn_dim
    # Columns named head.dim: the split into heads is just this grouping of heads·d_head.
    by_head = [f"h{i // d_head}.{i % d_head}" for i in range(w)]
    grouped = c.kv_heads != c.heads and not cross
    # K and V: kv_heads·d_head columns, named kv{j}.dim, with grouped-query attention.
    kv_wide, kv_w = (c.kv_dim, c.d_kv) if grouped else (wide, w)
    kv_by_head = [f"kv{i // d_head}.{i % d_head}" for i in range(kv_w)] if grouped else by_head
    out: list[RenderableType] = []

    def block(m, r, cols, title, **kw) -> None:
        out.append(matrix(m, r, cols, title, width=width, **kw))

    def tensor(name: str, title: str, r=rows, cols=dims, **kw) -> None:
        if name in trace.tensors:
            block(trace.tensors[name][batch], r, cols, title, **kw)
        else:
            out.append(Text(f"{name} was not captured: not shown", style="dim italic"))

    q_len, k_len = len(rows), len(keys)
    x_name = f"blocks.{layer}.resid_mid" if cross else attention_input(trace, layer)
    tensor(x_name, f"X  the input of {prefix}: {x_name}, "
           f"{trace.step(x_name).op if x_name in trace.tensors else ''}  "
           f"{_shape(('len', 'd_model'), (q_len, c.d_model))}")
    if cross:
        tensor("cross.resid_pre", "X_kv  the cross text's embeddings: cross.resid_pre  "
               f"{_shape(('k_len', 'd_model'), (k_len, c.d_model))}", r=keys)

    def weight(n: str) -> None:
        W, b = weights.get(f"{prefix}.W_{n}"), weights.get(f"{prefix}.b_{n}")
        if W is None:
            return
        kv = n in "KV"
        width_name, names = (kv_wide, kv_by_head) if kv else (wide, by_head)
        shape = _shape((wide, "d_model") if n == "O" else ("d_model", width_name), W.shape)
        title = f"W_{n}  {shape}: " + (
            "rows by head (h.i: head h's dimension i)" if n == "O" else
            "columns by K/V head (kvj.i: K/V head j's dimension i)" if kv and grouped
            else "columns by head")
        if b is not None:
            title += f"; b_{n} [{'d_model' if n == 'O' else width_name}] under it"
        r, cols = (by_head, dims) if n == "O" else (dims, names)
        block(W, r, cols, title, group=d_head,
              footer=(f"b_{n}", b) if b is not None else None)

    for n in "QKV":
        weight(n)
        source = keys if cross and n != "Q" else rows
        length = ("k_len", k_len) if cross and n != "Q" else ("len", q_len)
        kv = n != "Q" and grouped
        tensor(f"{prefix}.{n.lower()}", f"{n}  {trace.step(f'{prefix}.{n.lower()}').op}  "
               f"{_shape((length[0], kv_wide if kv else wide), (length[1], kv_w if kv else w))}"
               f", grouped by {'K/V head' if kv else 'head'}",
               r=source, cols=kv_by_head if kv else by_head, group=d_head)
    heads = trace.selection.heads
    out.extend(modern_steps(trace, prefix, heads, rows, batch, width))
    allowed = allowed_mask(trace, kind, batch)
    for name in ("scores", "scaled", "masked", "pattern"):
        key = f"{prefix}.{name}"
        if key not in trace.tensors:
            continue
        if name == "masked" or (name == "pattern" and f"{prefix}.masked" not in trace.tensors):
            out.append(grid(mask_blocks(trace, kind, batch, width), width))
            out.append(Text(MASK_NOTE, style="dim"))
        out.append(grid([matrix(trace.tensors[key][batch, i], rows, keys,
                                f"{name} L{layer}H{h}  [{q_len}, {k_len}]",
                                probability=name == "pattern", allowed=allowed, width=width)
                         for i, h in enumerate(heads)], width))
        if name == "pattern":
            out.append(softmax_note(trace.tensors[key][batch], allowed, inp.valid))
    if f"{prefix}.z" in trace.tensors:
        head_cols = [str(i) for i in range(d_head)]
        out.append(grid([matrix(trace.tensors[f"{prefix}.z"][batch, i], rows, head_cols,
                                f"Z L{layer}H{h} = pattern·V  [{q_len}, {d_head}]",
                                width=width) for i, h in enumerate(heads)], width))
    tensor(f"{prefix}.z.merge", f"Z, heads merged (concat)  "
           f"{_shape(('len', wide), (q_len, w))}", cols=by_head, group=d_head)
    weight("O")
    tensor(f"{prefix}.out", f"out  {trace.step(f'{prefix}.out').op}  "
           f"{_shape(('len', 'd_model'), (q_len, c.d_model))}")
    out.extend(head_changes(trace, weights, layer, kind, batch, width))
    out.extend(value_circuit_view(weights, c, layer, kind, heads[0], width))
    return out


def modern_steps(trace: Trace, prefix: str, heads, rows: list[str], batch: int,
                 width: int) -> list[RenderableType]:
    """Rotary positions (each shown head's Q, and its K/V head's K, before and after the turn)
    and grouped-query attention (which query heads share which K/V head)."""
    c = trace.config
    out: list[RenderableType] = []
    d_head = c.d_head
    cols = [str(i) for i in range(d_head)]
    if f"{prefix}.q.rot" in trace.tensors:
        r = c.rotary_dims
        out.append(Text(f"rotary positions: {trace.step(f'{prefix}.q.rot').op}. The same token "
                        "at two positions gets two different rows, and the score of a turned "
                        "query and key depends only on how far apart they are.", style="dim"))
        layer = trace_layer(prefix)
        grouped = c.kv_heads != c.heads
        pairs = "(pairs i, i+" + str(r // 2) + ")" if c.rotary_style == "halves" \
            else "(pairs 2i, 2i+1)"
        # Q of each shown head; K of each K/V head they use (once: a group shares it). q.heads
        # and q.rot hold the shown heads; k.* every K/V head with grouped-query attention,
        # else the shown heads, as Q.
        shown = [("q", i, f"L{layer}H{h}") for i, h in enumerate(heads)]
        shown += ([("k", g, f"kv{g}") for g in sorted({h // c.groups for h in heads})]
                  if grouped else [("k", i, f"L{layer}H{h}") for i, h in enumerate(heads)])
        for n, at, name in shown:
            before, after = f"{prefix}.{n}.heads", f"{prefix}.{n}.rot"
            if before in trace.tensors and after in trace.tensors:
                out.append(matrix(trace.tensors[before][batch, at], rows, cols,
                                  f"{n.upper()} {name} before  [len, d_head]", width=width))
                out.append(matrix(trace.tensors[after][batch, at], rows, cols,
                                  f"{n.upper()} {name} turned  [len, d_head] {pairs}",
                                  width=width))
    if c.kv_heads != c.heads and f"{prefix}.k.repeat_kv" in {s.name for s in trace.steps}:
        groups = "; ".join(
            f"K/V head {j} → query heads "
            f"{', '.join(str(h) for h in range(j * c.groups, (j + 1) * c.groups))}"
            for j in range(c.kv_heads))
        out.append(Text(f"repeat_kv: {c.kv_heads} K/V heads for {c.heads} query heads, each "
                        f"shared by {c.groups}: {groups}. Query head h scores against K/V head "
                        f"⌊h / {c.groups}⌋'s K and mixes its V.", style="dim"))
    return out


def trace_layer(prefix: str) -> int:
    return int(prefix.split(".")[1])


def _shape(names: tuple[str, ...], sizes) -> str:
    """`[len, d_model] = [2, 4]`: a block's shape in dimension words and in numbers."""
    return f"[{', '.join(names)}] = [{', '.join(str(int(n)) for n in sizes)}]"


def head_change_rows(trace: Trace, weights: dict[str, np.ndarray], layer: int, kind: str,
                     batch: int):
    """(labels, rows [n, d_model], position, residual step) of each head's change
    ΔE_h = Z_h·W_O[h] at the last real position, then b_O, their sum, the block's `out`, the
    residual X entering the block and X + out; None when a part was not captured."""
    from attn_tracer.analysis.decompose import head_outputs

    prefix = f"blocks.{layer}.{kind}"
    c = trace.config
    merged = trace.tensors.get(f"{prefix}.z.merge")
    W_O = weights.get(f"{prefix}.W_O")
    if merged is None or W_O is None or f"{prefix}.out" not in trace.tensors:
        return None
    pos = int(np.flatnonzero(trace.inputs[batch].valid)[-1])
    # merge(Z) holds every head, whichever --head shows: the parts must add up to out.
    parts = head_outputs(merged[batch, pos].reshape(c.heads, c.d_head), W_O)  # [heads, d_model]
    b_O = weights.get(f"{prefix}.b_O")
    out = trace.tensors[f"{prefix}.out"][batch, pos]
    rows = [*parts, *([b_O] if b_O is not None else []),
            parts.sum(axis=0) + (b_O if b_O is not None else 0), out]
    names = [*(f"L{layer}H{h}" for h in range(c.heads)), *(["b_O"] if b_O is not None else []),
             "Σ", "out"]
    if kind == "cross_attn":
        x_name, resid = f"blocks.{layer}.resid_mid", f"blocks.{layer}.resid_post"
    else:
        x_name = block_input(layer)
        resid = (f"blocks.{layer}.resid_mid" if f"blocks.{layer}.resid_mid" in trace.tensors
                 else f"blocks.{layer}.resid_post")
    if x_name in trace.tensors and resid in trace.tensors:
        rows += [trace.tensors[x_name][batch, pos], trace.tensors[resid][batch, pos]]
        names += ["X", resid.rsplit(".", 1)[-1]]
    return names, np.stack(rows), pos, resid


def head_changes(trace: Trace, weights: dict[str, np.ndarray], layer: int, kind: str,
                 batch: int, width: int) -> list[RenderableType]:
    """Each head's change ΔE_h at the last real position, their sum with b_O (= out), and the
    residual X + out."""
    found = head_change_rows(trace, weights, layer, kind, batch)
    if found is None:
        return []
    names, rows, pos, resid = found
    inp = trace.inputs[batch]
    token = inp.tokens[int(np.count_nonzero(inp.valid[: pos + 1])) - 1].text
    step = resid.rsplit(".", 1)[-1]
    title = (f"each head's change ΔE_h = Z_h·W_O[h] (W_O[h]: head h's rows) at position {pos} "
             f"(“{token}”, the last real token): Σ = Σ_h ΔE_h + b_O = out, then the residual "
             f"{step} = X + out  [d_model]")
    dims = [str(i) for i in range(trace.config.d_model)]
    return [matrix(rows, names, dims, title, width=width)]


def value_circuit_view(weights: dict[str, np.ndarray], config, layer: int, kind: str,
                       head: int, width: int) -> list[RenderableType]:
    """Head `head`'s value map: value down (W_V's columns) · value up (W_O's rows) = W_OV,
    its rank and its parameter counts."""
    from attn_tracer.analysis.circuits import value_circuit

    prefix = f"blocks.{layer}.{kind}"
    W_V, W_O = weights.get(f"{prefix}.W_V"), weights.get(f"{prefix}.W_O")
    if W_V is None or W_O is None:
        return []
    vc = value_circuit(W_V, W_O, config.heads, head, config.kv_heads)
    d_model, d_head = config.d_model, config.d_head
    dims, head_dims = [str(i) for i in range(d_model)], [str(i) for i in range(d_head)]
    name = f"L{layer}H{head}"
    v = head if config.kv_heads == config.heads else f"kv{head // config.groups}"
    items = [
        matrix(vc.down, dims, head_dims, f"value down W_V[:, {v}]  "
               f"{_shape(('d_model', 'd_head'), vc.down.shape)}", width=width),
        matrix(vc.up, head_dims, dims, f"value up W_O[{head}]  "
               f"{_shape(('d_head', 'd_model'), vc.up.shape)}", width=width),
        matrix(vc.ov, dims, dims, f"W_OV = W_V[:, {v}]·W_O[{head}]  "
               f"{_shape(('d_model', 'd_model'), vc.ov.shape)}", width=width),
    ]
    return [Text(f"the value circuit of {name}{' (cross)' if kind == 'cross_attn' else ''}: "
                 "how the head maps what it reads to what it writes, d_model → d_model",
                 style="bold"),
            grid(items, width),
            Text(circuit_summary(vc, d_model, d_head), style="dim")]


def circuit_summary(vc, d_model: int, d_head: int) -> str:
    share = 2 * d_model * d_head
    return (f"rank {vc.rank} (≤ min(d_head, d_model) = {min(d_head, d_model)}; singular values "
            f"above σ_max·d_model·ε_float32 = {vc.tolerance:.1e}). Parameters: "
            f"{vc.full_params:,} as a full d_model² matrix, {vc.factored_params:,} as the two "
            f"factors 2·d_model·d_head, the same as the head's share of W_Q and W_K "
            f"({share // 2:,} + {share // 2:,}). Stacked, the value-up matrices of all heads "
            "are W_O.")


def prob_decimals(probs: list[float]) -> int:
    """One fixed-point style for a table's probabilities: enough decimals for two significant
    digits of its smallest nonzero one, 4 at least, 8 at most (JSON has the exact values)."""
    smallest = min((p for p in probs if p > 0), default=1.0)
    return min(max(math.ceil(-math.log10(smallest)) + 1, 4), 8)


EIGHTHS = " ▏▎▍▌▋▊▉"


def bar_text(fraction: float, cells: int) -> str:
    """A bar of `fraction` × `cells` cells, in eighths of a cell; any nonzero fraction gets at
    least one eighth, so that no probability above 0 goes without a bar."""
    eighths = round(fraction * cells * 8)
    if fraction > 0:
        eighths = max(eighths, 1)
    full, part = divmod(min(eighths, cells * 8), 8)
    return "█" * full + (EIGHTHS[part] if part else "")


def predictions(trace: Trace, width: int = 120,
                batch_rows: list[int] | None = None) -> RenderableType:
    """The next-token table of each batch row (of `batch_rows` when given)."""
    items: list[RenderableType] = []
    for p in trace.predictions or []:
        if batch_rows is not None and p.batch not in batch_rows:
            continue
        inp = trace.inputs[p.batch]
        # The token's index among the text's real tokens, as in the token strip (with left
        # padding its batch position is further right).
        index = int(np.count_nonzero(inp.valid[: p.position + 1])) - 1
        last = inp.tokens[index]
        where = f"text {p.batch}, " if len(trace.inputs) > 1 else ""
        title = Text("next token after “", style="bold")
        title.append(last.text, style="bold cyan")
        title.append(f"” ({where}position {index}, T = {trace.temperature:g})", style="bold")
        if items:
            items.append(Text(""))
        items.append(title)  # above the table: a table's title is only as wide as the table
        shown = p.top[:TOP_SHOWN]
        digits = prob_decimals([t["prob"] for t in shown])
        probs = [f"{t['prob']:.{digits}f}" for t in shown]
        cols = [[str(len(shown))], [t["text"] for t in shown], [str(t["id"]) for t in shown],
                probs, [f"{t['logit']:.3f}" for t in shown]]
        numbers = sum(max(cell_len(c) for c in col) for col in cols) if shown else 0
        # The bar gives way to the numbers: BAR cells for the top token where they fit (a Rich
        # column takes 3 more cells: its padding and the blank rule between columns). Bars are
        # relative to the top token, so that they show the distribution's shape at every
        # temperature (at T = 2 a random model's top token has 0.2 %: no bar at all otherwise).
        bar = min(BAR, width - numbers - 3 * len(cols))
        bar = bar if bar >= 5 else 0
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("#", justify="right", style="dim", no_wrap=True)
        table.add_column("token", style="cyan")
        table.add_column("id", justify="right", style="dim", no_wrap=True)
        table.add_column("prob", justify="right", no_wrap=True)
        table.add_column("logit", justify="right", style="dim", no_wrap=True)
        if bar:
            table.add_column("÷ #1" if bar >= 4 else "", no_wrap=True, overflow="crop")
        top = p.top[0]["prob"] if p.top else 0.0
        for rank, t in enumerate(shown):
            cells = [bar_text(t["prob"] / top if top > 0 else 0.0, bar)] if bar else []
            table.add_row(str(rank + 1), Text(t["text"]), str(t["id"]), probs[rank],
                          f"{t['logit']:.3f}", *(Text(c, style="green") for c in cells))
        items.append(table)
        if len(shown) < len(p.top):
            items.append(Text(f"showing the top {len(shown)} of {len(p.top)} (--top-k); --json "
                              f"lists all {len(p.top)}", style="dim"))
    if items:
        items.append(Text("prob: softmax(logits / T); the bars are each probability ÷ the top "
                          "token's (#1), the shape of the distribution at any T", style="dim"))
    if not trace.config.weights:
        items.append(Text("These weights are random: the model is untrained, so these predictions"
                          " mean nothing (its logits are (h / rms(h))·W_Uᵀ with a random, untied "
                          f"W_U: each is N(0, {LOGIT_STD:g}²)). Use --weights for a real GPT-2.",
                          style="yellow"))
    return Group(*items)
