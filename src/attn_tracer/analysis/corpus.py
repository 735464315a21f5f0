"""Head scores over many texts: running statistics that stream, resume and merge exactly.

Weighting: every text counts once. A text's score is what `attn heads` gives that text alone
(HeadScorer's per-row score: head_definitions.py), and the corpus figure of a head is the mean
of those per-text scores over the texts, whatever their lengths; a long text weighs as much as
a short one. (A token-weighted mean would let a handful of long documents decide.)

For every score and every head, the running count n, mean and M2 = Σ (x − mean)² are kept in
float64 and combined batch by batch with Chan, Golub and LeVeque's pairwise update (the
parallel form of Welford's method): stable, and two partial results merge into the result of
one pass over both, up to float64 rounding of the merge itself (relative 1e-16). So a corpus
cut into shards, or spread over Ray workers, gives the same figures as one run.

The examples: for each score and head, the K texts where it is highest, ties broken by the
smaller corpus index (the text's place in the corpus), so the top K are a function of the set
of texts alone: merging shards gives exactly the top K of one run.

The thumbnails: each head's 16 × 16 thumbnail (render/thumbnails.py's blocks: a row is the
share of attention a block of queries gives each block of keys), summed over the texts that
draw each cell; the corpus thumbnail is that sum ÷ the number of texts drawing the cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from attn_tracer.analysis.head_definitions import SCORES

Z95 = 1.959963984540054  # the normal distribution's 97.5% quantile: a 95% two-sided interval
BOX = (16, 16)  # pattern rows × key columns of the thumbnails kept for the corpus
PREVIEW = 160  # characters of an example's text kept (and shown)


@dataclass
class Statistics:
    """Everything a corpus run keeps: counts, moments, top examples, thumbnail sums."""

    layers: int
    heads: int
    k: int  # examples kept per score and head
    n: int = 0  # texts counted
    tokens: int = 0  # real tokens counted (after --max-length, --bos included)
    mean: np.ndarray = None  # [scores, layers, heads] float64
    m2: np.ndarray = None  # [scores, layers, heads]: Σ (x − mean)²
    top_value: np.ndarray = None  # [scores, layers, heads, k]; −inf where empty
    top_index: np.ndarray = None  # [scores, layers, heads, k] corpus index; −1 where empty
    examples: dict[int, dict] = field(default_factory=dict)  # index → {source, line, text}
    thumb_sum: np.ndarray = None  # [layers, heads, rows, cols] float64
    thumb_count: np.ndarray = None  # [rows, cols]: texts drawing each cell

    def __post_init__(self) -> None:
        shape = (len(SCORES), self.layers, self.heads)
        if self.mean is None:
            self.mean = np.zeros(shape)
            self.m2 = np.zeros(shape)
            self.top_value = np.full((*shape, self.k), -np.inf)
            self.top_index = np.full((*shape, self.k), -1, np.int64)
            self.thumb_sum = np.zeros((self.layers, self.heads, *BOX))
            self.thumb_count = np.zeros(BOX, np.int64)

    # ── adding and merging ────────────────────────────────────────────────────────────────

    def add(self, values: np.ndarray, index: np.ndarray, tokens: int,
            examples: dict[int, dict], thumb_sum: np.ndarray | None = None,
            thumb_count: np.ndarray | None = None) -> None:
        """One batch: values [scores, layers, heads, batch] (each text's scores), index
        [batch] (the texts' corpus indices), their real tokens, their {source, line, text}."""
        values = np.asarray(values, np.float64)
        b = values.shape[-1]
        if b == 0:
            return
        mean_b = values.mean(axis=-1)
        m2_b = ((values - mean_b[..., None]) ** 2).sum(axis=-1)
        self._combine(b, mean_b, m2_b)
        self.tokens += int(tokens)
        self._keep_top(values, np.broadcast_to(np.asarray(index, np.int64), values.shape),
                       examples)
        if thumb_sum is not None:
            self.thumb_sum += thumb_sum
            self.thumb_count += thumb_count

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.n
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (n_a * n_b / n)
        self.n = n

    def _keep_top(self, values: np.ndarray, index: np.ndarray, examples: dict[int, dict]) -> None:
        if self.k == 0:
            return
        v = np.concatenate([self.top_value, values], axis=-1)
        i = np.concatenate([self.top_index, index], axis=-1)
        # Highest value first; among equal values the smaller corpus index; empties (−inf, −1)
        # last. lexsort sorts by its last key first.
        order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), -v), axis=-1)
        order = order[..., :self.k]
        self.top_value = np.take_along_axis(v, order, axis=-1)
        self.top_index = np.take_along_axis(i, order, axis=-1)
        kept = set(np.unique(self.top_index).tolist()) - {-1}
        merged = {**self.examples, **examples}
        self.examples = {j: merged[j] for j in sorted(kept)}

    def merge(self, other: Statistics) -> None:
        """Add another partial result (another shard's): as if its texts had been run here."""
        if (other.layers, other.heads, other.k) != (self.layers, self.heads, self.k):
            raise ValueError("statistics of different shapes")
        if other.n == 0:
            return
        self._combine(other.n, other.mean, other.m2)
        self.tokens += other.tokens
        self._keep_top(other.top_value, other.top_index, other.examples)
        self.thumb_sum += other.thumb_sum
        self.thumb_count += other.thumb_count

    # ── the figures ───────────────────────────────────────────────────────────────────────

    def means(self) -> dict[str, np.ndarray]:
        return {s: self.mean[i] for i, s in enumerate(SCORES)}

    def std(self) -> dict[str, np.ndarray]:
        """The sample standard deviation over texts (n − 1 in the denominator; 0 for n = 1)."""
        var = self.m2 / (self.n - 1) if self.n > 1 else np.zeros_like(self.m2)
        return {s: np.sqrt(np.maximum(var[i], 0)) for i, s in enumerate(SCORES)}

    def ci95(self) -> dict[str, np.ndarray]:
        """The half-width of the mean's 95% confidence interval: 1.96 · std / √n (the normal
        approximation, which the central limit theorem makes good for the hundreds of texts a
        corpus has; with a few dozen texts it is slightly too narrow)."""
        return {s: Z95 * sd / math.sqrt(max(self.n, 1)) for s, sd in self.std().items()}

    def thumbnails(self) -> tuple[np.ndarray, np.ndarray]:
        """(values [layers, heads, rows, cols], drawn [rows, cols]): the corpus mean of each
        cell over the texts that draw it."""
        count = self.thumb_count
        values = self.thumb_sum / np.where(count > 0, count, 1)
        return values, count > 0

    def top(self, score: str, layer: int, head: int) -> list[dict]:
        s = SCORES.index(score)
        out = []
        for value, index in zip(self.top_value[s, layer, head].tolist(),
                                self.top_index[s, layer, head].tolist(), strict=True):
            if index >= 0:
                out.append({"index": index, "score": value, **self.examples[index]})
        return out

    # ── the state file ────────────────────────────────────────────────────────────────────

    def to_json(self) -> dict:
        """Plain data; float64 values survive orjson and json.loads bit for bit (shortest
        round-trip repr). −inf (an empty example slot) is written as null."""
        return {
            "layers": self.layers, "heads": self.heads, "k": self.k, "n": self.n,
            "tokens": self.tokens, "mean": self.mean.tolist(), "m2": self.m2.tolist(),
            "top_value": np.where(np.isfinite(self.top_value), self.top_value, np.nan).tolist(),
            "top_index": self.top_index.tolist(),
            "examples": [[i, e] for i, e in self.examples.items()],
            "thumb_sum": self.thumb_sum.tolist(), "thumb_count": self.thumb_count.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> Statistics:
        top = np.array(d["top_value"], np.float64)
        return cls(
            layers=d["layers"], heads=d["heads"], k=d["k"], n=d["n"], tokens=d["tokens"],
            mean=np.array(d["mean"], np.float64), m2=np.array(d["m2"], np.float64),
            top_value=np.where(np.isnan(top), -np.inf, top),
            top_index=np.array(d["top_index"], np.int64),
            examples={int(i): e for i, e in d["examples"]},
            thumb_sum=np.array(d["thumb_sum"], np.float64),
            thumb_count=np.array(d["thumb_count"], np.int64))


def batch_thumbnails(values: np.ndarray, drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A batch's thumbnails (HeadScorer.thumbnail_sets: values [layers, batch, heads, r, c],
    drawn [batch, r, c], r ≤ 16, c ≤ 16) → (Σ over texts of the drawn cells [layers, heads,
    16, 16], texts drawing each cell [16, 16])."""
    layers, _, heads, r, c = values.shape
    total = np.zeros((layers, heads, *BOX))
    count = np.zeros(BOX, np.int64)
    mask = drawn[None, :, None, :, :]
    total[:, :, :r, :c] = np.where(mask, values.astype(np.float64), 0).sum(axis=1)
    count[:r, :c] = drawn.sum(axis=0)
    return total, count
