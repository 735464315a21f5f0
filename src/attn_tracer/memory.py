"""How much memory a run will need, estimated before anything is allocated.

A run that would not fit is refused with the estimate and the flags that shrink it, rather than
ending in the kernel's out-of-memory killer.
"""

from __future__ import annotations

import os

from attn_tracer.config import Config
from attn_tracer.errors import UsageError

BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_limit() -> int:
    return machine_memory() // 2


def estimate(config: Config, dtype: str, batch: int, length: int, k_len: int,
             captured_layers: int, captured_heads: int, capture: str, cross: bool,
             predict: bool = False) -> int:
    """Bytes: parameters + the widest live activations + the tensors kept for the views.

    Checked against the peak RSS growth of real runs by tests/test_memory.py: the estimate
    stays above it, and within a small factor.
    """
    size = BYTES[dtype]
    d, h = config.d_model, config.heads
    per_layer = 4 * d * d + (8 * d * d if config.arch == "gpt2" else 0)
    params = config.layers * per_layer * (2 if cross else 1) * 4  # host float32 copy
    params += config.layers * per_layer * (2 if cross else 1) * size  # on the engine
    # Live at once in one layer: a few [batch, len, d_model] streams and [batch, heads, len, len]
    # matrices: scores, scaled, masked, exp and the pattern in the explicit path; the fused path
    # adds SDPA's own matrix and its float mask for the heads it builds the pattern of.
    stream = batch * length * max(d, 4 * d if config.arch == "gpt2" else d) * size
    scores = batch * h * length * max(length, k_len) * size
    live = 8 * stream + 8 * scores
    per_head = batch * length * max(length, k_len) * 4
    kept_stages = {"patterns": 1, "stages": 4, "all": 4}[capture]
    kept = captured_layers * captured_heads * per_head * kept_stages
    if capture == "all":
        kept += captured_layers * 20 * batch * length * d * 4
    if predict:  # the whole W_E [vocab, d_model] for the logits, on the host and the engine
        kept += config.vocab * d * (4 + size) + 3 * batch * config.vocab * 4
    return params + live + kept + overhead(config, captured_layers, capture, cross)


# Python's own cost per recorded step, beyond the numbers: the Step record, the parameter
# arrays' headers, and in --json the step list as objects before it is written. Measured with
# --d-model 1 (arrays of one number, so nothing but the overhead grows): 8.3 KB a layer of 18
# steps for the run, 17 KB with --json's step list, 4.6 KB more for a layer whose every step is
# kept; a 20,000-layer view peaked at 401 MB where the arrays alone came to 640 KB.
STEP_OVERHEAD = 1_200
KEPT_STEP_OVERHEAD = 300


def overhead(config: Config, captured_layers: int, capture: str, cross: bool) -> int:
    """Bytes of per-step bookkeeping, which for a deep stack of tiny layers is most of it."""
    steps = 18 + (7 if config.arch == "gpt2" else 0) + (18 if cross else 0)
    kept = captured_layers * steps * KEPT_STEP_OVERHEAD if capture == "all" else 0
    return config.layers * steps * STEP_OVERHEAD + kept


def check(needed: int, limit: int) -> None:
    if needed > limit:
        raise UsageError(
            f"this run needs about {human(needed)} of memory, over the {human(limit)} allowed; "
            "shrink it with --max-length, fewer --layer/--head, a smaller --d-model or --layers, "
            "or raise --max-memory"
        )


def human(n: float) -> str:
    n = min(n, 10**30)  # a size read from a hostile file may be an integer too large for a float
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def parse_size(text: str) -> int:
    """'2G', '500MB', '1.5gb', '1000000' → bytes."""
    t = text.strip().upper().removesuffix("B")
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise UsageError(f"--max-memory must be a size such as 4G or 500M; got {text!r}") from None
    if not 0 < value < float("inf"):  # nan and inf too: int(inf) would raise
        raise UsageError(f"--max-memory must be a positive size such as 4G; got {text!r}")
    return int(value)
