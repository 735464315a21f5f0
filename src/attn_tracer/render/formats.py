"""How numbers are written, once for every view: weights, scores, signed logits, probabilities.

Each format has a fixed width where a table needs one, and writes a negative number with a real
minus sign (U+2212), as the formulas do.
"""

from __future__ import annotations

import numpy as np


def unit(w: float) -> str:
    """A weight or a score on the 0–1 scale in three characters: `.42`, `.00`, `1.0`."""
    if w >= 0.995:
        return "1.0"
    return f"{w:.2f}"[1:]


def score(value: float, name: str) -> str:
    """A head score: entropy in bits with one decimal (`3.2`, `11`), the others as `unit`."""
    if name == "entropy":
        return f"{value:.1f}" if value < 9.95 else f"{value:.0f}"
    return unit(value)


def signed(v: float, digits: int) -> str:
    """+0.12, −0.05 (a real minus sign); exactly 0 without a sign."""
    if v == 0:
        return f"{0:.{digits}f}"
    return f"{v:+.{digits}f}".replace("-", "−", 1)


def signed_decimals(values: np.ndarray) -> int:
    """2 decimals while the largest |value| fits 5 cells signed (+9.99), then 1, then 0."""
    m = float(np.max(np.abs(values))) if values.size else 0.0
    return 2 if m < 9.995 else 1 if m < 99.95 else 0


def prob(p: float) -> str:
    """A probability: 0.1234, or 3.1e-06 where four decimals would read 0."""
    return f"{p:.4f}" if p >= 1e-4 or p == 0 else f"{p:.1e}"


def signed_prob(d: float) -> str:
    """A change of probability: +0.1234, −3.1e-06 (small changes keep their digits)."""
    if d == 0:
        return "0"
    text = f"{d:+.4f}" if abs(d) >= 1e-4 else f"{d:+.1e}"
    return text.replace("-", "−", 1) if text[0] == "-" else text  # the sign, not the exponent's


def fitting_decimals(finite: np.ndarray, width: int) -> int | None:
    """The most decimals (2, 1, 0) at which the widest value of a matrix fits `width`; None:
    not even 0 do, and the matrix is written in powers of ten."""
    if not finite.size:
        return 2
    extremes = (float(finite.min()), float(finite.max()))
    for digits in (2, 1, 0):
        if all(len(f"{v:.{digits}f}") <= width for v in extremes):
            return digits
    return None


def number(v: float, digits: int | None) -> str:
    """A matrix entry with `digits` decimals, or as a power of ten (`3e5`) when None."""
    if digits is not None:
        return f"{v:.{digits}f}"
    mantissa, exponent = f"{v:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"
