"""Activation patching: which layer, position and head carry the difference between two runs.

Two runs of the model differ: a clean prompt and a corrupted one ("… John gave a drink to" with
the names swapped), or, for causal tracing (Meng et al. 2022, ROME), one prompt whose subject
embeddings had Gaussian noise added. One activation of the *base* run is replaced by the same
activation of the *source* run, the rest of the forward runs on, and the metric at the
explained position is read:

    denoise: base = corrupted, source = clean   (is this activation sufficient?)
    noise:   base = clean,     source = corrupted (is it necessary?)

and reported normalised, (patched − corrupted) / (clean − corrupted), in both directions: 1 is
the clean run's metric, 0 the corrupted one's (Heimersheim & Nanda 2024, "How to use and
interpret activation patching"; TransformerLens's `patching` module computes the same grids).

Everything here is plain arrays: which cells a grid has, the mask that says what one patch
replaces in a step's tensor, the metric of a row of logits, the noise. commands/patch.py runs
the forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attn_tracer.errors import UsageError

TARGETS = ("resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern")
BY_POSITION = ("resid_pre", "attn_out", "mlp_out")  # layers × positions grids
BY_HEAD = ("z", "q", "k", "v", "pattern")  # layers × heads (z --per-position: × positions)
WINDOWED = ("attn_out", "mlp_out")  # --restore-window restores K consecutive layers of these (ROME)
METRICS = ("diff", "logit", "logprob", "prob")
DIRECTIONS = ("denoise", "noise")
DEFAULT_TARGETS = ("resid_pre", "attn_out", "mlp_out")


def step(target: str, layer: int) -> str:
    """The trace step a target of `layer` is (the hook point): layer L's input is the
    embedding's `resid_pre` for L = 0, else layer L − 1's `resid_post`."""
    if target == "resid_pre":
        return "resid_pre" if layer == 0 else f"blocks.{layer - 1}.resid_post"
    return {"attn_out": f"blocks.{layer}.attn.out", "mlp_out": f"blocks.{layer}.mlp.out",
            "z": f"blocks.{layer}.attn.z", "q": f"blocks.{layer}.attn.q.heads",
            "k": f"blocks.{layer}.attn.k.heads", "v": f"blocks.{layer}.attn.v.heads",
            "pattern": f"blocks.{layer}.attn.pattern"}[target]


def hook_name(target: str) -> str:
    """The name the view and the JSON give a grid's hook point, `blocks.L.…` over layers."""
    return {"resid_pre": "blocks.L.resid_pre", "attn_out": "blocks.L.attn.out",
            "mlp_out": "blocks.L.mlp.out", "z": "blocks.L.attn.z",
            "q": "blocks.L.attn.q.heads", "k": "blocks.L.attn.k.heads",
            "v": "blocks.L.attn.v.heads", "pattern": "blocks.L.attn.pattern"}[target]


def head_count(target: str, heads: int, kv_heads: int | None = None) -> int:
    """Heads on the step's `heads` axis: K and V have kv_heads of them under grouped-query
    attention (a K/V head serves several query heads, and patching it patches all of them)."""
    return (kv_heads or heads) if target in ("k", "v") else heads


def parse_targets(values: list[str], has_mlp: bool) -> list[str]:
    """--patch values (repeatable, or comma-separated) → the targets, in TARGETS' order."""
    chosen: set[str] = set()
    for value in values:
        for part in value.split(","):
            part = part.strip().lower()
            if part not in TARGETS:
                raise UsageError(f"--patch takes {', '.join(TARGETS[:-1])} or {TARGETS[-1]}; "
                                 f"got {part or value!r}")
            if part == "mlp_out" and not has_mlp:
                raise UsageError("--patch mlp_out: the attn arch has no MLP (use --arch gpt2)")
            chosen.add(part)
    if not values:
        chosen = {t for t in DEFAULT_TARGETS if has_mlp or t != "mlp_out"}
    return [t for t in TARGETS if t in chosen]


def window_layers(layer: int, window: int, layers: int) -> range:
    """The layers restored together for the cell of `layer`: ROME's window of K layers
    centred on it, cut at the ends of the stack."""
    return range(max(0, layer - window // 2), min(layers, layer - (-window // 2)))


@dataclass(frozen=True)
class Cell:
    """One patched run: which grid entry, and what it replaces."""

    index: tuple[int, ...]  # into the grid
    layers: tuple[int, ...]  # the layers whose step is replaced (one, or a --restore-window)
    head: int | None = None  # None: a step without a heads axis
    position: int | None = None  # None: every position


def axes(target: str, per_position: bool, kv: bool = False) -> tuple[str, ...]:
    """The grid's axes, named: ("layer", "position") or ("layer", "head"[, "position"])."""
    if target in BY_POSITION:
        return ("layer", "position")
    head = "kv_head" if kv and target in ("k", "v") else "head"
    return ("layer", head, "position") if target == "z" and per_position else ("layer", head)


def cells(target: str, layers: int, heads: int, length: int, per_position: bool = False,
          window: int = 1) -> list[Cell]:
    """Every cell of one target's grid (`heads`: on that step's heads axis)."""
    out = []
    for layer in range(layers):
        restored = tuple(window_layers(layer, window, layers)) if target in WINDOWED \
            else (layer,)
        if target in BY_POSITION:
            out += [Cell((layer, p), restored, None, p) for p in range(length)]
        elif target == "z" and per_position:
            out += [Cell((layer, h, p), restored, h, p) for h in range(heads)
                    for p in range(length)]
        else:
            out += [Cell((layer, h), restored, h, None) for h in range(heads)]
    return out


def mask(target: str, cell: Cell, shape: tuple[int, ...]) -> np.ndarray:
    """bool, broadcastable to one row of the step's tensor (`shape`, without the batch axis):
    True where the patch takes the source's values.

    resid_pre, attn_out, mlp_out [len, d_model] → [len, 1]; z, q, k, v [heads, len, d_head] →
    [heads, len, 1]; pattern [heads, q_len, k_len] → [heads, 1, 1] (the head's whole pattern).
    """
    if target in BY_POSITION:
        m = np.zeros((shape[0], 1), bool)
        m[slice(None) if cell.position is None else cell.position] = True
        return m
    if target == "pattern":
        m = np.zeros((shape[0], 1, 1), bool)
        m[cell.head] = True
        return m
    m = np.zeros((shape[0], shape[1], 1), bool)
    m[cell.head, slice(None) if cell.position is None else cell.position] = True
    return m


def changes_nothing(m: np.ndarray, base: np.ndarray, source: np.ndarray) -> bool:
    """Whether the patch writes exactly what is there already (`base`, `source`: the step's
    tensor of one row in each run): then the patched run is the base run, with no forward.
    Under the causal mask this is every position before the first one where the runs differ."""
    where = np.broadcast_to(m, base.shape)
    return bool(np.array_equal(base[where], source[where]))


def metric(logits: np.ndarray, kind: str, target: int, versus: int | None) -> np.ndarray:
    """The metric of each row of `logits` [rows, vocab] (or, for diff and logit, only the
    columns [rows, 2] of target and versus: see `columns`)."""
    logits = np.asarray(logits, np.float64)
    if kind == "diff":
        return logits[:, 0] - logits[:, 1] if logits.shape[1] == 2 else \
            logits[:, target] - logits[:, versus]
    if kind == "logit":
        return logits[:, 0] if logits.shape[1] == 2 else logits[:, target]
    peak = logits.max(axis=1, keepdims=True)
    log_total = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
    logprob = logits[:, target] - log_total
    return logprob if kind == "logprob" else np.exp(logprob)


def columns(kind: str, target: int, versus: int | None) -> list[int] | None:
    """The unembedding columns the metric reads: two for diff and logit, all (None) else."""
    if kind in ("diff", "logit"):
        return [target, target if versus is None else versus]
    return None


def normalise(values: np.ndarray, clean: float, corrupted: float) -> np.ndarray:
    """(patched − corrupted) / (clean − corrupted): 1 the clean run's metric, 0 the corrupted
    one's, in either direction."""
    return (np.asarray(values, np.float64) - corrupted) / (clean - corrupted)


def noise(seed: int, samples: int, count: int, d_model: int, std: float) -> np.ndarray:
    """[samples, count, d_model] Gaussian noise of standard deviation `std`, one draw per
    sample, from the seed alone (the same numbers on every engine)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((samples, count, d_model)) * std


def subject_span(pieces: list[bytes], text: str, subject: str) -> range:
    """The positions of the tokens that make up the first occurrence of `subject` in `text`
    (`pieces`: each token's bytes; a token that overlaps the subject's characters counts)."""
    if not subject.strip():
        raise UsageError("--corrupt-noise is empty: give the subject, the words to corrupt")
    at = text.find(subject)
    if at < 0:
        raise UsageError(f"--corrupt-noise {subject!r} is not in the text: give words that "
                         "appear in it exactly (case and spaces count)")
    start = len(text[:at].encode())
    stop = start + len(subject.encode())
    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - np.array([len(p) for p in pieces])
    inside = np.flatnonzero((starts < stop) & (ends > start))
    if not inside.size:
        raise UsageError(f"--corrupt-noise {subject!r} is cut off by --max-length: none of its "
                         "tokens is in the run")
    return range(int(inside[0]), int(inside[-1]) + 1)


def strongest(grid: np.ndarray, count: int, neutral: float) -> list[tuple[tuple[int, ...],
                                                                           float]]:
    """The `count` cells furthest from `neutral` (0 for denoise: no effect; 1 for noise:
    nothing lost), each (index, value), strongest first; ties in grid order."""
    flat = np.abs(grid.ravel() - neutral)
    order = np.argsort(-flat, kind="stable")[:count]
    return [(tuple(int(i) for i in np.unravel_index(j, grid.shape)), float(grid.ravel()[j]))
            for j in order]
