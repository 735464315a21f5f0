"""Direct logit attribution: how much each component of the residual stream pushes one logit.

The final residual stream at a position is a sum of the parts that wrote into it,

    x = W_E[token] + P[position] + Σ_layers ( Σ_h Z_h·W_O[h] + b_O + mlp_out )

and the logit of token t is read from it through the final LayerNorm and the unembedding:

    logit_t = LayerNorm_f(x)·u_t = ((x − mean(x)) / σ ⊙ w_f + b_f)·u_t,   u_t = W_U[:, t]

With σ = √(var(x) + ε) frozen at its value in the run (TransformerLens's convention), this is a
linear function of x: centring is a linear map, so each component c gets its own share

    logit_t(c) = ((c − mean(c)) / σ ⊙ w_f)·u_t

and Σ_c logit_t(c) + b_f·u_t = logit_t exactly. The constant b_f·u_t is what LayerNorm's bias
adds whatever the input (GPT-2 has no unembedding bias). For a logit difference t − v, u is
u_t − u_v. The `attn` architecture has no LayerNorm: the logit is x·u_t, and the constant is 0.
This is TransformerLens's `logit_attrs` over `decompose_resid` with every head split out
(`stack_head_results`), and its figures compare directly (tests/test_attribute.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("embed", "pos_embed", "head", "attn_bias", "mlp")


def head_name(layer: int, head: int) -> str:
    """Heads are named L{layer}H{head} everywhere: terminal, JSON, options."""
    return f"L{layer}H{head}"


@dataclass(frozen=True)
class Component:
    name: str  # "embed", "pos_embed", "L9H6", "b_O 9", "MLP 9"
    kind: str  # one of KINDS
    layer: int | None = None
    head: int | None = None


@dataclass(frozen=True)
class FinalNorm:
    """The final LayerNorm's parameters, and σ of the residual it normalised in the run."""

    w: np.ndarray  # [d_model]
    b: np.ndarray  # [d_model]
    scale: float  # σ = √(var(x) + ε) of the final residual at the explained position
    centred: bool = True  # False: a plain RMS division (random weights' logits, no LayerNorm)


@dataclass(frozen=True)
class Attribution:
    components: list[Component]
    logits: np.ndarray  # [components] each component's share of the logit (difference)
    constant: float  # b_f·u: what the final LayerNorm's bias adds; 0 without one
    norm: FinalNorm | None  # None: the attn architecture, no final LayerNorm

    @property
    def total(self) -> float:
        """Σ components + constant: the logit (difference) the model computed."""
        return float(self.logits.sum()) + self.constant


def residual_components(embed: np.ndarray, pos_embed: np.ndarray | None,
                        head_out: list[np.ndarray], b_O: list[np.ndarray | None],
                        mlp_out: list[np.ndarray] | None) -> tuple[list[Component], np.ndarray]:
    """The parts of one position's final residual stream, in the order they were written.

    `head_out[layer]` is [heads, d_model] (decompose.head_outputs at that position); `b_O` and
    `mlp_out` are [d_model] per layer (`mlp_out` None for the attn architecture, `b_O[layer]`
    None without biases). Returns the components and their vectors stacked, [components,
    d_model], in float64: their sum is the final residual.
    """
    names: list[Component] = [Component("embed", "embed")]
    rows = [embed]
    if pos_embed is not None:
        names.append(Component("pos_embed", "pos_embed"))
        rows.append(pos_embed)
    for layer, heads in enumerate(head_out):
        for h in range(heads.shape[0]):
            names.append(Component(head_name(layer, h), "head", layer, h))
            rows.append(heads[h])
        if b_O[layer] is not None:
            names.append(Component(f"b_O {layer}", "attn_bias", layer))
            rows.append(b_O[layer])
        if mlp_out is not None:
            names.append(Component(f"MLP {layer}", "mlp", layer))
            rows.append(mlp_out[layer])
    return names, np.stack([np.asarray(r, np.float64) for r in rows])


def final_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> FinalNorm:
    """The final LayerNorm at one position, with σ of its input `x` [d_model] frozen."""
    x = np.asarray(x, np.float64)
    scale = float(np.sqrt(x.var() + eps))
    return FinalNorm(np.asarray(w, np.float64), np.asarray(b, np.float64), scale)


def rms_norm(x: np.ndarray, w: np.ndarray | None = None, eps: float = 0.0) -> FinalNorm:
    """Random attention-only weights divide h by its RMS before W_U (Weights.normalizes_logits):
    a scale like LayerNorm's σ, frozen the same way, with no centring, weight or bias. A final
    RMSNorm (Llama) is the same with its weight `w` and its ε: σ = √(mean(x²) + ε)."""
    x = np.asarray(x, np.float64)
    rms = float(np.sqrt(np.mean(x * x) + eps))
    d = x.shape[-1]
    weight = np.ones(d) if w is None else np.asarray(w, np.float64)
    return FinalNorm(weight, np.zeros(d), rms if rms > 0 else 1.0, centred=False)


def direction(W_U: np.ndarray, target: int, versus: int | None = None) -> np.ndarray:
    """u = W_U[:, target] (− W_U[:, versus]) [d_model]; W_U given as rows, [vocab, d_model]."""
    u = np.asarray(W_U[target], np.float64)
    return u if versus is None else u - np.asarray(W_U[versus], np.float64)


def attribute(components: list[Component], stack: np.ndarray, u: np.ndarray,
              norm: FinalNorm | None) -> Attribution:
    """Each component's share of the logit (difference) along `u`, through `norm` frozen."""
    if norm is None:
        return Attribution(components, stack @ u, 0.0, None)
    centred = stack - stack.mean(axis=-1, keepdims=True) if norm.centred else stack
    logits = centred @ (norm.w * u) / norm.scale
    return Attribution(components, logits, float(norm.b @ u), norm)


def ranked(attribution: Attribution) -> list[int]:
    """Component indices, strongest first: by |logit|, ties in the order written."""
    return sorted(range(len(attribution.components)),
                  key=lambda i: -abs(float(attribution.logits[i])))


def head_grid(attribution: Attribution, layers: int, heads: int) -> np.ndarray:
    """The heads' shares as [layers, heads]."""
    grid = np.zeros((layers, heads))
    for c, v in zip(attribution.components, attribution.logits, strict=True):
        if c.kind == "head":
            grid[c.layer, c.head] = v
    return grid
