"""The overview: every head of the model at a glance, layers as rows and heads as columns, each
cell the head's thumbnail (render_thumbnails, as `attn heads` draws it) or, with `c`, one of
its scores as a colored cell; a cursor to move over the heads and open one.
"""

from __future__ import annotations

from typing import ClassVar

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.geometry import Size
from textual.message import Message
from textual.screen import Screen
from textual.strip import Strip
from textual.widgets import Static

from attn_tracer.analysis.head_definitions import DEFINITIONS, SCORES
from attn_tracer.explore import panels
from attn_tracer.explore.data import Explore
from attn_tracer.explore.grid import BOLD, CYAN, DIM, REVERSE, FrozenGrid, cells, weight_style
from attn_tracer.explore.layout import PAD, label_width, panel_shown
from attn_tracer.render import formats
from attn_tracer.render import thumbnails as render_thumbnails
from attn_tracer.render.layout import color as viridis
from attn_tracer.render.layout import flow

CURSOR = Style(color="yellow", bold=True)
MODES = (None, *SCORES)  # what the cells show: the thumbnails, or one score


class OverviewGrid(FrozenGrid):
    """Thumbnails (or scores) of every head; the cursor is bars on both sides of one."""

    BINDINGS: ClassVar[list[Binding]] = [
        Binding("up", "move(-1, 0)", show=False),
        Binding("down", "move(1, 0)", show=False),
        Binding("left", "move(0, -1)", show=False),
        Binding("right", "move(0, 1)", show=False),
        Binding("home", "go(0, 0)", show=False),
        Binding("end", "go(-1, -1)", show=False),
        Binding("enter", "open", show=False),
        Binding("c", "color", show=False),
        Binding("b", "batch", show=False),
    ]

    class Moved(Message):
        """The cursor, the text or the coloring changed."""

    class Opened(Message):
        def __init__(self, layer: int, head: int) -> None:
            super().__init__()
            self.at_layer, self.at_head = layer, head

    def __init__(self, data: Explore, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data = data
        self.at_layer = self.at_head = self.at_text = 0
        self.mode: str | None = None
        values, _, _ = data.thumbnails
        self.cols = values.shape[-1]
        rows = values.shape[-2]
        self.lines = -(-rows // 2) if data.color else rows  # ▀ packs two pixel rows in color
        self.cell = self.cols + 2 * PAD
        self._pictures: dict[tuple[int, int, int], list[list[Segment]]] = {}

    def on_mount(self) -> None:
        self.resize_body()

    def base_changed(self) -> None:
        self._pictures.clear()

    # ── geometry ──────────────────────────────────────────────────────────────────────────────

    def label_width(self) -> int:
        return label_width(self.data.layers)

    def body_size(self) -> Size:
        return Size(self.data.heads * self.cell, self.data.layers * (self.lines + 1))

    def _keep_visible(self) -> None:
        top = self.at_layer * (self.lines + 1)
        self.show(top + self.lines, self.at_head * self.cell, (self.at_head + 1) * self.cell)
        self.show(top, self.at_head * self.cell, (self.at_head + 1) * self.cell)

    # ── actions ───────────────────────────────────────────────────────────────────────────────

    def go(self, layer: int, head: int) -> None:
        self.at_layer = min(max(layer, 0), self.data.layers - 1)
        self.at_head = min(max(head, 0), self.data.heads - 1)
        self._keep_visible()
        self.refresh()
        self.post_message(self.Moved())

    def action_move(self, layers: int, heads: int) -> None:
        self.go(self.at_layer + layers, self.at_head + heads)

    def action_go(self, layer: int, head: int) -> None:
        self.go(layer % self.data.layers, head % self.data.heads)

    def action_open(self) -> None:
        self.post_message(self.Opened(self.at_layer, self.at_head))

    def action_color(self) -> None:
        self.mode = MODES[(MODES.index(self.mode) + 1) % len(MODES)]
        self.refresh()
        self.post_message(self.Moved())

    def action_batch(self) -> None:
        self.at_text = (self.at_text + 1) % self.data.batch
        self.refresh()
        self.post_message(self.Moved())

    def on_click(self, event) -> None:
        offset = event.get_content_offset(self)
        if offset is None or (at := self.body_at(offset.x, offset.y)) is None:
            return
        x, row = at
        layer, head = row // (self.lines + 1), x // self.cell
        if not (layer < self.data.layers and head < self.data.heads):
            return
        if (layer, head) == (self.at_layer, self.at_head):
            self.action_open()
        else:
            self.go(layer, head)

    # ── drawing ───────────────────────────────────────────────────────────────────────────────

    def header_line(self, y: int, x0: int, x1: int) -> tuple[Strip, Strip]:
        on = self.on_base
        segments = []
        for h in range(self.data.heads):
            name = f"H{h}"
            style = REVERSE if h == self.at_head else CYAN
            segments += [Segment(" " * PAD, on(None)), Segment(name, on(style)),
                         Segment(" " * (self.cell - PAD - len(name)), on(None))]
        return Strip([]), cells(segments, x0, x1, 0, on(None))

    def label(self, row: int) -> Strip:
        layer, line = divmod(row, self.lines + 1)
        if line:
            return Strip([])
        return Strip([Segment(f"L{layer}", self.on_base(REVERSE if layer == self.at_layer
                                                        else CYAN))])

    def body_line(self, row: int, x0: int, x1: int) -> Strip:
        on = self.on_base
        layer, line = divmod(row, self.lines + 1)
        if line == self.lines:  # the gap between two layers
            return Strip.blank(x1 - x0, self.on_base(None))
        segments: list[Segment] = []
        for h in range(self.data.heads):
            here = (layer, h) == (self.at_layer, self.at_head)
            segments.append(Segment("▐" if here else " ", on(CURSOR if here else None)))
            segments += (self._picture(layer, h)[line] if self.mode is None
                         else self._score_cell(layer, h, line))
            segments.append(Segment("▌" if here else " ", on(CURSOR if here else None)))
        return cells(segments, x0, x1, 0, on(None))

    def _picture(self, layer: int, head: int) -> list[list[Segment]]:
        key = (self.at_text, layer, head)
        if key not in self._pictures:
            values, drawn, sizes = self.data.thumbnails
            rows, cols = (int(n) for n in sizes[self.at_text])
            picture = render_thumbnails.lines(values[layer, self.at_text, head, :rows, :cols],
                                              drawn[self.at_text, :rows, :cols], self.data.color)
            console = self.app.console
            out = []
            for i in range(self.lines):
                text = picture[i] if i < len(picture) else Text()
                text.pad_right(self.cols - text.cell_len)
                out.append([Segment(s.text, self.on_base(s.style))
                            for s in text.render(console) if s.text != "\n"])
            self._pictures[key] = out
        return self._pictures[key]

    def _score_cell(self, layer: int, head: int, line: int) -> list[Segment]:
        value = float(self.data.scores[self.mode][layer, self.at_text, head])
        style = weight_style(panels.score_color(self.data, self.mode, layer, head, self.at_text))
        if not self.data.color:
            style = BOLD if value >= 0.5 else DIM
        text = formats.score(value, self.mode) if line == (self.lines - 1) // 2 else ""
        return [Segment(f"{text:^{self.cols}}", self.on_base(style))]


def legend(data: Explore, mode: str | None, batch: int, width: int) -> Text:
    if mode is not None:
        formula, _ = DEFINITIONS[mode]
        return flow([Text(f"colored by {mode} = {formula}", style="bold"),
                     Text("c: the next score, then the thumbnails again", style="dim")],
                    width, sep="  ·  ")
    _, _, sizes = data.thumbnails
    length = data.trace.inputs[batch].length
    rows, cols = (int(n) for n in sizes[batch])
    ramp = Text("weight 0 ")
    if data.color:
        for i in range(12):
            ramp.append("█", style=Style(color=_rgb(i / 11)))
    else:
        ramp.append(render_thumbnails.RAMP)
    ramp.append(" 1")
    scale = "" if (rows, cols) == (length, length) else f" in {rows} × {cols}"
    items = [Text(f"each head: {length} queries ↓ × {length} keys →{scale}", style="dim"), ramp,
             Text("blank: masked", style="dim")]
    return flow(items, width, sep="  ·  ")


def _rgb(value: float):
    from rich.color import Color

    return Color.from_rgb(*viridis(value))


class OverviewScreen(Screen):
    DEFAULT_CSS = """
    OverviewScreen { layout: vertical; }
    OverviewScreen #title, OverviewScreen #legend { height: auto; padding: 0 1; }
    OverviewScreen #keys { height: 1; padding: 0 1; background: $panel; }
    OverviewScreen #main { height: 1fr; }
    OverviewScreen OverviewGrid { width: 1fr; height: 1fr; }
    """

    def __init__(self, data: Explore) -> None:
        super().__init__()
        self.data = data

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        with Horizontal(id="main"):
            yield OverviewGrid(self.data)
            yield panels.SidePanel(("scores", "predictions"), id="side")
        yield Static(id="legend")
        yield Static(id="keys")

    def on_mount(self) -> None:
        width = self.app.size.width
        self.query_one("#side").display = panel_shown(width)
        self.query_one(OverviewGrid).focus()
        self.query_one("#title", Static).update(panels.title_line(self.data, width - 2))
        self.query_one("#keys", Static).update(panels.key_line("overview", width - 2))
        self.refresh_panels()

    @property
    def grid(self) -> OverviewGrid:
        return self.query_one(OverviewGrid)

    @on(OverviewGrid.Moved)
    def refresh_panels(self) -> None:
        g = self.grid
        side = self.query_one(panels.SidePanel)
        side.set("scores", panels.scores_panel(self.data, g.at_layer, g.at_head, g.at_text, g.mode,
                                               side.inner_width))
        side.set("predictions", panels.predictions_panel(self.data, g.at_text, side.inner_width))
        self.query_one("#legend", Static).update(legend(self.data, g.mode, g.at_text,
                                                               self.app.size.width - 2))

    @on(OverviewGrid.Opened)
    def open_head(self, event: OverviewGrid.Opened) -> None:
        from attn_tracer.explore.head_view import HeadScreen

        def back(where) -> None:
            if where is not None:
                layer, head, batch = where
                self.grid.at_text = batch
                self.grid.go(layer, head)

        head = HeadScreen(self.data, event.at_layer, event.at_head, self.grid.at_text)
        self.app.push_screen(head, back)
