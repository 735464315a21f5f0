"""The study notes' concepts, each shown and each checked against a computation of its own.

The worked example of the notes (X 2×4, 8 heads of d_head 3, Q/K/V 2×3 a head, QKᵀ 2×2, Z 2×3,
the concat 2×24, W_O 24×4) is run through `attn trace --values`; every printed matrix is then
recomputed in NumPy from the *printed* inputs, within what their rounding allows, so a view
that printed the wrong tensor, the wrong head's columns or a stale number fails. The low-rank
value circuit is checked against numpy.linalg.matrix_rank, the per-head ΔE against the block's
output, the cost figures against hand-written formulas at two lengths.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from rich.cells import cell_len

from attn_tracer.analysis.circuits import value_circuit
from attn_tracer.cli import app
from attn_tracer.model import memory
from attn_tracer.model.config import Config
from attn_tracer.model.engine import select_engine
from attn_tracer.model.pipeline import run
from attn_tracer.model.trace import Selection
from attn_tracer.model.weights import random_weights

NOTES = ["--d-model", "4", "--heads", "8", "--d-head", "3", "--layers", "1"]
TEXT = "AI me"  # two GPT-2 tokens, as the notes' X has two rows ("LLM me" is three: LL, M, ␣me)
WIDE = {"COLUMNS": "200", "NO_COLOR": "1"}  # nothing of the worked example wraps at 200
# A block's title, where blocks stand side by side on one line.
TITLES = re.compile(r"(?:scores|scaled|masked|pattern|Z)(?: L\d+H\d+|  )|causal mask|"
                    r"padding mask|mask = |mask: |value down|value up|W_OV = ")


def view(runner, *args: str, env=WIDE) -> str:
    result = runner.invoke(app, ["trace", *args], env=env)
    assert result.exit_code == 0, result.stderr
    return result.stdout


class Block:
    """One printed matrix: its row and column labels, its numbers (−∞ as -inf, a masked
    pattern cell · as nan), the half-unit of its last printed decimal, and its footer row."""

    def __init__(self, rows, cols, numbers, footer=None):
        self.rows, self.cols = rows, cols
        self.m = np.array([[_number(c) for c in r] for r in numbers])
        self.d = _half_unit([c for r in numbers for c in r])
        self.footer = None
        if footer is not None:
            self.footer = np.array([_number(c) for c in footer[1]])
            self.footer_d = _half_unit(footer[1])


def _number(cell: str) -> float:
    special = {"−∞": -math.inf, "·": math.nan}
    return special[cell] if cell in special else float(cell)


def _half_unit(cells: list[str]) -> float:
    decimals = {len(c.split(".")[1]) if "." in c else 0 for c in cells if c not in ("−∞", "·")}
    assert len(decimals) <= 1, decimals  # one number style a matrix
    return 0.5 * 10.0 ** -(decimals.pop() if decimals else 2)


def block(plain: str, title: str) -> Block:
    """The matrix whose title starts with `title`, wherever it stands on its line."""
    lines = plain.splitlines()
    # At the start of a line, or where a block of a grid starts.
    at = [(i, c) for i, line in enumerate(lines) for c in [m.start() for m in
                                                          re.finditer(re.escape(title), line)]
          if c == 0 or (line[c - 2:c] == "  " and TITLES.match(line, c))]
    assert len(at) == 1, (title, at)
    i, start = at[0]
    ends = [m.start() for m in TITLES.finditer(lines[i]) if m.start() > start]
    end = ends[0] if ends else None

    def segment(k: int) -> list[str]:
        return lines[k][start:end].split() if k < len(lines) else []

    cols = segment(i + 1)
    rows, numbers, k = [], [], i + 2
    while segment(k):
        cells = segment(k)
        rows.append(cells[0])
        numbers.append(cells[1:])
        k += 1
    footer = None
    if segment(k + 1)[:1] and segment(k + 1)[0].startswith("b_"):
        footer = (segment(k + 1)[0], segment(k + 1)[1:])
    assert numbers and all(len(r) == len(cols) for r in numbers), (title, cols, numbers)
    return Block(rows, cols, numbers, footer)


def check_product(a: Block | np.ndarray, da: float, b: np.ndarray, db: float, c: Block,
                  bias: np.ndarray | None = None, dbias: float = 0.0) -> None:
    """c ≈ a·b (+ bias), with every operand as printed: the difference stays within what
    rounding the printed operands by da, db (and the bias by dbias) and c by its own half-unit
    can make it, |â||b̂ − b| + |b̂||â − a| + |â − a||b̂ − b| summed over the inner axis."""
    a = a.m if isinstance(a, Block) else a
    bound = (np.abs(a) @ np.full(b.shape, db) + np.full(a.shape, da) @ np.abs(b)
             + a.shape[1] * da * db + c.d + dbias + 1e-5)  # 1e-5: float32's own product error
    got = a @ b + (0 if bias is None else bias)
    assert np.all(np.abs(got - c.m) <= bound), (got, c.m, bound)


@pytest.fixture(scope="module")
def notes(request):
    from typer.testing import CliRunner

    return view(CliRunner(), *NOTES, "--values", TEXT)


def test_the_notes_worked_example_has_the_notes_shapes(notes):
    header = " ".join(notes.split("\n\n", 1)[0].split())
    assert "8 heads · d_model 4 · d_head 3 · heads·d_head 24" in header  # 200 columns: one line
    shapes = {"X  ": (2, 4), "W_Q  ": (4, 24), "Q  ": (2, 24), "K  ": (2, 24), "V  ": (2, 24),
              "Z, heads merged": (2, 24), "W_O  ": (24, 4), "out  ": (2, 4)}
    for title, shape in shapes.items():
        assert block(notes, title).m.shape == shape, title
    for h in range(8):
        for stage in ("scores", "scaled", "masked", "pattern"):
            assert block(notes, f"{stage} L0H{h}  [2, 2]").m.shape == (2, 2)
        assert block(notes, f"Z L0H{h} = pattern·V  [2, 3]").m.shape == (2, 3)
    # The titles give the shapes in words and numbers; the columns are grouped by head.
    assert "W_Q  [d_model, heads·d_head] = [4, 24]" in notes
    assert "W_O  [heads·d_head, d_model] = [24, 4]" in notes
    assert "Q  Q = X·W_Q + b_Q  [len, heads·d_head] = [2, 24]" in notes
    want = [f"h{h}.{i}" for h in range(8) for i in range(3)]
    assert block(notes, "W_Q  ").cols == want and block(notes, "Q  ").cols == want
    assert block(notes, "W_O  ").rows[:24] == want  # W_O's rows by head, then b_O
    assert "y = x·W + b, i.e. (Wᵀ)x + b in column form" in " ".join(notes.split())


def test_every_printed_matrix_follows_from_the_printed_inputs(notes):
    x = block(notes, "X  ")
    W = {n: block(notes, f"W_{n}  ") for n in "QKVO"}
    qkv = {n: block(notes, f"{n}  {n} = X·W_{n}") for n in "QKV"}
    for n in "QKV":  # Q = X·W_Q + b_Q, with b_Q printed under W_Q
        check_product(x, x.d, W[n].m, W[n].d, qkv[n], W[n].footer, W[n].footer_d)
    q, k, v = (qkv[n] for n in "QKV")
    merged = block(notes, "Z, heads merged")
    causal = block(notes, "causal mask")
    assert np.array_equal(causal.m, [[0, -math.inf], [0, 0]])  # 0 / −∞, key after query
    for h in range(8):
        cols = slice(3 * h, 3 * h + 3)  # head h's columns h.0 h.1 h.2
        scores = block(notes, f"scores L0H{h}  ")
        check_product(q.m[:, cols], q.d, k.m[:, cols].T, k.d, scores)
        scaled = block(notes, f"scaled L0H{h}  ")
        assert np.all(np.abs(scores.m / math.sqrt(3) - scaled.m)
                      <= scores.d / math.sqrt(3) + scaled.d + 1e-9)
        masked = block(notes, f"masked L0H{h}  ")
        assert np.array_equal(np.isinf(masked.m), np.isinf(causal.m))
        keep = np.isfinite(causal.m)
        assert np.all(np.abs(masked.m[keep] - scaled.m[keep]) <= masked.d + scaled.d + 1e-9)
        pattern = block(notes, f"pattern L0H{h}  ")
        assert np.array_equal(np.isnan(pattern.m), ~keep)  # · exactly where the mask is −∞
        e = np.exp(masked.m - masked.m.max(axis=1, keepdims=True))
        expected = e / e.sum(axis=1, keepdims=True)
        # Each printed logit is off by ≤ δ: each probability by a factor within e^(±2δ).
        bound = expected * (math.exp(2 * masked.d) - 1) + pattern.d + 1e-9
        assert np.all(np.abs(np.nan_to_num(pattern.m) - expected) <= bound), (h, pattern.m)
        z = block(notes, f"Z L0H{h} = ")
        check_product(np.nan_to_num(pattern.m), pattern.d, v.m[:, cols], v.d, z)
        assert np.all(np.abs(merged.m[:, cols] - z.m) <= merged.d + z.d + 1e-9)  # the concat
    out = block(notes, "out  out = Z·W_O")
    check_product(merged, merged.d, W["O"].m, W["O"].d, out, W["O"].footer, W["O"].footer_d)
    assert "the 8 masked entries (e^−∞ = 0) are all exactly 0" in notes


def test_each_heads_change_adds_up_to_out_and_the_residual(notes):
    """ΔE_h = Z_h·W_O[h] at the last position, their sum + b_O = out, X + out = resid_post."""
    merged, W_O, x, out = (block(notes, t) for t in ("Z, heads merged", "W_O  ", "X  ",
                                                     "out  out = Z·W_O"))
    changes = block(notes, "each head's change ΔE_h")
    assert "at position 1 (“␣me”, the last real token)" in " ".join(notes.split())
    assert changes.rows == [*(f"L0H{h}" for h in range(8)), "b_O", "Σ", "out", "X",
                            "resid_post"]
    parts = changes.m[:8]
    for h in range(8):
        row = Block([], [], [[f"{v:.2f}" for v in parts[h]]])
        row.d = changes.d
        check_product(merged.m[1:, 3 * h:3 * h + 3], merged.d, W_O.m[3 * h:3 * h + 3], W_O.d,
                      row)
    np.testing.assert_array_equal(changes.m[8], W_O.footer)  # b_O, the same numbers
    # Σ_h ΔE_h + b_O: nine printed rows, each off by ≤ d, against the Σ row.
    assert np.all(np.abs(parts.sum(0) + changes.m[8] - changes.m[9]) <= 10 * changes.d + 1e-9)
    assert np.all(np.abs(changes.m[10] - out.m[1]) <= changes.d + out.d + 1e-9)  # = out
    assert np.all(np.abs(changes.m[11] - x.m[1]) <= changes.d + x.d + 1e-9)  # X at position 1
    assert np.all(np.abs(changes.m[10] + changes.m[11] - changes.m[12]) <= 3 * changes.d + 1e-9)


def test_the_value_circuit_is_value_down_times_value_up(notes):
    W_V, W_O = block(notes, "W_V  "), block(notes, "W_O  ")
    down, up, ov = (block(notes, t) for t in ("value down", "value up", "W_OV = "))
    assert down.m.shape == (4, 3) and up.m.shape == (3, 4) and ov.m.shape == (4, 4)
    np.testing.assert_array_equal(down.m, W_V.m[:, :3])  # W_V's columns of head 0
    np.testing.assert_array_equal(up.m, W_O.m[:3])  # W_O's rows of head 0
    check_product(down, down.d, up.m, up.d, ov)
    flat = " ".join(notes.split())
    # d_model 4, d_head 3: factored (24) is no smaller than full (16); rank ≤ 3 all the same.
    assert "rank 3 (≤ min(d_head, d_model) = 3;" in flat
    assert "16 as a full d_model² matrix, 24 as the two factors 2·d_model·d_head" in flat
    assert "(12 + 12)" in flat


def test_the_issues_own_command_runs(runner):
    # "LLM me" is three GPT-2 tokens (LL, M, ␣me): the same view, with three rows.
    plain = view(runner, *NOTES, "--values", "LLM me", env={"COLUMNS": "80", "NO_COLOR": "1"})
    assert "Q Q = X·W_Q + b_Q [len, heads·d_head] = [3, 24]" in " ".join(plain.split())
    assert max(cell_len(line) for line in plain.splitlines()) <= 80
    # At 80 columns a 24-column matrix wraps into blocks of whole heads, each labelled.
    assert "columns h0.0 … h2.2 (0–8 of 24)" in plain
    assert "columns h6.0 … h7.2 (18–23 of 24)" in plain
    assert "cut at" not in plain


# ── item 4: the rank, against numpy.linalg.matrix_rank ───────────────────────────────────────

@pytest.mark.parametrize(("d_model", "heads", "d_head"), [(4, 8, 3), (16, 4, 4), (8, 2, 16),
                                                          (64, 4, 16)])
def test_rank_and_counts_match_numpy(d_model, heads, d_head):
    config = Config(d_model=d_model, heads=heads, d_head=d_head, layers=1)
    p = random_weights(config).params
    W_V, W_O = p["blocks.0.attn.W_V"], p["blocks.0.attn.W_O"]
    assert W_V.shape == (d_model, heads * d_head) and W_O.shape == (heads * d_head, d_model)
    # A head made rank-deficient on purpose: its three value-down columns are one column,
    # times factors that float32 rounds (0.3, -0.7): deficient to within rounding only, which
    # is what the float32 tolerance is for.
    W_V = W_V.copy()
    W_V[:, 1:3] = W_V[:, :1] * np.float32([0.3, -0.7])
    for h in range(heads):
        vc = value_circuit(W_V, W_O, heads, h)
        ov = W_V[:, h * d_head:(h + 1) * d_head] @ W_O[h * d_head:(h + 1) * d_head]
        assert vc.ov.shape == (d_model, d_model)
        # matrix_rank's default tolerance for a float32 matrix: σ_max · max(M, N) · ε_float32.
        assert vc.rank == np.linalg.matrix_rank(ov), h
        assert vc.rank <= min(d_head, d_model)
        assert vc.full_params == d_model**2 and vc.factored_params == 2 * d_model * d_head
        share = p["blocks.0.attn.W_Q"][:, h * d_head:(h + 1) * d_head].size + \
            p["blocks.0.attn.W_K"][:, h * d_head:(h + 1) * d_head].size
        assert vc.factored_params == share
    if 3 <= d_head <= d_model:  # (wider heads: the other columns still span d_model)
        assert value_circuit(W_V, W_O, heads, 0).rank == min(d_head, d_model) - 2


def test_circuits_section_lists_every_shown_head(runner):
    plain = view(runner, "The cat sat", "--d-model", "64", "--heads", "4", "--circuits",
                 "--head", "0,2", env={"COLUMNS": "100", "NO_COLOR": "1"})
    params = random_weights(Config(d_model=64, heads=4)).params
    rows = {line.split()[0]: line.split() for line in plain.splitlines()
            if re.match(r"L\dH\d ", line)}
    assert set(rows) == {"L0H0", "L0H2"}
    for h in (0, 2):
        ov = (params["blocks.0.attn.W_V"][:, 16 * h:16 * h + 16]
              @ params["blocks.0.attn.W_O"][16 * h:16 * h + 16])
        assert int(rows[f"L0H{h}"][1]) == np.linalg.matrix_rank(ov) == 16
    flat = " ".join(plain.split())
    assert "W_V[:, h] [64, 16] · value up W_O[h] [16, 64] = W_OV [64, 64]" in flat
    assert "4,096 as a full d_model² matrix, 2,048 as its two factors" in flat
    assert "(1,024 + 1,024)" in flat


# ── item 3: ΔE sums to out ────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_head_changes_sum_to_out(dtype):
    from attn_tracer.render.numbers import head_change_rows

    config = Config(d_model=16, heads=4, d_head=8, layers=2)
    weights = random_weights(config)
    trace, _ = run(["The cat sat on the mat", "Hi"], config,
                   select_engine("numpy", "cpu", dtype, 8), weights, Selection((1,), (1,), "all"))
    for b in (0, 1):
        names, rows, pos, resid = head_change_rows(trace, weights.params, 1, "attn", b)
        assert pos == (5 if b == 0 else 0)  # the last real token: right padding
        assert names == ["L1H0", "L1H1", "L1H2", "L1H3", "b_O", "Σ", "out", "X", "resid_post"]
        parts, b_O, total, out, x, after = rows[:4], rows[4], rows[5], rows[6], rows[7], rows[8]
        np.testing.assert_array_equal(out, trace.tensors["blocks.1.attn.out"][b, pos])
        if dtype == "float64":  # the same sum in another order: far inside 1e-6
            tol = 1e-6
        else:  # float32: each of the 33 terms (heads·d_head products and b_O) rounds by ≤ ε|term|
            tol = 33 * np.finfo(np.float32).eps * (np.abs(parts).sum(0) + np.abs(b_O)) * 4
        assert np.all(np.abs(parts.sum(0) + b_O - out) <= tol + 1e-30)
        assert np.all(np.abs(total - out) <= tol + 1e-30)
        np.testing.assert_allclose(after, x + out, rtol=0, atol=4 * np.abs(after).max() *
                                   np.finfo(dtype).eps)
        assert resid == "blocks.1.resid_post"


# ── item 5: the mask as a matrix ─────────────────────────────────────────────────────────────

def test_mask_matrix_tells_causal_and_padding_apart(runner):
    # "A dog" (2 tokens) padded to 4 beside a 4-token text: row 1 has two pads.
    plain = view(runner, "The cat sat on", "A dog", "--d-model", "8", "--heads", "2",
                 "--stages", "--batch-index", "1", env={"COLUMNS": "200", "NO_COLOR": "1"})
    causal, padding, mask = (block(plain, t) for t in ("causal mask", "padding mask",
                                                        "mask = "))
    valid = np.array([True, True, False, False])
    want_causal = np.where(np.tri(4, dtype=bool), 0.0, -np.inf)
    want_padding = np.where(valid[:, None] & valid[None, :], 0.0, -np.inf)
    np.testing.assert_array_equal(causal.m, want_causal)
    np.testing.assert_array_equal(padding.m, want_padding)
    np.testing.assert_array_equal(mask.m, want_causal + want_padding)
    scaled, masked = block(plain, "scaled  "), block(plain, "masked  ")
    np.testing.assert_array_equal(np.isinf(masked.m), np.isinf(mask.m))
    keep = np.isfinite(mask.m)
    assert np.all(np.abs(masked.m[keep] - scaled.m[keep]) <= masked.d + scaled.d + 1e-9)
    flat = " ".join(plain.split())
    assert "the 13 masked entries (e^−∞ = 0) are all exactly 0" in flat  # 16 − 3 allowed
    assert "each query's row still sums to 1" in flat and "a pad query's row is all 0" in flat


def test_softmax_of_the_mask_is_exactly_zero_and_rows_sum_to_one():
    config = Config(d_model=8, heads=2, layers=1)
    trace, _ = run(["The cat sat on", "A dog"], config, select_engine("numpy", "cpu",
                                                                       "float32", 4),
                   random_weights(config), Selection((0,), (0, 1), "stages"))
    pattern = trace.tensors["blocks.0.attn.pattern"][1].astype(np.float64)  # [heads, 4, 4]
    allowed = np.tri(4, dtype=bool) & np.outer([1, 1, 0, 0], [1, 1, 0, 0]).astype(bool)
    assert np.all(pattern[:, ~allowed] == 0)
    # float32 softmax: 4 terms each rounded by ≤ ε, the division once more.
    np.testing.assert_allclose(pattern[:, :2].sum(-1), 1, rtol=0,
                               atol=6 * np.finfo(np.float32).eps)
    assert np.all(pattern[:, 2:].sum(-1) == 0)  # pad queries see no key


# ── item 6: --pad-to ─────────────────────────────────────────────────────────────────────────

FOUR = ["The cat sat on the mat", "A dog", "Birds fly south in winter", "Attention is all you need"]


def test_pad_to_gives_the_notes_shapes(runner):
    result = runner.invoke(app, ["trace", *FOUR, "--pad-to", "16", "--json", "--layer", "0",
                                 "--head", "0"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    shapes = {s["name"]: s["shape"] for s in doc["steps"]}
    assert shapes["resid_pre"] == [4, 16, 768]
    assert shapes["blocks.0.attn.q.split"] == [4, 16, 12, 64]
    assert shapes["blocks.0.attn.q.heads"] == [4, 12, 16, 64]
    assert shapes["blocks.0.attn.pattern"] == [4, 12, 16, 16]
    assert [i["length"] + i["padding"] for i in doc["inputs"]] == [16] * 4
    assert [i["length"] for i in doc["inputs"]] == [6, 2, 6, 6]


def test_pad_to_refuses_a_longer_text(runner, one_line_error):
    message = one_line_error(runner.invoke(app, ["trace", *FOUR, "--pad-to", "4"]), 2,
                             "text 0 has 6 tokens, more than --pad-to 4", "--max-length 4")
    assert "raise --pad-to" in message
    result = runner.invoke(app, ["trace", *FOUR, "--pad-to", "4", "--max-length", "4",
                                 "--json", "--layer", "0", "--head", "0", "--d-model", "8",
                                 "--heads", "2"])
    assert result.exit_code == 0, result.stderr


# ── item 7: the cost of the context window ───────────────────────────────────────────────────

def cost_lines(plain: str) -> dict[str, list[str]]:
    """The rows of the --cost table: step name → the cells after its shape."""
    lines = plain.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("step ") and "bytes" in x)
    out = {}
    for line in lines[start + 2:]:
        if line.startswith("total:"):
            break
        parts = line.split()
        if len(parts) > 2:
            shape_end = max(i for i, t in enumerate(parts) if t.endswith("]"))
            out[parts[0]] = parts[shape_end + 1:]
    return out


def figures(rows: dict[str, list[str]], name: str) -> tuple[int, int]:
    """(bytes, multiply-adds) of a --cost row, as printed."""
    cells = rows[name]
    macs = 0 if cells[2] == "—" else int(cells[2].replace(",", ""))
    return int(cells[0].replace(",", "")), macs


@pytest.mark.parametrize("length", [3, 6])
def test_cost_figures_follow_the_formulas(runner, length):
    B, d, H, dh, L = 1, 16, 2, 8, length
    w = H * dh
    plain = view(runner, " ".join(["w"] * L), "--d-model", str(d), "--heads", str(H),
                 "--layers", "1", "--cost", env={"COLUMNS": "120", "NO_COLOR": "1"})
    rows = cost_lines(plain)
    f = 4  # float32
    assert figures(rows, "tokens") == (B * L * 8, 0)
    assert figures(rows, "attn.q") == (B * L * w * f, B * L * d * w)
    assert figures(rows, "attn.scores") == (B * H * L * L * f, B * H * L * L * dh)
    assert figures(rows, "attn.pattern") == (B * H * L * L * f, 0)
    assert figures(rows, "attn.z") == (B * H * L * dh * f, B * H * L * L * dh)
    assert figures(rows, "attn.out") == (B * L * d * f, B * L * w * d)
    assert rows["attn.scores"][1] == rows["attn.scores"][3] == "len²"  # bytes and products
    assert rows["attn.z"][1] == "len" and rows["attn.z"][3] == "len²"  # pattern·V's products
    assert rows["attn.q"][1] == rows["attn.q"][3] == "len"
    # The totals line, against the same formulas summed by hand. [B, L, ·] tensors: embed,
    # pos_embed, resid_pre, out, resid_post (d wide); q, k, v with their split and heads views,
    # z, its transpose and merge (w wide); then the four [B, H, L, L] score stages.
    streams = 5 * B * L * d + 12 * B * L * w
    total = B * L * 8 + f * (streams + 4 * B * H * L * L)
    macs = 3 * B * L * d * w + 2 * B * H * L * L * dh + B * L * w * d
    total2 = 2 * B * L * 8 + f * (2 * streams + 16 * B * H * L * L)
    macs2 = 6 * B * L * d * w + 8 * B * H * L * L * dh + 2 * B * L * w * d
    summary = " ".join(plain[plain.index("total:"):].split())
    assert f"total: {memory.human(total)} in the steps' tensors" in summary
    assert f"bytes ×{total2 / total:.2f}, multiply-adds ×{macs2 / macs:.2f}" in summary
    assert f"{macs:.0f} multiply-adds" in summary or f"{macs / 1000:.1f} thousand" in summary
    peak = memory.estimate(Config(d_model=d, heads=H, layers=1), "float32", B, L, L, 1, H,
                           "patterns", False)
    assert f"peak memory estimate {memory.human(peak)}" in summary
    assert f"Doubling the text ({L} → {2 * L} tokens)" in summary


def test_cost_scores_grow_fourfold_when_the_text_doubles(runner):
    small, big = (cost_lines(view(runner, " ".join(["w"] * n), "--d-model", "16", "--heads",
                                  "2", "--layers", "1", "--cost",
                                  env={"COLUMNS": "120", "NO_COLOR": "1"})) for n in (5, 10))

    for name in ("attn.scores", "attn.scaled", "attn.masked", "attn.pattern"):
        assert figures(big, name)[0] == 4 * figures(small, name)[0]
    assert figures(big, "attn.scores")[1] == 4 * figures(small, "attn.scores")[1]
    assert figures(big, "attn.q") == tuple(2 * n for n in figures(small, "attn.q"))
    assert figures(big, "attn.z")[1] == 4 * figures(small, "attn.z")[1]  # pattern·V's products


def test_estimate_uses_the_shapes_the_trace_records():
    config = Config(d_model=16, heads=2, d_head=8, layers=1)
    trace, _ = run(["The cat sat on"], config, select_engine("numpy", "cpu", "float32", 4),
                   random_weights(config), Selection((0,), (0,)))
    planned = memory.attention_shapes(config, 1, 4, 4)
    for name, shape in planned.items():
        assert trace.step(f"blocks.0.attn.{name}").shape == shape


# ── --d-head: the attention width is heads·d_head ────────────────────────────────────────────

def test_d_head_steps_and_json(runner):
    import jsonschema

    result = runner.invoke(app, ["trace", "The cat sat", *NOTES, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    schema = json.loads(runner.invoke(app, ["schema"]).stdout)
    jsonschema.validate(doc, schema)
    assert (doc["config"]["d_model"], doc["config"]["heads"], doc["config"]["d_head"]) == (4, 8, 3)
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["blocks.0.attn.q"]["dims"] == ["batch", "len", "heads·d_head"]
    assert steps["blocks.0.attn.q"]["shape"] == [1, 3, 24]
    assert steps["blocks.0.attn.z.merge"]["shape"] == [1, 3, 24]
    assert steps["blocks.0.attn.out"]["dims"] == ["batch", "len", "d_model"]


def test_d_head_attention_matches_torch_sdpa():
    torch = pytest.importorskip("torch")
    config = Config(d_model=8, heads=3, d_head=5, layers=1, bias=True)
    weights = random_weights(config)
    trace, _ = run(["The cat sat on the mat"], config, select_engine("numpy", "cpu", "float64",
                                                                     6),
                   weights, Selection((0,), (0, 1, 2), "all"))
    p = {k: torch.from_numpy(v.astype(np.float64)) for k, v in weights.params.items()}
    x = torch.from_numpy(trace.tensors["resid_pre"].astype(np.float64))

    def heads(n):
        y = x @ p[f"blocks.0.attn.W_{n}"] + p[f"blocks.0.attn.b_{n}"]
        return y.reshape(1, 6, 3, 5).transpose(1, 2)

    z = torch.nn.functional.scaled_dot_product_attention(heads("Q"), heads("K"), heads("V"),
                                                         is_causal=True)
    out = z.transpose(1, 2).reshape(1, 6, 15) @ p["blocks.0.attn.W_O"] + p["blocks.0.attn.b_O"]
    np.testing.assert_allclose(trace.tensors["blocks.0.attn.z"], z.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(trace.tensors["blocks.0.attn.out"], out.numpy(), rtol=0,
                               atol=1e-12)


# ── item 9: the cross block in --values, and --batch-index ───────────────────────────────────

def test_values_show_the_cross_block_and_honour_batch_index(runner):
    plain = view(runner, "The cat sat", "A dog", "--cross", "Le chat noir", "--d-model", "4",
                 "--heads", "2", "--layers", "1", "--values", "--batch-index", "1")
    assert "values of layer 0 self-attention (text 1)" in plain
    assert "values of layer 0 cross-attention (text 1)" in plain
    assert "(text 0" not in plain.split("attention patterns")[0]
    cross = plain[plain.index("values of layer 0 cross-attention"):]
    x, x_kv = block(cross, "X  "), block(cross, "X_kv  ")
    assert x.rows == ["A", "␣dog", "pad"] and x_kv.rows == ["Le", "␣chat", "␣no", "ir"]
    W_Q, W_K = block(cross, "W_Q  "), block(cross, "W_K  ")
    check_product(x, x.d, W_Q.m, W_Q.d, block(cross, "Q  "), W_Q.footer, W_Q.footer_d)
    k = block(cross, "K  ")
    assert k.rows == x_kv.rows  # keys from the cross text
    check_product(x_kv, x_kv.d, W_K.m, W_K.d, k, W_K.footer, W_K.footer_d)
    # No causal part in cross-attention: the mask is the padding alone (the pad query's row).
    padding = block(cross, "padding mask")
    np.testing.assert_array_equal(padding.m, [[0] * 4, [0] * 4, [-np.inf] * 4])
    assert "causal mask" not in cross.split("attention patterns")[0]
    # X of text 1: its real rows are text 1's resid_mid, not text 0's.
    config = Config(d_model=4, heads=2, layers=1)
    trace, _ = run(["The cat sat", "A dog"], config, select_engine("numpy", "cpu", "float32", 3),
                   random_weights(config, cross=True), Selection((0,), (0, 1), "all"),
                   cross_texts=["Le chat noir"])
    np.testing.assert_allclose(x.m, trace.tensors["blocks.0.resid_mid"][1], atol=x.d + 1e-7)


def test_stages_show_the_cross_block(runner):
    plain = view(runner, "The cat sat", "--cross", "Le chat", "--d-model", "8", "--heads", "2",
                 "--stages", "--head", "1")
    assert "stages of cross_attn layer 0 head 1 (keys from the cross text, no causal mask)" in \
        plain
    cross = plain[plain.index("stages of cross_attn"):]
    assert "mask: none (cross-attention has no causal mask, no padding)" in cross
    assert block(cross, "pattern  ").cols == ["Le", "␣chat"]
