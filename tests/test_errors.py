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
from importlib.util import find_spec
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
    # Hugging Face caches whose refs/main is binary, absurdly long, or a path out of the cache.
    for repo, ref in (("openai-community--gpt2-medium", b"\x00\xff\xfe" * 10),
                      ("openai-community--gpt2-large", b"a" * 1_000_000),
                      ("distilbert--distilgpt2", b"../../../../etc")):
        folder = tmp_path / "cache" / f"models--{repo}"
        (folder / "refs").mkdir(parents=True)
        (folder / "snapshots").mkdir()
        (folder / "refs" / "main").write_bytes(ref)
    return tmp_path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints that are hostile or merely unusual (issue 12), made once: `{hostile}`."""
    tmp = tmp_path_factory.mktemp("hostile")
    _hostile_files(tmp)
    return tmp


LONG = "a" * 300  # a file name longer than the 255 bytes every common file system allows


def tiny_gpt2(vocab: int = 4, layers: int = 1, d: int = 8) -> dict[str, np.ndarray]:
    """A complete GPT-2 state dict of tiny sizes (a bare file's dims come from its shapes)."""
    rng = np.random.default_rng(0)
    state = {"wte.weight": rng.standard_normal((vocab, d), np.float32),
             "wpe.weight": rng.standard_normal((4, d), np.float32),
             "ln_f.weight": np.ones(d, np.float32), "ln_f.bias": np.zeros(d, np.float32)}
    for i in range(layers):
        for name, shape in {"ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,),
                            "ln_2.bias": (d,), "attn.c_attn.weight": (d, 3 * d),
                            "attn.c_attn.bias": (3 * d,), "attn.c_proj.weight": (d, d),
                            "attn.c_proj.bias": (d,), "mlp.c_fc.weight": (d, 4 * d),
                            "mlp.c_fc.bias": (4 * d,), "mlp.c_proj.weight": (4 * d, d),
                            "mlp.c_proj.bias": (d,)}.items():
            state[f"h.{i}.{name}"] = rng.standard_normal(shape, np.float32) * 0.02
    return state


def raw_safetensors(path: Path, header: str, data: bytes = b"") -> None:
    """A safetensors file whose header is exactly `header` (no library would write a bad one)."""
    encoded = header.encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


def _hostile_files(tmp: Path) -> None:
    """Checkpoints and caches that are hostile or merely unusual (issue 12)."""
    from safetensors.numpy import save_file

    config = {"n_embd": 8, "n_head": 2, "n_layer": 1, "n_positions": 4, "vocab_size": 4}

    def model_dir(name: str, config_text: str, state: dict | None = None) -> None:
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(config_text)
        if state is not None:
            save_file(state, str(tmp / name / "model.safetensors"))

    model_dir("nested_config", '{"n_embd": ' + "[" * 100_000 + "]" * 100_000 + "}")
    model_dir("bigint_config", '{"n_embd": 1' + "0" * 5000 + "}")
    model_dir("hugeint_config", json.dumps({**config, "n_layer": 10**4000}))
    model_dir("list_config", json.dumps({**config, "model_type": ["gpt2"]}))
    model_dir("list_switch_config", json.dumps({**config, "activation_function": ["gelu"]}))
    model_dir("tie_string_config", json.dumps({**config, "tie_word_embeddings": "no"}))
    model_dir("huge_config", json.dumps(config) + " " * 2_000_000)
    (tmp / "latin1_config").mkdir()
    (tmp / "latin1_config" / "config.json").write_bytes(b'{"model_type": "gpt\xff"}')
    model_dir("ten_million_layers", json.dumps({**config, "n_layer": 10_000_000}), tiny_gpt2())
    model_dir("untied_without_head", json.dumps({**config, "tie_word_embeddings": False}),
              tiny_gpt2())
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        state = tiny_gpt2()
        state["h.0.attn.c_attn.weight"][2, 7] = value
        save_file(state, str(tmp / f"{name}.safetensors"))
    sparse_layers = {k: v for k, v in tiny_gpt2().items()
                     if k.startswith(("wte", "wpe", "h.0.mlp"))}
    sparse_layers["transformer.h.99999999.ln_1.weight"] = np.ones(8, np.float32)
    save_file(sparse_layers, str(tmp / "h99999999.safetensors"))
    raw_safetensors(tmp / "list_dtype.safetensors",
                    json.dumps({"wte.weight": {"dtype": ["F32"], "shape": [1],
                                               "data_offsets": [0, 4]}}), bytes(4))
    # 15,000 "layers" naming the same 16 bytes, as in the issue.
    raw_safetensors(tmp / "aliased.safetensors", json.dumps(
        {f"h.{i}.ln_1.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
         for i in range(15_000)}), bytes(16))
    raw_safetensors(tmp / "deep_header.safetensors",
                    '{"__metadata__": ' + "[" * 100_000 + "]" * 100_000 + "}")
    raw_safetensors(tmp / "bigint_header.safetensors",
                    '{"x": {"dtype": "F32", "shape": [1' + "0" * 5000
                    + '], "data_offsets": [0, 4]}}',
                    bytes(4))


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
    ("arch-unknown", ["trace", "hi", *TINY, "--arch", "mamba"], 2, "--arch"),
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
    ("values-too-wide", ["trace", "hi", "--values", "--d-model", "768"], 2, "--d-model"),
    ("values-too-long", ["trace", " ".join(["w"] * 20), "--values", "--d-model", "4", "--heads",
                         "2"], 2, "--max-length"),
    ("gpt2-and-cross", ["trace", "hi", *TINY, "--arch", "gpt2", "--cross", "x"], 2, "cross"),
    ("d-head-zero", ["trace", "hi", *TINY, "--d-head", "0"], 2,
     "--d-head must be a positive integer"),
    ("heads-not-dividing-suggests-d-head", ["trace", "hi", "--d-model", "10", "--heads", "4"], 2,
     "or set --d-head"),
    ("values-attention-too-wide", ["trace", "hi", "--values", "--d-model", "4", "--heads", "8",
                                   "--d-head", "5"], 2, "heads·d_head ≤ 32"),
    ("pad-to-zero", ["trace", "hi", *TINY, "--pad-to", "0"], 2, "--pad-to must be at least 1"),
    ("pad-to-short", ["trace", "The cat sat on the mat", *TINY, "--pad-to", "3"], 2,
     "--max-length 3"),
    ("pad-to-past-n-ctx", ["trace", "hi", *TINY, "--n-ctx", "8", "--pad-to", "9"], 2,
     "--pad-to 9 is more than --n-ctx 8"),
    # ── attn heads ──────────────────────────────────────────────────────────────────────────
    ("heads-sort-unknown", ["heads", "hi", *TINY, "--sort", "nosuch"], 2, "--sort"),
    ("heads-top-0", ["heads", "hi", *TINY, "--top", "0"], 2, "--top must be at least 1"),
    ("heads-top-negative", ["heads", "hi", *TINY, "--top", "-3"], 2, "--top must be at least 1"),
    ("heads-repeat-0", ["heads", *TINY, "--repeat", "0"], 2, "--repeat must be at least 1"),
    ("heads-repeat-junk", ["heads", *TINY, "--repeat", "x"], 2, "--repeat"),
    ("heads-repeat-beyond-n-ctx", ["heads", *TINY, "--repeat", "513"], 2,
     "at most --repeat 511 (with --no-bos: 512)"),
    ("heads-repeat-beyond-n-ctx-no-bos", ["heads", *TINY, "--repeat", "513", "--no-bos"], 2,
     "--n-ctx holds 1024: at most --repeat 512"),
    ("heads-repeat-small-n-ctx", ["heads", *TINY, "--n-ctx", "16", "--repeat", "8"], 2,
     "at most --repeat 7"),
    ("heads-repeat-more-than-words", ["heads", *TINY, "--n-ctx", "40000", "--repeat", "19384",
                                      "--no-bos"], 2, "at most --repeat 19383"),
    ("heads-repeat-and-text", ["heads", "hi", *TINY, "--repeat", "5"], 2,
     "--repeat builds its own input"),
    ("heads-repeat-and-file", ["heads", "--file", "{tmp}/plain.txt", *TINY, "--repeat", "5"], 2,
     "without a TEXT, --file or --lines"),
    ("heads-no-input", ["heads", *TINY], 2, "no input"),
    ("heads-bos-past-n-ctx", ["heads", "one two three four", *TINY, "--n-ctx", "4", "--bos"], 2,
     "--max-length 3"),
    ("heads-svg-wrong-suffix", ["heads", "hi", *TINY, "--svg", "{tmp}/x.png"], 2, ".svg"),
    ("heads-svg-existing", ["heads", "hi", *TINY, "--svg", "{tmp}/exists.npz"], 2, ".svg"),
    ("heads-weights-and-d-model", ["heads", "hi", "--weights", "{tmp}/whole.safetensors",
                                   "--d-model", "8"], 2, "--d-model conflicts with --weights"),
    ("heads-latin1-file", ["heads", "--file", "{tmp}/latin1.txt", *TINY], 2, "not valid UTF-8"),
    # ── attn attribute ──────────────────────────────────────────────────────────────────────
    ("attribute-target-two-tokens", ["attribute", "hi", *TINY, "--target", "Paris is"], 2,
     "is 2 tokens"),
    ("attribute-target-empty", ["attribute", "hi", *TINY, "--target", ""], 2, "--target is empty"),
    ("attribute-target-id-too-big", ["attribute", "hi", *TINY, "--target", "#50257"], 2,
     "token ids run from 0 to 50256"),
    ("attribute-versus-two-tokens", ["attribute", "hi", *TINY, "--versus", "New York"], 2,
     "--versus"),
    ("attribute-versus-is-target", ["attribute", "hi", *TINY, "--target", "␣the", "--versus",
                                    " the"], 2, "--versus is the same token as --target"),
    ("attribute-position-out-of-range", ["attribute", "hi there", *TINY, "--position", "2"], 2,
     "--position 2 is out of range: the text has 2 tokens (positions 0 to 1)"),
    ("attribute-position-negative", ["attribute", "hi", *TINY, "--position", "-1"], 2,
     "--position counts tokens from 0"),
    ("attribute-ablate-no-such-layer", ["attribute", "hi", *TINY, "--ablate", "L99H0"], 2,
     "--ablate L99H0: the model has 1 layer (L0 to L0)"),
    ("attribute-ablate-no-such-head", ["attribute", "hi", *TINY, "--ablate", "L0H0,L0H2"], 2,
     "--ablate L0H2: each layer has 2 heads (H0 to H1)"),
    ("attribute-ablate-bad-name", ["attribute", "hi", *TINY, "--ablate", "5.1"], 2,
     "L<layer>H<head>"),
    ("attribute-ablate-mode-bogus", ["attribute", "hi", *TINY, "--ablate-mode", "half"], 2,
     "--ablate-mode"),
    ("attribute-two-texts", ["attribute", "hi", "there", *TINY], 2, "give one text"),
    ("attribute-top-k-zero", ["attribute", "hi", *TINY, "--top-k", "0"], 2, "--top-k"),
    ("attribute-components-zero", ["attribute", "hi", *TINY, "--components", "0"], 2,
     "--components must be at least 1"),
    ("attribute-no-input", ["attribute", *TINY, "--file", "{tmp}/blank.txt"], 2,
     "only whitespace"),
    ("schema-unknown-names-the-choices", ["schema", "nope"], 2,
     "choose trace, trace-lines, heads, attribute, patch, generate, generate-lines or tokens"),
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
    # Without torch a .bin is never opened: the line says what to install instead.
    ("weights-pickle-exec", ["trace", "hi", "--weights", "{tmp}/evil.bin"], 1,
     "refusing" if find_spec("torch") else "needs PyTorch"),
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
    # ── issue 12: what the user's world hands over ──────────────────────────────────────────
    ("weights-empty", ["trace", "hi", "--weights", ""], 2, "--weights is empty"),
    ("weights-blank", ["trace", "hi", "--weights", "  "], 2, "--weights is empty"),
    ("weights-no-such-user", ["trace", "hi", "--weights", "~no_such_user_x/m"], 2,
     "cannot expand"),
    ("file-name-too-long", ["trace", "--file", f"{{tmp}}/{LONG}"], 2, "File name too long"),
    ("lines-name-too-long", ["trace", "--lines", f"{{tmp}}/{LONG}"], 2, "File name too long"),
    ("cross-file-name-too-long", ["trace", "hi", "--cross-file", f"{{tmp}}/{LONG}"], 2,
     "File name too long"),
    ("save-name-too-long", ["trace", "hi", *TINY, "--save", f"{{tmp}}/{LONG}.npz"], 2,
     "File name too long"),
    ("svg-name-too-long", ["trace", "hi", *TINY, "--svg", f"{{tmp}}/{LONG}.svg"], 2,
     "File name too long"),
    ("weights-name-too-long", ["trace", "hi", "--weights", f"{{tmp}}/{LONG}.safetensors"], 2,
     "File name too long"),
    ("tokens-name-too-long", ["tokens", "--file", f"{{tmp}}/{LONG}"], 2, "File name too long"),
    ("file-dev-zero", ["trace", "--file", "/dev/zero"], 2, "larger than the 16 MiB"),
    ("lines-dev-zero", ["trace", "--lines", "/dev/zero"], 2, "larger than the 16 MiB"),
    ("cross-file-dev-zero", ["trace", "hi", "--cross-file", "/dev/zero"], 2,
     "larger than the 16 MiB"),
    ("stdin-beyond-the-limit", ["trace", "-"], 2, "standard input is larger than the 16 MiB",
     b"\x00" * (16 * 2**20 + 1)),
    ("beyond-n-ctx-unread", ["trace", "word " * 50_000, *TINY, "--n-ctx", "16"], 2,
     "has more tokens than --n-ctx 16"),
    ("config-nested", ["trace", "hi", "--weights", "{hostile}/nested_config"], 1,
     "nested too deeply"),
    ("config-5000-digits", ["trace", "hi", "--weights", "{hostile}/bigint_config"], 1,
     "integer thousands of digits"),
    ("config-4000-digits", ["trace", "hi", "--weights", "{hostile}/hugeint_config"], 1,
     "'n_layer' must be a positive integer up to"),
    ("config-list-model-type", ["trace", "hi", "--weights", "{hostile}/list_config"], 1,
     "'model_type' must be a string, got a JSON array"),
    ("config-list-switch", ["trace", "hi", "--weights", "{hostile}/list_switch_config"], 1,
     "sets activation_function to a JSON array"),
    ("config-tie-string", ["trace", "hi", "--weights", "{hostile}/tie_string_config"], 1,
     "'tie_word_embeddings' must be true or false"),
    ("config-2-mb", ["trace", "hi", "--weights", "{hostile}/huge_config"], 1, "not a model config"),
    ("config-not-utf8", ["trace", "hi", "--weights", "{hostile}/latin1_config"], 1, "not UTF-8"),
    ("config-ten-million-layers", ["trace", "hi", "--weights", "{hostile}/ten_million_layers"], 1,
     "says n_layer=10000000 but model.safetensors holds 1 block"),
    ("config-untied-without-head", ["trace", "hi", "--weights", "{hostile}/untied_without_head"], 1,
     "tie_word_embeddings is false"),
    ("weights-nan", ["trace", "hi", "--weights", "{hostile}/nan.safetensors", "--heads", "2"], 1,
     "'h.0.attn.c_attn.weight' is nan at index [2, 7]"),
    ("weights-inf", ["trace", "hi", "--weights", "{hostile}/inf.safetensors", "--heads", "2"], 1,
     "'h.0.attn.c_attn.weight' is inf at index [2, 7]"),
    ("weights-key-h99999999", ["trace", "hi", "--weights", "{hostile}/h99999999.safetensors"], 1,
     "up to h.99999999 but has no h.1"),
    ("safetensors-list-dtype", ["trace", "hi", "--weights", "{hostile}/list_dtype.safetensors"], 1,
     "unsupported dtype ['F32']"),
    ("safetensors-aliased-layers", ["trace", "hi", "--weights", "{hostile}/aliased.safetensors"], 1,
     "share bytes"),
    ("safetensors-nested-header", ["trace", "hi", "--weights", "{hostile}/deep_header.safetensors"],
     1, "nested too deeply"),
    ("safetensors-5000-digits", ["trace", "hi", "--weights", "{hostile}/bigint_header.safetensors"],
     1, "integer thousands of digits"),
    ("cache-binary-ref", ["trace", "hi", "--weights", "gpt2-medium"], 1,
     "does not hold a commit hash"),
    ("cache-huge-ref", ["trace", "hi", "--weights", "gpt2-large"], 1, "over 256 bytes long"),
    ("cache-ref-out-of-the-cache", ["trace", "hi", "--weights", "distilgpt2"], 1,
     "does not hold a commit hash"),
]


def _fill(args: list[str], tmp: Path, hostile: Path | None = None) -> list[str]:
    return [a.replace("{tmp}", str(tmp)).replace("{hostile}", str(hostile)) for a in args]


def _cuda_available() -> bool:
    from attn_tracer.model.engine import cuda_present

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


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_bad_invocation(row, bad_files: Path, hostile: Path, monkeypatch: pytest.MonkeyPatch):
    _, args, code, fragment, *stdin = row
    monkeypatch.setenv("HF_HUB_CACHE", str(bad_files / "cache"))
    monkeypatch.delenv("ATTN_DEBUG", raising=False)
    result = CliRunner().invoke(app, _fill(args, bad_files, hostile),
                                input=stdin[0] if stdin else None)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, code, fragment)
    assert not (bad_files / MARKER).exists(), "a checkpoint ran code while loading"
    assert (bad_files / "exists.npz").read_bytes() == b"keep me"
    leftovers = [p.name for p in bad_files.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_cuda_on_a_cpu_only_machine(runner: CliRunner):
    pytest.importorskip("torch")  # without it, "needs PyTorch" (test_without_torch.py)
    if _cuda_available():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(app, ["trace", "hi", *TINY, "--device", "cuda"])
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 1, "CUDA is not available")
    result = runner.invoke(app, ["trace", "hi", *TINY, "--device", "cuda:7"])
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 1, "cuda:7")


def test_a_torch_saved_pickle_with_code_is_refused(bad_files: Path, runner: CliRunner):
    torch = pytest.importorskip("torch")

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
                   "no-input", "heads-sort-unknown", "heads-repeat-and-text", "file-dev-zero",
                   "stdin-beyond-the-limit", "weights-empty", "config-nested",
                   "safetensors-aliased-layers", "save-name-too-long"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS_ROWS)
def test_bad_invocation_in_a_real_process(name: str, bad_files: Path, hostile: Path):
    row = next(r for r in ROWS if r[0] == name)
    _, args, code, fragment, *stdin = row
    env = {**os.environ, "HF_HUB_CACHE": str(bad_files / "cache"), "NO_COLOR": "1"}
    env.pop("ATTN_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "attn_tracer", *_fill(args, bad_files, hostile)],
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


@pytest.mark.slow
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
    from attn_tracer.model import pipeline

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


# ── checkpoints only torch can make: what a .bin may hold that is not a plain array ──────────

@pytest.fixture(scope="module")
def torch_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    import struct
    import warnings
    import zipfile

    tmp = tmp_path_factory.mktemp("torch-bins")
    state = {k: torch.from_numpy(v) for k, v in tiny_gpt2().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensors loudly
        kinds = {"meta": state["wte.weight"].to("meta"),
                 "quantized": torch.quantize_per_tensor(state["wte.weight"], 0.1, 0, torch.qint8),
                 "sparse": state["wte.weight"].to_sparse()}
    for kind, tensor in kinds.items():
        torch.save({**state, "wte.weight": tensor}, tmp / f"{kind}.bin")
    # A storage declared 2,140,000,000 floats (8.6 GB) long, in a file of a few kilobytes: the
    # pickle's numel is the only thing changed, as the file did.
    torch.save({"wte.weight": torch.zeros(10)}, tmp / "small.bin")
    with zipfile.ZipFile(tmp / "small.bin") as src, zipfile.ZipFile(tmp / "forged.bin", "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"cpuq\x06K\nt", b"cpuq\x06J" + struct.pack("<i", 2_140_000_000)
                                    + b"t")
            out.writestr(info, data)
    # A zip bomb: 64 MB of zeros stored compressed, which torch.save never does.
    torch.save({"wte.weight": torch.zeros(16_000_000)}, tmp / "plain.bin")
    with zipfile.ZipFile(tmp / "plain.bin") as src, zipfile.ZipFile(
            tmp / "compressed.bin", "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    (tmp / "plain.bin").unlink()
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize(("name", "fragment"), [
    ("meta.bin", "'wte.weight' is a meta tensor"),
    ("quantized.bin", "'wte.weight' is a quantized tensor"),
    ("sparse.bin", "'wte.weight' is a sparse_coo tensor"),
    ("forged.bin", "declares 8.6 GB of tensor data but the file is"),
    ("compressed.bin", "declares 64.0 MB of tensor data but the file is"),
])
def test_a_bin_that_is_no_plain_state_dict(torch_files: Path, name: str, fragment: str,
                                           runner: CliRunner):
    result = runner.invoke(app, ["trace", "hi", "--weights", str(torch_files / name),
                                 "--heads", "2"])
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 1, fragment)


def test_a_bin_over_max_memory_is_refused_before_torch_reads_it(torch_files: Path,
                                                                 runner: CliRunner,
                                                                 monkeypatch: pytest.MonkeyPatch):
    import torch

    def never(*args, **kwargs):
        raise AssertionError("torch.load ran")

    path = torch_files / "meta.bin"  # its declared storages: a few kilobytes
    monkeypatch.setattr(torch, "load", never)
    result = runner.invoke(app, ["trace", "hi", "--weights", str(path), "--heads", "2",
                                 "--max-memory", "100"])
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2, "raise --max-memory")


def test_weights_over_max_memory_are_refused_from_the_header(tmp_path: Path, runner: CliRunner):
    """A 4.3 GB wte is refused from the config and the header: the file is sparse (a hole, no
    disk and no memory), so a read of its tensors would show in the time and the peak."""
    d, vocab = 21_400, 50257
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(
        {"n_embd": d, "n_head": 1, "n_layer": 1, "n_positions": 4, "vocab_size": vocab}))
    state = {"h.0.ln_1.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    state["wte.weight"] = {"dtype": "F32", "shape": [vocab, d],
                           "data_offsets": [4, 4 + 4 * vocab * d]}
    header = json.dumps(state)
    raw_safetensors(tmp_path / "m" / "model.safetensors", header)
    with open(tmp_path / "m" / "model.safetensors", "r+b") as f:
        f.truncate(8 + len(header) + 4 + 4 * vocab * d)
    result = runner.invoke(app, ["trace", "hi", "--weights", str(tmp_path / "m"),
                                 "--max-memory", "1G"])
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2,
                         "(1 block, d_model 21400) need about")


# ── the environment: variables that cannot be used ──────────────────────────────────────────

@pytest.mark.parametrize(("env", "fragment"), [
    ({"HF_HUB_CACHE": None, "HF_HOME": "~no_such_user_x/hf"}, "cannot use HF_HOME"),
    ({"HF_HUB_CACHE": "~no_such_user_x/hub"}, "cannot use HF_HUB_CACHE"),
    ({"HF_HUB_CACHE": None, "HF_HOME": None, "XDG_CACHE_HOME": "~no_such_user_x"},
     "cannot use XDG_CACHE_HOME"),
])
def test_a_cache_variable_that_cannot_be_expanded(env: dict, fragment: str, runner: CliRunner):
    result = runner.invoke(app, ["trace", "hi", "--weights", "gpt2"], env=env)
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 1, fragment)


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "", "False", "NO"])
def test_attn_debug_off_values_show_no_traceback(value: str, runner: CliRunner):
    result = runner.invoke(app, ["trace", "hi", "--d-model", "10", "--heads", "4"],
                           env={"ATTN_DEBUG": value})
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2, "does not divide")


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "TRUE"])
def test_attn_debug_on_values_show_the_traceback(value: str, runner: CliRunner):
    result = runner.invoke(app, ["trace", "hi", "--d-model", "10", "--heads", "4"],
                           env={"ATTN_DEBUG": value})
    assert result.exit_code == 2 and result.stdout == ""
    assert "Traceback (most recent call last)" in result.stderr


# ── permissions: only a user who is not root can be refused ────────────────────────────────

@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the bits say")
@pytest.mark.parametrize(("args", "code", "fragment"), [
    (["trace", "--file", "{locked}/x.txt"], 2, "Permission denied"),
    (["trace", "--file", "{tmp}/unreadable.txt"], 2, "unreadable.txt"),  # Typer: not readable
    (["trace", "hi", *TINY, "--save", "{locked}/x.npz"], 2, "Permission denied"),
    (["trace", "hi", *TINY, "--save", "{tmp}/readonly/x.npz"], 2, "Permission denied"),
    (["trace", "hi", "--weights", "{locked}/m.safetensors"], 2, "Permission denied"),
    (["trace", "hi", "--weights", "{tmp}/unreadable.safetensors"], 1, "Permission denied"),
], ids=["file-in-locked-dir", "unreadable-file", "save-in-locked-dir", "save-in-readonly-dir",
        "weights-in-locked-dir", "unreadable-weights"])
def test_permission_denied(args, code, fragment, tmp_path: Path, runner: CliRunner):
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "x.txt").write_text("hi")
    (tmp_path / "locked").chmod(0)
    (tmp_path / "readonly").mkdir(mode=0o555)
    for name in ("unreadable.txt", "unreadable.safetensors"):
        (tmp_path / name).write_text("hi")
        (tmp_path / name).chmod(0)
    try:
        filled = [a.replace("{locked}", str(tmp_path / "locked")).replace("{tmp}", str(tmp_path))
                  for a in args]
        result = runner.invoke(app, filled)
        assert_clean_failure(result.exit_code, result.stdout, result.stderr, code, fragment)
    finally:
        (tmp_path / "locked").chmod(0o755)
