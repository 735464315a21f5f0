"""Block pooling of attention patterns: any [q_len, k_len] pattern shrunk to a few cells.

The queries and the keys are cut into contiguous blocks, and a cell is the weight a query gives
that block of keys (summed over the block's keys), averaged over the block's queries, so each
pooled row is still a distribution over the keys that sums to 1. NumPy only: the thumbnails of
`attn heads` and `attn explore` (render/thumbnails.py) draw what this computes, and the head
scorer (analysis/heads.py) applies the same block matrices on the engine.
"""

from __future__ import annotations

import numpy as np


def edges(n: int, parts: int) -> np.ndarray:
    """Block boundaries cutting n positions into min(parts, n) contiguous, near-equal blocks."""
    parts = max(1, min(parts, n))
    return np.round(np.linspace(0, n, parts + 1)).astype(np.int64)


def indicator(n: int, parts: int, start: int = 0, total: int | None = None) -> np.ndarray:
    """[blocks, total]: 1 where position (start + i) lies in block b of the n positions."""
    total = n if total is None else total
    e = edges(n, parts)
    out = np.zeros((len(e) - 1, total), np.float32)
    for b in range(len(e) - 1):
        out[b, start + e[b]:start + e[b + 1]] = 1
    return out


def downsample(pattern: np.ndarray, rows: int, cols: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """pattern [q_len, k_len] → (values, drawn), both [min(rows, q_len), min(cols, k_len)].

    values: per block, the weight a query gives the block's keys, averaged over the block's
    queries (pad queries, which have no allowed key, left out); drawn: whether the block holds an
    allowed cell (`allowed` [q_len, k_len], None: every cell is).
    """
    q_len, k_len = pattern.shape
    R, C = indicator(q_len, rows), indicator(k_len, cols).T
    if allowed is None:
        weights = R
        drawn = np.ones((R.shape[0], C.shape[1]), bool)
    else:
        weights = R * allowed.any(axis=1)
        drawn = (R @ allowed.astype(np.float32) @ C) > 0
    counts = weights.sum(axis=1, keepdims=True)
    weights = weights / np.where(counts > 0, counts, 1)
    values = weights @ pattern.astype(np.float32) @ C
    return values, drawn


def batch_blocks(valid: np.ndarray, rows: int, cols: int, causal: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The block matrices of a padded batch, each text cut over its real tokens only.

    Returns R [batch, rows', len] (the mean over a block's queries), C [batch, len, cols']
    (the sum over a block's keys), drawn [batch, rows', cols'] and sizes [batch, 2] (each
    text's own rows and columns; the rest is zero padding), so that R·A·C is every thumbnail
    of a layer at once, on any engine.
    """
    batch, length = valid.shape
    n = valid.sum(axis=1)
    r_max, c_max = int(min(rows, n.max())), int(min(cols, n.max()))
    R = np.zeros((batch, r_max, length), np.float32)
    C = np.zeros((batch, length, c_max), np.float32)
    drawn = np.zeros((batch, r_max, c_max), bool)
    sizes = np.zeros((batch, 2), np.int64)
    for b in range(batch):
        start = int(np.argmax(valid[b]))
        rb = indicator(int(n[b]), rows, start, length)
        cb = indicator(int(n[b]), cols, start, length)
        R[b, :len(rb)] = rb / rb.sum(axis=1, keepdims=True)
        C[b, :, :len(cb)] = cb.T
        real = valid[b]
        allowed = real[:, None] & real[None, :]
        if causal:
            allowed &= np.tri(length, dtype=bool)
        drawn[b, :len(rb), :len(cb)] = (rb @ allowed.astype(np.float32) @ cb.T) > 0
        sizes[b] = len(rb), len(cb)
    return R, C, drawn, sizes
