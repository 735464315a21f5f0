"""Issue 12: on NumPy, attention nobody looks at runs `layers.blocked_attention`, a block of
queries at a time, and computes what the explicit path (pattern_steps, then pattern·V) computes.

Two levels: the function against the explicit formulas, with an error bound derived from the
inputs; and whole runs, one head shown against every head shown, the NumPy twin of
tests/test_fused.py (which checks torch's fused kernel the same way).
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from attn_tracer.model import layers, pipeline
from attn_tracer.model.config import Config
from attn_tracer.model.engine import Engine
from attn_tracer.model.trace import Recorder, Selection
from attn_tracer.model.weights import random_weights

EPS32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff u = 2⁻²⁴


def gamma(n: int) -> float:
    """γₙ = n·u / (1 − n·u): the relative error bound of a sum or dot product of n terms."""
    return n * EPS32 / (1 - n * EPS32)


def explicit(q, k, v, allowed, config: Config):
    """The explicit path itself: every stage of pattern_steps, then Z = pattern·V."""
    selection = Selection((0,), tuple(range(q.shape[1])), "stages")
    rec = Recorder(selection, Engine("numpy", "cpu", "float32"))
    return layers.pattern_steps(q, k, config, allowed, rec, "blocks.0.attn") @ v


def bound(q, k, v, scale: float) -> float:
    """How far two correct float32 evaluations of softmax(Q·Kᵀ·scale + mask)·V may be apart.

    Both compute each score as a d_head-term dot product: summed in a different order each is
    within γ_d·Σ|q_i·k_i| of the exact one, so two differ by twice that, and scaling (÷√d_head
    against ·(1/√d_head)) adds 3u relative. A score error δ moves each softmax weight by at most
    a factor e^(2δ) ≈ 1 + 2δ, plus a few roundings (exp, the sum of ≤ k_len terms in another
    grouping: γ_k, the division); Z = Σ_j p_j·v_j, a k_len-term sum of weights summing to 1,
    adds γ_k·max|v| on each side.
    """
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    dot = np.abs(q64) @ np.abs(np.swapaxes(k64, -1, -2))  # Σ_i |q_i·k_i|, every pair
    d, n = q.shape[-1], k.shape[-2]
    delta = 2 * gamma(d) * float(dot.max()) * scale + 3 * EPS32 * float(dot.max()) * scale
    weights = 2 * delta + 2 * gamma(n) + 4 * EPS32
    return float(np.abs(v).max()) * (weights + 2 * gamma(n))


def arrays(batch: int, heads: int, q_len: int, k_len: int, d_head: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((batch, heads, n, d_head)).astype(np.float32)
               for n in (q_len, k_len, k_len))
    return q, k, v


def causal(batch: int, length: int, valid: np.ndarray | None = None) -> np.ndarray:
    valid = np.ones((batch, length), bool) if valid is None else valid
    return pipeline.self_mask(Config(d_model=8, heads=1), valid)


MASKS = {
    "causal": lambda: causal(1, 37),
    "causal, padded right and left": lambda: causal(2, 37, np.array(
        [[True] * 30 + [False] * 7, [False] * 12 + [True] * 25])),
    "none": lambda: None,
    "cross, padded": lambda: pipeline.cross_mask(
        np.array([[True] * 37, [True] * 20 + [False] * 17]),
        np.array([[True] * 11 + [False] * 2, [True] * 13])),
}


@pytest.mark.parametrize("block", [1, 5, 16, 37, 100])
@pytest.mark.parametrize("mask", list(MASKS))
def test_blocked_attention_is_the_explicit_path(mask, block):
    allowed = MASKS[mask]()
    batch = 1 if allowed is None else allowed.shape[0]
    k_len = 13 if mask.startswith("cross") else 37
    q, k, v = arrays(batch, 3, 37, k_len, 8)
    config = Config(d_model=24, heads=3)
    scale = 1 / math.sqrt(config.d_head)
    want = explicit(q, k, v, allowed, config)
    got = layers.blocked_attention(q, k, v, allowed, scale, block)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=bound(q, k, v, scale))
    if allowed is not None:  # a query with no allowed key (a pad query) gets exactly 0
        dead = ~allowed.any(axis=-1)[:, 0]  # [batch, q_len]
        by_query = np.swapaxes(got, 1, 2), np.swapaxes(want, 1, 2)  # [batch, q_len, heads, d]
        assert all((z[dead] == 0).all() for z in by_query)


def test_a_block_of_pad_queries_only_is_zero():
    valid = np.array([[True] * 4 + [False] * 12])
    q, k, v = arrays(1, 2, 16, 16, 4)
    z = layers.blocked_attention(q, k, v, causal(1, 16, valid), 0.5, 4)
    assert (z[:, :, 4:] == 0).all() and (z[:, :, :4] != 0).any()


def test_no_scale():
    q, k, v = arrays(1, 2, 9, 9, 4)
    config = Config(d_model=8, heads=2, scale=False)
    np.testing.assert_allclose(layers.blocked_attention(q, k, v, causal(1, 9), 1.0, 4),
                               explicit(q, k, v, causal(1, 9), config), rtol=0,
                               atol=bound(q, k, v, 1.0))


# ── whole runs: one head shown against every head shown ───────────────────────────────────────

SMALL = {"d_model": 64, "heads": 4, "layers": 2}
TEXTS = ["The cat sat on the mat because it was tired.", "A short one"]
CROSS = ["Le chat est assis sur le tapis", "Bonjour"]
CASES = {
    "one text": {"texts": TEXTS[:1]},
    "right padding": {"texts": TEXTS},
    "left padding, no mask": {"texts": TEXTS, "padding": "left", "mask": "none"},
    "no scale, no bias": {"texts": TEXTS[:1], "scale": False, "bias": False},
    "stages": {"texts": TEXTS, "capture": "stages"},
    "gpt2": {"texts": TEXTS, "padding": "left", "arch": "gpt2"},
    "cross": {"texts": TEXTS, "cross_texts": CROSS},
    "float64": {"texts": TEXTS, "dtype": "float64"},
}


def outputs(config: Config, cross: bool) -> tuple[str, ...]:
    kinds = ("attn", "cross_attn") if cross else ("attn",)
    names = [f"blocks.{layer}.{kind}.{step}" for layer in range(config.layers) for kind in kinds
             for step in ("z", "z.merge", "out")]
    return (*names, *(f"blocks.{layer}.resid_post" for layer in range(config.layers)))


def both_paths(texts, *, dtype="float32", capture="patterns", padding="right",
               cross_texts=None, **options):
    config = Config(**{**SMALL, **options})
    weights = random_weights(config, cross=cross_texts is not None)
    engine = Engine("numpy", "cpu", dtype)
    everything = Selection(tuple(range(config.layers)), tuple(range(config.heads)), "all")
    shown = Selection((1,), (2,), capture, extra=outputs(config, cross_texts is not None))
    explicit_run, blocked_run = (
        pipeline.run(texts, config, engine, weights, s, padding=padding,
                     cross_texts=cross_texts)[0] for s in (everything, shown))
    return explicit_run, blocked_run, config


@pytest.mark.parametrize("case", list(CASES))
def test_one_head_shown_gives_what_every_head_shown_gives(case):
    options = dict(CASES[case])
    every, one, config = both_paths(options.pop("texts"), **options)
    assert one.steps == every.steps
    # The torch engine's contract against NumPy (≤ 1e-5 in float32, README), which these runs
    # meet with room to spare: the blocked path's own error per layer is bounded above at
    # ~1e-6 for these sizes (test_blocked_attention_is_the_explicit_path), and two layers of
    # W_O, LayerNorm and MLP do not amplify it a hundredfold. float64: the same in its own u.
    atol = 1e-12 if options.get("dtype") == "float64" else 1e-5
    for name in outputs(config, one.cross is not None):
        want = every.tensors[name]
        if "heads" in one.step(name).dims:
            want = want[:, [2]]
        np.testing.assert_allclose(one.tensors[name], want, rtol=0, atol=atol, err_msg=name)
    for name in [n for n in one.tensors if n.endswith(("pattern", "scores", "scaled", "masked"))]:
        want = every.tensors[name][:, [2]]
        finite = np.isfinite(want)
        assert (np.isfinite(one.tensors[name]) == finite).all(), name
        size = 1.0 if name.endswith("pattern") else max(1.0, float(np.abs(want[finite]).max()))
        np.testing.assert_allclose(one.tensors[name], want, rtol=0, atol=atol * size,
                                   err_msg=name)


def test_the_blocked_path_is_what_runs(monkeypatch):
    calls = []
    original = layers.blocked_attention

    def spy(q, *args, **kwargs):
        calls.append(q.shape)
        return original(q, *args, **kwargs)

    monkeypatch.setattr(layers, "blocked_attention", spy)
    both_paths(TEXTS)  # every head shown: the explicit path; one head of layer 1: blocked
    assert [shape[1] for shape in calls] == [4, 4]  # both layers, every head's Z


def test_blocked_never_holds_every_heads_scores(monkeypatch):
    """The point of it: with one head shown, no [batch, heads, len, len] array of every head.

    tracemalloc sees NumPy's allocations. With blocks of 16 queries the peak is the one head's
    stages and a block's temporaries; the explicit path holds at least one such array.
    """
    length, heads = 256, 16
    config = Config(d_model=64, heads=heads, layers=1, n_ctx=length, mask="causal")
    weights = random_weights(config)
    text = " ".join(["word"] * length)
    full = heads * length * length * 4  # one float32 [1, heads, len, len] array: 4 MB
    monkeypatch.setattr(layers, "BLOCK_SCORES", 16 * heads * length)

    def peak(selection):
        tracemalloc.start()
        pipeline.run([text], config, Engine("numpy", "cpu", "float32"), weights, selection,
                     max_length=length)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    peak(Selection((0,), (0,), "patterns"))  # once untimed: the tokenizer's tables load here
    one = peak(Selection((0,), (0,), "patterns"))
    every = peak(Selection((0,), tuple(range(heads)), "patterns"))
    assert every > full  # the measurement sees the explicit path's matrix of every head
    assert one < full / 2, (one, full)
