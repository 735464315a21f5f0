"""--plot: the figures of attn trace, heads and attribute.

Two checks of each figure kind, both from a fixed model (tests/heads_model.py: a GPT-2
checkpoint whose heads' roles are known by construction) and a fixed text:

* through matplotlib's own objects: the image data of each heatmap is the pattern (or the
  scores, the head shares) that the JSON output gives, the axes carry the token labels, there
  is a colour bar, the title names the model, the text and what is shown;
* as pictures: the PNG is compared with a committed reference (docs/figures/, also the README's
  gallery) pixel by pixel, within a tolerance derived below.

And the file target's checks, shared with --save/--svg: suffix, overwrite refusal, atomic
write, the same bytes on every run, a one-line "install" error without matplotlib.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import heads_model

matplotlib = pytest.importorskip("matplotlib")
pytest.importorskip("safetensors")

from attn_tracer.cli import app  # noqa: E402
from attn_tracer.render import plot  # noqa: E402

runner = CliRunner()
TEXT = "The cat sat on the mat. The cat sat on the mat."
FIGURES = Path(__file__).parent.parent / "docs" / "figures"
# The matplotlib that drew the references: text is rasterised by its own FreeType build and
# its bundled DejaVu Sans, so another version may move a glyph's edge by a pixel.
REFERENCE_MATPLOTLIB = "3.11.2"
GALLERY_DPI = 80  # the references and the README's gallery: small files, still readable
MODEL = ["--weights", "model"]
COMMANDS = {
    "trace": ["trace", TEXT, "--layer", "1", *MODEL],
    "heads": ["heads", TEXT, "--score", "previous_token", "--score", "induction",
              "--score", "first_token", "--score", "self", *MODEL],
    # The built model's heads write nothing the unembedding reads (its logits come from the
    # tied embedding alone): random GPT-2 weights give every head a share to draw.
    "attribute": ["attribute", "The cat sat on the mat. The cat sat on the", "--arch", "gpt2",
                  "--d-model", "32", "--heads", "4", "--layers", "2"],
}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The checkpoint in a folder of its own, as `model`: run from there, every title reads
    `GPT-2 weights from model` whatever the temporary directory is called."""
    root = tmp_path_factory.mktemp("plot")
    heads_model.save(root / "model")
    return root


def invoke(args: list[str], cwd: Path, *more: str):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, [*args, *more])
    finally:
        os.chdir(old)


_drawn: dict = {}


def figure_of(kind: str, cwd: Path, theme: str = "light"):
    """The Figure that `attn KIND … --plot` draws, and the command's JSON of the same run
    (drawn once a kind and theme: each test only reads them)."""
    if (kind, theme, cwd) not in _drawn:
        _drawn[kind, theme, cwd] = _draw(kind, cwd, theme)
    return _drawn[kind, theme, cwd]


def _draw(kind: str, cwd: Path, theme: str):
    made = {}
    original = plot.to_bytes

    def keep(figure, suffix, dpi=plot.DPI):
        made["figure"] = figure
        return original(figure, suffix, dpi)

    plot.to_bytes = keep
    try:
        out = cwd / f"{kind}.png"
        result = invoke(COMMANDS[kind], cwd, "--plot", str(out), "--force", "--plot-theme",
                        theme)
    finally:
        plot.to_bytes = original
    assert result.exit_code == 0, result.output
    doc = invoke([*COMMANDS[kind], "--json"], cwd)
    assert doc.exit_code == 0, doc.output
    return made["figure"], json.loads(doc.stdout)


def images(ax) -> list[np.ndarray]:
    return [im.get_array() for im in ax.get_images()]


def colour_bars(figure) -> list:
    return [ax for ax in _all_axes(figure) if ax.get_label() == "<colorbar>"]


def _all_axes(figure) -> list:
    """Every axes of the figure and its subfigures, each once, in the order drawn."""
    out = list(figure.axes)
    for sub in getattr(figure, "subfigs", []):
        out += [ax for ax in _all_axes(sub) if ax not in out]
    return out


def title(figure) -> str:
    return figure._suptitle.get_text()


# ── the figures' data, through matplotlib's objects ───────────────────────────────────────────

def test_trace_figure_draws_each_heads_pattern_with_token_labels_and_a_colour_bar(model):
    figure, doc = figure_of("trace", model)
    tokens = [t["text"] for t in doc["inputs"][0]["tokens"]]
    patterns = {a["head"]: a["weights"] for a in doc["attention"]
                if a["layer"] == 1 and a["batch"] == 0 and a["block"] == "attn"}
    heatmaps = [ax for ax in figure.axes if ax.get_images() and ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in heatmaps] == [f"L1H{h}" for h in range(heads_model.HEADS)]
    for h, ax in enumerate(heatmaps):
        data = images(ax)[0]
        pattern = np.array(patterns[h], dtype=float)
        # The causal mask's cells are masked (drawn gray), the others are the weights.
        causal = np.triu(np.ones_like(pattern, bool), 1)
        assert np.array_equal(np.ma.getmaskarray(data), causal)
        # float32 weights in the JSON's shortest round-trip form: equal as float32.
        assert np.array_equal(data.filled(0).astype(np.float32), pattern.astype(np.float32))
        assert [t.get_text() for t in ax.get_yticklabels()] == [
            "␣" + t[1:] if t.startswith(" ") else t for t in tokens]
        assert ax.get_xlabel() == "key"
    assert len(colour_bars(figure)) == 1
    assert "attention weight" in colour_bars(figure)[0].get_ylabel()
    words = title(figure)
    assert "GPT-2 weights from model" in words and "The cat sat on the mat." in words
    assert "attention patterns of layer 1" in words


def test_heads_figure_draws_the_thumbnails_and_each_chosen_score(model):
    figure, doc = figure_of("heads", model)
    axes = [ax for ax in _all_axes(figure) if ax.get_images() and ax.get_label() != "<colorbar>"]
    mosaic, *grids = axes
    assert [ax.get_title() for ax in grids] == ["previous_token", "induction", "first_token",
                                                "self"]
    for ax in grids:
        assert np.array_equal(images(ax)[0], np.array(doc["scores"][ax.get_title()]))
    # The known heads of the model are the strongest of their score: L0H0 the previous-token
    # head, L1H0 the induction head.
    for score, (layer, h) in (("previous_token", (0, 0)), ("induction", (1, 0))):
        grid = np.array(doc["scores"][score])
        assert np.unravel_index(grid.argmax(), grid.shape) == (layer, h)
    assert [t.get_text() for t in mosaic.get_xticklabels()] == [f"H{h}" for h in range(4)]
    assert [t.get_text() for t in mosaic.get_yticklabels()] == ["L0", "L1"]
    # 14 tokens: one thumbnail cell per query and key, so the mosaic holds every pattern;
    # L0H0's tile (the top left one) is the previous-token diagonal.
    tile = np.asarray(images(mosaic)[0])[:14, :14]
    assert np.all(np.diag(tile, -1) > 0.99)
    assert len(colour_bars(figure)) == 1 + len(grids)
    assert "queries down, keys across" in mosaic.get_title()


def test_attribute_figure_draws_the_heads_the_components_and_the_lens(model):
    figure, doc = figure_of("attribute", model)
    grid_ax, bars_ax, lens_ax = (ax for ax in figure.axes if ax.get_label() != "<colorbar>")
    heads = {(c["layer"], c["head"]): c["logit"] for c in doc["components"]
             if c["kind"] == "head"}
    grid = images(grid_ax)[0]
    for (layer, h), v in heads.items():
        assert grid[layer, h] == pytest.approx(v, rel=1e-12)
    # Its own diverging scale: symmetric around 0, as wide as the largest head.
    norm = grid_ax.get_images()[0].norm
    assert norm.vmin == -norm.vmax == -max(abs(v) for v in heads.values())
    ranked = sorted(doc["components"], key=lambda c: -abs(c["logit"]))[:10]
    widths = [p.get_width() for p in bars_ax.patches][::-1]
    assert widths == pytest.approx([c["logit"] for c in ranked], rel=1e-12)
    assert [t.get_text() for t in bars_ax.get_yticklabels()][::-1] == [c["name"]
                                                                      for c in ranked]
    p_target = lens_ax.get_lines()[0].get_ydata()
    assert p_target == pytest.approx([x["prob"] for x in doc["logit_lens_target"]], rel=1e-12)
    assert len(colour_bars(figure)) == 1
    assert "direct logit attribution" in title(figure)
    assert "random weights, seed 0 (untrained), arch gpt2" in title(figure)


@pytest.mark.slow
def test_dark_theme_changes_the_background_only(model):
    light, _ = figure_of("trace", model, "light")
    dark, _ = figure_of("trace", model, "dark")
    assert matplotlib.colors.to_hex(light.get_facecolor()) == "#ffffff"
    assert matplotlib.colors.to_hex(dark.get_facecolor()) == plot.THEME["dark"][
        "figure.facecolor"]
    for a, b in zip(light.axes, dark.axes, strict=True):
        for x, y in zip(images(a), images(b), strict=True):
            assert np.array_equal(np.ma.filled(x, -1), np.ma.filled(y, -1))


# ── the pictures, against committed references ────────────────────────────────────────────────

def _tolerance() -> int:
    """The largest per-channel difference (0–255) a pixel may show against its reference.

    With the pinned matplotlib, the text, the axes and the layout are drawn identically on
    every machine (its own FreeType, its bundled font, a fixed dpi, nearest-neighbour images):
    only the data can differ, by the float32 rounding of the forward on another CPU (a few
    ulps). A colour map is a table of 256 colours, so such a difference moves a cell at most
    one entry along its map: the bound is the largest step between two neighbouring entries
    of the maps the figures use, rounded up."""
    step = 0.0
    for name in (plot.PATTERN_MAP, plot.DIVERGING_MAP):
        table = matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255
        step = max(step, float(np.abs(np.diff(table, axis=0)).max()))
    return int(np.ceil(step))


def _pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)


@pytest.mark.parametrize("kind", list(COMMANDS))
def test_figure_matches_its_committed_reference(kind: str, model):
    figure, _ = figure_of(kind, model)
    made = plot.to_bytes(figure, ".png", dpi=GALLERY_DPI)
    reference = FIGURES / f"{kind}.png"
    if os.environ.get("ATTN_WRITE_FIGURES") == "1":  # regenerate, deliberately
        reference.write_bytes(made)
    if matplotlib.__version__ != REFERENCE_MATPLOTLIB:
        pytest.skip(f"the references were drawn by matplotlib {REFERENCE_MATPLOTLIB}, "
                    f"this is {matplotlib.__version__} (pip install -e \".[test]\" pins it)")
    a, b = _pixels(made), _pixels(reference.read_bytes())
    assert a.shape == b.shape
    worst = int(np.abs(a - b).max())
    assert worst <= _tolerance(), f"{kind}: a pixel differs by {worst}"


def test_tolerance_is_tighter_than_any_real_change():
    # One step of the colour map: far less than the difference between a weight of 0.5 and
    # 0.6, so a wrong pattern cannot pass.
    viridis = matplotlib.colormaps["viridis"]
    change = np.abs(np.array(viridis(0.5)[:3]) - np.array(viridis(0.6)[:3])).max() * 255
    assert _tolerance() < change / 3


# ── the file ──────────────────────────────────────────────────────────────────────────────────

@pytest.mark.slow
@pytest.mark.parametrize("suffix", plot.SUFFIXES)
def test_every_format_is_the_same_bytes_on_every_run(suffix: str, model):
    out = []
    for _ in range(2):
        result = invoke(COMMANDS["attribute"], model, "--plot", f"again{suffix}", "--force")
        assert result.exit_code == 0, result.output
        out.append((model / f"again{suffix}").read_bytes())
    assert out[0] == out[1]
    magic = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}[suffix]
    assert out[0].startswith(magic)


def test_target_is_checked_before_the_run(model, tmp_path):
    result = invoke(COMMANDS["trace"], model, "--plot", "figure.jpg")
    assert result.exit_code == 2
    assert "--plot figure.jpg: the name must end in .png or .pdf or .svg" in result.output
    (model / "taken.png").write_bytes(b"mine")
    for kind in COMMANDS:
        result = invoke(COMMANDS[kind], model, "--plot", "taken.png")
        assert result.exit_code == 2, kind
        assert "exists; add --force" in result.output
    assert (model / "taken.png").read_bytes() == b"mine"
    result = invoke(COMMANDS["trace"], model, "--plot", "x.png", "--plot-theme", "blue")
    assert result.exit_code == 2


def test_without_matplotlib_one_line_says_how_to_install_it(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    result = invoke(COMMANDS["heads"], model, "--plot", "none.png")
    assert result.exit_code == 1
    assert result.stderr.strip() == ('attn: error: --plot draws with matplotlib, which is not '
                                     'installed: pip install "attn-tracer[plot]"')
    assert result.stdout == ""
    assert not (model / "none.png").exists()
