"""Tolerances from the error they bound, so that a comparison holds on every CPU.

Two correct computations of one formula differ only by rounding, and rounding depends on the
CPU: the order in which BLAS sums a dot product (its blocking, SIMD width, thread count) and the
library's exp. A fixed `atol=1e-5` that passes on one machine fails on the next. The rule here:
a tensor computed in `dtype` is within

    K · u · scale

of the exact result, where

- u is the unit roundoff of the dtype (2⁻²⁴ in float32, 2⁻⁵³ in float64): one rounding errs by
  at most u, relatively;
- scale is what the error is relative to: max(1, max |tensor|), times the softmax gain of what
  came before;
- the gain is max(1, S) over the softmaxes computed so far, S the largest |score| that enters
  one (the scaled scores, or the raw ones with --no-scale). Softmax turns an error δ in a score
  into an error of up to δ/2 in the pattern (∂p_i/∂s_j = p_i(δ_ij − p_j), whose row sums
  2·p_i(1 − p_i) ≤ ½ in absolute value), and a score's error is relative to the scores: ε·S.
  Patterns, Z and every later layer carry that error. Without ÷√d_head the scores reach ±35
  instead of ±8, which is why a fixed tolerance broke there, in layer 1;
- K = 64 covers the growth of rounding along sums: the dot products here have up to 768 terms,
  whose errors have random signs and grow as √n·u (28u at 768; Higham & Mary, SIAM J. Sci.
  Comput. 41(5), 2019), not as the worst case n·u; and the residual stream adds each layer's
  error. Measured against float64 for the suite's configurations (d_model 64 and 768, 2 and 4
  layers, attn and gpt2, --no-scale, padding, cross-attention) under the variations in the
  README (OpenBLAS 1 and 2 threads and its Haswell, Sandybridge and Prescott kernels; torch with
  1 and 2 threads, AVX2 and non-vector kernels), no float32 error came above 10.3·u·scale (V
  at d_model 768, Sandybridge): 64 leaves a factor of 6 for kernels that could not be tried
  (ARM's NEON sums 4 lanes, in longer chains).

Two results each within that of the exact one are within twice it of each other: comparisons of
two computations use `pair=True`. A real bug — a wrong scale, a missing mask, a transposed
weight — moves results by 1e-2 or more, far beyond these tolerances (1e-5 to 1e-3 in float32).

Set ATTN_TEST_MARGINS to a file name to append, for each comparison, how much of its tolerance
it used (the worst |difference| ÷ tolerance): the figures behind K.
"""

from __future__ import annotations

import os

import numpy as np

K = 64
SOFTMAX_INPUTS = ("scores", "scaled", "masked")  # the last one a block records enters softmax


def unit(dtype) -> float:
    """The unit roundoff u: one rounding in `dtype` errs by at most u, relatively."""
    return float(np.finfo(np.dtype(dtype)).eps) / 2


def magnitude(x) -> float:
    """The largest finite |x| (masked scores are −∞)."""
    x = np.asarray(x, np.float64)
    return float(np.abs(x[np.isfinite(x)]).max(initial=0))


def tolerance(scale: float, dtype, gain: float = 1.0, pair: bool = True) -> float:
    """K·u·max(1, scale)·max(1, gain); twice that between two computations (`pair`)."""
    return (2 if pair else 1) * K * unit(dtype) * max(1.0, scale) * max(1.0, gain)


def step_tolerances(trace, dtype=None, pair: bool = True) -> dict[str, float]:
    """A tolerance for every step of `trace`, walking its steps in order to track the gain.

    `trace` is the reference of the comparison; it must hold every step whose tensor is
    compared, and each block's softmax input before its pattern (capture="all" or "stages").
    """
    dtype = dtype or trace.engine["dtype"]
    tolerances: dict[str, float] = {}
    softmax_input: dict[str, float] = {}
    gain = 1.0
    for step in trace.steps:
        x = trace.tensors.get(step.name)
        if x is None or not np.issubdtype(x.dtype, np.floating):
            continue
        block, _, stage = step.name.rpartition(".")
        if stage in SOFTMAX_INPUTS:
            softmax_input[block] = magnitude(x)
        elif stage == "pattern":
            gain = max(gain, softmax_input[block])
        tolerances[step.name] = tolerance(magnitude(x), dtype, gain, pair)
    return tolerances


def softmax_gain(trace, block: str) -> float:
    """S of one block (`blocks.0.attn`): the largest |score| entering its softmax."""
    stage = next(s for s in reversed(SOFTMAX_INPUTS) if f"{block}.{s}" in trace.tensors)
    return max(1.0, magnitude(trace.tensors[f"{block}.{stage}"]))


def softmax_rtol(n: int, dtype, spread: float = 0.0) -> float:
    """Relative error of each output of a softmax of n exactly known inputs, in any order; so
    also how far its outputs may sum from 1 (summed in float64, not to add an error of ours).

    Softmax divides by a sum of n positive terms: its relative error is at most n·u in any
    order, and, its rounding errors having random signs, at most λ·√n·u with probability
    1 − 2·exp(−λ²/2) (Higham & Mary); λ = 6, a chance below 1e-7 that it does not hold. That is
    8e-5 for GPT-2's 50,257 tokens in float32, where the worst case n·u is 3e-3. Each entry also
    rounds x − max by u·|x − max| ≤ u·spread (`spread`: the inputs' max − min), exp by 4 ulps
    (8u) and the division by 2u.
    """
    return (min(n, 6 * n**0.5) + 10 + spread) * unit(dtype)


def prob_rtol(logit_tol: float, temperature: float, n: int, dtype, spread: float) -> float:
    """Relative tolerance of p = softmax(logits / T) between two computations whose logits are
    within `logit_tol` of each other: log p_i = z_i/T − log Σ_j e^{z_j/T} moves by at most
    2·logit_tol/T, and each side's softmax rounds as `softmax_rtol` says (`spread`: of the
    logits, before ÷ T)."""
    return 2 * logit_tol / temperature + 2 * softmax_rtol(n, dtype, spread / temperature)


def assert_close(name: str, got, want, tol: float) -> None:
    """|got − want| ≤ tol everywhere; equal infinities (masked scores) pass."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if log := os.environ.get("ATTN_TEST_MARGINS"):
        finite = np.isfinite(got) & np.isfinite(want)
        used = float(np.abs(got[finite] - want[finite]).max(initial=0)) / tol
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{used:.4f} {os.environ.get('PYTEST_CURRENT_TEST', '?')} {name}\n")
    np.testing.assert_allclose(got, want, rtol=0, atol=tol,
                               err_msg=f"{name} (tolerance {tol:.3g}, see tests/tolerance.py)")
