"""`--arch gpt2`: the pre-norm block of GPT-2, and GPT-2's checkpoints.

    h = Norm(X);  X ← X + attn(h);  h = Norm(X);  X ← X + mlp(h)      for each layer
    logits = Norm_f(X)·W_Uᵀ

Norm is LayerNorm (GPT-2) or RMSNorm (--norm rms), mlp GELU's (GPT-2) or SwiGLU (--mlp swiglu):
the Config says which, and `llama` is this block with the other defaults.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from attn_tracer.model import layers
from attn_tracer.model.arch.base import Family, RMSNorm

BLD = layers.BLD


class PreNorm(Family):
    """Families whose layer is the pre-norm block above."""

    full_block = True
    token_std = 0.02  # GPT-2's own init
    position_std = 0.01

    def random_block_params(self, config, layer):
        from attn_tracer.model.weights import LAYER_KEY, _uniform

        d, d_mlp = config.d_model, config.d_mlp
        rng = np.random.default_rng([config.seed, LAYER_KEY, layer, 1])
        p = f"blocks.{layer}"
        out = {f"{p}.ln_1.w": np.ones(d, np.float32), f"{p}.ln_2.w": np.ones(d, np.float32)}
        if config.norm == "layer":
            out[f"{p}.ln_1.b"] = np.zeros(d, np.float32)
            out[f"{p}.ln_2.b"] = np.zeros(d, np.float32)
        out[f"{p}.mlp.W_in"] = _uniform(rng, (d, d_mlp), d**-0.5)
        out[f"{p}.mlp.W_out"] = _uniform(rng, (d_mlp, d), d_mlp**-0.5)
        b_in, b_out = _uniform(rng, d_mlp, 0.02), _uniform(rng, d, 0.02)
        if config.bias:
            out[f"{p}.mlp.b_in"], out[f"{p}.mlp.b_out"] = b_in, b_out
        if config.mlp == "swiglu":  # its own stream: the other weights stay as they were
            gate = np.random.default_rng([config.seed, LAYER_KEY, layer, 2])
            out[f"{p}.mlp.W_gate"] = _uniform(gate, (d, d_mlp), d**-0.5)
        return {k: out[k] for k in sorted(out, key=_order)}

    def random_final_params(self, config):
        out = {"ln_f.w": np.ones(config.d_model, np.float32)}
        if config.norm == "layer":
            out["ln_f.b"] = np.zeros(config.d_model, np.float32)
        return out

    def block(self, x, p, config, allowed, rec, layer, engine, x_cross=None,
              cross_allowed=None, causal=False, rotary=None, cache=None):
        b = f"blocks.{layer}"
        name = norm_name(config)
        h = rec(f"{b}.ln_1", f"{name}(X)", norm(x, p, f"{b}.ln_1", config), BLD)
        a = layers.attention(h, h, p, config, allowed, rec, engine, layer, causal=causal,
                             rotary=rotary, cache=cache)
        x = rec(f"{b}.resid_mid", f"X + attn({name}(X))", x + a, BLD)
        h = rec(f"{b}.ln_2", f"{name}(X)", norm(x, p, f"{b}.ln_2", config), BLD)
        m = (layers.swiglu(h, p, rec, f"{b}.mlp") if config.mlp == "swiglu"
             else layers.mlp(h, p, rec, f"{b}.mlp", config.act))
        return rec(f"{b}.resid_post", f"X + mlp({name}(X))", x + m, BLD)

    def final(self, x, p, config, rec):
        return rec("ln_f", f"{norm_name(config)}(X)", norm(x, p, "ln_f", config), BLD)

    def final_step(self, config):
        return "ln_f"

    def final_norm(self, p, config):
        if config.norm == "rms":
            return RMSNorm(p["ln_f.w"], config.ln_eps)
        return p["ln_f.w"], p["ln_f.b"], config.ln_eps

    def attention_input(self, layer):
        return f"blocks.{layer}.ln_1"

    def params_per_layer(self, config):
        return super().params_per_layer(config) + (3 if config.mlp == "swiglu" else 2) * \
            config.d_model * config.d_mlp

    def steps_per_layer(self, config):
        return super().steps_per_layer(config) + 7 + (config.mlp == "swiglu")

    def mlp_width(self, config):
        return config.d_mlp


def _order(name: str) -> tuple:
    # GPT-2's parameter order (ln_1, ln_2, W_in, W_out, b_in, b_out), W_gate before W_in.
    order = ("ln_1.w", "ln_1.b", "ln_2.w", "ln_2.b", "mlp.W_gate", "mlp.W_in", "mlp.W_out",
             "mlp.b_in", "mlp.b_out")
    return (order.index(name.split(".", 2)[2]),)


def norm_name(config) -> str:
    return "RMSNorm" if config.norm == "rms" else "LayerNorm"


def norm(x, p: dict, prefix: str, config):
    if config.norm == "rms":
        return layers.rms_norm(x, p[f"{prefix}.w"], config.ln_eps)
    return layers.layer_norm(x, p[f"{prefix}.w"], p[f"{prefix}.b"], config.ln_eps)


class GPT2(PreNorm):
    name = "gpt2"
    title = "GPT-2"
    titles: ClassVar[dict[str, str]] = {"gpt2": "GPT-2"}
    model_types = ("gpt2",)
    defaults: ClassVar[dict[str, Any]] = {"pos": "learned"}

    def load(self, source, path, config, max_bytes, expect=None):
        from attn_tracer.model.arch import gpt2_map

        return gpt2_map.load_directory(source, path, config, max_bytes, expect)


FAMILY = GPT2()
