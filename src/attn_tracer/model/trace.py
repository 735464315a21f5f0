"""The trace: every step's name, formula, shape and dimension names, and the few tensors the
user will look at.

The recorder always keeps every step's shape but copies a tensor to the host only when the
selection asks for it, so showing one head of a 12-layer stack never costs the whole stack.
Renderers read a `Trace`; they never see an engine's arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attn_tracer.model.config import Config
from attn_tracer.model.tokens import Token

# What is captured for the selected layers: the pattern only; the pattern and the three score
# stages before it; or every step (for --values and --save).
CAPTURES = ("patterns", "stages", "all")
STAGES = ("scores", "scaled", "masked", "pattern")


@dataclass(frozen=True)
class Step:
    name: str  # dotted, TransformerLens-style: "blocks.0.attn.q"
    op: str  # the formula: "Q = X·W_Q + b_Q"
    shape: tuple[int, ...]
    dims: tuple[str, ...]  # the dimension words of config.py, one per axis


@dataclass(frozen=True)
class Selection:
    """Which layers and heads the user will look at; everything else is only shapes."""

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    capture: str = "patterns"
    # Step names kept whatever `capture` says (e.g. a layer's resid_post, to compare the fused
    # and explicit paths); a tensor with a `heads` axis still keeps only the selected heads.
    extra: tuple[str, ...] = ()
    # `layers` as a set: asked at every step, a tuple of 3,000 layers made a run quadratic.
    layer_set: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_set", frozenset(self.layers))

    def shows(self, layer: int) -> bool:
        return layer in self.layer_set

    def captures(self, layer: int | None, name: str) -> bool:
        if name in self.extra:
            return True
        if self.capture == "all":
            # Every step of the selected layers, what comes before the layers, and each
            # selected layer's input (the previous layer's output), so its numbers add up.
            return (layer is None or layer in self.layer_set
                    or (name == f"blocks.{layer}.resid_post" and layer + 1 in self.layer_set))
        if layer is None or layer not in self.layer_set:
            return False
        stage = name.rsplit(".", 1)[-1]
        return stage == "pattern" or (self.capture == "stages" and stage in STAGES)


@dataclass
class Input:
    text: str
    tokens: list[Token]  # real tokens, without padding
    length: int  # real tokens
    padding: int = 0  # pad tokens added to reach the batch length
    side: str = "right"
    # Tokens --max-length cut off the end: a number, or, for a text of which only the part kept
    # was tokenized (tokens.encode_head), how to count them. Counting reads the whole text, so
    # it runs only when asked: JSON writes the number; the view only says which texts were cut.
    cut_off: int | Callable[[], int] = 0

    @property
    def truncated(self) -> int:
        """Tokens that --max-length cut off the end."""
        if callable(self.cut_off):
            self.cut_off = self.cut_off()
        return self.cut_off

    @property
    def valid(self) -> np.ndarray:
        """Which of the batch-length positions hold a real token."""
        total = self.length + self.padding
        mask = np.zeros(total, bool)
        if self.side == "right":
            mask[: self.length] = True
        else:
            mask[self.padding :] = True
        return mask


@dataclass
class Prediction:
    batch: int
    position: int
    top: list[dict[str, Any]]  # {"id", "text", "prob", "logit"}


@dataclass
class Trace:
    config: Config
    engine: dict[str, str]  # {"engine", "device", "dtype"}
    inputs: list[Input]
    steps: list[Step] = field(default_factory=list)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    selection: Selection = field(default_factory=lambda: Selection((0,), (0,)))
    cross: list[Input] | None = None
    predictions: list[Prediction] | None = None
    temperature: float = 1.0

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def patterns(self, kind: str = "attn"):
        """(layer, pattern [batch, selected heads, q_len, k_len]) for each captured layer."""
        for layer in self.selection.layers:
            name = f"blocks.{layer}.{kind}.pattern"
            if name in self.tensors:
                yield layer, self.tensors[name]


Hook = Callable[[Any], Any]


class Recorder:
    """Called by the layer code at every step; records the shape, keeps what is selected.

    `hooks` maps a step name to a function called with that step's array, on the engine, as it
    is made (TransformerLens's hook points, over the trace's step names). An analysis reduces
    it there and keeps nothing else (attn heads), or returns a replacement that the rest of the
    forward uses (ablation); returning None leaves the step as it was. A hooked pattern is
    always formed, even on the fused path.
    """

    def __init__(self, selection: Selection, engine, hooks: dict[str, Hook] | None = None
                 ) -> None:
        self.selection = selection
        self.engine = engine
        self.hooks = hooks or {}
        self.steps: list[Step] = []
        self.tensors: dict[str, np.ndarray] = {}
        self._pending: dict[str, Any] = {}
        self.fresh: list[str] = []  # names kept since the caller last looked (take_fresh)

    def __call__(self, name: str, op: str, x, dims: tuple[str, ...], *,
                 all_heads: int | None = None):
        """Record step `name`; keep `x` if the selection asks for it.

        `all_heads`: x was computed for the selected heads only (the fused path), out of this
        many; the step's recorded shape is still the full one.
        """
        shape = tuple(x.shape)
        if all_heads is not None:
            axis = dims.index("heads")
            shape = (*shape[:axis], all_heads, *shape[axis + 1:])
        self.shape(name, op, shape, dims)
        if (hook := self.hooks.get(name)) is not None and (replaced := hook(x)) is not None:
            x = replaced
        if self.keeps(name):
            self._pending[name] = x if all_heads is not None else self._select_heads(x, dims)
        return x

    def shape(self, name: str, op: str, shape: tuple[int, ...], dims: tuple[str, ...]) -> None:
        if len(shape) != len(dims):
            raise AssertionError(f"step {name}: shape {shape} has no name for every axis {dims}")
        self.steps.append(Step(name, op, tuple(int(n) for n in shape), dims))

    def keep(self, name: str, x) -> np.ndarray:
        """Keep step `name`'s tensor whatever the selection says; the host copy."""
        self.tensors[name] = self.engine.to_host(x)
        self.fresh.append(name)
        return self.tensors[name]

    def keeps(self, name: str) -> bool:
        """Whether the tensor of step `name` will be kept (so it must not be overwritten)."""
        return self.selection.captures(_layer_of(name), name)

    def needs(self, name: str) -> bool:
        """Whether step `name` must be formed in full and left intact: kept, or hooked."""
        return name in self.hooks or self.keeps(name)

    def flush(self) -> None:
        """Bring this layer's captured tensors to the host, once, at the end of the layer."""
        for name, x in self._pending.items():
            self.tensors[name] = self.engine.to_host(x)
        self.fresh.extend(self._pending)
        self._pending.clear()

    def take_fresh(self) -> list[str]:
        """The names of the tensors kept since the last call."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def _select_heads(self, x, dims: tuple[str, ...]):
        if "heads" not in dims:
            return x
        axis = dims.index("heads")
        heads = list(self.selection.heads)
        if heads == list(range(x.shape[axis])):
            return x
        index = [slice(None)] * len(dims)
        index[axis] = heads
        return x[tuple(index)]


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if parts[0] == "blocks":
        return int(parts[1])
    return None
