"""The step catalogue: every step a run can record, by name, and how --save stores it.

The layers emit these names (layers.py, the families in arch/, embeddings.py, pipeline.py);
--save (commands/save.py), --steps, the memory estimate, explore and attribute read them from
here instead of spelling them again. tests/test_save.py checks the lists against real runs.

A step's name inside a layer follows `blocks.L.`; attention steps follow `blocks.L.attn.` or
`blocks.L.cross_attn.`. Dimensions (`dims`) are recorded with each step; the widths they name
come from the Config (d_attn = heads·d_head for Q, d_kv = kv_heads·d_head for K and V), never
from an array's shape divided by a head count.
"""

from __future__ import annotations

from attn_tracer.model.config import Config

# The classic attention's steps, in the order one block records them.
ATTENTION_STEPS = ("q", "q.split", "q.heads", "k", "k.split", "k.heads", "v", "v.split",
                   "v.heads", "scores", "scaled", "masked", "pattern", "z", "z.transpose",
                   "z.merge", "out")
# Modern attention's own: rotary positions turn Q and K after the split into heads
# (`q.rot`, `k.rot` [batch, heads or kv_heads, len, d_head]); grouped-query attention repeats
# each K/V head for its query heads before the scores (`k.repeat_kv`, `v.repeat_kv`,
# [batch, kv_heads, len, d_head] → [batch, heads, len, d_head]).
MODERN_ATTENTION_STEPS = ("q.rot", "k.rot", "k.repeat_kv", "v.repeat_kv")
LAYER_STEPS = ("ln_1", *(f"attn.{s}" for s in ATTENTION_STEPS), "resid_mid",
               *(f"cross_attn.{s}" for s in ATTENTION_STEPS), "ln_2", "mlp.in", "mlp.gelu",
               "mlp.out", "resid_post")
# SwiGLU's steps beside mlp.in and mlp.out: the gate X·W_gate, and silu(gate) ⊙ in.
MODERN_LAYER_STEPS = (*(f"attn.{s}" for s in MODERN_ATTENTION_STEPS), "mlp.gate", "mlp.swiglu")
# Steps only some checkpoint families record: ReLU in place of mlp.gelu (OPT).
FAMILY_LAYER_STEPS = ("mlp.relu",)
EVERY_LAYER_STEP = (*LAYER_STEPS, *MODERN_LAYER_STEPS, *FAMILY_LAYER_STEPS)
OUTER_STEPS = ("tokens", "embed", "pos_embed", "resid_pre", "cross.tokens", "cross.embed",
               "cross.pos_embed", "cross.resid_pre", "ln_f", "logits", "probs")
ALWAYS_SAVED = ("tokens", "cross.tokens")  # the token ids label every other tensor's axes


def score_inputs(config: Config, prefix: str) -> tuple[str, str, str]:
    """The steps whose tensors enter Q·Kᵀ and pattern·V in block `prefix` (`blocks.0.attn`):
    Q after its rotation, K after its rotation and its repeat for the query heads, V after its
    repeat. Each has a `heads` axis of the query heads."""
    self_attn = prefix.endswith(".attn")
    rotary = config.pos == "rotary" and self_attn
    grouped = config.kv_heads != config.heads and self_attn
    q = f"{prefix}.q.rot" if rotary else f"{prefix}.q.heads"
    k = (f"{prefix}.k.repeat_kv" if grouped else f"{prefix}.k.rot" if rotary
         else f"{prefix}.k.heads")
    v = f"{prefix}.v.repeat_kv" if grouped else f"{prefix}.v.heads"
    return q, k, v


# A step that is only another step's numbers rearranged (Q split into heads, then transposed;
# Z transposed and merged; K/V repeated for the query heads) is stored once by --save: the
# recipe rebuilds it (save.view). Step → (the step it is a view of, transposed).
VIEWS = {"q.split": ("q", False), "q.heads": ("q", True), "k.split": ("k", False),
         "k.heads": ("k", True), "v.split": ("v", False), "v.heads": ("v", True),
         "z.transpose": ("z.merge", False), "z": ("z.merge", True)}
REPEATS = {"k.repeat_kv": ("k.rot", "k"), "v.repeat_kv": (None, "v")}  # rotated base first


def heads_of(config: Config, step: str) -> int:
    """How many heads the `heads`/`kv_heads` axis of an attention step holds in full."""
    kv = step.split(".", 1)[0] in ("k", "v") and not step.endswith("repeat_kv")
    return config.kv_heads if kv else config.heads  # type: ignore[return-value]
