"""The terminal view, rendered into a recorded Console: labels, shapes, heatmap content, widths,
colors. The pattern numbers are read back from the rendered text and compared with the
engine's tensor, so a heatmap that drew the wrong matrix (or the wrong row) fails."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from rich.cells import cell_len
from rich.console import Console

from attn_tracer import render_terminal
from attn_tracer.config import Config
from attn_tracer.engine import select_engine
from attn_tracer.pipeline import run
from attn_tracer.trace import Selection
from attn_tracer.weights import random_weights

ENGLISH = "The cat sat on the mat"
CHINESE = "今天天气很好"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def trace_of(text: str, capture: str = "patterns", heads=(0, 1), **config):
    cfg = Config(d_model=64, heads=4, layers=2, **config)
    engine = select_engine("numpy", "cpu", "float32", 8)
    trace, _ = run([text], cfg, engine, random_weights(cfg), Selection((0,), heads, capture))
    return trace


def render(trace, width: int, color: bool, **options) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=color,
                      color_system="truecolor" if color else None, highlight=False)
    render_terminal.render(trace, console, **options)
    return console.file.getvalue()


def heatmap_rows(text: str, head: int) -> list[str]:
    """The lines of one head's heatmap body (plain text), in query order."""
    plain = ANSI.sub("", text)
    lines = plain.splitlines()
    start = next(i for i, line in enumerate(lines) if f"attn layer 0 head {head}" in line)
    column = lines[start].index(f"attn layer 0 head {head}")
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(line[column:])
    return rows


def cells(row: str, n: int) -> list[str]:
    """The n cells after the row label (the English labels have no spaces)."""
    return row.split()[1:1 + n]


@pytest.mark.parametrize("width", [80, 160])
@pytest.mark.parametrize("color", [False, True])
def test_english_view(width, color):
    trace = trace_of(ENGLISH)
    out = render(trace, width, color)
    plain = ANSI.sub("", out)
    # Header, tokens and the shape trace with dimension names.
    assert "2 layers × 4 heads · d_model 64 · d_head 16" in " ".join(plain.split())
    for label in ("The", "␣cat", "␣sat", "␣on", "␣the", "␣mat"):
        assert label in plain
    for shape, dims in (("[1, 6, 64]", "batch, len, d_model"),
                        ("[1, 6, 4, 16]", "batch, len, heads, d_head"),
                        ("[1, 4, 6, 16]", "batch, heads, len, d_head"),
                        ("[1, 4, 6, 6]", "batch, heads, q_len, k_len")):
        assert shape in plain and dims in plain
    for formula in ("Q = X·W_Q + b_Q", "scores = Q·Kᵀ", "÷ √d_head", "softmax", "Z = pattern·V",
                    "merge heads", "X + attn(X)"):
        assert formula in plain
    # Every line fits the terminal.
    assert max(cell_len(line) for line in plain.splitlines()) <= width
    # Heatmap content equals the engine's pattern, masked cells drawn as ·.
    pattern = trace.tensors["blocks.0.attn.pattern"][0]
    for i, head in enumerate((0, 1)):
        rows = heatmap_rows(out, head)
        assert len(rows) == 6
        for q, row in enumerate(rows):
            shown = cells(row, 6)
            for k, cell in enumerate(shown):
                if k > q:
                    assert cell == "·"
                else:
                    w = pattern[i, q, k]
                    if cell == "1.0":
                        assert w >= 0.995
                    else:
                        assert abs(float(cell) - w) <= 0.0051
    assert ("\x1b[" in out) == color


def test_colors_follow_viridis_and_masked_cells_have_none():
    # A subprocess, as a user runs it: Rich caches combined styles with the ANSI codes of the
    # first console that drew them, so in-process consoles of other color systems would leak.
    env = {**os.environ, "FORCE_COLOR": "1", "COLORTERM": "truecolor", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    out = subprocess.run([sys.executable, "-m", "attn_tracer", "trace", "--d-model", "64",
                          "--heads", "4", ENGLISH], env=env, capture_output=True, text=True,
                         check=True).stdout
    # The first query attends only to itself: weight 1, viridis' top color (253, 231, 37).
    assert "48;2;253;231;37" in out
    # Masked cells carry no background color: the style right before each · has none.
    before_dots = re.findall(r"\x1b\[([0-9;]*)m *·", out)
    assert before_dots and not any("48;2" in style for style in before_dots)


@pytest.mark.parametrize("width", [80, 160])
def test_chinese_view_maps_pieces_back_to_characters(width):
    trace = trace_of(CHINESE)
    plain = ANSI.sub("", render(trace, width, False))
    assert "<e4 bb> 今" in plain and "<8a> 今" in plain  # rows: exact bytes and the character
    header = heatmap_rows(render(trace, width, False), 0)
    lines = plain.splitlines()
    column_line = lines[lines.index(next(x for x in lines if "attn layer 0 head 0" in x)) + 1]
    assert column_line.split()[:3] == ["今", "今", "天"]  # columns: the character, not <e…
    assert len(header) == len(trace.inputs[0].tokens)
    assert max(cell_len(line) for line in plain.splitlines()) <= width


def test_stages_side_by_side():
    trace = trace_of(ENGLISH, capture="stages", heads=(1,))
    plain = ANSI.sub("", render(trace, 160, False, show_stages=True))
    for title in ("scores", "scaled", "masked", "pattern"):
        assert f"{title}  " in plain
    assert "−∞" in plain  # the masked stage shows where the mask put −∞


def test_values_show_the_numbers():
    cfg = Config(d_model=4, heads=2, layers=1)
    engine = select_engine("numpy", "cpu", "float32", 3)
    weights = random_weights(cfg)
    trace, _ = run(["a b c"], cfg, engine, weights, Selection((0,), (0, 1), "all"))
    plain = render(trace, 120, False, weights=weights.params, show_values=True)
    assert "h0.0" in plain and "h1.1" in plain  # Q's columns grouped by head
    w_q = weights.params["blocks.0.attn.W_Q"]
    assert f"{w_q[0, 0]:.2f}" in plain


def test_no_scale_saturates():
    # Without ÷√d_head the scores are √d_head times larger: rows put more weight on one key.
    def peak(**config):
        trace = trace_of(ENGLISH, heads=(0, 1, 2, 3), **config)
        return trace.tensors["blocks.0.attn.pattern"].max(axis=-1).mean()

    assert peak(scale=False) > peak()


def test_long_text_switches_to_strongest_keys():
    text = " ".join(["word"] * 300)
    trace = trace_of(text, heads=(0,))
    plain = ANSI.sub("", render(trace, 100, False))
    assert "strongest keys" in plain and "query rows not shown" in plain
    assert "tokens not shown" in plain
    assert max(cell_len(line) for line in plain.splitlines()) <= 100
    assert len(plain.splitlines()) < 120


def test_user_text_is_not_markup():
    trace = trace_of("[bold]x[/] [red]y")
    plain = render(trace, 120, False)
    labels = [t.text for t in trace.inputs[0].tokens]
    assert "[/" in "".join(labels)
    for label in labels:  # markup would have swallowed the bracketed pieces
        assert label in plain


def test_all_heads_fill_the_width():
    trace = trace_of(ENGLISH, heads=(0, 1, 2, 3))
    plain = ANSI.sub("", render(trace, 160, False))
    title_lines = [x for x in plain.splitlines() if "attn layer 0 head" in x]
    assert len(title_lines) < 4  # several heatmaps side by side per line
    assert np.all([cell_len(x) <= 160 for x in plain.splitlines()])
