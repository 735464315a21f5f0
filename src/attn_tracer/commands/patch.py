"""`attn patch`: activation patching, from the request to the outputs.

The order: validation (every option, before the model) → the clean text and the corruption
(a --corrupt text of the same length, or --corrupt-noise's subject) → weights → memory check →
engine → one forward of the clean and corrupted runs together (for causal tracing: the clean
run and --samples noisy copies), whose hooks keep every activation a patch reads (each layer's
input, and the --patch steps) → the baselines, refused when equal → the patched runs, batched:
every patch whose layer starts at L runs as one row of a batch that enters the stack at layer
L from the base run's cached residual (pipeline.resume), its hooks replacing the patched
activation with the source run's (analysis/patching) → the normalised grids → the view or one
JSON document, once everything has worked.

A patch that would write exactly what is already there (every position before the first one
where the two runs differ, under the causal mask) is the base run itself: its row is not run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attn_tracer.analysis import patching
from attn_tracer.commands.attribute import parse_token
from attn_tracer.commands.session import SharedOptions, open_session, progress_display
from attn_tracer.errors import AttnError, UsageError
from attn_tracer.model import memory
from attn_tracer.model.tokens import Token
from attn_tracer.model.trace import Selection, Trace

_SELECT_NOTHING = Selection((), (), "patterns")
MAX_ROWS = 256  # patched runs in one batched forward, at most (--max-memory may allow fewer)
SAMPLES = 10  # --samples by default (ROME averages 10 draws)


@dataclass
class PatchRequest:
    base: Any  # the shared input, model and engine options (SharedOptions, or their fields);
    # TEXT is the clean text
    clean: str | None = None  # --clean, the same as the TEXT argument
    corrupt: str | None = None
    corrupt_noise: str | None = None  # the subject whose embeddings get noise (causal tracing)
    target: str | None = None
    versus: str | None = None
    position: int | None = None
    metric: str | None = None  # diff by default; prob for causal tracing, as ROME
    direction: str = "denoise"
    patch: list[str] = field(default_factory=list)
    per_position: bool = False
    samples: int | None = None
    noise_scale: float = 3.0
    noise_seed: int = 0
    window: int = 1
    top: int = 10
    json: bool = False
    svg: Path | None = None
    html: Path | None = None
    width: int | None = None
    force: bool = False


@dataclass
class Grid:
    target: str
    axes: tuple[str, ...]
    values: np.ndarray  # normalised: (patched − corrupted) / (clean − corrupted)
    raw: np.ndarray  # the metric of each patched run (averaged over the samples)
    skipped: int  # cells whose patch changes nothing (no forward ran for them)
    window: int = 1


@dataclass
class Result:
    trace: Trace  # the base forward's: config, engine, inputs (no tensors)
    trained: bool
    clean_tokens: list[Token]
    corrupt_tokens: list[Token] | None  # None for causal tracing
    differ: list[int]  # positions where the runs' inputs differ (the subject, for noise)
    position: int
    target: int
    versus: int | None
    metric: str
    direction: str
    clean: float  # the metric of the clean run
    corrupted: float  # of the corrupted run (the mean over the noise samples)
    grids: list[Grid]
    cells: int  # patched runs the definition asks for (× samples)
    runs: int  # of which were run (the rest change nothing)
    forwards: int  # batched forwards that ran them
    noise: dict | None = None  # subject, positions, samples, std, scale, seed
    top: int = 10

    @property
    def layers(self) -> int:
        return self.trace.config.layers


def validate(a: PatchRequest, options: SharedOptions) -> None:
    """`attn patch`'s own options (the session checks the shared ones first)."""
    from attn_tracer.commands import output

    i, m = options.input, options.model
    if (a.corrupt is None) == (a.corrupt_noise is None):
        raise UsageError("give the corruption one way: --corrupt TEXT (the same prompt, changed) "
                         "or --corrupt-noise SUBJECT (causal tracing)")
    if i.lines is not None or len(i.texts) > 1:
        raise UsageError("attn patch compares one clean text with its corruption: give one text "
                         "(quote a text that has spaces)")
    if a.corrupt is not None and not a.corrupt.strip():
        raise UsageError("--corrupt is empty: give the corrupted prompt")
    if i.pad_to is not None:
        raise UsageError("--pad-to conflicts with attn patch: the two runs are matched position "
                         "by position, and padding adds nothing to match")
    if a.samples is not None and a.samples < 1:
        raise UsageError(f"--samples must be at least 1 (noise draws averaged); got {a.samples}")
    if not (math.isfinite(a.noise_scale) and a.noise_scale > 0):
        raise UsageError(f"--noise-scale must be a positive number (times the embeddings' "
                         f"standard deviation); got {a.noise_scale:g}")
    if not 0 <= a.noise_seed < 2**63:
        raise UsageError(f"--noise-seed must be between 0 and 2^63-1; got {a.noise_seed}")
    if a.window < 1:
        raise UsageError(f"--restore-window must be at least 1 (layers restored together); got "
                         f"{a.window}")
    if a.top < 0:
        raise UsageError(f"--top must be 0 or more; got {a.top}")
    if a.metric is not None and a.metric not in patching.METRICS:
        raise UsageError(f"--metric must be one of {', '.join(patching.METRICS)}; got "
                         f"{a.metric!r}")
    if a.direction not in patching.DIRECTIONS:
        raise UsageError(f"--direction must be denoise or noise; got {a.direction!r}")
    if a.position is not None and a.position < 0:
        raise UsageError(f"--position counts tokens from 0; got {a.position}")
    from attn_tracer.model.arch import family

    # A checkpoint is always a full block; before it is read, its family is not known yet.
    name = m.arch or ("gpt2" if m.weights is not None else "attn")
    patching.parse_targets(a.patch, family(name).full_block)
    output.check_width(a.width)
    output.check_files({flag: (getattr(a, flag[2:]), suffixes)
                        for flag, suffixes in output.VIEW_SUFFIXES.items()}, a.force)


def ignored(a: PatchRequest) -> list[str]:
    out = []
    targets = {t for v in a.patch for t in v.lower().replace(" ", "").split(",")}
    if a.per_position and "z" not in targets:
        out.append("--per-position splits the z grid by position; without --patch z it changes "
                   "nothing")
    if a.corrupt is not None:
        for flag, given in (("--samples", a.samples is not None),
                            ("--noise-scale", a.noise_scale != 3.0),
                            ("--noise-seed", a.noise_seed != 0)):
            if given:
                out.append(f"{flag} shapes --corrupt-noise's noise; with --corrupt it changes "
                           "nothing")
    if a.window != 1 and not targets & set(patching.WINDOWED) and a.patch:
        out.append("--restore-window restores consecutive layers of attn_out and mlp_out; "
                   "the --patch targets here have none")
    return out


def execute(a: PatchRequest, notice: Callable[[str], None], console: Callable) -> None:
    from attn_tracer.commands import output
    from attn_tracer.render import patch as render_patch

    said: list[str] = []
    result = compute(a, said.append, announce=notice)
    for message in said:
        notice(message)
    views = output.Views(console(), "attn patch", a.svg, a.html, a.width, on_screen=not a.json)
    screen, saved = views.render(lambda c, _: render_patch.render(result, c))
    out = render_patch.document(result) if a.json else screen.file.getvalue()
    output.emit(out, views.writers(saved))


def _difference(clean: list[Token], corrupt: list[Token]) -> str:
    """Both token lists, side by side, around where they first differ: one line."""
    first = next((i for i, (a, b) in enumerate(zip(clean, corrupt, strict=False)) if a.id != b.id),
                 min(len(clean), len(corrupt)))
    lo = max(0, first - 3)

    def shown(toks: list[Token]) -> str:
        part = "|".join(t.text for t in toks[lo:first + 6])
        return ("…|" if lo else "") + part + ("|…" if len(toks) > first + 6 else "")

    return (f"the clean text is {len(clean)} tokens and the corrupted one {len(corrupt)}: "
            f"patching matches them position by position, so they must be the same length "
            f"(they first differ at position {first}: clean {shown(clean)} · corrupted "
            f"{shown(corrupt)}; attn tokens shows how each splits)")


def compute(a: PatchRequest, notice: Callable[[str], None],
            announce: Callable[[str], None] = lambda message: None) -> Result:
    """Everything that can fail for a reason of the user's, then the forwards."""
    options = SharedOptions.of(a.base)
    if a.clean is not None:
        if options.input.texts or options.input.file is not None:
            raise UsageError("give the clean text once: --clean TEXT or the TEXT argument")
        from attn_tracer.text import check_argument

        options.input.texts = [check_argument(a.clean, "--clean")]
    session = open_session(options, notice, check=lambda: validate(a, options),
                           ignored=ignored(a))
    clean_text = session.texts[0]
    from attn_tracer.text import check_argument

    noisy = a.corrupt_noise is not None
    corrupt_text = None if noisy else check_argument(a.corrupt, "--corrupt")
    config, limit, dtype = session.config, session.limit, options.engine.dtype
    i = options.input
    from attn_tracer.model.arch import family

    targets = patching.parse_targets(a.patch, family(config).full_block)
    metric = a.metric or ("prob" if noisy else "diff")
    target = parse_token(a.target, config.vocab, "--target") if a.target is not None else None
    versus = parse_token(a.versus, config.vocab, "--versus") if a.versus is not None else None
    if target is not None and target == versus:
        raise UsageError("--versus is the same token as --target: their logit difference is 0; "
                         "give another token")
    if versus is not None and metric != "diff":
        notice(f"--versus is the other side of --metric diff; --metric {metric} reads the "
               "target alone")
    if noisy and metric == "diff" and versus is None:
        raise UsageError("--metric diff with --corrupt-noise needs --versus: the noisy runs have "
                         "no single prediction to compare against")
    from attn_tracer.model.pipeline import prepare

    samples = (a.samples or SAMPLES) if noisy else 1
    run_texts = [clean_text] * (1 + samples) if noisy else [clean_text, corrupt_text]
    prepared = prepare(run_texts, config, max_length=i.max_length,
                       allow_special=i.allow_special)
    inputs = prepared.batch.inputs
    clean_tokens = inputs[0].tokens
    corrupt_tokens = None if noisy else inputs[1].tokens
    if corrupt_tokens is not None and len(corrupt_tokens) != len(clean_tokens):
        raise UsageError(_difference(clean_tokens, corrupt_tokens))
    length = len(clean_tokens)
    if noisy:
        span = patching.subject_span([t.bytes for t in clean_tokens], clean_text,
                                     a.corrupt_noise)
        differ = list(span)
    else:
        differ = [p for p in range(length) if clean_tokens[p].id != corrupt_tokens[p].id]
        if not differ:
            raise UsageError("--corrupt tokenizes to exactly the clean text's tokens: there is "
                             "no difference to patch")
    position = length - 1 if a.position is None else a.position
    if position >= length:
        raise UsageError(f"--position {position} is out of range: the text has {length} "
                         f"token{'s' if length > 1 else ''} (positions 0 to {length - 1})")

    kv_heads = getattr(config, "kv_heads", None)
    rows_base = len(run_texts)
    cache_bytes = _cache_bytes(config, targets, rows_base, length, dtype)
    needed = memory.estimate(config, dtype, rows_base, length, length,
                             0, 0, "patterns", False, predict=True) + cache_bytes
    engine = session.start(needed)
    per_row = _row_bytes(config, targets, length, dtype, metric)
    fixed = memory.estimate(config, dtype, 1, length, length, 0, 0, "patterns", False,
                            predict=True)
    room = limit - fixed - cache_bytes
    if room < per_row:
        memory.check(fixed + cache_bytes + per_row, limit)
    max_rows = max(1, min(MAX_ROWS, room // per_row))

    from attn_tracer.model.pipeline import engine_params, resume

    weights = session.draw_weights()
    noise_info = None
    hooks: dict = {}
    if noisy:
        std = _embedding_std(weights, prepared)
        draws = patching.noise(a.noise_seed, samples, len(differ), config.d_model,
                               a.noise_scale * std)
        added = np.zeros((rows_base, length, config.d_model), np.float64)
        added[1:, differ[0]:differ[-1] + 1] = draws
        added_e = engine.asarray(added.astype(np.float32))
        hooks["embed"] = lambda x: x + added_e
        noise_info = {"subject": a.corrupt_noise, "positions": differ, "samples": samples,
                      "std": std, "scale": a.noise_scale, "seed": a.noise_seed}
    cache: dict[str, np.ndarray] = {}
    names = {patching.step("resid_pre", layer) for layer in range(config.layers)}
    names |= {patching.step(t, layer) for t in targets for layer in range(config.layers)}
    final = "ln_f" if family(config).full_block else f"blocks.{config.layers - 1}.resid_post"
    for name in names | {final}:  # never "embed": the noise hook stays as it is
        hooks[name] = _keeper(cache, name, engine)
    trace = session.forward(_SELECT_NOTHING, hooks, prepared=prepared, predict=False,
                            description=f"{rows_base} runs of {length} tokens through "
                                        f"{config.layers} layers")
    session.notice_cuts()
    if noisy:  # the noisy runs are copies of the clean text: the view and JSON show it once
        trace = dataclasses.replace(trace, inputs=trace.inputs[:1])

    W_U = weights.unembedding()
    rms = weights.normalizes_logits

    def readout(rows: np.ndarray, kind: str, tgt: int, vs: int | None) -> np.ndarray:
        h = np.asarray(rows, np.float64)
        if rms:  # random attention-only weights: h / rms(h) before W_U (pipeline.predict)
            norm = np.sqrt(np.mean(h * h, axis=-1, keepdims=True))
            h = h / np.where(norm > 0, norm, 1.0)
        cols = patching.columns(kind, tgt, vs)
        # Two columns in float64; the whole vocabulary (logprob, prob) in W_U's float32.
        logits = (h.astype(W_U.dtype) @ W_U.T if cols is None
                  else h @ W_U[cols].astype(np.float64).T)
        return patching.metric(logits, kind, tgt, vs)

    base_final = cache[final][:, position]  # [rows_base, d_model]
    if target is None or (metric == "diff" and versus is None):
        # The top token of the clean run and of the (first) corrupted run.
        tops = [int(np.argmax(_logits(base_final[i], W_U, rms))) for i in (0, 1)]
        if target is None:
            target = tops[0]
        if metric == "diff" and versus is None:
            versus = tops[1]
            if versus == target:
                raise UsageError(f"the clean and corrupted runs both predict "
                                 f"{_label(target, config)!r} at position {position}: give "
                                 "--target and --versus (the logit difference to explain), "
                                 "or --metric logit")
    if target == versus:
        raise UsageError("--versus is the clean run's top token, which is the target when "
                         "--target is not given: give --target too, or another --versus")
    base_metric = readout(base_final, metric, target, versus)  # [rows_base]
    clean_value = float(base_metric[0])
    corrupted_value = float(base_metric[1:].mean())
    what = _measure(metric, target, versus, config)
    # Equal to within the rounding of the metric itself (relative to the logits for a logit or
    # a log-probability, to itself for a probability): the normalised grid would be noise.
    scale = max(abs(clean_value), abs(corrupted_value), 0.0 if metric == "prob" else 1.0)
    if abs(clean_value - corrupted_value) <= 64 * float(np.finfo(np.float32).eps) * scale:
        raise AttnError(f"the clean and corrupted runs give the same {what} = "
                        f"{clean_value:.6g}: there is no difference for patching to explain "
                        "(choose another --target/--versus or a stronger corruption)")

    # The patched runs: one row per (cell, sample), grouped by the layer they start at.
    if a.direction == "denoise":
        base_rows, source_rows = list(range(1, rows_base)), [0] * samples
    else:
        base_rows, source_rows = [0] * samples, list(range(1, rows_base))
    plans = []  # (target, cells, values [cells, samples])
    rows: dict[int, list] = {}  # start layer → [(plan, cell index, sample, masks)]
    total = skipped_total = 0
    for t in targets:
        heads = patching.head_count(t, config.heads, kv_heads)
        cells = patching.cells(t, config.layers, heads, length, a.per_position, a.window)
        values = np.empty((len(cells), samples))
        skipped = 0
        for c, cell in enumerate(cells):
            for s in range(samples):
                b, src = base_rows[s], source_rows[s]
                total += 1
                masks = {}
                for layer in cell.layers:
                    name = patching.step(t, layer)
                    m = patching.mask(t, cell, cache[name].shape[1:])
                    if not patching.changes_nothing(m, cache[name][b], cache[name][src]):
                        masks[name] = m
                if not masks:
                    values[c, s] = base_metric[b]
                    skipped += 1
                    continue
                start = min(cell.layers)
                rows.setdefault(start, []).append((len(plans), c, b, src, masks))
        skipped_total += skipped
        plans.append((t, cells, values, skipped))

    batches = [(start, group[i:i + max_rows]) for start, group in sorted(rows.items())
               for i in range(0, len(group), max_rows)]
    ran = total - skipped_total
    announce(f"{ran} patched run{'s' if ran != 1 else ''} of {total} "
             f"({skipped_total} change nothing: the activation is the same in both runs) in "
             f"{len(batches)} batched forward{'s' if len(batches) != 1 else ''} from the "
             "patched layer on")
    params = engine_params(weights, engine)
    xp = engine.xp
    resid_name = {layer: patching.step("resid_pre", layer) for layer in range(config.layers)}
    with progress_display(f"patching: {len(batches)} forwards") as advance:
        for done, (start, group) in enumerate(batches, 1):
            n = len(group)
            b_idx = np.array([g[2] for g in group])
            s_idx = np.array([g[3] for g in group])
            names_here = sorted({name for g in group for name in g[4]})
            hooks = {}
            x = cache[resid_name[start]][b_idx]
            for name in names_here:
                m = np.zeros((n, *cache[name].shape[1:]), bool)
                for i, g in enumerate(group):
                    if name in g[4]:
                        m[i] = np.broadcast_to(g[4][name], m.shape[1:])
                source = cache[name][s_idx]
                if name == resid_name[start]:  # the layer's input itself: patched before it
                    x = np.where(m, source, x)
                    continue
                m_e, source_e = engine.asarray(m), engine.asarray(source)
                hooks[name] = lambda y, m_e=m_e, source_e=source_e: xp.where(m_e, source_e, y)
            out = resume(engine.asarray(x), start, config, engine, params,
                         np.ones((n, length), bool), hooks)
            finals = np.asarray(engine.to_host(out[:, position]), np.float64)
            got = readout(finals, metric, target, versus)
            if not np.all(np.isfinite(got)):
                raise AttnError("a patched run's activations stop being finite (a value "
                                "overflowed): try --dtype float64")
            for i, g in enumerate(group):
                plan, c = plans[g[0]], g[1]
                sample = base_rows.index(g[2]) if a.direction == "denoise" \
                    else source_rows.index(g[3])
                plan[2][c, sample] = got[i]
            advance(done, len(batches))

    grids = []
    for t, cells, values, skipped in plans:
        heads = patching.head_count(t, config.heads, kv_heads)
        shape = ((config.layers, length) if t in patching.BY_POSITION
                 else (config.layers, heads, length) if t == "z" and a.per_position
                 else (config.layers, heads))
        raw = np.empty(shape)
        for cell, v in zip(cells, values.mean(axis=1), strict=True):
            raw[cell.index] = v
        kv = kv_heads is not None and kv_heads != config.heads
        grids.append(Grid(t, patching.axes(t, a.per_position, kv),
                          patching.normalise(raw, clean_value, corrupted_value), raw, skipped,
                          a.window if t in patching.WINDOWED else 1))
    return Result(trace, weights.trained, clean_tokens, corrupt_tokens, differ, position,
                  target, versus, metric, a.direction, clean_value, corrupted_value, grids,
                  total, ran, len(batches), noise_info, a.top)


def _keeper(cache: dict, name: str, engine):
    def keep(x):
        cache[name] = np.array(engine.to_host(x))  # a copy: the forward goes on with x
        return None

    return keep


def _logits(row: np.ndarray, W_U: np.ndarray, rms: bool) -> np.ndarray:
    h = np.asarray(row, np.float64)
    if rms:
        norm = np.sqrt(np.mean(h * h))
        h = h / (norm if norm > 0 else 1.0)
    return h.astype(W_U.dtype) @ W_U.T


def _embedding_std(weights, prepared) -> float:
    """The standard deviation of the token embeddings: of the whole W_E of a checkpoint, or,
    for random weights (which never draw the whole table), of the text's own rows."""
    if "wte" in weights.params:
        return float(np.std(weights.params["wte"], dtype=np.float64))
    return float(np.std(weights.token_rows(prepared.batch.ids[:1]), dtype=np.float64))


def _cache_bytes(config, targets: list[str], rows: int, length: int, dtype: str) -> int:
    """What the base forward's hooks keep, on the host: each layer's input and every --patch
    step, for every run."""
    size = max(4, memory.BYTES[dtype])
    per_layer = length * config.d_model  # the layer's input
    for t in targets:
        if t == "pattern":
            per_layer += config.heads * length * length
        elif t in patching.BY_POSITION:
            per_layer += 0 if t == "resid_pre" else length * config.d_model
        else:
            per_layer += length * config.d_attn
    return rows * (config.layers * per_layer + length * config.d_model) * size


def _row_bytes(config, targets: list[str], length: int, dtype: str, metric: str) -> int:
    """One more row of a batched patched forward: its activations, plus the source rows and
    masks its hooks hold, plus its logits (all of the vocabulary for logprob and prob)."""
    one = memory.estimate(config, dtype, 1, length, length, 0, 0, "patterns", False)
    two = memory.estimate(config, dtype, 2, length, length, 0, 0, "patterns", False)
    size = max(4, memory.BYTES[dtype])
    hooked = 2 * _cache_bytes(config, targets, 1, length, dtype) // max(1, config.layers)
    logits = (config.vocab if metric in ("logprob", "prob") else 2) * 8
    return (two - one) + hooked + length * config.d_model * size + logits


def _label(token_id: int, config) -> str:
    from attn_tracer.model import tokenizer as tokenizers

    return tokenizers.of(config).label(token_id)


def _measure(metric: str, target: int, versus: int | None, config) -> str:
    t = _label(target, config)
    v = _label(versus, config) if versus is not None else "?"
    return {"diff": f"logit({t}) − logit({v})",
            "logit": f"logit({t})", "logprob": f"log p({t})", "prob": f"p({t})"}[metric]
