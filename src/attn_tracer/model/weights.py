"""The parameters of the stack: drawn from a seed, or read from a GPT-2 checkpoint.

Parameters are host NumPy arrays named as TransformerLens names them (`blocks.0.attn.W_Q`, …),
stored for `x @ W` (shape [in, out]). Random weights come from NumPy generators seeded per
layer, so every engine and device gets the same numbers from the same seed, and layer 0 is the
same whether the stack has 2 layers or 12.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from attn_tracer.model.config import Config

# Separate random streams, so that adding a layer or a cross-attention block changes nothing else.
_TOKENS, _POSITIONS, _LAYER, _CROSS, _UNEMBED = 1, 2, 3, 4, 5
LAYER_KEY = _LAYER  # the stream of a layer's weights, which the families' own parts draw from
TOKEN_BLOCK = 64  # token-embedding rows drawn per random stream
# The spread of a random model's logits (see Weights.unembedding): each is N(0, LOGIT_STD²),
# so that -T 0.5, 1, 2 visibly sharpen and flatten the next-token distribution.
LOGIT_STD = 3.0


@dataclass
class Weights:
    config: Config
    params: dict[str, np.ndarray] = field(default_factory=dict)
    trained: bool = False
    _unembedding: np.ndarray | None = field(default=None, repr=False)

    def token_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the token embedding W_E for `ids` (any shape) → [*ids.shape, d_model]."""
        if "wte" in self.params:
            return self.params["wte"][ids]
        # The whole table costs ~0.4 s to draw and a sentence needs ten rows: draw only the
        # blocks of TOKEN_BLOCK ids that hold them, each from its own stream, so a row never
        # depends on which other tokens are present.
        flat = ids.reshape(-1).tolist()
        blocks = {b: self._token_block(b) for b in {t // TOKEN_BLOCK for t in flat}}
        rows = [blocks[t // TOKEN_BLOCK][t % TOKEN_BLOCK] for t in flat]
        out = np.stack(rows) if rows else np.zeros((0, self.config.d_model), np.float32)
        return out.reshape(*ids.shape, self.config.d_model)

    @property
    def tied(self) -> bool:
        """Whether the logits come from W_E itself (GPT-2) rather than a head of their own
        (a checkpoint's lm_head, or random weights' own W_U)."""
        return "wte" in self.params and "lm_head" not in self.params

    def unembedding(self) -> np.ndarray:
        """W_U [vocab, d_model] in full, for next-token logits = h·W_Uᵀ.

        A checkpoint's is its W_E (tied, as in GPT-2), or its own lm_head.weight where it has one
        (tie_word_embeddings false). Random weights draw their own: tied
        to unit-variance embeddings, the input token's own logit would be |e|² ≈ d_model,
        hundreds above every other, and any temperature short of hundreds would give it
        probability 1. An untied W_U with std LOGIT_STD/√d_model, applied to h divided by its
        RMS (`normalizes_logits`), makes every logit N(0, LOGIT_STD²) whatever the sizes.
        """
        if "lm_head" in self.params:
            return self.params["lm_head"]
        if "wte" in self.params:  # a checkpoint's (random weights never hold a whole W_E)
            return self.params["wte"]
        if self._unembedding is None:
            rng = np.random.default_rng([self.config.seed, _UNEMBED])
            table = rng.standard_normal((self.config.vocab, self.config.d_model),
                                        dtype=np.float32)
            table *= np.float32(LOGIT_STD / np.sqrt(self.config.d_model))
            self._unembedding = table
        return self._unembedding

    @property
    def normalizes_logits(self) -> bool:
        """Random weights divide h by its RMS before the unembedding: an attention-only
        residual grows with depth (RMS ~2 at 2 layers, ~75 at 12), and the logits' scale with
        it. A final LayerNorm (gpt2: ln_f, random or a checkpoint's) already does that job."""
        from attn_tracer.model.arch import family

        return "wte" not in self.params and family(self.config).normalizes_logits(self.config)

    def position_rows(self, positions: np.ndarray) -> np.ndarray:
        if "wpe" in self.params:
            return self.params["wpe"][positions]
        from attn_tracer.model.arch import family

        std = family(self.config).position_std
        table = np.stack(
            [_normal([self.config.seed, _POSITIONS, p], self.config.d_model, std)
             for p in range(int(positions.max(initial=0)) + 1)]
        )
        return table[positions]

    def _token_block(self, block: int) -> np.ndarray:
        """Rows block·TOKEN_BLOCK … of W_E."""
        # Unit variance keeps the attention-only stack's scores O(1); GPT-2's own init for gpt2.
        from attn_tracer.model.arch import family

        std = family(self.config).token_std
        return _normal([self.config.seed, _TOKENS, block], (TOKEN_BLOCK, self.config.d_model), std)


def _normal(key: list[int], size, std: float) -> np.ndarray:
    rng = np.random.default_rng(key)
    return rng.standard_normal(size, dtype=np.float32) * np.float32(std)


def _uniform(rng: np.random.Generator, size, std: float) -> np.ndarray:
    """U(−√3·std, √3·std): the std asked for, as PyTorch's nn.Linear draws its weights, and
    5× cheaper to draw than a normal, which matters on the start-up path."""
    bound = np.float32(np.sqrt(3.0) * std)
    x = rng.random(size, dtype=np.float32)
    x *= 2 * bound
    x -= bound
    return x


def random_weights(config: Config, cross: bool = False) -> Weights:
    from attn_tracer.model.arch import family

    arch = family(config)
    params: dict[str, np.ndarray] = {}
    for layer in range(config.layers):
        key = [config.seed, _LAYER, layer]
        params.update(_attention_params(config, f"blocks.{layer}.attn", key))
        if cross:
            params.update(
                _attention_params(config, f"blocks.{layer}.cross_attn",
                                  [config.seed, _CROSS, layer])
            )
        params.update(arch.random_block_params(config, layer))
    params.update(arch.random_final_params(config))
    return Weights(config, params)


def _attention_params(config: Config, prefix: str, key: list[int]) -> dict[str, np.ndarray]:
    # w = heads·d_head (d_model unless --d-head); kv = kv_heads·d_head, w unless --kv-heads.
    d, w, kv = config.d_model, config.d_attn, config.d_kv
    rng = np.random.default_rng(key)
    # std 1/√(fan in) keeps Q and K at unit scale, so scores/√d_head are O(1): the point of
    # the scale; and W_O's output at the scale of its input.
    out = {f"{prefix}.W_{n}": _uniform(rng, (d, w if n == "Q" else kv), d**-0.5) for n in "QKV"}
    out[f"{prefix}.W_O"] = _uniform(rng, (w, d), w**-0.5)
    # Biases are drawn even with --no-bias so that the W's stay the same either way.
    biases = {f"{prefix}.b_{n}": _uniform(rng, w if n == "Q" else kv, 0.02) for n in "QKV"}
    biases[f"{prefix}.b_O"] = _uniform(rng, d, 0.02)
    if config.bias:
        out.update(biases)
    return out
