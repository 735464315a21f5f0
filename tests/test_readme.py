"""The README is the first thing a user reads: its sample output and its test command are real."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
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
    # A failure inside an && list does not stop `set -e` when other commands follow it.
    line = next(line for line in ci.splitlines() if line.endswith(("&& pytest", "|| exit 1"))
                and "pytest" in line)
    assert line.endswith("|| exit 1") or line == ci.strip().splitlines()[-1], line


@pytest.mark.slow
def test_learning_walkthrough_shows_what_each_command_prints():
    """Each block of "Learning attention with attn": its command's real output, excerpted; the
    lines between two `…` markers are consecutive lines of the output, in order."""
    import shlex

    section = README.split("## Learning attention with attn", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n\$ (attn .+?)\n(.*?)```", section, re.S)
    assert len(blocks) >= 12, "the walkthrough lost a step"
    commands = [command for command, _ in blocks]
    for needle in ("--d-head 3", "--pad-to 16", "--stages", "--circuits", "--cost", "--cross",
                   "-T 0.5", "-T 2"):
        assert any(needle in c for c in commands), needle
    runner = CliRunner()
    for command, shown in blocks:
        args = shlex.split(command)[1:]
        result = runner.invoke(app, args, env={"COLUMNS": "100", "NO_COLOR": "1"})
        assert result.exit_code == 0, (command, result.stderr)
        actual = [line.rstrip() for line in result.stdout.splitlines()]
        at = 0
        for chunk in shown.rstrip("\n").split("\n…\n"):
            lines = chunk.split("\n")
            found = next((i for i in range(at, len(actual) - len(lines) + 1)
                          if actual[i:i + len(lines)] == lines), None)
            assert found is not None, (command, chunk)
            at = found + len(lines)


def test_ci_runs_the_readme_command_on_the_installed_wheel():
    commands = re.findall(r"```sh\n(python3 -m venv .+?)\n```", README)
    run_command = commands[0].split(" && ")[-1]  # after the installation
    assert run_command.startswith("attn trace ")
    wheel = (ROOT / ".ci" / "wheel").read_text(encoding="utf-8")
    assert f"\n{run_command} " in wheel
    assert "bash .ci/wheel" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_heads_sample_output_is_what_the_tool_prints():
    block = re.search(r"```\n\$ attn heads (.+?)\n(.*?)```", README, re.S)
    assert block, "the README's attn heads sample block is missing"
    command, shown = block.group(1), block.group(2)
    args = ["The cat sat on the mat. The cat sat on the mat.", "--sort", "induction", "--top", "5"]
    assert command == '"The cat sat on the mat. The cat sat on the mat." --sort induction --top 5'
    result = CliRunner().invoke(app, ["heads", *args], env={"COLUMNS": "100", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.stderr
    actual = "\n".join(line.rstrip() for line in result.stdout.rstrip("\n").splitlines())
    assert actual == shown.rstrip("\n")


def test_heads_definitions_are_the_ones_the_tool_uses():
    from attn_tracer.analysis.head_definitions import DEFINITIONS, NOTES

    for name, (formula, words) in DEFINITIONS.items():
        assert f"| `{name}` | {formula} | {words} |" in README, name
    assert NOTES in README


def test_checkpoint_tokenizer_sample_is_what_the_tool_prints(tmp_path):
    """The `attn tokens --weights DIR` block, with the Unigram tokenizer the tests make."""
    pytest.importorskip("tokenizers")
    import tokenizer_files

    block = re.search(r"```\n\$ attn tokens --weights DIR \$'(.+?)'\n(.*?)```", README, re.S)
    assert block, "the README's attn tokens --weights sample is missing"
    tokenizer_files.unigram(tmp_path)
    text = block.group(1).replace("\\n", "\n")
    result = CliRunner().invoke(app, ["tokens", "--weights", str(tmp_path), text],
                                env={"COLUMNS": "100", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.stderr
    actual = "\n".join(line.rstrip() for line in result.stdout.splitlines())
    assert actual.replace(str(tmp_path), "DIR") == block.group(2).rstrip("\n")
