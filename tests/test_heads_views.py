"""attn heads: --score NAME (only those grids), --no-thumbnails, and the default view of a big
model (GPT-2 small's 12 × 12) that fits a screen or two at 80 columns."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from attn_tracer.analysis.head_definitions import SCORES
from attn_tracer.cli import app

runner = CliRunner()
TEXT = "The cat sat on the mat. The cat sat on the mat."
SMALL = ["--d-model", "32", "--heads", "4", "--layers", "2"]
# GPT-2 small's grid of heads, with narrow heads so that the run is quick.
BIG = ["--d-model", "96", "--heads", "12", "--layers", "12"]
SCREEN = 50  # lines of a terminal screen


def heads(*args: str, width: int = 80) -> list[str]:
    result = runner.invoke(app, ["heads", TEXT, *args], env={"COLUMNS": str(width),
                                                             "NO_COLOR": "1"})
    assert result.exit_code == 0, result.stderr
    return result.stdout.splitlines()


def grid_titles(lines: list[str]) -> list[str]:
    """The score grids' title lines (the names on the line after "scores (rows: …)")."""
    start = lines.index("scores (rows: layers, columns: heads)")
    titles = []
    for line in lines[start + 1:]:
        words = line.split()
        if words and all(w in SCORES for w in words):
            titles += words
    return titles


def test_score_shows_only_that_grid():
    lines = heads(*SMALL, "--score", "induction")
    assert grid_titles(lines) == ["induction"]
    both = heads(*SMALL, "--score", "self", "--score", "previous_token")
    assert grid_titles(both) == ["previous_token", "self"]  # in the definitions' order
    assert grid_titles(heads(*SMALL, "--score", "all")) == list(SCORES)


def test_score_on_a_12_by_12_model_prints_one_grid_and_no_table():
    lines = heads(*BIG, "--score", "induction", "--no-thumbnails")
    assert grid_titles(lines) == ["induction"]
    assert not any(line.startswith("every head's scores") for line in lines)
    assert len(lines) < SCREEN


def test_no_thumbnails_leaves_the_overview_out():
    lines = heads(*SMALL, "--no-thumbnails")
    assert not any(line.startswith("every head's pattern") for line in lines)
    assert any(line.startswith("every head's pattern") for line in heads(*SMALL))


def test_default_view_of_a_12_by_12_model_fits_two_screens_at_80_columns():
    lines = heads(*BIG)
    assert len(lines) <= 2 * SCREEN
    assert any(line.startswith("every head's pattern") for line in lines)
    strongest = lines.index(next(x for x in lines if x.startswith("the strongest heads")))
    assert [line.split()[0] for line in lines[strongest + 1:strongest + 1 + len(SCORES)]] == [
        "previous", "duplicate", "induction", "first", "self", "entropy", "entropy"]
    assert "--score NAME" in " ".join(lines)
    # --top asks for the table: then it is there.
    assert any(line.startswith("every head's scores") for line in heads(*BIG, "--top", "5"))


def test_unknown_score_is_a_usage_error():
    result = runner.invoke(app, ["heads", TEXT, *SMALL, "--score", "inductoin"])
    assert result.exit_code == 2
    assert "--score must be one of" in result.stderr


@pytest.mark.parametrize("width", [40, 80, 200])
def test_big_views_fit_the_width(width: int):
    for args in ([], ["--score", "all"], ["--top", "3"]):
        for line in heads(*BIG, *args, width=width):
            assert len(line) <= width, (args, line)
