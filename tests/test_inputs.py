"""Where texts come from: arguments, --lines files, and what --max-length reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from attn_tracer.cli import app

TINY = ["--d-model", "8", "--heads", "2", "--layers", "1"]
runner = CliRunner()


@pytest.mark.slow
def test_an_argument_that_is_not_utf8_is_refused_not_replaced():
    # Python hands undecodable argv bytes over as lone surrogates; tiktoken would turn them
    # into U+FFFD and trace a different text. A real process, since that is where argv comes from.
    for args in (["ab\udcffcd"], ["hi", "--cross", "x\udcffy"]):
        result = subprocess.run([sys.executable, "-m", "attn_tracer", "trace", *TINY, *args],
                                capture_output=True, text=True, errors="surrogateescape")
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert "not valid UTF-8 (byte 0xff" in result.stderr


def test_lines_split_only_at_newlines(tmp_path):
    # U+2028, form feed and friends are inside a text; \r\n line ends are Windows files.
    lines = tmp_path / "batch.txt"
    lines.write_bytes("first\u2028half\r\nsecond\x0cpage\r\n".encode())
    result = runner.invoke(app, ["trace", *TINY, "--lines", str(lines), "--json"])
    assert result.exit_code == 0, result.stderr
    texts = [i["text"] for i in json.loads(result.stdout)["inputs"]]
    assert texts == ["first\u2028half", "second\x0cpage"]


def test_max_length_reports_what_it_cut_in_cross_texts_too():
    result = runner.invoke(app, ["trace", *TINY, "The cat", "--cross",
                                 "Le chat était assis sur le tapis rouge", "--max-length", "4",
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    assert "cut the --cross text" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["cross_inputs"][0]["truncated"] > 0 and doc["inputs"][0]["truncated"] == 0
    assert doc["cross_inputs"][0]["length"] == 4


def test_truncation_is_recorded_in_json():
    result = runner.invoke(app, ["trace", *TINY, "one two three four five", "a b",
                                 "--max-length", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    inputs = json.loads(result.stdout)["inputs"]
    assert [i["truncated"] for i in inputs] == [2, 0]
    assert "cut text 0" in result.stderr


def test_unknown_engine_is_refused_before_any_work(tmp_path):
    # Not even the checkpoint is opened: a name check needs nothing.
    result = runner.invoke(app, ["trace", "hi", "--engine", "nmpy", "--weights",
                                 str(tmp_path / "big.safetensors")])
    assert result.exit_code == 2
    assert "--engine" in result.stderr and "'auto', 'numpy', 'torch'" in result.stderr


def test_save_does_not_change_what_the_terminal_draws(tmp_path):
    plain = runner.invoke(app, ["trace", *TINY, "--layers", "2", "The cat"])
    saved = runner.invoke(app, ["trace", *TINY, "--layers", "2", "The cat", "--save",
                                str(tmp_path / "t.npz")])
    assert plain.exit_code == saved.exit_code == 0
    assert "attn layer 1" not in saved.stdout
    assert plain.stdout == saved.stdout


def test_options_that_would_be_ignored_are_said():
    result = runner.invoke(app, ["trace", *TINY, "hi", "--top-k", "3"])
    assert result.exit_code == 0
    assert "add --predict" in result.stderr


def test_values_limit_covers_the_cross_text():
    result = runner.invoke(app, ["trace", "--d-model", "4", "--heads", "2", "--values", "hi",
                                 "--cross", " ".join(["word"] * 20)])
    assert result.exit_code == 2
    assert "at most 16" in result.stderr


# ── one final line ending of a file or of standard input is not part of the text ─────────────

def _input_texts(args, stdin=None):
    result = runner.invoke(app, ["trace", *TINY, *args, "--json"], input=stdin)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    return [i["text"] for i in doc["inputs"]], [i["text"] for i in doc.get("cross_inputs", [])]


def _tokens(args, stdin=None) -> str:
    """The text `attn tokens` tokenized, from the tokens' bytes."""
    result = runner.invoke(app, ["tokens", "--json", *args], input=stdin)
    assert result.exit_code == 0, result.stderr
    return bytes.fromhex("".join(t["bytes"] for t in json.loads(result.stdout))).decode()


# (what the file or standard input holds, the text without --keep-newline)
ENDINGS = [
    ("hello world\n", "hello world"),  # echo's newline
    ("hello world\r\n", "hello world"),  # a Windows file: \r\n is one line ending
    ("hello world\n\n", "hello world\n"),  # only one is dropped: a blank last line stays
    ("hello world\r\n\r\n", "hello world\r\n"),
    ("hello\nworld", "hello\nworld"),  # no final line ending: nothing to drop
    ("hello world\r", "hello world\r"),  # a lone \r is not a line ending here
]


@pytest.mark.slow
@pytest.mark.parametrize(("data", "text"), ENDINGS)
def test_final_line_ending_of_a_file_or_stdin_is_dropped(tmp_path, data, text):
    path = tmp_path / "input.txt"
    path.write_bytes(data.encode())
    assert _input_texts(["--file", str(path)]) == ([text], [])
    assert _input_texts(["-"], stdin=data.encode()) == ([text], [])
    assert _input_texts(["--file", "-"], stdin=data.encode()) == ([text], [])
    assert _input_texts(["A cat", "--cross-file", str(path)]) == (["A cat"], [text])
    assert _tokens(["--file", str(path)]) == text
    assert _tokens(["-"], stdin=data.encode()) == text


@pytest.mark.slow
@pytest.mark.parametrize(("data", "_"), ENDINGS)
def test_keep_newline_keeps_the_file_exactly(tmp_path, data, _):
    path = tmp_path / "input.txt"
    path.write_bytes(data.encode())
    keep = ["--keep-newline"]
    assert _input_texts(["--file", str(path), *keep]) == ([data], [])
    assert _input_texts(["-", *keep], stdin=data.encode()) == ([data], [])
    assert _input_texts(["A cat", "--cross-file", str(path), *keep]) == (["A cat"], [data])
    assert _tokens(["--file", str(path), *keep]) == data
    assert _tokens(["-", *keep], stdin=data.encode()) == data


@pytest.mark.slow
def test_echo_into_trace_gives_the_tokens_typed():
    # The case: `echo "hello world" | attn trace -` traced a third token, the newline.
    result = subprocess.run([sys.executable, "-m", "attn_tracer", "trace", *TINY, "-", "--json"],
                            input=b"hello world\n", capture_output=True)
    assert result.returncode == 0, result.stderr
    assert [t["text"] for t in json.loads(result.stdout)["inputs"][0]["tokens"]] == [
        "hello", "␣world"]


def test_arguments_stay_exact():
    assert _input_texts(["hello world\n"]) == (["hello world\n"], [])
    assert _input_texts(["A cat", "--cross", "le chat\n"]) == (["A cat"], ["le chat\n"])
    assert _tokens(["--", "hi\n"]) == "hi\n"


def test_lines_are_split_as_before(tmp_path):
    # --lines splits at every newline itself; a final one ends the last line, an empty line
    # before it is skipped (and said), with or without --keep-newline.
    path = tmp_path / "batch.txt"
    path.write_bytes(b"one\ntwo\n\n")
    for keep in ([], ["--keep-newline"]):
        result = runner.invoke(app, ["trace", *TINY, "--lines", str(path), *keep, "--json"])
        assert result.exit_code == 0, result.stderr
        assert [i["text"] for i in json.loads(result.stdout)["inputs"]] == ["one", "two"]
        assert "skipped 1 empty line" in result.stderr


def test_keep_newline_without_a_file_is_said():
    result = runner.invoke(app, ["trace", *TINY, "hi", "--keep-newline"])
    assert result.exit_code == 0, result.stderr
    assert "--keep-newline keeps the final line ending of --file" in result.stderr
