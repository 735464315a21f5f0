"""The explorer's panels: the title line, the focused head's scores, the focused step of the
shape trace with its formula, the predictions (and what other analyses add), and the keys.

Each panel is drawn as plain Rich renderables from the data (the same functions the views of
`attn trace` and `attn heads` use where there is one); the widgets only hold them.
"""

from __future__ import annotations

from typing import ClassVar

from rich.console import Group, RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from attn_tracer.analysis.head_definitions import DEFINITIONS, SCORES
from attn_tracer.explore.data import STAGE_NAMES, Explore
from attn_tracer.explore.layout import PANEL_WIDTH
from attn_tracer.render import formats
from attn_tracer.render.layout import cell_style, flow, plural
from attn_tracer.render.shapes import shape_table
from attn_tracer.render.terminal import checkpoint_title

# Every key, by where it works: the help screen and the README's table are this list.
KEYS: dict[str, list[tuple[str, str]]] = {
    "overview": [
        ("← ↑ ↓ →", "move the cursor over the heads (or click a head)"),
        ("enter", "open the head under the cursor (or click it again)"),
        ("c", "color the grid by the next head score instead of the thumbnails (then back)"),
        ("b", "the next text of the batch"),
    ],
    "head": [
        ("↑ ↓", "the focused query (pgup pgdn: a page; home end: the first and last)"),
        ("← →", "the focused key (or click a cell)"),
        ("[ ]", "the previous and next head"),
        ("{ }", "the previous and next layer"),
        ("b", "the next text of the batch"),
        ("t", "the next stage: raw scores → scaled → masked → softmax"),
        ("x", "self-attention or the cross-attention block (with --cross)"),
        ("n", "numbers in the cells, or colors only (more keys on the screen)"),
        ("esc", "back to the overview"),
    ],
    "anywhere": [
        ("p", "show or hide the side panel"),
        ("s", "save the screen as SVG (attn-explore-N.svg in the current directory)"),
        ("?", "these keys"),
        ("q", "quit (ctrl+c too)"),
    ],
}


def key_line(where: str, width: int) -> Text:
    """The main keys of a screen, as many as fit on one line; `?` (all of them) and `q` always."""
    main = {"overview": ["←↑↓→ move", "enter open", "c color", "b text", "p panel", "s save"],
            "head": ["↑↓←→ cell", "[ ] head", "{ } layer", "t stage", "n numbers", "esc back",
                     "x cross", "b text", "p panel", "s save"]}[where]
    always = ["? keys", "q quit"]
    chosen: list[str] = []
    for item in main:
        if len("  ".join([*chosen, item, *always])) <= width:
            chosen.append(item)
    return Text("  ".join([*chosen, *always]), no_wrap=True, overflow="crop")


def title_line(data: Explore, width: int) -> Text:
    trace = data.trace
    c = trace.config
    rows = len(trace.inputs)
    lengths = ", ".join(str(i.length) for i in trace.inputs)
    tokens = plural(trace.inputs[0].length, "token") if rows == 1 else f"{lengths} tokens"
    what = (f"{checkpoint_title(c)} weights from {c.weights}" if c.weights
            else f"random weights, seed {c.seed} (untrained)")
    items = [plural(rows, "text"), tokens,
             f"{plural(c.layers, 'layer')} × {plural(c.heads, 'head')}",
             f"d_model {c.d_model}", f"arch {c.arch}", f"mask {c.mask}", what]
    if c.weights:  # random weights always run GPT-2's tokenizer
        from attn_tracer.model.tokenizer import of

        items.append(f"tokenizer {of(c).short()}")
    if trace.cross:
        items.insert(2, f"cross-attention over {plural(trace.cross[0].length, 'token')}")
    first = Text("attn explore", style="bold")
    first.append("  ")
    return flow([Text(i, style="dim") for i in items], width, first=first)


def score_color(data: Explore, score: str, layer: int, head: int, batch: int) -> float:
    """A score on the 0–1 color scale: entropy in bits is colored by its normalized twin."""
    name = "entropy_norm" if score == "entropy" else score
    return float(data.scores[name][layer, batch, head])


def scores_panel(data: Explore, layer: int, head: int, batch: int, mode: str | None,
                 width: int) -> RenderableType:
    """The focused head's scores, each with its rank among all heads, and what the grid's
    coloring score means."""
    out = Text()
    out.append(f"L{layer}H{head}", style="bold")
    out.append(f"  layer {layer}, head {head}" + (f", text {batch}" if data.batch > 1 else ""),
               style="dim")
    out.append("\n")
    total = data.layers * data.heads
    for score in SCORES:
        grid = data.scores[score][:, batch, :]
        value = float(grid[layer, head])
        rank = 1 + int((grid > value).sum())
        style = "bold" if score == mode else ""
        out.append(f"{score:<16}", style=style)
        out.append(f"{formats.score(value, score):>4}",
                   style=cell_style(score_color(data, score, layer, head, batch)))
        out.append(f"  {rank:>{len(str(total))}} of {total}\n", style="dim")
    shown = mode or "previous_token"
    formula, words = DEFINITIONS[shown]
    out.append("\n")
    out.append(f"{shown} = {formula}\n", style="bold" if mode else "dim")
    out.append(words, style="dim")
    return out


def step_panel(data: Explore, layer: int, head: int, batch: int, kind: str, stage: str,
               width: int) -> RenderableType:
    """The focused step (this stage of this block), its formula and shape, then the layer's
    attention steps with it marked."""
    trace = data.trace
    prefix = f"blocks.{layer}.{kind}"
    name = f"{prefix}.{stage}"
    step = trace.step(name)
    focus = Text()
    focus.append(f"{STAGE_NAMES[stage]}: ", style="bold")
    focus.append(name, style="bold cyan")
    focus.append("\n")
    focus.append(data.formula(layer, head, batch, kind, stage) + "\n")
    focus.append("[" + ", ".join(map(str, step.shape)) + "]", style="bold")
    focus.append("  " + ", ".join(step.dims) + "\n", style="dim")
    focus.append(f"this head: [{step.shape[-2]}, {step.shape[-1]}] of text {batch}\n", style="dim")
    c = trace.config
    scale = f" / √{c.d_head}" if c.scale else ""
    mask = " + mask" if stage in ("masked", "pattern") and "masked" in data.stages(
        layer, head, batch, kind) else ""
    focus.append("\nattention: ", style="bold")
    focus.append({"scores": "Q·Kᵀ", "scaled": f"Q·Kᵀ{scale}", "masked": f"Q·Kᵀ{scale}{mask}",
                  "pattern": f"softmax(Q·Kᵀ{scale}{mask})"}[stage])
    focus.append(" → Z = pattern·V → merge heads → ·W_O\n", style="dim")

    steps = Text()
    steps.append(f"\nsteps of {prefix}\n", style="bold")
    own = [s for s in trace.steps if s.name.startswith(prefix + ".")]
    name_w = max(len(s.name) - len(prefix) - 1 for s in own)
    for s in own:
        short = s.name[len(prefix) + 1:]
        here = s.name == name
        shape = "[" + ", ".join(map(str, s.shape)) + "]"
        line = Text(("▶ " if here else "  ") + f"{short:<{name_w}} ", style="bold" if here
                    else "cyan")
        line.append(shape, style="bold" if here else "")
        steps.append_text(line)
        steps.append("\n")
    return Group(focus, steps)


def shapes_panel(data: Explore, width: int) -> RenderableType:
    """The whole shape trace, as `attn trace` prints it."""
    return Group(Text("\nthe shape trace (as attn trace prints it)", style="bold"),
                 shape_table(data.trace.steps, width))


def predictions_panel(data: Explore, batch: int, width: int) -> RenderableType:
    """The next-token predictions of this text (--predict), then the sections of other
    analyses (data.sections)."""
    from attn_tracer.render.numbers import predictions

    items: list[RenderableType] = [Text("")]
    if data.trace.predictions:
        items.append(predictions(data.trace, width, [batch]))
    else:
        items.append(Text("next-token predictions: run with --predict", style="dim"))
    for section in data.sections:
        items.append(Text(f"\n{section.title}", style="bold"))
        items.append(section.render(batch, width))
    return Group(*items)


class SidePanel(VerticalScroll):
    """A scrolling column of Static parts, each updated alone."""

    DEFAULT_CSS = """
    SidePanel { width: WIDTH; border-left: solid $primary-darken-2; padding: 0 1;
                scrollbar-size-vertical: 1; }
    SidePanel > Static { width: 100%; }
    """.replace("WIDTH", str(PANEL_WIDTH))

    def __init__(self, parts: tuple[str, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self.parts = parts
        self.can_focus = False

    def compose(self) -> ComposeResult:
        for part in self.parts:
            yield Static(id=part)

    def set(self, part: str, renderable: RenderableType) -> None:
        self.query_one(f"#{part}", Static).update(renderable)

    @property
    def inner_width(self) -> int:
        """The columns its parts have: the panel less its border, padding and scrollbar (known
        before the first layout, unlike its size)."""
        return PANEL_WIDTH - 4


class HelpScreen(ModalScreen):
    """Every key, by screen."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 84; max-width: 100%; height: auto; max-height: 100%;
                                  border: round $primary; background: $surface; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("escape,question_mark", "app.pop_screen", "close", show=False)]

    def compose(self) -> ComposeResult:
        from rich.table import Table

        title = Text("attn explore: the keys", style="bold")
        title.append("  (esc or ? closes)", style="dim")
        parts: list[RenderableType] = [title]
        for where, keys in KEYS.items():
            table = Table.grid(padding=(0, 2))
            table.add_column(no_wrap=True, style="bold", min_width=9)
            table.add_column(ratio=1)
            for key, what in keys:
                table.add_row(key, what)
            parts += [Text(f"\n{where}", style="bold cyan"), table]
        with VerticalScroll() as scroll:
            scroll.can_focus = True
            yield Static(Group(*parts))
