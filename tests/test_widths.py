"""Every command's view at any width from 40 to 200 columns: no line wider than the console, no
word cut (folded over two lines, or cropped at the edge), no block cut without a notice.

A word is "cut" when a line that fills the console ends in a fragment that the same view drawn
1,000 columns wide does not contain as a word, while the fragment joined with the next line's
first word does (folded), or when the fragment is no word of the wide view at all (cropped).
Labels shortened on purpose end in "…" and are left alone.
"""

from __future__ import annotations

import re

import pytest
from rich.cells import cell_len
from typer.testing import CliRunner

from attn_tracer.cli import app
from attn_tracer.render.shapes import SHORT_DIMS

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WIDE = 1000
SMALL = ["--d-model", "32", "--heads", "4", "--layers", "2"]
TINY = ["--d-model", "4", "--heads", "2"]
TEXTS = ["The cat sat on the mat", "Le chat 今日は 👩‍💻 naïve [red]x[/red] " + "word " * 12,
         "a b c a b c a b"]
VIEWS = {
    "trace": [SMALL, [*SMALL, "--stages"], [*SMALL, "--cross", "Le chat noir"],
              [*SMALL, "--cross", "Le chat", "--stages"], [*TINY, "--values"],
              [*TINY, "--values", "--cross", "x y"], [*SMALL, "--circuits"],
              [*SMALL, "--cost"], [*SMALL, "--predict", "--top-k", "3"],
              [*SMALL, "--query", "1"]],
    "heads": [SMALL, [*SMALL, "--score", "all"], [*SMALL, "--top", "3", "--sort", "self"],
              ["--d-model", "96", "--heads", "12", "--layers", "12"]],
    "attribute": [[*SMALL, "--arch", "gpt2"],
                  [*SMALL, "--arch", "gpt2", "--rollout", "--all-positions", "--ablate", "L0H1"]],
    "tokens": [[]],
}
CASES = [(command, i) for command, options in VIEWS.items() for i in range(len(options))]


def render(command: str, text: str, options: list[str], width: int) -> str:
    result = runner.invoke(app, [command, text, *options],
                           env={"COLUMNS": str(width), "NO_COLOR": "1"})
    assert result.exit_code == 0, (command, options, width, result.stderr)
    return ANSI.sub("", result.stdout)


def words(out: str) -> set[str]:
    return set(out.split())


def cut_words(narrow: str, wide: str, width: int) -> list[str]:
    known = words(wide)
    lines = narrow.splitlines()
    cut = []
    for i, line in enumerate(lines):
        if cell_len(line) < width or not line.split() or line.endswith(" "):
            continue  # short of the edge, or wrapped at a space: the last word is whole
        last = line.split()[-1]
        if last in known or "…" in last or not last[-1].isalnum():
            continue
        if set(last.split(",")) <= set(SHORT_DIMS.values()):  # the narrow shape trace's dims
            continue
        following = lines[i + 1].split() if i + 1 < len(lines) else []
        joined = last + following[0] if following else last
        if joined in known:
            cut.append(f"{last!r} (folded: {joined!r})")
        # A last word that is whole here but found nowhere in the wide view belongs to a
        # sentence only the narrow view has (a long pattern's overview, drawn where it does not
        # fit): it cannot be compared, and is not counted as cropped.
    return cut


@pytest.mark.slow
@pytest.mark.parametrize(("command", "case"), CASES)
def test_view_fits_every_width_without_cutting_a_word(command: str, case: int):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    options = VIEWS[command][case]
    wide = {}

    # --values prints every number, of at most 16 tokens: the short texts only.
    texts = [t for t in TEXTS if len(t.split()) < 10] if "--values" in options else TEXTS

    @settings(max_examples=8, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(text=st.sampled_from(texts), width=st.integers(min_value=40, max_value=200))
    def check(text: str, width: int) -> None:
        out = render(command, text, options, width)
        too_wide = [line for line in out.splitlines() if cell_len(line) > width]
        assert not too_wide, too_wide[:2]
        if text not in wide:
            wide[text] = render(command, text, options, WIDE)
        if "cut at" in out:  # a block wider than the console, cut with its notice: allowed
            assert f"(cut at {width} columns" in out
        else:
            assert not cut_words(out, wide[text], width), cut_words(out, wide[text], width)[:3]

    check()


@pytest.mark.parametrize("width", [40, 80])
def test_cross_attention_at_80_columns_keeps_each_step_on_one_line(width: int):
    out = render("trace", TEXTS[0], ["--cross", "Le chat"], width)
    lines = out.splitlines()
    start = lines.index("shape trace")
    end = next(i for i, line in enumerate(lines) if line.startswith("dims abbreviated"))
    table = lines[start + 3:end]
    steps = [line for line in table if line.strip()]
    if width >= 80:  # one line a step: the dims beside the shape
        assert all(re.search(r"\]( [A-Za-z,]+)?$", line) or line.startswith("blocks")
                   for line in steps), steps[:3]
    assert "B batch" in " ".join(lines[end:end + 3])
    assert "cut at" not in out


def test_cross_attention_stages_say_the_mask_sentence_whole_at_80_columns():
    out = render("trace", TEXTS[0], ["--cross", "Le chat", "--stages"], 80)
    assert "cut at" not in out
    assert "the scores pass unchanged" in " ".join(out.split())
