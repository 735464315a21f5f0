"""`attn heads` keeps reductions, not patterns: its memory does not grow with layers × heads × len².

tracemalloc sees every NumPy allocation (NumPy reports them to it), so the peak of a run is
measured exactly, without the noise of the process's resident size.
"""

from __future__ import annotations

import tracemalloc

import pytest

from attn_tracer.commands import heads as heads_command
from attn_tracer.commands.run import Request
from attn_tracer.model.engine import torch_installed

TEXT = " ".join(["the cat sat on the mat and looked at the dog"] * 30)  # 330 tokens


def run(layers: int, engine: str = "numpy"):
    request = Request(texts=[TEXT], d_model=32, heads=4, layers=layers, engine=engine)
    return heads_command.compute(request, heads_command.HeadsOptions(), lambda m: None)


def peak(layers: int) -> tuple[int, object]:
    tracemalloc.start()
    try:
        result = run(layers)
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_memory_does_not_grow_with_layers():
    peak(1)  # warm: caches (the vocabulary, the word list) allocated once, outside the figures
    low, result = peak(2)
    high, _ = peak(10)
    length = result.trace.inputs[0].length
    one_layer = 4 * length * length * 4  # one layer's patterns, float32, every head
    # Eight more layers add their weights (4·d_model² floats each: 16 KB) and their score rows,
    # not their patterns: less than one layer's patterns in all.
    assert high - low < one_layer, (high - low, one_layer)
    assert result.trace.tensors == {}  # nothing captured: the scores came from the hooks


@pytest.mark.skipif(not torch_installed(), reason="needs torch")
def test_the_torch_engine_keeps_nothing_either():
    result = run(2, "torch")  # not under tracemalloc: it would trace torch's whole import
    assert result.trace.engine["engine"] == "torch"
    assert result.trace.tensors == {}
    assert result.scores["self"].shape == (2, 4)
