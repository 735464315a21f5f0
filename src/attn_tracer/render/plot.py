"""Publication figures (--plot FILE.png/.pdf/.svg) with matplotlib, from plain data.

Three kinds, one a command: the chosen heads' patterns (`attn trace`), every head's thumbnail
and each score as a layers × heads heatmap (`attn heads`), and the heads' direct logit
attribution on a diverging scale, the strongest components as bars and the logit lens
(`attn attribute`). Each has token labels on its axes where it has tokens, a colour bar, and a
title saying the model, the text and what is shown. Light by default, dark with
`--plot-theme dark`.

matplotlib is an optional extra (`pip install "attn-tracer[plot]"`), imported only here and
only for --plot. No pyplot: a bare `Figure` drawn by the Agg canvas, so no display is ever
opened. The output is reproducible byte for byte with one matplotlib: the bundled DejaVu Sans,
a fixed dpi, and no dates or random ids in the file (PNG "Software", PDF dates, SVG's
`svg.hashsalt`).

The figures read plain arrays, labels and strings (the `*_data` adapters below take them out
of a Trace, a heads result or an attribution result); never an engine's arrays.
"""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
import warnings
from dataclasses import dataclass

import numpy as np

from attn_tracer.errors import AttnError, UsageError

SUFFIXES = (".png", ".pdf", ".svg")
THEMES = ("light", "dark")
DPI = 150  # a slide or a paper's column; fixed, so that the PNG is the same on every machine
FONT = "DejaVu Sans"  # matplotlib's bundled font: the same glyphs everywhere
MAX_LABELS = 40  # tick labels on a token axis; beyond, every n-th token is labelled
TITLE_TEXT = 70  # characters of the text quoted in a title
PATTERN_MAP = "viridis"  # the terminal heatmaps' scale, 0–1
DIVERGING_MAP = "RdBu"  # blue: pushes toward the target, red: away (as the terminal view)
INSTALL = 'pip install "attn-tracer[plot]"'
# Masked cells (the causal and the padding mask) are drawn in this gray, not as a weight of 0.
MASKED = {"light": "#d9d9d9", "dark": "#3a3a3a"}
THEME = {
    "light": {"figure.facecolor": "white", "axes.facecolor": "white", "text.color": "#111111",
              "axes.labelcolor": "#111111", "axes.edgecolor": "#444444",
              "xtick.color": "#222222", "ytick.color": "#222222"},
    "dark": {"figure.facecolor": "#141414", "axes.facecolor": "#141414",
             "text.color": "#eeeeee", "axes.labelcolor": "#eeeeee", "axes.edgecolor": "#aaaaaa",
             "xtick.color": "#dddddd", "ytick.color": "#dddddd"},
}


def require():
    """matplotlib, or the one-line error that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise AttnError(f"--plot draws with matplotlib, which is not installed: {INSTALL}"
                        ) from None
    return matplotlib


def check(path, theme: str) -> None:
    """The checks of --plot that do not touch the file (commands/save.check_target does)."""
    if theme not in THEMES:
        raise UsageError(f"--plot-theme must be light or dark; got {theme!r}")
    if path is not None:
        require()


@contextlib.contextmanager
def _style(theme: str):
    import matplotlib

    params = {
        "font.family": "sans-serif", "font.sans-serif": [FONT], "font.size": 8,
        "axes.titlesize": 9, "figure.titlesize": 10, "savefig.dpi": DPI, "figure.dpi": DPI,
        # A token like "$5" is text, never mathtext.
        "text.parse_math": False, "svg.hashsalt": "attn", "svg.fonttype": "path",
        "pdf.fonttype": 42, "image.interpolation": "nearest",
        "axes.unicode_minus": True, **THEME[theme],
    }
    with matplotlib.rc_context(params), warnings.catch_warnings():
        # A glyph DejaVu lacks (CJK, emoji) becomes a box: a warning per glyph would reach stderr.
        warnings.simplefilter("ignore", UserWarning)
        yield


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def to_bytes(figure, suffix: str, dpi: int = DPI) -> bytes:
    """The figure as a PNG, PDF or SVG file's bytes, with nothing in them that changes per run
    (`dpi`: of the PNG; the README's gallery and the tests' references are smaller)."""
    fmt = suffix.lower().lstrip(".")
    metadata = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None},
                "pdf": {"CreationDate": None, "ModDate": None, "Producer": None,
                        "Creator": None}}[fmt]
    buffer = io.BytesIO()
    # The parameters read while saving (the SVG's ids from svg.hashsalt, fonts embedded as
    # paths) are the drawing's; the theme's colours are already in the figure's artists.
    with _style("light"):
        figure.savefig(buffer, format=fmt, metadata=metadata, dpi=dpi,
                       facecolor=figure.get_facecolor())
    data = buffer.getvalue()
    return _renumber_ids(data) if fmt == "svg" else data


_SVG_ID = re.compile(rb'(?<=["#])[a-z][0-9a-f]{10}(?=[")])')


def _renumber_ids(svg: bytes) -> bytes:
    """matplotlib names a clip rectangle by a hash of its corners' floats, whose last bits the
    layout's iterations may change from one run to the next: the ids, numbered in order of
    appearance instead, make the file the same on every run."""
    seen: dict[bytes, bytes] = {}
    return _SVG_ID.sub(lambda m: seen.setdefault(m.group(), b"%c%010d" % (m.group()[0],
                                                                            len(seen))), svg)


def title_text(text: str) -> str:
    """The text as a title quotes it: one line, cut at TITLE_TEXT characters with …."""
    one = " ".join(text.split())
    return f"“{one[:TITLE_TEXT - 1]}…”" if len(one) > TITLE_TEXT else f"“{one}”"


def _suptitle(figure, lines: list[str]) -> None:
    # About 13 characters of 9-point DejaVu Sans to an inch of figure: wrapped, never cut.
    chars = max(40, int(figure.get_figwidth() * 13))
    wrapped = [w for line in lines for w in textwrap.wrap(line, chars) or [""]]
    figure.suptitle("\n".join(wrapped), fontsize=9, x=0.01, ha="left")


def _token_ticks(axis_set, labels: list[str], rotate: bool = False) -> None:
    """Tick labels on a token axis: every token up to MAX_LABELS, then every n-th."""
    n = len(labels)
    step = max(1, -(-n // MAX_LABELS))
    where = list(range(0, n, step))
    axis_set(where, [labels[i] for i in where], rotation=90 if rotate else 0,
             fontsize=7 if n <= 16 else 6)


# ── attn trace: the chosen heads' patterns ────────────────────────────────────────────────────

@dataclass
class Heatmap:
    """One head's pattern, as drawn: weights [q_len, k_len] in 0–1, masked cells True."""

    title: str  # "L0H1"
    weights: np.ndarray
    rows: list[str]  # the query tokens
    cols: list[str]  # the key tokens
    masked: np.ndarray  # bool [q_len, k_len]: the causal or the padding mask


def patterns_figure(maps: list[Heatmap], title: list[str], theme: str = "light"):
    """A grid of heatmaps on one 0–1 scale, one colour bar for all."""
    with _style(theme):
        n = len(maps)
        cols = min(n, 4)
        rows = -(-n // cols)
        q_len, k_len = maps[0].weights.shape
        side = min(4.0, max(2.2, 0.18 * max(q_len, k_len) + 1.0))
        figure = _figure(cols * side + 1.0, rows * side * max(0.5, q_len / k_len) + 0.9)
        axes = figure.subplots(rows, cols, squeeze=False)
        cmap = _masked_map(PATTERN_MAP, theme)
        image = None
        for i, m in enumerate(maps):
            ax = axes[i // cols][i % cols]
            image = ax.imshow(np.ma.masked_array(m.weights, m.masked), cmap=cmap, vmin=0, vmax=1,
                              aspect="auto")
            ax.set_title(m.title)
            _token_ticks(ax.set_yticks, m.rows)
            _token_ticks(ax.set_xticks, m.cols, rotate=True)
            ax.set_xlabel("key")
            if i % cols == 0:
                ax.set_ylabel("query")
        for j in range(n, rows * cols):
            axes[j // cols][j % cols].set_axis_off()
        bar = figure.colorbar(image, ax=axes, shrink=0.9, aspect=30)
        bar.set_label("attention weight (gray: masked)")
        _suptitle(figure, title)
        return figure


def _masked_map(name: str, theme: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=MASKED[theme])


def trace_data(trace, kind: str = "attn", batch: int = 0) -> list[Heatmap]:
    """The heatmaps of the trace's captured patterns, text `batch`: every chosen layer and head,
    its real queries and keys (padding left out, as the terminal's labels leave it)."""
    from attn_tracer.render.heatmaps import allowed_mask, column_labels, reading_labels

    inp = trace.inputs[batch]
    keys = trace.cross[batch] if kind == "cross_attn" else inp
    vq, vk = inp.valid, keys.valid
    allowed = allowed_mask(trace, kind, batch)[vq][:, vk]
    out = []
    for layer, pattern in trace.patterns(kind):
        for i, head in enumerate(trace.selection.heads):
            w = np.asarray(pattern[batch, i], np.float64)[vq][:, vk]
            out.append(Heatmap(f"L{layer}H{head}", w, reading_labels(inp), column_labels(keys),
                               ~allowed))
    return out


# ── attn heads: every head's thumbnail, each score's grid ─────────────────────────────────────

UNDRAWN = -1.0  # a mosaic's masked block: below the colour scale, drawn in the masked gray


def mosaic(values: np.ndarray, drawn: np.ndarray, gap: int = 1) -> np.ndarray:
    """[layers, heads, r, c] thumbnails → one [layers·(r+gap) − gap, heads·(c+gap) − gap] image,
    NaN in the gaps (the background), UNDRAWN where a thumbnail draws nothing (a masked block)."""
    layers, heads, r, c = values.shape
    image = np.full((layers * (r + gap) - gap, heads * (c + gap) - gap), np.nan)
    for layer in range(layers):
        for h in range(heads):
            tile = np.where(drawn, values[layer, h], UNDRAWN)
            y, x = layer * (r + gap), h * (c + gap)
            image[y:y + r, x:x + c] = tile
    return image


def heads_figure(values: np.ndarray, drawn: np.ndarray, scores: dict[str, np.ndarray],
                 title: list[str], scale_words: str = "", theme: str = "light"):
    """The thumbnails' mosaic (layers down, heads across) beside one heatmap per score."""
    with _style(theme):
        layers, heads, r, c = values.shape
        names = list(scores)
        per_row = min(len(names), 3) if names else 1
        score_rows = -(-len(names) // per_row) if names else 0
        cell = min(0.35, 4.5 / max(heads, 1))
        grid_w = max(2.4, heads * cell + 1.3)
        grid_h = max(1.6, layers * cell + 0.9)
        mosaic_w = max(4.0, min(9.0, heads * 0.6 + 1.5))
        mosaic_h = mosaic_w * (layers * (r + 1)) / (heads * (c + 1)) + 0.6
        width = max(mosaic_w + 1.0, per_row * grid_w)
        figure = _figure(width, mosaic_h + 0.8 + score_rows * grid_h)
        parts = figure.subfigures(2, 1, height_ratios=[mosaic_h + 0.5, max(score_rows * grid_h,
                                                                           0.01)])
        top, bottom = parts
        ax = top.subplots()
        import matplotlib

        # Masked blocks below the scale, in the masked gray; the gaps transparent.
        cmap = matplotlib.colormaps[PATTERN_MAP].with_extremes(under=MASKED[theme],
                                                               bad=(0, 0, 0, 0))
        image = ax.imshow(np.ma.masked_invalid(mosaic(values, drawn)), cmap=cmap, vmin=0, vmax=1)
        ax.set_xticks([h * (c + 1) + (c - 1) / 2 for h in range(heads)],
                      [f"H{h}" for h in range(heads)], fontsize=7)
        ax.set_yticks([layer * (r + 1) + (r - 1) / 2 for layer in range(layers)],
                      [f"L{layer}" for layer in range(layers)], fontsize=7)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_title("every head's pattern: queries down, keys across")
        if scale_words:
            ax.set_xlabel(scale_words, fontsize=7)
        top.colorbar(image, ax=ax, shrink=0.8, aspect=25).set_label(
            "attention weight (gray: masked)")
        if names:
            axes = bottom.subplots(score_rows, per_row, squeeze=False)
            for i, name in enumerate(names):
                sax = axes[i // per_row][i % per_row]
                v = np.asarray(scores[name], np.float64)
                top_v = None if name == "entropy" else 1.0
                im = sax.imshow(v, cmap=PATTERN_MAP, vmin=0, vmax=top_v, aspect="auto")
                sax.set_title(f"{name} (bits)" if name == "entropy" else name)
                if layers * heads <= 64:  # small grids carry their numbers too
                    high = float(np.max(v)) if top_v is None else top_v
                    for (y, x), value in np.ndenumerate(v):
                        sax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=6,
                                 color="black" if value > 0.6 * high else "white")
                sax.set_xticks(range(heads), [f"H{h}" for h in range(heads)], fontsize=6,
                               rotation=90 if heads > 8 else 0)
                sax.set_yticks(range(layers), [f"L{layer}" for layer in range(layers)],
                               fontsize=6)
                bottom.colorbar(im, ax=sax, shrink=0.9).ax.tick_params(labelsize=6)
            for j in range(len(names), score_rows * per_row):
                axes[j // per_row][j % per_row].set_axis_off()
        _suptitle(figure, title)
        return figure


# ── attn attribute: heads on a diverging scale, the components, the logit lens ────────────────

@dataclass
class Lens:
    layers: list[str]  # "L0", "L1", …
    target_probs: np.ndarray  # [layers] p(target) after each layer
    top_tokens: list[str]  # the most likely next token after each layer
    top_probs: np.ndarray  # [layers]


def attribution_figure(grid: np.ndarray, bars: list[tuple[str, float]], lens: Lens,
                       title: list[str], measure: str, target: str, theme: str = "light"):
    """Three panels: the heads' shares [layers × heads] on a diverging scale symmetric around
    0 (its own scale: the largest |head share|), the strongest components as bars, and the
    logit lens: p(target) after each layer, with the top token named."""
    from matplotlib.colors import TwoSlopeNorm

    with _style(theme):
        layers, heads = grid.shape
        figure = _figure(11.5, max(3.6, 0.3 * max(layers, len(bars)) + 1.8))
        ax_grid, ax_bars, ax_lens = figure.subplots(1, 3, width_ratios=[1.2, 1.0, 1.0])
        scale = float(np.max(np.abs(grid))) or 1.0
        image = ax_grid.imshow(grid, cmap=DIVERGING_MAP, aspect="auto",
                               norm=TwoSlopeNorm(0.0, -scale, scale))
        ax_grid.set_xticks(range(heads), [f"H{h}" for h in range(heads)], fontsize=6,
                           rotation=90 if heads > 8 else 0)
        ax_grid.set_yticks(range(layers), [f"L{layer}" for layer in range(layers)], fontsize=6)
        ax_grid.set_title(f"each head's share of {measure}")
        ax_grid.set_xlabel("head")
        ax_grid.set_ylabel("layer")
        bar = figure.colorbar(image, ax=ax_grid, shrink=0.9)
        bar.set_label(f"share: ±{scale:.3g} = the largest head's (blue: toward {target})")
        if layers * heads <= 64:
            for (y, x), value in np.ndenumerate(grid):
                ax_grid.text(x, y, _signed(value), ha="center", va="center",
                             fontsize=6, color="white" if abs(value) > 0.6 * scale else "black")
        names = [n for n, _ in bars][::-1]
        values = np.array([v for _, v in bars][::-1], np.float64)
        import matplotlib

        rdbu = matplotlib.colormaps[DIVERGING_MAP]
        colours = [rdbu(0.85) if v > 0 else rdbu(0.15) for v in values]
        ax_bars.barh(range(len(values)), values, color=colours)
        ax_bars.axvline(0, color=THEME[theme]["axes.edgecolor"], linewidth=0.8)
        ax_bars.set_yticks(range(len(values)), names, fontsize=7)
        ax_bars.set_title("strongest components")
        ax_bars.set_xlabel(f"share of {measure}")
        x = np.arange(len(lens.layers))
        ax_lens.plot(x, lens.target_probs, marker="o", color=rdbu(0.85),
                     label=f"p({target})")
        ax_lens.plot(x, lens.top_probs, marker=".", linestyle=":", color="gray",
                     label="p(top token)")
        for i, name in enumerate(lens.top_tokens):
            ax_lens.annotate(name, (x[i], lens.top_probs[i]), textcoords="offset points",
                             xytext=(0, 5), ha="center", fontsize=6, rotation=45)
        ax_lens.set_xticks(x, lens.layers, fontsize=6, rotation=90 if len(x) > 12 else 0)
        ax_lens.set_ylim(0, 1.15)
        ax_lens.set_xlabel("after layer")
        ax_lens.set_ylabel("probability")
        ax_lens.set_title("logit lens")
        ax_lens.legend(fontsize=6, loc="lower right", frameon=False)
        _suptitle(figure, title)
        return figure


def _signed(value: float) -> str:
    """+0.12, −0.05; a value that rounds to 0 is 0.00, never −0.00."""
    text = f"{value:+.2f}"
    return "0.00" if float(text) == 0 else text.replace("-", "−")


# ── titles ────────────────────────────────────────────────────────────────────────────────────

def model_words(config) -> str:
    """The model, as a title says it: where the weights came from and the sizes."""
    what = (f"GPT-2 weights from {config.weights}" if config.weights
            else f"random weights, seed {config.seed} (untrained), arch {config.arch}")
    layers = f"{config.layers} layer{'s' if config.layers != 1 else ''}"
    heads = f"{config.heads} head{'s' if config.heads != 1 else ''}"
    return f"{what} · {layers} × {heads} · d_model {config.d_model}"


def heads_data(result) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], list[str], str]:
    """(thumbnails [layers, heads, r, c], drawn [r, c], scores, title, the thumbnails' scale in
    words) of an attn heads result,
    text 0; the scores --score chose (default: every one)."""
    from attn_tracer.analysis.head_definitions import SCORES

    values, drawn, sizes = result.thumbnails["plot"]
    rows, cols = int(sizes[0, 0]), int(sizes[0, 1])
    o = result.options
    scores = {s: result.scores[s] for s in (o.scores if o.score else SCORES)}
    trace = result.trace
    inp = trace.inputs[0]
    if o.repeat is not None:
        what = (f"induction probe (--repeat {o.repeat}): {o.repeat} random word tokens "
                f"(seed {result.seed}), then the same {o.repeat} again")
    else:
        more = f" (text 0 of {len(trace.inputs)}; scores: their mean)" if len(
            trace.inputs) > 1 else ""
        what = f"{title_text(inp.text)}{more}"
    length = inp.length
    scale = ("one cell per query and key" if rows == length and cols == length else
             f"{length} tokens in {rows} × {cols} blocks")
    title = [f"attn heads · {model_words(trace.config)}", what,
             "every head's pattern, and its scores as layers × heads grids (definitions: "
             "attn heads --help)"]
    return (values[:, 0, :, :rows, :cols], drawn[0, :rows, :cols], scores, title, scale)


def attribution_data(result, components: int = 10) -> dict:
    """The plain data of attribution_figure from an attn attribute result."""
    from attn_tracer.analysis import attribution as dla
    from attn_tracer.render.attribution import label, measure

    a = result.attribution
    c = result.trace.config
    order = dla.ranked(a)[:components]
    lens = result.lens
    column = lens.positions.index(result.position)
    inp = result.trace.inputs[0]
    target = label(result.target, result)
    title = [f"attn attribute · {model_words(c)}", title_text(inp.text),
             f"direct logit attribution of {measure(result)} at position {result.position} "
             f"({inp.tokens[result.position].text}), and the logit lens"]
    return {
        "grid": dla.head_grid(a, c.layers, c.heads),
        "bars": [(a.components[i].name, float(a.logits[i])) for i in order],
        "lens": Lens([f"L{layer}" for layer in range(c.layers)],
                     np.asarray(lens.target_probs, np.float64),
                     [label(int(i), result) for i in lens.top_ids[:, column]],
                     np.asarray(lens.top_probs[:, column], np.float64)),
        "title": title, "measure": measure(result), "target": target,
    }
