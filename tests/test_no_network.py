"""Never more than asked: the main command-line paths run with the network disabled and write
nothing but stdout, stderr and the file they were asked to save.

Each path runs in a real process whose sockets refuse to connect (connect, connect_ex, sendto,
create_connection and getaddrinfo raise and say so on stderr, so an attempt that some library
would swallow still shows), with HF_HUB_OFFLINE unset, in an empty working directory, and with
HOME, TMPDIR, XDG_CACHE_HOME and HF_HOME pointing at empty directories that must stay empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ATTEMPT = "NETWORK ATTEMPT"
BOOTSTRAP = f"""
import os, socket, sys

def refuse(*args, **kwargs):
    sys.stderr.write("{ATTEMPT} " + repr(args[:2]) + "\\n")
    raise OSError("network disabled by the test")

socket.socket.connect = socket.socket.connect_ex = socket.socket.sendto = refuse
socket.create_connection = socket.getaddrinfo = refuse
if os.environ.get("ATTN_TEST_PROBE"):
    try:
        socket.create_connection(("huggingface.co", 443))
    except OSError:
        pass
sys.argv = ["attn", *sys.argv[1:]]
from attn_tracer.cli import main
main()
"""

TINY = ["--d-model", "64", "--heads", "4", "--layers", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GPT-2 by transformers: a save_pretrained folder and the same as a hub cache."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_head=2, n_layer=2, n_positions=32)
    root = tmp_path_factory.mktemp("checkpoint")
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "saved")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / "models--tiny--gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((root / "saved" / name).read_bytes())
    return {"dir": root / "saved", "hub": root / "hub"}


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


def run_offline(args: list[str], tmp_path: Path, extra_env: dict[str, str] | None = None
                ) -> tuple[subprocess.CompletedProcess, dict[str, Path]]:
    dirs = {name: tmp_path / name for name in ("cwd", "home", "tmp", "xdg_cache", "hf_home")}
    for d in dirs.values():
        d.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TIKTOKEN_"))
           and k not in ("ATTN_DEBUG", "NO_COLOR")}
    env.update(HOME=str(dirs["home"]), TMPDIR=str(dirs["tmp"]),
               XDG_CACHE_HOME=str(dirs["xdg_cache"]), HF_HOME=str(dirs["hf_home"]),
               PYTHONDONTWRITEBYTECODE="1", **(extra_env or {}))
    proc = subprocess.run([sys.executable, "-c", BOOTSTRAP, *args], cwd=dirs["cwd"], env=env,
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    return proc, dirs


def test_the_guard_sees_an_attempt(tmp_path: Path):
    # The control: a connection tried (and swallowed) before the command shows on stderr.
    proc, _ = run_offline(["schema"], tmp_path, {"ATTN_TEST_PROBE": "1"})
    assert ATTEMPT in proc.stderr.decode()


PATHS = {
    "tokens": (["tokens", "hello world 今天"], None),
    "tokens-json": (["tokens", "--json", "hello world"], None),
    "schema": (["schema"], None),
    "schema-tokens": (["schema", "tokens"], None),
    "trace-default": (["trace", "The cat sat on the mat"], None),
    "trace-json": (["trace", "The cat sat on the mat", *TINY, "--json"], None),
    "trace-stages": (["trace", "The cat sat on the mat", *TINY, "--stages"], None),
    "trace-predict": (["trace", "The cat sat on the mat", *TINY, "--arch", "gpt2", "--predict",
                       "--json"], None),
    "trace-batch-cross": (["trace", "a b c", "d", *TINY, "--cross", "le chat", "--json"], None),
    "trace-torch": (["trace", "The cat sat", *TINY, "--engine", "torch", "--json"], None),
    "trace-weights-dir": (["trace", "The cat sat", "--weights", "{dir}", "--predict", "--json"],
                          None),
    "trace-weights-file": (["trace", "The cat sat", "--weights", "{dir}/model.safetensors",
                            "--heads", "2"], None),
    "trace-weights-cache": (["trace", "The cat sat", "--weights", "tiny/gpt2", "--predict"],
                            None),
    "save-npz": (["trace", "The cat sat", *TINY, "--save", "out.npz"], "out.npz"),
    "save-safetensors": (["trace", "The cat sat", *TINY, "--json", "--save",
                          "out.safetensors"], "out.safetensors"),
    "save-html": (["trace", "The cat sat", *TINY, "--html", "view.html"], "view.html"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PATHS))
def test_main_paths_offline_and_writing_nothing_else(name: str, tmp_path: Path,
                                                     checkpoint: dict[str, Path]):
    args, target = PATHS[name]
    args = [a.replace("{dir}", str(checkpoint["dir"])) for a in args]
    before = {k: listing(v) for k, v in checkpoint.items()}
    proc, dirs = run_offline(args, tmp_path, {"HF_HUB_CACHE": str(checkpoint["hub"])})
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert ATTEMPT not in stderr, stderr
    assert proc.stdout, "no output"
    if "--json" in args or name.startswith("schema") or name == "tokens-json":
        json.loads(proc.stdout)
    for key, folder in dirs.items():
        expected = [target] if key == "cwd" and target else []
        assert sorted(listing(folder)) == expected, f"{key} was written to: {listing(folder)}"
    assert {k: listing(v) for k, v in checkpoint.items()} == before, "the checkpoint changed"
