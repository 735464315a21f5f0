"""Issue 7: choosing the engine, device and dtype, and the progress display.

Impossible choices end as one line `attn: error: …` on stderr with an empty stdout: exit 2 for a
choice that can never work (a half dtype on the CPU, a device index the machine does not have),
exit 1 for what this installation lacks (a CPU-only build of torch asked for CUDA). The CUDA
tests at the end run only where a GPU is at hand (marked `cuda`, skipped otherwise).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from attn_tracer.cli import app
from attn_tracer.commands import run as run_module
from attn_tracer.model import engine as engine_module

SMALL = ["--d-model", "64", "--heads", "4"]
SENTENCE = "The cat sat on the mat"


def fails(result, code: int, *words: str) -> str:
    """The run failed with `code`, one error line on stderr naming `words`, nothing on stdout."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def trace_json(runner, *args: str) -> dict:
    result = runner.invoke(app, ["trace", SENTENCE, *SMALL, "--json", *args])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# ── usage errors: exit 2 ──────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("device", [[], ["--device", "cpu"], ["--engine", "numpy"],
                                    ["--engine", "torch", "--device", "cpu"]])
def test_half_precision_on_the_cpu_is_refused(runner, monkeypatch, dtype, device):
    monkeypatch.setattr(engine_module, "cuda_present", lambda: False)  # auto means the CPU here
    result = runner.invoke(app, ["trace", SENTENCE, *SMALL, "--dtype", dtype, *device])
    fails(result, 2, f"--dtype {dtype}", "float32")


@pytest.mark.parametrize("args, words", [
    (["--device", "tpu"], ["--device", "tpu", "cuda:N"]),
    (["--device", "cuda:x"], ["--device", "cuda:x"]),
    (["--engine", "jax"], ["--engine", "jax", "numpy", "torch"]),
    (["--dtype", "int8"], ["--dtype", "int8", "float32"]),
    (["--engine", "numpy", "--device", "cuda"], ["--engine numpy", "CPU", "--engine torch"]),
    (["--engine", "numpy", "--device", "cuda:0"], ["--engine numpy", "CPU"]),
])
def test_unknown_or_impossible_choices_are_usage_errors(runner, args, words):
    fails(runner.invoke(app, ["trace", SENTENCE, *SMALL, *args]), 2, *words)


def test_a_gpu_index_the_machine_lacks_is_a_usage_error(runner, monkeypatch):
    """--device cuda:7 on a one-GPU machine: exit 2, naming the GPUs there are."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = fails(runner.invoke(app, ["trace", SENTENCE, *SMALL, "--device", "cuda:7"]), 2,
                 "--device cuda:7", "1 GPU", "cuda:0")
    assert "cuda:0 to" not in line  # one GPU: no range to speak of


def test_the_gpu_range_is_named_on_a_machine_with_several(runner, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    fails(runner.invoke(app, ["trace", SENTENCE, *SMALL, "--device", "cuda:4"]), 2,
          "4 GPUs", "cuda:0 to cuda:3")


# ── runtime errors: exit 1 ────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_names_what_torch_reports(runner, device):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = fails(runner.invoke(app, ["trace", SENTENCE, *SMALL, "--device", device]), 1,
                 f"--device {device}", "CUDA is not available", torch.__version__)
    # What torch itself says: torch.version.cuda is None exactly for a CPU-only build.
    if torch.version.cuda is None:
        assert "CPU-only build" in line
    else:
        assert f"CUDA {torch.version.cuda}" in line and "no GPU" in line


def test_cuda_on_a_cpu_only_build_even_when_a_driver_is_present(runner, monkeypatch):
    """A CPU-only torch on a machine with an NVIDIA driver: still exit 1, not a crash."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    fails(runner.invoke(app, ["trace", SENTENCE, *SMALL, "--device", "cuda"]), 1,
          "CPU-only build")


# ── --engine auto ─────────────────────────────────────────────────────────────────────────────

AUTO_PROBE = """
import json, sys
from typer.testing import CliRunner
from attn_tracer.cli import app
r = CliRunner().invoke(app, ["trace", {text!r}, "--d-model", "64", "--heads", "4", "--json"])
doc = json.loads(r.stdout)
print(json.dumps({{"code": r.exit_code, "engine": doc["config"]["engine"],
                  "torch": "torch" in sys.modules}}))
"""


def test_auto_picks_numpy_for_short_inputs_without_importing_torch():
    done = subprocess.run([sys.executable, "-c", AUTO_PROBE.format(text=SENTENCE)],
                          capture_output=True, encoding="utf-8", timeout=120)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe == {"code": 0, "engine": "numpy", "torch": False}


def test_auto_rule_switches_at_the_threshold(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(engine_module, "cuda_present", lambda: False)
    n = engine_module.TORCH_FROM_LEN
    assert engine_module.select_engine("auto", "auto", "float32", n - 1).name == "numpy"
    assert engine_module.select_engine("auto", "auto", "float32", n).name == "torch"
    assert engine_module.select_engine("auto", "cpu", "float32", 10 * n).device == "cpu"
    assert engine_module.select_engine("numpy", "auto", "float32", 10 * n).name == "numpy"


def test_auto_runs_torch_at_and_above_the_threshold(runner, monkeypatch):
    """The command line follows the rule: at the threshold the trace says torch ran it."""
    pytest.importorskip("torch")
    monkeypatch.setattr(engine_module, "cuda_present", lambda: False)
    length = 6  # "The cat sat on the mat": 6 GPT-2 tokens
    monkeypatch.setattr(engine_module, "TORCH_FROM_LEN", length)
    assert trace_json(runner)["config"]["engine"] == "torch"
    monkeypatch.setattr(engine_module, "TORCH_FROM_LEN", length + 1)
    assert trace_json(runner)["config"]["engine"] == "numpy"


# ── progress display ──────────────────────────────────────────────────────────────────────────

def test_no_progress_or_other_noise_on_stderr_when_it_is_not_a_terminal(runner):
    cases = [[], ["--json"]]
    if engine_module.torch_installed():
        cases.append(["--engine", "torch", "--layers", "4"])
    for args in cases:
        result = runner.invoke(app, ["trace", SENTENCE, *SMALL, *args])
        assert result.exit_code == 0, result.stderr
        assert result.stderr == ""


def test_the_pipeline_reports_each_layer():
    from attn_tracer.model import pipeline
    from attn_tracer.model.config import Config
    from attn_tracer.model.engine import Engine
    from attn_tracer.model.trace import Selection
    from attn_tracer.model.weights import random_weights

    config = Config(d_model=16, heads=2, layers=3)
    calls = []
    pipeline.run([SENTENCE], config, Engine("numpy", "cpu", "float32"), random_weights(config),
                 Selection((0,), (0,)), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_only_on_a_terminal(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with run_module.progress_display("3 layers") as advance:
        for done in (1, 2, 3):
            advance(done, 3)
    assert terminal.getvalue()  # Rich drew (and, being transient, erased) the bar
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with run_module.progress_display("3 layers") as advance:
        advance(1, 3)
    with run_module.progress_display("loading weights", show=False) as advance:
        advance(1, 1)
    assert pipe.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", terminal := _Terminal())
    with run_module.progress_display("loading weights", show=False):
        pass
    assert terminal.getvalue() == ""


# ── CUDA (run where a GPU is at hand) ─────────────────────────────────────────────────────────

def _gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


cuda = pytest.mark.skipif(not _gpu(), reason="no CUDA GPU")


def _patterns(doc: dict) -> dict[tuple, np.ndarray]:
    return {(a["layer"], a["head"], a["batch"], a["block"]):
            np.array([[np.nan if w is None else w for w in row] for row in a["weights"]],
                     np.float64)
            for a in doc["attention"]}


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["attn", "gpt2"])
def test_a_full_trace_on_cuda(runner, dtype, arch):
    doc = trace_json(runner, "--device", "cuda", "--dtype", dtype, "--arch", arch,
                     "--layers", "3", "--layer", "all")
    assert doc["config"]["device"].startswith("cuda") and doc["config"]["dtype"] == dtype
    patterns = _patterns(doc)
    assert len(patterns) == 3 * 4
    for key, p in patterns.items():
        assert not np.isnan(p).any(), key
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-2, err_msg=str(key))
        assert (np.triu(p, 1) == 0).all(), key  # causal: nothing above the diagonal


@pytest.mark.cuda
@cuda
def test_cuda_and_cpu_agree_in_float32(runner):
    args = ("--layers", "3", "--layer", "all", "--arch", "gpt2")
    gpu = _patterns(trace_json(runner, "--device", "cuda", *args))
    cpu = _patterns(trace_json(runner, "--device", "cpu", "--engine", "torch", *args))
    assert gpu.keys() == cpu.keys()
    for key in cpu:
        np.testing.assert_allclose(gpu[key], cpu[key], rtol=0, atol=1e-4, err_msg=str(key))


@pytest.mark.cuda
@cuda
def test_auto_picks_the_gpu(runner):
    assert trace_json(runner)["config"]["device"].startswith("cuda")
