"""`attn explore`: the data it draws is the trace's, its keys and clicks do what the help says,
the heatmap it draws holds the pattern's values, and it starts only on good input, in a
terminal, without costing any other command Textual's import.

The app is driven headless with Textual's `App.run_test()` and `Pilot`; a few tests run the
real command on a pseudo-terminal to see the terminal taken over and given back. The
references: `pipeline.run` with every stage of every head captured (what `attn trace --stages`
prints) and `attn heads`' own computation of the scores.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from rich.text import Text

textual = pytest.importorskip("textual")  # the `explore` extra; CI's torch-free run has none

from attn_tracer.cli import app as cli  # noqa: E402  (after the importorskip guard)
from attn_tracer.commands.run import Request  # noqa: E402
from attn_tracer.explore import command, panels  # noqa: E402
from attn_tracer.explore.app import ExploreApp  # noqa: E402
from attn_tracer.explore.data import STAGES, Section  # noqa: E402
from attn_tracer.explore.head_view import HeadScreen, HeatmapView  # noqa: E402
from attn_tracer.explore.overview import MODES, OverviewGrid, OverviewScreen  # noqa: E402
from attn_tracer.render import formats  # noqa: E402
from explore_setup import SENTENCE, SMALL, drive, explore_data, reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
U = 2.0**-24  # float32's unit roundoff


# ── the data: the trace's stages, attn heads' scores ──────────────────────────────────────────

def score_bound(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Elementwise bound on |Δ(Q·Kᵀ)| between two float32 evaluations of the same products in
    any summation order: γ_n · |Q|·|K|ᵀ with γ_n = n·u / (1 − n·u) (Higham, Thm 3.5)."""
    n = q.shape[-1]
    return n * U / (1 - n * U) * (np.abs(q).astype(np.float64) @ np.abs(k).astype(np.float64).T)


CASES = {
    "sentence": ([SENTENCE], {}),
    "batch, left padding": ([SENTENCE, "A dog"], {"padding": "left"}),
    "cross-attention": ([SENTENCE], {"cross": ["Le chat était assis"]}),
    "no scale, no mask": ([SENTENCE], {"scale": False, "mask": "none"}),
    "gpt2 block": ([SENTENCE], {"arch": "gpt2"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_heads_stages_are_the_traces(case):
    texts, fields = CASES[case]
    data = explore_data(texts, **SMALL, **fields)
    ref = reference(texts, **SMALL, **fields)
    c = ref.config
    for kind in data.kinds:
        for layer in range(c.layers):
            prefix = f"blocks.{layer}.{kind}"
            q_all = data.trace.tensors[f"{prefix}.q.heads"]
            k_all = data.trace.tensors[f"{prefix}.k.heads"]
            for b in range(len(texts)):
                for h in range(c.heads):
                    got = data.stages(layer, h, b, kind)
                    want = [s for s in STAGES if f"{prefix}.{s}" in ref.tensors]
                    assert list(got) == want
                    bound = score_bound(q_all[b, h], k_all[b, h])
                    if c.scale:
                        bound = bound / math.sqrt(c.d_head)
                    for stage, m in got.items():
                        r = ref.tensors[f"{prefix}.{stage}"][b, h]
                        assert np.array_equal(np.isfinite(m), np.isfinite(r))
                        if stage == "pattern":
                            # softmax moves each weight by at most a factor e^(2·max|Δs|).
                            tol = 2 * bound.max() + 8 * U
                            np.testing.assert_allclose(m, r, rtol=0, atol=tol)
                        else:
                            f = np.isfinite(r)
                            assert (np.abs(m[f] - r[f]) <= bound[f] + 4 * U * np.abs(r[f])).all()


def test_only_q_and_k_are_kept():
    # The memory design: no pattern is kept, only each layer's Q and K split into heads.
    data = explore_data([SENTENCE], **SMALL, cross=["Le chat"])
    names = {f"blocks.{layer}.{kind}.{x}.heads" for layer in range(2)
             for kind in ("attn", "cross_attn") for x in "qk"}
    assert set(data.trace.tensors) == names


def test_the_scores_are_attn_heads_scores():
    from attn_tracer.commands.heads import HeadsOptions
    from attn_tracer.commands.heads import compute as heads

    texts = ["The cat sat on the mat and the cat sat", "A dog and a dog"]
    data = explore_data(texts, **SMALL)
    result = heads(Request(texts=texts, **SMALL), HeadsOptions(), lambda m: None)
    for name, grid in result.scores.items():
        np.testing.assert_array_equal(data.scores[name].mean(axis=1), grid)


# ── the command: checks before the app, and Textual nowhere else ──────────────────────────────

@pytest.fixture
def no_app(monkeypatch):
    """A terminal that passes the check, and an app that must never start."""
    monkeypatch.setattr(command, "check_terminal", lambda: None)

    def started(self):
        raise AssertionError("the app started")

    monkeypatch.setattr(ExploreApp, "run", started)


BAD = {
    "heads that do not divide": (["--heads", "5", SENTENCE], "does not divide"),
    "empty text": (["   "], "empty"),
    "cross with gpt2": (["--arch", "gpt2", "--cross", "x", SENTENCE], "--cross"),
    "top-k 0": (["--top-k", "0", SENTENCE], "--top-k"),
    "missing file": (["--file", "/nonexistent/x.txt"], "not found"),
    "too long": (["--n-ctx", "4", SENTENCE], "more than --n-ctx 4"),
    "bad engine": (["--engine", "jax", SENTENCE], "jax"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_before_the_app(runner, one_line_error, no_app, case):
    args, needle = BAD[case]
    one_line_error(runner.invoke(cli, ["explore", *args]), 2, needle)


def test_a_pipe_is_refused(runner, one_line_error):
    one_line_error(runner.invoke(cli, ["explore", SENTENCE]), 2, "not a terminal", "attn trace")


def test_without_textual_one_line_names_the_install(runner, one_line_error, monkeypatch):
    monkeypatch.setattr(command, "find_spec", lambda name: None)
    one_line_error(runner.invoke(cli, ["explore", SENTENCE]), 1,
                   'pip install "attn-tracer[explore]"')


_PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    import attn_tracer.cli
    seen = {"import attn_tracer.cli": "textual" in sys.modules}
    for argv in json.loads(sys.argv[1]):
        sys.argv = ["attn", *argv]
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                attn_tracer.cli.main()
            except SystemExit as e:
                assert e.code in (0, None), (argv, e.code, out.buffer.getvalue()[-300:])
        seen[" ".join(argv)] = "textual" in sys.modules
    sys.__stdout__.write(json.dumps(seen))
""")


@pytest.mark.slow
def test_textual_is_imported_by_explore_alone():
    cases = [["--help"], ["trace", SENTENCE, "--d-model", "16", "--heads", "2"],
             ["trace", "--help"], ["heads", "--help"], ["explore", "--help"],
             ["tokens", "hi"]]
    env = {k: v for k, v in os.environ.items() if k != "ATTN_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen == {k: False for k in seen} and len(seen) == len(cases) + 1


def test_textual_is_an_extra_pinned_for_the_snapshots():
    from importlib.metadata import version

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(d.startswith("textual") for d in extras["explore"])
    # The committed SVG snapshots are Textual's rendering: CI must render with the same one.
    assert f"textual=={version('textual')}" in extras["test"]
    assert any(d.startswith("pytest-textual-snapshot") for d in extras["test"])


# ── the overview ──────────────────────────────────────────────────────────────────────────────

@pytest.mark.slow
def test_the_overview_cursor_moves_colors_and_opens():
    data = explore_data([SENTENCE], **SMALL)

    async def steps(pilot):
        grid = pilot.app.screen.query_one(OverviewGrid)
        assert (grid.at_layer, grid.at_head) == (0, 0)
        await pilot.press("right", "right", "down")
        assert (grid.at_layer, grid.at_head) == (1, 2)
        await pilot.press("down", "right", "right", "right")  # stops at the edges
        assert (grid.at_layer, grid.at_head) == (1, 3)
        await pilot.press("home")
        assert (grid.at_layer, grid.at_head) == (0, 0)
        await pilot.press("end")
        assert (grid.at_layer, grid.at_head) == (1, 3)
        seen = [grid.mode]
        for _ in MODES:
            await pilot.press("c")
            seen.append(grid.mode)
        assert seen == [*MODES, None]
        await pilot.press("c")  # previous_token: its value written in every cell
        await pilot.pause()
        values = data.scores["previous_token"][:, 0, :]
        for layer in range(2):
            y = grid.HEADER + layer * (grid.lines + 1) + (grid.lines - 1) // 2
            row = grid.render_line(y).text[grid.label_width():]
            cells = row.replace("▐", " ").replace("▌", " ").split()  # the cursor's bars
            assert cells == [formats.score(v, "previous_token") for v in values[layer]]
        await pilot.press("enter")
        await pilot.pause()
        screen = pilot.app.screen
        assert isinstance(screen, HeadScreen)
        view = screen.query_one(HeatmapView)
        assert (view.at_layer, view.at_head) == (1, 3)
        await pilot.press("right_square_bracket", "escape")
        await pilot.pause()
        assert isinstance(pilot.app.screen, OverviewScreen)
        assert (grid.at_layer, grid.at_head) == (1, 0)  # where the head screen left off

    drive(ExploreApp(data), (80, 24), steps)


def test_a_click_moves_the_cursor_and_a_second_click_opens():
    data = explore_data([SENTENCE], **SMALL)

    async def steps(pilot):
        grid = pilot.app.screen.query_one(OverviewGrid)
        # The cell of L1H2: past the layer labels, two heads in, below the header and layer 0.
        x = grid.label_width() + 2 * grid.cell + 2
        y = grid.HEADER + grid.lines + 1
        await pilot.click(OverviewGrid, offset=(x, y))
        assert (grid.at_layer, grid.at_head) == (1, 2)
        assert isinstance(pilot.app.screen, OverviewScreen)
        await pilot.click(OverviewGrid, offset=(x, y))
        await pilot.pause()
        view = pilot.app.screen.query_one(HeatmapView)
        assert (view.at_layer, view.at_head) == (1, 2)
        await pilot.click(HeatmapView, offset=(view.label_width() + 2 * view.cell, 4))
        assert (view.at_query, view.at_key) == (2, 2)

    drive(ExploreApp(data), (80, 24), steps)


def plain(static) -> str:
    """What a Static holds, as plain text."""
    console = Console(width=200, file=io.StringIO(), color_system=None)
    console.print(static.content)
    return console.file.getvalue()


# ── a head ────────────────────────────────────────────────────────────────────────────────────

def rendered_rows(view: HeatmapView) -> list[list[str]]:
    """The cells of every body line on the screen, as drawn: the text after each row label."""
    rows = []
    for y in range(view.HEADER, view.HEADER + view.view.height):
        line = view.render_line(y).text
        if line.strip():
            rows.append(line[view.label_width():].split())
    return rows


def expected_pattern_rows(pattern: np.ndarray, marks: np.ndarray) -> list[list[str]]:
    return [[marks[q, k] or formats.unit(float(pattern[q, k])) for k in range(pattern.shape[1])]
            for q in range(pattern.shape[0])]


@pytest.mark.slow
def test_the_heatmap_draws_the_patterns_values_and_follows_the_keys():
    texts = [SENTENCE, "A dog"]
    data = explore_data(texts, **SMALL)
    ref = reference(texts, **SMALL)

    def pattern(layer, head, b, stage="pattern"):
        return ref.tensors[f"blocks.{layer}.attn.{stage}"][b, head]

    async def steps(pilot):
        await pilot.press("enter")
        await pilot.pause()
        view = pilot.app.screen.query_one(HeatmapView)
        marks = data.marks("attn", 0)
        assert rendered_rows(view) == expected_pattern_rows(pattern(0, 0, 0), marks)
        await pilot.press("right_square_bracket", "right_square_bracket",
                          "right_curly_bracket")
        await pilot.pause()
        assert (view.at_layer, view.at_head) == (1, 2)
        assert rendered_rows(view) == expected_pattern_rows(pattern(1, 2, 0), marks)
        await pilot.press("left_square_bracket")
        assert view.at_head == 1
        await pilot.press("left_square_bracket", "left_square_bracket")  # wraps around
        assert view.at_head == 3
        # The stages, in order, each with its own numbers; softmax again after the last.
        seen = []
        for _ in range(4):
            await pilot.press("t")
            await pilot.pause()
            seen.append(view.stage)
            if view.stage != "pattern":
                m = pattern(1, 3, 0, view.stage)
                got = rendered_rows(view)
                for q in range(m.shape[0]):
                    for k in range(m.shape[1]):
                        if math.isfinite(m[q, k]):  # written with view.digits decimals
                            half = 0.5 * 10.0**-view.digits
                            assert abs(float(got[q][k]) - m[q, k]) <= half * (1 + 1e-6)
                        else:
                            assert got[q][k] == "−∞"
        assert seen == ["scores", "scaled", "masked", "pattern"]
        # The focused query and key, and their value.
        await pilot.press("down", "down", "down", "right")
        assert (view.at_query, view.at_key) == (3, 1)
        assert view.value == pytest.approx(float(pattern(1, 3, 0)[3, 1]), abs=1e-6)
        status = plain(pilot.app.screen.query_one("#status"))
        assert "query 3 ␣on → key 1 ␣cat" in status
        assert f"{view.value:.4f}" in status
        # Numbers off: two columns a key, no digits.
        assert view.cell == 4
        await pilot.press("n")
        await pilot.pause()
        assert view.cell == 2
        assert not any(re.search(r"\d", cell) for row in rendered_rows(view) for cell in row)
        await pilot.press("n")
        # The next text: its pad keys and its pad query are the padding mask.
        await pilot.press("b")
        await pilot.pause()
        assert view.at_text == 1 and view.at_query == 3
        rows = rendered_rows(view)
        assert rows[3] == ["×"] * 6  # a pad query
        assert [r[2:] for r in rows[:2]] == [["×"] * 4] * 2  # pad keys
        assert rows[:2] == [r[:6] for r in expected_pattern_rows(pattern(1, 3, 1),
                                                                  data.marks("attn", 1))[:2]]

    drive(ExploreApp(data), (100, 30), steps)


@pytest.mark.slow
def test_the_cross_attention_block_is_one_key_away():
    fields = {**SMALL, "cross": ["Le chat était assis sur le tapis"]}
    data = explore_data([SENTENCE], **fields)
    ref = reference([SENTENCE], **fields)

    async def steps(pilot):
        await pilot.press("enter", "x")
        await pilot.pause()
        view = pilot.app.screen.query_one(HeatmapView)
        assert view.kind == "cross_attn"
        want = ref.tensors["blocks.0.cross_attn.pattern"][0, 0]
        assert rendered_rows(view) == expected_pattern_rows(want, data.marks("cross_attn", 0))
        await pilot.press("x")
        assert view.kind == "attn"

    drive(ExploreApp(data), (120, 30), steps)


@pytest.mark.slow
def test_a_long_text_draws_only_what_is_on_the_screen(monkeypatch):
    text = (ROOT / "sample_texts" / "long.txt").read_text("utf-8")
    data = explore_data([text], **SMALL)
    n = data.trace.inputs[0].length
    assert n > 900
    calls: list[tuple[int, int, int]] = []
    body_line = HeatmapView.body_line

    def counted(self, row, x0, x1):
        calls.append((row, x0, x1))
        return body_line(self, row, x0, x1)

    monkeypatch.setattr(HeatmapView, "body_line", counted)

    async def steps(pilot):
        await pilot.press("enter")
        await pilot.pause()
        view = pilot.app.screen.query_one(HeatmapView)
        view.go(n // 2, n // 2 - 10)  # the middle of the text
        await pilot.pause()
        calls.clear()
        view.refresh()
        await pilot.pause()
        _, sy = view.scroll_offset
        visible = view.view
        assert 0 < len(calls) <= visible.height
        assert all(sy <= row < sy + visible.height for row, _, _ in calls)
        assert all(x1 - x0 <= visible.width for _, x0, x1 in calls)
        assert sy <= n // 2 < sy + visible.height  # the cursor is on the screen
        # What is drawn is the pattern there, from the first key on the screen.
        pattern, marks = data.stages(0, 0, 0)["pattern"], data.marks("attn", 0)
        sx = view.scroll_offset[0]
        first = -(-sx // view.cell)  # the first key whose cell is whole on the screen
        line = view.render_line(view.HEADER + n // 2 - sy).text[view.label_width():]
        drawn = line[first * view.cell - sx:].split()
        want = expected_pattern_rows(pattern[n // 2: n // 2 + 1, first:], marks[n // 2:, first:])
        assert drawn == want[0][:len(drawn)] and len(drawn) >= visible.width // view.cell
        await pilot.press("end")
        assert view.at_query == n - 1 and view.scroll_offset[1] > sy

    drive(ExploreApp(data), (100, 30), steps)


# ── the panels, saving, quitting ──────────────────────────────────────────────────────────────

@pytest.mark.slow
def test_the_side_panel_has_the_step_predictions_and_other_sections():
    data = explore_data([SENTENCE], **SMALL, predict=True, top_k=3)
    data.sections.append(Section("attribution", lambda b, width: Text(f"SECTION of text {b}")))

    async def steps(pilot):
        side = plain(pilot.app.screen.query_one("#predictions"))
        assert "SECTION of text 0" in side and "next token after" in side
        await pilot.press("enter", "t")
        await pilot.pause()
        step = plain(pilot.app.screen.query_one("#step"))
        assert "blocks.0.attn.scores" in step and "scores = Q·Kᵀ" in step
        assert "[1, 4, 6, 6]" in step
        await pilot.press("p")
        assert not pilot.app.screen.query_one("#side").display

    drive(ExploreApp(data), (160, 50), steps)


def test_s_saves_the_screen_as_svg_without_overwriting(tmp_path):
    data = explore_data([SENTENCE], **SMALL)
    app = ExploreApp(data, save_to=tmp_path)

    async def steps(pilot):
        await pilot.press("s", "enter", "s")
        await pilot.pause()

    drive(app, (80, 24), steps)
    assert [p.name for p in app.saved] == ["attn-explore-1.svg", "attn-explore-2.svg"]
    svg = (tmp_path / "attn-explore-2.svg").read_text()
    assert "<svg" in svg and "L0H0" in svg
    assert not re.search(r"url\(\s*[\"']?https?:", svg) and "cdnjs" not in svg


@pytest.mark.slow
@pytest.mark.parametrize(("key", "code"), [("q", 0), ("ctrl+c", 130)])
def test_q_and_ctrl_c_end_the_app(key, code):
    data = explore_data([SENTENCE], **SMALL)

    async def steps(pilot):
        await pilot.press("question_mark")
        await pilot.pause()
        assert type(pilot.app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(pilot.app.screen, OverviewScreen)
        await pilot.press(key)

    app = drive(ExploreApp(data), (80, 24), steps)
    assert app.return_value == code


def test_the_readme_lists_every_key():
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme.split("## `attn explore`", 1)[1].split("\n## ", 1)[0]
    for keys in panels.KEYS.values():
        for key, _ in keys:
            assert f"`{key}`" in section, key


# ── in a real terminal ────────────────────────────────────────────────────────────────────────

def on_a_terminal(args: list[str], keys: list[bytes], wait: float = 60) -> tuple[int, str]:
    """`attn explore ARGS` with stdin, stdout and stderr on one pty (80×24); `keys` typed one
    by one once the app has drawn. Returns the exit code and everything the terminal got."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "ATTN_DEBUG")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen([sys.executable, "-m", "attn_tracer", "explore", *args],
                            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                            start_new_session=True)
    os.close(slave)
    out, deadline, pending, typed = b"", time.monotonic() + wait, list(keys), 0.0
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
        elif proc.poll() is not None:
            break
        if pending and b"attn explore" in out and time.monotonic() > typed + 0.5:
            os.write(master, pending.pop(0))  # one key a half second, once the app has drawn
            typed = time.monotonic()
    os.close(master)
    return proc.wait(timeout=10), out.decode("utf-8", "replace")


@pytest.mark.slow
@pytest.mark.parametrize(("key", "code"), [(b"q", 0), (b"\x03", 130)])
def test_q_and_ctrl_c_give_the_terminal_back(key, code):
    status, out = on_a_terminal([SENTENCE, "--d-model", "64", "--heads", "4"], [key])
    assert status == code, out[-500:]
    enter, leave = out.find("\x1b[?1049h"), out.rfind("\x1b[?1049l")
    assert 0 <= enter < leave  # the alternate screen, then the terminal's own screen again
    after = out[leave:]
    assert "\x1b[?25h" in after  # the cursor shown again
    assert "\x1b[?1000l" in after  # mouse reporting off
    assert ("attn: error: interrupted" in after) == (code == 130)


def test_bad_input_on_a_terminal_draws_nothing():
    status, out = on_a_terminal(["--heads", "5", SENTENCE], [])
    assert status == 2
    assert "\x1b[?1049h" not in out
    lines = [x for x in out.replace("\r", "").splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("attn: error: ") and "divide" in lines[0]
