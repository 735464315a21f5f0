"""Every command that runs the model opens the same session and writes through the same outputs.

These are the cases that drifted while each command wrote the run sequence out for itself
(`attn explore` ignored --pad-to and read a checkpoint's every tensor before its memory
limit; `attn heads --svg` kept its file when stdout failed). Each case runs through every
command, so a new command added to COMMANDS inherits them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import heads_model
from attn_tracer.commands import attribute, heads, run
from attn_tracer.commands.session import SharedOptions
from attn_tracer.errors import UsageError
from attn_tracer.explore import data as explore_data
from attn_tracer.model import memory

SMALL = {"d_model": 16, "heads": 2, "layers": 1, "engine": "numpy"}
TEXT = "The cat sat on the mat"


def _trace(fields: dict, notice):
    return run.compute(run.Request(**fields), notice)[0]


def _heads(fields: dict, notice):
    return heads.compute(SharedOptions.of(fields), heads.HeadsOptions(), notice).trace


def _attribute(fields: dict, notice):
    request = attribute.AttributeRequest(SharedOptions.of(fields))
    return attribute.compute(request, notice).trace


def _explore(fields: dict, notice):
    return explore_data.compute(SharedOptions.of(fields), notice, 80).trace


# Each command's compute step, in-process: the shared fields in, the run's Trace out.
COMMANDS = {"trace": _trace, "heads": _heads, "attribute": _attribute, "explore": _explore}
# The commands a subprocess can run to the end without a terminal.
PRINTING = ("trace", "heads", "attribute")


@pytest.mark.parametrize("command", COMMANDS)
def test_pad_to_pads_in_every_command(command: str):
    trace = COMMANDS[command]({"texts": [TEXT], "pad_to": 16, **SMALL}, [].append)
    (only,) = trace.inputs
    assert (only.length, only.padding) == (6, 10)
    assert trace.step("tokens").shape == (1, 16)


@pytest.mark.parametrize("command", COMMANDS)
def test_the_memory_limit_reaches_the_checkpoint_loader(command: str, monkeypatch):
    # The loader refuses a checkpoint from its header when it is given the limit: a command
    # that forgot to pass it would read every tensor first.
    seen = []
    build = run.build_config

    def spy(model, notice=lambda message: None, max_bytes=None):
        seen.append(max_bytes)
        return build(model, notice, max_bytes)

    monkeypatch.setattr(run, "build_config", spy)
    COMMANDS[command]({"texts": [TEXT], "max_memory": "3G", **SMALL}, [].append)
    assert seen == [memory.parse_size("3G")]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_checkpoint_over_the_limit_is_refused_from_its_header(command: str, tmp_path,
                                                                monkeypatch):
    directory = heads_model.save(tmp_path / "known")
    from attn_tracer.model.arch import gpt2_map  # GPT-2's name map (model/arch/)

    def no_copy(*args, **kwargs):
        raise AssertionError("a tensor was copied before the memory check")

    monkeypatch.setattr(gpt2_map, "_canonical_params", no_copy)
    with pytest.raises(UsageError, match=r"need about .* over the 1\.0 KB allowed"):
        COMMANDS[command]({"texts": [TEXT], "weights": str(directory), "max_memory": "1K",
                           "engine": "numpy"}, [].append)


ATTN = [sys.executable, "-m", "attn_tracer"]
TINY = ["--d-model", "16", "--heads", "2", "--layers", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("json_", [False, True], ids=["view", "json"])
@pytest.mark.parametrize("command", PRINTING)
def test_a_full_stdout_leaves_no_file(command: str, json_: bool, tmp_path: Path):
    svg = tmp_path / "view.svg"
    args = [command, TEXT, *TINY, "--svg", str(svg), *(["--json"] if json_ else [])]
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR")}
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([*ATTN, *args], stdin=subprocess.DEVNULL, stdout=full,
                              stderr=subprocess.PIPE, env=env, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "No space left on device" in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", PRINTING)
def test_a_saved_view_does_not_depend_on_stdout(command: str, tmp_path: Path):
    """The same SVG from a pipe and from a terminal (a pty): in colour, at the same width."""
    import pty

    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(COLUMNS="100", TERM="xterm-256color", COLORTERM="truecolor")
    piped, on_tty = tmp_path / "piped.svg", tmp_path / "tty.svg"
    subprocess.run([*ATTN, command, TEXT, *TINY, "--svg", str(piped)], env=env, check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=60)
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout is the pseudo-terminal
        os.execvpe(ATTN[0], [*ATTN, command, TEXT, *TINY, "--svg", str(on_tty)], env)
    while True:  # drain the terminal until the child closes it
        try:
            if not os.read(fd, 65536):
                break
        except OSError:
            break
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    a, b = piped.read_text(), on_tty.read_text()
    assert a == b
    assert "fill=\"#" in a  # coloured text, not the plain view of a pipe
