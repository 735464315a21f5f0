"""A grid drawn with Textual's line API: fixed header lines on top, fixed labels on the left,
and a body that scrolls under them; only the visible lines, and in them only the visible
columns, are ever drawn (so a 1,024 × 1,024 pattern costs what the screen shows).

Subclasses say how big the body is (`body_size`) and draw the parts: `header_line(y, x0, x1)`,
`label(row)` and `body_line(row, x0, x1)`, the latter two cropped to body columns x0..x1.
"""

from __future__ import annotations

import functools

from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from attn_tracer.render.layout import cell_style


def cells(segments: list[Segment], x0: int, x1: int, origin: int, fill: Style) -> Strip:
    """Segments starting at body column `origin`, cropped to x0..x1 and padded (in `fill`) to
    fill it."""
    strip = Strip(segments).crop(x0 - origin, x1 - origin)
    return strip.adjust_cell_length(x1 - x0, fill)


class FrozenGrid(ScrollView, can_focus=True):
    HEADER = 1  # fixed lines above the body

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._base: Style | None = None
        self._combined: dict[int, tuple[Style | None, Style]] = {}

    def label_width(self) -> int:
        raise NotImplementedError

    def body_size(self) -> Size:
        raise NotImplementedError

    def header_line(self, y: int, x0: int, x1: int) -> tuple[Strip, Strip]:
        """(the left corner above the labels, the header over body columns x0..x1)."""
        raise NotImplementedError

    def label(self, row: int) -> Strip:
        raise NotImplementedError

    def body_line(self, row: int, x0: int, x1: int) -> Strip:
        raise NotImplementedError

    def align(self, x: int) -> int:
        """The first body column drawn when scrolled to x (a grid of cells starts at a cell)."""
        return x

    # ── geometry ──────────────────────────────────────────────────────────────────────────────

    def resize_body(self) -> None:
        body = self.body_size()
        self.virtual_size = Size(self.label_width() + body.width, self.HEADER + body.height)
        self.refresh()

    @property
    def view(self) -> Size:
        """The body's visible columns and rows."""
        region = self.scrollable_content_region
        return Size(max(region.width - self.label_width(), 0),
                    max(region.height - self.HEADER, 0))

    def show(self, row: int, x_start: int, x_end: int) -> None:
        """Scroll (as little as possible) so that body row `row`, columns x_start..x_end, are
        visible."""
        view = self.view
        x, y = self.scroll_offset
        if row < y:
            y = row
        elif view.height and row >= y + view.height:
            y = row - view.height + 1
        if x_start < x:
            x = x_start
        elif view.width and x_end > x + view.width:
            x = min(x_start, x_end - view.width)
            while self.align(x) + view.width < x_end and self.align(x) < x_start:
                x += 1  # drawn from a cell's start: one more cell, or the last is cut
        if (x, y) != tuple(self.scroll_offset):
            self.scroll_to(x, y, animate=False, immediate=True)

    def body_at(self, x: int, y: int) -> tuple[int, int] | None:
        """(body column, body row) under widget cell (x, y), or None: a header or a label."""
        if y < self.HEADER or x < self.label_width():
            return None
        sx, sy = self.scroll_offset
        return x - self.label_width() + self.align(sx), y - self.HEADER + sy

    # ── drawing ───────────────────────────────────────────────────────────────────────────────

    def render_line(self, y: int) -> Strip:
        self._check_base()
        region = self.scrollable_content_region
        width = region.width
        if y >= region.height:  # under the horizontal scrollbar: never seen
            return Strip.blank(width, self._base)
        sx, sy = self.scroll_offset
        sx = self.align(sx)
        left_w = self.label_width()
        x0, x1 = sx, sx + max(width - left_w, 0)
        if y < self.HEADER:
            left, body = self.header_line(y, x0, x1)
        else:
            row = y - self.HEADER + sy
            if row >= self.body_size().height:
                return Strip.blank(width, self._base)
            left, body = self.label(row), self.body_line(row, x0, x1)
        line = Strip.join([left.adjust_cell_length(left_w, self._base), body])
        return line.adjust_cell_length(width, self._base)

    def on_base(self, style: Style | None) -> Style:
        """`style` over the widget's own (its background where a cell has none): what every
        segment is drawn with. Strip.apply_style would add two Styles for every segment of
        every line, which was most of a frame; here each distinct style is added once and found
        again by identity (the styles drawn are long-lived: module constants, cached ones)."""
        entry = self._combined.get(id(style))
        if entry is None or entry[0] is not style:
            base = self._base
            entry = self._combined[id(style)] = (style, base if style is None else base + style)
        return entry[1]

    def _check_base(self) -> None:
        base = self.rich_style  # the widget's colors, which a theme change changes
        if base != self._base:
            self._base, self._combined = base, {}
            self.base_changed()

    def base_changed(self) -> None:
        """The widget's own style changed: drop what was drawn over the old one."""


@functools.lru_cache(maxsize=4096)
def _style(level: int) -> Style:
    return cell_style(level / 1000)


def weight_style(t: float) -> Style:
    """render_layout.cell_style of t in [0, 1], one object per level: colors quantized to
    1/1000, finer than the scale's 8-bit channels show."""
    return _style(round(min(max(t, 0.0), 1.0) * 1000))


REVERSE = Style(reverse=True, bold=True)
BOLD = Style(bold=True)
DIM = Style(dim=True)
CYAN = Style(color="cyan")
