"""Layout for the terminal view: the color scale, fitting labels into cells, flowing items
into lines, and blocks of text side by side, all measured in terminal cells (CJK and emoji take
two)."""

from __future__ import annotations

from rich.cells import cell_len, set_cell_size
from rich.color import Color
from rich.style import Style
from rich.text import Text

# viridis, sampled: sequential, perceptually uniform and readable with every common color blindness.
VIRIDIS = [
    (68, 1, 84), (72, 35, 116), (64, 67, 135), (52, 94, 141), (41, 120, 142), (32, 144, 140),
    (34, 167, 132), (68, 190, 112), (121, 209, 81), (189, 222, 38), (253, 231, 37),
]
GAP = 2  # cells between blocks side by side, and between items of a line


def color(t: float) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    a, b = VIRIDIS[i], VIRIDIS[i + 1]
    return tuple(round(a[c] + (b[c] - a[c]) * f) for c in range(3))  # type: ignore[return-value]


def cell_style(t: float) -> Style:
    r, g, b = color(t)
    light = 0.299 * r + 0.587 * g + 0.114 * b > 140
    return Style(bgcolor=Color.from_rgb(r, g, b), color="black" if light else "white")


def fit(label: str, width: int) -> str:
    """`label` right-aligned in `width` terminal cells (CJK and emoji take two), cut with …."""
    if cell_len(label) > width:
        label = set_cell_size(label, width - 1) + "…"
    return " " * (width - cell_len(label)) + label


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def flow(items: list[Text], width: int, sep: str = " · ", first: Text | None = None) -> Text:
    """`items` joined by `sep`, a new line only between two items, never inside one.

    An item wider than the whole line gets a line of its own (and Rich folds it there).
    """
    out = first.copy() if first is not None else Text()
    used, fresh = out.cell_len, True
    for item in items:
        if not fresh and used + cell_len(sep) + item.cell_len > width:
            out.append("\n")
            used = 0
        elif not fresh:
            out.append(sep, style="dim")
            used += cell_len(sep)
        out.append_text(item)
        used += item.cell_len
        fresh = False
    return out


def grid(items: list[Text], width: int) -> Text:
    """Blocks of text side by side, as many as their real widths fit in `width`, GAP apart.

    A block is as wide as its widest line, its title included. Joined line by line rather than
    laid out by a Rich Table: the blocks are laid out already, and a table's layout pass was
    most of the default view's rendering time.
    """
    blocks = [item.split("\n", allow_blank=True) for item in items]
    widths = [max((line.cell_len for line in lines), default=0) for lines in blocks]
    rows: list[list[int]] = []
    used = 0
    for i, w in enumerate(widths):
        if rows and rows[-1] and used + GAP + w <= width:
            rows[-1].append(i)
            used += GAP + w
        else:
            rows.append([i])
            used = w
    out = Text(no_wrap=True, overflow="crop")
    for row_of in rows:
        for r in range(max(len(blocks[i]) for i in row_of)):
            row = Text()
            for n, i in enumerate(row_of):
                line = blocks[i][r] if r < len(blocks[i]) else Text()
                row.append_text(line)
                if n < len(row_of) - 1:
                    row.append(" " * (widths[i] - line.cell_len + GAP))
            out.append_text(row.rstrip() or row)
            out.append("\n")
        if any(widths[i] > width for i in row_of):
            out.append(f"(cut at {width} columns; all in --json)\n",
                       style="dim italic")
    return out


def wrap_words(s: str, width: int) -> list[str]:
    """Greedy lines of at most `width` cells, broken between words; a longer word is folded."""
    lines: list[str] = []
    line = ""
    for word in s.split(" "):
        while cell_len(word) > width:  # fold, never cut
            if line:
                lines.append(line)
                line = ""
            head = set_cell_size(word, width).rstrip() or word[0]
            lines.append(head)
            word = word[len(head):]
        if line and cell_len(line) + 1 + cell_len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line or not lines else lines
