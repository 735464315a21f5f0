"""The explorer's app: the overview first, a head's screen on top of it, the keys that work
everywhere (help, the side panel, saving the screen, quitting).

It draws what `data.compute` made before it started; nothing here runs the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from textual.app import App
from textual.binding import Binding

from attn_tracer.explore.data import Explore
from attn_tracer.explore.overview import OverviewScreen
from attn_tracer.explore.panels import HelpScreen

INTERRUPTED = 130  # the exit code of Ctrl-C, as everywhere in attn


class ExploreApp(App):
    TITLE = "attn explore"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("q", "quit", show=False, priority=True),
        Binding("ctrl+c", "interrupt", show=False, priority=True, system=True),
        Binding("question_mark", "help", show=False),
        Binding("p", "panel", show=False),
        Binding("s", "save", show=False),
    ]

    def __init__(self, data: Explore, exit_after_first_frame: bool = False,
                 save_to: Path | None = None) -> None:
        super().__init__()
        self.data = data
        self.exit_after_first_frame = exit_after_first_frame
        self.save_to = save_to or Path.cwd()
        self.saved: list[Path] = []

    def on_mount(self) -> None:
        self.push_screen(OverviewScreen(self.data))

    def on_ready(self) -> None:
        # Ready: the first frame is on the screen (the start-up benchmark stops here).
        if self.exit_after_first_frame:
            self.exit(0)

    def action_quit(self) -> None:
        self.exit(0)

    def action_interrupt(self) -> None:
        self.exit(INTERRUPTED)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_panel(self) -> None:
        for side in self.screen.query("#side"):
            side.display = not side.display

    def action_save(self) -> None:
        from attn_tracer.commands.save import write_atomic
        from attn_tracer.render.terminal import offline_svg

        path = next_free(self.save_to)
        try:
            write_atomic(path, offline_svg(self.export_screenshot(title="attn explore")).encode())
        except Exception as e:  # a full disk or a read-only directory: say so, keep exploring
            self.notify(f"could not save {path}: {e}", severity="error")
            return
        self.saved.append(path)
        self.notify(f"saved {path}")


def next_free(folder: Path) -> Path:
    """attn-explore-N.svg in `folder`, N the first number not taken: nothing is overwritten."""
    n = 1
    while (path := folder / f"attn-explore-{n}.svg").exists() or os.path.islink(path):
        n += 1
    return path
