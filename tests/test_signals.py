"""Signals, pipes and terminals, in real processes: Ctrl-C ends with exit 130 and one line, a
closed pipe ends quietly, and TERM=dumb, NO_COLOR and COLUMNS=40 give readable output.

Terminal cases run `attn` on a pseudo-terminal (pty), so Rich sees a real terminal and would
color its output unless told not to: a pipe alone would prove nothing about NO_COLOR.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from rich.cells import cell_len

ATTN = [sys.executable, "-m", "attn_tracer"]
TINY = ["--d-model", "64", "--heads", "4", "--layers", "1", "--engine", "numpy"]
ESCAPE = re.compile(r"\x1b[\[\]()#;?]*[0-9;:]*[ -/]*[@-~]|\x1b.")
SENTENCE = "The cat sat on the mat 今天天气很好 🙂 [bold]x[/]"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "TERM", "ATTN_DEBUG",
                        "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CLICOLOR_FORCE")}
    env.update({"TERM": "xterm-256color", **extra})
    return env


def run_on_a_terminal(args: list[str], env: dict[str, str], columns: int = 100,
                      timeout: float = 60) -> tuple[int, str, str]:
    """Run `attn` with stdout on a pty of `columns` columns; (exit code, stdout, stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR  # keep "\n" as it was written
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    proc = subprocess.Popen([*ATTN, *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=subprocess.PIPE, env=env)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    code = proc.wait(timeout=10)
    return code, b"".join(chunks).decode("utf-8"), proc.stderr.read().decode("utf-8")


def run_in_a_pipe(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*ATTN, *args], capture_output=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL)


# ── Ctrl-C ───────────────────────────────────────────────────────────────────────────────────

def test_ctrl_c_during_a_long_run_exits_130_with_one_line():
    long_text = " ".join(["word"] * 900)
    proc = subprocess.Popen(
        [*ATTN, "trace", long_text, "--d-model", "768", "--heads", "12", "--layers", "12",
         "--layer", "all", "--engine", "numpy", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), stdin=subprocess.DEVNULL)
    time.sleep(1.5)  # past the imports: the model is running
    assert proc.poll() is None, "the run ended before it could be interrupted; make it longer"
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 5, "Ctrl-C was not acted on promptly"
    assert proc.returncode == 130, err
    assert out == b"", "an interrupted run wrote to stdout"
    lines = err.decode().splitlines()
    assert lines == ["attn: error: interrupted"], lines


# ── a closed pipe ────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("read_first_line", [True, False], ids=["head-1", "closed-at-once"])
@pytest.mark.parametrize("json_", [False, True], ids=["view", "json"])
def test_a_closed_pipe_ends_quietly(read_first_line: bool, json_: bool):
    # Enough output to overflow the pipe's buffer, so the write really meets the closed end.
    text = " ".join(["word"] * 300)
    args = [*ATTN, "trace", text, *TINY, "--layer", "all"] + (["--json"] if json_ else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                            stdin=subprocess.DEVNULL)
    if read_first_line:
        first = proc.stdout.readline()
        assert first.strip(), "no output before the pipe was closed"
    proc.stdout.close()  # what `| head -1` does after its line
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=60)
    assert code == 0, err
    assert err == "", err


def test_a_closed_pipe_in_a_shell_pipeline():
    cmd = (f"{sys.executable} -m attn_tracer trace \"$(printf 'word %.0s' $(seq 300))\" "
           f"{' '.join(TINY)} --layer all | head -1; echo \"status ${{PIPESTATUS[0]}}\"")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, env=_env(), timeout=60)
    assert proc.stderr == b"", proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 2 and lines[0].startswith("attn trace")
    assert lines[1] == "status 0"


# ── terminals ────────────────────────────────────────────────────────────────────────────────

def _readable(view: str) -> None:
    """The content a reader needs, whatever the terminal: labels, shapes, the maps."""
    assert "attn layer 0 head 0" in view
    assert "blocks.0" in view and "[1, 4, 24, 24]" in view  # SENTENCE is 24 tokens
    assert "9:天" in view and "19:bold" in view and "␣🙂" in view
    assert "\ufffd" not in view


def test_a_terminal_gets_color_and_the_same_content():
    # The control case: on a terminal with no switches Rich colors the view. Without it the
    # NO_COLOR and TERM=dumb tests below could pass for the wrong reason.
    code, out, err = run_on_a_terminal(["trace", SENTENCE, *TINY], _env())
    assert code == 0, err
    assert ESCAPE.search(out)
    _readable(ESCAPE.sub("", out))


@pytest.mark.parametrize("switch", [{"NO_COLOR": "1"}, {"TERM": "dumb"}],
                         ids=["NO_COLOR", "TERM=dumb"])
@pytest.mark.parametrize("command", ["trace", "tokens"])
def test_no_escape_codes(switch: dict[str, str], command: str):
    args = ["trace", SENTENCE, *TINY, "--stages"] if command == "trace" else ["tokens", SENTENCE]
    code, out, err = run_on_a_terminal(args, _env(**switch))
    assert code == 0, err
    assert "\x1b" not in out, repr(out[:300])
    if command == "trace":
        _readable(out)
    else:
        assert "天" in out and "bold" in out and "␣cat" in out
    # The same content as in a pipe (never colored), at the same width: the pty's 100 columns,
    # or Rich's 80 on a dumb terminal, whose size it does not trust.
    width = "80" if switch.get("TERM") == "dumb" else "100"
    piped = run_in_a_pipe(args, _env(**{**switch, "COLUMNS": width}))
    assert piped.returncode == 0
    assert out == piped.stdout.decode()


@pytest.mark.parametrize("where", ["terminal", "pipe"])
@pytest.mark.parametrize("extra", [
    [], ["--stages"], ["--predict"], ["--values", "--d-model", "4", "--heads", "2"],
    ["a second, longer text 今天天气很好", "--cross", "le chat noir", "--layer", "all"],
    [" ".join(["word"] * 200)],
], ids=["view", "stages", "predict", "values", "batch-cross", "long"])
def test_columns_40_keeps_every_line_within_40_cells(where: str, extra: list[str]):
    text = "猫 sat 🙂 [red]" if "--values" in extra else SENTENCE  # --values: ≤ 16 tokens
    args = ["trace", text, *TINY, *extra]
    if where == "terminal":
        code, out, err = run_on_a_terminal(args, _env(COLUMNS="40"), columns=120)
    else:
        proc = run_in_a_pipe(args, _env(COLUMNS="40"))
        code, out, err = proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    assert code == 0, err
    plain = ESCAPE.sub("", out)
    too_wide = [line for line in plain.splitlines() if cell_len(line) > 40]
    assert not too_wide, "\n".join(too_wide[:5])
    assert "🙂" in plain and "attn layer 0 head 0" in plain


def test_tokens_table_at_40_columns():
    proc = run_in_a_pipe(["tokens", SENTENCE], _env(COLUMNS="40"))
    assert proc.returncode == 0
    lines = proc.stdout.decode().splitlines()
    assert lines and all(cell_len(line) <= 40 for line in lines)


def test_dash_with_a_terminal_on_stdin_refuses_instead_of_waiting():
    # `attn trace -` typed at a prompt, with nothing piped in: a clear error, not a hang.
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([*ATTN, "trace", "-", *TINY], stdin=slave, capture_output=True,
                              env=_env(), timeout=30)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 2
    assert proc.stdout == b""
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("attn: error: - reads standard input, but nothing is piped in")
