"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Attention in layer l mixes positions; the residual connection carries each position's own
value past it. Rollout models a layer as the head-averaged pattern plus the identity, each row
normalised to sum to 1, and chains the layers:

    Â_l = (A_l + I) / rowsum(A_l + I),   A_l = mean over heads of pattern_l   [q_len, k_len]
    R = Â_L · … · Â_2 · Â_1

R[i, j] is how much of input token j reaches position i after the last layer. The rows are
queries and are normalised over the keys (axis −1): normalising along the other axis (a
well-known implementation divides by the column sums) gives rows that no longer sum to 1.
"""

from __future__ import annotations

import numpy as np


def rollout(patterns: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """`patterns` [layers, q_len, k_len], each layer's pattern averaged over heads → R.

    `valid` [len] marks real tokens: a pad query attends to nothing, so its row of A is 0 and
    its Â row is the identity's; no real query ever reaches a pad key. R's pad rows are set to
    0 (a pad position explains nothing), as the heatmaps draw a pad query.
    """
    patterns = np.asarray(patterns, np.float64)
    eye = np.eye(patterns.shape[-1])
    R = eye
    for A in patterns:
        A_hat = A + eye
        A_hat = A_hat / A_hat.sum(axis=-1, keepdims=True)  # rows: over the keys
        R = A_hat @ R
    if valid is not None:
        R = np.where(np.asarray(valid, bool)[:, None], R, 0.0)
    return R
