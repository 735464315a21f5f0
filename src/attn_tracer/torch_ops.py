"""PyTorch-only kernels; imported only on the torch engine."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_attention(q, k, v, allowed, scale: float):
    """softmax(Q·Kᵀ·scale + mask)·V without building the len×len matrix.

    A query with no allowed key (a pad query) gets Z = 0, as in the explicit path, where
    SDPA would give NaN.
    """
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    has_key = allowed.any(dim=-1, keepdim=True)  # [batch, 1, q_len, 1]
    return torch.where(has_key, z, torch.zeros((), dtype=z.dtype, device=z.device))
