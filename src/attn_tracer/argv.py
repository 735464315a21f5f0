"""What the command line hands over, checked the same way for every option of every command.

Three rules hold for every option, whoever adds it, because they are applied to the parsed
commands' parameters rather than written into each one (the Group of cli.py calls `harden`):

- An empty value is an error (`--query ''`, `--svg ''`, `--device ''`): nothing in attn means
  "nothing" by an empty string, and a path of '' would be read as the current directory.
- Numbers are ASCII digits: Python's int() and float() read `８`, `٤٠` and other Unicode
  digits, which nobody types on purpose (`--d-model ８` looks like 8 and may not be).
- A byte of the command line that was not UTF-8 reaches Python as a lone surrogate
  (U+DCFF for 0xff); messages show it as the byte, `\\xff` (see `shown`).
"""

from __future__ import annotations

import re

try:  # Typer ≥ 0.26 vendors its own copy of click
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - older Typer uses click itself
    from click.exceptions import UsageError as ClickUsageError

# The names of the parameter types checked here, as Click and Typer's vendored copy call them
# (Typer's own Path type included).
_PATHS = {"path", "file", "directory"}
_NUMBERS = {"integer", "int", "float", "integer range", "float range"}
_TEXT = {"text", "str"}


def flag_of(param) -> str:
    opts = getattr(param, "opts", None) or [getattr(param, "name", "") or "the value"]
    return max(opts, key=len)


class _Checked:
    """Mixed in before a Click parameter type: the rules above, then the type's own convert."""

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            flag = flag_of(param)
            kind = getattr(self, "name", "")
            if value == "":
                what = "an empty path: give a file name" if kind in _PATHS else (
                    "empty: give a value")
                raise ClickUsageError(f"{flag} is {what}", ctx=ctx)
            if kind in _NUMBERS and not value.isascii():
                raise ClickUsageError(f"{flag} takes a number in ASCII digits (0-9); got "
                                       f"{shown(repr(value))}", ctx=ctx)
        return super().convert(value, param, ctx)


_SUBCLASSES: dict[type, type] = {}


def _checked_type(t):
    cls = type(t)
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Checked{cls.__name__}", (_Checked, cls), {})
    new = object.__new__(_SUBCLASSES[cls])
    new.__dict__.update(t.__dict__)
    return new


def harden(commands) -> None:
    """Apply the rules to every option of `commands` (Click commands, as Typer built them).
    Arguments keep their own messages (an empty TEXT is "empty: nothing to attend to")."""
    for command in commands:
        for param in getattr(command, "params", []):
            if (getattr(param, "param_type_name", "") != "option"
                    or isinstance(param.type, _Checked)):
                continue
            if getattr(param.type, "name", None) in _PATHS | _NUMBERS | _TEXT:
                param.type = _checked_type(param.type)
        if hasattr(command, "commands"):  # a group inside the group
            harden(command.commands.values())


_ESCAPED = re.compile(r"\\udc([89a-f][0-9a-f])")


def shown(text: str) -> str:
    """`text` with each undecodable command-line byte (a lone surrogate U+DC80…U+DCFF, raw or
    as repr() writes it, `\\udcff`) shown as the byte it was, `\\xff`."""
    text = "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c
                   for c in text)
    return _ESCAPED.sub(r"\\x\1", text)


def ascii_int(text: str) -> int:
    """int() of ASCII digits only (an optional sign, spaces around): ValueError otherwise."""
    stripped = text.strip()
    body = stripped[1:] if stripped[:1] in "+-" else stripped
    if not (body.isascii() and body.isdigit()):
        raise ValueError(text)
    return int(stripped)
