"""Attention patterns shrunk to a few terminal cells: any [q_len, k_len] pattern → Rich Text lines.

One renderer for every caller (the `attn heads` overview of every head, a downsampled view of one
long pattern): `downsample` makes the small matrix, `lines` draws it, `thumbnail` does both.

Downsampling: the queries and the keys are cut into contiguous blocks, and a thumbnail cell is
the weight a query gives that block of keys (summed over the block's keys), averaged over the
block's queries. So each thumbnail row is still a distribution over the keys that sums to 1, on
the heatmaps' 0–1 scale: a previous-token head is a bright diagonal, a sink a bright first
column, at 6 tokens as at 1,000. (A plain block mean would be about 1/k_len everywhere: a
1,000-token thumbnail would be uniformly dark.) When a block is one token by one token, the
thumbnail is the pattern itself. Masked cells add nothing; a block holding no allowed cell at
all (above the causal diagonal, or only padding) is left blank, never drawn as a weight of 0;
a pad query (no allowed key) is left out of its block's mean.

Drawing: in color, `▀` with the upper pixel as foreground and the lower as background packs
two pattern rows into one character row, so a cell is square; in plain text (NO_COLOR, a pipe)
one row per character with the legend's height ramp `▁▂▃▄▅▆▇█`.
"""

from __future__ import annotations

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text

from attn_tracer.render.layout import color as viridis

UPPER, LOWER = "▀", "▄"
RAMP = "▁▂▃▄▅▆▇█"  # the heatmap legend's ramp: heights carry the scale where colors are off


def edges(n: int, parts: int) -> np.ndarray:
    """Block boundaries cutting n positions into min(parts, n) contiguous, near-equal blocks."""
    parts = max(1, min(parts, n))
    return np.round(np.linspace(0, n, parts + 1)).astype(np.int64)


def indicator(n: int, parts: int, start: int = 0, total: int | None = None) -> np.ndarray:
    """[blocks, total]: 1 where position (start + i) lies in block b of the n positions."""
    total = n if total is None else total
    e = edges(n, parts)
    out = np.zeros((len(e) - 1, total), np.float32)
    for b in range(len(e) - 1):
        out[b, start + e[b]:start + e[b + 1]] = 1
    return out


def downsample(pattern: np.ndarray, rows: int, cols: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """pattern [q_len, k_len] → (values, drawn), both [min(rows, q_len), min(cols, k_len)].

    values: per block, the weight a query gives the block's keys, averaged over the block's
    queries (pad queries, which have no allowed key, left out); drawn: whether the block holds an
    allowed cell (`allowed` [q_len, k_len], None: every cell is).
    """
    q_len, k_len = pattern.shape
    R, C = indicator(q_len, rows), indicator(k_len, cols).T
    if allowed is None:
        weights = R
        drawn = np.ones((R.shape[0], C.shape[1]), bool)
    else:
        weights = R * allowed.any(axis=1)
        drawn = (R @ allowed.astype(np.float32) @ C) > 0
    counts = weights.sum(axis=1, keepdims=True)
    weights = weights / np.where(counts > 0, counts, 1)
    values = weights @ pattern.astype(np.float32) @ C
    return values, drawn


def batch_blocks(valid: np.ndarray, rows: int, cols: int, causal: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The block matrices of a padded batch, each text cut over its real tokens only.

    Returns R [batch, rows', len] (the mean over a block's queries), C [batch, len, cols']
    (the sum over a block's keys), drawn [batch, rows', cols'] and sizes [batch, 2] (each
    text's own rows and columns; the rest is zero padding), so that R·A·C is every thumbnail
    of a layer at once, on any engine.
    """
    batch, length = valid.shape
    n = valid.sum(axis=1)
    r_max, c_max = int(min(rows, n.max())), int(min(cols, n.max()))
    R = np.zeros((batch, r_max, length), np.float32)
    C = np.zeros((batch, length, c_max), np.float32)
    drawn = np.zeros((batch, r_max, c_max), bool)
    sizes = np.zeros((batch, 2), np.int64)
    for b in range(batch):
        start = int(np.argmax(valid[b]))
        rb = indicator(int(n[b]), rows, start, length)
        cb = indicator(int(n[b]), cols, start, length)
        R[b, :len(rb)] = rb / rb.sum(axis=1, keepdims=True)
        C[b, :, :len(cb)] = cb.T
        real = valid[b]
        allowed = real[:, None] & real[None, :]
        if causal:
            allowed &= np.tri(length, dtype=bool)
        drawn[b, :len(rb), :len(cb)] = (rb @ allowed.astype(np.float32) @ cb.T) > 0
        sizes[b] = len(rb), len(cb)
    return R, C, drawn, sizes


def _rgb(value: float) -> Color:
    return Color.from_rgb(*viridis(float(value)))


def lines(values: np.ndarray, drawn: np.ndarray, color: bool = True) -> list[Text]:
    """Draw a downsampled pattern: color, two pixel rows per line (`▀`); plain, one per line."""
    rows, cols = values.shape
    out = []
    if not color:
        for r in range(rows):
            t = Text(no_wrap=True, overflow="crop")
            for c in range(cols):
                if not drawn[r, c]:
                    t.append(" ")
                else:
                    v = min(max(float(values[r, c]), 0.0), 1.0)
                    t.append(RAMP[min(int(v * len(RAMP)), len(RAMP) - 1)])
            out.append(t)
        return out
    for r in range(0, rows, 2):
        t = Text(no_wrap=True, overflow="crop")
        for c in range(cols):
            up = drawn[r, c]
            down = r + 1 < rows and drawn[r + 1, c]
            if up and down:
                t.append(UPPER, Style(color=_rgb(values[r, c]), bgcolor=_rgb(values[r + 1, c])))
            elif up:
                t.append(UPPER, Style(color=_rgb(values[r, c])))
            elif down:
                t.append(LOWER, Style(color=_rgb(values[r + 1, c])))
            else:
                t.append(" ")
        out.append(t)
    return out


def pixels(height: int, color: bool) -> int:
    """Pattern rows that fit `height` lines: two per line in color, one in plain text."""
    return 2 * height if color else height


def thumbnail(pattern: np.ndarray, width: int, height: int, allowed: np.ndarray | None = None,
              color: bool = True) -> list[Text]:
    """Any pattern [q_len, k_len] in at most `width` columns × `height` lines of Text."""
    values, drawn = downsample(pattern, pixels(height, color), width, allowed)
    return lines(values, drawn, color)
