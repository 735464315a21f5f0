"""`attn trace`: from the command line's request to the outputs, checking everything first.

Every option is validated and every output target checked before the model runs, and the
model runs to the end before the first byte reaches stdout: a failed run prints nothing there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from attn_tracer.errors import UsageError
from attn_tracer.model import memory
from attn_tracer.model.config import Config
from attn_tracer.model.tokens import VOCAB

VALUES_LIMIT = 16  # --values prints every number: beyond this, nobody reads them
SAVED_WIDTH = 120  # columns of --svg/--html when neither a terminal nor COLUMNS says
# The attention width heads·d_head may be wider: the notes' worked example concatenates 8 heads
# of 3 into 24 columns, and wider matrices wrap into blocks of columns.
VALUES_WIDTH = 32


@dataclass
class Request:
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
    weights: str | None = None
    layer: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    batch_index: list[int] | None = None
    stages: bool = False
    query: str | None = None
    keys: str | None = None
    numbers: bool = False
    width: int | None = None
    values: bool = False
    cost: bool = False
    circuits: bool = False
    predict: bool = False
    top_k: int = 10
    temperature: float = 1.0
    json: bool = False
    json_lines: bool = False
    precision: int | None = None
    save: Path | None = None
    steps: list[str] = field(default_factory=list)
    svg: Path | None = None
    html: Path | None = None
    plot: Path | None = None  # --plot: a matplotlib figure (render/plot.py)
    plot_theme: str = "light"
    force: bool = False
    device: str = "auto"
    engine: str = "auto"
    dtype: str = "float32"
    max_memory: str | None = None


def read_inputs(r: Request, notice: Callable[[str], None]) -> tuple[list[str], list[str]]:
    from attn_tracer.text import read_file, read_text

    sources = sum([bool(r.texts), r.file is not None, r.lines is not None])
    if sources > 1:
        raise UsageError("give the text one way: TEXT arguments, --file, or --lines")
    if r.lines is not None:
        # Kept: the split below treats a final line ending as the end of the last line.
        raw = read_file(r.lines, "--lines file", keep_newline=True)
        # One text per "\n" (a trailing \r of Windows files dropped): str.splitlines would
        # also split inside a text at U+2028, form feeds and other separators.
        rows = [line.removesuffix("\r") for line in raw.split("\n")]
        if rows and rows[-1] == "":
            rows.pop()
        texts = [t for t in rows if t.strip()]
        if not texts:
            raise UsageError(f"--lines {r.lines} has no text: every line is empty")
        if len(texts) < len(rows):
            skipped = [str(i + 1) for i, t in enumerate(rows) if not t.strip()]
            notice(f"skipped {len(skipped)} empty line{'s' if len(skipped) > 1 else ''} of "
                   f"{r.lines} (line {', '.join(skipped[:10])}{'…' if len(skipped) > 10 else ''})")
    elif r.file is not None:
        texts = [read_text(None, r.file, r.keep_newline)]
    elif r.texts:
        if r.texts.count("-") > 1:
            raise UsageError("- (standard input) can be given only once")
        texts = [read_text(t, None, r.keep_newline) for t in r.texts]
    else:
        texts = [read_text(None, None)]
    for i, t in enumerate(texts):
        if not t.strip():
            where = f"text {i}" if len(texts) > 1 else "the text"
            raise UsageError(f"{where} is empty or only whitespace: there is nothing to attend to")
    if r.cross and r.cross_file is not None:
        raise UsageError("give the cross text either with --cross or with --cross-file, not both")
    from attn_tracer.text import check_argument

    cross = [check_argument(t, "the --cross text") for t in r.cross]
    if r.cross_file is not None:
        cross = [read_file(r.cross_file, "--cross-file", r.keep_newline)]
    for t in cross:
        if not t.strip():
            raise UsageError("--cross text is empty: cross-attention needs keys to attend to")
    return texts, cross


def build_config(r: Request, notice: Callable[[str], None] = lambda message: None,
                 max_bytes: int | None = None):
    """The Config, and the checkpoint's parameters when --weights is given (refused from its
    header, before a tensor is read, if they would need more than `max_bytes`)."""
    from attn_tracer.model.weights import Weights

    arch = r.arch
    if arch is not None and arch not in ("attn", "gpt2"):
        raise UsageError(f"--arch must be attn or gpt2; got {arch!r}")
    if r.weights is not None:
        if arch == "attn":
            raise UsageError("--weights loads a GPT-2, which needs --arch gpt2 (or no --arch)")
        for flag, value in (("--d-model", r.d_model), ("--layers", r.layers),
                            ("--n-ctx", r.n_ctx)):
            if value is not None:
                raise UsageError(f"{flag} conflicts with --weights: the checkpoint sets the sizes")
        if r.pos not in (None, "learned"):
            raise UsageError("GPT-2 weights come with learned positions; drop --pos")
        if not r.bias:
            raise UsageError("--no-bias conflicts with --weights: GPT-2 has biases")
        from attn_tracer.model.checkpoint import load_checkpoint

        ck = load_checkpoint(r.weights, r.heads, max_bytes)
        if ck.head_untied_against_config:
            notice(f"{r.weights}: config.json ties the output head to wte, but lm_head.weight "
                   "differs from it; the logits use lm_head.weight, as transformers does")
        if ck.heads_guessed:
            notice(f"{r.weights} has no config.json: assuming GPT-2's 64-dimensional heads, "
                   f"{ck.heads} head{'s' if ck.heads > 1 else ''}; say otherwise with --heads")
        if r.heads is not None and r.heads != ck.heads:
            raise UsageError(f"--heads {r.heads} conflicts with the checkpoint's {ck.heads} heads")
        if r.d_head is not None and r.d_head != ck.d_head:
            raise UsageError(f"--d-head {r.d_head} conflicts with the checkpoint's "
                             f"{ck.d_head}-dimensional heads")
        config = Config(d_model=ck.d_model, heads=ck.heads, layers=ck.layers, n_ctx=ck.n_ctx,
                        pos="learned", mask=r.mask, scale=r.scale, bias=True, seed=r.seed,
                        arch="gpt2", vocab=ck.vocab, ln_eps=ck.ln_eps, weights=r.weights,
                        d_mlp=ck.d_mlp, d_head=ck.d_head)
        return config, Weights(config, dict(ck.params), trained=True)
    arch = arch or "attn"
    config = Config(
        d_model=768 if r.d_model is None else r.d_model,
        heads=12 if r.heads is None else r.heads,
        d_head=r.d_head,
        layers=2 if r.layers is None else r.layers,
        n_ctx=1024 if r.n_ctx is None else r.n_ctx,
        pos=r.pos or ("learned" if arch == "gpt2" else "sinusoidal"),
        mask=r.mask, scale=r.scale, bias=r.bias, seed=r.seed, arch=arch,
    )
    # Parameters alone, before any allocation: refuse what cannot fit from the estimate.
    return config, None


def parse_selection(values: list[str], count: int, flag: str,
                    default: list[int]) -> tuple[int, ...]:
    if not values:
        return tuple(default)
    chosen: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip().lower()
            if part == "all":
                chosen.extend(range(count))
                continue
            try:
                n = int(part)
            except ValueError:
                raise UsageError(f"{flag} takes numbers or all; got {value!r}") from None
            if not 0 <= n < count:
                raise UsageError(f"{flag} {n} is out of range: there are {count} "
                                 f"({flag.lstrip('-')}s 0 to {count - 1})")
            chosen.append(n)
    return tuple(sorted(set(chosen)))


def validate(r: Request) -> None:
    if r.padding not in ("right", "left"):
        raise UsageError(f"--padding must be right or left; got {r.padding!r}")
    if r.max_length is not None and r.max_length < 1:
        raise UsageError(f"--max-length must be at least 1; got {r.max_length}")
    if r.pad_to is not None and r.pad_to < 1:
        raise UsageError(f"--pad-to must be at least 1; got {r.pad_to}")
    if not 1 <= r.top_k <= VOCAB:
        raise UsageError(
            f"--top-k must be between 1 and the vocabulary size {VOCAB}; got {r.top_k}")
    if not (math.isfinite(r.temperature) and r.temperature > 0):
        raise UsageError(f"--temperature must be a positive number (it divides the logits); "
                         f"got {r.temperature:g}")
    from attn_tracer.model.engine import check_choices, check_torch

    check_torch(r.engine, check_choices(r.engine, r.device, r.dtype))
    if r.width is not None and not 40 <= r.width <= 1000:
        raise UsageError(f"--width must be between 40 and 1000 columns; got {r.width}")
    if r.precision is not None and not 0 <= r.precision <= 12:
        raise UsageError(f"--precision must be between 0 and 12 decimals; got {r.precision}")
    if r.json and r.json_lines:
        raise UsageError("--json and --json-lines are two forms of the same output; choose one")
    if r.values and (r.json or r.json_lines):
        flag = "--json" if r.json else "--json-lines"
        raise UsageError(f"--values prints numbers in the terminal view; with {flag} use --save")
    if r.arch == "gpt2" and (r.cross or r.cross_file):
        raise UsageError("--cross needs --arch attn: GPT-2 is decoder-only, it has no "
                         "cross-attention")
    if r.weights is not None and (r.cross or r.cross_file):
        raise UsageError("--cross conflicts with --weights: GPT-2 has no cross-attention")
    from attn_tracer.commands.save import TENSOR_SUFFIXES, check_target, parse_steps

    parse_steps(r.steps)
    if r.save is not None:
        check_target(r.save, r.force, "--save", TENSOR_SUFFIXES)
    if r.svg is not None:
        check_target(r.svg, r.force, "--svg", (".svg",))
    if r.html is not None:
        check_target(r.html, r.force, "--html", (".html", ".htm"))
    check_plot(r.plot, r.plot_theme, r.force)
    files = [p for p in (r.save, r.svg, r.html, r.plot) if p is not None]
    if len({p.resolve() for p in files}) < len(files):
        raise UsageError("--save, --svg, --html and --plot must name different files")


def check_plot(path: Path | None, theme: str, force: bool) -> None:
    """--plot's target and matplotlib itself, before the run (as every file target)."""
    from attn_tracer.commands.save import check_target
    from attn_tracer.render import plot

    if path is not None:
        check_target(path, force, "--plot", plot.SUFFIXES)
    plot.check(path, theme)


def write_plot(path: Path, figure: Callable[[], object]) -> None:
    """Draw the figure (`figure()`, a matplotlib Figure) and write it atomically to `path`."""
    from attn_tracer.commands.save import write_atomic
    from attn_tracer.render import plot

    write_atomic(path, plot.to_bytes(figure(), path.suffix))


def parse_range(text: str, count: int, flag: str) -> range:
    """`P`, `A:B` (both ends included), `A:` or `:B` → the positions, checked against `count`."""
    head, colon, tail = text.strip().partition(":")
    try:
        start = int(head) if head.strip() else 0
        stop = (int(tail) if tail.strip() else count - 1) if colon else start
    except ValueError:
        raise UsageError(f"{flag} takes a position P or a range A:B; got {text!r}") from None
    if not (0 <= start <= stop < count):
        raise UsageError(f"{flag} {text} is out of range: positions go from 0 to {count - 1}"
                         + (" (A:B needs A ≤ B)" if colon and 0 <= stop < start else ""))
    return range(start, stop + 1)


def view_ranges(r: Request, length: int, k_len: int) -> tuple[range | None, range | None]:
    """The query rows and key columns the heatmaps draw (--query, --keys)."""
    queries = parse_range(r.query, length, "--query") if r.query is not None else None
    keys = parse_range(r.keys, k_len, "--keys") if r.keys is not None else None
    return queries, keys


def ignored_options(r: Request) -> list[str]:
    """Options given that this run will not use: said, so that nothing is silently dropped."""
    out = []
    if not r.predict and (r.top_k != 10 or r.temperature != 1.0):
        out.append("--top-k and --temperature shape --predict's table; add --predict to see it")
    if r.numbers and (r.query is None or ":" in r.query):
        out.append("--numbers writes the weights beside the text shaded by one --query P")
    if r.weights is not None and r.seed != 0:
        out.append("--seed draws random weights; with --weights it changes nothing")
    reads_a_file = r.file is not None or r.cross_file is not None or "-" in r.texts
    if r.keep_newline and not reads_a_file:
        out.append("--keep-newline keeps the final line ending of --file, --cross-file or "
                   "standard input; TEXT arguments are always exact, --lines splits at it")
    if r.steps and r.save is None:
        out.append("--steps chooses what --save writes; without --save it changes nothing")
    return out


def execute(r: Request, notice: Callable[[str], None], console: Callable) -> None:
    # Notices wait until the run has worked: a failure is one line on stderr, nothing else.
    said: list[str] = []
    trace, weights = compute(r, said.append)
    for message in said:
        notice(message)
    from attn_tracer.commands.save import staged

    with staged():  # --save, --svg and --html are kept only if stdout is written too
        write_outputs(r, trace, weights, console)


def estimate(config: Config, r: Request, batch: int, length: int, k_len: int,
             selection, cross: bool) -> int:
    """memory.estimate of this run (what it keeps: `captures`); --cost asks it again for a
    text twice as long."""
    counted = captures(r, selection.layers)[2]
    return memory.estimate(config, r.dtype, batch, length, k_len, len(selection.layers),
                           len(selection.heads), counted, cross, predict=r.predict)


def compute(r: Request, notice: Callable[[str], None]):
    """Everything that can fail for a reason of the user's: validation, inputs, the run."""
    validate(r)
    for ignored in ignored_options(r):
        notice(ignored)
    texts, cross = read_inputs(r, notice)
    limit = memory_limit(r)
    config, weights = load_model(r, notice, limit)

    if r.values and config.d_model > VALUES_LIMIT:
        raise UsageError(f"--values prints every number: use it with --d-model ≤ {VALUES_LIMIT} "
                         f"(e.g. --d-model 4 --heads 2); this run has d_model {config.d_model}")
    if r.values and config.d_attn > VALUES_WIDTH:
        raise UsageError(f"--values prints every number: use it with heads·d_head ≤ "
                         f"{VALUES_WIDTH}; this run has {config.heads}·{config.d_head} = "
                         f"{config.d_attn} (lower --heads or --d-head)")
    layers = parse_selection(r.layer, config.layers, "--layer", list(range(config.layers))
                             if r.json or r.json_lines or r.save else [0])
    heads = parse_selection(r.head, config.heads, "--head", list(range(config.heads)))
    capture, extra, _ = captures(r, layers)
    from attn_tracer.model.trace import Selection

    selection = Selection(layers, heads, capture, extra)
    from attn_tracer.model.pipeline import prepare

    prepared = prepare(texts, config, cross_texts=cross or None, padding=r.padding,
                       max_length=r.max_length, allow_special=r.allow_special, pad_to=r.pad_to)
    length = prepared.batch.ids.shape[1]
    k_len = prepared.cross.ids.shape[1] if prepared.cross else length
    if r.values and max(length, k_len) > VALUES_LIMIT:
        raise UsageError(f"--values prints every number: use it with at most {VALUES_LIMIT} "
                         "tokens in each text (cut with --max-length)")
    view_ranges(r, length, k_len)  # refused now, before the run, not after
    if r.batch_index is not None:
        for b in r.batch_index:
            if not 0 <= b < len(texts):
                raise UsageError(f"--batch-index {b} is out of range: the batch has {len(texts)} "
                                 f"text{'s' if len(texts) > 1 else ''} (0 to {len(texts) - 1})")
    # The whole run, weights included, before a single weight is drawn: absurd sizes end here.
    needed = estimate(config, r, len(texts), length, k_len, selection, bool(cross))
    engine = checked_engine(r, needed, limit, length)
    trace, weights = forward(r, config, weights, engine, prepared, selection)
    notice_cuts(r, prepared, notice, len(cross))
    return trace, weights


# The steps of a run that every command running the model shares (trace, heads, attribute).

def memory_limit(r: Request) -> int:
    return memory.parse_size(r.max_memory) if r.max_memory is not None else memory.default_limit()


def load_model(r: Request, notice: Callable[[str], None], limit: int | None = None):
    """build_config with a progress display while a checkpoint loads (refused from its header
    if it would need more than `limit` bytes)."""
    with progress_display("loading weights", show=r.weights is not None):
        return build_config(r, notice, limit)


def checked_engine(r: Request, needed: int, limit: int, length: int):
    """The engine for this run, once the estimate `needed` fits the host (and a GPU) limit."""
    from attn_tracer.model.engine import free_memory, select_engine

    memory.check(needed, limit)
    engine = select_engine(r.engine, r.device, r.dtype, length)
    if r.max_memory is None and (gpu := free_memory(engine)) is not None:
        memory.check(needed, gpu)  # on a GPU the tensors live in its memory
    return engine


def forward(r: Request, config, weights, engine, prepared, selection, hooks=None):
    """The run itself, behind a progress bar; random weights are drawn only now."""
    from attn_tracer.model.pipeline import run

    texts = [inp.text for inp in prepared.batch.inputs]
    cross = [inp.text for inp in prepared.cross.inputs] if prepared.cross else None
    length = prepared.batch.ids.shape[1]
    with progress_display(f"{length} tokens through {config.layers} layers") as advance:
        weights = ensure_weights(config, weights, cross=bool(cross))
        trace, _ = run(texts, config, engine, weights, selection, cross_texts=cross,
                       padding=r.padding, max_length=r.max_length,
                       allow_special=r.allow_special, predict_top_k=r.top_k if r.predict
                       else None, temperature=r.temperature,
                       progress=advance, prepared=prepared, hooks=hooks)
    return trace, weights


def ensure_weights(config: Config, weights, cross: bool = False):
    """The checkpoint's weights, or random ones drawn now (after every check has passed)."""
    if weights is not None:
        return weights
    from attn_tracer.model.weights import random_weights

    return random_weights(config, cross=cross)


def notice_cuts(r: Request, prepared, notice: Callable[[str], None], cross_given: int = 0
                ) -> None:
    """Say which texts --max-length cut (`cross_given`: how many --cross texts were given)."""
    if cut := prepared.cut:
        notice(f"--max-length {r.max_length} cut text{'s' if len(cut) > 1 else ''} "
               f"{', '.join(map(str, cut))}")
    if prepared.cross_cut:
        rows = prepared.cross_cut
        which = "the --cross text" if cross_given == 1 else (
            f"--cross text{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}")
        notice(f"--max-length {r.max_length} cut {which}")


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


def captures(r: Request, layers: tuple[int, ...]) -> tuple[str, tuple[str, ...], str]:
    """What the run keeps: (Selection.capture, Selection.extra, the capture the memory
    estimate counts). --save keeps every step, or with --steps only those, beside the view's."""
    from attn_tracer.commands.save import captured_steps, estimate_capture, parse_steps

    shown = "stages" if r.stages else "patterns"
    steps = parse_steps(r.steps) if r.save is not None else None
    if r.values or (r.save is not None and steps is None):
        return "all", (), "all"
    if steps is None:
        return shown, (), shown
    return shown, captured_steps(steps, layers), estimate_capture(steps, shown)


def write_outputs(r: Request, trace, weights, console: Callable) -> None:
    from attn_tracer.commands import save
    from attn_tracer.render import json_doc as render_json

    if r.save is not None:
        save.save_tensors(trace, r.save, render_json.config_json(trace), save.parse_steps(r.steps))
    if r.plot is not None:
        write_plot(r.plot, lambda: plot_figure(r, trace))
    view = None
    stream = r.json or r.json_lines
    if not stream or r.svg or r.html:
        view = render_view(r, trace, weights, console())
        if r.svg is not None:
            from attn_tracer.render.terminal import export_svg

            save.write_atomic(r.svg, export_svg(view, "attn trace").encode())
        if r.html is not None:
            save.write_atomic(r.html, view.export_html(clear=False).encode())
    if r.json:
        render_json.write(trace, sys.stdout.buffer, r.precision, r.stages)
    elif r.json_lines:
        render_json.write_lines(trace, sys.stdout.buffer, r.precision, r.stages)
    else:
        sys.stdout.write(view.file.getvalue())
        sys.stdout.flush()


def plot_figure(r: Request, trace):
    """--plot of attn trace: the heads the view draws (its layers, --head), of the first
    --batch-index text (default text 0), self-attention then cross-attention."""
    from attn_tracer.render import plot

    if not r.layer and len(trace.selection.layers) > 1:
        trace = dataclasses.replace(
            trace, selection=dataclasses.replace(trace.selection, layers=(0,)))
    b = r.batch_index[0] if r.batch_index else 0
    maps = plot.trace_data(trace, "attn", b)
    if trace.cross:
        for m in (cross := plot.trace_data(trace, "cross_attn", b)):
            m.title += " (cross)"
        maps += cross
    layers = ", ".join(str(layer) for layer in trace.selection.layers)
    text = plot.title_text(trace.inputs[b].text)
    which = f"text {b} " if len(trace.inputs) > 1 else ""
    cross = f"; keys of cross-attention: {plot.title_text(trace.cross[b].text)}" if trace.cross \
        else ""
    title = [f"attn trace · {plot.model_words(trace.config)}",
             f"{which}{text}{cross}",
             f"attention patterns of layer{'s' if len(trace.selection.layers) > 1 else ''} "
             f"{layers}: softmax(Q·Kᵀ/√d_head + mask), queries down, keys across"]
    return plot.patterns_figure(maps, title, r.plot_theme)


def render_view(r: Request, trace, weights, target):
    """Render into memory with the target console's settings; printed only once it is whole."""
    from attn_tracer.render import terminal as render_terminal

    width = r.width or (target.width if target.is_terminal or "COLUMNS" in os.environ
                        or not (r.svg or r.html) else SAVED_WIDTH)
    buffer = buffer_like(target, record=r.svg is not None or r.html is not None, width=width)
    peaks = None
    if r.cost:  # the estimate that --max-memory checks, for this text and one twice as long
        length = trace.inputs[0].length + trace.inputs[0].padding
        k_len = trace.cross[0].length + trace.cross[0].padding if trace.cross else length
        cross = trace.cross is not None
        peaks = (estimate(trace.config, r, len(trace.inputs), length, k_len, trace.selection,
                          cross),
                 estimate(trace.config, r, len(trace.inputs), 2 * length,
                          k_len if cross else 2 * length, trace.selection, cross))
    if not r.layer and len(trace.selection.layers) > 1:
        # --save and --json keep every layer by default; the view still draws layer 0 alone.
        trace = dataclasses.replace(
            trace, selection=dataclasses.replace(trace.selection, layers=(0,)))
    length = len(trace.inputs[0].valid)
    k_len = len(trace.cross[0].valid) if trace.cross else length
    queries, keys = view_ranges(r, length, k_len)
    render_terminal.render(trace, buffer, show_stages=r.stages, weights=weights.params,
                           show_values=r.values, batch_rows=r.batch_index, queries=queries,
                           keys=keys, numbers=r.numbers, show_cost=r.cost, peaks=peaks,
                           show_circuits=r.circuits)
    return buffer


def buffer_like(target, record: bool = False, width: int | None = None):
    """A Console writing to memory with `target`'s width (or `width`) and colors: a view is
    rendered whole there, and printed only once nothing can fail any more."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=width or target.width,
                   color_system=target.color_system, force_terminal=target.is_terminal,
                   no_color=target.no_color,
                   legacy_windows=False, highlight=False, record=record)
