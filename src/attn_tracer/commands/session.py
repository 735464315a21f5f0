"""One run session: the sequence every command that runs the model shares, written once.

    validate → read inputs → memory limit → load the model (refused from its header)
    → prepare the batch → [the command's own checks and estimate] → engine → weights → forward

`open_session` does everything up to the batch; a command then checks what it alone knows
(a target token, a head to ablate, the rows it draws), says what its run keeps with
`session.start(needed)`, which picks the engine once the estimate fits, and runs
`session.forward(selection, hooks)` as often as its analysis needs (an ablation, a patching
grid). Random weights are drawn at the first forward, after every check has passed: a command
built on a session cannot read a tensor, draw a weight or write a byte before its inputs,
its memory and its outputs are known to be fine.

The options come in typed groups, one per kind of shared option (options.py defines them as
command-line options, once): `InputOptions`, `ModelOptions`, `EngineOptions`,
`PredictOptions`. `SharedOptions.of(x)` gathers them from anything carrying their fields (the
dict a command receives from `@shared`, or `attn trace`'s Request).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from attn_tracer.errors import UsageError
from attn_tracer.model import memory
from attn_tracer.model.tokens import VOCAB

Notice = Callable[[str], None]


@dataclass
class InputOptions:
    """Where the texts come from and how they become a batch."""

    texts: list[str] = field(default_factory=list)
    file: Path | None = None
    lines: Path | None = None
    cross: list[str] = field(default_factory=list)
    cross_file: Path | None = None
    allow_special: bool = False
    keep_newline: bool = False  # keep the final line ending of a file or standard input
    padding: str = "right"
    max_length: int | None = None
    pad_to: int | None = None
    ids: list[str] = field(default_factory=list)  # --ids: token ids instead of texts


@dataclass
class ModelOptions:
    """The stack: its sizes and switches for random weights, or a checkpoint."""

    d_model: int | None = None
    heads: int | None = None
    d_head: int | None = None
    layers: int | None = None
    n_ctx: int | None = None
    pos: str | None = None
    mask: str = "causal"
    scale: bool = True
    bias: bool = True
    seed: int = 0
    arch: str | None = None
    # Modern attention (model/arch/, commands/model_options.py): None is the family's default.
    kv_heads: int | None = None
    window: int | None = None
    norm: str | None = None
    mlp: str | None = None
    d_mlp: int | None = None
    rotary_dims: int | None = None
    rope_theta: float | None = None
    rotary_style: str | None = None
    weights: str | None = None


@dataclass
class EngineOptions:
    """Where it runs, in which float type, within how much memory."""

    device: str = "auto"
    engine: str = "auto"
    dtype: str = "float32"
    max_memory: str | None = None


@dataclass
class PredictOptions:
    """The next-token distribution (`attn trace --predict`, `attn explore`)."""

    predict: bool = False
    top_k: int = 10
    temperature: float = 1.0


GROUPS = {"input": InputOptions, "model": ModelOptions, "engine": EngineOptions,
          "predict": PredictOptions}


@dataclass
class SharedOptions:
    input: InputOptions = field(default_factory=InputOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)
    predict: PredictOptions = field(default_factory=PredictOptions)

    @classmethod
    def of(cls, source: Any) -> SharedOptions:
        """The groups, from a mapping or an object with their fields (absent ones default)."""
        if isinstance(source, SharedOptions):
            return source
        get = source.get if isinstance(source, Mapping) else (
            lambda name, default: getattr(source, name, default))
        missing = object()
        groups = {}
        for key, group in GROUPS.items():
            values = {f.name: get(f.name, missing) for f in fields(group)}
            groups[key] = group(**{k: v for k, v in values.items() if v is not missing})
        return cls(**groups)


def validate(options: SharedOptions) -> None:
    """The shared options on their own, before anything is read."""
    i, p, e = options.input, options.predict, options.engine
    if i.padding not in ("right", "left"):
        raise UsageError(f"--padding must be right or left; got {i.padding!r}")
    if i.max_length is not None and i.max_length < 1:
        raise UsageError(f"--max-length must be at least 1; got {i.max_length}")
    if i.pad_to is not None and i.pad_to < 1:
        raise UsageError(f"--pad-to must be at least 1; got {i.pad_to}")
    if not 1 <= p.top_k <= VOCAB:
        raise UsageError(
            f"--top-k must be between 1 and the vocabulary size {VOCAB}; got {p.top_k}")
    if not (math.isfinite(p.temperature) and p.temperature > 0):
        raise UsageError(f"--temperature must be a positive number (it divides the logits); "
                         f"got {p.temperature:g}")
    from attn_tracer.model.engine import check_choices, check_torch

    check_torch(e.engine, check_choices(e.engine, e.device, e.dtype))
    from attn_tracer.commands.model_options import validate_model

    validate_model(i, options.model)


def validate_cross(options: SharedOptions) -> None:
    """Cross-attention exists only in the attention-only stack, without rotary positions."""
    from attn_tracer.commands.model_options import validate_cross as check

    check(options.input, options.model)


SEED_UNUSED = "--seed draws random weights; with --weights it changes nothing"


def unused_options(options: SharedOptions, seed_unused: str | None = SEED_UNUSED) -> list[str]:
    """Shared options given that this run will not use: said, so nothing is silently dropped.

    `seed_unused`: what to say of --seed with --weights (None: this run uses it all the same).
    """
    i, m, p = options.input, options.model, options.predict
    out = []
    if not p.predict and (p.top_k != 10 or p.temperature != 1.0):
        out.append("--top-k and --temperature shape --predict's table; add --predict to see it")
    if m.weights is not None and m.seed != 0 and seed_unused is not None:
        out.append(seed_unused)
    reads_a_file = i.file is not None or i.cross_file is not None or "-" in i.texts
    if i.keep_newline and not reads_a_file:
        out.append("--keep-newline keeps the final line ending of --file, --cross-file or "
                   "standard input; TEXT arguments are always exact, --lines splits at it")
    return out


@dataclass
class Session:
    """An opened run: the inputs read, the model's config (and a checkpoint's weights, read
    within the memory limit), the batch; the engine once `start` knows the run fits."""

    options: SharedOptions
    notice: Notice
    texts: list[str]
    cross: list[str]
    limit: int  # bytes a run may take (--max-memory, or half the machine's RAM)
    config: Any  # model.config.Config
    weights: Any  # model.weights.Weights: a checkpoint's now, random ones from the 1st forward
    prepared: Any  # model.pipeline.Prepared
    engine: Any = None  # model.engine.Engine, from `start`

    @property
    def rows(self) -> int:
        return self.prepared.batch.ids.shape[0]

    @property
    def length(self) -> int:
        return self.prepared.batch.ids.shape[1]

    @property
    def k_len(self) -> int:
        """The keys' length: the cross texts' with --cross, else the batch's."""
        cross = self.prepared.cross
        return cross.ids.shape[1] if cross else self.length

    def start(self, needed: int):
        """The engine for this run, once the estimate `needed` (bytes) fits the limit."""
        self.engine = checked_engine(self.options.engine, needed, self.limit, self.length)
        return self.engine

    def draw_weights(self):
        """The checkpoint's weights, or random ones drawn now (after every check has passed)."""
        self.weights = ensure_weights(self.config, self.weights, cross=bool(self.cross))
        return self.weights

    def forward(self, selection, hooks=None, *, prepared=None, predict: bool | None = None,
                description: str | None = None):
        """One forward through the stack behind a progress bar; returns the Trace.

        `prepared`: another batch of the same model (a corrupted prompt, a longer text);
        `predict`: override --predict (an analysis that reads the logits itself says False).
        """
        from attn_tracer.model.pipeline import run

        if self.engine is None:
            raise RuntimeError("Session.start(needed) picks the engine before a forward")
        prepared = prepared or self.prepared
        p = self.options.predict
        predict = p.predict if predict is None else predict
        texts = [inp.text for inp in prepared.batch.inputs]
        cross = [inp.text for inp in prepared.cross.inputs] if prepared.cross else None
        length = prepared.batch.ids.shape[1]
        label = description or f"{length} tokens through {self.config.layers} layers"
        with progress_display(label) as advance:
            weights = self.draw_weights()
            trace, _ = run(texts, self.config, self.engine, weights, selection,
                           cross_texts=cross, padding=self.options.input.padding,
                           max_length=self.options.input.max_length,
                           allow_special=self.options.input.allow_special,
                           predict_top_k=p.top_k if predict else None,
                           temperature=p.temperature, progress=advance, prepared=prepared,
                           hooks=hooks)
        return trace

    def notice_cuts(self) -> None:
        """Say which texts --max-length cut."""
        notice_cuts(self.options.input.max_length, self.prepared, self.notice, len(self.cross))


def open_session(options: SharedOptions, notice: Notice, *,
                 check: Callable[[], None] | None = None, ignored: Iterable[str] = (),
                 read_input: bool = True, batch: Callable[[Any], Any] | None = None,
                 bos: bool = False, cross: bool = False, seed_unused: str | None = SEED_UNUSED
                 ) -> Session:
    """Validate, read the inputs, load the model within the memory limit, prepare the batch.

    `check`: the command's own option checks, run after the shared ones and before any input
    is read or any file opened; `ignored`: the notices of its own options that this run will
    not use. `read_input=False`: the command makes its own batch (`batch`, from the Config:
    the induction probe). `bos`: the tokenizer's BOS before each text (GPT-2's <|endoftext|>).
    `cross`: the command takes --cross (others have no such option). `seed_unused`: see
    `unused_options`.
    """
    validate(options)
    if check is not None:
        check()
    if cross:
        validate_cross(options)
    for message in [*unused_options(options, seed_unused), *ignored]:
        notice(message)
    texts, cross_texts = read_inputs(options.input, notice) if read_input else ([], [])
    limit = memory_limit(options.engine)
    config, weights = load_model(options.model, notice, limit)
    if batch is not None:
        prepared = batch(config)
    else:
        from attn_tracer.model.pipeline import prepare

        i = options.input
        prepared = prepare(texts, config, cross_texts=cross_texts or None, padding=i.padding,
                           max_length=i.max_length, allow_special=i.allow_special,
                           pad_to=i.pad_to, bos=bos, ids=input_ids(i, config))
    return Session(options, notice, texts, cross_texts, limit, config, weights, prepared)


# The steps themselves, each usable alone (tests, benchmarks, a command with a special need).

def read_inputs(i: InputOptions, notice: Notice) -> tuple[list[str], list[str]]:
    """The texts and the cross texts, from TEXT arguments, --file, --lines or standard input."""
    from attn_tracer.text import check_argument, read_file, read_text

    sources = sum([bool(i.texts), i.file is not None, i.lines is not None])
    if sources > 1:
        raise UsageError("give the text one way: TEXT arguments, --file, or --lines")
    if i.ids:  # token ids: read against the model's vocabulary once it is known (input_ids)
        if sources:
            raise UsageError("give the input one way: TEXT arguments, --file, --lines or --ids")
        return list(i.ids), []
    if i.lines is not None:
        # Kept: the split below treats a final line ending as the end of the last line.
        raw = read_file(i.lines, "--lines file", keep_newline=True)
        # One text per "\n" (a trailing \r of Windows files dropped): str.splitlines would
        # also split inside a text at U+2028, form feeds and other separators.
        rows = [line.removesuffix("\r") for line in raw.split("\n")]
        if rows and rows[-1] == "":
            rows.pop()
        texts = [t for t in rows if t.strip()]
        if not texts:
            raise UsageError(f"--lines {i.lines} has no text: every line is empty")
        if len(texts) < len(rows):
            skipped = [str(n + 1) for n, t in enumerate(rows) if not t.strip()]
            notice(f"skipped {len(skipped)} empty line{'s' if len(skipped) > 1 else ''} of "
                   f"{i.lines} (line {', '.join(skipped[:10])}{'…' if len(skipped) > 10 else ''})")
    elif i.file is not None:
        texts = [read_text(None, i.file, i.keep_newline)]
    elif i.texts:
        if list(i.texts).count("-") > 1:
            raise UsageError("- (standard input) can be given only once")
        texts = [read_text(t, None, i.keep_newline) for t in i.texts]
    else:
        texts = [read_text(None, None)]
    for n, t in enumerate(texts):
        if not t.strip():
            where = f"text {n}" if len(texts) > 1 else "the text"
            raise UsageError(f"{where} is empty or only whitespace: there is nothing to attend to")
    if i.cross and i.cross_file is not None:
        raise UsageError("give the cross text either with --cross or with --cross-file, not both")
    cross = [check_argument(t, "the --cross text") for t in i.cross]
    if i.cross_file is not None:
        cross = [read_file(i.cross_file, "--cross-file", i.keep_newline)]
    for t in cross:
        if not t.strip():
            raise UsageError("--cross text is empty: cross-attention needs keys to attend to")
    return texts, cross


def input_ids(i: InputOptions, config) -> list[list[int]] | None:
    """--ids as token ids of the model's vocabulary, or None when the input is text: read by
    the checkpoint's own tokenizer.json, or GPT-2's (a Llama-family checkpoint without a
    tokenizer.json has no tokenizer attn can read)."""
    from attn_tracer.commands.model_options import parse_ids, titled

    if i.ids:
        return parse_ids(i.ids, config.vocab)
    if config.model_type is not None:
        from attn_tracer.model import tokenizer as tokenizers

        if tokenizers.of(config).file is None:
            raise UsageError(f"{config.weights} ({titled(config)}) has no tokenizer.json, and "
                             "its tokenizer is not GPT-2's: give the text as token ids with "
                             "--ids")
    return None


def memory_limit(e: EngineOptions) -> int:
    return memory.parse_size(e.max_memory) if e.max_memory is not None else memory.default_limit()


def load_model(m: ModelOptions, notice: Notice, limit: int | None = None):
    """The Config, and a checkpoint's weights (refused from its header if they would need more
    than `limit` bytes), with a progress display while a checkpoint loads."""
    from attn_tracer.commands.run import build_config

    with progress_display("loading weights", show=m.weights is not None):
        return build_config(m, notice, limit)


def checked_engine(e: EngineOptions, needed: int, limit: int, length: int):
    """The engine for this run, once the estimate `needed` fits the host (and a GPU) limit."""
    from attn_tracer.model.engine import free_memory, select_engine

    memory.check(needed, limit)
    engine = select_engine(e.engine, e.device, e.dtype, length)
    if e.max_memory is None and (gpu := free_memory(engine)) is not None:
        memory.check(needed, gpu)  # on a GPU the tensors live in its memory
    return engine


def ensure_weights(config, weights, cross: bool = False):
    """The checkpoint's weights, or random ones drawn now (after every check has passed)."""
    if weights is not None:
        return weights
    from attn_tracer.model.weights import random_weights

    return random_weights(config, cross=cross)


def notice_cuts(max_length: int | None, prepared, notice: Notice, cross_given: int = 0) -> None:
    """Say which texts --max-length cut (`cross_given`: how many --cross texts were given)."""
    if cut := prepared.cut:
        notice(f"--max-length {max_length} cut text{'s' if len(cut) > 1 else ''} "
               f"{', '.join(map(str, cut))}")
    if prepared.cross_cut:
        rows = prepared.cross_cut
        which = "the --cross text" if cross_given == 1 else (
            f"--cross text{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}")
        notice(f"--max-length {max_length} cut {which}")


@contextlib.contextmanager
def progress_display(description: str, show: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A transient Rich progress bar on stderr, only when stderr is a terminal (never in pipes,
    CI logs or tests). Yields `advance(done, total)`, a no-op when nothing is shown."""
    if not (show and sys.stderr.isatty()):
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
