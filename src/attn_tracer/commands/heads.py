"""`attn heads`: from the command line's request to the overview and the scores of every head.

The same run session as `attn trace` (session.py: validation, inputs, weights, the memory
estimate, the engine, the forward), with two differences: the input may be the induction probe
(--repeat), and nothing is captured: a hook on every layer's pattern reduces it to the head
scores and the thumbnails as it is made (analysis/heads.py), so memory does not grow with
layers × heads × len². Everything is checked and computed before the first byte reaches stdout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attn_tracer.analysis.head_definitions import SORTS
from attn_tracer.commands.session import SharedOptions, open_session
from attn_tracer.errors import UsageError
from attn_tracer.model import memory

JSON_BOX = (16, 16)  # --thumbnails: pattern rows × key columns of each head's thumbnail


@dataclass
class HeadsOptions:
    """The options of `attn heads` beyond the shared ones."""

    sort: str = "layer"
    top: int | None = None
    repeat: int | None = None
    bos: bool | None = None  # None: on with --repeat, off for a text
    json: bool = False
    thumbnails: bool = False
    svg: Path | None = None
    html: Path | None = None
    width: int | None = None
    force: bool = False

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


def validate(r: Any, h: HeadsOptions) -> None:
    """`attn heads`' own options (the session checks the shared ones first)."""
    from attn_tracer.commands import output

    if h.sort not in SORTS:
        raise UsageError(f"--sort must be one of {', '.join(SORTS)}; got {h.sort!r}")
    if h.top is not None and h.top < 1:
        raise UsageError(f"--top must be at least 1; got {h.top}")
    if h.repeat is not None:
        if h.repeat < 1:
            raise UsageError(f"--repeat must be at least 1 (tokens before the copy); "
                             f"got {h.repeat}")
        i = SharedOptions.of(r).input
        if i.texts or i.file is not None or i.lines is not None:
            raise UsageError("--repeat builds its own input (random tokens, then the same "
                             "again): give it without a TEXT, --file or --lines")
    output.check_width(h.width)
    output.check_files({flag: (getattr(h, flag[2:]), suffixes)
                        for flag, suffixes in output.VIEW_SUFFIXES.items()}, h.force)


def check_repeat(n: int, bos: bool, config) -> None:
    """The probe must fit the context, and its N tokens must be distinct words."""
    from attn_tracer.analysis.heads import word_ids
    from attn_tracer.model import tokenizer as tokenizers

    tok = tokenizers.of(config)
    if bos and tok.bos_id is None:
        raise UsageError(f"--repeat puts a BOS first, and {tok.describe()} names none "
                         "(config.json's bos_token_id): add --no-bos")
    most = (config.n_ctx - bos) // 2
    if n > most:
        where = "the checkpoint's context" if config.weights else "--n-ctx"
        first = f" after {tok.bos_text()}" if bos else ""
        other = f" (with --no-bos: {config.n_ctx // 2})" if bos else ""
        raise UsageError(f"--repeat {n} needs {2 * n + bos} tokens ({n}, then the same {n}"
                         f"{first}); {where} holds {config.n_ctx}: at most --repeat {most}"
                         f"{other}")
    words = len(word_ids(tok))
    if n > words:
        has = "GPT-2 has" if tok.who == "GPT-2" else "the tokenizer has"
        raise UsageError(f"--repeat {n}: the probe draws distinct word tokens, and {has} "
                         f"{words:,}; at most --repeat {words}")


SEED_UNUSED = ("--seed draws random weights (and the --repeat tokens); with --weights and a "
               "text it changes nothing")


def ignored(r: Any, h: HeadsOptions) -> list[str]:
    """`attn heads`' own options, and the input options --repeat makes moot, unused here."""
    i = SharedOptions.of(r).input
    out = []
    if h.repeat is not None:
        for flag, given in (("--max-length", i.max_length is not None),
                            ("--allow-special", i.allow_special),
                            ("--padding", i.padding != "right")):
            if given:
                out.append(f"{flag} shapes a text; --repeat's input is one row of "
                           f"{2 * h.repeat} tokens, so it changes nothing")
    if h.thumbnails and not h.json:
        out.append("--thumbnails adds each head's thumbnail to --json; the view always "
                   "draws them")
    return out


def execute(r: Any, h: HeadsOptions, notice: Callable[[str], None],
            console: Callable) -> None:
    from attn_tracer.commands import output
    from attn_tracer.render import heads as render_heads

    views = output.Views(console(), "attn heads", h.svg, h.html, h.width, on_screen=not h.json)
    said: list[str] = []
    result = compute(r, h, said.append, views.screen_width, render_heads.colored(views.target),
                     saved_width=views.saved_width if views.files and not views.shared()
                     else None)

    def draw(console, for_files: bool) -> None:
        shown = result
        if for_files:  # thumbnails sized for the files' console
            shown = dataclasses.replace(result, thumbnails={
                **result.thumbnails, "view": result.thumbnails["saved"]})
        render_heads.render(shown, console)

    screen, saved = views.render(draw)
    for message in said:
        notice(message)
    out = render_heads.document(result) if h.json else screen.file.getvalue()
    output.emit(out, views.writers(saved))


def compute(r: Any, h: HeadsOptions, notice: Callable[[str], None], width: int = 80,
            color: bool = True, saved_width: int | None = None) -> HeadsResult:
    """Everything that can fail for a reason of the user's, then the run and its reductions.

    `r`: the shared options (SharedOptions, or anything with their fields). `width` and
    `color`: the console the view will be drawn on, which sizes the thumbnails;
    `saved_width`: the --svg/--html files' console (in colour), when it is another.
    """
    from attn_tracer.analysis.heads import HeadScorer, repeat_probe, targets
    from attn_tracer.model import tokenizer as tokenizers
    from attn_tracer.model.pipeline import Prepared, make_batch
    from attn_tracer.model.trace import Selection
    from attn_tracer.render.heads import view_box

    options = SharedOptions.of(r)
    bos = h.with_bos

    def probe(config) -> Prepared:
        check_repeat(h.repeat, bos, config)
        tok = tokenizers.of(config)
        ids = repeat_probe(h.repeat, options.model.seed, bos, tok)
        toks = [tok.added(i) if bos and p == 0 else tok.token(i) for p, i in enumerate(ids)]
        text = b"".join(t.bytes for t in toks).decode("utf-8", "replace")
        return Prepared(make_batch([toks], [text], "right", pad_id=tok.pad_id), None)

    session = open_session(options, notice, check=lambda: validate(options, h),
                           ignored=ignored(options, h), read_input=h.repeat is None,
                           batch=probe if h.repeat is not None else None, bos=bos,
                           seed_unused=None if h.repeat is not None else SEED_UNUSED)
    config, batch = session.config, session.prepared.batch
    rows, length = batch.ids.shape
    boxes = {}
    if not h.json or h.svg is not None or h.html is not None:
        boxes["view"] = view_box(width, config.heads, color)
    if saved_width is not None:
        boxes["saved"] = view_box(saved_width, config.heads, True)
    if h.json and h.thumbnails:
        boxes["json"] = JSON_BOX
    # The run keeps no tensor; the scores add index pairs (at worst every pair of a text made
    # of one repeated token) and the thumbnails' block matrices.
    needed = memory.estimate(config, options.engine.dtype, rows, length, length, 0, 0,
                             "patterns", False)
    needed += rows * length * length * (1 + 3 * 16)
    engine = session.start(needed)
    scorer = HeadScorer(targets(batch.ids, batch.valid, config.mask == "causal", h.repeat),
                        engine, config.layers, config.heads, boxes)
    hooks = {f"blocks.{layer}.attn.pattern": scorer.hook(layer) for layer in range(config.layers)}
    trace = session.forward(Selection((), (), "patterns"), hooks)
    session.notice_cuts()
    return HeadsResult(trace, scorer.scores(), scorer.thumbnail_sets(), h, options.model.seed)
