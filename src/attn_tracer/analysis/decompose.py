"""Each head's change to the residual stream, ΔE_h, and how they add up to the layer's output.

The study notes: each head adds a change ΔE to every position's embedding, and the sum of the
heads' changes (plus the output bias) is the attention block's output. In matrices, the merge of
heads followed by W_O is a sum over heads of each head's Z times its own rows of W_O:

    out = merge(Z)·W_O + b_O = Σ_h Z_h·W_O[h] + b_O,   W_O[h] = W_O[h·d_head : (h+1)·d_head]

This is TransformerLens's `stack_head_results`; `attn attribute` projects these onto a token's
unembedding and `attn trace --values` prints them for one position.
"""

from __future__ import annotations

import numpy as np


def head_rows(W_O: np.ndarray, heads: int) -> np.ndarray:
    """W_O [heads·d_head, d_model] → [heads, d_head, d_model]: each head's "value up" rows."""
    return W_O.reshape(heads, W_O.shape[0] // heads, W_O.shape[1])


def head_outputs(z: np.ndarray, W_O: np.ndarray) -> np.ndarray:
    """ΔE_h = Z_h·W_O[h] for every head: z [..., heads, d_head] → [..., heads, d_model].

    Summed over heads, plus b_O, this is the block's `out` (up to float rounding: the sum is
    taken in another order than merge(Z)·W_O's).
    """
    heads = z.shape[-2]
    return np.einsum("...hd,hdm->...hm", z, head_rows(W_O, heads))
