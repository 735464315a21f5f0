"""`attn attribute`: which components made the next-token prediction at one position.

The order: validation → input → weights → the target → memory check → engine → one forward
whose hooks keep, per layer, only what the analyses need at the explained position (the
heads' Z there [heads, d_head], the MLP's output and the residual there [d_model]) → the
analyses (analysis/attribution, logit_lens, rollout) → with --ablate, one more forward with the
heads knocked out → the view or one JSON document. The run is a session (session.py), as for
every command: everything is computed before the first byte reaches stdout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attn_tracer.analysis import ablation, attribution, logit_lens, rollout
from attn_tracer.analysis.decompose import head_outputs
from attn_tracer.commands.session import SharedOptions, open_session
from attn_tracer.errors import UsageError
from attn_tracer.model import memory
from attn_tracer.model import tokenizer as tokenizers
from attn_tracer.model.arch import family
from attn_tracer.model.tokens import VOCAB
from attn_tracer.model.trace import Selection, Trace

_VISIBLE = {"␣": " ", "↵": "\n", "⇥": "\t"}  # the labels' marks, read back as what they mark
# The forward keeps no tensor through the selection: the hooks keep what is needed.
_SELECT_NOTHING = Selection((), (), "patterns")


@dataclass
class AttributeRequest:
    base: Any  # the shared input, model and engine options (SharedOptions, or their fields)
    target: str | None = None
    versus: str | None = None
    position: int | None = None
    ablate: list[str] = field(default_factory=list)
    ablate_mode: str = "zero"
    all_positions: bool = False
    rollout: bool = False
    top_k: int = 5
    components: int = 10
    json: bool = False
    svg: Path | None = None
    html: Path | None = None
    width: int | None = None
    force: bool = False


@dataclass
class Ablated:
    mode: str
    heads: list[tuple[int, int]]
    before: ablation.Outcome
    after: ablation.Outcome


@dataclass
class Result:
    trace: Trace  # the forward's: config, engine, inputs, steps (no tensors)
    trained: bool
    position: int
    target: int
    versus: int | None
    before: ablation.Outcome  # the prediction at the position
    attribution: attribution.Attribution
    lens: logit_lens.Lens
    ablated: Ablated | None = None
    rollout: np.ndarray | None = None  # R [len, len], over the padded length
    all_positions: bool = False
    batch_position: int | None = None  # the position in the padded row (--pad-to)

    @property
    def layers(self) -> int:
        return self.trace.config.layers


def parse_token(value: str, vocab: int, flag: str, tokens=None) -> int:
    """A token given as its text (`" Paris"`, or the label `␣Paris`) or as `#id`, in the
    tokenizer `tokens` (GPT-2's by default)."""
    from attn_tracer.text import check_argument

    tokens = tokens or tokenizers.gpt2()
    value = check_argument(value, flag)
    if value.startswith("#") and value[1:].isdigit():
        token_id = int(value[1:])
        if not 0 <= token_id < vocab:
            raise UsageError(f"{flag} {value}: token ids run from 0 to {vocab - 1}")
        return token_id
    if not value:
        raise UsageError(f"{flag} is empty: give one token, or its id as #ID")
    ids = tokens.encode(value)
    if len(ids) != 1 and any(mark in value for mark in _VISIBLE):
        readable = "".join(_VISIBLE.get(c, c) for c in value)
        if len(again := tokens.encode(readable)) == 1:
            ids = again
    if len(ids) != 1:
        pieces = " ".join(tokens.token(i).text for i in ids)
        raise UsageError(f"{flag} {value!r} is {len(ids)} tokens ({pieces}), not one: give a "
                         "single token (attn tokens shows how a text splits) or its id as #ID")
    return ids[0]


def validate(a: AttributeRequest) -> None:
    """`attn attribute`'s own options (the session checks the shared ones first)."""
    from attn_tracer.commands import output

    if not 1 <= a.top_k <= VOCAB:
        raise UsageError(
            f"--top-k must be between 1 and the vocabulary size {VOCAB}; got {a.top_k}")
    if a.components < 1:
        raise UsageError(f"--components must be at least 1; got {a.components}")
    if a.ablate_mode not in ablation.MODES:
        raise UsageError(f"--ablate-mode must be zero or mean; got {a.ablate_mode!r}")
    if a.position is not None and a.position < 0:
        raise UsageError(f"--position counts tokens from 0; got {a.position}")
    output.check_width(a.width)
    output.check_files({flag: (getattr(a, flag[2:]), suffixes)
                        for flag, suffixes in output.VIEW_SUFFIXES.items()}, a.force)


def execute(a: AttributeRequest, notice: Callable[[str], None], console: Callable) -> None:
    from attn_tracer.commands import output
    from attn_tracer.render import attribution as render_attribution

    said: list[str] = []
    result = compute(a, said.append)
    for message in said:
        notice(message)
    views = output.Views(console(), "attn attribute", a.svg, a.html, a.width,
                         on_screen=not a.json)
    screen, saved = views.render(lambda c, _: render_attribution.render(
        result, c, top_k=a.top_k, components=a.components))
    out = render_attribution.document(result) if a.json else screen.file.getvalue()
    output.emit(out, views.writers(saved))


def compute(a: AttributeRequest, notice: Callable[[str], None]) -> Result:
    """Everything that can fail for a reason of the user's, then the forward(s)."""
    options = SharedOptions.of(a.base)
    unused = []
    if not a.ablate and a.ablate_mode != "zero":
        unused.append("--ablate-mode says how --ablate knocks heads out; without --ablate it "
                      "changes nothing")
    session = open_session(options, notice, check=lambda: validate(a), ignored=unused)
    if len(session.texts) > 1:
        raise UsageError(f"attn attribute explains one prediction: give one text (got "
                         f"{len(session.texts)}; quote a text that has spaces)")
    config = session.config
    tok = tokenizers.of(config)
    target = (parse_token(a.target, config.vocab, "--target", tok) if a.target is not None
              else None)
    versus = (parse_token(a.versus, config.vocab, "--versus", tok) if a.versus is not None
              else None)
    if target is not None and target == versus:
        raise UsageError("--versus is the same token as --target: their logit difference is 0; "
                         "give another token")
    heads = ablation.parse_heads(a.ablate, config.layers, config.heads)
    prepared = session.prepared
    valid = prepared.batch.valid[0]  # --pad-to may pad the one text, on either side
    real = np.flatnonzero(valid)  # the batch position of each real token
    count = len(real)
    length = session.length
    position = count - 1 if a.position is None else a.position  # among the real tokens
    if position >= count:
        raise UsageError(f"--position {position} is out of range: the text has {count} "
                         f"token{'s' if count > 1 else ''} (positions 0 to {count - 1})")
    at = int(real[position])  # where the hooks read it
    layers = config.layers
    # The forward keeps almost nothing; the rollout keeps one [len, len] pattern per layer.
    needed = memory.estimate(config, options.engine.dtype, 1, length, length,
                             layers if a.rollout else 0, 1 if a.rollout else 0, "patterns",
                             False, predict=True)
    lens_rows = length if a.all_positions else 1
    needed += layers * lens_rows * config.d_model * 8 + 3 * logit_lens.CHUNK * config.vocab * 4
    engine = session.start(needed)
    weights = session.draw_weights()
    W_U = weights.unembedding()  # [vocab, d_model]: W_E, lm_head, or a random W_U
    means = ablation.by_layer(heads) if a.ablate_mode == "mean" else {}
    gather = Gather(engine, config, at, a.all_positions, a.rollout, means, valid)
    trace = session.forward(_SELECT_NOTHING, gather.hooks(), predict=False)
    session.notice_cuts()

    logits = gather.final_logits(W_U, weights.normalizes_logits)
    if target is None:
        target = int(np.argmax(logits))
        if target == versus:
            raise UsageError("--versus is the model's top token, which is the target when "
                             "--target is not given: give --target too, or another --versus")
    before = ablation.outcome(logits, target, versus, a.top_k)
    norm_params = _final_norm_params(weights, config)
    final = gather.residual(layers - 1, at)
    norm = (attribution.rms_norm(final) if norm_params is logit_lens.RMS
            else attribution.rms_norm(final, norm_params.w, norm_params.eps)
            if isinstance(norm_params, logit_lens.RMSNorm)
            else attribution.final_norm(final, *norm_params) if norm_params is not None else None)
    parts, stack = attribution.residual_components(
        gather.embed, gather.pos_embed,
        [head_outputs(gather.z[layer], weights.params[f"blocks.{layer}.attn.W_O"]
                      .astype(np.float64)) for layer in range(layers)],
        [weights.params.get(f"blocks.{layer}.attn.b_O") for layer in range(layers)],
        [gather.mlp[layer] for layer in range(layers)] if family(config).has_mlp(config)
        else None)
    dla = attribution.attribute(parts, stack, attribution.direction(W_U, target, versus), norm)
    positions = list(range(count)) if a.all_positions else [position]
    resid = np.stack([gather.resid[layer][real] if a.all_positions else gather.resid[layer][None]
                      for layer in range(layers)])
    lens = logit_lens.logit_lens(resid, positions, W_U, norm_params, position, target)
    result = Result(trace, weights.trained, position, target, versus, before, dla, lens,
                    all_positions=a.all_positions, batch_position=at)
    if a.rollout:
        patterns = np.stack([gather.patterns[layer] for layer in range(layers)])
        result.rollout = rollout.rollout(patterns, valid)
    if heads:
        final_only = Gather(engine, config, at, final_only=True)
        hooks = {**final_only.hooks(),
                 **ablation_hooks(engine, config, heads, gather.means if means else None)}
        session.forward(_SELECT_NOTHING, hooks, predict=False,
                        description=f"ablating {', '.join(ablation.names(heads))}")
        after = ablation.outcome(final_only.final_logits(W_U, weights.normalizes_logits),
                                 target, versus, a.top_k)
        result.ablated = Ablated(a.ablate_mode, heads, before, after)
    return result


def _final_norm_params(weights, config):
    """(w, b, eps) of the final LayerNorm; for the attn architecture (none there) RMS when the
    random weights divide h by its RMS before W_U (as pipeline.predict does), else None."""
    norm = family(config).final_norm(weights.params, config)
    if norm is None:
        return logit_lens.RMS if weights.normalizes_logits else None
    return norm


def ablation_hooks(engine, config, heads: list[tuple[int, int]],
                   means: dict[tuple[int, int], np.ndarray] | None) -> dict:
    """Hooks on `blocks.L.attn.z` that return Z with the heads zeroed (or set to their means)."""
    hooks = {}
    for layer, ablated in ablation.by_layer(heads).items():
        per_head = {h: means[layer, h] for h in ablated} if means is not None else None
        keep, fill = ablation.replacement(config.heads, config.d_head, ablated, per_head)
        keep, fill = engine.asarray(keep), engine.asarray(fill)
        hooks[f"blocks.{layer}.attn.z"] = lambda z, keep=keep, fill=fill: z * keep + fill
    return hooks


class Gather:
    """Hooks that keep, during the forward, only what the analyses need.

    At the explained position: the token and positional embeddings, each layer's Z [heads,
    d_head], MLP output and residual [d_model], and the final LayerNorm's output. The residual
    at every position only with --all-positions (the logit lens over all of them); each layer's
    head-averaged pattern [len, len] only with --rollout; for mean-ablation, each ablated
    head's Z averaged over positions [d_head]. Everything is copied off the engine in float64.
    """

    def __init__(self, engine, config, position: int, all_positions: bool = False,
                 rollout: bool = False, means: dict[int, list[int]] | None = None,
                 valid: np.ndarray | None = None, final_only: bool = False) -> None:
        # `position` is the batch position (after any --pad-to padding); `valid` [len] marks
        # the real tokens, over which mean-ablation averages.
        self.engine, self.config, self.p, self.valid = engine, config, position, valid
        self.all_positions, self.rollout, self.mean_heads = all_positions, rollout, means or {}
        self.final_only = final_only
        self.embed: np.ndarray | None = None
        self.pos_embed: np.ndarray | None = None
        self.z: dict[int, np.ndarray] = {}
        self.mlp: dict[int, np.ndarray] = {}
        self.resid: dict[int, np.ndarray] = {}
        self.final: np.ndarray | None = None  # what the unembedding reads at the position
        self.patterns: dict[int, np.ndarray] = {}
        self.means: dict[tuple[int, int], np.ndarray] = {}

    def _host(self, x) -> np.ndarray:
        # A copy: a NumPy view would keep the whole [batch, len, …] array alive.
        return np.array(self.engine.to_host(x), dtype=np.float64)

    def hooks(self) -> dict:
        c, p = self.config, self.p
        # What the unembedding reads: ln_f's output, or (attn arch, no ln_f) the last residual.
        hooks = {family(c).final_step(c): self._final}
        if self.final_only:
            return hooks
        hooks["embed"] = lambda x: setattr(self, "embed", self._host(x[0, p]))
        if c.pos != "none":
            hooks["pos_embed"] = lambda x: setattr(self, "pos_embed", self._host(x[0, p]))
        for layer in range(c.layers):
            b = f"blocks.{layer}"
            hooks[f"{b}.attn.z"] = lambda x, layer=layer: self._z(layer, x)
            if family(c).has_mlp(c):
                hooks[f"{b}.mlp.out"] = lambda x, layer=layer: self.mlp.__setitem__(
                    layer, self._host(x[0, p]))
            hooks[f"{b}.resid_post"] = lambda x, layer=layer: self._resid(layer, x)
            if self.rollout:
                hooks[f"{b}.attn.pattern"] = lambda x, layer=layer: self.patterns.__setitem__(
                    layer, self._host(self.engine.xp.mean(x[0], axis=0)))
        return hooks

    def _final(self, x) -> None:
        self.final = self._host(x[0, self.p])

    def _z(self, layer: int, z) -> None:  # z [batch, heads, len, d_head]
        self.z[layer] = self._host(z[0, :, self.p, :])
        for h in self.mean_heads.get(layer, []):
            rows = self._host(z[0, h])  # [len, d_head]
            self.means[layer, h] = (rows if self.valid is None else rows[self.valid]).mean(0)

    def _resid(self, layer: int, x) -> None:
        self.resid[layer] = self._host(x[0] if self.all_positions else x[0, self.p])
        if family(self.config).final_step(self.config) == f"blocks.{layer}.resid_post":
            self.final = self.residual(layer, self.p)

    def residual(self, layer: int, position: int) -> np.ndarray:
        r = self.resid[layer]
        return r[position] if self.all_positions else r

    def final_logits(self, W_U: np.ndarray, rms: bool = False) -> np.ndarray:
        """The model's logits [vocab] at the position: what the unembedding reads, ·W_Uᵀ
        (`rms`: divided by its RMS first, as random attention-only weights do)."""
        return logit_lens.logits_of(self.final, W_U, logit_lens.RMS if rms else None)
