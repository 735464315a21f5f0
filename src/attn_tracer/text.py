"""Where the text comes from: an argument, a file, or standard input.

A file or standard input ends with a line ending that is not part of the text: `echo hi`
writes "hi\n", and editors end every file with one. One final `\n` or `\r\n` is dropped, as a
shell's `$(cat file)` drops it; only one, where the shell drops them all, so a text that ends
in a blank line keeps one newline. `keep_newline` keeps the input exactly. A command-line
argument is always exact.
"""

from __future__ import annotations

import sys
from pathlib import Path

from attn_tracer.errors import UsageError

# The most attn reads of one input (a file, standard input, a --lines batch): far more than a
# context can hold (16 MiB of English is about 4 million tokens; --max-length keeps only the
# first tokens, and tokenizes little more), and little enough that reading and decoding it stays
# fast. /dev/zero or a runaway pipe is refused after LIMIT + 1 bytes instead of read forever.
MAX_INPUT_BYTES = 16 * 2**20


def read_text(argument: str | None, file: Path | None, keep_newline: bool = False) -> str:
    """The one text to work on: `argument`, `file`, or standard input when `argument` is `-`."""
    if argument is not None and file is not None:
        raise UsageError("give the text either as an argument or with --file, not both")
    if file is not None:
        return read_file(file, keep_newline=keep_newline)
    if argument == "-":
        return read_stdin(keep_newline)
    if argument is None:
        raise UsageError("no input: give a TEXT, --file PATH, or - to read standard input")
    return check_argument(argument, "the TEXT argument")


def check_argument(text: str, what: str) -> str:
    """A command-line argument as text, refusing bytes that were not UTF-8.

    Python hands such bytes over as lone surrogates; tiktoken would quietly turn them into
    U+FFFD, so the trace would not be of the text the user gave.
    """
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return text
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        bad = next(c for c in text if 0xD800 <= ord(c) <= 0xDFFF)
        raise UsageError(f"{what} contains a lone surrogate (U+{ord(bad):04X}), which is not "
                         "text; pass valid UTF-8") from None
    return decode(data, what)


def strip_final_newline(text: str) -> str:
    """`text` without one final line ending (`\n` or `\r\n`); only one."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def read_file(path: Path, what: str = "file", keep_newline: bool = False) -> str:
    """The text of `path` (`-`: standard input), without its final line ending unless kept."""
    if str(path) == "-":
        return read_stdin(keep_newline)
    try:
        if not path.exists():
            raise UsageError(f"{what} not found: {path}")
        if path.is_dir():
            raise UsageError(f"{path} is a directory; give a text file")
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as e:  # no permission, a name too long, a directory we may not search
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    text = decode(_bounded(data, str(path)), str(path))
    return text if keep_newline else strip_final_newline(text)


def read_stdin(keep_newline: bool = False) -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("- reads standard input, but nothing is piped in: pipe a text in "
                         "(echo hi | attn trace -) or give it as an argument")
    try:
        stream = getattr(sys.stdin, "buffer", sys.stdin)
        data = stream.read(MAX_INPUT_BYTES + 1)
    except OSError as e:  # stdin open for writing only, a directory, …
        raise UsageError(f"cannot read standard input: {e.strerror or e}") from None
    if isinstance(data, str):
        text = _bounded(data.encode("utf-8", "surrogateescape"), "standard input").decode(
            "utf-8", "surrogateescape")
    else:
        text = decode(_bounded(data, "standard input"), "standard input")
    return text if keep_newline else strip_final_newline(text)


def _bounded(data: bytes, source: str) -> bytes:
    if len(data) > MAX_INPUT_BYTES:
        raise UsageError(f"{source} is larger than the {MAX_INPUT_BYTES // 2**20} MiB attn reads "
                         "of one input; cut it first (e.g. head -c 1M FILE | attn trace - "
                         "--max-length 1024)")
    return data


def decode(data: bytes, source: str) -> str:
    """Strict UTF-8: a replacement character would silently change what is traced."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{source} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None
