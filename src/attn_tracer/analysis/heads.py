"""What each head does: scores computed from its attention pattern, layer by layer.

The definitions are in head_definitions.py (stated once). The three detection scores are
TransformerLens's `detect_head` (head_detector.py, error_measure="mul"): a 0/1 detection pattern
D of the same shape as A, and score = Σ(A ⊙ D) / Σ A. D is lower-triangular and sparse, so it
is kept as the list of its ones, per text: summing A at those (query, key) pairs is Σ(A ⊙ D)
without a second len × len array. Two subtleties of theirs are kept so figures compare:
Σ A counts every row, the first included (a perfect previous-token head scores (len − 1)/len),
and the induction pattern is the duplicate pattern shifted one key right, which puts a query
whose previous token equals its own on its own diagonal.

Everything here works on the engine's arrays (NumPy or torch, on any device) and brings back
only [batch, heads] numbers per layer, so the memory of a run does not grow with
layers × heads × len²: `HeadScorer.hook(layer)` is given to the Recorder as the hook of
`blocks.{layer}.attn.pattern` and keeps only the reductions (and, if asked, each head's
thumbnail, already downsampled).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from attn_tracer.analysis.head_definitions import SCORES

Pairs = tuple[np.ndarray, np.ndarray]  # (query positions, key positions), one text


@dataclass(frozen=True)
class Targets:
    """Where each score reads a text's pattern: index pairs, and per-query weights."""

    previous: list[Pairs]  # one entry per batch row
    duplicate: list[Pairs]
    induction: list[Pairs]
    first: list[Pairs]  # (every real query, the first real position)
    diagonal: list[Pairs]  # (every real query, itself)
    queries: np.ndarray  # [batch, len] float: 1 at real queries
    norm: np.ndarray  # [batch, len] float: 1 / log₂ n_q at real queries with n_q > 1, else 0
    real: np.ndarray  # [batch] number of real queries
    valid: np.ndarray  # [batch, len] bool
    causal: bool = True
    repeat: int | None = None  # the --repeat probe's N: induction is then a mean, not ÷ Σ A


def targets(ids: np.ndarray, valid: np.ndarray, causal: bool = True,
            repeat: int | None = None) -> Targets:
    """The detection patterns of a batch: ids and valid [batch, len] (real tokens contiguous,
    as right or left padding leaves them).

    `repeat`: the batch is the probe, N tokens after an optional first token, then the same N:
    induction is the mean of A[q, q − N + 1] over the N queries of the second half.
    """
    previous, duplicate, induction, first, diagonal = [], [], [], [], []
    for b in range(ids.shape[0]):
        real = np.flatnonzero(valid[b])
        start = int(real[0])
        prev_q = real[1:]
        previous.append((prev_q, prev_q - 1))
        # Duplicates: every k < q (both real) holding the same id. Grouped by id, so a long text
        # costs its duplicate pairs, not len².
        row = ids[b, real]
        order = np.argsort(row, kind="stable")
        sorted_ids = row[order]
        bounds = np.flatnonzero(np.diff(sorted_ids)) + 1
        qs, ks = [], []
        for group in np.split(order, bounds):
            if len(group) > 1:
                pos = real[np.sort(group)]
                q, k = np.tril_indices(len(pos), -1)
                qs.append(pos[q])
                ks.append(pos[k])
        dq = np.concatenate(qs) if qs else np.zeros(0, np.int64)
        dk = np.concatenate(ks) if ks else np.zeros(0, np.int64)
        duplicate.append((dq, dk))
        if repeat is None:
            induction.append((dq, dk + 1))  # k < q, so k + 1 ≤ q: still causal and real
        else:
            second = real[-repeat:]
            induction.append((second, second - repeat + 1))
        first.append((real, np.full_like(real, start)))
        diagonal.append((real, real))
    queries = valid.astype(np.float64)
    # n_q: the keys query q may see (real ones; k ≤ q under a causal mask).
    allowed = np.cumsum(valid, axis=1) if causal else np.broadcast_to(
        valid.sum(axis=1, keepdims=True), valid.shape)
    with np.errstate(divide="ignore"):
        norm = np.where(valid & (allowed > 1), 1 / np.log2(np.maximum(allowed, 2)), 0.0)
    return Targets(previous, duplicate, induction, first, diagonal, queries, norm,
                   valid.sum(axis=1), valid, causal, repeat)


def _on(engine, pairs: list[Pairs], length: int) -> list:
    """Each row's pairs as flat indices q·len + k into a [heads, len·len] view, on the engine."""
    return [engine.asarray((q * length + k).astype(np.int64)) for q, k in pairs]


def _sum_at(pattern, flat: list, xp):
    """Σ A[b, h, q, k] over each row's pairs → [batch, heads].

    One `take` along a flat view: on torch 3× faster than indexing with the (q, k) pair.
    """
    heads, length = pattern.shape[1], pattern.shape[-1]
    return xp.stack([xp.sum(xp.take(xp.reshape(pattern[b], (heads, length * length)), index,
                                    axis=1), axis=-1) for b, index in enumerate(flat)])


def _row_plogp(pattern, xp):
    """Σ_k A·log₂ A for every row [batch, heads, len] (0·log 0 = 0), one pass over A."""
    if xp is np:
        logs = np.zeros_like(pattern)
        np.log2(pattern, out=logs, where=pattern > 0)
        # Row by row dot products: no third len × len buffer.
        return np.matmul(pattern[..., None, :], logs[..., :, None])[..., 0, 0]
    import torch

    return torch.special.xlogy(pattern, pattern).sum(-1) / math.log(2)


@dataclass
class HeadScorer:
    """Scores (and thumbnails) of every head, filled in layer by layer by the pattern hooks."""

    targets: Targets
    engine: object
    layers: int
    heads: int
    # Thumbnails to keep: name → (pixel rows, pixel columns) of each head's, per text.
    boxes: dict[str, tuple[int, int]] = field(default_factory=dict)
    per_row: dict[str, np.ndarray] = field(default_factory=dict)  # name → [layers, batch, heads]

    def __post_init__(self) -> None:
        t, e = self.targets, self.engine
        batch = t.queries.shape[0]
        self.per_row = {name: np.zeros((self.layers, batch, self.heads)) for name in SCORES}
        length = t.valid.shape[1]
        self._pairs = {name: _on(e, getattr(t, name), length)
                       for name in ("previous", "duplicate", "induction", "first", "diagonal")}
        self._queries = e.asarray(t.queries.astype(np.float32))
        self._norm = e.asarray(t.norm.astype(np.float32))
        from attn_tracer.analysis.pooling import batch_blocks

        self._blocks = {}
        self._kept: dict[str, list[np.ndarray]] = {}
        for name, (rows, cols) in self.boxes.items():
            R, C, drawn, sizes = batch_blocks(t.valid, rows, cols, t.causal)
            self._blocks[name] = (e.asarray(R), e.asarray(C), drawn, sizes)
            self._kept[name] = []

    def hook(self, layer: int) -> Callable:
        def observe(pattern) -> None:
            self.add(layer, pattern)

        return observe

    def add(self, layer: int, pattern) -> None:
        """One layer's pattern [batch, heads, len, len], on the engine: reduce it, keep that."""
        xp = self.engine.xp
        host = self.engine.to_host
        p = self._pairs
        total = xp.sum(pattern, axis=(-2, -1))  # Σ A: ≈ the number of real queries
        scores = {
            "previous_token": _sum_at(pattern, p["previous"], xp) / total,
            "duplicate_token": _sum_at(pattern, p["duplicate"], xp) / total,
            "first_token": _sum_at(pattern, p["first"], xp),
            "self": _sum_at(pattern, p["diagonal"], xp),
        }
        induction = _sum_at(pattern, p["induction"], xp)
        if self.targets.repeat is None:
            scores["induction"] = induction / total
        else:
            scores["induction"] = induction / self.targets.repeat
        plogp = _row_plogp(pattern, xp)  # [batch, heads, len]; 0 at pad queries
        scores["entropy"] = -xp.sum(plogp * self._queries[:, None, :], axis=-1)
        scores["entropy_norm"] = -xp.sum(plogp * self._norm[:, None, :], axis=-1)
        real = self.targets.real[:, None].astype(np.float64)
        for name in SCORES:
            value = host(scores[name]).astype(np.float64)
            if name in ("first_token", "self", "entropy", "entropy_norm"):
                value = value / real
            # Every score but entropy lies in [0, 1]; a part summed in another order than the
            # whole can pass 1 (or a tiny entropy 0) by a rounding of float32, never more.
            self.per_row[name][layer] = np.clip(value, 0, None if name == "entropy" else 1)
        for name, (R, C, _, _) in self._blocks.items():
            # [batch, 1, r, len] · [batch, heads, len, len] · [batch, 1, len, c]
            self._kept[name].append(host(R[:, None] @ pattern @ C[:, None]).astype(np.float32))

    def scores(self) -> dict[str, np.ndarray]:
        """Each score [layers, heads]: the mean over the batch of each text's score."""
        return {name: v.mean(axis=1) for name, v in self.per_row.items()}

    def thumbnail_sets(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """name → (values [layers, batch, heads, r, c], drawn [batch, r, c], sizes [batch, 2])."""
        return {name: (np.stack(self._kept[name]), blocks[2], blocks[3])
                for name, blocks in self._blocks.items()}


# ── the induction probe ───────────────────────────────────────────────────────────────────────

WORD = re.compile(rb" [a-z]{3,}")  # " cat", " the": a space and three or more ASCII letters


def word_ids(tokenizer=None) -> np.ndarray:
    """Ids of the tokenizer's ordinary word tokens (GPT-2 has 19,383), in id order: a space
    (SentencePiece's ▁ is one) and three or more ASCII letters."""
    from attn_tracer.model import tokenizer as tokenizers
    from attn_tracer.model import tokens

    if tokenizer is not None and tokenizer is not tokenizers.gpt2():
        return np.array([i for i in range(tokenizer.vocab)
                         if not (t := tokenizer.token(i)).special and WORD.fullmatch(t.bytes)],
                        np.int64)
    enc = tokens.encoding()
    ranks = getattr(enc, "_mergeable_ranks", None)  # bytes → id, without decoding 50k tokens
    if ranks is None:  # pragma: no cover - every tiktoken we support has it
        pieces = enc.decode_tokens_bytes(list(range(tokens.ENDOFTEXT_ID)))
        ranks = {b: i for i, b in enumerate(pieces)}
    return np.array(sorted(i for b, i in ranks.items() if WORD.fullmatch(b)), np.int64)


PROBE_STREAM = 5  # a random stream of its own (weights.py uses 1-4), so --seed draws both apart


def repeat_probe(n: int, seed: int, bos: bool, tokenizer=None) -> list[int]:
    """N distinct word tokens drawn with the seed, then the same N again; the BOS first with
    `bos` (GPT-2's <|endoftext|>). Distinct, so that the second half's copies are the only
    duplicates. `tokenizer`: the run's, GPT-2's by default."""
    from attn_tracer.model import tokenizer as tokenizers

    tokenizer = tokenizer or tokenizers.gpt2()
    words = word_ids(tokenizer)
    drawn = np.random.default_rng([seed, PROBE_STREAM]).choice(words, n, replace=False)
    ids = drawn.tolist()
    return ([tokenizer.bos_id] if bos else []) + ids + ids
