"""Without PyTorch: `pip install attn-tracer` (no `torch` extra) runs everything on NumPy.

The torch engine, GPUs and `.bin` checkpoints need PyTorch; each says so in one line, with what
to install, and exit code 1. Here torch is hidden in-process (`sys.modules["torch"] = None`
makes `import torch` fail and `find_spec` report it missing, as when it is not installed); CI
also installs the wheel into a virtual environment without torch and runs the same commands.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from attn_tracer.cli import app
from attn_tracer.model.safetensors_io import write_safetensors

TINY = ["--d-model", "8", "--heads", "2", "--layers", "1"]
INSTALL = 'pip install "attn-tracer[torch]"'


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)


def gpt2_state(d: int = 8, layers: int = 1, n_ctx: int = 16, vocab: int = 50257) -> dict:
    """A random GPT-2 state dict under Hugging Face's names (Conv1D weights are [in, out])."""
    rng = np.random.default_rng(0)
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (n_ctx, d),
              "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(layers):
        shapes |= {f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
                   f"h.{i}.attn.c_attn.weight": (d, 3 * d), f"h.{i}.attn.c_attn.bias": (3 * d,),
                   f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
                   f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
                   f"h.{i}.mlp.c_fc.weight": (d, 4 * d), f"h.{i}.mlp.c_fc.bias": (4 * d,),
                   f"h.{i}.mlp.c_proj.weight": (4 * d, d), f"h.{i}.mlp.c_proj.bias": (d,)}
    return {name: rng.standard_normal(shape).astype(np.float32) * 0.1
            for name, shape in shapes.items()}


def test_the_numpy_path_runs(runner, no_torch, tmp_path):
    result = runner.invoke(app, ["trace", *TINY, "The cat sat", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["config"]["engine"] == "numpy"
    result = runner.invoke(app, ["trace", "The cat sat on the mat", "--head", "0,1"])
    assert result.exit_code == 0, result.stderr
    assert "attn layer 0 head 1" in result.stdout
    result = runner.invoke(app, ["tokens", "hello world", "--json"])
    assert result.exit_code == 0, result.stderr
    assert [t["id"] for t in json.loads(result.stdout)] == [31373, 995]
    for which in ("trace", "tokens"):
        result = runner.invoke(app, ["schema", which])
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["$schema"].startswith("https://json-schema.org/")
    for name in ("t.npz", "t.safetensors"):
        result = runner.invoke(app, ["trace", *TINY, "hi", "--save", str(tmp_path / name)])
        assert result.exit_code == 0, result.stderr


def test_safetensors_checkpoints_need_no_torch(runner, no_torch, tmp_path):
    path = tmp_path / "gpt2.safetensors"
    write_safetensors(path, gpt2_state())
    result = runner.invoke(app, ["trace", "--weights", str(path), "--heads", "2", "--predict",
                                 "Hello there", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["config"]["arch"] == "gpt2" and doc["predictions"]


def test_auto_stays_on_numpy_for_long_texts(no_torch):
    from attn_tracer.model.engine import TORCH_FROM_LEN, select_engine

    # From TORCH_FROM_LEN tokens on, auto would pick torch; without it, NumPy runs them.
    assert select_engine("auto", "auto", "float32", TORCH_FROM_LEN * 2).name == "numpy"


def _torch_checkpoint(tmp_path):
    # The start of a zip archive, as torch.save writes: the loader needs torch to go further.
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(60))
    return path


def _torch_directory(tmp_path):
    config = {"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1,
              "n_positions": 16, "vocab_size": 50257}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _torch_checkpoint(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("args", "needle"), [
    (["--engine", "torch"], "--engine torch needs PyTorch, which is not installed"),
    (["--engine", "torch", "--device", "cpu"], "--engine torch needs PyTorch"),
    (["--device", "cuda"], "--device cuda needs PyTorch with CUDA, which is not installed"),
    (["--device", "CUDA:1"], "--device cuda:1 needs PyTorch with CUDA"),
    # Refused before any work: the checkpoint is not even looked for.
    (["--engine", "torch", "--weights", "missing.safetensors"], "--engine torch needs PyTorch"),
    (lambda tmp: ["--weights", str(_torch_checkpoint(tmp))], "needs PyTorch, which is not "
     "installed"),
    (lambda tmp: ["--weights", str(_torch_directory(tmp))], "pytorch_model.bin needs PyTorch"),
], ids=["engine", "engine-cpu", "cuda", "cuda-1", "before-weights", "bin-file", "bin-directory"])
def test_what_needs_torch_says_what_to_install(runner, no_torch, one_line_error, tmp_path, args,
                                               needle):
    args = args(tmp_path) if callable(args) else args
    result = runner.invoke(app, ["trace", *args, "Hello"])
    line = one_line_error(result, 1, needle, INSTALL)
    if "bin" in line:
        assert "or use a .safetensors file" in line
