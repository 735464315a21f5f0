"""The `attn heads` view on recorded consoles, and the thumbnail renderer on its own.

At 80 and 160 columns, in color and in plain text, for 6 tokens and for ~1,000: no line wider
than the console, every layer and head labelled, and each thumbnail drawing the pattern it
belongs to (read back from the text and compared with heads whose roles are known by
construction, tests/heads_model.py).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from rich.cells import cell_len
from rich.console import Console
from rich.style import Style

import heads_model
from attn_tracer.analysis.head_definitions import SCORES
from attn_tracer.commands import heads as heads_command
from attn_tracer.commands.run import Request
from attn_tracer.render import heads as render_heads
from attn_tracer.render import thumbnails as render_thumbnails
from attn_tracer.render.layout import color as viridis

ROOT = Path(__file__).resolve().parents[1]
LONG = ROOT / "sample_texts" / "long.txt"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SIX = "The cat sat on the mat"


def view(request: Request, width: int, color: bool, **options) -> str:
    result = heads_command.compute(request, heads_command.HeadsOptions(**options), lambda m: None,
                                   width, color)
    # Rich caches a style's escape codes on the style, for the first color system it met, and
    # shares equal styles between consoles (Style._add's cache): a test that drew the same colors
    # on a 16-color console earlier in this process would change ours. One process draws for one
    # console in real use.
    Style._add.cache_clear()
    console = Console(file=io.StringIO(), width=width, force_terminal=color,
                      color_system="truecolor" if color else None, highlight=False)
    render_heads.render(result, console)
    return console.file.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return heads_model.save(tmp_path_factory.mktemp("heads-render") / "model")


# Random weights, GPT-2 small's 12 × 12 heads (a narrow d_model keeps it fast); the long text
# (983 tokens: its final newline ends the text) on 2 layers: the overview's shape does not
# depend on the layer count.
CASES = {
    "6 tokens, 12 × 12": Request(texts=[SIX], layers=12, d_model=96),
    "983 tokens, 2 × 12": Request(file=LONG, layers=2, d_model=96),
}


@pytest.fixture(scope="module")
def rendered() -> dict:
    return {(name, width, color): view(r, width, color, top=5)
            for name, r in CASES.items() for width in (80, 160) for color in (True, False)}


@pytest.mark.slow
@pytest.mark.parametrize("color", [True, False], ids=["color", "plain"])
@pytest.mark.parametrize("width", [80, 160])
@pytest.mark.parametrize("case", CASES)
def test_the_view_fits_and_labels_every_head(case, width, color, rendered):
    text = rendered[case, width, color]
    plain = ANSI.sub("", text)
    lines = plain.splitlines()
    assert max(cell_len(line) for line in lines) <= width
    assert ("\x1b[" in text) is color
    layers = CASES[case].layers
    # The overview: one header of H0 … H11, then one block per layer labelled L0 … L11.
    header = next(line for line in lines if line.lstrip().startswith("H0 "))
    assert header.split() == [f"H{h}" for h in range(12)]
    start = lines.index(header)
    labels = [line.split()[0] for line in lines[start + 1:] if re.match(r"L\d+ ", line)]
    assert labels[:layers] == [f"L{i}" for i in range(layers)]
    # A thumbnail of each head beside each label, in the columns of the header.
    for line in lines[start + 1:start + 4]:
        if line.startswith("L0 "):
            for h in range(12):
                column = header.index(f"H{h}")
                assert line[column] in render_thumbnails.RAMP + render_thumbnails.UPPER
    # The score grids and the table (top 5) come after it.
    grids = plain[plain.index("scores (rows: layers"):plain.index("every head's scores")]
    assert {w for line in grids.splitlines() for w in line.split()} >= set(SCORES)
    assert "top 5 of " in plain


@pytest.mark.parametrize("width", [80, 160])
def test_color_thumbnails_pack_two_pattern_rows_a_line(width, rendered):
    text = rendered["983 tokens, 2 × 12", width, True]
    # ▀ with a 24-bit foreground (the upper pattern row) and background (the lower one).
    assert re.search(r"\x1b\[38;2;\d+;\d+;\d+;48;2;\d+;\d+;\d+m▀", text)
    legend = next(line for line in ANSI.sub("", text).splitlines() if "983 queries in" in line)
    rows, cols = map(int, re.search(r"983 queries in (\d+) rows, 983 keys in (\d+) columns",
                                    legend).groups())
    assert rows == 2 * -(-cols // 2)  # square: a line of cols cells holds two rows of pixels
    assert cols == (5 if width == 80 else render_heads.MAX_CELLS)


def plain_thumbnail(text: str, layer: int, head: int) -> list[str]:
    """The lines of one head's plain thumbnail, read back from the overview."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("H0 "))
    column = lines[header].index(f"H{head}")
    start = next(i for i in range(header, len(lines)) if lines[i].startswith(f"L{layer} "))
    out = []
    for line in lines[start:]:
        if not line.strip() or (line[0] == "L" and not line.startswith(f"L{layer} ")):
            break
        out.append(line[column:column + 6].ljust(6))
    return out


@pytest.mark.slow
def test_each_thumbnail_draws_its_own_head(built):
    # 160 columns: 6 tokens get one cell per query and key, in plain text as in color.
    text = view(Request(texts=[SIX], weights=str(built)), 160, False)
    assert "one cell per query and key" in text
    full, empty = render_thumbnails.RAMP[-1], render_thumbnails.RAMP[0]
    expect = {
        (0, 0): [0] + [q - 1 for q in range(1, 6)],  # previous token (the first query: itself)
        (0, 1): [0] * 6,  # the first token
        (0, 2): list(range(6)),  # self
    }
    for (layer, head), peaks in expect.items():
        rows = plain_thumbnail(text, layer, head)
        assert len(rows) == 6, rows
        for q, (row, peak) in enumerate(zip(rows, peaks, strict=True)):
            # Keys after the query are masked (blank); the peak is full; the rest nearly empty.
            assert row[q + 1:].strip() == "", (layer, head, rows)
            assert row[peak] == full, (layer, head, rows)
            assert set(row[:q + 1].replace(full, "")) <= {empty}, (layer, head, rows)
    uniform = plain_thumbnail(text, 0, 3)  # row q: 1/(q + 1) on each key
    assert [len(r.rstrip()) for r in uniform] == [1, 2, 3, 4, 5, 6]
    assert uniform[0][0] == full


def test_color_cells_are_the_heatmaps_colors(built):
    text = view(Request(texts=[SIX], weights=str(built)), 160, True)
    line = next(li for li in text.splitlines() if ANSI.sub("", li).startswith("L0 "))
    cells = re.findall(r"\x1b\[38;2;(\d+);(\d+);(\d+)(?:;48;2;(\d+);(\d+);(\d+))?m([▀▄])", line)
    # L0H0's first line: queries 0 and 1 over keys 0 (and 1: masked for query 0, so ▄).
    top, bottom = tuple(map(int, cells[0][:3])), tuple(map(int, cells[0][3:6]))
    assert cells[0][6] == "▀" and top == viridis(1.0) and bottom == viridis(1.0)  # both on key 0
    assert cells[1][6] == "▄" and tuple(map(int, cells[1][:3])) == viridis(0.0)


# ── the renderer alone: any pattern, any box ────────────────────────────────────────────────

def causal_pattern(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    allowed = np.tri(n, dtype=bool)
    scores = np.where(allowed, rng.normal(size=(n, n)) * 3, -np.inf)
    pattern = np.exp(scores - scores.max(axis=1, keepdims=True))
    return pattern / pattern.sum(axis=1, keepdims=True), allowed


def by_loops(pattern, allowed, rows, cols):
    """The definition, one block at a time: mean over the block's queries of the weight on the
    block's keys; drawn where any cell is allowed."""
    qe = np.round(np.linspace(0, pattern.shape[0], rows + 1)).astype(int)
    ke = np.round(np.linspace(0, pattern.shape[1], cols + 1)).astype(int)
    values, drawn = np.zeros((rows, cols)), np.zeros((rows, cols), bool)
    for r in range(rows):
        for c in range(cols):
            block = pattern[qe[r]:qe[r + 1], ke[c]:ke[c + 1]]
            values[r, c] = block.sum(axis=1).mean()
            drawn[r, c] = allowed[qe[r]:qe[r + 1], ke[c]:ke[c + 1]].any()
    return values, drawn


@pytest.mark.parametrize(("n", "rows", "cols"), [(6, 6, 6), (7, 4, 3), (1000, 8, 5), (33, 16, 16)])
def test_downsample_is_the_block_definition(n, rows, cols):
    pattern, allowed = causal_pattern(n)
    values, drawn = render_thumbnails.downsample(pattern, rows, cols, allowed)
    want_values, want_drawn = by_loops(pattern, allowed, rows, cols)
    np.testing.assert_allclose(values, want_values, atol=1e-5)  # float32 sums of ≤ 1,000 terms
    np.testing.assert_array_equal(drawn, want_drawn)
    np.testing.assert_allclose(values.sum(axis=1), 1, atol=1e-5)  # rows stay distributions
    if (rows, cols) == (n, n):
        np.testing.assert_allclose(values, pattern, atol=1e-6)  # one block a cell: the pattern


def test_pad_queries_and_keys_are_left_out():
    pattern, allowed = causal_pattern(8)
    pattern[6:] = 0
    pattern[:, 6:] = 0
    allowed[6:] = False
    allowed[:, 6:] = False
    values, drawn = render_thumbnails.downsample(pattern, 4, 4, allowed)
    assert not drawn[3].any() and not drawn[:, 3].any()  # only padding there
    np.testing.assert_allclose(values[:3].sum(axis=1), 1, atol=1e-6)


def test_thumbnail_fits_its_box():
    pattern, allowed = causal_pattern(500)
    for color in (True, False):
        lines = render_thumbnails.thumbnail(pattern, 10, 4, allowed, color)
        assert len(lines) == 4 and all(line.cell_len == 10 for line in lines)
    pattern, allowed = causal_pattern(3)
    small = render_thumbnails.thumbnail(pattern, 10, 4, allowed, color=False)
    assert [line.plain for line in small] == ["█  ", small[1].plain[:2] + " ", small[2].plain]
    assert small[0].plain[1:] == "  " and small[1].plain[2] == " "  # masked cells are blank
