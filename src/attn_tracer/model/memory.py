"""How much memory a run will need, estimated before anything is allocated.

A run that would not fit is refused with the estimate and the flags that shrink it, rather than
ending in the kernel's out-of-memory killer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from attn_tracer.errors import UsageError
from attn_tracer.model.config import Config

BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_limit() -> int:
    return machine_memory() // 2


def step_bytes(shape: tuple[int, ...], dtype: str, name: str = "") -> int:
    """The bytes of one step's tensor: its elements times the engine's bytes per number (token
    ids are int64)."""
    return math.prod(shape) * (8 if name.endswith("tokens") else BYTES[dtype])


def attention_shapes(config: Config, batch: int, q_len: int, k_len: int
                     ) -> dict[str, tuple[int, ...]]:
    """The shapes one attention block records (layers.attention), known before the run.

    The estimate sizes its live tensors from these; tests/test_memory.py checks them against
    the steps of a real trace.
    """
    h, d_head, w, d = config.heads, config.d_head, config.d_attn, config.d_model
    kv = config.d_kv  # kv_heads·d_head: narrower than Q with grouped-query attention
    return {"q": (batch, q_len, w), "k": (batch, k_len, kv), "v": (batch, k_len, kv),
            "scores": (batch, h, q_len, k_len), "z": (batch, h, q_len, d_head),
            "z.merge": (batch, q_len, w), "out": (batch, q_len, d)}


@dataclass(frozen=True)
class StepCost:
    bytes: int  # the step's tensor
    multiply_adds: int  # of the matrix product that makes it; 0 for elementwise steps
    bytes_power: int  # the tensor grows as len^bytes_power with the text's length
    macs_power: int  # the multiply-adds grow as len^macs_power


def step_costs(steps, config: Config, dtype: str) -> list[StepCost]:
    """Each recorded step's size and multiply-adds, and how both grow with the text's length.

    A step's multiply-adds are its elements times the length of the axis its product sums
    over: X·W sums over d_model, Q·Kᵀ over d_head, pattern·V over k_len, merge(Z)·W_O over
    heads·d_head, the MLP over d_model and d_mlp, the logits over d_model. Softmax, the scale,
    the mask, reshapes and lookups count 0: they are not multiply-adds.
    In a cross-attention block k_len is the cross text's length, which does not grow with the
    text's; so are the cross text's own steps (`cross.*`).
    """
    k_lens = {s.name.rsplit(".", 1)[0]: s.shape[-1] for s in steps
              if s.name.endswith(".scores")}
    out = []
    for s in steps:
        block, _, stage = s.name.rpartition(".")
        parts = s.name.split(".")
        cross_block = len(parts) > 2 and parts[2] == "cross_attn"
        own = ("len", "q_len") if cross_block else ("len", "q_len", "k_len")
        power = 0 if s.name.startswith("cross.") else sum(dim in own for dim in s.dims)
        summed, summed_power = 0, 0
        inner = s.name.split(".", 3)[3] if len(parts) > 3 and parts[2] in ("attn", "cross_attn") \
            else ""
        if inner in ("q", "k", "v"):
            summed = config.d_model
        elif inner == "scores":
            summed = config.d_head
        elif inner == "z":
            summed = k_lens[block]
            summed_power = 0 if cross_block else 1
        elif inner == "out":
            summed = config.d_attn
        elif len(parts) == 4 and parts[2] == "mlp" and stage in ("gate", "in", "out"):
            summed = config.d_mlp if stage == "out" else config.d_model
        elif s.name == "logits":
            summed = config.d_model
        count = math.prod(s.shape)
        out.append(StepCost(step_bytes(s.shape, dtype, s.name), count * summed, power,
                            power + summed_power if summed else 0))
    return out


def estimate(config: Config, dtype: str, batch: int, length: int, k_len: int,
             captured_layers: int, captured_heads: int, capture: str, cross: bool,
             predict: bool = False) -> int:
    """Bytes: parameters + the widest live activations + the tensors kept for the views.

    Checked against the peak RSS growth of real runs by tests/test_memory.py: the estimate
    stays above it, and within a small factor.
    """
    from attn_tracer.model.arch import family

    arch = family(config)
    size = BYTES[dtype]
    d, w = config.d_model, config.d_attn
    # Grouped-query attention saves here: W_K and W_V are d_model × kv_heads·d_head.
    per_layer = arch.params_per_layer(config)
    params = config.layers * per_layer * (2 if cross else 1) * 4  # host float32 copy
    params += config.layers * per_layer * (2 if cross else 1) * size  # on the engine
    # Live at once in one layer: a few [batch, len, d_model]-like streams and [batch, heads, len,
    # len] matrices: scores, scaled, masked, exp and the pattern in the explicit path; the fused
    # path adds SDPA's own matrix and its float mask for the heads it builds the pattern of.
    shapes = attention_shapes(config, batch, length, max(length, k_len))
    stream = max(step_bytes(shapes[n], dtype) for n in ("q", "z.merge", "out"))
    if (d_mlp := arch.mlp_width(config)) is not None:
        stream = max(stream, step_bytes((batch, length, d_mlp), dtype))
    scores = step_bytes(shapes["scores"], dtype)
    live = 8 * stream + 8 * scores
    per_head = batch * length * max(length, k_len) * 4
    kept_stages = {"patterns": 1, "stages": 4, "all": 4}[capture]
    kept = captured_layers * captured_heads * per_head * kept_stages
    if capture == "all":
        kept += captured_layers * 20 * batch * length * max(d, w) * 4
    if predict:  # the whole unembedding [vocab, d_model] for the logits, on the host and engine
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
    from attn_tracer.model.arch import family

    steps = family(config).steps_per_layer(config) + (18 if cross else 0)
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
