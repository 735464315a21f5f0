"""One head: its full heatmap with a cell cursor, and the text shaded by the focused query.

The heatmap is the one `attn trace` draws (render_heatmaps: reading labels on the rows, column
labels and positions on the keys, `·` for the causal mask and `×` for padding, the viridis
cells of render_layout.cell_style), drawn line by line: only the rows on the screen, and in
them only the keys on the screen, are ever formatted. Any stage can be shown: the softmax
pattern on its 0–1 scale, or the raw, scaled and masked scores colored by their own range and
written with the decimals `attn trace --stages` uses.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.geometry import Size
from textual.message import Message
from textual.screen import Screen
from textual.strip import Strip
from textual.widgets import Static

from attn_tracer.explore import panels
from attn_tracer.explore.data import STAGE_NAMES, Explore
from attn_tracer.explore.grid import CYAN, DIM, REVERSE, FrozenGrid, cells, weight_style
from attn_tracer.explore.layout import panel_shown
from attn_tracer.render import formats
from attn_tracer.render.heatmaps import (
    MAX_LABEL,
    PADDED,
    column_labels,
    reading_labels,
    shaded_text,
)
from attn_tracer.render.layout import fit

CELL = {"pattern": 4, "stage": 6, "colors": 2}  # a key's columns: ".42 ", "-1.23 ", or a block
NARROW_LABEL = 10  # the widest a row label's token grows below 120 columns
SHADED_LINES = 3  # lines of the text shaded by the focused query
# The cell cursor: white is on no color of the viridis scale, so it stands out from every cell.
CURSOR = Style(color="black", bgcolor="white", bold=True)


class HeatmapView(FrozenGrid):
    """One stage of one head [q_len, k_len]: queries down, keys across, a cell cursor."""

    HEADER = 2  # key positions, key labels
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("up", "move(-1, 0)", show=False),
        Binding("down", "move(1, 0)", show=False),
        Binding("left", "move(0, -1)", show=False),
        Binding("right", "move(0, 1)", show=False),
        Binding("pageup", "page(-1)", show=False),
        Binding("pagedown", "page(1)", show=False),
        Binding("home", "query(0)", show=False),
        Binding("end", "query(-1)", show=False),
        Binding("left_square_bracket", "head(-1)", show=False),
        Binding("right_square_bracket", "head(1)", show=False),
        Binding("left_curly_bracket", "layer(-1)", show=False),
        Binding("right_curly_bracket", "layer(1)", show=False),
        Binding("b", "batch", show=False),
        Binding("t", "stage", show=False),
        Binding("x", "cross", show=False),
        Binding("n", "numbers", show=False),
    ]

    class Moved(Message):
        """The cursor moved (`reloaded` False), or the head or what is drawn changed."""

        def __init__(self, reloaded: bool) -> None:
            super().__init__()
            self.reloaded = reloaded

    def __init__(self, data: Explore, layer: int, head: int, batch: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data = data
        self.at_layer, self.at_head, self.at_text = layer, head, batch
        self.kind = "attn"
        self.stage = "pattern"
        self.numbers = True
        self.at_query = self.at_key = 0
        self.load()

    def on_mount(self) -> None:
        self.resize_body()

    # ── what is drawn ─────────────────────────────────────────────────────────────────────────

    def load(self) -> None:
        """Fetch the focused stage and everything its drawing needs, once per change."""
        d = self.data
        stages = d.stages(self.at_layer, self.at_head, self.at_text, self.kind)
        if self.stage not in stages:
            self.stage = "pattern"
        self.stages = stages
        self.matrix = stages[self.stage]
        self.weights = stages["pattern"]
        self.marks = d.marks(self.kind, self.at_text)
        q_inp, k_inp = d.trace.inputs[self.at_text], d.keys_input(self.kind, self.at_text)
        self.row_names = reading_labels(q_inp)
        self.key_names = reading_labels(k_inp)
        self.col_names = column_labels(k_inp)
        q_len, k_len = self.matrix.shape
        self.at_query = min(self.at_query, q_len - 1)
        self.at_key = min(self.at_key, k_len - 1)
        self.pos_width = len(str(q_len - 1))
        longest = max(cell_len(n) for n in self.row_names)
        # Narrow terminals give the labels less: the heatmap is what they are for.
        most = MAX_LABEL if self.app.size.width >= 120 else NARROW_LABEL
        self._label_w = self.pos_width + 1 + min(longest, most) + 1
        if not self.numbers:
            self.cell = CELL["colors"]
        else:
            self.cell = CELL["pattern" if self.stage == "pattern" else "stage"]
        finite = self.matrix[np.isfinite(self.matrix)]
        self.lo, self.hi = ((0.0, 1.0) if self.stage == "pattern" or not finite.size
                            else (float(finite.min()), float(finite.max())))
        self.digits = formats.fitting_decimals(finite, CELL["stage"] - 1)
        self.resize_body()

    def label_width(self) -> int:
        return self._label_w

    def body_size(self) -> Size:
        q_len, k_len = self.matrix.shape
        # One cell more than the keys: drawn from a cell's start (align), the last key still
        # comes whole onto the screen.
        return Size((k_len + 1) * self.cell, q_len)

    def align(self, x: int) -> int:
        return x - x % self.cell

    @property
    def value(self) -> float:
        return float(self.matrix[self.at_query, self.at_key])

    def _changed(self, reload: bool = False) -> None:
        if reload:
            self.load()
        self.show(self.at_query, self.at_key * self.cell, (self.at_key + 1) * self.cell)
        self.refresh()
        self.post_message(self.Moved(reload))

    # ── actions ───────────────────────────────────────────────────────────────────────────────

    def go(self, query: int, key: int) -> None:
        q_len, k_len = self.matrix.shape
        self.at_query = min(max(query, 0), q_len - 1)
        self.at_key = min(max(key, 0), k_len - 1)
        self._changed()

    def action_move(self, queries: int, keys: int) -> None:
        self.go(self.at_query + queries, self.at_key + keys)

    def action_page(self, pages: int) -> None:
        self.go(self.at_query + pages * max(self.view.height - 1, 1), self.at_key)

    def action_query(self, query: int) -> None:
        self.go(query % self.matrix.shape[0], self.at_key)

    def action_head(self, step: int) -> None:
        self.at_head = (self.at_head + step) % self.data.heads
        self._changed(reload=True)

    def action_layer(self, step: int) -> None:
        self.at_layer = (self.at_layer + step) % self.data.layers
        self._changed(reload=True)

    def action_batch(self) -> None:
        self.at_text = (self.at_text + 1) % self.data.batch
        self._changed(reload=True)

    def action_stage(self) -> None:
        have = list(self.stages)
        self.stage = have[(have.index(self.stage) + 1) % len(have)]
        self._changed(reload=True)

    def action_cross(self) -> None:
        kinds = self.data.kinds
        if len(kinds) == 1:
            self.notify("no cross-attention in this model: give a --cross text")
            return
        self.kind = kinds[(kinds.index(self.kind) + 1) % len(kinds)]
        self._changed(reload=True)

    def action_numbers(self) -> None:
        if not self.data.color:
            self.notify("NO_COLOR is set: without colors the numbers are all there is")
            return
        self.numbers = not self.numbers
        self._changed(reload=True)

    def on_click(self, event) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        sx, sy = self.scroll_offset
        q_len, k_len = self.matrix.shape
        key = (offset.x - self.label_width() + self.align(sx)) // self.cell
        query = offset.y - self.HEADER + sy
        if offset.x < self.label_width():
            key = self.at_key  # a row label: that query
        if offset.y < self.HEADER:
            query = self.at_query  # a column label: that key
        if 0 <= query < q_len and 0 <= key < k_len:
            self.go(query, key)

    # ── drawing ───────────────────────────────────────────────────────────────────────────────

    def _keys(self, x0: int, x1: int) -> range:
        return range(x0 // self.cell, min(self.matrix.shape[1], math.ceil(x1 / self.cell)))

    def header_line(self, y: int, x0: int, x1: int) -> tuple[Strip, Strip]:
        on = self.on_base
        keys = self._keys(x0, x1)
        segments = []
        if y == 0:
            # Positions where they fit, right-aligned over their key, a blank between two; the
            # focused key's always.
            placed: list[tuple[int, str, int]] = []  # (first column, text, key)
            for k in keys:
                text = str(k)
                start = (k + 1) * self.cell - 1 - len(text)
                while placed and start <= placed[-1][0] + len(placed[-1][1]) and (
                        k == self.at_key and placed[-1][2] != self.at_key):
                    placed.pop()
                if not placed or start > placed[-1][0] + len(placed[-1][1]):
                    placed.append((start, text, k))
            origin = min([keys.start * self.cell, *(p[0] for p in placed)])
            used = origin
            for start, text, k in placed:
                segments.append(Segment(" " * (start - used), on(None)))
                segments.append(Segment(text, on(REVERSE if k == self.at_key else DIM)))
                used = start + len(text)
            return (Strip([Segment(f"{'key':>{self._label_w - 1}} ", on(DIM))]),
                    cells(segments, x0, x1, origin, on(None)))
        for k in keys:
            name = self.col_names[k]
            if self.cell == CELL["colors"]:  # one column: the label's first character
                name = name[:1] if cell_len(name[:1]) == 1 else "…"
            else:
                name = fit(name, self.cell - 1)
            style = REVERSE if k == self.at_key else CYAN
            segments += [Segment(name, on(style)), Segment(" ", on(None))]
        corner = Strip([Segment(f"{'query':<{self._label_w - 1}} ", on(DIM))])
        return corner, cells(segments, x0, x1, keys.start * self.cell, on(None))

    def label(self, row: int) -> Strip:
        name = f"{row:>{self.pos_width}} {self.row_names[row]}"
        text = fit(name, self._label_w - 1) if cell_len(name) > self._label_w - 1 else (
            name + " " * (self._label_w - 1 - cell_len(name)))
        pad = bool((self.marks[row] == PADDED).all())
        style = REVERSE if row == self.at_query else (DIM if pad else CYAN)
        return Strip([Segment(text, self.on_base(style)), Segment(" ", self.on_base(None))])

    def body_line(self, row: int, x0: int, x1: int) -> Strip:
        on = self.on_base
        keys = self._keys(x0, x1)
        m, marks, cell = self.matrix, self.marks[row], self.cell
        segments = []
        for k in keys:
            here = row == self.at_query and k == self.at_key
            v = float(m[row, k])
            mark = marks[k]
            if self.stage == "pattern" and mark:
                # The mask itself: −∞ before softmax, exactly 0 after.
                text, style = f"{mark:>{cell - 1}}", DIM
            elif not math.isfinite(v):
                text, style = f"{'−∞':>{cell - 1}}" if cell > 2 else "−∞"[:1], DIM
            else:
                t = v if self.stage == "pattern" else (v - self.lo) / ((self.hi - self.lo) or 1)
                style = weight_style(t)
                if cell == 2:
                    text = " "
                elif self.stage == "pattern":
                    text = " " * (cell - 4) + formats.unit(v)
                else:
                    text = f"{formats.number(v, self.digits):>{cell - 1}}"
            if here:
                style = CURSOR
                text = "[" if cell == 2 else text
            segments.append(Segment(text, on(style)))
            segments.append(Segment("]" if here and cell == 2 else " ",
                                    on(style if cell == 2 else None)))
        return cells(segments, x0, x1, keys.start * self.cell, on(None))


def status_line(view: HeatmapView, width: int) -> Text:
    """Three lines, each cut rather than wrapped (the screen keeps their height): the head and
    block, the stage and its formula, the focused cell and its value."""
    d = view.data
    kind = "cross-attention" if view.kind == "cross_attn" else "attention"
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(f"L{view.at_layer}H{view.at_head}", style="bold")
    where = f"  layer {view.at_layer} of 0–{d.layers - 1}, head {view.at_head} of 0–{d.heads - 1}"
    if d.batch > 1:
        where += f", text {view.at_text} of 0–{d.batch - 1}"
    t.append(where, style="dim")
    t.append(f"  ·  {kind}\n")
    t.append(f"{STAGE_NAMES[view.stage]}: ", style="bold")
    t.append(d.formula(view.at_layer, view.at_head, view.at_text, view.kind, view.stage))
    t.append("  (t: the next stage)\n", style="dim")
    q_name = view.row_names[view.at_query]
    k_name = view.key_names[view.at_key]
    t.append("query ", style="dim")
    t.append(f"{view.at_query} {q_name}", style="bold cyan")
    t.append(" → key ", style="dim")
    t.append(f"{view.at_key} {k_name}", style="bold cyan")
    t.append(": ", style="dim")
    mark = view.marks[view.at_query, view.at_key]
    if mark and view.stage == "pattern":
        t.append("masked (causal)" if mark != PADDED else "masked (padding)", style="bold")
    else:
        t.append(f"{view.value:.4f}" if math.isfinite(view.value) else "−∞", style="bold")
    if view.stage != "pattern":
        t.append(f"  (softmax {float(view.weights[view.at_query, view.at_key]):.4f})",
                 style="dim")
    return t


def query_text(view: HeatmapView, width: int, color: bool) -> Text:
    """The keys' text, each token shaded by the weight the focused query gives it: the tokens
    around the focused key, as many as SHADED_LINES lines hold (the screen keeps the height)."""
    names = view.key_names
    room = SHADED_LINES * width
    while True:
        lo, hi = _window([cell_len(n) + 1 for n in names], view.at_key, room)
        body = Text()
        if lo:
            body.append("… ", style="dim")
        body.append_text(shaded_text(view.weights[:, lo:hi], names[lo:hi], view.marks[:, lo:hi],
                                     view.at_query, width - 2, numbers=not color))
        if hi < len(names):
            body.append(" …", style="dim")
        # Lines break between tokens, so a line can end short: take fewer until they fit.
        if body.plain.count("\n") < SHADED_LINES or hi - lo <= 1:
            break
        room -= width // 2
    title = Text("what query ", style="bold", no_wrap=True, overflow="ellipsis")
    title.append(f"{view.at_query} {view.row_names[view.at_query]}", style="bold cyan")
    title.append(" attends to (softmax)", style="bold")
    if (lo, hi) != (0, len(names)):
        title.append(f"  keys {lo}–{hi - 1} of 0–{len(names) - 1}", style="dim")
    title.append("\n")
    title.append_text(body)
    return title


def _window(sizes: list[int], center: int, room: int) -> tuple[int, int]:
    """The widest run of items around `center` whose sizes sum to at most `room`."""
    lo, hi, used = center, center + 1, sizes[center]
    while True:
        grew = False
        if hi < len(sizes) and used + sizes[hi] <= room:
            used += sizes[hi]
            hi += 1
            grew = True
        if lo > 0 and used + sizes[lo - 1] <= room:
            lo -= 1
            used += sizes[lo]
            grew = True
        if not grew:
            return lo, hi


class HeadScreen(Screen):
    DEFAULT_CSS = """
    HeadScreen { layout: vertical; }
    HeadScreen #status { height: 3; padding: 0 1; }
    HeadScreen #keys { height: 1; padding: 0 1; background: $panel; }
    HeadScreen #main { height: 1fr; }
    HeadScreen #left { width: 1fr; }
    HeadScreen HeatmapView { height: 1fr; }
    HeadScreen #query-text { height: 3; padding: 0 1 1 1; }
    """
    BINDINGS: ClassVar[list[Binding]] = [Binding("escape,backspace", "back", show=False)]

    def __init__(self, data: Explore, layer: int, head: int, batch: int) -> None:
        super().__init__()
        self.data = data
        self.start = (layer, head, batch)

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield Static(id="query-text")
                yield HeatmapView(self.data, *self.start)
            yield panels.SidePanel(("step", "predictions", "shapes"), id="side")
        yield Static(id="keys")

    @property
    def heatmap(self) -> HeatmapView:
        return self.query_one(HeatmapView)

    def on_mount(self) -> None:
        width = self.app.size.width
        self.query_one("#side").display = panel_shown(width)
        self.heatmap.focus()
        self.query_one("#keys", Static).update(panels.key_line("head", width - 2))
        side = self.query_one(panels.SidePanel)
        side.set("shapes", panels.shapes_panel(self.data, side.inner_width))
        self.refresh_panels()

    @on(HeatmapView.Moved)
    def moved(self, event: HeatmapView.Moved) -> None:
        self.refresh_panels(reloaded=event.reloaded)

    def refresh_panels(self, reloaded: bool = True) -> None:
        """The status and the shaded text follow the cursor (their heights never change: no
        new layout); the side panel changes only with the head, the stage, the block or the
        text."""
        view = self.heatmap
        width = self.app.size.width - 2
        self.query_one("#status", Static).update(status_line(view, width), layout=False)
        left = self.query_one("#left").size.width or width
        shaded = self.query_one("#query-text", Static)
        text = query_text(view, left - 2, self.data.color)
        shaded.update(text, layout=False)
        if not reloaded:
            return
        # As tall as the whole text when it fits (its lines do not change as the cursor
        # moves), else SHADED_LINES; plus the title and a blank line.
        lines = text.plain.count("\n")
        whole = "keys " not in text.plain.split("\n", 1)[0]
        height = (lines if whole else SHADED_LINES) + 2
        if shaded.styles.height is None or shaded.styles.height.value != height:
            shaded.styles.height = height
        side = self.query_one(panels.SidePanel)
        side.set("step", panels.step_panel(self.data, view.at_layer, view.at_head, view.at_text,
                                           view.kind, view.stage, side.inner_width))
        side.set("predictions", panels.predictions_panel(self.data, view.at_text,
                                                         side.inner_width))

    def action_back(self) -> None:
        view = self.heatmap
        self.dismiss((view.at_layer, view.at_head, view.at_text))
