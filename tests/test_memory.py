"""Long inputs and memory: refuse early and clearly, estimate honestly, stay readable.

The estimate is checked against what the kernel says a real run used (the growth of the peak
resident set size, VmHWM, in a fresh subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.cells import cell_len

from attn_tracer.cli import app
from attn_tracer.model import tokens, weights
from attn_tracer.text import read_file

SMALL_ARGS = ["--d-model", "64", "--heads", "4", "--layers", "2"]
LONG = Path(__file__).resolve().parent.parent / "sample_texts" / "long.txt"


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to draw the weights fails the test: refusals must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were drawn before the run was refused")

    monkeypatch.setattr(weights, "random_weights", refuse)


# ── longer than the model's context ───────────────────────────────────────────────────────────

def test_text_longer_than_n_ctx_suggests_max_length(runner, one_line_error):
    text = " ".join(["word"] * 20)
    message = one_line_error(runner.invoke(app, ["trace", text, *SMALL_ARGS, "--n-ctx", "8"]))
    assert "20 tokens" in message and "--n-ctx 8" in message and "--max-length 8" in message
    result = runner.invoke(app, ["trace", text, *SMALL_ARGS, "--n-ctx", "8", "--max-length",
                                 "8", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["inputs"][0]["length"] == 8


# ── the memory refusal comes before any large allocation ──────────────────────────────────────

def test_tiny_max_memory_refuses_a_normal_run(runner, no_weights, one_line_error):
    message = one_line_error(runner.invoke(app, ["trace", "The cat sat on the mat",
                                              "--max-memory", "1M"]))
    assert "needs about" in message and "MB" in message and "1.0 MB allowed" in message
    assert "--max-length" in message and "--max-memory" in message


@pytest.mark.slow
def test_activations_are_refused_before_the_weights_are_drawn(runner, no_weights,
                                                             one_line_error):
    # Small parameters, but 3,000 tokens: the len × len matrices are what does not fit.
    text = " ".join(["word"] * 3000)
    message = one_line_error(runner.invoke(app, ["trace", text, *SMALL_ARGS, "--n-ctx", "4096",
                                              "--max-memory", "200M"]))
    assert "needs about" in message and "200.0 MB allowed" in message


@pytest.mark.parametrize("args", [["--d-model", "1000000", "--heads", "16"],
                                  ["--layers", "100000"]])
def test_absurd_sizes_are_refused_from_the_estimate(runner, no_weights, args, one_line_error):
    start = time.process_time()
    message = one_line_error(runner.invoke(app, ["trace", "The cat sat on the mat", *args]))
    assert time.process_time() - start < 1.0  # CPU seconds: no weight was drawn
    assert "needs about" in message and "TB" in message


PROBE = """
import json, sys
from attn_tracer.model import memory, pipeline
from attn_tracer.model.config import Config
from attn_tracer.model.engine import select_engine
from attn_tracer.model.trace import Selection
from attn_tracer.model.weights import random_weights


def status(field):  # kB → bytes
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


engine_name, capture, length, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = Config(d_model=256, heads=8, layers=4, n_ctx=1024)
engine = select_engine(engine_name, "cpu", "float32", length)
selection = Selection(tuple(range(config.layers)), tuple(range(config.heads)), capture)
pipeline.run(["warm up the kernels"], config, engine, random_weights(config), selection)
try:  # reset the peak to the present (Linux ≥ 4.0), so the growth is this run's alone
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
except OSError:
    before = status("VmHWM")
texts = [" ".join(["word"] * length)] * batch
trace, _ = pipeline.run(texts, config, engine, random_weights(config), selection)
estimate = memory.estimate(config, "float32", batch, length, length, config.layers,
                           config.heads, capture, False)
print(json.dumps({"growth": status("VmHWM") - before, "estimate": estimate}))
"""


# ru_maxrss would carry pytest's own peak across the subprocess's exec; the process's own
# high-water mark (VmHWM, what getrusage reports for a fresh process) does not.
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("engine, capture", [
    ("numpy", "all"), pytest.param("torch", "patterns", marks=pytest.mark.slow)])
def test_estimate_is_above_the_real_peak_and_close_to_it(engine, capture):
    if engine == "torch":
        pytest.importorskip("torch")
    out = subprocess.run([sys.executable, "-c", PROBE, engine, capture, "300", "2"],
                         capture_output=True, text=True, timeout=120, check=True)
    m = json.loads(out.stdout)
    assert m["growth"] > 10e6  # the run really allocated something to compare with
    assert m["growth"] <= m["estimate"] <= 3 * m["growth"], m


# ── the 1,000-token text with the default configuration ───────────────────────────────────────

def long_text() -> str:
    if LONG.exists():
        return LONG.read_text(encoding="utf-8")
    return " ".join(f"sentence {i} goes on about attention, masks and shapes." for i in range(100))


@pytest.mark.slow
def test_long_text_traces_and_stays_readable(runner, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text(long_text(), encoding="utf-8")
    n = len(tokens.tokenize(read_file(path)))  # as attn reads it: without the final newline
    assert 900 <= n <= 1024
    result = runner.invoke(app, ["trace", "--file", str(path), "--engine", "numpy"],
                           env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(cell_len(line) for line in lines) <= 120
    assert f"{n} keys do not fit in 120 columns" in result.stdout  # the top-k-per-row view
    assert "strongest keys of each query" in result.stdout
    flat = " ".join(result.stdout.split())
    # What was left out, and how to see it.
    assert f"queries 0–{n - 25} not listed: list them with --query 0:{n - 25}" in flat
    assert f"{n} tokens" in result.stdout
    assert len(lines) < 1000  # a view, not a dump of 984 × 984 numbers


DEEP_PROBE = """
import json, sys
from attn_tracer.model import memory, pipeline
from attn_tracer.model.config import Config
from attn_tracer.model.engine import select_engine
from attn_tracer.model.trace import Selection
from attn_tracer.model.weights import random_weights


def status(field):  # kB → bytes
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


layers, capture = int(sys.argv[1]), sys.argv[2]
engine = select_engine("numpy", "cpu", "float32", 8)
warm = Config(d_model=1, heads=1, layers=2)
pipeline.run(["warm up"], warm, engine, random_weights(warm), Selection((0,), (0,), capture))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
config = Config(d_model=1, heads=1, layers=layers)
shown = tuple(range(layers)) if capture == "all" else (0,)
trace, _ = pipeline.run(["The cat sat on the mat"], config, engine, random_weights(config),
                        Selection(shown, (0,), capture))
estimate = memory.estimate(config, "float32", 1, 6, 6, len(shown), 1, capture, False)
print(json.dumps({"growth": status("VmHWM") - before, "estimate": estimate}))
"""


# A deep stack of one-number layers: the arrays are nothing, Python's bookkeeping per step is
# all (the 20,000 layers were estimated at 640 KB and peaked at 401 MB).
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("capture", ["patterns", "all"])
def test_the_estimate_counts_the_cost_of_each_layer(capture: str):
    out = subprocess.run([sys.executable, "-c", DEEP_PROBE, "4000", capture],
                         capture_output=True, text=True, timeout=120, check=True)
    m = json.loads(out.stdout)
    assert m["growth"] > 10e6, m  # 4,000 layers of bookkeeping really cost something
    assert m["growth"] <= m["estimate"] <= 3 * m["growth"], m
