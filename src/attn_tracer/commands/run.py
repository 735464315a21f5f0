"""`attn trace`: from the command line's request to the outputs, checking everything first.

The run is a session (session.py: options, inputs, the model, memory, the engine, in that
order); this module adds what only `attn trace` has — the layers and heads it shows, what it
keeps (--values, --save --steps), its view and its JSON. The outputs go through output.py: the
model runs to the end before the first byte reaches stdout, and a failed run prints nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from attn_tracer.argv import ascii_int

# The shared steps, importable from here as before the session existed.
from attn_tracer.commands.session import (  # noqa: F401
    EngineOptions,
    InputOptions,
    ModelOptions,
    PredictOptions,
    SharedOptions,
    checked_engine,
    ensure_weights,
    load_model,
    memory_limit,
    open_session,
    progress_display,
    read_inputs,
)
from attn_tracer.errors import UsageError
from attn_tracer.model import memory
from attn_tracer.model.config import Config

VALUES_LIMIT = 16  # --values prints every number: beyond this, nobody reads them
# The attention width heads·d_head may be wider: the notes' worked example concatenates 8 heads
# of 3 into 24 columns, and wider matrices wrap into blocks of columns.
VALUES_WIDTH = 32


@dataclass
class Request(InputOptions, ModelOptions, EngineOptions, PredictOptions):
    """`attn trace`'s request: the shared option groups (session.py), then its own."""

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


def build_config(r: Request, notice: Callable[[str], None] = lambda message: None,
                 max_bytes: int | None = None):
    """The Config, and the checkpoint's parameters when --weights is given (refused from its
    header, before a tensor is read, if they would need more than `max_bytes`)."""
    from attn_tracer.model.arch import family
    from attn_tracer.model.config import ARCHS

    arch = r.arch
    if arch is not None and arch not in ARCHS:
        raise UsageError(f"--arch must be {', '.join(ARCHS[:-1])} or {ARCHS[-1]}; got {arch!r}")
    if r.weights is not None:
        from attn_tracer.commands.model_options import load_weights

        return load_weights(r, notice, max_bytes)
    arch = arch or "attn"
    from attn_tracer.commands.model_options import modern

    config = Config(
        d_model=768 if r.d_model is None else r.d_model,
        heads=12 if r.heads is None else r.heads,
        d_head=r.d_head,
        layers=2 if r.layers is None else r.layers,
        n_ctx=1024 if r.n_ctx is None else r.n_ctx,
        pos=r.pos or family(arch).defaults.get("pos", "sinusoidal"),
        mask=r.mask, scale=r.scale, bias=r.bias and family(arch).defaults.get("bias", True),
        seed=r.seed, arch=arch, **modern(r, family(arch)),
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
                n = ascii_int(part)
            except ValueError:
                raise UsageError(f"{flag} takes numbers or all; got {value!r}") from None
            if not 0 <= n < count:
                raise UsageError(f"{flag} {n} is out of range: there are {count} "
                                 f"({flag.lstrip('-')}s 0 to {count - 1})")
            chosen.append(n)
    return tuple(sorted(set(chosen)))


def validate(r: Request) -> None:
    """`attn trace`'s own options (the session checks the shared ones first)."""
    from attn_tracer.commands import output
    from attn_tracer.commands.save import parse_steps

    output.check_width(r.width)
    if r.precision is not None and not 0 <= r.precision <= 12:
        raise UsageError(f"--precision must be between 0 and 12 decimals; got {r.precision}")
    if r.json and r.json_lines:
        raise UsageError("--json and --json-lines are two forms of the same output; choose one")
    steps = parse_steps(r.steps)
    if r.save is not None:
        from attn_tracer.commands.save import check_recordable

        arch = r.arch or ("gpt2" if r.weights is not None else "attn")
        from attn_tracer.model.arch import family

        check_recordable(steps, arch, r.predict, bool(r.cross or r.cross_file),
                         r.pos or family(arch).defaults["pos"], r.scale)
    output.check_files(file_targets(r), r.force)
    plot_check(r.plot, r.plot_theme)


def file_targets(r: Request) -> dict:
    from attn_tracer.commands.output import VIEW_SUFFIXES
    from attn_tracer.commands.save import TENSOR_SUFFIXES
    from attn_tracer.render.plot import SUFFIXES

    return {"--save": (r.save, TENSOR_SUFFIXES), "--svg": (r.svg, VIEW_SUFFIXES["--svg"]),
            "--html": (r.html, VIEW_SUFFIXES["--html"]), "--plot": (r.plot, SUFFIXES)}


def plot_check(path: Path | None, theme: str) -> None:
    """--plot's theme, and matplotlib itself before the run (its target: output.check_files)."""
    from attn_tracer.render import plot

    plot.check(path, theme)


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
        if not text.strip():
            raise ValueError(text)  # blank is not position 0
        start = ascii_int(head) if head.strip() else 0
        stop = (ascii_int(tail) if tail.strip() else count - 1) if colon else start
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


def draws_view(r: Request) -> bool:
    """Whether this run draws the terminal view: to stdout, or into --svg/--html beside JSON."""
    return not (r.json or r.json_lines) or r.svg is not None or r.html is not None


def ignored_options(r: Request) -> list[str]:
    """`attn trace`'s own options given that this run will not use (the session says the
    shared ones): said, so that nothing is silently dropped (the rule of commands/unused.py)."""
    from attn_tracer.commands import unused

    out = []
    if not draws_view(r):
        out += unused.view_notice("trace", r, "--json" if r.json else "--json-lines",
                                  "add --svg FILE or --html FILE to draw the view too")
    if not (r.json or r.json_lines):
        out += unused.json_notice("trace", r, "--json or --json-lines")
    if r.force and r.save is None and r.svg is None and r.html is None:
        out.append("--force lets --save, --svg and --html overwrite their files; without them "
                   "it changes nothing")
    if draws_view(r) and r.numbers and (r.query is None or ":" in r.query):
        out.append("--numbers writes the weights beside the text shaded by one --query P")
    if r.steps and r.save is None:
        out.append("--steps chooses what --save writes; without --save it changes nothing")
    return out


def execute(r: Request, notice: Callable[[str], None], console: Callable) -> None:
    # Notices wait until the run has worked: a failure is one line on stderr, nothing else.
    said: list[str] = []
    trace, weights = compute(r, said.append)
    for message in said:
        notice(message)
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
    from attn_tracer.model.trace import Selection

    ignored = ignored_options(r)
    if not draws_view(r):  # the view's options are neither used nor checked
        from attn_tracer.commands.unused import without_view

        r = without_view("trace", r)

    def selected(config) -> Selection:
        layers = parse_selection(r.layer, config.layers, "--layer", list(range(config.layers))
                                 if r.json or r.json_lines or r.save else [0])
        heads = parse_selection(r.head, config.heads, "--head", list(range(config.heads)))
        capture, extra, _ = captures(r, layers)
        return Selection(layers, heads, capture, extra)

    session = open_session(
        SharedOptions.of(r), notice, check=lambda: validate(r), cross=True, ignored=ignored,
        estimate=lambda config, rows, length, k_len: estimate(
            config, r, rows, length, k_len, selected(config), bool(r.cross or r.cross_file)))
    config = session.config
    if r.values and config.d_model > VALUES_LIMIT:
        raise UsageError(f"--values prints every number: use it with --d-model ≤ {VALUES_LIMIT} "
                         f"(e.g. --d-model 4 --heads 2); this run has d_model {config.d_model}")
    if r.values and config.d_attn > VALUES_WIDTH:
        raise UsageError(f"--values prints every number: use it with heads·d_head ≤ "
                         f"{VALUES_WIDTH}; this run has {config.heads}·{config.d_head} = "
                         f"{config.d_attn} (lower --heads or --d-head)")
    selection = selected(config)
    length, k_len = session.length, session.k_len
    if r.values and max(length, k_len) > VALUES_LIMIT:
        raise UsageError(f"--values prints every number: use it with at most {VALUES_LIMIT} "
                         "tokens in each text (cut with --max-length)")
    view_ranges(r, length, k_len)  # refused now, before the run, not after
    texts = session.texts
    if r.batch_index is not None:
        for b in r.batch_index:
            if not 0 <= b < len(texts):
                raise UsageError(f"--batch-index {b} is out of range: the batch has {len(texts)} "
                                 f"text{'s' if len(texts) > 1 else ''} (0 to {len(texts) - 1})")
    # The whole run, weights included, before a single weight is drawn: absurd sizes end here.
    session.start(estimate(config, r, len(texts), length, k_len, selection, bool(session.cross)))
    trace = session.forward(selection)
    session.notice_cuts()
    if r.save is not None:
        from attn_tracer.commands.save import parse_steps, unrecorded

        for kind in unrecorded(parse_steps(r.steps), trace.tensors):
            why = (" (no key of these texts needed masking)" if kind.endswith("masked")
                   else "")
            notice(f"--steps {kind}: this run recorded no such step{why}; {r.save} holds the "
                   "other steps")
    return trace, session.weights


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
    from attn_tracer.commands import output, save
    from attn_tracer.render import json_doc as render_json

    views = output.Views(console(), "attn trace", r.svg, r.html, r.width,
                         on_screen=not (r.json or r.json_lines))
    screen, saved = views.render(lambda c, _: render_view(r, trace, weights, c))
    files = []
    if r.save is not None:
        files.append(lambda: save.save_tensors(trace, r.save, render_json.config_json(trace),
                                               save.parse_steps(r.steps)))
    files += views.writers(saved)
    if r.plot is not None:
        files.append(lambda: write_plot(r.plot, lambda: plot_figure(r, trace)))
    if r.json:
        out = lambda stream: render_json.write(trace, stream, r.precision, r.stages)  # noqa: E731
    elif r.json_lines:
        out = lambda stream: render_json.write_lines(  # noqa: E731
            trace, stream, r.precision, r.stages)
    else:
        out = screen.file.getvalue()
    output.emit(out, files)


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


def render_view(r: Request, trace, weights, console) -> None:
    """Draw the trace's view onto `console` (a buffer: printed only once it is whole)."""
    from attn_tracer.render import terminal as render_terminal

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
    render_terminal.render(trace, console, show_stages=r.stages, weights=weights.params,
                           show_values=r.values, batch_rows=r.batch_index, queries=queries,
                           keys=keys, numbers=r.numbers, show_cost=r.cost, peaks=peaks,
                           show_circuits=r.circuits)
