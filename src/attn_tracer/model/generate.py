"""Generation, one token at a time, with the KV cache in the open.

    prefill: the prompt through the stack once, every layer's K and V kept in the cache
    step:    the newest token alone: its own q, k, v [batch, heads, 1, d_head]; k, v appended
             to the cache [batch, kv_heads, past + 1, d_head]; its scores row against the whole
             cache [batch, heads, 1, past + 1]; the logits at that one position → the next token

The layers are the same code as a trace's (layers.block with its `cache`), so a step computes
exactly what a full forward over every token so far computes at its last position, with the
earlier tokens' K and V read instead of recomputed: per layer the work of one token's
projections and MLP plus one scores row, growing with the length, instead of all of it for
every token, growing with its square. Pure: no printing; the caller renders the steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from attn_tracer.errors import AttnError
from attn_tracer.model import embeddings, layers, memory, sampling, tokens
from attn_tracer.model.config import Config
from attn_tracer.model.engine import Engine, namespace
from attn_tracer.model.trace import Recorder, Selection, Step
from attn_tracer.model.weights import Weights

CACHE_DIMS = ("batch", "kv_heads", "k_len", "d_head")
END_OF_TEXT = tokens.ENDOFTEXT_ID  # GPT-2's end of a document: generation stops there


def kv_heads(config: Config) -> int:
    """The heads K and V have: fewer than the query heads with grouped-query attention."""
    return getattr(config, "kv_heads", None) or config.heads


class KVCache:
    """K and V of every token so far, for each layer: [batch, kv_heads, len, d_head] each.

    Allocated once for the longest the generation can get (`capacity` tokens), as
    transformers' StaticCache is: appending writes one row, it never copies the past.
    """

    def __init__(self, config: Config, capacity: int) -> None:
        self.config, self.capacity = config, capacity
        self.k: list = [None] * config.layers
        self.v: list = [None] * config.layers
        self.lengths = [0] * config.layers

    def append(self, layer: int, k, v, rec, prefix: str):
        """Write this call's k, v [batch, kv_heads, new, d_head] after the past ones; both
        caches up to here, each recorded as a step."""
        start, new = self.lengths[layer], k.shape[2]
        if start + new > self.capacity:
            raise AttnError(f"the KV cache holds {self.capacity} tokens; {start + new} asked")
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.k[layer], self.v[layer] = _empty(k, shape), _empty(v, shape)
        self.k[layer][:, :, start:start + new, :] = k
        self.v[layer][:, :, start:start + new, :] = v
        self.lengths[layer] = end = start + new
        op = "cache ← [cache; {}] (the earlier tokens' {}, then this step's)"
        return (rec(f"{prefix}.k_cache", op.format("K", "K"), self.k[layer][:, :, :end, :],
                    CACHE_DIMS),
                rec(f"{prefix}.v_cache", op.format("V", "V"), self.v[layer][:, :, :end, :],
                    CACHE_DIMS))

    @property
    def length(self) -> int:
        return self.lengths[-1]

    def tensors(self, engine: Engine) -> dict[str, np.ndarray]:
        """The cache as host arrays, named by step: blocks.L.attn.k_cache, …v_cache."""
        out = {}
        for layer in range(self.config.layers):
            n = self.lengths[layer]
            for name, c in (("k", self.k[layer]), ("v", self.v[layer])):
                out[f"blocks.{layer}.attn.{name}_cache"] = np.array(
                    engine.to_host(c[:, :, :n, :]))
        return out


def _empty(like, shape):
    xp = namespace(like)
    if xp is np:
        return np.zeros(shape, like.dtype)
    return like.new_zeros(shape)


def step_mask(key_positions: np.ndarray, query_positions: np.ndarray,
              window: int | None = None) -> np.ndarray | None:
    """allowed [batch, 1, q_len, k_len] of a step from the positions: a query sees every key
    at its position or before (the causal mask's row), and with a sliding window of W only
    the last W of them (pipeline.causal_mask). None when it sees them all."""
    k, q = key_positions[:, None, None, :], query_positions[:, None, :, None]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window
    return None if allowed.all() else allowed


@dataclass
class Generated:
    """One generated token and how it was chosen."""

    index: int  # 1 for the first generated token
    position: int  # its position in the whole sequence
    token: int
    prob: float  # in the distribution it was chosen from (greedy: softmax(logits))
    logit: float
    alternatives: list[tuple[int, float]]  # the most likely tokens of that distribution
    # The attention row of the query that produced it, for each shown (layer, head): [k_len],
    # over every token before it (prompt and generated).
    rows: dict[tuple[int, int], np.ndarray]
    steps: list[Step]  # the shapes of the forward that produced it (the prefill for index 1)
    cached: int  # tokens whose K, V that forward read from the cache (0 for the prefill)
    logits: np.ndarray | None = None  # [vocab] float64, with keep_logits
    stopped: str | None = None  # on the last token: why generation ended


@dataclass
class Plan:
    """What generation runs with, everything checked beforehand."""

    prompt: list[int]
    max_new_tokens: int
    sampling: sampling.Sampling = field(default_factory=sampling.Sampling)
    shown: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())  # (layers, heads) of the rows
    stop: bytes | None = None
    alternatives: int = 0
    keep_logits: bool = False
    use_cache: bool = True  # False: recompute every token at every step (the benchmark's baseline)


STOPS = {"max": "--max-new-tokens reached", "eos": "<|endoftext|>, the end of a text",
         "stop": "the --stop text"}


def generate(plan: Plan, config: Config, engine: Engine, weights: Weights,
             cache: KVCache | None = None) -> Iterator[Generated]:
    """Each generated token as soon as it is chosen; the next is computed only when asked for
    (so a caller that stops iterating stops the work). `cache`: the caller's, to read after
    (one for len(prompt) + max_new_tokens tokens); a new one otherwise."""
    with np.errstate(all="ignore"):
        yield from _generate(plan, config, engine, weights, cache)


def _generate(plan: Plan, config: Config, engine: Engine, weights: Weights, cache):
    p = {name: engine.asarray(w) for name, w in weights.params.items()
         if name not in ("wte", "wpe", "lm_head")}
    W_U = engine.asarray(weights.unembedding())  # [vocab, d_model], once, not once a step
    layers_shown, heads_shown = plan.shown
    selection = Selection(layers_shown, heads_shown, "patterns")
    ids = list(plan.prompt)
    cache = cache or KVCache(config, len(ids) + plan.max_new_tokens)
    rng = None if plan.sampling.greedy else plan.sampling.rng()
    window = getattr(config, "window", None)
    written = b""
    for index in range(1, plan.max_new_tokens + 1):
        rec = Recorder(selection, engine)
        if plan.use_cache:
            past = cache.length
            new = np.array([ids[past:]], np.int64)  # the prompt, then one token a step
            positions = np.arange(past, len(ids))[None]
            allowed = step_mask(np.arange(len(ids))[None], positions, window)
            logits = forward(new, positions, config, weights, engine, p, W_U, rec, allowed,
                             causal=past == 0 and window is None, cache=cache)
        else:
            past = 0
            every = np.array([ids], np.int64)
            positions = np.arange(len(ids))[None]
            logits = forward(every, positions, config, weights, engine, p, W_U, rec,
                             step_mask(positions, positions, window), causal=window is None)
        logits = np.asarray(engine.to_host(logits), np.float64)[0]
        if not np.all(np.isfinite(logits)):
            raise AttnError(f"the logits of generated token {index} are not finite (a value "
                            f"overflowed {engine.dtype}); use --dtype float64 or fewer --layers")
        token, dist = sampling.choose(logits, plan.sampling, rng)
        rows = {(layer, h): np.asarray(rec.tensors[f"blocks.{layer}.attn.pattern"][0, i, -1],
                                       np.float64)
                for layer in layers_shown for i, h in enumerate(heads_shown)}
        ids.append(token)
        written += tokens.token(token).bytes if token < tokens.VOCAB else b""
        stopped = ("eos" if token == END_OF_TEXT
                   else "stop" if plan.stop is not None and plan.stop in written
                   else "max" if index == plan.max_new_tokens else None)
        yield Generated(index, len(ids) - 1, token, float(dist[token]), float(logits[token]),
                        sampling.top(dist, plan.alternatives) if plan.alternatives else [],
                        rows, rec.steps, past, logits if plan.keep_logits else None, stopped)
        if stopped:
            return


def forward(ids: np.ndarray, positions: np.ndarray, config: Config, weights: Weights,
            engine: Engine, p: dict, W_U, rec, allowed, causal: bool, cache=None):
    """The logits [batch, vocab] at the last of `ids` [batch, new]: embed → each layer (reading
    and extending `cache` when given) → ln_f → the unembedding, every step recorded."""
    from attn_tracer.model.arch import family

    arch = family(config)
    x = embeddings.embed(ids, positions, config, weights, engine, rec)
    allowed = None if allowed is None else engine.asarray(allowed)
    # Rotary positions: the angles of these tokens' own positions (the cached keys were turned
    # by theirs when they were made).
    rotary = (tuple(engine.asarray(a) for a in layers.rotary_angles(positions, config))
              if config.pos == "rotary" else None)
    for layer in range(config.layers):
        x = layers.block(x, p, config, allowed, rec, layer, engine, causal=causal,
                         rotary=rotary, cache=cache)
        rec.flush()
    if arch.full_block:
        x = arch.final(x, p, config, rec)
    xp = engine.xp
    h = x[:, -1, :]
    if weights.normalizes_logits:  # random attention-only weights, as pipeline._logits does
        rms = xp.sqrt(xp.mean(h * h, axis=-1, keepdims=True))
        h = h / xp.where(rms > 0, rms, xp.ones_like(rms))
    logits = rec("logits", "logits = h·W_Uᵀ (at the last position)", h @ xp.matrix_transpose(W_U),
                 ("batch", "vocab"))
    rec.flush()
    return logits


# ── What a step costs, with the cache and without ────────────────────────────────────────────

@dataclass(frozen=True)
class Cost:
    multiply_adds: int
    bytes: int  # of the tensors the forward makes, as attn trace --cost counts them
    # Of those, Q·Kᵀ and pattern·V alone: the part that grows with the length per token with
    # the cache (one row) and with its square without (every row).
    attention: int = 0


def cost_of(steps: list[Step], config: Config, dtype: str) -> Cost:
    costs = memory.step_costs(steps, config, dtype)
    attention = sum(c.multiply_adds for s, c in zip(steps, costs, strict=True)
                    if s.name.endswith((".attn.scores", ".attn.z")))
    return Cost(sum(c.multiply_adds for c in costs), sum(c.bytes for c in costs), attention)


def uncached_steps(prefill: list[Step], length: int) -> list[Step]:
    """The steps a full forward over `length` tokens records: the prefill's, every len axis
    set to `length`, without the cache (which a forward that recomputes everything has not)."""
    grows = ("len", "q_len", "k_len")
    return [Step(s.name, s.op, tuple(length if d in grows else n for n, d in
                                     zip(s.shape, s.dims, strict=True)), s.dims)
            for s in prefill if not s.name.endswith(("k_cache", "v_cache"))]


def step_costs(prefill: list[Step], step: Generated, config: Config, dtype: str
               ) -> tuple[Cost, Cost]:
    """(with the cache, recomputing everything) for the forward that produced `step`: the
    first reads the cache of step.cached tokens; the second runs all step.position tokens."""
    return (cost_of(step.steps, config, dtype),
            cost_of(uncached_steps(prefill, step.position), config, dtype))


def cache_bytes(config: Config, length: int, dtype: str) -> int:
    """K and V of `length` tokens in every layer: 2·layers·batch·kv_heads·len·d_head numbers."""
    return 2 * config.layers * kv_heads(config) * length * config.d_head * memory.BYTES[dtype]

