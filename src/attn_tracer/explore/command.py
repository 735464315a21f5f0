"""`attn explore`: the checks and the run, then the app.

Everything that can fail for a reason of the user's fails here, before the terminal is taken
over: one line on stderr and exit 2 (or 1), as in `attn trace`, never a half-drawn screen.
Textual is imported only on this path, in a thread that starts while the model runs, so no
other command ever pays for it (its import takes about as long as the whole of `attn trace`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
from collections.abc import Callable
from importlib.util import find_spec
from typing import Any

from attn_tracer.errors import AttnError, UsageError

INSTALL = 'pip install "attn-tracer[explore]"'
SERIAL_IMPORT = "ATTN_EXPLORE_SERIAL_IMPORT"  # benchmarks/run.py, figure i


def check_terminal() -> None:
    """The app reads keys from standard input and draws on standard error (as every Textual
    app does, leaving standard output free): both must be the terminal."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        which = "error" if sys.stdin.isatty() else "input"
        raise UsageError(f"attn explore is interactive and its standard {which} is not a "
                         "terminal; for a pipe or a file use attn trace or attn heads")


def _import_app() -> None:
    # A failure is the main thread's to report, when it imports the app itself.
    with contextlib.suppress(Exception):
        import attn_tracer.explore.app  # noqa: F401


def execute(r: Any, notice: Callable[[str], None], exit_after_first_frame: bool = False
            ) -> int:
    """Run the explorer; its exit code (0, or 130 when Ctrl-C ended it)."""
    if find_spec("textual") is None:
        raise AttnError(f"attn explore needs Textual, which is not installed: {INSTALL}")
    check_terminal()
    # Textual's import (0.2-1 s) overlaps the run; the thread only imports modules. The
    # start-up benchmark turns it off with SERIAL_IMPORT to measure what it saves.
    loader = threading.Thread(target=_import_app, name="import textual", daemon=True)
    if not os.environ.get(SERIAL_IMPORT):
        loader.start()
    from attn_tracer.explore.data import compute

    # Textual takes NO_COLOR out of the environment when the app is made: read it first.
    color = os.environ.get("NO_COLOR", "") == ""
    said: list[str] = []
    data = compute(r, said.append, shutil.get_terminal_size().columns, color)
    for message in said:  # above the app's screen, and there again after it ends
        notice(message)
    if loader.is_alive():
        loader.join()
    from attn_tracer.explore.app import ExploreApp

    app = ExploreApp(data, exit_after_first_frame=exit_after_first_frame)
    result = app.run()
    return result if isinstance(result, int) else (app.return_code or 0)
