"""The `attn` command line.

stdout carries the data (the view, or JSON); everything else goes to stderr. A user's mistake
ends as one line `attn: error: …` with exit code 2 (usage) or 1 (runtime), never a traceback;
--debug or ATTN_DEBUG=1 shows the traceback for a bug report. torch is imported only on the
paths that run it (ruff's TID253 keeps it out of this module's top level).
"""

from __future__ import annotations

import os
import sys

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
from attn_tracer.errors import AttnError, UsageError
from attn_tracer.options import CROSS, ENGINE, INPUT, MODEL, shared

EXAMPLES = {
    "tokens": 'attn tokens "hello world"    ·    attn tokens --file notes.txt --json',
    "trace": 'attn trace "The cat sat on the mat"    ·    attn trace --d-model 4 --heads 2 '
             '--values "a b c"    ·    '
             'attn trace --weights gpt2 --predict "The capital of France is"',
    "schema": "attn schema | jq .properties",
}


def _fail(message: str, code: int) -> None:
    try:
        if not sys.stdout.closed:
            sys.stdout.flush()
    except OSError:
        pass
    print(f"attn: error: {message}", file=sys.stderr)
    sys.exit(code)


_DEBUG = [False]  # set by --debug (on the root or on a command) while a command line is parsed


def _debug() -> bool:
    return _DEBUG[0] or os.environ.get("ATTN_DEBUG", "") not in ("", "0")


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
    2 usage error, 130 interrupted. --debug (before or after the command) or ATTN_DEBUG=1
    print the traceback above the one-line message.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            raise _PipeClosed from e

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        _DEBUG[0] = False
        try:
            rv = super().main(args=args, prog_name=prog_name or "attn", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            print(e.ctx.get_help())
            sys.exit(0)
        except click.exceptions.ClickException as e:
            _fail(_usage_message(e), 2 if isinstance(e, click.exceptions.UsageError)
                  else e.exit_code or 1)
        except (*_ABORTS, KeyboardInterrupt):
            _fail("interrupted", 130)
        except (_PipeClosed, BrokenPipeError):
            _quiet_pipe()
        except AttnError as e:
            _traceback_if_debug()
            _fail(_one_line(str(e)), e.exit_code)
        except MemoryError:
            _traceback_if_debug()
            _fail("out of memory; shrink the run with --max-length, --layer/--head, --d-model", 1)
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


def _traceback_if_debug() -> None:
    if _debug():
        import traceback

        traceback.print_exc()


def _usage_message(e) -> str:
    message = _one_line(e.format_message())
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        message += f" (see {ctx.command_path} --help)"
    return message


def _one_line(message: str) -> str:
    """One line, with control characters (say, an escape code in a file name) made visible."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in " ".join(message.split()))


def _quiet_pipe() -> None:
    # Python's documented recipe: the reader went away; point stdout at devnull so the final
    # flush at exit does not raise again, and end without a word.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (a test runner's stdout)
        pass
    sys.exit(0)


app = typer.Typer(
    cls=Group,
    name="attn",
    help="Trace multi-head attention step by step: shapes, formulas, masks and heatmaps.",
    epilog=f"Examples: {EXAMPLES['trace']}    ·    {EXAMPLES['tokens']}",
    no_args_is_help=True,
    add_completion=False,
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

    # NO_COLOR asks for plain text: no colors and no bold or dim either, the same as a pipe.
    plain = os.environ.get("NO_COLOR", "") != ""
    return Console(highlight=False, color_system=None if plain else "auto")


def _stderr_console():
    from rich.console import Console

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
        "--allow-special", help="Read <|endoftext|> in the text as the special token 50256.")
    ] = False,
    debug: Debug = False,
) -> None:
    """Show how GPT-2's tokenizer splits a text: position, id, readable label, raw bytes."""
    from attn_tracer import tokens as tok
    from attn_tracer.text import read_text

    source = read_text(text, file)
    toks = tok.tokenize(source, allow_special=allow_special)
    if json_:
        from attn_tracer.render_json import tokens_document

        sys.stdout.buffer.write(tokens_document(toks))
        sys.stdout.flush()
        return
    from rich import box
    from rich.table import Table
    from rich.text import Text

    title = f"{len(toks)} GPT-2 token{'' if len(toks) == 1 else 's'}"
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
    table.add_column("pos", justify="right", style="dim")
    table.add_column("id", justify="right")
    table.add_column("token", style="bold cyan")
    table.add_column("bytes", style="dim")
    table.add_column("part of", style="green")
    for pos, (t, part) in enumerate(zip(toks, tok.split_characters(toks), strict=True)):
        table.add_row(str(pos), str(t.id), Text(t.text), t.bytes.hex(" "), Text(part))
    _stdout_console().print(table)


# ── attn schema ───────────────────────────────────────────────────────────────────────────────

@app.command(epilog=f"Example: {EXAMPLES['schema']}")
def schema(
    which: Annotated[str, typer.Argument(help="trace (attn trace --json), trace-lines "
                                              "(attn trace --json-lines) or tokens "
                                              "(attn tokens --json).")] = "trace",
    debug: Debug = False,
) -> None:
    """Print the JSON Schema (draft 2020-12) of the --json output."""
    from importlib.resources import files

    if which not in ("trace", "trace-lines", "tokens"):
        raise UsageError(f"no schema named {which!r}: choose trace, trace-lines or tokens")
    sys.stdout.write(files("attn_tracer.data").joinpath(f"{which}.schema.json").read_text("utf-8"))
    sys.stdout.flush()


# ── attn trace ────────────────────────────────────────────────────────────────────────────────

Opt = typer.Option


@app.command(epilog=f"Examples: {EXAMPLES['trace']}")
@shared(INPUT, CROSS, MODEL, ENGINE)
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
    values: Annotated[bool, Opt("--values", help="Print the numbers (small configurations only).",
                                rich_help_panel="View")] = False,
    predict: Annotated[bool, Opt("--predict", help="Show the next-token distribution.",
                                 rich_help_panel="View")] = False,
    top_k: Annotated[int, Opt("--top-k", help="Tokens shown by --predict.",
                              rich_help_panel="View")] = 10,
    temperature: Annotated[float, Opt("--temperature", "-T", help="Softmax temperature of "
                                      "--predict.", rich_help_panel="View")] = 1.0,
    json_: Annotated[bool, Opt("--json", help="Write the trace as JSON (schema: attn schema).",
                               rich_help_panel="Output")] = False,
    json_lines: Annotated[bool, Opt("--json-lines", help="Write the trace as JSON Lines: a "
                                    "header, then one line per layer × batch row × head "
                                    "(schema: attn schema trace-lines).",
                                    rich_help_panel="Output")] = False,
    precision: Annotated[int | None, Opt("--precision", help="Round JSON floats to N decimals.",
                                         rich_help_panel="Output")] = None,
    save: Annotated[Path | None, Opt("--save", help="Save every step's tensor of the shown layers"
                                     " (.npz or .safetensors).", rich_help_panel="Output")] = None,
    steps: Annotated[list[str] | None, Opt("--steps", help="With --save: only these steps, by "
                                           "their name in a layer (pattern,z or attn.out,mlp.in;"
                                           " repeatable).", rich_help_panel="Output",
                                           show_default=False)] = None,
    svg: Annotated[Path | None, Opt("--svg", help="Save the terminal view as SVG.",
                                    rich_help_panel="Output")] = None,
    html: Annotated[Path | None, Opt("--html", help="Save the terminal view as HTML.",
                                     rich_help_panel="Output")] = None,
    force: Annotated[bool, Opt("--force", help="Overwrite files given to --save/--svg/--html.",
                               rich_help_panel="Output")] = False,
    debug: Debug = False,
) -> None:
    """Run a text through a multi-head attention stack and show every step with its shape."""
    from attn_tracer import run as runner

    request = runner.Request(
        **opts, layer=layer or [], head=head or [], batch_index=batch_index, stages=stages,
        values=values, predict=predict, top_k=top_k, temperature=temperature, json=json_,
        json_lines=json_lines, precision=precision, save=save, steps=steps or [], svg=svg,
        html=html, force=force,
    )
    runner.execute(request, notice=_notice, console=_stdout_console)


def _interrupted(signum, frame) -> None:
    # Ctrl-C anywhere, even inside a library's import or a C loop that would turn
    # KeyboardInterrupt into its own error: one line and 130. SystemExit still runs the
    # `finally` blocks that remove half-written files.
    print("attn: error: interrupted", file=sys.stderr)
    raise SystemExit(130)


def main() -> None:
    import signal

    signal.signal(signal.SIGINT, _interrupted)
    app()


if __name__ == "__main__":
    main()
