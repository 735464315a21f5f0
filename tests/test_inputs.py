"""Where texts come from: arguments, --lines files, and what --max-length reports."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from attn_tracer.cli import app

TINY = ["--d-model", "8", "--heads", "2", "--layers", "1"]
runner = CliRunner()


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
