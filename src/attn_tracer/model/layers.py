"""The layers, written once against the Array API: the same lines run on NumPy and PyTorch.

One attention layer, top to bottom, is the formula

    pattern = softmax(Q·Kᵀ / √d_head + mask),   Z = pattern·V,   out = merge(Z)·W_O + b_O

with every intermediate handed to `rec` (the trace recorder) under its step name; rotary
positions turn Q and K before the scores, and grouped-query K/V heads are repeated for their
query heads (`repeat_kv`). How a family puts these into a block is model/arch/'s.

NumPy runs every formula here as written; it is the reference the torch engine is tested
against, to rounding (tests/tolerance.py), and attention nobody looks at runs a block of
queries at a time (`blocked_attention`), never all heads' len×len scores at once. On torch, four
elementwise steps (x·W + b, softmax, LayerNorm, GELU) call the same formula as one fused kernel
from `torch_ops`, attention nobody looks at runs as one `scaled_dot_product_attention`, and score
stages nobody keeps are updated in place.
"""

from __future__ import annotations

import math

import numpy as np

from attn_tracer.model.config import Config
from attn_tracer.model.engine import Engine, namespace

# Dimension names of the recorded steps (config.py's vocabulary).
BLD = ("batch", "len", "d_model")
# Scores blocked_attention holds at once: 4 M floats, 16 MB in float32 per temporary (a softmax
# makes about five), against 805 MB for all 12 heads of a 4,096-token text at once.
BLOCK_SCORES = 2**22


def _torch(x) -> bool:
    return namespace(x) is not np


def linear(x, W, b=None):
    if b is not None and _torch(x):  # torch: x·W + b in one addmm
        from attn_tracer.model.torch_ops import linear as fused_linear

        return fused_linear(x, W, b)
    y = x @ W
    return y if b is None else y + b


def attention(x, x_kv, p: dict, config: Config, allowed, rec, engine: Engine, layer: int,
              block: str = "attn", causal: bool = False, rotary=None, cache=None):
    """Multi-head attention of `x` over `x_kv` (the same array for self-attention).

    `allowed` [batch, 1, q_len, k_len] is True where a query may look at a key, or None;
    `causal` says it is exactly the causal triangle, which a fused kernel can exploit.
    `rotary`: (cos, sin) [batch, 1, len, rotary_dims / 2] of each position's angles, with
    --pos rotary (see `rotary_angles`), else None.
    With grouped-query attention (kv_heads < heads) K and V are projected to kv_heads·d_head
    and each K/V head is repeated for its heads / kv_heads query heads before the scores.
    `cache` (generation, model/generate.py's KVCache): this call's K and V (after the
    rotation, before repeat_kv) are appended to the earlier tokens' and the scores are taken
    against all of them; `allowed` is then [batch, 1, q_len, past + q_len], from the positions.
    """
    prefix = f"blocks.{layer}.{block}"
    xp = namespace(x)
    batch, q_len, _ = x.shape
    k_len = x_kv.shape[1]
    heads, kv_heads, d_head = config.heads, config.kv_heads, config.d_head
    # Self-attention says `len`; cross-attention keeps the two lengths apart.
    lq, lk = ("len", "len") if x is x_kv else ("q_len", "k_len")
    grouped = kv_heads != heads

    def project(name: str, source, length: int, dim: str):
        W, b = p[f"{prefix}.W_{name}"], p.get(f"{prefix}.b_{name}")
        bias = f" + b_{name}" if b is not None else ""
        src = "X" if source is x else "X_kv"
        # Q has heads·d_head columns; K and V kv_heads·d_head (the same without grouped-query).
        n, width = (heads, config.attn_dim) if name == "Q" else (kv_heads, config.kv_dim)
        axis = "kv_heads" if name != "Q" and grouped else "heads"
        y = rec(f"{prefix}.{name.lower()}", f"{name} = {src}·W_{name}{bias}", linear(source, W, b),
                ("batch", dim, width))
        y = rec(f"{prefix}.{name.lower()}.split", "split into heads",
                xp.reshape(y, (batch, length, n, d_head)), ("batch", dim, axis, "d_head"))
        return rec(f"{prefix}.{name.lower()}.heads", "transpose(1, 2)",
                   xp.permute_dims(y, (0, 2, 1, 3)), ("batch", axis, dim, "d_head"))

    q = project("Q", x, q_len, lq)  # [batch, heads, q_len, d_head]
    k = project("K", x_kv, k_len, lk)  # [batch, kv_heads, k_len, d_head]
    v = project("V", x_kv, k_len, lk)  # [batch, kv_heads, k_len, d_head]
    if rotary is not None:
        q = rec(f"{prefix}.q.rot", rotary_op(config, "Q"), rotate(q, *rotary, config),
                ("batch", "heads", lq, "d_head"))
        k = rec(f"{prefix}.k.rot", rotary_op(config, "K"), rotate(k, *rotary, config),
                ("batch", "kv_heads" if grouped else "heads", lk, "d_head"))
    if cache is not None:  # generation: K, V of every token so far, this one's appended
        k, v = cache.append(layer, k, v, rec, prefix)  # [batch, kv_heads, past + q_len, d_head]
        k_len = k.shape[2]
    if grouped:
        share = f"repeat_kv: K/V head j serves query heads j·{config.groups} … " \
            f"j·{config.groups}+{config.groups - 1}"
        k = rec(f"{prefix}.k.repeat_kv", share, repeat_kv(k, config.groups),
                ("batch", "heads", lk, "d_head"))
        v = rec(f"{prefix}.v.repeat_kv", share, repeat_kv(v, config.groups),
                ("batch", "heads", lk, "d_head"))

    shown = list(rec.selection.heads) if rec.selection.shows(layer) else []
    # When every head is shown, the explicit path below already has the patterns: fusing too
    # would compute attention twice.
    if (rec.selection.capture != "all" and len(shown) < heads
            and f"{prefix}.pattern" not in rec.hooks):
        # The full len×len matrix is built only for the heads the user will look at; Z of every
        # head comes from a kernel that never holds [batch, heads, len, len] at once.
        index = xp.asarray(shown, dtype=xp.int64, device=q.device)
        pattern_steps(xp.take(q, index, axis=1), xp.take(k, index, axis=1), config, allowed,
                      rec, prefix, all_heads=heads)
        scale = 1 / math.sqrt(d_head) if config.scale else 1.0
        if engine.fused:
            from attn_tracer.model.torch_ops import fused_attention

            z = fused_attention(q, k, v, allowed, scale, causal)
        else:
            block = max(1, BLOCK_SCORES // (batch * heads * k_len))
            z = blocked_attention(q, k, v, allowed, scale, block)
    else:
        pattern = pattern_steps(q, k, config, allowed, rec, prefix)
        z = pattern @ v
    z = rec(f"{prefix}.z", "Z = pattern·V", z, ("batch", "heads", lq, "d_head"))
    z = rec(f"{prefix}.z.transpose", "transpose(1, 2)",
            xp.permute_dims(z, (0, 2, 1, 3)), ("batch", lq, "heads", "d_head"))
    z = rec(f"{prefix}.z.merge", "merge heads (concat)",
            xp.reshape(z, (batch, q_len, heads * d_head)), ("batch", lq, config.attn_dim))
    b_O = p.get(f"{prefix}.b_O")
    return rec(f"{prefix}.out", "out = Z·W_O" + (" + b_O" if b_O is not None else ""),
               linear(z, p[f"{prefix}.W_O"], b_O), ("batch", lq, "d_model"))


def repeat_kv(x, groups: int):
    """[batch, kv_heads, len, d_head] → [batch, kv_heads·groups, len, d_head]: K/V head j
    becomes heads j·groups … j·groups + groups − 1 (transformers' repeat_kv)."""
    xp = namespace(x)
    batch, kv_heads, length, d_head = x.shape
    wide = xp.broadcast_to(x[:, :, None], (batch, kv_heads, groups, length, d_head))
    return xp.reshape(wide, (batch, kv_heads * groups, length, d_head))


def rotary_angles(positions: np.ndarray, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of position·θ_i [batch, 1, len, rotary_dims / 2], θ_i = rope_theta^(−2i/r),
    in float64 on the host (the engine rounds them once, to its dtype)."""
    r = config.rotary_dims
    theta = config.rope_theta ** (-np.arange(0, r, 2, dtype=np.float64) / r)
    angle = positions[:, None, :, None].astype(np.float64) * theta
    return np.cos(angle), np.sin(angle)


def rotary_op(config: Config, x: str) -> str:
    """The formula of the rotation step of `x` (Q or K)."""
    r, d = config.rotary_dims, config.d_head
    pairs = (f"({x}_i, {x}_i+{r // 2}) (halves, as Llama/NeoX)" if config.rotary_style == "halves"
             else f"({x}_2i, {x}_2i+1) (interleaved, as GPT-J)")
    part = f"; dims ≥ {r} kept" if r < d else ""
    return f"turn pairs {pairs} by p·θ_i, θ_i = {config.rope_theta:g}^(−2i/{r}){part}"


def rotate(x, cos, sin, config: Config):
    """x [batch, heads, len, d_head] with each pair of its first rotary_dims dimensions turned
    by its position's angle: (a, b) → (a·cos − b·sin, b·cos + a·sin)."""
    xp = namespace(x)
    r = config.rotary_dims
    rot, rest = x[..., :r], x[..., r:]
    if config.rotary_style == "halves":
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        out = xp.concat([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        pairs = xp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
        out = xp.reshape(pairs, rot.shape)
    return out if r == x.shape[-1] else xp.concat([out, rest], axis=-1)


def blocked_attention(q, k, v, allowed, scale: float, block: int):
    """softmax(Q·Kᵀ·scale + mask)·V on NumPy, `block` queries at a time.

    NumPy's stand-in for torch's fused kernel: the scores of every head exist for one block of
    queries at a time, [batch, heads, block, k_len], never [batch, heads, len, len]. Keys that no
    query of the block may see (the future, under the causal mask) are left out, which changes
    nothing but the work: they would add exp(−∞) = 0. A query with no allowed key gets Z = 0,
    as in the explicit path.
    """
    z = np.zeros((*q.shape[:-1], v.shape[-1]), dtype=q.dtype)  # [batch, heads, q_len, d_head]
    for start in range(0, q.shape[-2], block):
        rows = slice(start, start + block)
        keys, mask = k.shape[-2], None
        if allowed is not None:
            seen = np.flatnonzero(allowed[..., rows, :].any(axis=(0, 1, 2)))
            if not seen.size:
                continue  # pad queries only: their Z stays 0
            keys = int(seen[-1]) + 1
            mask = allowed[..., rows, :keys]
        scores = (q[..., rows, :] @ np.matrix_transpose(k[..., :keys, :])) * scale
        if mask is not None:
            scores = _mask_(scores, mask)
        z[..., rows, :] = softmax(scores, overwrite=True) @ v[..., :keys, :]
    return z


def pattern_steps(q, k, config: Config, allowed, rec, prefix: str, all_heads: int | None = None):
    """scores = Q·Kᵀ → ÷ √d_head → mask → softmax: each stage recorded.

    `all_heads`: q and k hold only the shown heads of that many (see Recorder).
    """
    xp = namespace(q)
    score_dims = ("batch", "heads", "q_len", "k_len")

    def record(stage: str, op: str, x):
        return rec(f"{prefix}.{stage}", op, x, score_dims, all_heads=all_heads)

    # Stages that nobody keeps are updated in place, and the softmax works in their memory:
    # fewer [batch, heads, len, len] buffers per layer, which is most of the cost of showing
    # every head of a long text (NumPy, 12 heads × 1,024²: 208 ms → 60 ms; the same bits).
    in_place = not any(rec.needs(f"{prefix}.{stage}") for stage in ("scores", "scaled", "masked"))
    scores = record("scores", "scores = Q·Kᵀ", q @ xp.matrix_transpose(k))
    if config.scale:
        root = math.sqrt(config.d_head)
        scores = record("scaled", f"scores ÷ √d_head (√{config.d_head} = {root:.4g})",
                        _divide_(scores, root) if in_place else scores / root)
    if allowed is not None:
        minus_inf = xp.full((), -math.inf, dtype=scores.dtype, device=scores.device)
        scores = record("masked", "scores + mask (−∞)",
                        _mask_(scores, allowed) if in_place
                        else xp.where(allowed, scores, minus_inf))
    return record("pattern", "pattern = softmax(scores)", softmax(scores, overwrite=in_place))


def _divide_(x, d: float):
    """x / d, written into x."""
    return x.div_(d) if _torch(x) else np.divide(x, d, out=x)


def _mask_(x, allowed):
    """x where allowed, −∞ elsewhere, written into x."""
    if _torch(x):
        return x.masked_fill_(~allowed, -math.inf)
    np.copyto(x, -np.inf, where=~allowed)
    return x


def softmax(x, overwrite: bool = False):
    """Softmax over the last axis, in at least float32; a row with no allowed key is all 0.

    Such a row (a pad query) would be 0/0 = NaN; defining it as zeros keeps it out of Z.
    `overwrite`: x is not needed afterwards, so NumPy may work in its memory.
    """
    xp = namespace(x)
    if _torch(x):  # torch: the same softmax in one kernel instead of eight passes
        from attn_tracer.model.torch_ops import softmax as fused_softmax

        return fused_softmax(x)
    dtype = x.dtype
    # Not getattr(…, None): NumPy reads dtype == None as float64, which would round it to float32.
    if dtype in (xp.float16, getattr(xp, "bfloat16", xp.float16)):
        x = xp.astype(x, xp.float32)
    m = xp.max(x, axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    e = np.exp(np.subtract(x, m, out=x), out=x) if overwrite else xp.exp(x - m)
    total = xp.sum(e, axis=-1, keepdims=True)
    # e is ours either way: divided in place, and not copied again for the same dtype.
    out = np.divide(e, xp.where(total > 0, total, xp.ones_like(total)), out=e)
    return xp.astype(out, dtype, copy=False)


def layer_norm(x, w, b, eps: float):
    xp = namespace(x)
    if _torch(x):  # torch: the same formula in one kernel instead of nine passes
        from attn_tracer.model.torch_ops import layer_norm as fused_layer_norm

        return fused_layer_norm(x, w, b, eps)
    dtype = x.dtype
    if dtype in (xp.float16, getattr(xp, "bfloat16", xp.float16)):
        x = xp.astype(x, xp.float32)  # half precision loses the variance of a wide row
    mean = xp.mean(x, axis=-1, keepdims=True)
    var = xp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    # A variance that overflowed would divide every value to 0, a finite answer that is wrong:
    # NaN instead, which the run's finiteness check then names (pipeline._Finite).
    var = xp.where(xp.isfinite(var), var, xp.full_like(var, math.nan))
    y = (x - mean) / xp.sqrt(var + eps)
    return xp.astype(y, dtype) * w + b


def gelu_new(x):
    """GPT-2's GELU, the tanh approximation."""
    xp = namespace(x)
    if _torch(x):  # torch: the same formula in one kernel instead of eight passes
        from attn_tracer.model.torch_ops import gelu_new as fused_gelu

        return fused_gelu(x)
    # x·x·x, not x**3: NumPy's float32 power takes 0.6 s for one [1024, 3072] layer, the two
    # products 2 ms; their two roundings put x³ within 2 ulp (2.4e-7 relative) of pow's.
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def gelu(x):
    """The exact GELU, x·Φ(x) = x/2·erfc(−x/√2) (GPT-NeoX, GPT-2's `gelu` variant)."""
    if _torch(x):
        import torch.nn.functional as F

        return F.gelu(x)
    return (0.5 * x * _erfc(-x / math.sqrt(2.0))).astype(x.dtype)


def _erfc(z):
    """erfc for NumPy, which has none: Numerical Recipes' `erfcc` (relative error under 1.2e-7
    everywhere) in the input's precision, or math.erfc per element in float64 (slower, exact).
    In float32 the rounding of −z² shifts the far tail (|z| > 4, where erfc < 2e-8) by a few
    ulp of its own tiny value: far below one ulp of GELU's output scale."""
    if z.dtype == np.float64:
        return np.vectorize(math.erfc, otypes=[np.float64])(z)
    t = 1 / (1 + 0.5 * np.abs(z))
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    with np.errstate(under="ignore"):
        r = t * np.exp(-z * z + poly)
    return np.where(z >= 0, r, 2 - r)


def relu(x):
    xp = namespace(x)
    return xp.maximum(x, xp.zeros_like(x))


# config.act → (the step's name, its formula, the function).
ACTIVATIONS = {"gelu_new": ("gelu", "gelu(…) (tanh approximation)", gelu_new),
               "gelu": ("gelu", "gelu(…) = …·Φ(…) (exact, erf)", gelu),
               "relu": ("relu", "relu(…) = max(…, 0)", relu)}


def mlp(x, p: dict, rec, prefix: str, act: str = "gelu_new"):
    wide = ("batch", "len", "d_mlp")
    b_in, b_out = p.get(f"{prefix}.b_in"), p.get(f"{prefix}.b_out")
    h = rec(f"{prefix}.in", "X·W_in" + (" + b_in" if b_in is not None else ""),
            linear(x, p[f"{prefix}.W_in"], b_in), wide)
    step, formula, f = ACTIVATIONS[act]
    h = rec(f"{prefix}.{step}", formula, f(h), wide)
    return rec(f"{prefix}.out", "…·W_out" + (" + b_out" if b_out is not None else ""),
               linear(h, p[f"{prefix}.W_out"], b_out), BLD)


def rms_norm(x, w, eps: float):
    """RMSNorm (Llama): x / √(mean(x²) + ε) · w, in at least float32, as transformers does."""
    xp = namespace(x)
    dtype = x.dtype
    if dtype in (xp.float16, getattr(xp, "bfloat16", xp.float16)):
        x = xp.astype(x, xp.float32)
    ms = xp.mean(x * x, axis=-1, keepdims=True)
    ms = xp.where(xp.isfinite(ms), ms, xp.full_like(ms, math.nan))  # see layer_norm
    return xp.astype(x / xp.sqrt(ms + eps), dtype) * w


def silu(x):
    """x·σ(x) (SiLU, Swish)."""
    xp = namespace(x)
    if _torch(x):
        import torch.nn.functional as F

        return F.silu(x)
    # 1 / (1 + e^−x) overflows to inf for x < −88 in float32, which gives the right 0.
    with np.errstate(over="ignore"):
        return x / (1.0 + xp.exp(-x))


def swiglu(x, p: dict, rec, prefix: str):
    """Llama's gated MLP: (silu(X·W_gate) ⊙ X·W_in)·W_out (W_in is transformers' up_proj)."""
    wide = ("batch", "len", "d_mlp")
    bias = {n: p.get(f"{prefix}.b_{n}") for n in ("gate", "in", "out")}

    def plus(n):
        return f" + b_{n}" if bias[n] is not None else ""

    g = rec(f"{prefix}.gate", "X·W_gate" + plus("gate"),
            linear(x, p[f"{prefix}.W_gate"], bias["gate"]), wide)
    h = rec(f"{prefix}.in", "X·W_in" + plus("in"), linear(x, p[f"{prefix}.W_in"], bias["in"]),
            wide)
    h = rec(f"{prefix}.swiglu", "silu(gate) ⊙ in, silu(g) = g·σ(g)", silu(g) * h, wide)
    return rec(f"{prefix}.out", "…·W_out" + plus("out"),
               linear(h, p[f"{prefix}.W_out"], bias["out"]), BLD)


def block(x, p: dict, config: Config, allowed, rec, layer: int, engine: Engine,
          x_cross=None, cross_allowed=None, causal: bool = False, rotary=None, cache=None):
    """One layer, as the architecture's family (model/arch/) writes it (`cache`: generation's
    KV cache, see attention)."""
    from attn_tracer.model.arch import family

    return family(config).block(x, p, config, allowed, rec, layer, engine, x_cross,
                                cross_allowed, causal, rotary, cache=cache)
