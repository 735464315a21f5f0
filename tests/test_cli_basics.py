"""The command line's basics: version, help, `attn tokens` in its forms, errors, start-up cost.

Ids are facts about GPT-2 (checked against tiktoken in test_tokens.py); here the point is what
the command line does with them: JSON that parses, a table a person can read, one-line errors.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest
import typer

from attn_tracer.cli import app

ROOT = Path(__file__).resolve().parent.parent
HEX = re.compile(r"^(?:[0-9a-f]{2})+$")
# SGR parameters that set a colour: 30–38/39, 40–48/49, 90–97, 100–107.
_COLOR_SGR = re.compile(r"^(?:3[0-9]|4[0-9]|9[0-7]|10[0-7])$")


def _json(result) -> list[dict]:
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


def _one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("attn: error: "), lines[0]
    return lines[0]


# ── version and help ──────────────────────────────────────────────────────────────────────────


def test_version(runner):
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"attn {version('attn-tracer')}\n"


def test_python_dash_m_version():
    proc = subprocess.run([sys.executable, "-m", "attn_tracer", "--version"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"attn {version('attn-tracer')}\n"


COMMANDS = sorted(typer.main.get_command(app).commands)


def test_the_commands():
    assert {"tokens", "trace", "schema"} <= set(COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], *[[c] for c in COMMANDS]],
                         ids=lambda a: " ".join(a) or "attn")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_shows_an_example(runner, args, flag):
    result = runner.invoke(app, [*args, flag])
    assert result.exit_code == 0, result.stderr
    assert "Usage: attn" in result.stdout
    assert "Example" in result.stdout
    # The example is a command line for this command.
    assert re.search(rf"attn {args[0] if args else '(tokens|trace)'} ", result.stdout)


def test_no_arguments_show_help(runner):
    result = runner.invoke(app, [])
    assert result.exit_code == 0
    assert "Usage: attn" in result.stdout


def test_shell_completion(runner):
    # What `attn --install-completion` wires into the shell: the shell calls attn back with
    # these variables set, and attn answers with the candidates, one a line.
    env = {"_ATTN_COMPLETE": "complete_bash", "COMP_WORDS": "attn tr", "COMP_CWORD": "1"}
    result = runner.invoke(app, [], env=env)
    assert (result.exit_code, result.stdout.split()) == (0, ["trace"])
    env |= {"COMP_WORDS": "attn trace --keep", "COMP_CWORD": "2"}
    assert runner.invoke(app, [], env=env).stdout.split() == ["--keep-newline"]
    result = runner.invoke(app, ["--show-completion", "bash"])
    assert result.exit_code == 0 and "_ATTN_COMPLETE=complete_bash" in result.stdout


# ── attn tokens ───────────────────────────────────────────────────────────────────────────────


def test_tokens_json(runner):
    doc = _json(runner.invoke(app, ["tokens", "hello world", "--json"]))
    assert [t["id"] for t in doc] == [31373, 995]
    assert [set(t) for t in doc] == [{"id", "text", "bytes"}] * 2
    assert [t["bytes"] for t in doc] == [b"hello".hex(), b" world".hex()]
    assert [t["text"] for t in doc] == ["hello", "␣world"]


def test_tokens_json_bytes_are_lowercase_hex_and_exact(runner):
    text = "今天天气很好 ÉTÉ 👍🏿\tTAB\n"
    doc = _json(runner.invoke(app, ["tokens", text, "--json"]))
    assert all(HEX.match(t["bytes"]) for t in doc)
    assert b"".join(bytes.fromhex(t["bytes"]) for t in doc) == text.encode()
    assert all(t["text"] for t in doc)


def test_tokens_from_file(runner, tmp_path):
    path = tmp_path / "in.txt"
    text = "今天天气很好\nhello world\n"
    path.write_text(text, encoding="utf-8")
    for flag in ("--file", "-f"):
        doc = _json(runner.invoke(app, ["tokens", flag, str(path), "--json"]))
        # The file's final newline ends it; the one inside is part of the text.
        assert b"".join(bytes.fromhex(t["bytes"]) for t in doc) == text[:-1].encode()


def test_tokens_from_stdin(runner):
    from_stdin = _json(runner.invoke(app, ["tokens", "-", "--json"], input="hello world"))
    assert [t["id"] for t in from_stdin] == [31373, 995]


def test_tokens_file_dash_reads_stdin(runner):
    doc = _json(runner.invoke(app, ["tokens", "--file", "-", "--json"], input="hello world"))
    assert [t["id"] for t in doc] == [31373, 995]


def test_tokens_allow_special(runner):
    text = "a<|endoftext|>b"
    plain = _json(runner.invoke(app, ["tokens", text, "--json"]))
    special = _json(runner.invoke(app, ["tokens", text, "--json", "--allow-special"]))
    assert 50256 not in [t["id"] for t in plain]
    assert [t["id"] for t in special].count(50256) == 1
    eot = next(t for t in special if t["id"] == 50256)
    assert eot["text"] == "<|endoftext|>"
    assert bytes.fromhex(eot["bytes"]) == b"<|endoftext|>"


def test_tokens_table(runner):
    result = runner.invoke(app, ["tokens", "hello world"])
    assert result.exit_code == 0, result.stderr
    assert "2 GPT-2 tokens" in result.stdout
    for cell in ("31373", "995", "hello", "␣world", "68 65 6c 6c 6f", "20 77 6f 72 6c 64"):
        assert cell in result.stdout


def test_tokens_table_names_split_characters(runner):
    result = runner.invoke(app, ["tokens", "今天天气很好"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    # 今 is e4 bb 8a: GPT-2 splits it into e4 bb | 8a; both rows say which character.
    assert next(line for line in lines if "<e4 bb>" in line).split()[-1] == "今"
    assert next(line for line in lines if "<8a>" in line).split()[-1] == "今"
    # 天 is one token: its row has the character as the label and nothing under "part of".
    row = next(line for line in lines if "e5 a4 a9" in line)
    assert row.split()[2] == "天"
    assert row.split()[-1] == "a9"


# ── errors ────────────────────────────────────────────────────────────────────────────────────


def _not_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    return path


ERRORS = {
    "missing file": (lambda tmp: ["tokens", "--file", str(tmp / "nope.txt")], None, "not found"),
    "directory": (lambda tmp: ["tokens", "--file", str(tmp)], None, "directory"),
    "non-UTF-8 stdin": (lambda tmp: ["tokens", "-"], b"caf\xe9 \xff", "UTF-8"),
    "non-UTF-8 file": (lambda tmp: ["tokens", "--file", str(_not_utf8(tmp))], None, "UTF-8"),
    "no input": (lambda tmp: ["tokens"], None, "no input"),
    "text and --file": (lambda tmp: ["tokens", "hi", "--file", str(_not_utf8(tmp))], None,
                        "not both"),
    "unknown option": (lambda tmp: ["tokens", "hi", "--bogus"], None, "--bogus"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_usage_errors_are_one_line(runner, tmp_path, case):
    make_args, stdin, expected = ERRORS[case]
    result = runner.invoke(app, make_args(tmp_path), input=stdin)
    line = _one_error_line(result, 2)
    assert expected in line


# ── start-up: no torch for tokens and help ────────────────────────────────────────────────────

_PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    heavy = ("torch", "transformers", "safetensors")
    import attn_tracer.cli
    seen = {"import attn_tracer.cli": [m for m in heavy if m in sys.modules]}
    for argv in json.loads(sys.argv[1]):
        sys.argv = ["attn", *argv]
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # --json writes to .buffer
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                attn_tracer.cli.main()
            except SystemExit as e:
                code = e.code
        seen[" ".join(argv)] = [m for m in heavy if m in sys.modules] + ([] if code in (0, None)
                                                                       else [f"exit {code}"])
    sys.__stdout__.write(json.dumps(seen))
""")


def test_tokens_and_help_do_not_import_torch():
    cases = [["tokens", "hello world"], ["tokens", "今天天气很好", "--json"], ["--help"],
             ["tokens", "--help"], ["trace", "--help"], ["schema", "--help"], ["--version"]]
    env = {k: v for k, v in os.environ.items() if k not in ("ATTN_DEBUG",)}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen == {k: [] for k in seen}
    assert len(seen) == len(cases) + 1


# ── colours ───────────────────────────────────────────────────────────────────────────────────


def _sgr(output: str) -> list[str]:
    """The parameters of every escape sequence in `output`; fails on any other kind of escape."""
    escapes = re.findall(r"\x1b.[^a-zA-Z]*[a-zA-Z]?", output)
    sgr = re.findall(r"\x1b\[([0-9;]*)m", output)
    assert len(escapes) == len(sgr), escapes
    return [p for params in sgr for p in params.split(";") if p]


CASES = [["tokens", "今天 hello world"], ["tokens", "--help"], ["--help"]]


@pytest.mark.parametrize("args", CASES, ids=" ".join)
def test_no_escape_codes_when_not_a_terminal(runner, args):
    result = runner.invoke(app, args, env={"FORCE_COLOR": None, "NO_COLOR": None,
                                           "TTY_COMPATIBLE": None})
    assert result.exit_code == 0
    assert "\x1b" not in result.stdout + result.stderr


@pytest.mark.parametrize("args", CASES, ids=" ".join)
def test_no_color_on_a_terminal(runner, args):
    # FORCE_COLOR makes Rich treat the output as a terminal; first check colour appears at all.
    colored = runner.invoke(app, args, env={"FORCE_COLOR": "1", "NO_COLOR": None})
    assert any(_COLOR_SGR.match(p) for p in _sgr(colored.stdout))
    result = runner.invoke(app, args, env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert result.exit_code == 0
    # no-color.org: no colour. Rich still emits bold/dim/italic, which the convention allows.
    assert not [p for p in _sgr(result.stdout + result.stderr) if _COLOR_SGR.match(p)]
