"""The README is the first thing a user reads: its sample output and its test command are real."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from attn_tracer.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_sample_output_is_what_the_tool_prints():
    block = re.search(r"```\n\$ attn trace (.+?)\n(.*?)```", README, re.S)
    assert block, "the README's sample block is missing"
    command, shown = block.group(1), block.group(2)
    assert command == '"The cat sat on the mat" --head 0,1'
    result = CliRunner().invoke(app, ["trace", "The cat sat on the mat", "--head", "0,1"],
                                env={"COLUMNS": "100", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.stderr
    actual = "\n".join(line.rstrip() for line in result.stdout.rstrip("\n").splitlines())
    assert actual == shown.rstrip("\n")


def test_attribute_sample_is_what_the_tool_prints():
    block = re.search(r"```\n\$ attn attribute (.+?)\n(.*?)```", README, re.S)
    assert block, "the README's attn attribute sample is missing"
    command, shown = block.group(1), block.group(2)
    result = CliRunner().invoke(app, ["attribute", *shlex.split(command)],
                                env={"COLUMNS": "100", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.stderr
    actual = "\n".join(line.rstrip() for line in result.stdout.rstrip("\n").splitlines())
    assert actual == shown.rstrip("\n")
    assert "--ablate" in command and "--versus" in command  # the sample shows both


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```sh\n(python3 -m venv .+?)\n```", README)
    assert len(commands) == 2, "the README shows two commands: run the tool, run the tests"
    test_command = commands[1].split(" && ", 1)[1]  # after creating and activating the venv
    assert test_command.split(" && ")[-1] == "pytest"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command.replace(". .venv/bin/activate && ", "") in ci
