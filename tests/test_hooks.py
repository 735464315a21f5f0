"""Hooks on the trace's steps: what the analyses (attn heads, attn attribute) are built on.

A hook sees a step's whole array as it is made, on every engine and on the fused path too, and
what it returns replaces the step for the rest of the forward.
"""

from __future__ import annotations

import numpy as np
import pytest

from attn_tracer.model import pipeline
from attn_tracer.model.config import Config
from attn_tracer.model.engine import select_engine, torch_installed
from attn_tracer.model.trace import Selection
from attn_tracer.model.weights import random_weights

CONFIG = Config(d_model=16, heads=4, layers=2)
TEXT = ["The cat sat on the mat"]
ENGINES = ["numpy", pytest.param("torch", marks=pytest.mark.skipif(
    not torch_installed(), reason="needs torch"))]


def run(engine: str, hooks: dict, selection: Selection | None = None):
    selection = selection or Selection((), (), "patterns", extra=("blocks.1.resid_post",))
    trace, _ = pipeline.run(TEXT, CONFIG, select_engine(engine, "cpu", "float32", 1),
                            random_weights(CONFIG), selection, hooks=hooks)
    return trace


@pytest.mark.parametrize("engine", ENGINES)
def test_a_hooked_pattern_is_formed_for_every_head_even_when_none_is_shown(engine):
    seen = {}
    eng = select_engine(engine, "cpu", "float32", 1)
    hooks = {f"blocks.{layer}.attn.pattern":
             (lambda x, layer=layer: seen.__setitem__(layer, eng.to_host(x).copy()))
             for layer in range(CONFIG.layers)}
    run(engine, hooks)
    # The reference: the same run with every head of every layer captured, no hooks.
    every = Selection((0, 1), (0, 1, 2, 3), "patterns")
    reference = run("numpy", {}, every)
    for layer in range(CONFIG.layers):
        # float32 softmax outputs of O(1) inputs through the same formulas: a few ulps.
        np.testing.assert_allclose(seen[layer], reference.tensors[f"blocks.{layer}.attn.pattern"],
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_hook_that_returns_an_array_replaces_the_step(engine):
    plain = run(engine, {}).tensors["blocks.1.resid_post"]
    eng = select_engine(engine, "cpu", "float32", 1)
    zero_out = {"blocks.0.attn.out": lambda x: x * 0, "blocks.1.attn.out": lambda x: x * 0}
    ablated = run(engine, zero_out).tensors["blocks.1.resid_post"]
    resid_pre = run(engine, {}, Selection((), (), "patterns", extra=("resid_pre",)))
    # With both attention outputs zeroed the stack is the identity on its input, exactly.
    np.testing.assert_array_equal(ablated, resid_pre.tensors["resid_pre"])
    assert not np.allclose(plain, ablated)
    assert eng.name == engine
