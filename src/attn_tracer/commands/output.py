"""Every command's outputs in one place: stdout's form and the files beside it.

stdout carries one thing: the view, or a JSON document (`--json`), or JSON Lines. The files
(`--svg`, `--html`, a command's own such as `--save`) are

- checked before the run (`check_files`: the suffix, an existing file without --force, a place
  we cannot write, two flags naming one file), so that a run never ends at its last step on a
  name it could have refused at its first;
- drawn the same whatever stdout is (`Views`): an SVG made by a script from a pipe is the
  figure made by hand in a terminal — in colour, with its legend, at --width or
  FILE_WIDTH columns (or the terminal's, or $COLUMNS);
- written by `emit` after the view or the document is whole, each atomically, and kept only if
  stdout is written too: a run that cannot write its stdout (a full disk, a signal) leaves no
  file behind.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from attn_tracer.errors import UsageError

FILE_WIDTH = 120  # columns of --svg/--html when neither --width, a terminal nor COLUMNS says
WIDTHS = (40, 1000)  # what --width accepts
VIEW_SUFFIXES = {"--svg": (".svg",), "--html": (".html", ".htm")}

Writer = Callable[[], None]  # writes one file, atomically (commands/save.py)


def check_width(width: int | None) -> None:
    if width is not None and not WIDTHS[0] <= width <= WIDTHS[1]:
        raise UsageError(f"--width must be between {WIDTHS[0]} and {WIDTHS[1]} columns; "
                         f"got {width}")


def check_files(targets: dict[str, tuple[Path | None, tuple[str, ...]]], force: bool) -> None:
    """Refuse, before any work, file targets we could not or should not write.

    `targets`: each file flag the command has → (its path or None, the suffixes it takes).
    """
    from attn_tracer.commands.save import check_target

    given = {flag: path for flag, (path, _) in targets.items() if path is not None}
    for flag, path in given.items():
        check_target(path, force, flag, targets[flag][1])
    if len({p.resolve() for p in given.values()}) < len(given):
        flags = list(targets)
        raise UsageError(f"{', '.join(flags[:-1])} and {flags[-1]} must name different files")


def buffer_like(target, record: bool = False, width: int | None = None):
    """A Console writing to memory with `target`'s width (or `width`) and colors: a view is
    rendered whole there, and printed only once nothing can fail any more."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=width or target.width,
                   color_system=target.color_system, force_terminal=target.is_terminal,
                   no_color=target.no_color,
                   legacy_windows=False, highlight=False, record=record)


def file_width(width: int | None, target) -> int:
    """The columns of a saved view: --width, else the terminal's (or $COLUMNS), else FILE_WIDTH."""
    if width:
        return width
    return target.width if target.is_terminal or "COLUMNS" in os.environ else FILE_WIDTH


def file_console(width: int):
    """The console a saved view is drawn on: in colour and recorded, whatever stdout is."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=width, color_system="truecolor",
                   force_terminal=True, no_color=False, legacy_windows=False, highlight=False,
                   record=True)


@dataclass
class Views:
    """A command's view, drawn for stdout, for its --svg/--html files, or for both.

    `draw(console, for_files)` renders the view onto a console (`for_files`: the files' own
    console, in colour at their width). Drawn once when the terminal's console would give the
    files the same picture (a truecolor terminal of the files' width), else once for each.
    """

    target: object  # the stdout Console (its width, colors, is_terminal)
    title: str  # the SVG's window title: "attn trace"
    svg: Path | None = None
    html: Path | None = None
    width: int | None = None  # --width
    on_screen: bool = True  # stdout shows the view (not --json)

    @property
    def files(self) -> bool:
        return self.svg is not None or self.html is not None

    @property
    def screen_width(self) -> int:
        return self.width or self.target.width

    @property
    def saved_width(self) -> int:
        return file_width(self.width, self.target)

    def shared(self) -> bool:
        """Whether one drawing serves stdout and the files."""
        t = self.target
        return (self.on_screen and self.files and t.is_terminal and not t.no_color
                and t.color_system == "truecolor" and self.screen_width == self.saved_width)

    def render(self, draw: Callable[[object, bool], None]
               ) -> tuple[object | None, object | None]:
        """(the stdout console, the files' console), each None where not needed."""
        screen = saved = None
        if self.on_screen:
            screen = buffer_like(self.target, record=self.shared(), width=self.screen_width)
            draw(screen, False)
        if self.files:
            if self.shared():
                saved = screen
            else:
                saved = file_console(self.saved_width)
                draw(saved, True)
        return screen, saved

    def writers(self, saved) -> list[Writer]:
        """The writes of --svg and --html from the files' console."""
        from attn_tracer.commands.save import write_atomic
        from attn_tracer.render.terminal import export_svg

        out: list[Writer] = []
        if self.svg is not None:
            out.append(lambda: write_atomic(self.svg, export_svg(saved, self.title).encode()))
        if self.html is not None:
            out.append(lambda: write_atomic(self.html, saved.export_html(clear=False).encode()))
        return out


def emit(stdout: str | bytes | Callable[[BinaryIO], None] | None,
         files: Iterable[Writer] = ()) -> None:
    """Write the files, then stdout (the view's text, a document's bytes, or a function that
    streams into the binary stdout). Staged: a file is kept only if stdout is written too."""
    from attn_tracer.commands.save import staged

    with staged():
        for write in files:
            write()
        if isinstance(stdout, str):
            sys.stdout.write(stdout)
        elif isinstance(stdout, bytes):
            sys.stdout.buffer.write(stdout)
        elif stdout is not None:
            stdout(sys.stdout.buffer)
        sys.stdout.flush()
