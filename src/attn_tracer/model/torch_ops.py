"""PyTorch-only kernels; imported only on the torch engine."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_attention(q, k, v, allowed, scale: float, causal: bool = False):
    """softmax(Q·Kᵀ·scale + mask)·V without building the len×len matrix.

    `causal`: `allowed` is exactly the causal triangle (one text, no padding). Saying so lets
    the kernel skip the blocks above the diagonal, half the work, where a boolean mask makes it
    visit them all. A query with no allowed key (a pad query) gets Z = 0, as in the explicit
    path, where SDPA would give NaN.
    """
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    has_key = allowed.any(dim=-1, keepdim=True)  # [batch, 1, q_len, 1]
    return torch.where(has_key, z, torch.zeros((), dtype=z.dtype, device=z.device))


def layer_norm(x, w, b, eps: float):
    """layers.layer_norm in one kernel; half precision is normalized in float32."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype) * w + b
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def gelu_new(x):
    """layers.gelu_new (GPT-2's tanh approximation) in one kernel."""
    return F.gelu(x, approximate="tanh")


def softmax(x):
    """layers.softmax in one kernel, in at least float32; a row with no allowed key is all 0."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    out = torch.softmax(x, dim=-1, dtype=torch.float32 if half else None)
    dead = torch.isneginf(x.amax(dim=-1, keepdim=True))  # a pad query: every key is −∞
    if dead.any():
        out = out.masked_fill(dead, 0.0)  # torch.softmax gives NaN there
    return out.to(x.dtype) if half else out


def linear(x, W, b):
    """layers.linear (x·W + b, W stored [in, out]) as one addmm, as nn.Linear runs it."""
    return F.linear(x, W.mT, b)
