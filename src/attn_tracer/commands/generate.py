"""`attn generate`: the model writes, one token at a time, with its KV cache in the open.

The order: the run session (commands/session.py: validation, input (one text), the model,
the prompt) → the prompt's length against the context → memory check → engine → weights → the
generation (model/generate.py), each token handed to the output
as soon as it is chosen: the view (live in a terminal, plain lines in a pipe), the bare text
(--quiet), one JSON line per token (--json-lines), or, at the end, one JSON document (--json)
and the --save file. Everything that can be refused is refused before the first token is
computed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from attn_tracer.commands import run as runner
from attn_tracer.commands.session import SharedOptions, open_session, progress_display
from attn_tracer.errors import UsageError
from attn_tracer.model.tokens import VOCAB

ALTERNATIVES_LIMIT = 20  # more than this is a table nobody reads in a terminal: use --json


@dataclass
class GenerateRequest:
    base: SharedOptions  # the shared input, model and engine options
    max_new_tokens: int = 20
    temperature: float | None = None  # None: greedy, as 0 is
    top_k: int | None = None
    top_p: float | None = None
    stop: str | None = None
    alternatives: int = 0
    layer: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    cost: bool = False
    quiet: bool = False
    json: bool = False
    json_lines: bool = False
    precision: int | None = None
    save: Path | None = None
    force: bool = False

    @property
    def shows_heads(self) -> bool:
        return bool(self.layer or self.head)


@dataclass
class Prompt:
    """What the run was checked against, for the outputs' headers."""

    text: str
    ids: list[int]
    config: object
    engine: object
    sampling: object
    shown: tuple[tuple[int, ...], tuple[int, ...]]


def validate(a: GenerateRequest) -> None:
    """`attn generate`'s own options (the session checks the shared ones first)."""
    if a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1; got {a.max_new_tokens}")
    if a.temperature is not None and not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise UsageError(f"--temperature must be 0 (greedy) or a positive number that divides "
                         f"the logits; got {a.temperature:g}")
    if a.top_k is not None and not 1 <= a.top_k <= VOCAB:
        raise UsageError(f"--top-k must be between 1 and the vocabulary size {VOCAB} (it keeps "
                         f"that many tokens; leave it out to keep them all); got {a.top_k}")
    if a.top_p is not None and not (math.isfinite(a.top_p) and 0 < a.top_p <= 1):
        raise UsageError(f"--top-p must be in (0, 1]: the probability mass kept; got "
                         f"{a.top_p:g}")
    if not 0 <= a.alternatives <= ALTERNATIVES_LIMIT:
        raise UsageError(f"--alternatives must be between 0 and {ALTERNATIVES_LIMIT}; got "
                         f"{a.alternatives}")
    if a.stop is not None:
        from attn_tracer.text import check_argument

        if not check_argument(a.stop, "--stop"):
            raise UsageError("--stop is empty: give the text that ends the generation")
    if a.json and a.json_lines:
        raise UsageError("--json and --json-lines are two forms of the same output; choose one")
    if a.quiet and (a.json or a.json_lines):
        raise UsageError(f"--quiet writes the bare text; {'--json' if a.json else '--json-lines'}"
                         " writes JSON: choose one")
    if a.precision is not None and not 0 <= a.precision <= 12:
        raise UsageError(f"--precision must be between 0 and 12 decimals; got {a.precision}")
    base = SharedOptions.of(a.base)
    if base.model.mask != "causal":
        raise UsageError("attn generate needs --mask causal: without it every earlier token "
                         "would see the new ones, and its cached K and V would be wrong")
    if base.input.pad_to is not None:
        raise UsageError("--pad-to pads a text for a trace; attn generate extends its one text "
                         "instead")
    if a.save is not None:
        from attn_tracer.commands.save import TENSOR_SUFFIXES, check_target

        check_target(a.save, a.force, "--save", TENSOR_SUFFIXES)


def notices(a: GenerateRequest) -> list[str]:
    """Options of this command that this run will not use (the session says the shared ones;
    --seed seeds the sampling too, so it is not unused with --weights when sampling)."""
    out = []
    if not a.temperature:
        if a.temperature == 0:
            out.append("--temperature 0 means greedy decoding: the most likely token each step")
        if a.top_k is not None or a.top_p is not None:
            out.append("--top-k and --top-p filter what sampling draws from; greedy decoding "
                       "(no --temperature, or 0) takes the most likely token anyway")
    if a.precision is not None and not (a.json or a.json_lines):
        out.append("--precision rounds the JSON numbers; add --json or --json-lines")
    if a.quiet and (a.shows_heads or a.cost or a.alternatives):
        out.append("--quiet writes only the text: --layer, --head, --cost and --alternatives "
                   "show nothing")
    return out


def seed_unused(a: GenerateRequest) -> str | None:
    if a.temperature:
        return None  # sampling uses the seed, whatever the weights
    return ("--seed seeds the sampling and the random weights; greedy decoding with --weights "
            "uses neither")


def compute_plan(a: GenerateRequest, notice: Callable[[str], None]):
    """Everything that can fail for a reason of the user's; then (plan, config, engine,
    weights, prompt)."""
    from attn_tracer.model import generate as gen
    from attn_tracer.model import memory
    from attn_tracer.model.sampling import Sampling

    options = SharedOptions.of(a.base)
    session = open_session(options, notice, check=lambda: validate(a), ignored=notices(a),
                           seed_unused=seed_unused(a))
    if len(session.texts) > 1:
        raise UsageError(f"attn generate continues one text: give one (got "
                         f"{len(session.texts)}; quote a text that has spaces)")
    config = session.config
    layers = runner.parse_selection(a.layer, config.layers, "--layer", [0]) \
        if a.shows_heads else ()
    heads = runner.parse_selection(a.head, config.heads, "--head", list(range(config.heads))) \
        if a.shows_heads else ()
    ids = [t.id for t in session.prepared.batch.inputs[0].tokens]
    room = config.n_ctx - len(ids)
    if a.max_new_tokens > room:
        limit_name = "the checkpoint's context" if config.weights else "--n-ctx"
        grow = "" if config.weights else ", or raise --n-ctx"
        raise UsageError(
            f"--max-new-tokens {a.max_new_tokens} does not fit: the prompt's {len(ids)} "
            f"token{'s' if len(ids) > 1 else ''} + {a.max_new_tokens} is more than {limit_name} "
            f"{config.n_ctx}; at most {max(room, 0)} new tokens here (shorten the prompt{grow})")
    total = len(ids) + a.max_new_tokens
    dtype = options.engine.dtype
    needed = memory.estimate(config, dtype, 1, len(ids), len(ids), len(layers), len(heads),
                             "patterns", False, predict=True)
    needed += gen.cache_bytes(config, total, dtype)
    engine = session.start(needed)
    with progress_display("drawing weights", show=session.weights is None):
        weights = session.draw_weights()
    session.notice_cuts()
    sampling = Sampling(a.temperature or 0.0, a.top_k, a.top_p, options.model.seed)
    plan = gen.Plan(ids, a.max_new_tokens, sampling, (layers, heads),
                    stop=a.stop.encode("utf-8") if a.stop is not None else None,
                    alternatives=a.alternatives)
    return plan, config, engine, weights, Prompt(session.texts[0], ids, config, engine,
                                                 sampling, (layers, heads))


def execute(a: GenerateRequest, notice: Callable[[str], None], console: Callable) -> None:
    from attn_tracer.model import generate as gen
    from attn_tracer.render import generate as view

    said: list[str] = []
    plan, config, engine, weights, prompt = compute_plan(a, said.append)
    for message in said:
        notice(message)
    cache = gen.KVCache(config, len(plan.prompt) + plan.max_new_tokens)
    steps = gen.generate(plan, config, engine, weights, cache)
    if a.json:
        out = view.Collect()
    elif a.json_lines:
        out = view.JsonLines(sys.stdout.buffer, a.precision)
    elif a.quiet:
        out = view.TextStream(sys.stdout.buffer)
    else:
        target = console()
        live = target.is_terminal
        out = (view.Live if live else view.Plain)(target, a.cost, a.alternatives, a.precision)
    generated = []
    with out.open(prompt):
        for step in steps:
            generated.append(step)
            out.step(step)
        out.end(generated)
    if a.save is not None:
        from attn_tracer.commands.save import write_tensors

        tensors, meta = view.saved(prompt, generated, cache.tensors(engine))
        write_tensors(a.save, tensors, meta)
    if a.json:
        sys.stdout.buffer.write(view.document(prompt, generated, a.precision, a.cost))
        sys.stdout.buffer.flush()
