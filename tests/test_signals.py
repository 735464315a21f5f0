"""Signals, pipes and terminals, in real processes: Ctrl-C ends with exit 130 and one line, a
closed pipe ends quietly, and TERM=dumb, NO_COLOR and COLUMNS=40 give readable output.

Terminal cases run `attn` on a pseudo-terminal (pty), so Rich sees a real terminal and would
color its output unless told not to: a pipe alone would prove nothing about NO_COLOR.
"""

from __future__ import annotations

import fcntl
import json
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


def _default_signals(then=None):
    """A preexec_fn: the signals these tests send reach attn with their default disposition,
    even when the suite runs where they arrive ignored (under nohup, SIGHUP; in a background
    job of a script, SIGINT), which the child would inherit — and attn rightly keeps an
    inherited SIG_IGN (test_an_ignored_signal_stays_ignored)."""
    def preexec() -> None:
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        if then is not None:
            then()
    return preexec


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

@pytest.mark.slow
def test_ctrl_c_during_a_long_run_exits_130_with_one_line():
    long_text = " ".join(["word"] * 900)
    proc = subprocess.Popen(
        [*ATTN, "trace", long_text, "--d-model", "768", "--heads", "12", "--layers", "12",
         "--layer", "all", "--engine", "numpy", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), stdin=subprocess.DEVNULL,
        preexec_fn=_default_signals())
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

@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ── issue 12: streams the parent closed or that refuse the bytes ─────────────────────────────

def _one_line(proc: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    err = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == code, (proc.returncode, err)
    assert proc.stdout in (b"", None), proc.stdout[:200]
    assert err.splitlines() == [err.strip()] and err.startswith("attn: error: "), err
    assert fragment in err and "Traceback" not in err and "report it" not in err, err


def _attn(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
    return subprocess.run([*ATTN, *args], env=kwargs.pop("env", _env()), timeout=60, **kwargs)


def test_a_closed_stdout_is_one_line():
    proc = _attn(["trace", "hi", *TINY], stdout=None, stderr=subprocess.PIPE,
                 preexec_fn=lambda: os.close(1))
    _one_line(proc, 1, "standard output is closed")


@pytest.mark.parametrize("debug", ["0", "1"])
def test_a_closed_stdout_with_a_usage_error_and_debug(debug: str):
    proc = _attn(["trace", "hi", "--heads", "5"], stdout=None, stderr=subprocess.PIPE,
                 preexec_fn=lambda: os.close(1), env=_env(ATTN_DEBUG=debug))
    _one_line(proc, 1, "standard output is closed")


def test_a_closed_stderr_does_not_break_a_run_or_reach_stdout():
    ok = _attn(["trace", "hi", *TINY], stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    assert ok.returncode == 0 and ok.stdout.startswith(b"attn trace")
    bad = _attn(["trace", "hi", "--heads", "5"], stdout=subprocess.PIPE,
                preexec_fn=lambda: os.close(2))
    assert bad.returncode == 2 and bad.stdout == b""


@pytest.mark.slow
@pytest.mark.parametrize("args", [["trace", "hi", *TINY], ["trace", "hi", *TINY, "--json"],
                                  ["tokens", "hi"], ["--help"], ["schema"]],
                         ids=["view", "json", "tokens", "help", "schema"])
def test_a_full_disk_on_stdout_is_one_line(args: list[str]):
    with open("/dev/full", "wb") as full:
        proc = _attn(args, stdout=full, stderr=subprocess.PIPE)
    _one_line(proc, 1, "cannot write the output to standard output: No space left on device")


def test_stdout_open_for_reading_only_is_one_line():
    with open(os.devnull, "rb") as readonly:
        proc = _attn(["trace", "hi", *TINY], stdout=readonly, stderr=subprocess.PIPE)
    _one_line(proc, 1, "Bad file descriptor")


def _file_limit(size: int):
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def test_a_file_size_limit_on_stdout_is_one_line(tmp_path):
    with open(tmp_path / "out", "wb") as out:
        proc = _attn(["trace", " ".join(["word"] * 300), *TINY, "--layer", "all"], stdout=out,
                     stderr=subprocess.PIPE, preexec_fn=_file_limit(4096))
    _one_line(proc, 1, "File too large")


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_file_size_limit_on_save_leaves_nothing(tmp_path, suffix: str):
    proc = _attn(["trace", " ".join(["word"] * 300), *TINY, "--save", str(tmp_path / f"t{suffix}")],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_file_limit(65536),
                 cwd=tmp_path)
    _one_line(proc, 1, "File too large")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_closed_pipe_at_once_is_exit_0_for_help_and_version():
    # `attn --help | true` under pipefail: the reader is gone before the first write.
    for args in (["--help"], ["--version"], ["trace", "--help"], [], ["tokens", "hi"],
                 ["schema"]):
        read, write = os.pipe()
        os.close(read)
        proc = subprocess.run([*ATTN, *args], stdout=write, stderr=subprocess.PIPE, env=_env(),
                              timeout=60, stdin=subprocess.DEVNULL)
        os.close(write)
        assert proc.returncode == 0, (args, proc.stderr.decode())
        assert proc.stderr == b"", (args, proc.stderr.decode())


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
@pytest.mark.parametrize("args", [["--help"], ["trace", "--help"], [], ["trace", SENTENCE, *TINY],
                                  ["tokens", "hi"]],
                         ids=["help", "trace-help", "no-args", "trace", "tokens"])
def test_an_encoding_without_the_labels_is_refused_before_printing(encoding, args):
    proc = _attn(args, env=_env(PYTHONIOENCODING=encoding))
    _one_line(proc, 1, "standard output's encoding is ")  # Python names latin-1 iso8859-1
    assert proc.stderr.isascii()


@pytest.mark.parametrize("args", [["trace", SENTENCE, *TINY, "--json"], ["schema"],
                                  ["--version"], ["tokens", SENTENCE, "--json"]],
                         ids=["json", "schema", "version", "tokens-json"])
def test_json_is_utf8_whatever_the_encoding(args):
    proc = _attn(args, env=_env(PYTHONIOENCODING="ascii"))
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode("utf-8")
    if args[0] != "--version":
        json.loads(text)
    if "--json" in args:
        assert "今" in text or "\\u" not in text


@pytest.mark.slow
@pytest.mark.parametrize("columns", ["0", "5", "100000"])  # more in test_properties.py
def test_degenerate_columns(columns: str):
    for args in (["trace", SENTENCE, *TINY, "--stages", "--predict"], ["tokens", SENTENCE],
                 ["--help"]):
        proc = _attn(args, env=_env(COLUMNS=columns, LINES="0"))
        assert proc.returncode == 0, (columns, args, proc.stderr.decode())
        assert proc.stderr == b"" or b"untrained" not in proc.stderr
        widest = max(cell_len(line) for line in proc.stdout.decode().splitlines())
        assert widest <= 1000, (columns, args, widest)


# ── issue 12: signals while a file is written, and from the first moment ─────────────────────

@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize(("signum", "code", "word"), [
    (signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGHUP, 129, "hung up (SIGHUP)"),
    (signal.SIGINT, 130, "interrupted")], ids=["TERM", "HUP", "INT"])
def test_a_signal_while_save_is_written_leaves_nothing(tmp_path, suffix, signum, code, word):
    target = tmp_path / f"big{suffix}"
    # The write runs at the disk's speed (one copy of each tensor, uncompressed): enough layers
    # that it lasts long enough to be caught.
    size = ["--d-model", "64", "--layers", "4"] if suffix == ".npz" else [
        "--d-model", "256", "--layers", "48"]
    proc = subprocess.Popen(
        [*ATTN, "trace", " ".join(["word"] * 400), *size, "--heads", "4", "--engine", "numpy",
         "--save", str(target)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), stdin=subprocess.DEVNULL,
        preexec_fn=_default_signals())
    deadline, writing = time.monotonic() + 120, False
    while time.monotonic() < deadline and proc.poll() is None and not writing:
        # The temporary file with bytes in it (the target's probe before the run is empty).
        writing = any(p.name.startswith(f".{target.name}.") and _size(p) > 0
                      for p in tmp_path.iterdir())
        time.sleep(0.002)
    assert writing, "the save was never caught being written; make the run bigger"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert out == b"" and err.decode().splitlines() == [f"attn: error: {word}"]
    assert list(tmp_path.iterdir()) == [], "a temporary file was left behind"


def _size(path) -> int:
    """The file's size, 0 if it is gone already (renamed to its target between two looks)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                              (signal.SIGHUP, 129)])
def test_a_signal_during_the_imports_is_one_line(signum, code):
    # The signal is sent at once but held (blocked) until attn installs its handlers, which it
    # does before importing Typer: delivered then, it lands in the middle of the imports.
    proc = subprocess.Popen([*ATTN, "trace", "hi"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(), stdin=subprocess.DEVNULL,
                            preexec_fn=_default_signals(
                                lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signum})))
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert out == b"" and len(err.decode().splitlines()) == 1 and b"Traceback" not in err


@pytest.mark.slow
def test_an_ignored_signal_stays_ignored():
    # `nohup attn …`: SIGHUP was set to be ignored, and attn leaves it so.
    # 48 layers: the run must outlast the 2 s below even on a quiet machine (6 once took 1.95 s).
    proc = subprocess.Popen([*ATTN, "trace", " ".join(["word"] * 900), "--d-model", "768",
                             "--layers", "48", "--engine", "numpy", "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
                            stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    time.sleep(1.5)
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    alive = proc.poll() is None
    proc.terminate()
    proc.communicate(timeout=60)
    assert alive, "SIGHUP ended a run that was started with SIGHUP ignored"
