"""A head's value map as "value down × value up", and why it is low rank.

The study notes: a head moves information with a d_model → d_model map, built as the product
of a "value down" matrix (W_V's columns of that head, [d_model, d_head]) and a "value up" matrix
(W_O's rows of that head, [d_head, d_model]); stacked, the value-up matrices of all heads are
W_O. With row vectors (x·W) the head's value map is

    W_OV[h] = W_V[:, h] · W_O[h]   [d_model, d_model],   rank ≤ min(d_head, d_model)

(TransformerLens's `OV` FactoredMatrix). Its parameters are counted two ways: as a full
d_model × d_model matrix, d_model², or as the two factors, 2·d_model·d_head — the same count as
the head's share of W_Q and W_K, which make its query-key map W_Q[:, h]·W_K[:, h]ᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attn_tracer.analysis.decompose import head_rows


def value_down(W_V: np.ndarray, d_head: int, kv_head: int) -> np.ndarray:
    """W_V [d_model, kv_heads·d_head] → K/V head `kv_head`'s columns [d_model, d_head].

    With grouped-query attention W_V is narrower than W_Q: query head h reads the columns of
    its group's K/V head, h // (heads / kv_heads). The width is given, never divided out of
    W_V's shape (which would be kv_heads·d_head / heads, wrong as soon as K/V are narrower)."""
    return W_V[:, kv_head * d_head:(kv_head + 1) * d_head]


def value_up(W_O: np.ndarray, heads: int, h: int) -> np.ndarray:
    """W_O [heads·d_head, d_model] → head h's rows [d_head, d_model]."""
    return head_rows(W_O, heads)[h]


@dataclass(frozen=True)
class ValueCircuit:
    head: int
    down: np.ndarray  # [d_model, d_head]
    up: np.ndarray  # [d_head, d_model]
    singular_values: np.ndarray  # of W_OV, largest first (at most min(d_head, d_model))
    tolerance: float  # singular values at or below this count as 0
    rank: int

    @property
    def ov(self) -> np.ndarray:
        """W_OV = value down · value up [d_model, d_model], in the weights' float32."""
        return self.down @ self.up

    @property
    def full_params(self) -> int:
        d_model = self.down.shape[0]
        return d_model * d_model

    @property
    def factored_params(self) -> int:
        return self.down.size + self.up.size  # 2·d_model·d_head


def value_circuit(W_V: np.ndarray, W_O: np.ndarray, heads: int, h: int,
                  kv_heads: int | None = None) -> ValueCircuit:
    """Head h's value circuit and its rank; `kv_heads` (default: heads) K/V heads, of which
    query head h uses number h // (heads / kv_heads).

    The rank follows numpy.linalg.matrix_rank's rule for the float32 product: singular values
    above σ_max · d_model · ε(float32), where ε(float32) = 2⁻²³ ≈ 1.2e-7 bounds the relative
    rounding of each entry and the d_model-fold sum of a product grows it at most d_model times.
    The singular values come from the factors, not from the d_model × d_model product (which
    would cost an SVD of d_model³ per head): with down = Q_a·R_a and upᵀ = Q_b·R_b (QR, Q's
    columns orthonormal), W_OV = Q_a·(R_a·R_bᵀ)·Q_bᵀ has the singular values of the small
    R_a·R_bᵀ, at most d_head × d_head.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    d_head = W_O.shape[0] // heads  # W_O's rows are heads·d_head: one block per query head
    down, up = value_down(W_V, d_head, h // (heads // kv_heads)), value_up(W_O, heads, h)
    _, r_a = np.linalg.qr(down.astype(np.float64))
    _, r_b = np.linalg.qr(up.T.astype(np.float64))
    sigma = np.linalg.svd(r_a @ r_b.T, compute_uv=False)
    d_model = down.shape[0]
    tolerance = float(sigma.max(initial=0.0)) * d_model * float(np.finfo(np.float32).eps)
    return ValueCircuit(h, down, up, sigma, tolerance, int(np.count_nonzero(sigma > tolerance)))
