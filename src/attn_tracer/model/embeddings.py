"""Tokens → the first residual stream: X = W_E[tokens] + P[positions]."""

from __future__ import annotations

import numpy as np

from attn_tracer.model.config import Config
from attn_tracer.model.weights import Weights


def sinusoidal(positions: np.ndarray, d_model: int) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d_model)), PE[pos, 2i+1] = cos(…) (Vaswani et al.)."""
    i = np.arange(0, d_model, 2, dtype=np.float64)
    angle = positions[..., None].astype(np.float64) / 10000 ** (i / d_model)
    pe = np.zeros((*positions.shape, d_model))
    pe[..., 0::2] = np.sin(angle)
    pe[..., 1::2] = np.cos(angle[..., : d_model // 2])
    return pe.astype(np.float32)


def embed(ids: np.ndarray, positions: np.ndarray, config: Config, weights: Weights, engine,
          rec, prefix: str = "", padded: bool = False):
    """X = W_E[tokens] + P[positions] [batch, len, d_model], on the engine, each part recorded."""
    bld = ("batch", "len", "d_model")
    if padded:
        from attn_tracer.model.tokenizer import of

        op = f"token ids, padded with {of(config).pad_text()}"
    ids = rec(f"{prefix}tokens", op if padded else "token ids", ids, ("batch", "len"))
    x = rec(f"{prefix}embed", "W_E[tokens]", engine.asarray(weights.token_rows(ids)), bld)
    pos = positional(config, weights, positions)
    if pos is not None:
        op = "PE(position): sin/cos" if config.pos == "sinusoidal" else "W_pos[position]"
        x = x + rec(f"{prefix}pos_embed", op, engine.asarray(pos), bld)
    x = rec(f"{prefix}resid_pre", "X = W_E[tokens] + P" if pos is not None else "X = W_E[tokens]",
            x, bld)
    rec.flush()
    return x


def positional(config: Config, weights: Weights, positions: np.ndarray) -> np.ndarray | None:
    """P[positions] → [*positions.shape, d_model], or None without positional information."""
    if config.pos in ("none", "rotary"):  # rotary positions turn Q and K instead (layers.rotate)
        return None
    if config.pos == "sinusoidal":
        return sinusoidal(positions, config.d_model)
    return weights.position_rows(positions)
