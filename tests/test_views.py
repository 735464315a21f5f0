"""The terminal view never crops silently, never misleads and never misaligns: zooming with
--query/--keys, the text shaded by one query, the legend, labels that repeat, every script."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from rich.cells import cell_len

from attn_tracer.cli import app
from attn_tracer.model import tokens
from attn_tracer.render import heatmaps as render_heatmaps

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_texts"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SMALL = ["--d-model", "16", "--heads", "2", "--layers", "1"]
COUNTING = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
            "fifteen sixteen seventeen eighteen nineteen twenty twentyone twentytwo twentythree "
            "twentyfour twentyfive")


def view(runner, args, columns=120, color=False):
    env = {"COLUMNS": str(columns)}
    if color:
        env.update(FORCE_COLOR="1", COLORTERM="truecolor", NO_COLOR="")
    else:
        env["NO_COLOR"] = "1"
    result = runner.invoke(app, ["trace", *args], env=env, color=color)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def pattern_json(runner, args):
    import json

    result = runner.invoke(app, ["trace", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    return np.array(json.loads(result.stdout)["attention"][0]["weights"])


def block_of(out: str, title: str) -> list[str]:
    return out.split(title, 1)[1].split("\n\n")[0].splitlines()[1:]


def test_every_query_row_is_drawn_when_the_keys_fit(runner):
    # It used to draw the last 24 rows whatever the width ("first 6 query rows not shown").
    out = view(runner, [COUNTING, *SMALL, "--head", "0"], columns=200)
    rows = block_of(out, "attn layer 0 head 0")[2:]  # after the key positions and labels
    rows = [x for x in rows if re.match(r"^\s*\d+ ", x)]
    n = len(tokens.tokenize(COUNTING))
    assert [int(x.split()[0]) for x in rows] == list(range(n))
    assert "not shown" not in out


def test_repeated_labels_carry_their_positions(runner):
    out = view(runner, [COUNTING, *SMALL, "--head", "0"], columns=200)
    body = block_of(out, "attn layer 0 head 0")
    n = len(tokens.tokenize(COUNTING))
    assert body[0].split() == [str(k) for k in range(n)]  # a line of key positions
    twenty = [x for x in body if "␣twenty" in x.split()[:2]]
    assert len(twenty) >= 5 and len({x.split()[0] for x in twenty}) == len(twenty)


def test_column_labels_use_the_width_there_is(runner):
    out = view(runner, ["one two three four five", *SMALL, "--head", "0"], columns=160)
    columns = block_of(out, "attn layer 0 head 0")[0].split()
    assert columns == ["one", "two", "three", "four", "five"]  # not th… fo… fi…


@pytest.mark.parametrize("columns", [40, 80, 160])
def test_query_and_keys_zoom_into_a_region(runner, columns):
    weights = pattern_json(runner, [COUNTING, *SMALL, "--layer", "0", "--head", "0"])
    out = view(runner, [COUNTING, *SMALL, "--head", "0", "--query", "10:14", "--keys", "3:8"],
               columns=columns)
    assert max(cell_len(x) for x in out.splitlines()) <= columns
    body = block_of(out, "attn layer 0 head 0")
    rows = [x for x in body[2:] if re.match(r"^\s*1[0-4] ", x)]
    assert [int(x.split()[0]) for x in rows] == [10, 11, 12, 13, 14]
    for row in rows:
        q = int(row.split()[0])
        cells = row.split()[-6:]
        for k, cell in zip(range(3, 9), cells, strict=True):
            w = weights[q, k]
            assert cell == "1.0" if w >= 0.995 else abs(float(cell) - w) <= 0.0051
    assert "(queries 10–14 of 0–29 · keys 3–8 of 0–29)" in " ".join(out.split())


def test_query_shades_the_text_and_numbers_say_the_weights(runner):
    weights = pattern_json(runner, ["The cat sat on the mat", *SMALL, "--layer", "0",
                                         "--head", "1"])
    out = view(runner, ["The cat sat on the mat", *SMALL, "--head", "1", "--query", "4"])
    assert "what query 4 (␣the) attends to" in out
    shaded = out.split("attends to\n", 1)[1].splitlines()[0]
    # Without color the weights are written beside the tokens; masked keys (5) have none.
    pairs = re.findall(r"(\S+) (\.\d\d|1\.0)", shaded)
    assert [p[0] for p in pairs] == ["The", "␣cat", "␣sat", "␣on", "␣the"]
    for k, (_, cell) in enumerate(pairs):
        assert abs(float(cell) - weights[4, k]) <= 0.0051
    assert shaded.rstrip().endswith("␣mat")
    colored = view(runner, ["The cat sat on the mat", *SMALL, "--head", "1", "--query", "4"],
                   color=True)
    assert "48;2;" in colored.split("attends to", 1)[1]  # the shading itself


@pytest.mark.parametrize(("args", "fragment"), [
    (["--query", "9"], "--query 9 is out of range"),
    (["--query", "3:1"], "A ≤ B"),
    (["--keys", "a:b"], "--keys takes a position"),
    (["--width", "10"], "--width must be between"),
])
def test_bad_ranges_are_one_line(runner, one_line_error, args, fragment):
    one_line_error(runner.invoke(app, ["trace", "The cat sat", *SMALL, *args]), 2, fragment)


def test_the_legend_says_only_what_the_view_can_contain(runner):
    plain = view(runner, ["The cat sat", *SMALL, "--mask", "none"])
    assert "causal mask" not in plain and "masked =" not in plain
    assert "▁" not in plain  # no color: a ramp would match nothing in the cells
    padded = view(runner, ["The cat sat", "A", *SMALL])
    assert "· causal mask" in padded and "× padding mask" in padded
    assert "sums to 1 before rounding" in padded
    colored = view(runner, ["The cat sat", *SMALL], color=True)
    assert "▁" in colored


def test_padding_and_causal_masks_are_drawn_apart(runner):
    out = view(runner, ["The cat sat on", "A", *SMALL, "--head", "0", "--batch-index", "1"])
    body = block_of(out, "attn layer 0 head 0 · text 1")
    first = body[1].split()  # query 0 of "A": itself, then pad keys
    assert first[1] != render_heatmaps.PADDED and first[2:] == [render_heatmaps.PADDED] * 3
    pads = [x.split() for x in body[2:]]
    assert all(r[0] == "pad" and r[1:] == [render_heatmaps.PADDED] * 4 for r in pads)
    own = view(runner, ["The cat sat on", "A", *SMALL, "--head", "0", "--batch-index", "0"])
    assert render_heatmaps.PADDED not in "\n".join(block_of(own, "attn layer 0 head 0 · text 0"))


def test_emoji_labels_keep_the_character_and_variation_selectors_are_named(runner):
    out = view(runner, ["I ❤️ 🍕 and 👨‍👩‍👧", *SMALL, "--head", "0"], columns=160)
    assert "1:␣❤₁" in out and "2:❤₂" in out and "3:<U+FE0F>" in out
    assert "◌" not in out
    rows = [x.split() for x in block_of(out, "attn layer 0 head 0") if x.strip()]
    assert rows[0][:3] == ["0", "1", "2"] and rows[1][:4] == ["I", "❤₁", "❤₂", "U+FE0F"]
    assert rows[3][:2] == ["1", "␣❤₁"]  # query 1, after query 0
    assert max(cell_len(x) for x in out.splitlines()) <= 160


def test_width_sets_the_saved_view(runner, tmp_path):
    svg = tmp_path / "v.svg"
    result = runner.invoke(app, ["trace", "The cat", *SMALL, "--svg", str(svg), "--width", "150"])
    assert result.exit_code == 0, result.stderr
    assert max(cell_len(x) for x in result.stdout.splitlines()) <= 150
    # Rich writes the terminal's width into the SVG's clip path: 150 columns, not 80.
    assert svg.read_text(encoding="utf-8").count("<svg") == 1


def test_the_attn_architecture_reports_no_mlp_or_layernorm(runner):
    import json

    doc = json.loads(runner.invoke(app, ["trace", "hi", *SMALL, "--json"]).stdout)
    assert "d_mlp" not in doc["config"] and "ln_eps" not in doc["config"]
    gpt2 = json.loads(runner.invoke(app, ["trace", "hi", *SMALL, "--arch", "gpt2",
                                          "--json"]).stdout)
    assert gpt2["config"]["d_mlp"] == 64 and gpt2["config"]["ln_eps"] == 1e-5


def test_saved_svg_needs_no_network(runner, tmp_path):
    svg = tmp_path / "v.svg"
    assert runner.invoke(app, ["trace", "今天", *SMALL, "--svg", str(svg)]).exit_code == 0
    text = svg.read_text(encoding="utf-8")
    # url(#…) are the SVG's own clip paths; nothing may point off the machine.
    assert not re.search(r"url\(\s*[\"']?https?:", text) and "cdnjs" not in text


# ── a property: no view is wider than its console, and nothing it promises goes missing ─────

VIEW_PIECES = ["The cat", " sat", "今天天气很好", "🙂", "👩‍👩‍👧", "❤️", "e\u0301", "\t", "\n",
               " twenty", " twenty", "[red]", "x" * 30]
VIEW_OPTIONS = [[], ["--stages"], ["--predict", "--top-k", "5"], ["--query", "0"],
                ["--query", "1:"], ["--keys", ":1"], ["--mask", "none"]]


def _promised_rows(out: str, n_queries: int) -> bool:
    """Each heatmap draws every query row, or the view says which it listed."""
    if "keys do not fit" in out:
        return "not listed" in out or n_queries <= render_heatmaps.LISTED_ROWS
    return True


@pytest.mark.slow
def test_views_fit_any_width_and_say_what_they_leave_out(runner):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    texts = st.lists(st.sampled_from(VIEW_PIECES), min_size=1, max_size=8).map("".join)

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(text=texts, second=st.one_of(st.none(), texts),
           width=st.integers(min_value=40, max_value=200), options=st.sampled_from(VIEW_OPTIONS),
           color=st.booleans())
    def check(text, second, width, options, color):
        batch = [text] if second is None else [text, second]
        args = [*batch, *SMALL, "--head", "0", *options]
        env = {"COLUMNS": str(width)}
        env.update({"FORCE_COLOR": "1", "NO_COLOR": ""} if color else {"NO_COLOR": "1"})
        result = runner.invoke(app, ["trace", *args], env=env, color=color)
        if result.exit_code == 2:  # --query beyond a short text, or only whitespace: one line
            assert result.stdout == "" and len(result.stderr.splitlines()) == 1
            assert "out of range" in result.stderr or "only whitespace" in result.stderr
            return
        assert result.exit_code == 0, result.stderr
        plain = ANSI.sub("", result.stdout)
        too_wide = [x for x in plain.splitlines() if cell_len(x) > width]
        assert not too_wide, too_wide[:2]
        assert "cut at" not in plain  # a block wider than the console was cropped
        n = max(len(tokens.tokenize(t)) for t in batch)
        assert _promised_rows(plain, n)
        assert "attn layer 0 head 0" in plain

    check()


def test_a_pattern_too_wide_to_print_is_drawn_whole_downsampled(runner):
    from attn_tracer.render import heatmaps as rh

    text = (SAMPLE_DIR / "long.txt").read_text(encoding="utf-8")
    n = len(tokens.tokenize(text.removesuffix("\n")))
    out = view(runner, ["--file", str(SAMPLE_DIR / "long.txt"), *SMALL, "--head", "0"],
               columns=100)
    assert f"the whole pattern, {n} queries × {n} keys in" in " ".join(out.split())
    lines = out.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("the whole pattern")) + 2
    body = [x for x in lines[start:start + 40] if re.match(r"^\s*\d+ [▁▂▃▄▅▆▇█ ]+$", x)]
    # Query positions run down the left from 0; every line fits; the causal triangle shows.
    assert int(body[0].split()[0]) == 0 and len(body) >= 10
    marks = [len(x.split(" ", 1)[1].rstrip()) if " " in x.strip() else 0 for x in body]
    assert marks == sorted(marks) and marks[0] < marks[-1]
    assert max(cell_len(x) for x in lines) <= 100
    assert n > rh.LISTED_ROWS  # the strongest-keys list follows it, for the last rows
    assert "strongest keys of each query" in " ".join(out.split())
