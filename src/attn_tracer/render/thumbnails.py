"""Attention patterns shrunk to a few terminal cells: any [q_len, k_len] pattern → Rich Text lines.

One renderer for every caller (the `attn heads` overview of every head, a downsampled view of one
long pattern): `downsample` (analysis/pooling.py) makes the small matrix, `lines` draws it,
`thumbnail` does both.

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

from attn_tracer.analysis.pooling import batch_blocks, downsample, edges, indicator  # noqa: F401
from attn_tracer.render.layout import color as viridis

UPPER, LOWER = "▀", "▄"
RAMP = "▁▂▃▄▅▆▇█"  # the heatmap legend's ramp: heights carry the scale where colors are off


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
