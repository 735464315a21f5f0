"""The explorer's screen geometry, shared by the data (which sizes the thumbnails before the app
starts) and the widgets that draw them. No Textual here."""

from __future__ import annotations

import math

from attn_tracer.render import thumbnails as render_thumbnails

PANEL_WIDTH = 46  # the side panel: the widest shape of GPT-2's steps and its dims fit
PANEL_FROM = 120  # terminals at least this wide show the side panel from the start
MIN_CELLS, MAX_CELLS = 3, 12  # a thumbnail's width in cells, as in attn heads
PAD = 1  # cells on each side of a thumbnail: where the cursor's bars go


def panel_shown(width: int) -> bool:
    return width >= PANEL_FROM


def grid_width(width: int) -> int:
    """Columns left for the overview grid (or a heatmap) in a terminal `width` wide."""
    return width - (PANEL_WIDTH if panel_shown(width) else 0) - 2  # the scrollbar and a gap


def label_width(layers: int) -> int:
    return len(f"L{layers - 1}") + 1


def thumbnail_box(width: int, heads: int, layers: int, color: bool) -> tuple[int, int]:
    """(pattern rows, key columns) of each thumbnail of the overview of a terminal `width` wide:
    as wide as the heads fit beside the layer labels (MIN_CELLS to MAX_CELLS), and square (a
    line holds two pattern rows in color, one in plain text)."""
    room = grid_width(width) - label_width(layers)
    cells = max(MIN_CELLS, min(MAX_CELLS, room // heads - 2 * PAD))
    return render_thumbnails.pixels(math.ceil(cells / 2), color), cells
