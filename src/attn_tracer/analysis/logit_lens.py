"""The logit lens: what the model would predict if it stopped after each layer.

The residual stream after layer L goes through the final LayerNorm (its own σ, computed from
that residual, as the model would) and the unembedding: softmax(LayerNorm_f(x_L)·W_U). After
the last layer this is the model's own prediction. (nostalgebraist 2020; TransformerLens's
`accumulated_resid(apply_ln=True)`; Ecco's per-layer predictions.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attn_tracer.model.arch.base import RMSNorm

CHUNK = 256  # positions unembedded at once: [CHUNK, vocab] floats, not [len, vocab]


@dataclass(frozen=True)
class Lens:
    positions: list[int]
    top_ids: np.ndarray  # [layers, positions] the most likely next token after each layer
    top_probs: np.ndarray  # [layers, positions]
    # At one position (the explained one), each layer's logit, probability and rank (1 = top)
    # of the target token; None if no target was asked for.
    target_logits: np.ndarray | None = None  # [layers]
    target_probs: np.ndarray | None = None  # [layers]
    target_ranks: np.ndarray | None = None  # [layers]


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


RMS = "rms"  # the `norm` of random attention-only weights: h / rms(h) before W_U


def logits_of(resid: np.ndarray, W_U: np.ndarray, norm: tuple | None) -> np.ndarray:
    """resid [..., d_model] → logits [..., vocab]; `norm` = (w, b, eps) of ln_f, RMS (random
    attention-only weights: h / rms(h), see Weights.normalizes_logits), or None."""
    if norm is RMS:
        rms = np.sqrt(np.mean(np.square(resid, dtype=np.float64), axis=-1, keepdims=True))
        h = resid / np.where(rms > 0, rms, 1.0)
    elif isinstance(norm, RMSNorm):
        ms = np.mean(np.square(resid, dtype=np.float64), axis=-1, keepdims=True)
        h = resid / np.sqrt(ms + norm.eps) * norm.w
    else:
        h = resid if norm is None else layer_norm(resid, *norm)
    return h.astype(W_U.dtype, copy=False) @ W_U.T


def softmax_stats(logits: np.ndarray, target: int | None = None):
    """Top id, its probability, and (if `target`) the target's logit, probability and rank,
    for each row of `logits` [..., vocab], without keeping a probability table."""
    top = np.argmax(logits, axis=-1)
    peak = np.take_along_axis(logits, top[..., None], axis=-1)
    # Σ exp(l − max) in float64: 50k terms, each ≤ 1, summed without float32's drift.
    total = np.exp(logits - peak).sum(axis=-1, dtype=np.float64)
    out = [top, 1.0 / total]
    if target is not None:
        lt = logits[..., target].astype(np.float64)
        out += [lt, np.exp(lt - peak[..., 0]) / total,
                (logits > logits[..., target:target + 1]).sum(axis=-1) + 1]
    return out


def logit_lens(resid: np.ndarray, positions: list[int], W_U: np.ndarray, norm: tuple | None,
               explained: int | None = None, target: int | None = None) -> Lens:
    """`resid` [layers, positions, d_model]: the residual after each layer at `positions`.

    `W_U` as rows [vocab, d_model]; `norm` the final LayerNorm (w, b, eps), None without one.
    `explained` (one of `positions`) and `target`: also report the target token's logit,
    probability and rank at that position after each layer.
    """
    layers, n, d = resid.shape
    flat = resid.reshape(layers * n, d)  # row layer·n + j: after `layer`, at positions[j]
    top_ids = np.zeros(layers * n, np.int64)
    top_probs = np.zeros(layers * n)
    rows_of_target = ([layer * n + positions.index(explained) for layer in range(layers)]
                      if target is not None else [])
    found: dict[int, tuple] = {}
    # Every layer's rows in one product, CHUNK rows at a time: W_U (vocab × d_model, the
    # largest array here) is read once per chunk, not once per layer.
    for start in range(0, layers * n, CHUNK):
        rows = slice(start, min(start + CHUNK, layers * n))
        stats = softmax_stats(logits_of(flat[rows], W_U, norm), target)
        top_ids[rows], top_probs[rows] = stats[0], stats[1]
        for row in rows_of_target:
            if start <= row < rows.stop:
                found[row] = (stats[2][row - start], stats[3][row - start],
                              stats[4][row - start])
    lens = Lens(positions, top_ids.reshape(layers, n), top_probs.reshape(layers, n))
    if target is None:
        return lens
    tl, tp, tr = (np.array([found[row][i] for row in rows_of_target]) for i in range(3))
    return Lens(positions, lens.top_ids, lens.top_probs, tl, tp, tr.astype(np.int64))
