"""Choosing the next token from the logits: greedy, or a draw from softmax(logits / T) after
top-k and top-p filtering.

The order is Hugging Face `transformers`' (its TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper): divide by T, keep the k largest logits (every logit equal to the k-th too),
then keep the most likely tokens whose probabilities add up to at least p (the token that
crosses p is kept; so is the most likely one, always). What is left is renormalised.

No global random state: the draws come from a `numpy.random.Generator` seeded by the caller,
one uniform number per step, so a seed gives the same tokens on every run. Everything is in
float64 on the host, whatever the engine computed the logits in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The sampling's own random stream, apart from the random weights' (weights.py uses 1 to 5):
# one --seed seeds both, and neither changes the other.
STREAM = 6


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy, the most likely token every step
    top_k: int | None = None  # keep the k most likely tokens (None: all)
    top_p: float | None = None  # keep the most likely tokens up to this mass (None: all)
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, STREAM])


def distribution(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """The probabilities [vocab] (float64) the next token is drawn from: softmax(logits / T)
    after top-k and top-p, exactly 0 for every token filtered out. Greedy: softmax(logits), the
    model's own distribution (T = 1), which the chosen token's probability is read from."""
    z = np.asarray(logits, np.float64)
    # Shifted by the max first, as pipeline.predict does: a tiny T sends the others to −∞.
    z = z - z.max()
    if not s.greedy:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            z = np.where(z == 0, 0.0, z / s.temperature)
        if s.top_k is not None and s.top_k < z.size:
            kth = np.partition(z, z.size - s.top_k)[z.size - s.top_k]
            z = np.where(z >= kth, z, -math.inf)
    p = np.exp(z)
    p /= p.sum()
    if not s.greedy and s.top_p is not None and s.top_p < 1:
        order = np.argsort(p, kind="stable")  # ascending, as transformers sorts
        cumulative = np.cumsum(p[order])
        drop = cumulative <= 1 - s.top_p
        drop[-1] = False  # the most likely token always stays
        p[order[drop]] = 0.0
        p /= p.sum()
    return p


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from `p` by inverting its cumulative sum at a uniform number: the first token
    whose cumulative probability exceeds u·Σp. A filtered token (p = 0) adds nothing to the
    sum, so it is never the first to exceed it."""
    cdf = np.cumsum(p)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), p.size - 1)


def choose(logits: np.ndarray, s: Sampling, rng: np.random.Generator | None
           ) -> tuple[int, np.ndarray]:
    """(the next token, the distribution it came from)."""
    p = distribution(logits, s)
    if s.greedy:
        return int(np.argmax(logits)), p  # the first of equal maxima, as torch.argmax
    return draw(p, rng), p


def top(p: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of `p` (id, probability), most likely first; ties by id."""
    k = min(k, p.size)
    ids = np.argpartition(-p, k - 1)[:k]
    ids = ids[np.lexsort((ids, -p[ids]))]
    return [(int(i), float(p[i])) for i in ids]
