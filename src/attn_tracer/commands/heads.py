"""`attn heads`: from the command line's request to the overview and the scores of every head.

The same steps as `attn trace` (run.py: validation, inputs, weights, the memory estimate, the
engine, the forward), with two differences: the input may be the induction probe (--repeat),
and nothing is captured: a hook on every layer's pattern reduces it to the head scores and
the thumbnails as it is made (analysis/heads.py), so memory does not grow with layers × heads ×
len². Everything is checked and computed before the first byte reaches stdout.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from attn_tracer.analysis.head_definitions import SCORES, SORTS
from attn_tracer.commands.run import Request
from attn_tracer.errors import UsageError
from attn_tracer.model import memory

JSON_BOX = (16, 16)  # --thumbnails: pattern rows × key columns of each head's thumbnail
PLOT_BOX = (48, 48)  # --plot: a figure's thumbnails are finer than a terminal's cells


@dataclass
class HeadsOptions:
    """The options of `attn heads` beyond the shared ones."""

    sort: str = "layer"
    top: int | None = None
    repeat: int | None = None
    bos: bool | None = None  # None: on with --repeat, off for a text
    json: bool = False
    thumbnails: bool | None = None  # True: --json adds them; False: the view leaves them out
    svg: Path | None = None
    force: bool = False
    score: list[str] = field(default_factory=list)  # --score: only these grids (all: every one)
    plot: Path | None = None
    plot_theme: str = "light"

    @property
    def scores(self) -> list[str]:
        """The scores whose grids are drawn (and plotted), in the definitions' order."""
        chosen = {s for s in self.score if s != "all"}
        return [s for s in SCORES if s in chosen or "all" in self.score]

    @property
    def with_bos(self) -> bool:
        return self.repeat is not None if self.bos is None else self.bos


@dataclass
class HeadsResult:
    trace: object  # the Trace: config, engine, inputs, step shapes (no tensors)
    scores: dict  # score name → [layers, heads]
    thumbnails: dict  # "view"/"json" → (values [layers, batch, heads, r, c], drawn, sizes)
    options: HeadsOptions
    seed: int


def validate(r: Request, h: HeadsOptions) -> None:
    from attn_tracer.commands import run

    run.validate(r)
    if h.sort not in SORTS:
        raise UsageError(f"--sort must be one of {', '.join(SORTS)}; got {h.sort!r}")
    if h.top is not None and h.top < 1:
        raise UsageError(f"--top must be at least 1; got {h.top}")
    if h.repeat is not None:
        if h.repeat < 1:
            raise UsageError(f"--repeat must be at least 1 (tokens before the copy); "
                             f"got {h.repeat}")
        if r.texts or r.file is not None or r.lines is not None:
            raise UsageError("--repeat builds its own input (random tokens, then the same "
                             "again): give it without a TEXT, --file or --lines")
    for name in h.score:
        if name != "all" and name not in SCORES:
            raise UsageError(f"--score must be one of {', '.join(SCORES)} or all; got {name!r}")
    if h.svg is not None:
        from attn_tracer.commands.save import check_target

        check_target(h.svg, h.force, "--svg", (".svg",))
    run.check_plot(h.plot, h.plot_theme, h.force)
    if h.plot is not None and h.svg is not None and h.plot.resolve() == h.svg.resolve():
        raise UsageError("--svg and --plot must name different files")


def check_repeat(n: int, bos: bool, config) -> None:
    """The probe must fit the context, and its N tokens must be distinct words."""
    from attn_tracer.analysis.heads import word_ids

    most = (config.n_ctx - bos) // 2
    if n > most:
        where = "the checkpoint's context" if config.weights else "--n-ctx"
        first = " after <|endoftext|>" if bos else ""
        other = f" (with --no-bos: {config.n_ctx // 2})" if bos else ""
        raise UsageError(f"--repeat {n} needs {2 * n + bos} tokens ({n}, then the same {n}"
                         f"{first}); {where} holds {config.n_ctx}: at most --repeat {most}"
                         f"{other}")
    words = len(word_ids())
    if n > words:
        raise UsageError(f"--repeat {n}: the probe draws distinct word tokens, and GPT-2 has "
                         f"{words:,}; at most --repeat {words}")


def ignored(r: Request, h: HeadsOptions) -> list[str]:
    out = []
    if h.repeat is None and r.weights is not None and r.seed != 0:
        out.append("--seed draws random weights (and the --repeat tokens); with --weights and "
                   "a text it changes nothing")
    if h.repeat is not None:
        for flag, given in (("--max-length", r.max_length is not None),
                            ("--allow-special", r.allow_special),
                            ("--padding", r.padding != "right")):
            if given:
                out.append(f"{flag} shapes a text; --repeat's input is one row of "
                           f"{2 * h.repeat} tokens, so it changes nothing")
    if h.thumbnails and not h.json:
        out.append("--thumbnails adds each head's thumbnail to --json; the view draws them "
                   "unless --no-thumbnails")
    if h.thumbnails is False and h.json:
        out.append("--no-thumbnails leaves the overview out of the view; --json has no "
                   "thumbnails unless --thumbnails")
    return out


def execute(r: Request, h: HeadsOptions, notice: Callable[[str], None],
            console: Callable) -> None:
    target = console()
    from attn_tracer.render import heads as render_heads

    color = render_heads.colored(target)
    said: list[str] = []
    result = compute(r, h, said.append, target.width, color)
    view = None
    if not h.json or h.svg is not None:
        view = render_view(result, target, record=h.svg is not None)
    from attn_tracer.commands.save import staged

    with staged():  # --svg and --plot are kept only if stdout is written too
        write_files(result, h, view)
        for message in said:
            notice(message)
        if h.json:
            sys.stdout.buffer.write(render_heads.document(result))
            sys.stdout.flush()
        else:
            sys.stdout.write(view.file.getvalue())
            sys.stdout.flush()


def write_files(result: HeadsResult, h: HeadsOptions, view) -> None:
    if h.svg is not None:
        from attn_tracer.commands.save import write_atomic
        from attn_tracer.render.terminal import export_svg

        write_atomic(h.svg, export_svg(view, "attn heads").encode())
    if h.plot is not None:
        from attn_tracer.commands import run
        from attn_tracer.render import plot

        run.write_plot(h.plot, lambda: plot.heads_figure(*plot.heads_data(result),
                                                         theme=h.plot_theme))


def render_view(result: HeadsResult, target, record: bool = False):
    """Render into memory with the target console's settings; printed only once it is whole."""
    from rich.console import Console

    from attn_tracer.render import heads as render_heads

    buffer = Console(file=io.StringIO(), width=target.width, color_system=target.color_system,
                     force_terminal=target.is_terminal, no_color=target.no_color,
                     legacy_windows=False, highlight=False, record=record)
    render_heads.render(result, buffer)
    return buffer


def compute(r: Request, h: HeadsOptions, notice: Callable[[str], None], width: int = 80,
            color: bool = True) -> HeadsResult:
    """Everything that can fail for a reason of the user's, then the run and its reductions.

    `width` and `color`: the console the view will be drawn on, which sizes the thumbnails.
    """
    from attn_tracer.analysis.heads import HeadScorer, repeat_probe, targets
    from attn_tracer.commands import run
    from attn_tracer.model.pipeline import Prepared, make_batch, prepare
    from attn_tracer.model.tokens import token
    from attn_tracer.model.trace import Selection
    from attn_tracer.render.heads import view_box

    validate(r, h)
    for message in ignored(r, h):
        notice(message)
    texts = run.read_inputs(r, notice)[0] if h.repeat is None else []
    limit = run.memory_limit(r)
    config, weights = run.load_model(r, notice, limit)
    bos = h.with_bos
    if h.repeat is not None:
        check_repeat(h.repeat, bos, config)
        toks = [token(i) for i in repeat_probe(h.repeat, r.seed, bos)]
        text = b"".join(t.bytes for t in toks).decode("utf-8", "replace")
        prepared = Prepared(make_batch([toks], [text], "right"), None)
    else:
        prepared = prepare(texts, config, padding=r.padding, max_length=r.max_length,
                           allow_special=r.allow_special, pad_to=r.pad_to, bos=bos)
    batch = prepared.batch
    rows, length = batch.ids.shape
    boxes = {}
    if (not h.json or h.svg is not None) and h.thumbnails is not False:
        boxes["view"] = view_box(width, config.heads, color)
    if h.json and h.thumbnails:
        boxes["json"] = JSON_BOX
    if h.plot is not None:
        boxes["plot"] = PLOT_BOX
    # The run keeps no tensor; the scores add index pairs (at worst every pair of a text made
    # of one repeated token) and the thumbnails' block matrices.
    needed = memory.estimate(config, r.dtype, rows, length, length, 0, 0, "patterns", False)
    needed += rows * length * length * (1 + 3 * 16)
    engine = run.checked_engine(r, needed, limit, length)
    scorer = HeadScorer(targets(batch.ids, batch.valid, config.mask == "causal", h.repeat),
                        engine, config.layers, config.heads, boxes)
    hooks = {f"blocks.{layer}.attn.pattern": scorer.hook(layer) for layer in range(config.layers)}
    trace, weights = run.forward(r, config, weights, engine, prepared,
                                 Selection((), (), "patterns"), hooks)
    run.notice_cuts(r, prepared, notice)
    return HeadsResult(trace, scorer.scores(), scorer.thumbnail_sets(), h, r.seed)
