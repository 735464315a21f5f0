"""attn as a process: signals, the standard streams and the terminal, whatever the caller left.

The command line promises one line `attn: error: …` on stderr and an exit code for every
failure, and nothing else. The world it runs in can break that promise before any of attn's
own code runs: a signal during the imports, a stdout or stderr the parent closed, a stdout that
cannot take the bytes (a full disk, a file-size limit), an encoding that has no `·` or `␣`, a
COLUMNS of 0. This module meets each of them once, for every command, so the commands need not.

It imports nothing heavy (the command line installs the signal handlers from here before it
imports Typer), and nothing here changes what a command computes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import sys
from pathlib import Path

# Exit codes of the shell's convention, 128 + the signal's number, and the word for each.
SIGNALS = {
    signal.SIGINT: (130, "interrupted"),
    signal.SIGTERM: (143, "terminated (SIGTERM)"),
    signal.SIGHUP: (129, "hung up (SIGHUP)"),
}

# The narrowest and widest view drawn: below 20 columns no formula fits beside its name, and a
# help screen is padded to the full width (a COLUMNS of 100,000 made it 2.6 MB of spaces).
MIN_WIDTH, MAX_WIDTH = 20, 1000


def say(line: str) -> None:
    """Write one line to stderr, or nowhere if there is no stderr; never to stdout, and never
    an exception (print(file=None) would fall back to stdout)."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):  # stderr is a closed pipe or file: the exit code still says it
        pass


def launched_as_program() -> bool:
    """Whether this process is `attn` itself (the console script or `python -m attn_tracer`),
    not a program or test that imports the command line: only then are signals ours to take."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if argv0.stem == "attn":
        return True
    try:
        return argv0.resolve() == (Path(__file__).parent / "__main__.py").resolve()
    except OSError:
        return False


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP end the run with one line and 128 + the signal's number.

    The handler raises SystemExit, so every `finally` and `except BaseException` on the way out
    runs: that is what removes the temporary file of a --save being written. SIGKILL cannot be
    handled by any process; after it a temporary `.NAME.xxxx` file may remain.

    A signal the parent set to be ignored stays ignored (`nohup attn …`, a background job of a
    script), as Python itself leaves an ignored SIGINT alone. One the parent blocked is
    unblocked: pending since the process started, it is acted on now, at the first moment attn
    can do so cleanly, rather than never.
    """
    taken = set()
    for signum in SIGNALS:
        # ValueError: not the main thread (a program that imports the command line).
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signum) != signal.SIG_IGN:
                signal.signal(signum, _on_signal)
                taken.add(signum)
    if taken and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, taken)


def _on_signal(signum: int, frame: object) -> None:
    # One signal is enough: a second one must not cut short the unwinding that cleans up.
    for other in SIGNALS:
        if signal.getsignal(other) == _on_signal:
            signal.signal(other, signal.SIG_IGN)
    code, word = SIGNALS.get(signum, (128 + signum, f"signal {signum}"))
    say(f"attn: error: {word}")
    raise SystemExit(code)


def debug_from_env() -> bool:
    """ATTN_DEBUG=1 (or true, yes, on) asks for tracebacks; 0, false, no, off or empty do not."""
    return os.environ.get("ATTN_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def repair_streams() -> bool:
    """Give a closed stdin, stdout or stderr /dev/null, so that no file attn opens later takes
    their descriptor (a --save written into fd 1 would be read as the output). Returns whether
    stdout was closed: then there is nowhere for the output to go, which is the caller's error.
    """
    closed_stdout = False
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:  # closed: fill it, so that it is not reused
            devnull = os.open(os.devnull, os.O_RDWR)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
        if name == "stdout":
            closed_stdout = True
        elif name == "stderr":
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return closed_stdout


def silence_stdout() -> None:
    """Point fd 1 at /dev/null: after a failed or abandoned write, the interpreter's own flush
    at exit must not fail again and print a second message."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # no real descriptor (a test runner's stdout)


def sanitize_width() -> None:
    """COLUMNS that is not a positive number is ignored (Rich would draw 0 columns and fail);
    one outside MIN_WIDTH…MAX_WIDTH is brought inside, and so is a terminal narrower than that.
    Set in the environment because Rich, for the view, and Typer, for --help, both read it."""
    lines = os.environ.get("LINES")
    if lines is not None and not (lines.isdigit() and 0 < len(lines) < 6 and int(lines) > 0):
        del os.environ["LINES"]
    columns = os.environ.get("COLUMNS")
    if columns is not None:
        try:
            width = int(columns)
        except ValueError:  # not a number, or thousands of digits
            width = 0
        if width <= 0:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = str(min(max(width, MIN_WIDTH), MAX_WIDTH))
            return
    try:
        width = os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return  # not a terminal: Rich uses 80
    if 0 < width < MIN_WIDTH:
        os.environ["COLUMNS"] = str(MIN_WIDTH)


# A sample of what the view, the tokens table and --help draw besides the text itself.
DRAWN = "\u2423\u00b7\u2500\u2581"  # ␣ · ─ ▁


def text_output_problem(args: list[str]) -> str | None:
    """Why stdout cannot take this command's output, or None.

    The view, the tokens table and --help are drawn with `·`, `␣`, `─`, `▁` and the token
    labels themselves; an encoding without them (PYTHONIOENCODING=ascii, a latin-1 locale, the
    POSIX locale with PYTHONUTF8=0) would fail half-way through printing. Replacing them with
    ASCII would make labels ambiguous (`_` is a token too), so such a run is refused before
    anything is printed. What decides is whether the sample DRAWN can be written with stdout's
    encoding and error handler: `strict`, and `surrogateescape` (the POSIX locale's), fail on
    it and are refused; a handler that replaces (PYTHONIOENCODING=ascii:replace,
    :backslashreplace) is the user's explicit choice of lossy output and is honoured. JSON is
    UTF-8 by definition (RFC 8259) and is written as bytes, so --json, --json-lines and
    `attn schema` always work, as does --version; --help never carries a JSON exemption.
    """
    out = sys.stdout
    encoding = getattr(out, "encoding", None) or "utf-8"
    errors = getattr(out, "errors", None) or "strict"
    try:
        DRAWN.encode(encoding, errors)
        return None
    except UnicodeError:
        pass
    except LookupError:  # an encoding or handler Python does not know: it would have said so
        return None
    words = args[: args.index("--")] if "--" in args else args
    command = next((w for w in words if not w.startswith("-")), None)
    helping = not args or bool({"-h", "--help"} & set(words))
    if not helping and ({"--json", "--json-lines", "--version"} & set(words)
                        or command == "schema"):
        return None
    # In ASCII: this very line goes to a stderr of the same encoding.
    handler = "" if errors == "strict" else f" (error handler {errors})"
    return (f"standard output's encoding is {encoding}{handler}, which cannot show the "
            "characters attn draws (U+2423 for a space, U+00B7, box lines, blocks); set "
            "PYTHONIOENCODING=utf-8 or a UTF-8 locale (LANG=C.UTF-8), or use --json, which is "
            "always UTF-8")


class StdoutError(OSError):
    """Writing to standard output failed for a reason other than a closed pipe (which ends the
    run quietly): no space left, a file-size limit, a descriptor not open for writing."""


class _Stdout(io.RawIOBase):
    """fd 1, with its write errors told apart from every other OSError."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def write(self, data) -> int:
        try:
            return os.write(self._fd, data)
        except BrokenPipeError:
            raise  # the reader went away: the command line ends quietly, exit 0
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from None


def guard_stdout() -> None:
    """Route the real stdout through _Stdout, so that a failed write is reported as what it is.

    Only the process's own stdout is replaced (a test runner's capture is left alone), with the
    same encoding, error handler and line buffering.
    """
    out = sys.stdout
    if out is None or out is not sys.__stdout__:
        return
    try:
        fd = out.fileno()
        out.flush()
    except (OSError, ValueError, io.UnsupportedOperation):
        return
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(_Stdout(fd)), encoding=out.encoding,
                                  errors=out.errors, line_buffering=out.line_buffering)


def tame_rich() -> None:
    """Rich ends the process with exit 1 when a console meets a closed pipe
    (Console.on_broken_pipe). attn's promise is exit 0 when stdout's reader leaves early, and a
    closed stderr must not end a run that works: stdout raises BrokenPipeError for the command
    line to end quietly; stderr falls silent and the run goes on."""
    from rich.console import Console

    if getattr(Console.on_broken_pipe, "attn", False):
        return

    def on_broken_pipe(self) -> None:
        self.quiet = True
        if not self.stderr:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    on_broken_pipe.attn = True  # type: ignore[attr-defined]
    Console.on_broken_pipe = on_broken_pipe  # type: ignore[method-assign]
