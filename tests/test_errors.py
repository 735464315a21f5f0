"""The table of bad invocations: every one ends as one line `attn: error: …` on stderr, the right
exit code (2 usage, 1 runtime), an empty stdout, and no traceback.

Each row names the invocation, its exit code and a fragment the message must contain, so a row
fails when the message stops saying what is wrong. `{tmp}` in an argument is the row's temporary
directory, filled by the `bad_files` fixture. A few rows run again in a real subprocess
(`python -m attn_tracer`), since Typer's CliRunner replaces the streams and may bypass parts.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from attn_tracer.cli import app

TINY = ["--d-model", "8", "--heads", "2", "--layers", "1"]
MARKER = "PWNED"  # what the malicious checkpoints try to create


class Evil:
    """A pickle that runs a shell command when loaded: loading it must never execute code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\t \n")
    (tmp_path / "plain.txt").write_text("hello")
    (tmp_path / "a dir").mkdir()
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "exists.npz").write_bytes(b"keep me")
    (tmp_path / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    # A real safetensors file of the right layout, cut short in the middle of its data.
    from safetensors.numpy import save_file

    save_file({"wte.weight": np.ones((64, 8), np.float32)}, str(tmp_path / "whole.safetensors"))
    whole = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(whole[: len(whole) - 100])
    (tmp_path / "short.safetensors").write_bytes(whole[:5])
    save_file({"not_gpt2": np.ones((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
    marker = tmp_path / MARKER
    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"wte.weight": Evil(marker)}))
    evil_dir = tmp_path / "evil_model"
    evil_dir.mkdir()
    (evil_dir / "config.json").write_text(json.dumps(
        {"n_embd": 8, "n_head": 2, "n_layer": 1, "n_positions": 16, "vocab_size": 50257}))
    (evil_dir / "pytorch_model.bin").write_bytes(pickle.dumps(Evil(marker)))
    (tmp_path / "evil.pt").write_bytes(b"PK\x03\x04" + os.urandom(64))
    (tmp_path / "notes.txt.bin").write_bytes(b"hello, not a checkpoint")
    (tmp_path / "cache").mkdir()
    return tmp_path


# (id, args, exit code, fragment of the message[, stdin bytes])
ROWS: list[tuple] = [
    # ── input: files ────────────────────────────────────────────────────────────────────────
    ("missing-file", ["trace", "--file", "{tmp}/missing.txt"], 2, "not found"),
    ("parent-is-a-file", ["trace", "--file", "{tmp}/plain.txt/x"], 2, "plain.txt/x"),
    ("dangling-symlink", ["trace", "--file", "{tmp}/dangling"], 2, "not found"),
    ("unreadable-proc-mem", ["trace", "--file", "/proc/self/mem"], 2, "cannot read"),
    ("dir-as-file", ["trace", "--file", "{tmp}/a dir"], 2, "is a directory"),
    ("dir-as-lines", ["trace", "--lines", "{tmp}/a dir"], 2, "is a directory"),
    ("dir-as-cross-file", ["trace", "hi", "--cross-file", "{tmp}/a dir"], 2, "is a directory"),
    ("tokens-dir-as-file", ["tokens", "--file", "{tmp}/a dir"], 2, "is a directory"),
    ("missing-lines", ["trace", "--lines", "{tmp}/missing.txt"], 2, "not found"),
    ("control-chars-in-name", ["trace", "--file", "{tmp}/\x1b[31mred\nline"], 2,
     "\\x1b[31mred line"),
    ("missing-cross-file", ["trace", "hi", "--cross-file", "{tmp}/nope"], 2, "not found"),
    # ── input: encoding and emptiness ───────────────────────────────────────────────────────
    ("latin1-file", ["trace", "--file", "{tmp}/latin1.txt"], 2, "not valid UTF-8"),
    ("latin1-lines", ["trace", "--lines", "{tmp}/latin1.txt"], 2, "not valid UTF-8"),
    ("latin1-stdin", ["trace", "-"], 2, "standard input is not valid UTF-8", b"caf\xe9\n"),
    ("latin1-lines-stdin", ["trace", "--lines", "-"], 2, "not valid UTF-8", b"ok\n\xff\n"),
    ("blank-lines-stdin", ["trace", "--lines", "-"], 2, "every line is empty", b"\n \n"),
    ("lone-surrogate-stdin", ["tokens", "-"], 2, "not valid UTF-8", b"a\xed\xa0\x80b"),
    ("empty-file", ["trace", "--file", "{tmp}/empty.txt"], 2, "empty"),
    ("blank-file", ["trace", "--file", "{tmp}/blank.txt"], 2, "only whitespace"),
    ("blank-lines", ["trace", "--lines", "{tmp}/blank.txt"], 2, "every line is empty"),
    ("empty-text", ["trace", ""], 2, "empty"),
    ("whitespace-text", ["trace", " \t\n "], 2, "only whitespace"),
    ("empty-stdin", ["trace", "-", *TINY], 2, "empty", b""),
    ("empty-cross", ["trace", "hi", *TINY, "--cross", "  "], 2, "--cross text is empty"),
    ("no-input", ["trace", *TINY], 2, "no input"),
    ("tokens-no-input", ["tokens"], 2, "no input"),
    ("stdin-twice", ["trace", "-", "-"], 2, "only once", b"x"),
    # ── sizes ───────────────────────────────────────────────────────────────────────────────
    ("d-model-0", ["trace", "hi", "--d-model", "0"], 2, "--d-model must be a positive"),
    ("d-model-negative", ["trace", "hi", "--d-model", "-4"], 2, "--d-model must be a positive"),
    ("d-model-absurd", ["trace", "hi", "--d-model", "1000000", "--heads", "10"], 2,
     "of memory"),
    ("d-model-absurd-default-heads", ["trace", "hi", "--d-model", "1000000"], 2,
     "does not divide"),
    ("d-model-huge-prime", ["trace", "hi", "--d-model", "1000000007", "--heads", "12"], 2,
     "does not divide"),
    ("heads-0", ["trace", "hi", "--heads", "0"], 2, "--heads must be a positive"),
    ("heads-above-d-model", ["trace", "hi", "--d-model", "8", "--heads", "1000000000"], 2,
     "does not divide"),
    ("layers-0", ["trace", "hi", "--layers", "0"], 2, "--layers must be a positive"),
    ("layers-absurd", ["trace", "hi", "--layers", "100000"], 2, "--max-memory"),
    ("n-ctx-0", ["trace", "hi", "--n-ctx", "0"], 2, "--n-ctx must be a positive"),
    ("n-ctx-negative", ["trace", "hi", *TINY, "--n-ctx", "-1"], 2, "--n-ctx must be a positive"),
    ("heads-not-dividing", ["trace", "hi", "--d-model", "10", "--heads", "4"], 2,
     "does not divide"),
    ("max-length-0", ["trace", "hi", *TINY, "--max-length", "0"], 2, "--max-length"),
    ("max-length-negative", ["trace", "hi", *TINY, "--max-length", "-3"], 2, "--max-length"),
    ("longer-than-n-ctx", ["trace", "one two three four five six", *TINY, "--n-ctx", "4"], 2,
     "--max-length"),
    ("max-memory-tiny", ["trace", "hi", *TINY, "--max-memory", "10"], 2, "--max-memory"),
    ("max-memory-0", ["trace", "hi", *TINY, "--max-memory", "0"], 2, "--max-memory"),
    ("max-memory-junk", ["trace", "hi", *TINY, "--max-memory", "abc"], 2, "--max-memory"),
    ("max-memory-inf", ["trace", "hi", *TINY, "--max-memory", "inf"], 2, "--max-memory"),
    ("max-memory-overflow", ["trace", "hi", *TINY, "--max-memory", "1e400"], 2, "--max-memory"),
    # ── selections ──────────────────────────────────────────────────────────────────────────
    ("layer-out-of-range", ["trace", "hi", *TINY, "--layer", "1"], 2, "--layer 1 is out of range"),
    ("head-out-of-range", ["trace", "hi", *TINY, "--head", "2"], 2, "--head 2 is out of range"),
    ("head-negative", ["trace", "hi", *TINY, "--head", "-1"], 2, "out of range"),
    ("batch-index-out-of-range", ["trace", "hi", *TINY, "--batch-index", "1"], 2,
     "--batch-index 1"),
    ("batch-index-negative", ["trace", "a", "b", *TINY, "--batch-index", "-1"], 2,
     "--batch-index -1"),
    ("layer-junk", ["trace", "hi", *TINY, "--layer", "x"], 2, "--layer takes numbers"),
    ("head-junk", ["trace", "hi", *TINY, "--head", "1,,x"], 2, "--head takes numbers"),
    # ── choices ─────────────────────────────────────────────────────────────────────────────
    ("device-unknown", ["trace", "hi", *TINY, "--device", "tpu"], 2, "--device"),
    ("engine-unknown", ["trace", "hi", *TINY, "--engine", "jax"], 2, "--engine"),
    ("dtype-unknown", ["trace", "hi", *TINY, "--dtype", "int8"], 2, "--dtype"),
    ("pos-unknown", ["trace", "hi", *TINY, "--pos", "rope"], 2, "--pos"),
    ("mask-unknown", ["trace", "hi", *TINY, "--mask", "bidirectional"], 2, "--mask"),
    ("arch-unknown", ["trace", "hi", *TINY, "--arch", "llama"], 2, "--arch"),
    ("padding-unknown", ["trace", "hi", *TINY, "--padding", "middle"], 2, "--padding"),
    ("float16-on-cpu", ["trace", "hi", *TINY, "--device", "cpu", "--dtype", "float16"], 2,
     "float32 on the CPU"),
    ("bfloat16-numpy", ["trace", "hi", *TINY, "--engine", "numpy", "--dtype", "bfloat16"], 2,
     "--dtype bfloat16"),
    ("numpy-on-cuda", ["trace", "hi", *TINY, "--engine", "numpy", "--device", "cuda"], 2,
     "--engine numpy"),
    ("schema-unknown", ["schema", "nope"], 2, "no schema named"),
    # ── prediction and output options ──────────────────────────────────────────────────────
    ("temperature-0", ["trace", "hi", *TINY, "--predict", "--temperature", "0"], 2,
     "--temperature"),
    ("temperature-negative", ["trace", "hi", *TINY, "--temperature", "-1"], 2, "--temperature"),
    ("temperature-nan", ["trace", "hi", *TINY, "--temperature", "nan"], 2, "--temperature"),
    ("temperature-inf", ["trace", "hi", *TINY, "--temperature", "inf"], 2, "--temperature"),
    ("top-k-0", ["trace", "hi", *TINY, "--predict", "--top-k", "0"], 2, "--top-k"),
    ("top-k-above-vocab", ["trace", "hi", *TINY, "--predict", "--top-k", "50258"], 2, "50257"),
    ("precision-negative", ["trace", "hi", *TINY, "--json", "--precision", "-1"], 2,
     "--precision"),
    ("seed-negative", ["trace", "hi", *TINY, "--seed", "-1"], 2, "--seed"),
    ("json-and-json-lines", ["trace", "hi", *TINY, "--json", "--json-lines"], 2, "choose one"),
    ("values-and-json-lines", ["trace", "hi", *TINY, "--values", "--json-lines"], 2,
     "with --json-lines use --save"),
    ("precision-json-lines", ["trace", "hi", *TINY, "--json-lines", "--precision", "13"], 2,
     "--precision"),
    ("steps-unknown", ["trace", "hi", *TINY, "--save", "{tmp}/s.npz", "--steps", "paterns"], 2,
     "no step named 'paterns' (did you mean pattern?)"),
    ("steps-empty-name", ["trace", "hi", *TINY, "--save", "{tmp}/s.npz", "--steps", "z,"], 2,
     "no step named ''"),
    ("steps-full-name", ["trace", "hi", *TINY, "--save", "{tmp}/s.npz", "--steps",
                         "blocks.0.attn.z"], 2, "choose from q, q.split"),
    ("steps-unknown-without-save", ["trace", "hi", *TINY, "--steps", "mlp.output"], 2,
     "no step named 'mlp.output'"),
    ("steps-unknown-with-json-lines", ["trace", "hi", *TINY, "--json-lines", "--save",
                                       "{tmp}/s.safetensors", "--steps", "Pattern"], 2,
     "no step named 'Pattern'"),
    ("steps-onto-existing", ["trace", "hi", *TINY, "--save", "{tmp}/exists.npz", "--steps",
                             "pattern"], 2, "--force"),
    ("schema-lines-unknown", ["schema", "trace-line"], 2, "trace-lines"),
    ("save-existing", ["trace", "hi", *TINY, "--save", "{tmp}/exists.npz"], 2, "--force"),
    ("save-txt", ["trace", "hi", *TINY, "--save", "{tmp}/x.txt"], 2, ".npz or .safetensors"),
    ("save-into-missing-dir", ["trace", "hi", *TINY, "--save", "{tmp}/no/such/x.npz"], 2,
     "does not exist"),
    ("save-under-a-file", ["trace", "hi", *TINY, "--save", "{tmp}/plain.txt/x.npz"], 2,
     "not a directory"),
    ("save-onto-dir", ["trace", "hi", *TINY, "--save", "{tmp}/dir.npz"], 2, "is a directory"),
    ("save-in-proc", ["trace", "hi", *TINY, "--save", "/proc/x.npz"], 2, "cannot write"),
    ("svg-wrong-suffix", ["trace", "hi", *TINY, "--svg", "{tmp}/x.png"], 2, ".svg"),
    ("same-target-twice", ["trace", "hi", *TINY, "--svg", "{tmp}/x.svg", "--html",
                           "{tmp}/x.svg"], 2, ".htm"),
    # ── conflicting flags ───────────────────────────────────────────────────────────────────
    ("text-and-file", ["trace", "hi", "--file", "{tmp}/plain.txt"], 2, "one way"),
    ("file-and-lines", ["trace", "--file", "{tmp}/plain.txt", "--lines", "{tmp}/plain.txt"], 2,
     "one way"),
    ("tokens-text-and-file", ["tokens", "hi", "--file", "{tmp}/plain.txt"], 2, "not both"),
    ("cross-and-cross-file", ["trace", "hi", "--cross", "a", "--cross-file", "{tmp}/plain.txt"],
     2, "not both"),
    ("weights-and-d-model", ["trace", "hi", "--weights", "{tmp}/whole.safetensors",
                             "--d-model", "8"], 2, "--d-model conflicts with --weights"),
    ("weights-and-arch-attn", ["trace", "hi", "--weights", "{tmp}/whole.safetensors",
                               "--arch", "attn"], 2, "--arch gpt2"),
    ("weights-and-cross", ["trace", "hi", "--weights", "{tmp}/whole.safetensors", "--cross",
                           "x"], 2, "cross"),
    ("values-and-json", ["trace", "hi", *TINY, "--values", "--json"], 2, "--values"),
    ("values-too-wide", ["trace", "hi", "--values", "--d-model", "768"], 2, "--d-model"),
    ("values-too-long", ["trace", " ".join(["w"] * 20), "--values", "--d-model", "4", "--heads",
                         "2"], 2, "--max-length"),
    ("gpt2-and-cross", ["trace", "hi", *TINY, "--arch", "gpt2", "--cross", "x"], 2, "cross"),
    # ── Typer's own usage errors ────────────────────────────────────────────────────────────
    ("unknown-option", ["trace", "hi", "--bogus"], 2, "No such option: --bogus"),
    ("unknown-root-option", ["--bogus", "trace", "hi"], 2, "No such option"),
    ("unknown-command", ["nope"], 2, "No such command"),
    ("int-junk", ["trace", "hi", "--d-model", "abc"], 2, "--d-model"),
    ("float-junk", ["trace", "hi", "--temperature", "warm"], 2, "--temperature"),
    ("missing-option-value", ["trace", "hi", "--d-model"], 2, "--d-model"),
    # ── checkpoints ─────────────────────────────────────────────────────────────────────────
    ("weights-random-bytes", ["trace", "hi", "--weights", "{tmp}/random.safetensors"], 1,
     "not a valid safetensors"),
    ("weights-truncated", ["trace", "hi", "--weights", "{tmp}/truncated.safetensors"], 1,
     "truncated.safetensors"),
    ("weights-five-bytes", ["trace", "hi", "--weights", "{tmp}/short.safetensors"], 1,
     "short.safetensors"),
    ("weights-not-gpt2", ["trace", "hi", "--weights", "{tmp}/other.safetensors"], 1,
     "GPT-2"),
    ("weights-pickle-exec", ["trace", "hi", "--weights", "{tmp}/evil.bin"], 1, "refusing"),
    ("weights-pickle-exec-dir", ["trace", "hi", "--weights", "{tmp}/evil_model"], 1, "evil_model"),
    ("weights-fake-zip", ["trace", "hi", "--weights", "{tmp}/evil.pt"], 1, "evil.pt"),
    ("weights-text-as-bin", ["trace", "hi", "--weights", "{tmp}/notes.txt.bin"], 1,
     "not a PyTorch checkpoint"),
    ("weights-plain-text", ["trace", "hi", "--weights", "{tmp}/plain.txt"], 1, "plain.txt"),
    ("weights-missing-path", ["trace", "hi", "--weights", "{tmp}/nope.safetensors"], 2,
     "nope.safetensors"),
    ("weights-not-in-cache", ["trace", "hi", "--weights", "gpt2"], 1, "huggingface-cli download"),
    ("weights-org-not-in-cache", ["trace", "hi", "--weights", "openai-community/gpt2-xl"], 1,
     "not found in the Hugging Face cache"),
]


def _fill(args: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in args]


def _cuda_available() -> bool:
    from attn_tracer.engine import cuda_present

    return cuda_present()


def assert_clean_failure(code: int, stdout: str, stderr: str, expected: int, fragment: str):
    lines = stderr.splitlines()
    assert code == expected, f"exit {code}, expected {expected}; stderr: {stderr!r}"
    assert stdout == "", f"stdout must be empty on failure, got {stdout[:200]!r}"
    assert "Traceback" not in stderr
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("attn: error: "), lines[0]
    assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"
    assert "\x1b" not in stderr, "an escape code reached the terminal"


def test_the_table_is_big_enough():
    assert len(ROWS) >= 40
    assert len({row[0] for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_bad_invocation(row, bad_files: Path, monkeypatch: pytest.MonkeyPatch):
    _, args, code, fragment, *stdin = row
    monkeypatch.setenv("HF_HUB_CACHE", str(bad_files / "cache"))
    monkeypatch.delenv("ATTN_DEBUG", raising=False)
    result = CliRunner().invoke(app, _fill(args, bad_files),
                                input=stdin[0] if stdin else None)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, code, fragment)
    assert not (bad_files / MARKER).exists(), "a checkpoint ran code while loading"
    assert (bad_files / "exists.npz").read_bytes() == b"keep me"
    leftovers = [p.name for p in bad_files.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_cuda_on_a_cpu_only_machine(runner: CliRunner):
    if _cuda_available():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(app, ["trace", "hi", *TINY, "--device", "cuda"])
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 1, "CUDA is not available")
    result = runner.invoke(app, ["trace", "hi", *TINY, "--device", "cuda:7"])
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 1, "cuda:7")


def test_a_torch_saved_pickle_with_code_is_refused(bad_files: Path, runner: CliRunner):
    import torch

    marker = bad_files / MARKER
    path = bad_files / "model.bin"
    torch.save({"wte.weight": torch.zeros(2, 2), "payload": Evil(marker)}, path)
    result = runner.invoke(app, ["trace", "hi", "--weights", str(path)])
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 1, "refusing")
    assert not marker.exists()


# Rows run again as real processes: the streams, exit codes and Typer's own errors as a user
# meets them, with no test runner in between.
SUBPROCESS_ROWS = ["unknown-option", "int-junk", "unknown-command", "missing-file",
                   "latin1-stdin", "layers-absurd", "weights-pickle-exec", "temperature-nan",
                   "no-input"]


@pytest.mark.parametrize("name", SUBPROCESS_ROWS)
def test_bad_invocation_in_a_real_process(name: str, bad_files: Path):
    row = next(r for r in ROWS if r[0] == name)
    _, args, code, fragment, *stdin = row
    env = {**os.environ, "HF_HUB_CACHE": str(bad_files / "cache"), "NO_COLOR": "1"}
    env.pop("ATTN_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "attn_tracer", *_fill(args, bad_files)],
                          input=stdin[0] if stdin else b"", capture_output=True, env=env,
                          timeout=60)
    assert_clean_failure(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), code,
                         fragment)
    assert not (bad_files / MARKER).exists()


def test_no_arguments_prints_help_and_exits_0(runner: CliRunner):
    result = runner.invoke(app, [])
    assert result.exit_code == 0
    assert "trace" in result.stdout and result.stderr == ""


# ── absurd sizes are refused from the estimate, before any allocation ─────────────────────

def _limit_memory() -> None:
    import resource

    two_gb = 2 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (two_gb, two_gb))


@pytest.mark.parametrize("sizes", [
    ["--d-model", "1000000", "--heads", "10"],
    ["--layers", "100000"],
    ["--d-model", "65536", "--heads", "16", "--layers", "64", "--arch", "gpt2", "--predict"],
    ["--d-model", "10000000000000", "--heads", "10", "--layers", "100000000"],
], ids=["d-model-1e6", "layers-1e5", "gpt2-wide", "astronomical"])
def test_absurd_sizes_are_refused_before_any_allocation(sizes: list[str], tmp_path: Path):
    # Under a 2 GB address-space limit, a run that started allocating would die of MemoryError
    # or be killed; refusing from the estimate is the only way to end with exit 2 in time.
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("ATTN_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "attn_tracer", "trace", "The cat sat on the mat", *sizes,
         "--engine", "numpy", "--max-memory", "1G"],
        capture_output=True, env=env, timeout=30, preexec_fn=_limit_memory, cwd=tmp_path)
    assert_clean_failure(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), 2,
                         "of memory, over the 1.0 GB allowed")


# ── --debug and ATTN_DEBUG ──────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("where", ["root", "command", "env"])
def test_debug_shows_the_traceback_of_a_user_error(where: str, runner: CliRunner,
                                                   monkeypatch: pytest.MonkeyPatch):
    args = ["trace", "hi", "--d-model", "10", "--heads", "4"]
    monkeypatch.delenv("ATTN_DEBUG", raising=False)
    if where == "root":
        args = ["--debug", *args]
    elif where == "command":
        args = [*args, "--debug"]
    else:
        monkeypatch.setenv("ATTN_DEBUG", "1")
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "Traceback (most recent call last)" in result.stderr
    assert "UsageError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("attn: error: --heads 4 does not divide")


def _break_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    from attn_tracer import pipeline

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline, "run", broken)


@pytest.mark.parametrize("debug", [False, True])
def test_an_internal_error(debug: bool, runner: CliRunner, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("ATTN_DEBUG", raising=False)
    _break_the_pipeline(monkeypatch)
    args = ["trace", "hi", *TINY] + (["--debug"] if debug else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith("attn: error: internal error (ZeroDivisionError: a bug)")
    assert "--debug" in last
    if debug:
        assert "Traceback (most recent call last)" in result.stderr
        assert "in broken" in result.stderr
    else:
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_debug_after_the_text_is_still_text_after_double_dash(runner: CliRunner):
    # `--` ends the options: `--debug` after it is the text to trace, not the switch.
    result = runner.invoke(app, ["tokens", "--json", "--", "--debug"])
    assert result.exit_code == 0, result.stderr
    assert "".join(t["text"] for t in json.loads(result.stdout)) == "--debug"
