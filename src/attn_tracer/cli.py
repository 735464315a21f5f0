"""The `attn` command line.

stdout carries the data (the view, or JSON); everything else goes to stderr. A user's mistake
ends as one line `attn: error: …` with exit code 2 (usage) or 1 (runtime), never a traceback;
--debug or ATTN_DEBUG=1 shows the traceback for a bug report. torch is imported only on the
paths that run it (ruff's TID253 keeps it out of this module's top level).
"""

from __future__ import annotations

import contextlib
import os
import sys
from enum import Enum

from attn_tracer import process

# Ctrl-C (or SIGTERM, SIGHUP) from the first moment: the imports below take a tenth of a second,
# and a signal there would otherwise print a traceback. Only when this process is attn itself.
if process.launched_as_program():
    process.install_signal_handlers()

# NumPy's OpenBLAS wakes a thread pool for every product; for the small matrices of a trace that
# costs 10–50× the product itself (measured: 14 ms vs 0.2 ms for [6, 768]·[768, 768] on 2 cores),
# and one thread stays faster up to 1,024 tokens. Set before NumPy loads; the user's value wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

try:  # Typer ≥ 0.26 vendors its own copy of click; its exceptions are not click's
    import typer._click as click
except ImportError:  # pragma: no cover - older Typer uses click itself
    import click

from attn_tracer import __version__
from attn_tracer.analysis.head_definitions import SORTS  # names and words only: no NumPy
from attn_tracer.analysis.head_definitions import help_text as _heads_help
from attn_tracer.errors import AttnError, UsageError
from attn_tracer.options import (
    CROSS,
    ENGINE,
    FILES,
    INPUT,
    KEEP_NEWLINE_HELP,
    MODEL,
    PREDICT,
    shared,
)

EXAMPLES = {
    "tokens": 'attn tokens "hello world"    ·    attn tokens --file notes.txt --json',
    "trace": 'attn trace "The cat sat on the mat"    ·    attn trace --d-model 4 --heads 2 '
             '--values "a b c"    ·    '
             'attn trace --weights gpt2 --predict "The capital of France is"',
    "heads": 'attn heads --weights gpt2 "The cat sat on the mat"    ·    '
             'attn heads --weights gpt2 --repeat 50 --sort induction --top 5    ·    '
             'attn heads --weights gpt2 --file notes.txt --json | jq ".heads[:3]"',
    "explore": 'attn explore "The cat sat on the mat"    ·    '
               'attn explore --weights gpt2 --file notes.txt --predict',
    "schema": "attn schema | jq .properties",
    "attribute": 'attn attribute --weights gpt2 "The Eiffel Tower is in the city of"    ·    '
                 'attn attribute "a b c a b" --target "␣c" --ablate L1H3 --rollout',
    "patch": 'attn patch --weights gpt2 --clean "When Mary and John went to the store, John '
             'gave a drink to" --corrupt "When Mary and John went to the store, Mary gave a '
             'drink to" --patch resid_pre --patch z    ·    attn patch --weights gpt2 '
             '"The Eiffel Tower is in the city of" --corrupt-noise "Eiffel Tower"',
    "generate": 'attn generate "Once upon a time" --weights gpt2 --quiet    ·    '
                'attn generate "The cat sat" --max-new-tokens 8 --head 0,1 --cost    ·    '
                'attn generate "Hello" -T 0.8 --top-p 0.9 --seed 1 --json-lines',
}


def _fail(message: str, code: int) -> None:
    try:
        if sys.stdout is not None and not sys.stdout.closed:
            sys.stdout.flush()
    except (OSError, ValueError):
        process.silence_stdout()  # what could not be written now must not fail again at exit
    process.say(f"attn: error: {message}")
    sys.exit(code)


_ARGS: list[str] = []  # the command line's words, for a view that prints a command to run next
_DEBUG = [False]  # set by --debug (on the root or on a command) while a command line is parsed


def _debug() -> bool:
    return _DEBUG[0] or process.debug_from_env()


def _set_debug(value: bool) -> None:
    if value:
        _DEBUG[0] = True


# Ctrl-C as Typer reports it (its own Abort; older Typer: Click's).
_ABORTS = tuple({typer.Abort, getattr(click.exceptions, "Abort", typer.Abort)})


class _PipeClosed(Exception):
    """stdout's reader went away; raised past Typer, which would turn EPIPE into exit 1."""


class Group(TyperGroup):
    """Turns every failure into one line and an exit code, for Typer's runner and for tests.

    Exit codes: 0 success (also when the reader of stdout goes away early), 1 runtime error,
    2 usage error, 129/130/143 hung up, interrupted, terminated. --debug (before or after the
    command) or ATTN_DEBUG=1 print the traceback above the one-line message.

    Before the command line is even parsed, the process's surroundings are made safe (see
    process.py): closed standard streams, degenerate terminal widths, an encoding that cannot
    show the view, and a stdout whose write errors must be told apart from attn's own.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from attn_tracer import argv

        argv.harden(self.commands.values())  # empty values, ASCII digits: every option

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            raise _PipeClosed from e

    def make_context(self, *args, **kwargs):
        # `attn --help | true`: the root's help and --version are printed while its context is
        # made, where Typer would turn the closed pipe into exit 1.
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError as e:
            raise _PipeClosed from e

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = _heads_merge(list(sys.argv[1:] if args is None else args))
        _ARGS[:] = args
        _DEBUG[0] = False
        if process.repair_streams():
            _fail("standard output is closed, so there is nowhere to write the output; "
                  "redirect it to a file or to /dev/null instead of closing it", 1)
        process.sanitize_width()
        if problem := process.text_output_problem(args):
            _fail(problem, 1)
        process.guard_stdout()
        if not args or {"-h", "--help"} & set(args[: args.index("--")] if "--" in args else args):
            process.tame_rich()  # Typer draws its help with Rich, which it imports anyway
        try:
            try:
                rv = super().main(args=args, prog_name=prog_name or "attn",
                                  complete_var=complete_var, standalone_mode=False, **extra)
            except click.exceptions.NoArgsIsHelpError as e:
                print(e.ctx.get_help())
                rv = 0
            sys.stdout.flush()  # here, not at exit, where a failure could only be "ignored"
        except click.exceptions.ClickException as e:
            _fail(_usage_message(e), 2 if isinstance(e, click.exceptions.UsageError)
                  else e.exit_code or 1)
        except (*_ABORTS, KeyboardInterrupt):
            _fail("interrupted", 130)
        except (_PipeClosed, BrokenPipeError):
            _quiet_pipe()
        except process.StdoutError as e:
            _traceback_if_debug()
            process.silence_stdout()
            _fail(f"cannot write the output to standard output: {e.strerror}", 1)
        except AttnError as e:
            _traceback_if_debug()
            _fail(_one_line(str(e)), e.exit_code)
        except MemoryError:
            _traceback_if_debug()
            _fail("out of memory; shrink the run with --max-length, --layer/--head, --d-model", 1)
        except OSError as e:
            # The machine refused something (a file, a descriptor, a limit): the user's
            # environment, not a bug of attn's; the places that know better say more.
            _traceback_if_debug()
            where = f"{e.filename}: " if e.filename else ""
            _fail(_one_line(f"{where}{e.strerror or e}"), 1)
        except Exception as e:
            _traceback_if_debug()
            if type(e).__name__ == "OutOfMemoryError":  # torch's, matched without importing it
                _fail("out of GPU memory; shrink the run with --max-length, --layer/--head, "
                      "--dtype bfloat16, or run on the CPU with --device cpu", 1)
            _fail(f"internal error ({type(e).__name__}: {_one_line(str(e))}); rerun with --debug "
                  "for the traceback and report it", 1)
        if rv == 130:
            _fail("interrupted", 130)
        sys.exit(rv if isinstance(rv, int) else 0)


def _heads_merge(args: list[str]) -> list[str]:
    """`attn [--debug] heads merge …` → `attn … heads-merge …`: merge, right after heads, is
    the subcommand (a text "merge" is `attn heads -- merge`, or any option before it)."""
    i = 0
    while i < len(args) and args[i] == "--debug":
        i += 1
    if args[i:i + 2] == ["heads", "merge"]:
        return [*args[:i], "heads-merge", *args[i + 2:]]
    return args


def _traceback_if_debug() -> None:
    if _debug() and sys.stderr is not None:
        import traceback

        with contextlib.suppress(OSError, ValueError):  # stderr failed: the one line will try
            traceback.print_exc()


def _usage_message(e) -> str:
    message = _one_line(e.format_message())
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        message += f" (see {ctx.command_path} --help)"
    return message


def _one_line(message: str) -> str:
    """One line, with control characters (say, an escape code in a file name) made visible, and
    bytes of the command line that were not UTF-8 shown as such (\\xff)."""
    from attn_tracer.argv import shown

    message = shown(message)
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in " ".join(message.split()))


def _quiet_pipe() -> None:
    # Python's documented recipe: the reader went away; point stdout at devnull so the final
    # flush at exit does not raise again, and end without a word.
    process.silence_stdout()
    sys.exit(0)


app = typer.Typer(
    cls=Group,
    name="attn",
    help="Trace multi-head attention step by step: shapes, formulas, masks and heatmaps.",
    epilog=f"Examples: {EXAMPLES['trace']}    ·    {EXAMPLES['tokens']}",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"attn {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", callback=_set_debug, is_eager=True,
                                        help="Show full tracebacks (also ATTN_DEBUG=1).")
                     ] = False,
) -> None:
    """Trace multi-head attention step by step: shapes, formulas, masks and heatmaps."""


# `attn trace … --debug` works too: a hidden twin of the root option on every command.
Debug = Annotated[bool, typer.Option("--debug", callback=_set_debug, is_eager=True, hidden=True)]


def _stdout_console():
    from rich.console import Console

    process.tame_rich()
    # NO_COLOR asks for plain text: no colors and no bold or dim either, the same as a pipe.
    plain = os.environ.get("NO_COLOR", "") != ""
    return Console(highlight=False, color_system=None if plain else "auto")


def _stderr_console():
    from rich.console import Console

    process.tame_rich()
    return Console(stderr=True, highlight=False)


def _notice(message: str) -> None:
    from rich.text import Text

    # One notice, one line, whatever the terminal width: a wrapped path cannot be copied.
    _stderr_console().print(Text(f"attn: {message}", style="yellow"), soft_wrap=True)



# ── attn tokens ───────────────────────────────────────────────────────────────────────────────

@app.command(epilog=f"Example: {EXAMPLES['tokens']}")
def tokens(
    text: Annotated[str | None, typer.Argument(help="The text, or - to read standard input.")
                    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the text from a file.")
                    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print a JSON array of {id, text, bytes}.")
                     ] = False,
    allow_special: Annotated[bool, typer.Option(
        "--allow-special", help="Read special tokens in the text as themselves: GPT-2's "
        "<|endoftext|> as the token 50256 (a checkpoint's tokenizer: all of its own).")
    ] = False,
    keep_newline: Annotated[bool, typer.Option("--keep-newline", help=KEEP_NEWLINE_HELP)] = False,
    weights: Annotated[str | None, typer.Option(
        "--weights", help="Tokenize as this checkpoint does (a folder or a model id in the "
        "Hugging Face cache): its tokenizer.json, and config.json's token ids; no weights are "
        "read.")] = None,
    debug: Debug = False,
) -> None:
    """Show how a tokenizer splits a text (GPT-2's, or a checkpoint's with --weights):
    position, id, readable label, raw bytes."""
    from attn_tracer.model import tokenizer
    from attn_tracer.model import tokens as tok
    from attn_tracer.text import read_text

    source = read_text(text, file, keep_newline)
    chosen = tokenizer.for_source(weights) if weights is not None else tokenizer.gpt2()
    toks = chosen.tokenize(source, allow_special=allow_special)
    if keep_newline and file is None and text != "-":
        _notice("--keep-newline keeps the final line ending of --file or standard input; a "
                "TEXT argument is always exact")
    if json_:
        from attn_tracer.render.json_doc import tokens_document

        sys.stdout.buffer.write(tokens_document(toks))
        sys.stdout.flush()
        return
    from rich import box
    from rich.table import Table
    from rich.text import Text

    n = f"{len(toks)} {'GPT-2 ' if chosen.who == 'GPT-2' else ''}token" + (
        "" if len(toks) == 1 else "s")
    table = Table(box=box.SIMPLE_HEAD, title=n, title_justify="left")
    table.add_column("pos", justify="right", style="dim")
    table.add_column("id", justify="right")
    table.add_column("token", style="bold cyan")
    table.add_column("bytes", style="dim")
    table.add_column("part of", style="green")
    for pos, (t, part) in enumerate(zip(toks, tok.split_characters(toks), strict=True)):
        label = Text(t.text, style="bold magenta") if t.special else Text(t.text)
        table.add_row(str(pos), str(t.id), label, t.bytes.hex(" "), Text(part))
    console = _stdout_console()
    if weights is not None:  # one line, whatever the width: a path must stay whole
        console.print(Text(f"tokenizer: {chosen.describe()}", style="dim"), soft_wrap=True)
    console.print(table)
    for note in chosen.notes(toks):
        console.print(Text(note, style="dim"), soft_wrap=True)


# ── attn schema ───────────────────────────────────────────────────────────────────────────────

SCHEMAS = ("trace", "trace-lines", "heads", "attribute", "patch", "generate", "generate-lines",
           "tokens")  # data/NAME.schema.json

@app.command(epilog=f"Example: {EXAMPLES['schema']}")
def schema(
    which: Annotated[str, typer.Argument(help="trace (attn trace --json), trace-lines (attn "
                                              "trace --json-lines), heads (attn heads --json), "
                                              "attribute (attn attribute --json), patch "
                                              "(attn patch --json), generate (attn generate "
                                              "--json), generate-lines (attn generate "
                                              "--json-lines) or tokens (attn tokens "
                                              "--json).")] = "trace",
    debug: Debug = False,
) -> None:
    """Print the JSON Schema (draft 2020-12) of the --json output."""
    from importlib.resources import files

    if which not in SCHEMAS:
        raise UsageError(f"no schema named {which!r}: choose {', '.join(SCHEMAS[:-1])} or "
                         f"{SCHEMAS[-1]}")
    # As bytes: JSON is UTF-8 whatever the locale's encoding (see process.text_output_problem).
    sys.stdout.buffer.write(files("attn_tracer.data").joinpath(f"{which}.schema.json").read_bytes())
    sys.stdout.flush()


# ── attn trace ────────────────────────────────────────────────────────────────────────────────

Opt = typer.Option

# --plot and --plot-theme, the same on every command that draws a figure (render/plot.py).
PlotTheme = Enum("PlotTheme", {"light": "light", "dark": "dark"}, type=str)
Plot = Annotated[Path | None, Opt("--plot", help="Save a figure for a paper or a slide "
                                  "(.png, .pdf or .svg; needs matplotlib: pip install "
                                  "\"attn-tracer\\[plot]\").", rich_help_panel="Output",
                                  show_default=False)]
PlotThemeOption = Annotated[PlotTheme, Opt("--plot-theme", help="The figure's theme.",
                                           rich_help_panel="Output")]


@app.command(epilog=f"Examples: {EXAMPLES['trace']}")
@shared(INPUT, CROSS, MODEL, ENGINE, PREDICT, FILES)
def trace(
    opts: dict,
    layer: Annotated[list[str] | None, Opt("--layer", "-l", help="Layers to show: a number "
                                           "(repeatable), 0,2 or all (default: 0; all for --json).",
                                           rich_help_panel="View", show_default=False)] = None,
    head: Annotated[list[str] | None, Opt("--head", help="Heads to show: a number (repeatable), "
                                          "0,3 or all (default: all).", rich_help_panel="View",
                                          show_default=False)] = None,
    batch_index: Annotated[list[int] | None, Opt("--batch-index", help="Batch rows to draw "
                                                 "(default: all).", rich_help_panel="View",
                                                 show_default=False)] = None,
    stages: Annotated[bool, Opt("--stages", help="Also show raw, scaled and masked scores.",
                                rich_help_panel="View")] = False,
    query: Annotated[str | None, Opt("--query", help="Query rows to draw: a position P or a "
                                     "range A:B; with P, also the text shaded by its attention.",
                                     rich_help_panel="View", show_default=False)] = None,
    keys: Annotated[str | None, Opt("--keys", help="Key columns to draw: a range A:B (or P).",
                                    rich_help_panel="View", show_default=False)] = None,
    numbers: Annotated[bool, Opt("--numbers", help="With --query P: each token's weight beside "
                                 "it (always without color).", rich_help_panel="View")] = False,
    values: Annotated[bool, Opt("--values", help="Print the numbers (small configurations only):"
                                " each matrix, the mask, each head's ΔE, a value circuit.",
                                rich_help_panel="View")] = False,
    cost: Annotated[bool, Opt("--cost", help="Each step's bytes and multiply-adds, and how they "
                              "grow with the text's length (len²: the scores).",
                              rich_help_panel="View")] = False,
    circuits: Annotated[bool, Opt("--circuits", help="Each head's value circuit W_V[:, h]·W_O[h]:"
                                  " shapes, parameter counts, rank.",
                                  rich_help_panel="View")] = False,
    json_: Annotated[bool, Opt("--json", help="Write the trace as JSON (schema: attn schema).",
                               rich_help_panel="Output")] = False,
    json_lines: Annotated[bool, Opt("--json-lines", help="Write the trace as JSON Lines: a "
                                    "header, then one line per layer × batch row × head "
                                    "(schema: attn schema trace-lines).",
                                    rich_help_panel="Output")] = False,
    precision: Annotated[int | None, Opt("--precision", help="Round JSON floats to N decimals.",
                                         rich_help_panel="Output")] = None,
    save: Annotated[Path | None, Opt("--save", help="Save every step's tensor of the --layer "
                                     "layers (default: all) (.npz or .safetensors).",
                                     rich_help_panel="Output")] = None,
    steps: Annotated[list[str] | None, Opt("--steps", help="With --save: only these steps, by "
                                           "their name in a layer (pattern,z or attn.out,mlp.in;"
                                           " repeatable).", rich_help_panel="Output",
                                           show_default=False)] = None,
    plot: Plot = None,
    plot_theme: PlotThemeOption = PlotTheme.light,
    debug: Debug = False,
) -> None:
    """Run a text through a multi-head attention stack and show every step with its shape."""
    from attn_tracer.commands import run as runner

    request = runner.Request(
        **opts, layer=layer or [], head=head or [], batch_index=batch_index, stages=stages,
        query=query, keys=keys, numbers=numbers,
        values=values, cost=cost, circuits=circuits, json=json_, json_lines=json_lines,
        precision=precision, save=save, steps=steps or [],
        plot=plot, plot_theme=plot_theme.value,
    )
    runner.execute(request, notice=_notice, console=_stdout_console)


# ── attn heads ────────────────────────────────────────────────────────────────────────────────

HeadsSort = Enum("HeadsSort", {s: s for s in SORTS}, type=str)


@app.command(epilog=f"Examples: {EXAMPLES['heads']}", help=(
    "Every head of the model at a glance: a thumbnail of each head's pattern (layers as rows, "
    "heads as columns), then the scores that say what each head does, as grids and as a table."
    "\n\nThe scores (A: a head's pattern of one text; pad queries and keys never count):\n\n"
    + _heads_help(markup=True)))
@shared(INPUT, MODEL, ENGINE, FILES)
def heads(
    opts: dict,
    sort: Annotated[HeadsSort, Opt("--sort", metavar="NAME", help="Order the table by a score "
                                   "above, highest first, or by layer (L0H0, L0H1, …).",
                                   rich_help_panel="View")] = HeadsSort.layer,
    top: Annotated[int | None, Opt("--top", help="Show only the first K heads of the table "
                                   "(default: every head).", rich_help_panel="View",
                                   show_default=False)] = None,
    repeat: Annotated[int | None, Opt("--repeat", help="The induction probe: N random word "
                                      "tokens (seeded by --seed), then the same N again, "
                                      "instead of a text.", rich_help_panel="Input",
                                      show_default=False)] = None,
    bos: Annotated[bool | None, Opt("--bos/--no-bos", help="Put <|endoftext|> first, as "
                                    "GPT-2 saw in training (a checkpoint's tokenizer: its "
                                    "BOS, unless it adds one itself; default: on for "
                                    "--repeat, as TransformerLens does; off for a text, which "
                                    "stays the tokens attn trace shows).", rich_help_panel="Input",
                                    show_default=False)] = None,
    json_: Annotated[bool, Opt("--json", help="Write the scores as JSON (schema: attn schema "
                               "heads).", rich_help_panel="Output")] = False,
    score: Annotated[list[str] | None, Opt("--score", metavar="NAME", help="Draw only this "
                                           "score's grid (repeatable; all: every one).",
                                           rich_help_panel="View", show_default=False)] = None,
    thumbnails: Annotated[bool | None, Opt("--thumbnails/--no-thumbnails", help="--thumbnails:"
                                           " with --json, add each head's 16 × 16 thumbnail; "
                                           "--no-thumbnails: the view without the overview.",
                                           rich_help_panel="Output", show_default=False)
                          ] = None,
    corpus: Annotated[str | None, Opt("--corpus", help="Many texts: a .txt (one text a line), "
                                      "a .jsonl, a folder of .txt files, or - (stdin); the "
                                      "mean of each text's scores, ± 95% CI.",
                                      rich_help_panel="Corpus", show_default=False)] = None,
    text_field: Annotated[str | None, Opt("--text-field", help="The field of each .jsonl "
                                          "record that holds its text (default: text).",
                                          rich_help_panel="Corpus", show_default=False)] = None,
    batch_size: Annotated[int, Opt("--batch-size", help="Texts a forward (sorted by length "
                                   "within 8 batches).", rich_help_panel="Corpus")] = 16,
    examples: Annotated[int, Opt("--examples", help="Keep each head's K highest-scoring texts "
                                 "per score.", rich_help_panel="Corpus")] = 5,
    state: Annotated[Path | None, Opt("--state", help="Resume from / save the running "
                                      "statistics to this file (atomically).",
                                      rich_help_panel="Corpus")] = None,
    state_every: Annotated[int, Opt("--state-every", help="Save --state every N batches.",
                                    rich_help_panel="Corpus")] = 20,
    shard: Annotated[str | None, Opt("--shard", help="i/N: run only this share of the corpus "
                                     "(merge the states with attn heads merge).",
                                     rich_help_panel="Corpus", show_default=False)] = None,
    ray: Annotated[bool, Opt("--ray", help="Run the batches on Ray (a local cluster, or "
                             "RAY_ADDRESS's); needs attn-tracer\\[ray].",
                             rich_help_panel="Corpus")] = False,
    workers: Annotated[int | None, Opt("--workers", help="Ray workers, one model each "
                                       "(default: 2).", rich_help_panel="Corpus",
                                       show_default=False)] = None,
    skip_bad: Annotated[bool, Opt("--skip-bad", help="Skip unreadable records (counted, named)"
                                  " instead of stopping.", rich_help_panel="Corpus")] = False,
    plot: Plot = None,
    plot_theme: PlotThemeOption = PlotTheme.light,
    debug: Debug = False,
) -> None:
    from attn_tracer.commands import heads as heads_command
    from attn_tracer.commands.corpus import CorpusOptions

    files = {name: opts.pop(name) for name in ("svg", "html", "width", "force")}
    options = heads_command.HeadsOptions(
        sort=sort.value, top=top, repeat=repeat, bos=bos, json=json_, thumbnails=thumbnails,
        **files, score=score or [], plot=plot, plot_theme=plot_theme.value)
    many = CorpusOptions(corpus=corpus, text_field=text_field, batch_size=batch_size,
                         examples=examples, state=state, state_every=state_every, shard=shard,
                         ray=ray, workers=workers, skip_bad=skip_bad)
    if corpus is not None:
        from attn_tracer.commands import corpus as corpus_command

        corpus_command.execute(opts, options, many, notice=_notice, console=_stdout_console)
        return
    if given := many.given():
        raise UsageError(f"{given[0]} works with --corpus PATH (many texts)")
    heads_command.execute(opts, options, notice=_notice, console=_stdout_console)


# `attn heads merge STATE...`: `heads` takes a TEXT, so `merge` right after it is read as this
# command (Group.main rewrites it); the text "merge" itself is `attn heads -- merge`.
@app.command("heads-merge", epilog="Example: attn heads merge shard-*.json --sort induction",
             help="Combine the --state files of attn heads --corpus --shard i/N runs into the "
                  "result of one run (also: attn heads merge STATE...).")
@shared(FILES)
def heads_merge(
    opts: dict,
    states: Annotated[list[Path], typer.Argument(help="The state files, one per shard.",
                                                 show_default=False, metavar="STATE...")],
    sort: Annotated[HeadsSort, Opt("--sort", metavar="NAME", help="Order the table by a score, "
                                   "highest first, or by layer.", rich_help_panel="View")
                    ] = HeadsSort.layer,
    top: Annotated[int | None, Opt("--top", help="Show only the first K heads of the table.",
                                   rich_help_panel="View", show_default=False)] = None,
    json_: Annotated[bool, Opt("--json", help="Write the scores as JSON (schema: attn schema "
                               "heads).", rich_help_panel="Output")] = False,
    thumbnails: Annotated[bool, Opt("--thumbnails", help="With --json: add each head's "
                                    "16 × 16 corpus thumbnail.", rich_help_panel="Output")
                          ] = False,
    debug: Debug = False,
) -> None:
    from attn_tracer.commands import corpus as corpus_command
    from attn_tracer.commands import heads as heads_command

    files = {name: opts.pop(name) for name in ("svg", "html", "width", "force")}
    options = heads_command.HeadsOptions(sort=sort.value, top=top, json=json_,
                                         thumbnails=thumbnails, **files)
    heads_command.validate({}, options)
    corpus_command.merge(states, options, notice=_notice, console=_stdout_console)


# ── attn attribute ────────────────────────────────────────────────────────────────────────────

AblateMode = Enum("AblateMode", {"zero": "zero", "mean": "mean"}, type=str)


@app.command(epilog=f"Examples: {EXAMPLES['attribute']}")
@shared(INPUT, MODEL, ENGINE, FILES)
def attribute(
    opts: dict,
    target: Annotated[str | None, Opt("--target", help="The token to explain: its text (a "
                                      "leading space as ' ' or ␣) or #ID (default: the top "
                                      "prediction).", rich_help_panel="Attribution",
                                      show_default=False)] = None,
    versus: Annotated[str | None, Opt("--versus", help="Explain the logit difference target − "
                                      "this token.", rich_help_panel="Attribution")] = None,
    position: Annotated[int | None, Opt("--position", help="Explain the prediction made at "
                                        "this position (default: the last token).",
                                        rich_help_panel="Attribution", show_default=False)
                        ] = None,
    ablate: Annotated[list[str] | None, Opt("--ablate", help="Heads to knock out in one more "
                                            "forward: L5H1,L6H9 (repeatable).",
                                            rich_help_panel="Attribution",
                                            show_default=False)] = None,
    ablate_mode: Annotated[AblateMode, Opt("--ablate-mode", help="zero: Z = 0; mean: Z = its "
                                           "mean over the text's positions.",
                                           rich_help_panel="Attribution")] = AblateMode.zero,
    all_positions: Annotated[bool, Opt("--all-positions", help="Logit lens at every position "
                                       "(a layers × positions table).",
                                       rich_help_panel="Attribution")] = False,
    rollout: Annotated[bool, Opt("--rollout", help="Attention rollout (Abnar & Zuidema 2020).",
                                 rich_help_panel="Attribution")] = False,
    top_k: Annotated[int, Opt("--top-k", help="Tokens listed in the prediction and the "
                              "ablation.", rich_help_panel="View")] = 5,
    components: Annotated[int, Opt("--components", help="Rows of each strongest-components "
                                   "table (heads; embeddings, b_O and MLPs).",
                                   rich_help_panel="View")] = 10,
    json_: Annotated[bool, Opt("--json", help="Write one JSON document (schema: attn schema "
                               "attribute).", rich_help_panel="Output")] = False,
    plot: Plot = None,
    plot_theme: PlotThemeOption = PlotTheme.light,
    debug: Debug = False,
) -> None:
    """Which heads made the prediction: direct logit attribution, logit lens, ablation, rollout.

    Of the prediction at the last token (or --position), for one text: each part's logit share.
    """
    from attn_tracer.commands import attribute as attr
    from attn_tracer.commands.session import SharedOptions

    files = {name: opts.pop(name) for name in ("svg", "html", "width", "force")}
    request = attr.AttributeRequest(
        base=SharedOptions.of(opts), target=target, versus=versus, position=position,
        ablate=ablate or [], ablate_mode=ablate_mode.value, all_positions=all_positions,
        rollout=rollout, top_k=top_k, components=components, json=json_, **files, plot=plot,
        plot_theme=plot_theme.value, command=["attn", *_ARGS] if _ARGS else None)
    attr.execute(request, notice=_notice, console=_stdout_console)


# ── attn patch ────────────────────────────────────────────────────────────────────────────────

PatchMetric = Enum("PatchMetric", {t: t for t in ("diff", "logit", "logprob", "prob")}, type=str)
Direction = Enum("Direction", {"denoise": "denoise", "noise": "noise"}, type=str)


@app.command(epilog=f"Examples: {EXAMPLES['patch']}")
@shared(INPUT, MODEL, ENGINE, FILES)
def patch(
    opts: dict,
    clean: Annotated[str | None, Opt("--clean", help="The clean prompt (or give it as TEXT).",
                                     rich_help_panel="Patching", show_default=False)] = None,
    corrupt: Annotated[str | None, Opt("--corrupt", help="The corrupted prompt: the same number "
                                       "of tokens, a few of them changed.",
                                       rich_help_panel="Patching", show_default=False)] = None,
    corrupt_noise: Annotated[str | None, Opt("--corrupt-noise", metavar="SUBJECT", help="Causal "
                                             "tracing (ROME): corrupt by adding Gaussian noise "
                                             "to the embeddings of these words of the text.",
                                             rich_help_panel="Patching",
                                             show_default=False)] = None,
    patch_: Annotated[list[str] | None, Opt("--patch", help="What to patch (repeatable, or "
                                            "comma-separated): resid_pre, attn_out, mlp_out "
                                            "(layers × positions); z, q, k, v, pattern (layers × "
                                            "heads) (default: resid_pre, attn_out, mlp_out).",
                                            rich_help_panel="Patching",
                                            show_default=False)] = None,
    per_position: Annotated[bool, Opt("--per-position", help="Patch z one head and one position "
                                      "at a time (layers × heads × positions).",
                                      rich_help_panel="Patching")] = False,
    direction: Annotated[Direction, Opt("--direction", help="denoise: each clean activation "
                                        "into the corrupted run, alone (is it sufficient to "
                                        "restore the behaviour?); noise: each corrupted "
                                        "activation into the clean run (is it necessary: does "
                                        "the behaviour break without it?). Heimersheim & Nanda "
                                        "2024, How to use and interpret activation patching.",
                                        rich_help_panel="Patching")] = Direction.denoise,
    target: Annotated[str | None, Opt("--target", help="The token whose prediction is measured: "
                                      "its text (a leading space as ' ' or ␣) or #ID (default: "
                                      "the clean run's top prediction).",
                                      rich_help_panel="Metric", show_default=False)] = None,
    versus: Annotated[str | None, Opt("--versus", help="The other side of the logit difference "
                                      "(default: the corrupted run's top prediction).",
                                      rich_help_panel="Metric", show_default=False)] = None,
    position: Annotated[int | None, Opt("--position", help="Measure the prediction made at this "
                                        "position (default: the last token).",
                                        rich_help_panel="Metric", show_default=False)] = None,
    metric: Annotated[PatchMetric | None, Opt("--metric", help="diff: logit(target) − "
                                              "logit(versus); logit, logprob, prob: of the "
                                              "target alone (default: diff; prob with "
                                              "--corrupt-noise, as ROME). Every cell shows "
                                              "(patched − corrupted) / (clean − corrupted).",
                                              rich_help_panel="Metric",
                                              show_default=False)] = None,
    samples: Annotated[int | None, Opt("--samples", help="Noise draws averaged by "
                                       "--corrupt-noise (default: 10).",
                                       rich_help_panel="Causal tracing",
                                       show_default=False)] = None,
    noise_scale: Annotated[float, Opt("--noise-scale", help="The noise's standard deviation, "
                                      "times the token embeddings' (ROME: 3).",
                                      rich_help_panel="Causal tracing")] = 3.0,
    noise_seed: Annotated[int, Opt("--noise-seed", help="Seed of the noise.",
                                   rich_help_panel="Causal tracing")] = 0,
    restore_window: Annotated[int, Opt("--restore-window", help="Restore attn_out and mlp_out "
                                       "of K consecutive layers around each layer at once "
                                       "(ROME uses 10).",
                                       rich_help_panel="Causal tracing")] = 1,
    top: Annotated[int, Opt("--top", help="Strongest cells listed under each grid.",
                            rich_help_panel="View")] = 10,
    json_: Annotated[bool, Opt("--json", help="Write one JSON document (schema: attn schema "
                               "patch).", rich_help_panel="Output")] = False,
    debug: Debug = False,
) -> None:
    """Activation patching: which layer, position and head carry the difference between a clean
    and a corrupted prompt.

    Each activation of one run is replaced by the other run's, one at a time, and the
    prediction at the last token (or --position) is measured again.
    """
    from attn_tracer.commands import patch as patch_command
    from attn_tracer.commands.session import SharedOptions

    files = {name: opts.pop(name) for name in ("svg", "html", "width", "force")}
    request = patch_command.PatchRequest(
        base=SharedOptions.of(opts), clean=clean, corrupt=corrupt,
        corrupt_noise=corrupt_noise, target=target, versus=versus, position=position,
        metric=metric.value if metric is not None else None, direction=direction.value,
        patch=patch_ or [], per_position=per_position, samples=samples,
        noise_scale=noise_scale, noise_seed=noise_seed, window=restore_window, top=top, json=json_,
        **files)
    patch_command.execute(request, notice=_notice, console=_stdout_console)
# ── attn generate ─────────────────────────────────────────────────────────────────────────────

@app.command(epilog=f"Examples: {EXAMPLES['generate']}")
@shared(INPUT, MODEL, ENGINE)
def generate(
    opts: dict,
    max_new_tokens: Annotated[int, Opt("--max-new-tokens", "-n", help="Tokens to generate "
                                       "(the prompt and these must fit n_ctx).",
                                       rich_help_panel="Generation")] = 20,
    temperature: Annotated[float | None, Opt("--temperature", "-T", help="Sample from "
                                             "softmax(logits / T) (default, or 0: greedy, the "
                                             "most likely token).",
                                             rich_help_panel="Generation",
                                             show_default=False)] = None,
    top_k: Annotated[int | None, Opt("--top-k", help="Sample among the K most likely tokens "
                                     "only.", rich_help_panel="Generation")] = None,
    top_p: Annotated[float | None, Opt("--top-p", help="Sample among the most likely tokens "
                                       "whose probabilities add up to P, in (0, 1] (nucleus).",
                                       rich_help_panel="Generation")] = None,
    stop: Annotated[str | None, Opt("--stop", help="Stop once the generated text contains "
                                    "this (it is kept). Generation always stops at "
                                    "<|endoftext|>.", rich_help_panel="Generation")] = None,
    alternatives: Annotated[int, Opt("--alternatives", help="Each step, the K most likely "
                                     "tokens it chose from.", rich_help_panel="View")] = 0,
    layer: Annotated[list[str] | None, Opt("--layer", "-l", help="Layers whose heads' attention "
                                           "rows are drawn as the text grows (default with "
                                           "--head: 0).", rich_help_panel="View",
                                           show_default=False)] = None,
    head: Annotated[list[str] | None, Opt("--head", help="Heads to draw (default with --layer: "
                                          "all): each generated token's attention row and its "
                                          "strongest keys.", rich_help_panel="View",
                                          show_default=False)] = None,
    cost: Annotated[bool, Opt("--cost", help="Each step's multiply-adds and bytes with the KV "
                              "cache against recomputing every token.",
                              rich_help_panel="View")] = False,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="Write only the generated text, as it "
                               "comes.", rich_help_panel="Output")] = False,
    json_: Annotated[bool, Opt("--json", help="Write one JSON document at the end (schema: "
                               "attn schema generate).", rich_help_panel="Output")] = False,
    json_lines: Annotated[bool, Opt("--json-lines", help="Write a JSON line per generated token"
                                    " (schema: attn schema generate-lines).",
                                    rich_help_panel="Output")] = False,
    precision: Annotated[int | None, Opt("--precision", help="Round JSON floats to N decimals.",
                                         rich_help_panel="Output")] = None,
    save: Annotated[Path | None, Opt("--save", help="Save the final KV cache and the drawn "
                                     "heads' rows (.npz or .safetensors).",
                                     rich_help_panel="Output")] = None,
    force: Annotated[bool, Opt("--force", help="Overwrite the file given to --save.",
                               rich_help_panel="Output")] = False,
    debug: Debug = False,
) -> None:
    """Generate text token by token and watch the KV cache and the attention rows grow.

    The prompt runs once (the prefill); then each new token computes only its own q, k, v,
    appends k and v to every layer's cache and attends over the whole cache. --seed seeds the
    sampling (and the random weights).
    """
    from attn_tracer.commands import generate as gen_command
    from attn_tracer.commands.session import SharedOptions

    request = gen_command.GenerateRequest(
        base=SharedOptions.of(opts), max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, stop=stop, alternatives=alternatives, layer=layer or [],
        head=head or [], cost=cost, quiet=quiet, json=json_, json_lines=json_lines,
        precision=precision, save=save, force=force)
    gen_command.execute(request, notice=_notice, console=_stdout_console)


# ── attn explore ──────────────────────────────────────────────────────────────────────────────

@app.command(epilog=f"Examples: {EXAMPLES['explore']}", help=(
    "Explore every head interactively in the terminal: the grid of every head's thumbnail (or "
    "its scores, as attn heads computes them), then one head's heatmap with a cursor, the text "
    "shaded by the focused query, the stages (raw → scaled → masked → softmax), the shape "
    "trace and the predictions. Press ? in the app for the keys, q to quit. "
    "Needs Textual: pip install \"attn-tracer\\[explore]\"."))
@shared(INPUT, CROSS, MODEL, ENGINE, PREDICT)
def explore(
    opts: dict,
    exit_after_first_frame: Annotated[bool, Opt("--exit-after-first-frame", hidden=True)
                                      ] = False,  # the start-up benchmark's stop
    debug: Debug = False,
) -> int:
    from attn_tracer.commands.session import SharedOptions
    from attn_tracer.explore import command

    return command.execute(SharedOptions.of(opts), notice=_notice,
                           exit_after_first_frame=exit_after_first_frame)




def main() -> None:
    # Ctrl-C, SIGTERM, SIGHUP anywhere, even inside a library's import or a C loop that would
    # turn KeyboardInterrupt into its own error: one line and 130, 143, 129. SystemExit still
    # runs the `finally` blocks that remove half-written files.
    process.install_signal_handlers()
    app()


if __name__ == "__main__":
    main()
