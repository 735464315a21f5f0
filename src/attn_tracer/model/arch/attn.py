"""`--arch attn`: attention and the residual stream only, the formula with nothing around it.

    X = W_E[tokens] + P;   X ← X + attn(X)   (+ cross_attn(X, X_kv))   for each layer

No norm, no MLP, no checkpoint: its weights are always drawn from a seed.
"""

from __future__ import annotations

from typing import Any, ClassVar

from attn_tracer.model import layers
from attn_tracer.model.arch.base import Family

BLD = layers.BLD


class Attn(Family):
    name = "attn"
    title = "attention-only"
    titles: ClassVar[dict[str, str]] = {}
    defaults: ClassVar[dict[str, Any]] = {"pos": "sinusoidal"}

    def block(self, x, p, config, allowed, rec, layer, engine, x_cross=None,
              cross_allowed=None, causal=False, rotary=None, cache=None):
        b = f"blocks.{layer}"
        a = layers.attention(x, x, p, config, allowed, rec, engine, layer, causal=causal,
                             rotary=rotary, cache=cache)
        x = rec(f"{b}.resid_post" if x_cross is None else f"{b}.resid_mid", "X + attn(X)",
                x + a, BLD)
        if x_cross is not None:
            c = layers.attention(x, x_cross, p, config, cross_allowed, rec, engine, layer,
                                 "cross_attn")
            x = rec(f"{b}.resid_post", "X + cross_attn(X, X_kv)", x + c, BLD)
        return x

    def steps_per_layer(self, config):
        return super().steps_per_layer(config)

    def describe(self, out):
        # Attention and residual only: no MLP, no norm to describe.
        for name in ("d_mlp", "ln_eps", "norm", "mlp"):
            out.pop(name, None)
        return out


FAMILY = Attn()
