"""What an architecture family is: the parts in which families differ, each one method.

A family's defaults are a plain Family; `attn`, `gpt2` and `llama` override only what differs
(TransformerLens's variants as small subclasses of one attention). The attention itself is one
function for all of them (layers.attention): rotary positions, grouped-query K/V and sliding
windows are switches of the Config that it reads, not families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from attn_tracer.model.config import Config


@dataclass(frozen=True)
class RMSNorm:
    """A final RMSNorm's parameters (Llama), for the logit lens and attribution:
    h / √(mean(h²) + ε) · w."""

    w: np.ndarray
    eps: float


class Family:
    name = ""
    title = ""  # how the README and the views name its weights
    titles: ClassVar[dict[str, str]] = {}  # … by the checkpoint's model_type, where they differ
    # config.json `model_type`s whose checkpoints this family loads (checkpoint.py asks).
    model_types: tuple[str, ...] = ()
    # A full block: norms, an MLP and a final norm around the attention (False: attention and
    # the residual stream only).
    full_block = False
    # Random weights: the spread of the token and position embeddings.
    token_std = 1.0
    position_std = 1.0
    # What --arch NAME sets unless the option is given (build_config reads it).
    defaults: ClassVar[dict[str, Any]] = {}

    # ── random parameters ──────────────────────────────────────────────────────────────────
    def random_block_params(self, config: Config, layer: int) -> dict[str, np.ndarray]:
        """Everything of layer `layer` beside its attention (norms, MLP)."""
        return {}

    def random_final_params(self, config: Config) -> dict[str, np.ndarray]:
        return {}

    def normalizes_logits(self, config: Config) -> bool:
        """Random weights without a final norm divide h by its RMS before W_U (see
        Weights.normalizes_logits)."""
        return not self.full_block

    # ── the forward ────────────────────────────────────────────────────────────────────────
    def block(self, x, p: dict, config: Config, allowed, rec, layer: int, engine,
              x_cross=None, cross_allowed=None, causal: bool = False, rotary=None, cache=None):
        raise NotImplementedError

    def final(self, x, p: dict, config: Config, rec):
        """The final norm before the unembedding (none by default)."""
        return x

    def final_step(self, config: Config) -> str:
        """The step whose output the unembedding reads."""
        return f"blocks.{config.layers - 1}.resid_post"

    def final_norm(self, p: dict, config: Config):
        """The final norm for the logit lens and attribution: None (the base family has none);
        full-block families return (w, b, eps) for LayerNorm, RMSNorm(w, eps) for RMSNorm."""
        return None

    def attention_input(self, layer: int) -> str:
        """The step name of what layer `layer`'s attention reads: X in Q = X·W_Q + b_Q."""
        return "resid_pre" if layer == 0 else f"blocks.{layer - 1}.resid_post"

    def has_mlp(self, config: Config) -> bool:
        return self.full_block

    # ── sizes, for the memory estimate ────────────────────────────────────────────────────
    def params_per_layer(self, config: Config) -> int:
        """Numbers in one layer's weights (attention + the family's own)."""
        d = config.d_model
        return 2 * d * config.d_attn + 2 * d * config.d_kv

    def steps_per_layer(self, config: Config) -> int:
        """Steps one layer records (for the per-step bookkeeping of the memory estimate)."""
        extra = 2 * (config.pos == "rotary") + 2 * (config.kv_heads != config.heads)
        return 18 + extra

    def mlp_width(self, config: Config) -> int | None:
        """The widest MLP stream [batch, len, d_mlp], if the family has an MLP."""
        return None

    # ── what its config says ──────────────────────────────────────────────────────────────
    def describe(self, out: dict) -> dict:
        """Config.to_dict's fields, less those that mean nothing for this family."""
        return out

    # ── checkpoints ───────────────────────────────────────────────────────────────────────
    def load(self, source: str, path, config: dict, max_bytes: int | None, expect=None):
        """A save_pretrained folder's Checkpoint (checkpoint.py has resolved the source and
        read config.json, whose `model_type` is one of `model_types`). `expect(model)` is
        called with the checkpoint's Config fields before any tensor is read."""
        raise NotImplementedError
