"""What the attention stack is: its sizes and switches, validated once, frozen after.

Dimension words used everywhere (config, comments, trace `dims`, JSON, README):
`batch`, `len` (`q_len`/`k_len` where they differ), `d_model`, `heads`, `d_head`, `d_mlp`, `vocab`,
and `kv_heads` for grouped-query attention (fewer K/V heads than query heads).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from attn_tracer.errors import UsageError

POSITIONS = ("sinusoidal", "learned", "rotary", "none")
MASKS = ("causal", "none")
# The architecture families (model/arch/: one module each, the only place a name is compared).
ARCHS = ("attn", "gpt2", "llama")
NORMS = ("layer", "rms")
MLPS = ("gelu", "swiglu")
# The activation of the GELU-style MLP (mlp "gelu"): GPT-2's tanh approximation, the exact
# erf GELU (GPT-NeoX, some GPT-2 checkpoints), or ReLU (OPT). Set by checkpoints and families.
ACTS = ("gelu_new", "gelu", "relu")
# How rotary positions pair the dimensions of a head: the first half with the second (Llama,
# GPT-NeoX, Mistral, Qwen2: `rotate_half`), or neighbours 2i, 2i+1 (GPT-J, the RoFormer paper).
ROTARY_STYLES = ("halves", "interleaved")
# The fields added with modern attention, and their value in the classic stack: a config at these
# values writes none of them (JSON documents of the classic stack stay as they were).
MODERN_DEFAULTS = {"kv_heads": None, "window": None, "norm": "layer", "mlp": "gelu",
                   "rotary_dims": None, "rope_theta": 10000.0, "rotary_style": "halves",
                   "model_type": None, "act": "gelu_new"}
# Where it runs (engine.py): named here so the command line can list them without NumPy.
ENGINES = ("auto", "numpy", "torch")
DTYPES = ("float32", "float64", "float16", "bfloat16")
HALF = ("float16", "bfloat16")


@dataclass(frozen=True)
class Config:
    d_model: int = 768  # GPT-2 small's width, so shapes read like the real model
    heads: int = 12  # GPT-2 small: d_head = 64
    layers: int = 2  # enough to see a second layer build on the first, small enough to read
    n_ctx: int = 1024  # GPT-2's context length
    pos: str = "sinusoidal"  # the original transformer's encoding: no weights to explain
    mask: str = "causal"  # GPT-2 is a decoder
    scale: bool = True  # ÷√d_head; turn it off to watch the patterns saturate
    bias: bool = True
    seed: int = 0
    arch: str = "attn"  # "attn": attention and residual only; "gpt2": the full GPT-2 block
    vocab: int = 50257
    ln_eps: float = 1e-5  # GPT-2's LayerNorm epsilon
    weights: str | None = None  # the checkpoint source, None for seeded random weights
    d_mlp: int | None = None  # the MLP's width; None: GPT-2's 4·d_model
    # One head's width; None: d_model / heads, as in GPT-2. Any other value makes the attention
    # width heads·d_head differ from d_model, as in the study notes' 8 heads of 3 over d_model 4.
    d_head: int | None = None
    # Grouped-query attention: K and V have this many heads, each shared by heads / kv_heads
    # query heads (1: multi-query). None: as many as the query heads, the classic attention.
    kv_heads: int | None = None
    window: int | None = None  # a sliding-window mask: a query sees its last `window` keys
    norm: str = "layer"  # the block's norms: LayerNorm (GPT-2) or RMSNorm (Llama)
    mlp: str = "gelu"  # GPT-2's GELU MLP, or Llama's gated SwiGLU
    rotary_dims: int | None = None  # --pos rotary: dimensions of a head rotated; None: all
    rope_theta: float = 10000.0  # --pos rotary: θ_i = rope_theta^(−2i/rotary_dims)
    rotary_style: str = "halves"  # which dimensions rotate together (ROTARY_STYLES)
    model_type: str | None = None  # a checkpoint's config.json model_type (llama, mistral, …)
    act: str = "gelu_new"  # the activation of the non-gated MLP (ACTS)

    def __post_init__(self) -> None:
        if self.d_mlp is None:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)
        names = ("d_model", "heads", "layers", "n_ctx") + (("d_head",) if self.d_head is not None
                                                           else ())
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be a positive integer, got {value}")
        if self.d_head is None:
            if self.d_model % self.heads:
                raise UsageError(
                    f"--heads {self.heads} does not divide --d-model {self.d_model}: by default "
                    f"each head gets d_head = d_model / heads dimensions (try --heads "
                    f"{_divisor_near(self.d_model, self.heads)}, or set --d-head)"
                )
            object.__setattr__(self, "d_head", self.d_model // self.heads)
        _choice("pos", self.pos, POSITIONS)
        _choice("mask", self.mask, MASKS)
        _choice("arch", self.arch, ARCHS)
        _choice("norm", self.norm, NORMS)
        _choice("mlp", self.mlp, MLPS)
        _choice("act", self.act, ACTS)
        _choice("rotary-style", self.rotary_style, ROTARY_STYLES)
        self._check_modern()
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be between 0 and 2^63-1, got {self.seed}")

    def _check_modern(self) -> None:
        for name in ("kv_heads", "window", "rotary_dims"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, "
                                 f"got {value}")
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        elif self.heads % self.kv_heads:
            raise UsageError(f"--kv-heads {self.kv_heads} does not divide --heads {self.heads}: "
                             "each K/V head is shared by the same number of query heads")
        if self.window is not None and self.mask != "causal":
            raise UsageError("--window is a sliding causal mask: it needs --mask causal")
        if self.pos == "rotary":
            if self.rotary_dims is None:
                object.__setattr__(self, "rotary_dims", self.d_head)
            if self.rotary_dims > self.d_head or self.rotary_dims % 2:  # type: ignore[operator]
                raise UsageError(f"--rotary-dims must be even and at most d_head "
                                 f"{self.d_head}; got {self.rotary_dims}")
            if not (isinstance(self.rope_theta, int | float) and 1 < self.rope_theta < 1e12):
                raise UsageError(f"--rope-theta must be a number above 1; got {self.rope_theta}")
            object.__setattr__(self, "rope_theta", float(self.rope_theta))
        elif self.rotary_dims is not None:
            raise UsageError("--rotary-dims sets rotary positions: it needs --pos rotary")

    @property
    def groups(self) -> int:
        """Query heads per K/V head: heads / kv_heads (1 without grouped-query attention)."""
        return self.heads // self.kv_heads  # type: ignore[operator]

    @property
    def d_kv(self) -> int:
        """kv_heads·d_head: the width of K and V (heads·d_head without grouped-query)."""
        return self.kv_heads * self.d_head  # type: ignore[operator]

    @property
    def kv_dim(self) -> str:
        """The dimension name of K's and V's width: the attention width's, unless narrower."""
        return self.attn_dim if self.kv_heads == self.heads else "kv_heads·d_head"

    @property
    def d_attn(self) -> int:
        """heads·d_head: the width of Q, K, V and of the merged Z (d_model unless --d-head)."""
        return self.heads * self.d_head  # type: ignore[operator]

    @property
    def attn_dim(self) -> str:
        """The dimension name of that width: `d_model` where it is d_model, else `heads·d_head`."""
        return "d_model" if self.d_attn == self.d_model else "heads·d_head"

    def to_dict(self) -> dict:
        from attn_tracer.model.arch import family

        out = asdict(self)
        # Fields at their classic value are left out (`kv_heads` absent means kv_heads = heads);
        # the rotary ones are said whenever positions are rotary, and never otherwise.
        rotary = ("rotary_dims", "rope_theta", "rotary_style")
        for name, value in dict(MODERN_DEFAULTS, kv_heads=self.heads).items():
            if (name in rotary and self.pos != "rotary") or (name not in rotary
                                                            and out[name] == value):
                del out[name]
        return family(self).describe(out)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}")


def _divisor_near(n: int, k: int) -> int:
    # A bounded search: an absurd --d-model or --heads must not make the error itself slow.
    k = min(k, n)
    for delta in range(4096):
        for d in (k - delta, k + delta):
            if 1 <= d <= n and n % d == 0:
                return d
    return 1
