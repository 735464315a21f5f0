"""The terminal view, rendered into a recorded Console: labels, shapes, heatmap content, widths,
colors. The pattern numbers are read back from the rendered text and compared with the
engine's tensor, so a heatmap that drew the wrong matrix (or the wrong row) fails."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.cells import cell_len
from rich.console import Console

from attn_tracer.model.config import Config
from attn_tracer.model.engine import select_engine
from attn_tracer.model.pipeline import run
from attn_tracer.model.trace import Selection
from attn_tracer.model.weights import random_weights
from attn_tracer.render import heatmaps as render_heatmaps
from attn_tracer.render import terminal as render_terminal

SAMPLES = Path(__file__).resolve().parent.parent / "sample_texts"
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
    body = start + 2
    if lines[start + 1][column:].split() and all(
            x.isdigit() for x in lines[start + 1][column:].split()):
        body += 1  # a line of key positions, drawn when labels repeat
    for line in lines[body:]:
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
                          "--heads", "4", ENGLISH], env=env, capture_output=True, encoding="utf-8",
                         check=True).stdout
    # The first query attends only to itself: weight 1, viridis' top color (253, 231, 37).
    assert "48;2;253;231;37" in out
    # Masked cells carry no background color: the style right before each · has none.
    before_dots = re.findall(r"\x1b\[([0-9;]*)m *·", out)
    assert before_dots and not any("48;2" in style for style in before_dots)


@pytest.mark.parametrize("width", [80, 160])
def test_chinese_view_maps_pieces_back_to_characters(width):
    trace = trace_of(CHINESE)
    out = render(trace, width, False)
    plain = ANSI.sub("", out)
    # The token list: each piece as its character and piece number, not bytes alone.
    assert "0:今₁" in plain and "1:今₂" in plain and "<e4 bb>" not in plain.split("shape")[0]
    rows = heatmap_rows(out, 0)
    assert len(rows) == len(trace.inputs[0].tokens)
    # Rows: the character first; positions in front, since 天 天 repeat.
    assert rows[0].split()[:2] == ["0", "今₁"] and rows[1].split()[:2] == ["1", "今₂"]
    lines = plain.splitlines()
    column_line = lines[lines.index(next(x for x in lines if "attn layer 0 head 0" in x)) + 2]
    assert lines[lines.index(column_line) - 1].split()[:3] == ["0", "1", "2"]  # 天 天 repeat
    # Columns: a continuation piece is marked, so 今 split in two does not read as 今今.
    assert column_line.split()[:3] == ["今₁", "今₂", "天"]
    assert max(cell_len(line) for line in plain.splitlines()) <= width


def test_strongest_keys_align_by_cell_width_for_chinese():
    # Keys are CJK (two cells each): padded by len() the weight columns drift row by row.
    text = (SAMPLES / "chinese_paragraph.txt").read_text(encoding="utf-8")
    trace = trace_of(text, heads=(0,))
    plain = ANSI.sub("", render(trace, 120, False))
    listed = [x for x in plain.splitlines() if re.match(r"^\s*\d+ .* \d+:", x)]
    assert len(listed) > 10
    for line in listed:
        # Each "pos:label weight" item starts at the same cell offset in every row.
        # Key positions are right-aligned: measure where each item's ":" ends.
        ends = [cell_len(line[:m.end()]) for m in re.finditer(r"\d+:", line)]
        assert ends == [ends[0] + i * (ends[1] - ends[0]) for i in range(len(ends))]
    offsets = {cell_len(x[:re.search(r"\d+:", x).end()]) for x in listed}
    assert len(offsets) == 1, offsets  # and the first item starts in the same cell everywhere
    assert not any(".00" in x for x in listed)  # keys below 0.005 are not listed


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
    flat = " ".join(plain.split())
    assert "strongest keys" in flat
    # What was not listed, and the option that lists it, said exactly.
    assert "(queries 0–275 not listed: list them with --query 0:275; --json has every row)" in flat
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


# ── masked cells come from the mask, not from a weight of 0 ───────────────────────────────────

def expected_allowed(trace, b: int) -> np.ndarray:
    """The self-attention mask of batch row b, rebuilt here from lengths and padding."""
    inp = trace.inputs[b]
    total = inp.length + inp.padding
    start = inp.padding if inp.side == "left" else 0
    valid = np.zeros(total, bool)
    valid[start:start + inp.length] = True
    allowed = valid[:, None] & valid[None, :]
    if trace.config.mask == "causal":
        allowed &= np.arange(total)[None, :] <= np.arange(total)[:, None]
    return allowed


def test_an_underflowed_weight_is_not_drawn_as_masked():
    # No scale, no mask, one wide head: the softmax saturates until a weight underflows to
    # exactly 0 in float32. Nothing is masked, so nothing may be drawn ·.
    cfg = Config(d_model=768, heads=1, layers=1, scale=False, mask="none")
    engine = select_engine("numpy", "cpu", "float32", 8)
    trace, _ = run([ENGLISH], cfg, engine, random_weights(cfg), Selection((0,), (0,), "stages"))
    pattern = trace.tensors["blocks.0.attn.pattern"][0, 0]
    assert (pattern == 0).any()  # the premise: an exact 0 that no mask put there
    out = render(trace, 160, False, show_stages=True)
    rows = heatmap_rows(out, 0)
    assert len(rows) == 6
    for q, row in enumerate(rows):
        shown = cells(row, 6)
        assert "·" not in shown
        for k, cell in enumerate(shown):
            if pattern[q, k] == 0:
                assert cell == ".00"
    # The pattern stage of --stages (a probability matrix) says the same.
    plain = ANSI.sub("", out)
    stage = plain.split("pattern  pattern = softmax(scores)")[1].split("\n\n")[0]
    assert "·" not in stage and "0.00" in stage


@pytest.mark.parametrize("padding", ["right", "left"])
def test_masked_cells_are_where_the_mask_forbids(padding):
    cfg = Config(d_model=64, heads=4, layers=1)
    engine = select_engine("numpy", "cpu", "float32", 8)
    trace, _ = run([ENGLISH, "A dog"], cfg, engine, random_weights(cfg),
                   Selection((0,), (0,), "patterns"), padding=padding)
    for b in (0, 1):
        allowed = expected_allowed(trace, b)
        assert np.all(trace.tensors["blocks.0.attn.pattern"][b, 0][~allowed] == 0)
        np.testing.assert_array_equal(render_heatmaps.allowed_mask(trace, "attn", b), allowed)
    plain = ANSI.sub("", render(trace, 160, False, batch_rows=[1]))
    lines = plain.splitlines()
    start = next(i for i, x in enumerate(lines) if "attn layer 0 head 0 · text 1" in x)
    allowed = expected_allowed(trace, 1)
    for q, line in enumerate(lines[start + 2:start + 2 + 6]):
        shown = line.split()[-6:]
        valid = trace.inputs[1].valid
        # Each forbidden cell says which mask forbids it: × padding (a pad key, or every key of
        # a pad query), · the causal mask; an allowed cell is a number.
        expected = ["×" if not (valid[q] and valid[k]) else "·" if not allowed[q, k] else "num"
                    for k in range(6)]
        assert [c if c in "·×" else "num" for c in shown] == expected


def test_cross_attention_mask_is_both_texts_real_tokens():
    cfg = Config(d_model=64, heads=4, layers=1)
    engine = select_engine("numpy", "cpu", "float32", 8)
    trace, _ = run(["The cat sat", "Hi"], cfg, engine, random_weights(cfg, cross=True),
                   Selection((0,), (0,), "patterns"), cross_texts=["Le chat", "un chien noir"])
    pattern = trace.tensors["blocks.0.cross_attn.pattern"]
    for b in (0, 1):
        q, k = trace.inputs[b], trace.cross[b]
        expected = (np.arange(q.length + q.padding) < q.length)[:, None] & (
            np.arange(k.length + k.padding) < k.length)[None, :]
        allowed = render_heatmaps.allowed_mask(trace, "cross_attn", b)
        np.testing.assert_array_equal(allowed, expected)
        assert np.all(pattern[b, 0][~allowed] == 0) and np.all(pattern[b, 0][allowed] > 0)


# ── --values: the blocks are the tensors of Q = X·W_Q + b_Q ──────────────────────────────────

def printed_block(plain: str, title: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(row labels, numbers, decimals) of the block whose title line starts with `title`;
    a bias row printed under the block (after one blank line) is returned as its last row."""
    lines = plain.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(title))
    body = []
    i = start + 2
    while i < len(lines) and lines[i].strip():
        body.append(lines[i].split())
        i += 1
    bias = title.split()[0].replace("W_", "b_")
    if i + 1 < len(lines) and lines[i + 1].split()[:1] == [bias]:
        body.append(lines[i + 1].split())
    numbers = [cell for row in body for cell in row[1:]]
    decimals = {len(c.split(".")[1]) if "." in c else 0 for c in numbers}
    return [row[0] for row in body], np.array([[float(c) for c in row[1:]] for row in body]), \
        sorted(decimals)


@pytest.mark.parametrize("arch", ["attn", "gpt2"])
def test_values_print_the_input_weights_bias_and_projection(arch):
    cfg = Config(d_model=4, heads=2, layers=2, arch=arch)
    engine = select_engine("numpy", "cpu", "float32", 3)
    weights = random_weights(cfg)
    trace, _ = run(["a b c"], cfg, engine, weights, Selection((0, 1), (0, 1), "all"))
    plain = ANSI.sub("", render(trace, 160, False, weights=weights.params, show_values=True))
    sections = plain.split("values of layer ")
    for layer in (0, 1):
        text = next(s for s in sections if s.startswith(f"{layer} "))
        x_name = (f"blocks.{layer}.ln_1" if arch == "gpt2"
                  else "resid_pre" if layer == 0 else f"blocks.{layer - 1}.resid_post")
        x_true = trace.tensors[x_name][0].astype(np.float64)
        w_true = weights.params[f"blocks.{layer}.attn.W_Q"].astype(np.float64)
        b_true = weights.params[f"blocks.{layer}.attn.b_Q"].astype(np.float64)
        q_true = trace.tensors[f"blocks.{layer}.attn.q"][0]
        # The premise, from the trace alone: this X is what the attention multiplied.
        np.testing.assert_allclose(q_true, x_true @ w_true + b_true, atol=1e-5)

        _, x, (x_dec,) = printed_block(text, "X  ")
        labels, wb, (w_dec,) = printed_block(text, "W_Q  ")
        assert labels[-1] == "b_Q"  # b_Q printed under W_Q's columns
        w, b = wb[:-1], wb[-1]
        _, q, (q_dec,) = printed_block(text, "Q  ")
        dx, dw, dq = (0.5 * 10.0 ** -d + 1e-9 for d in (x_dec, w_dec, q_dec))
        # The printed blocks are the right tensors, rounded…
        assert np.abs(x - x_true).max() <= dx and np.abs(w - w_true).max() <= dw
        assert np.abs(b - b_true).max() <= dw and np.abs(q - q_true).max() <= dq
        # …and Q = X·W_Q + b_Q checks by hand, within what the rounding allows.
        bound = dq + dw + dx * np.abs(w).sum(0)[None, :] + np.abs(x) @ np.full((4, 4), dw) \
            + 4 * dx * dw
        assert np.all(np.abs(q - (x @ w + b)) <= bound + 1e-6)
    # W_O and b_O are printed too, before out = Z·W_O + b_O.
    assert "W_O  [d_model, d_model] = [4, 4]: rows by head" in plain and "b_O [d_model]" in plain


def test_values_skip_an_input_that_was_not_captured():
    cfg = Config(d_model=4, heads=2, layers=2)
    engine = select_engine("numpy", "cpu", "float32", 3)
    weights = random_weights(cfg)
    trace, _ = run(["a b c"], cfg, engine, weights, Selection((1,), (0, 1), "all"))
    trace.tensors.pop("blocks.0.resid_post", None)
    plain = ANSI.sub("", render(trace, 120, False, weights=weights.params, show_values=True))
    note = [x for x in plain.splitlines() if "blocks.0.resid_post" in x and "not captured" in x]
    assert len(note) == 1
    assert "Q  Q = X·W_Q + b_Q" in plain


# ── every width: nothing wider than the terminal, nothing split that must stay whole ─────────

EMOJI = (__import__("pathlib").Path(__file__).parents[1] / "sample_texts" / "emoji.txt")
WIDTH_CASES = {
    "english": dict(texts=[ENGLISH]),
    "chinese": dict(texts=[CHINESE]),
    "emoji": dict(texts=[EMOJI.read_text(encoding="utf-8")], max_length=30),
    "batch": dict(texts=[ENGLISH, "Hi"], heads=(0, 1, 2, 3)),
    "two tokens": dict(texts=["Hi there", "A"], heads=(0, 1, 2, 3)),  # titles wider than maps
    "cross": dict(texts=["The cat sat", "A long sentence with more words"],
                  cross_texts=["Le chat noir"]),
    "stages": dict(texts=[ENGLISH], capture="stages", render=dict(show_stages=True)),
    "predict": dict(texts=[ENGLISH, "Hi"], predict_top_k=10),
}


@__import__("functools").cache
def width_case(name: str):
    case = dict(WIDTH_CASES[name])
    cfg = Config(d_model=64, heads=4, layers=2)
    engine = select_engine("numpy", "cpu", "float32", 8)
    cross = case.get("cross_texts")
    trace, _ = run(case["texts"], cfg, engine, random_weights(cfg, cross=bool(cross)),
                   Selection((0,), case.get("heads", (0, 1)), case.get("capture", "patterns")),
                   cross_texts=cross, max_length=case.get("max_length"),
                   predict_top_k=case.get("predict_top_k"))
    return trace, case.get("render", {})


# A formula of up to ONE_LINE cells is never broken, at any width from 40 on: the shape trace
# changes its layout (dims under the shape, then wrapped there, then each step on its own lines)
# rather than give a formula less room. A longer one may wrap where the terminal is too narrow
# for it (at 40 columns, "logits = h·W_Eᵀ (at the last real position)" cannot fit any layout),
# but only between two words, each line starting in the same column, nothing cut; at 160
# columns every formula is on one line.
ONE_LINE = 24


def shown_whole(lines: list[str], formula: str, one_line: bool) -> bool:
    if any(formula in line for line in lines):
        return True
    if one_line:
        return False
    words = formula.split(" ")
    for i, line in enumerate(lines):
        x = line.find(words[0])
        while x >= 0:
            if (x == 0 or line[x - 1] == " ") and _wrapped_from(lines, i, x, words):
                return True
            x = line.find(words[0], x + 1)
    return False


def _wrapped_from(lines: list[str], i: int, x: int, words: list[str]) -> bool:
    """The words on lines i, i+1, … from column x, a line ending at a column boundary."""
    rest = words
    while rest:
        if i >= len(lines) or (x > 0 and lines[i][:x].strip() and lines[i][x - 1] != " "):
            return False
        segment = lines[i][x:]
        taken = 0
        for n in range(len(rest), 0, -1):
            piece = " ".join(rest[:n])
            after = segment[len(piece):]
            if segment.startswith(piece) and (not after.strip() or after.startswith("  ")):
                taken = n
                break
        if not taken:
            return False
        rest, i = rest[taken:], i + 1
    return True


@pytest.mark.parametrize("width", [40, 60, 80, 100, 160])
@pytest.mark.parametrize("name", list(WIDTH_CASES))
def test_every_width_keeps_lines_labels_and_formulas_whole(name, width):
    trace, options = width_case(name)
    plain = ANSI.sub("", render(trace, width, False, **options))
    lines = plain.splitlines()
    too_wide = [x for x in lines if cell_len(x) > width]
    assert not too_wide, "\n".join(too_wide[:3])
    # Header: lines break only between its · items; cross-attention is named.
    head = plain.split("\n\n")[0].splitlines()
    for item in ("2 layers × 4 heads", "d_model 64", "d_head 16", "pos sinusoidal",
                 "mask causal", "random weights, seed 0 (untrained)"):
        assert any(item in x for x in head), (item, head)
    assert any("cross-attention" in x for x in head) == (trace.cross is not None)
    # Token strip: every pos:label on one line (a label like <f0 9f 91> has spaces).
    for inp in [*trace.inputs, *(trace.cross or [])]:
        names = [n for n, real in zip(render_heatmaps.reading_labels(inp), inp.valid,
                                      strict=True) if real]
        for pos, name in enumerate(names):
            assert any(f"{pos}:{name}" in x for x in lines), f"{pos}:{name}"
    # Shape trace: every formula whole.
    for formula in {s.op for s in trace.steps}:
        one_line = width == 160 or cell_len(formula) <= ONE_LINE
        assert shown_whole(lines, formula, one_line), (formula, width)
    # Heatmap titles whole, even where a title is wider than its map.
    kinds = ["attn", "cross_attn"] if trace.cross else ["attn"]
    for kind in kinds:
        for h in trace.selection.heads:
            for b in range(len(trace.inputs)):
                where = f" · text {b}" if len(trace.inputs) > 1 else ""
                title = f"{kind} layer 0 head {h}{where}"
                assert any(x.startswith(title) or f"  {title}" in x for x in lines), title
    flat = " ".join(plain.split())
    k_len = len(trace.inputs[0].valid)
    if 10 + 1 + 4 * k_len > width:  # the strongest-keys view: its explanation is whole
        assert re.search(rf"{k_len} keys do not fit in {width} columns: the (\d+ )?strongest "
                         r"keys? of each query", flat)
    if any(i.padding for i in trace.inputs):  # the pad legend on a line of its own
        assert f"{render_heatmaps.PADDED} padding mask (pad key, or pad query)" in plain
    if trace.predictions and width >= 80:  # the title above the table, on one line
        titles = [x for x in lines if x.startswith("next token after")]
        assert len(titles) == 2 and all(x.rstrip().endswith("T = 1)") for x in titles)


# ── wording, numbers, predictions, stages of several heads ───────────────────────────────────

def test_singular_counts():
    cfg = Config(d_model=8, heads=1, layers=1)
    engine = select_engine("numpy", "cpu", "float32", 3)
    trace, _ = run(["Hi"], cfg, engine, random_weights(cfg), Selection((0,), (0,)))
    flat = " ".join(ANSI.sub("", render(trace, 120, False)).split())
    assert "1 text · 1 token · 1 layer × 1 head" in flat and "(1 token)" in flat
    for wrong in ("1 tokens", "1 layers", "1 heads", "1 texts"):
        assert wrong not in flat


def test_stages_use_one_number_format_per_matrix():
    trace = trace_of(ENGLISH, capture="stages", heads=(0,))
    scores = trace.tensors["blocks.0.attn.scores"][0, 0]
    assert np.abs(scores).max() >= 10 and np.abs(scores).min() < 1  # the premise: mixed sizes
    # 60 columns: one stage a line, so each matrix's rows are whole lines.
    lines = ANSI.sub("", render(trace, 60, False, show_stages=True)).splitlines()
    for stage in ("scores", "scaled", "masked", "pattern"):
        start = next(i for i, x in enumerate(lines) if x.startswith(f"{stage}  "))
        rows = lines[start + 2:start + 8]
        assert len(decimals_of(rows)) == 1, (stage, rows)
    start = next(i for i, x in enumerate(lines) if x.startswith("scores  "))
    rows = lines[start + 2:start + 8]
    shown = np.array([[float(c) for c in x.split()[1:7]] for x in rows])
    (d,) = decimals_of(rows)
    assert np.abs(shown - scores).max() <= 0.5 * 10.0 ** -d + 1e-6


def decimals_of(rows: list[str]) -> set[int]:
    return {len(c.split(".")[1]) if "." in c else 0 for x in rows for c in x.split()[1:]
            if c not in ("−∞", "·")}


def test_stages_say_which_head_of_several():
    trace = trace_of(ENGLISH, capture="stages", heads=(2, 3))
    plain = ANSI.sub("", render(trace, 160, False, show_stages=True))
    assert "stages of head 2 (choose another with --head)" in plain
    one = ANSI.sub("", render(trace_of(ENGLISH, capture="stages", heads=(2,)), 160, False,
                              show_stages=True))
    assert "choose another with --head" not in one


def predict_trace(padding: str = "right", texts=(ENGLISH, "Hi"), top_k: int = 10):
    cfg = Config(d_model=64, heads=4, layers=2)
    engine = select_engine("numpy", "cpu", "float32", 8)
    trace, _ = run(list(texts), cfg, engine, random_weights(cfg), Selection((0,), (0,)),
                   padding=padding, predict_top_k=top_k)
    return trace


def prediction_rows(plain: str, batch: int) -> list[list[str]]:
    lines = plain.splitlines()
    start = next(i for i, x in enumerate(lines)
                 if x.startswith("next token after") and f"text {batch}," in x)
    rows = []
    for line in lines[start + 3:]:
        if not line.strip() or not line.split()[0].isdigit():
            break
        rows.append(line)
    return rows


def bar_eighths(row: str) -> int:
    """The length of a prediction row's bar, in eighths of a cell."""
    from attn_tracer.render.numbers import EIGHTHS

    return 8 * row.count("█") + sum(EIGHTHS.index(c) for c in row if c in EIGHTHS[1:])


def test_predictions_position_bars_and_rows():
    trace = predict_trace("left")
    plain = ANSI.sub("", render(trace, 160, False))
    # Position: the index among the text's real tokens, as in the token strip (not the batch
    # index, 5 with left padding).
    assert re.search(r"“Hi” \(text 1, position 0,", plain)
    assert re.search(r"“␣mat” \(text 0, position 5,", plain)
    # Bars: 30 cells for the top token, the others in proportion to its probability.
    for b, p in enumerate(trace.predictions):
        rows = prediction_rows(plain, b)
        assert len(rows) == len(p.top)
        for row, top in zip(rows, p.top, strict=True):
            eighths = max(round(top["prob"] / p.top[0]["prob"] * 30 * 8), 1)
            assert bar_eighths(row) == eighths, (row, top)
        assert rows[0].count("█") == 30
    # Only the batch rows asked for.
    one = ANSI.sub("", render(trace, 160, False, batch_rows=[1]))
    assert "(text 1, position 0" in one and "(text 0, position" not in one


def test_random_logits_are_unit_scale_and_temperature_shows():
    """Random weights: logits N(0, 3²) (not the input token's own, hundreds above the rest), so
    T = 0.5, 1, 2 visibly sharpen and flatten the distribution; the bars stay visible."""
    from attn_tracer.model.weights import LOGIT_STD

    tops = {}
    for temperature in (0.5, 1.0, 2.0):
        cfg = Config(d_model=64, heads=4, layers=2)
        engine = select_engine("numpy", "cpu", "float32", 8)
        trace, _ = run([ENGLISH], cfg, engine, random_weights(cfg), Selection((0,), (0,)),
                       predict_top_k=10, temperature=temperature)
        logits = trace.tensors["logits"][0].astype(np.float64)
        # N(0, LOGIT_STD²) over 50,257 draws: the sample std within a few percent of it.
        assert abs(logits.std() / LOGIT_STD - 1) < 0.05
        assert logits.max() - np.sort(logits)[-2] < 3  # no token dominates by hundreds
        tops[temperature] = trace.predictions[0].top[0]["prob"]
        plain = ANSI.sub("", render(trace, 100, False))
        rows = prediction_rows(plain, 0) if "text 0," in plain else _single_rows(plain)
        assert all(bar_eighths(row) >= 1 for row in rows)  # a bar at every temperature
        probs = [row.split()[3] for row in rows]
        assert len({len(p) for p in probs}) == 1  # one number style: fixed decimals
    assert tops[0.5] > 2 * tops[1.0] > 4 * tops[2.0]


def _single_rows(plain: str) -> list[str]:
    lines = plain.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("next token after"))
    return [x for x in lines[start + 3:start + 13] if x.split() and x.split()[0].isdigit()]


@pytest.mark.parametrize("top_k", [100, 101, 50257])
def test_a_long_top_k_draws_the_first_rows_and_says_so(top_k):
    """--top-k up to the whole vocabulary: the table stops at TOP_SHOWN rows (a Rich table costs
    milliseconds a row; 50,257 took minutes), says what it left out, and the trace keeps all."""
    from attn_tracer.render.numbers import TOP_SHOWN

    trace = predict_trace(texts=(ENGLISH,), top_k=top_k)
    assert len(trace.predictions[0].top) == top_k
    plain = ANSI.sub("", render(trace, 100, False))
    lines = plain.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("next token after"))
    ranks = [x.split()[0] for x in lines[start + 3:] if x.strip() and x.split()[0].isdigit()]
    assert ranks == [str(n) for n in range(1, min(top_k, TOP_SHOWN) + 1)]
    notice = [x for x in lines if x.startswith("showing the top")]
    if top_k > TOP_SHOWN:
        assert notice == [f"showing the top {TOP_SHOWN} of {top_k} (--top-k); --json lists all "
                          f"{top_k}"]
    else:
        assert notice == []
