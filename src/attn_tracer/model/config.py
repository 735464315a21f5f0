"""What the attention stack is: its sizes and switches, validated once, frozen after.

Dimension words used everywhere (config, comments, trace `dims`, JSON, README):
`batch`, `len` (`q_len`/`k_len` where they differ), `d_model`, `heads`, `d_head`, `d_mlp`, `vocab`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from attn_tracer.errors import UsageError

POSITIONS = ("sinusoidal", "learned", "none")
MASKS = ("causal", "none")
ARCHS = ("attn", "gpt2")
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
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be between 0 and 2^63-1, got {self.seed}")

    @property
    def d_attn(self) -> int:
        """heads·d_head: the width of Q, K, V and of the merged Z (d_model unless --d-head)."""
        return self.heads * self.d_head  # type: ignore[operator]

    @property
    def attn_dim(self) -> str:
        """The dimension name of that width: `d_model` where it is d_model, else `heads·d_head`."""
        return "d_model" if self.d_attn == self.d_model else "heads·d_head"

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.arch == "attn":  # attention and residual only: no MLP, no LayerNorm to describe
            del out["d_mlp"], out["ln_eps"]
        return out


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
