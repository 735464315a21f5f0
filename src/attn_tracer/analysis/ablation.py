"""Ablation: run the model again with some heads knocked out, and see what the prediction does.

Zero-ablation sets a head's Z to 0 at every position, so its output Z_h·W_O[h] is 0 (the
layer's b_O stays: it belongs to no head). Mean-ablation replaces the head's Z at every
position by its mean over the text's positions in the clean run, so its output becomes the
mean of its outputs (W_O is linear): what the head writes on average, without the information
of any one position. Both act on `blocks.L.attn.z` through a Recorder hook, in one more
forward; downstream layers see the change, so the effect is the head's total effect, not only
its direct one (TransformerLens's `hook_z` ablations; Hugging Face GPT-2 takes the same
intervention as a pre-hook zeroing the head's slice of `attn.c_proj`'s input).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from attn_tracer.analysis.attribution import head_name
from attn_tracer.errors import UsageError

MODES = ("zero", "mean")
_HEAD = re.compile(r"L([0-9]+)H([0-9]+)", re.IGNORECASE)  # ASCII digits only


def parse_heads(values: list[str], layers: int, heads: int,
                flag: str = "--ablate") -> list[tuple[int, int]]:
    """'L5H1,L6H9' (repeatable) → [(5, 1), (6, 9)], sorted, each once; refuses what the
    model does not have."""
    chosen: set[tuple[int, int]] = set()
    for value in values:
        for part in value.split(","):
            part = part.strip()
            m = _HEAD.fullmatch(part)
            if not m:
                raise UsageError(f"{flag} takes heads named L<layer>H<head>, such as L0H1 or "
                                 f"L0H1,L1H3; got {part or value!r}")
            layer, head = int(m.group(1)), int(m.group(2))
            if not 0 <= layer < layers:
                raise UsageError(f"{flag} {part}: the model has {layers} layer"
                                 f"{'s' if layers > 1 else ''} (L0 to L{layers - 1})")
            if not 0 <= head < heads:
                raise UsageError(f"{flag} {part}: each layer has {heads} head"
                                 f"{'s' if heads > 1 else ''} (H0 to H{heads - 1})")
            chosen.add((layer, head))
    return sorted(chosen)


def by_layer(heads: list[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(layer, []).append(head)
    return out


def replacement(heads: int, d_head: int, ablated: list[int],
                means: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keep, fill) [1, heads, 1, d_head] for Z [batch, heads, len, d_head]: Z·keep + fill is
    Z with the `ablated` heads set to 0, or to `means[head]` [d_head] for mean-ablation."""
    # float64: engine.asarray brings them to the run's dtype, a mean included unrounded.
    keep = np.ones((1, heads, 1, d_head), np.float64)
    fill = np.zeros((1, heads, 1, d_head), np.float64)
    for h in ablated:
        keep[0, h] = 0
        if means is not None:
            fill[0, h, 0] = means[h]
    return keep, fill


def names(heads: list[tuple[int, int]]) -> list[str]:
    return [head_name(layer, head) for layer, head in heads]


@dataclass(frozen=True)
class Outcome:
    """The target's logit, probability and rank (1 = top), and the top-k, of one run."""

    logit: float  # the target's logit, or the logit difference with --versus
    target_logit: float
    target_prob: float
    rank: int
    top: list[tuple[int, float, float]]  # (id, prob, logit), most likely first


def outcome(logits: np.ndarray, target: int, versus: int | None, top_k: int) -> Outcome:
    """What one run predicted at the explained position, from its logits [vocab]."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max()
    probs = np.exp(shifted) / np.exp(shifted).sum()
    top = np.argsort(-logits, kind="stable")[:top_k]
    value = logits[target] - (logits[versus] if versus is not None else 0.0)
    return Outcome(float(value), float(logits[target]), float(probs[target]),
                   int((logits > logits[target]).sum()) + 1,
                   [(int(t), float(probs[t]), float(logits[t])) for t in top])
