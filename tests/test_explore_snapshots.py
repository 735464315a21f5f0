"""What `attn explore` looks like, as SVG snapshots (pytest-textual-snapshot): the overview, a
head with a focused query, the stages, a Chinese text, a 1,000-token text scrolled to its
middle, in an 80 × 24 and a 160 × 50 terminal.

The snapshots are in tests/__snapshots__/test_explore_snapshots/; after a change that is meant
to change the screen, look at the report pytest writes (snapshot_report.html), then accept the
new screens with `pytest tests/test_explore_snapshots.py --snapshot-update`. They are
deterministic: seeded random weights, fixed sizes, and nothing on the screen blinks or moves.
They are Textual's rendering, so the test extra pins the Textual that made them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pytest_textual_snapshot")  # the test extra's; CI's torch-free run has none

from attn_tracer.explore.app import ExploreApp
from attn_tracer.explore.head_view import HeatmapView
from explore_setup import SENTENCE, SMALL, explore_data

ROOT = Path(__file__).resolve().parent.parent
CHINESE = "今天天气很好，我们去公园散步吧"


def app(texts: list[str], size: tuple[int, int], **fields) -> ExploreApp:
    # The thumbnails are sized for the terminal, as the command sizes them for its own.
    return ExploreApp(explore_data(texts, width=size[0], **fields))


@pytest.mark.slow
class TestOverview:
    def test_80x24(self, snap_compare):
        assert snap_compare(app([SENTENCE], (80, 24)), terminal_size=(80, 24))

    def test_160x50_with_the_side_panel(self, snap_compare):
        size = (160, 50)
        assert snap_compare(app([SENTENCE], size, predict=True, top_k=5), press=["right", "down"],
                            terminal_size=size)

    def test_colored_by_a_score(self, snap_compare):
        texts = ["The cat sat on the mat and the cat sat on the mat"]
        assert snap_compare(app(texts, (80, 24)), press=["c", "c", "c"], terminal_size=(80, 24))


@pytest.mark.slow
class TestHead:
    def test_a_focused_query_80x24(self, snap_compare):
        assert snap_compare(app([SENTENCE], (80, 24)),
                            press=["enter", "down", "down", "down", "right"],
                            terminal_size=(80, 24))

    def test_160x50_with_the_shape_trace(self, snap_compare):
        size = (160, 50)
        assert snap_compare(app([SENTENCE, "A dog sat"], size, predict=True, top_k=5),
                            press=["right", "down", "enter", "down", "down", "down", "down",
                                   "right", "right"], terminal_size=size)

    @pytest.mark.parametrize("stage", ["scores", "scaled", "masked"])
    def test_the_stages(self, snap_compare, stage):
        presses = ["t"] * (1 + ["scores", "scaled", "masked"].index(stage))
        assert snap_compare(app([SENTENCE], (100, 30)),
                            press=["enter", "down", "down", "down", *presses],
                            terminal_size=(100, 30))

    def test_colors_only(self, snap_compare):
        assert snap_compare(app([SENTENCE], (80, 24)), press=["enter", "n", "down", "down"],
                            terminal_size=(80, 24))

    def test_a_chinese_text(self, snap_compare):
        assert snap_compare(app([CHINESE], (100, 30), **SMALL),
                            press=["enter", "down", "down", "down", "right"],
                            terminal_size=(100, 30))

    def test_a_1000_token_text_scrolled_to_its_middle(self, snap_compare):
        text = (ROOT / "sample_texts" / "long.txt").read_text("utf-8")
        size = (120, 36)
        explorer = app([text], size, **SMALL)
        middle = explorer.data.trace.inputs[0].length // 2

        async def to_the_middle(pilot):
            await pilot.press("enter")
            await pilot.pause()
            pilot.app.screen.query_one(HeatmapView).go(middle, middle - 8)

        assert snap_compare(explorer, run_before=to_the_middle, terminal_size=size)


def test_the_keys(snap_compare):
    assert snap_compare(app([SENTENCE], (80, 24), **SMALL), press=["question_mark"],
                        terminal_size=(80, 24))
