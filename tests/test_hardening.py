"""Hardening III (issue 27): behaviours that were silent, each class with its tests.

Encodings that cannot show the view (refused before any output, --json and --json-lines
exempt), empty values and non-ASCII digits (refused for every option, walked from the Click
commands), undecodable argv bytes shown as bytes, one rule for widths, --heads 0, --bos in the
hints, --steps that a run cannot record, --repeat with --pad-to, a truncated .bin, and the
memory estimate made before a batch is tokenized.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from attn_tracer import process
from attn_tracer.cli import app
from conftest import check_one_line_error

TINY = ["--d-model", "8", "--heads", "2", "--layers", "1", "--engine", "numpy"]
RUNNER = CliRunner()


def invoke(args: list[str], **kwargs):
    return RUNNER.invoke(app, args, **kwargs)


# ── standard output's encoding ───────────────────────────────────────────────────────────────

def _stdout(monkeypatch, encoding: str, errors: str) -> None:
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding=encoding,
                                                        errors=errors))


@pytest.mark.parametrize(("encoding", "errors", "refused"), [
    ("ascii", "strict", True), ("ascii", "surrogateescape", True),  # the POSIX locale's
    ("latin-1", "surrogatepass", True), ("latin-1", "strict", True),
    ("ascii", "replace", False), ("ascii", "backslashreplace", False),  # lossy by choice
    ("utf-8", "strict", False), ("utf-8", "surrogateescape", False),
])
def test_an_encoding_is_judged_by_what_it_can_write(monkeypatch, encoding, errors, refused):
    _stdout(monkeypatch, encoding, errors)
    assert (process.text_output_problem(["trace", "x"]) is not None) == refused
    assert (process.text_output_problem(["trace", "--help"]) is not None) == refused
    assert (process.text_output_problem([]) is not None) == refused  # no arguments: help
    for args in (["trace", "x", "--json"], ["trace", "x", "--json-lines"], ["schema"],
                 ["--version"], ["heads", "x", "--json"]):
        assert process.text_output_problem(args) is None, args
    # --help is text, whatever else is there.
    assert (process.text_output_problem(["trace", "--json", "--help"]) is not None) == refused


POSIX = {"LC_ALL": "POSIX", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}


def _attn(args: list[str], env: dict, stdin: bytes | None = None):
    full = {k: v for k, v in os.environ.items() if k not in ("LANG", "LC_ALL", "LC_CTYPE",
                                                              "PYTHONIOENCODING", "ATTN_DEBUG")}
    full.update({k: v for k, v in env.items() if v})
    return subprocess.run([sys.executable, "-m", "attn_tracer", *args], env=full,
                          input=stdin, capture_output=True, timeout=120)


# Every command once, as text (refused: exit 1, nothing on stdout, one line) and as JSON.
EVERY_COMMAND = [
    (["tokens", "héllo"], True), (["tokens", "héllo", "--json"], False),
    (["trace", "héllo", *TINY], True), (["trace", "héllo", *TINY, "--json"], False),
    (["trace", "héllo", *TINY, "--json-lines"], False),
    (["heads", "héllo", *TINY], True), (["heads", "héllo", *TINY, "--json"], False),
    (["attribute", "héllo", *TINY], True), (["attribute", "héllo", *TINY, "--json"], False),
    (["explore", "héllo", *TINY], True), (["schema"], False), (["trace", "--help"], True),
    ([], True), (["--version"], False),
]


@pytest.mark.slow
@pytest.mark.parametrize("env", [POSIX, {"PYTHONIOENCODING": "ascii:surrogateescape"}],
                         ids=["posix", "ascii-surrogateescape"])
@pytest.mark.parametrize(("args", "refused"), EVERY_COMMAND,
                         ids=[" ".join(a[:2]) + (" json" if "--json" in a else "")
                              + (" lines" if "--json-lines" in a else "")
                              for a, _ in EVERY_COMMAND])
def test_every_command_in_the_posix_locale(args: list[str], refused: bool, env: dict):
    result = _attn(args, env)
    err = result.stderr.decode("ascii", "replace")
    assert "Traceback" not in err and "internal error" not in err, err
    if refused:
        assert result.returncode == 1 and result.stdout == b"", (result.returncode, err)
        assert err.count("\n") == 1 and "standard output's encoding is ascii" in err, err
        return
    assert result.returncode == 0, err
    out = result.stdout.decode("utf-8")  # UTF-8 bytes, whatever the locale's encoding
    if "--json-lines" in args:
        records = [json.loads(line) for line in out.splitlines()]
        assert records[0]["inputs"][0]["text"] == "héllo"
    elif "--json" in args:
        doc = json.loads(out)
        if isinstance(doc, list):  # attn tokens: the bytes of the labels are the text's
            assert bytes.fromhex("".join(t["bytes"] for t in doc)).decode() == "héllo"
        else:
            assert doc["inputs"][0]["text"] == "héllo"


def test_posix_locale_refuses_before_any_output():
    # One real process, fast: the view and --help are refused in one line, nothing written.
    for args in (["trace", "x", *TINY], ["trace", "--help"]):
        result = _attn(args, POSIX)
        assert result.returncode == 1 and result.stdout == b"", result.stderr
        assert b"error handler surrogateescape" in result.stderr
    lines = _attn(["trace", "x", *TINY, "--json-lines"], POSIX)
    assert lines.returncode == 0 and json.loads(lines.stdout.splitlines()[0])["record"] == "header"


# ── empty values and ASCII digits, for every option of every command ────────────────────────

def _options(kinds: set[str]):
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for p in command.params:
            if p.param_type_name == "option" and not p.is_flag and not p.hidden:
                kind = getattr(p.type, "name", "")
                if kind in kinds:
                    yield pytest.param(name, max(p.opts, key=len), kind,
                                       id=f"{name} {max(p.opts, key=len)}")


@pytest.mark.parametrize(("command", "flag", "kind"),
                         list(_options({"text", "str", "path", "file", "directory"})))
def test_an_empty_value_is_refused_for_every_option(command: str, flag: str, kind: str):
    line = check_one_line_error(invoke([command, "hi", flag, ""]), 2, flag)
    assert ("an empty path" if kind in ("path", "file", "directory") else "is empty") in line


@pytest.mark.parametrize(("command", "flag", "kind"),
                         list(_options({"integer", "int", "float", "integer range",
                                        "float range"})))
def test_a_number_in_other_digits_is_refused_for_every_option(command: str, flag: str,
                                                               kind: str):
    check_one_line_error(invoke([command, "hi", flag, "\uff18"]), 2, flag, "ASCII digits")


@pytest.mark.parametrize("args", [
    ["trace", "hi", "--layer", "\uff10"], ["trace", "hi", "--head", "0,\u0661"],
    ["trace", "hi", "--query", "\uff10"], ["trace", "hi", "--keys", "0:\u0661"],
    ["trace", "hi", "--query", " "], ["trace", "hi", "--max-memory", "\uff14G"],
    ["attribute", "hi", "--target", "#\uff10\uff10"], ["attribute", "hi", "--ablate", "L\uff11H0"],
    ["attribute", "hi", "--ablate", "L0H\u0661"],
])
def test_numbers_inside_values_are_ascii_digits(args: list[str]):
    check_one_line_error(invoke([*args, *TINY]), 2)


def test_undecodable_argv_bytes_are_shown_as_bytes():
    # What Python makes of the byte 0xff in argv: the lone surrogate U+DCFF.
    line = check_one_line_error(invoke(["attribute", "hi", *TINY, "--ablate", "L0H\udcff"]), 2)
    assert "'L0H\\xff'" in line and "udcff" not in line
    line = check_one_line_error(invoke(["trace", "hi", *TINY, "--layer", "\udcfe"]), 2)
    assert "\\xfe" in line and "udc" not in line


# ── one rule, one message ───────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("width", [20, 39, 1000])
def test_width_takes_what_columns_takes(width: int):
    from rich.cells import cell_len

    result = invoke(["trace", "The cat sat", *TINY, "--width", str(width)])
    assert result.exit_code == 0, result.stderr
    assert max(cell_len(line) for line in result.stdout.splitlines()) <= width


@pytest.mark.parametrize("width", [19, 1001])
def test_width_outside_the_bounds(width: int):
    check_one_line_error(invoke(["trace", "hi", *TINY, "--width", str(width)]), 2,
                         "between 20 and 1000")


def test_heads_0_with_a_checkpoint_says_what_random_weights_say(tmp_path: Path):
    line = check_one_line_error(invoke(["trace", "hi", "--heads", "0", "--weights",
                                        str(tmp_path / "no.safetensors")]), 2)
    assert line == "attn: error: --heads must be a positive integer, got 0"


def test_the_pad_to_hint_counts_the_bos_and_works_when_followed():
    line = check_one_line_error(invoke(["heads", "a b c d e", *TINY, "--bos", "--pad-to", "3"]),
                                2, "--max-length 2", "<|endoftext|> first included")
    assert "--max-length 3" not in line
    followed = invoke(["heads", "a b c d e", *TINY, "--bos", "--pad-to", "3", "--max-length",
                       "2", "--json"])
    assert followed.exit_code == 0, followed.stderr
    assert json.loads(followed.stdout)["inputs"][0]["length"] == 3


def test_the_repeat_notice_counts_the_bos():
    result = invoke(["heads", *TINY, "--repeat", "5", "--max-length", "3", "--json"])
    assert result.exit_code == 0
    assert "one row of 11 tokens (<|endoftext|> first included)" in result.stderr
    result = invoke(["heads", *TINY, "--repeat", "5", "--no-bos", "--max-length", "3", "--json"])
    assert "one row of 10 tokens," in result.stderr


def test_repeat_with_pad_to_pads_or_refuses():
    check_one_line_error(invoke(["heads", *TINY, "--repeat", "5", "--pad-to", "3"]), 2,
                         "--pad-to 3 is shorter than the --repeat 5 probe, 11 tokens",
                         "--pad-to 11 or more")
    check_one_line_error(invoke(["heads", *TINY, "--repeat", "5", "--pad-to", "2000"]), 2,
                         "more than --n-ctx 1024")
    plain = json.loads(invoke(["heads", *TINY, "--repeat", "5", "--json"]).stdout)
    for side in ("right", "left"):
        result = invoke(["heads", *TINY, "--repeat", "5", "--pad-to", "14", "--padding", side,
                         "--json"])
        assert result.exit_code == 0 and "--padding" not in result.stderr, result.stderr
        doc = json.loads(result.stdout)
        inp = doc["inputs"][0]
        assert (inp["length"], inp["padding"], inp["padding_side"]) == (11, 3, side)
        # Pad tokens never count: the scores are those of the probe alone, to rounding.
        for name, grid in plain["scores"].items():
            np.testing.assert_allclose(doc["scores"][name], grid, rtol=0, atol=1e-6,
                                       err_msg=name)


# ── --steps that a run cannot record ────────────────────────────────────────────────────────

@pytest.mark.parametrize(("extra", "steps", "fragment"), [
    ([], "logits", "add --predict"), ([], "probs", "add --predict"),
    ([], "ln_1", "--arch gpt2"), ([], "attn.out,mlp.out", "--steps mlp.out"),
    ([], "ln_f", "--arch gpt2"), ([], "resid_mid", "--arch gpt2"),
    ([], "cross_attn.z", "add --cross"), ([], "cross.embed", "add --cross"),
    (["--pos", "none"], "pos_embed", "--pos none"), (["--no-scale"], "scaled", "--no-scale"),
])
def test_steps_no_run_of_the_configuration_records(tmp_path: Path, extra, steps, fragment):
    check_one_line_error(invoke(["trace", "hi", *TINY, *extra, "--save", str(tmp_path / "s.npz"),
                                 "--steps", steps]), 2, "records no such step", fragment)
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize(("extra", "steps"), [
    (["--predict"], "logits,probs"), (["--arch", "gpt2"], "attn.out,mlp.out,ln_1,ln_f"),
    (["--cross", "there"], "cross_attn.z,cross.embed,resid_mid"), ([], "pattern,attn.out"),
])
def test_steps_that_are_recorded_are_all_saved(tmp_path: Path, extra, steps):
    from attn_tracer.commands.save import step_kinds

    path = tmp_path / "s.npz"
    result = invoke(["trace", "hi", "there", *TINY, *extra, "--save", str(path), "--steps",
                     steps, "--json"])
    assert result.exit_code == 0 and "--steps" not in result.stderr, result.stderr
    saved = json.loads(str(np.load(path)["config"]))["steps_saved"]
    for kind in steps.split(","):
        assert any(kind in step_kinds(name) for name in saved), (kind, saved)


def test_a_step_these_texts_did_not_need_is_said(tmp_path: Path):
    # One text under a causal mask of one token: no key is masked, so there is no `masked`.
    result = invoke(["trace", "hi", *TINY, "--save", str(tmp_path / "s.npz"), "--steps",
                     "masked,z", "--json"])
    assert result.exit_code == 0
    assert "--steps masked: this run recorded no such step" in result.stderr


# ── a truncated .bin ────────────────────────────────────────────────────────────────────────

def test_a_truncated_bin_is_said_as_such(tmp_path: Path):
    torch = pytest.importorskip("torch")
    full = tmp_path / "full.bin"
    torch.save({"wte.weight": torch.zeros(100, 8), "wpe.weight": torch.zeros(16, 8)}, full)
    data = full.read_bytes()
    for cut in (40, 200, len(data) // 2, len(data) - 30):
        path = tmp_path / f"cut{cut}.bin"
        path.write_bytes(data[:cut])
        line = check_one_line_error(invoke(["trace", "hi", "--weights", str(path), "--heads",
                                            "2"]), 1)
        assert line == (f"attn: error: truncated or corrupt checkpoint: {path}; download or "
                        "save it again (torch.load could not read it)")


# ── memory: estimated before a batch is tokenized ───────────────────────────────────────────

def test_least_tokens_is_a_lower_bound():
    from attn_tracer.model import memory, tokens

    for text in ["The cat sat", "a\x1cb.\x1c.", "x<|endoftext|>y", "  lots   of  space ",
                 "今天 天气", "\u00a0nbsp\u2028line", "don't stop", "1234567 89", "🙂🙂 ok",
                 "\t\ttabs\r\n", ".\u3000."]:
        assert memory.least_tokens(text) <= len(tokens.encode(text)), text


@pytest.mark.parametrize("command", ["trace", "heads"])
def test_a_batch_over_the_limit_is_refused_before_tokenizing(tmp_path: Path, command: str,
                                                             monkeypatch):
    from attn_tracer.model import memory, pipeline, tokens

    def never(*args, **kwargs):
        raise AssertionError("the batch was tokenized")

    lines = tmp_path / "many.txt"
    lines.write_text("\n".join(f"the cat sat on mat {i}" for i in range(20_000)) + "\n")
    monkeypatch.setattr(tokens, "encode_head", never)
    monkeypatch.setattr(pipeline, "prepare", never)
    line = check_one_line_error(invoke([command, "--lines", str(lines), "--max-length", "10",
                                        "--max-memory", "100M", "--engine", "numpy"]), 2)
    assert "at least" in line and "20,000 texts of at least 6 tokens, before tokenizing" in line
    # The default limit holds the same way: half of a 1 GB machine.
    monkeypatch.setattr(memory, "machine_memory", lambda: 10**9)
    check_one_line_error(invoke([command, "--lines", str(lines), "--max-length", "10",
                                 "--engine", "numpy"]), 2, "before tokenizing", "500.0 MB")
