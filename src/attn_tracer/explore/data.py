"""Everything `attn explore` shows, computed before the app starts; no Textual here.

One run of the model, through the same session as every command (commands/session.py:
validation, inputs, weights, the memory estimate, the engine, the forward), keeps three things:

- the Trace: the inputs, every step's name, formula and shape (the side panel's shape trace),
  the predictions, and as tensors only each layer's Q and K split into heads
  (`blocks.L.attn.q.heads`, `.k.heads` [batch, heads, len, d_head], and the cross-attention's);
- every head's scores and overview thumbnail, reduced in the pattern hooks as each layer's
  pattern is made (analysis/heads.py's HeadScorer), so no pattern is kept for them;
- nothing else: the head the user opens gets its four stages (raw scores, ÷√d_head, masked,
  softmax) from the cached Q and K, by the same `layers.pattern_steps` the forward ran, on the
  host in float32, when it is opened.

Why Q and K rather than the patterns: GPT-2 small on 1,024 tokens has 144 patterns of 1,024²,
604 MB in float32 and 302 MB in float16, and the stages would need four times that; its Q and
K are 75 MB (2 · 12 layers · 1,024 · 768 · 4 bytes) and give every stage of every head, exactly
(float16 would round a weight of .42 by up to 2⁻¹¹ of it). One head's stages take milliseconds
to a few tens of them at 1,024 tokens (BENCHMARKS.md, figure h), and the last few opened stay
cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attn_tracer.model.steps import score_inputs
from attn_tracer.model.trace import Input, Trace
from attn_tracer.render.heatmaps import mask_marks

STAGES = ("scores", "scaled", "masked", "pattern")  # the order of layers.pattern_steps
STAGE_NAMES = {"scores": "raw", "scaled": "scaled", "masked": "masked", "pattern": "softmax"}
CACHE_BYTES = 64 * 2**20  # the stages of the heads opened last, kept up to this size


@dataclass(frozen=True)
class Section:
    """A panel section that another analysis adds (the attribution of `attn attribute`, say):
    a title, and `render(batch, width)` returning a Rich renderable. The predictions panel
    draws the sections after the predictions."""

    title: str
    render: Callable[[int, int], object]


class _Keep:
    """The recorder `layers.pattern_steps` writes to: keeps each stage, by its short name."""

    def __init__(self) -> None:
        self.stages: dict[str, np.ndarray] = {}
        self.ops: dict[str, str] = {}

    def __call__(self, name: str, op: str, x, dims, *, all_heads=None):
        stage = name.rsplit(".", 1)[-1]
        self.stages[stage] = x[0, 0]
        self.ops[stage] = op
        return x

    def needs(self, name: str) -> bool:
        return True  # keep every stage intact (no in-place update on torch)


@dataclass
class Explore:
    trace: Trace  # inputs, steps, predictions; tensors: each layer's Q and K heads
    scores: dict[str, np.ndarray]  # score name → [layers, batch, heads]
    thumbnails: tuple[np.ndarray, np.ndarray, np.ndarray]  # values, drawn, sizes (HeadScorer)
    color: bool = True  # False: NO_COLOR was set; thumbnails use the height ramp
    sections: list[Section] = field(default_factory=list)
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _marks: dict = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> int:
        return self.trace.config.layers

    @property
    def heads(self) -> int:
        return self.trace.config.heads

    @property
    def batch(self) -> int:
        return len(self.trace.inputs)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The attention blocks of each layer: self-attention, and cross-attention if any."""
        return ("attn", "cross_attn") if self.trace.cross else ("attn",)

    def keys_input(self, kind: str, batch: int) -> Input:
        """The text the keys of `kind` come from."""
        return self.trace.cross[batch] if kind == "cross_attn" else self.trace.inputs[batch]

    def marks(self, kind: str, batch: int) -> np.ndarray:
        """mask_marks [q_len, k_len]: "" allowed, "·" the causal mask, "×" the padding mask."""
        if (kind, batch) not in self._marks:
            self._marks[kind, batch] = mask_marks(self.trace, kind, batch)
        return self._marks[kind, batch]

    def stages(self, layer: int, head: int, batch: int, kind: str = "attn"
               ) -> dict[str, np.ndarray]:
        """One head's stages [q_len, k_len] (those the config has: no ÷√d_head with
        --no-scale, no mask without one), in STAGES order."""
        key = (layer, head, batch, kind)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key][0]
        stages, ops = self._compute(layer, head, batch, kind)
        self._cache[key] = (stages, ops)
        size = sum(m.nbytes for m in stages.values())
        while len(self._cache) > 1 and size * len(self._cache) > CACHE_BYTES:
            self._cache.popitem(last=False)
        return stages

    def formula(self, layer: int, head: int, batch: int, kind: str, stage: str) -> str:
        """The formula of a stage as the forward recorded it ("scores ÷ √d_head (√64 = 8)")."""
        self.stages(layer, head, batch, kind)
        return self._cache[layer, head, batch, kind][1][stage]

    def _compute(self, layer: int, head: int, batch: int, kind: str):
        from attn_tracer.model import layers
        from attn_tracer.model.pipeline import cross_mask, self_mask

        prefix = f"blocks.{layer}.{kind}"
        t = self.trace.tensors
        one = (slice(batch, batch + 1), slice(head, head + 1))
        q_name, k_name, _ = score_inputs(self.trace.config, prefix)  # rotated, repeated
        q = np.asarray(t[q_name][one], np.float32)  # [1, 1, q_len, d_head]
        k = np.asarray(t[k_name][one], np.float32)  # [1, 1, k_len, d_head]
        valid_q = self.trace.inputs[batch].valid[None, :]
        if kind == "cross_attn":
            allowed = cross_mask(valid_q, self.keys_input(kind, batch).valid[None, :])
        else:
            allowed = self_mask(self.trace.config, valid_q)
        keep = _Keep()
        layers.pattern_steps(q, k, self.trace.config, allowed, keep, prefix)
        return {s: keep.stages[s] for s in STAGES if s in keep.stages}, keep.ops


def q_k_names(config, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The Q and K that enter each block's scores (after rotary positions and repeat_kv)."""
    return tuple(name for layer in range(config.layers) for kind in kinds
                 for name in score_inputs(config, f"blocks.{layer}.{kind}")[:2])


def compute(r: Any, notice: Callable[[str], None], width: int, color: bool = True
            ) -> Explore:
    """Everything that can fail for a reason of the user's, then the run.

    `r`: the shared options (SharedOptions, or anything with their fields). `width`: the
    terminal's columns, which size the overview's thumbnails.
    """
    from attn_tracer.analysis.heads import HeadScorer, targets
    from attn_tracer.commands.session import SharedOptions, open_session
    from attn_tracer.explore.layout import thumbnail_box
    from attn_tracer.model import memory
    from attn_tracer.model.trace import Selection

    options = SharedOptions.of(r)
    session = open_session(options, notice, cross=True)
    config, prepared = session.config, session.prepared
    batch = prepared.batch
    rows, length, k_len = session.rows, session.length, session.k_len
    kinds = ("attn", "cross_attn") if prepared.cross else ("attn",)
    # The run keeps no pattern; on top of it: Q and K of every layer (float32 on the host),
    # the scores' index pairs and the thumbnails' block matrices (as attn heads counts them),
    # and the stages of the heads opened last.
    needed = memory.estimate(config, options.engine.dtype, rows, length, k_len, 0, 0,
                             "patterns", bool(session.cross),
                             predict=options.predict.predict)
    needed += config.layers * rows * (length + k_len) * config.d_model * 4 * len(kinds)
    needed += rows * length * length * (1 + 3 * 16) + CACHE_BYTES
    engine = session.start(needed)
    box = thumbnail_box(width, config.heads, config.layers, color)
    scorer = HeadScorer(targets(batch.ids, batch.valid, config.mask == "causal"), engine,
                        config.layers, config.heads, {"overview": box})
    hooks = {f"blocks.{layer}.attn.pattern": scorer.hook(layer) for layer in range(config.layers)}
    selection = Selection((), tuple(range(config.heads)), "patterns",
                          q_k_names(config, kinds))
    trace = session.forward(selection, hooks)
    session.notice_cuts()
    return Explore(trace, scorer.per_row, scorer.thumbnail_sets()["overview"], color)
