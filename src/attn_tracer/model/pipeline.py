"""The order of things, written down once:

    text → tokens → batch (pad, mask) → embeddings → layers → (predictions) → Trace

Renderers (terminal, JSON, files) take the Trace from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from attn_tracer.errors import AttnError, UsageError
from attn_tracer.model import embeddings, layers, memory, tokens
from attn_tracer.model import tokenizer as tokenizers
from attn_tracer.model.arch import family
from attn_tracer.model.config import Config
from attn_tracer.model.engine import Engine, namespace
from attn_tracer.model.trace import Hook, Input, Prediction, Recorder, Selection, Trace
from attn_tracer.model.weights import Weights

# GPT-2 has no pad token; its <|endoftext|> is the usual stand-in. A checkpoint's tokenizer
# says its own (tokenizer.Tokenizer.pad_id).
PAD_ID = tokens.ENDOFTEXT_ID


@dataclass(frozen=True)
class Batch:
    inputs: list[Input]
    ids: np.ndarray  # [batch, len]
    valid: np.ndarray  # [batch, len] True at real tokens
    positions: np.ndarray  # [batch, len]


def make_batch(token_lists: list[list[tokens.Token]], texts: list[str], side: str,
               truncated: list[int | Callable[[], int]] | None = None, pad_to: int | None = None,
               pad_id: int = PAD_ID) -> Batch:
    """Pad every row to the longest (or to `pad_to`) with the pad token (GPT-2: <|endoftext|>;
    see `pad_id`); positions count real tokens only."""
    length = max(max(len(t) for t in token_lists), pad_to or 0)
    truncated = truncated or [0] * len(texts)
    inputs = [Input(text, toks, len(toks), length - len(toks), side, cut)
              for text, toks, cut in zip(texts, token_lists, truncated, strict=True)]
    ids = np.full((len(inputs), length), pad_id, np.int64)
    for row, inp in zip(ids, inputs, strict=True):
        row[inp.valid] = [t.id for t in inp.tokens]
    valid = np.stack([inp.valid for inp in inputs])
    # With left padding a row's first real token is still position 0, so a text's result does
    # not depend on what else is in its batch.
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    return Batch(inputs, ids, valid, positions)


def self_mask(config: Config, valid: np.ndarray) -> np.ndarray | None:
    """allowed [batch, 1, len, len]: causal, no pad keys, and nothing for a pad query."""
    allowed = valid[:, None, :, None] & valid[:, None, None, :]
    if config.mask == "causal":
        allowed = allowed & causal_mask(valid.shape[1], config.window)
    return None if allowed.all() else allowed


def causal_mask(length: int, window: int | None = None) -> np.ndarray:
    """[len, len] True where query q may see key k: k ≤ q, and with a sliding window of W
    also q − k < W (the last W keys, itself included, as transformers' sliding_window). Real
    tokens are contiguous in a row (padding is at one end), so the distance between two of
    them in the batch is the distance between their positions."""
    q, k = np.arange(length)[:, None], np.arange(length)[None, :]
    return (k <= q) & (q - k < window) if window is not None else k <= q


def cross_mask(valid_q: np.ndarray, valid_k: np.ndarray) -> np.ndarray | None:
    allowed = valid_q[:, None, :, None] & valid_k[:, None, None, :]
    return None if allowed.all() else allowed


@dataclass(frozen=True)
class Prepared:
    batch: Batch
    cross: Batch | None  # the cross-attention texts, one row per batch row

    @property
    def cut(self) -> list[int]:
        """Rows that --max-length cut."""
        return [b for b, inp in enumerate(self.batch.inputs) if inp.cut_off]

    @property
    def cross_cut(self) -> list[int]:
        return [b for b, inp in enumerate(self.cross.inputs) if inp.cut_off] if self.cross else []


def prepare(texts: list[str], config: Config, *, cross_texts: list[str] | None = None,
            padding: str = "right", max_length: int | None = None,
            allow_special: bool = False, pad_to: int | None = None, bos: bool = False,
            ids: list[list[int]] | None = None,
            tokenizer: tokenizers.Tokenizer | None = None) -> Prepared:
    """Tokenize, cut and pad the texts (and the cross texts) into batches.

    `pad_to`: every text is padded to exactly this many tokens, as a model with a fixed input
    length does (the notes' [4, 16, 768]); a longer text is refused. The cross texts are
    padded only to their longest.
    `bos`: put the tokenizer's BOS before each text (GPT-2's <|endoftext|>, as GPT-2 saw it in
    training: documents were separated by it), unless the tokenizer puts it there itself; it is
    a real token, counted in the length, not cut by --max-length. So are the tokens a
    checkpoint's tokenizer puts around every text (Llama's <s>).
    `ids`: the token ids of each text, given instead of being read off the texts (--ids): taken
    as they are, with only --bos's token added.
    `tokenizer`: the run's (tokenizer.of(config) by default).
    """
    tok = tokenizer or tokenizers.of(config)
    before = [tok.added(i) for i in tok.prefix] if ids is None else []
    after = [tok.added(i) for i in tok.suffix] if ids is None else []
    if bos:
        if tok.bos_id is None:
            raise UsageError(f"--bos: {tok.describe()} names no BOS token (config.json's "
                             "bos_token_id)")
        if not tok.prefix or tok.prefix[0] != tok.bos_id:
            before = [tok.added(tok.bos_id), *before]
    if ids is None:
        token_lists, cut = tokenize_all(texts, allow_special, max_length, config, "text",
                                        reserve=len(before) + len(after), tokenizer=tok)
    else:
        token_lists, cut = given_ids(ids, max_length, config, reserve=len(before))
        texts = [ids_text(t) for t in token_lists]
    if before or after:
        _check_vocab([t.id for t in [*before, *after]], config, tok)
        token_lists = [[*before, *t, *after] for t in token_lists]
    if pad_to is not None:
        if pad_to > config.n_ctx:
            limit = "the checkpoint's context" if config.weights else "--n-ctx"
            raise UsageError(f"--pad-to {pad_to} is more than {limit} {config.n_ctx}")
        for i, toks in enumerate(token_lists):
            if len(toks) > pad_to:
                where = f"text {i}" if len(token_lists) > 1 else "the text"
                raise UsageError(f"{where} has {len(toks)} tokens, more than --pad-to {pad_to}; "
                                 f"cut it with --max-length {pad_to} or raise --pad-to")
    batch = make_batch(token_lists, texts, padding, cut, pad_to, pad_id(config, tok))
    cross = None
    if cross_texts:
        cross_lists, cross_cut = tokenize_all(cross_texts, allow_special, max_length, config,
                                              "--cross text", tokenizer=tok)
        if len(cross_lists) != len(token_lists):
            if len(cross_lists) != 1:
                raise UsageError(
                    f"give one --cross text for the whole batch, or one per batch row "
                    f"({len(token_lists)}); got {len(cross_lists)}")
            rows = len(token_lists)  # one cross text serves every row
            cross_lists, cross_texts, cross_cut = (cross_lists * rows, cross_texts * rows,
                                                   cross_cut * rows)
        cross = make_batch(cross_lists, cross_texts, padding, cross_cut, pad_id=tok.pad_id)
    return Prepared(batch, cross)


def pad_id(config: Config, tokenizer: tokenizers.Tokenizer | None = None) -> int:
    """The id that fills pad positions (masked everywhere: any row of W_E does): the tokenizer's
    (GPT-2's <|endoftext|>), or 0 in a vocabulary too small to have it."""
    pad = (tokenizer or tokenizers.of(config)).pad_id
    return pad if pad < config.vocab else 0


def run(
    texts: list[str],
    config: Config,
    engine: Engine,
    weights: Weights,
    selection: Selection,
    *,
    cross_texts: list[str] | None = None,
    padding: str = "right",
    max_length: int | None = None,
    allow_special: bool = False,
    predict_top_k: int | None = None,
    temperature: float = 1.0,
    max_memory: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    prepared: Prepared | None = None,
    hooks: dict[str, Hook] | None = None,
    pad_to: int | None = None,
) -> tuple[Trace, list[int]]:
    """Trace `texts` through the stack. Returns the trace and the rows cut by --max-length.

    `prepared` is what `prepare` made of the same texts, when the caller has it already.
    `max_memory`: refuse, before any work, a run estimated above this many bytes (the command
    line checks its limit itself, earlier, before drawing weights).
    `progress(done, total)` is called after each layer (for a progress display).
    `hooks`: step name → function of that step's array (see Recorder), for the analyses.

    The activations must stay finite (JSON has no NaN, and a NaN pattern is no distribution):
    the first step where one does not ends the run with an AttnError that names it. NumPy's
    overflow warnings are silenced for the same reason: the check says it once, in one line.
    """
    with np.errstate(all="ignore"):
        return _run(texts, config, engine, weights, selection, cross_texts=cross_texts,
                    padding=padding, max_length=max_length, allow_special=allow_special,
                    predict_top_k=predict_top_k, temperature=temperature,
                    max_memory=max_memory, progress=progress, prepared=prepared, hooks=hooks,
                    pad_to=pad_to)


def _run(texts, config, engine, weights, selection, *, cross_texts, padding, max_length,
         allow_special, predict_top_k, temperature, max_memory, progress, prepared, hooks,
         pad_to):
    if prepared is None:
        prepared = prepare(texts, config, cross_texts=cross_texts, padding=padding,
                           max_length=max_length, allow_special=allow_special, pad_to=pad_to)
    batch, cross = prepared.batch, prepared.cross
    arch = family(config)
    if max_memory is not None:
        length = batch.ids.shape[1]
        k_len = cross.ids.shape[1] if cross else length
        memory.check(memory.estimate(config, engine.dtype, len(texts), length, k_len,
                                     len(selection.layers), len(selection.heads),
                                     selection.capture, cross is not None,
                                     predict=bool(predict_top_k)), max_memory)

    # Embedding tables stay on the host: only the rows of this text are looked up and sent.
    p = {name: engine.asarray(w) for name, w in weights.params.items()
         if name not in ("wte", "wpe", "lm_head")}
    rec = Recorder(selection, engine, hooks)
    allowed = _on(engine, self_mask(config, batch.valid))
    # One text, causal, no padding: the mask is the plain triangle a fused kernel can skip.
    causal = config.mask == "causal" and bool(batch.valid.all()) and (
        config.window is None or config.window >= batch.valid.shape[1])
    # Rotary positions: each position's angles, once for every layer (positions count real
    # tokens, so a left-padded text turns as it would alone).
    rotary = (tuple(engine.asarray(a) for a in layers.rotary_angles(batch.positions, config))
              if config.pos == "rotary" else None)
    cross_allowed = _on(engine, cross_mask(batch.valid, cross.valid)) if cross else None
    done = {"layers": 0, "ln_f": False, "logits": False}  # what `replay` must run again

    def embed(rec, b: Batch, prefix=""):
        return embeddings.embed(b.ids, b.positions, config, weights, engine, rec, prefix,
                                padded=not b.valid.all())

    def ln_f(rec, x):
        return arch.final(x, p, config, rec)

    def replay(watch):
        """Everything run so far, again, through `watch`, which stops at the first bad step."""
        x, x_cross = embed(watch, batch), embed(watch, cross, "cross.") if cross else None
        for layer in range(done["layers"]):
            x = arch.block(x, p, config, allowed, watch, layer, engine, x_cross,
                           cross_allowed, causal, rotary)
        if done["ln_f"]:
            x = ln_f(watch, x)
        if done["logits"]:
            watch("logits", "", _logits(x, batch, weights, engine)[0], ("batch", "vocab"))

    guard = _Finite(rec, config, engine, replay)
    x = guard(embed(rec, batch))
    x_cross = guard(embed(rec, cross, "cross.")) if cross else None
    for layer in range(config.layers):
        x = arch.block(x, p, config, allowed, rec, layer, engine, x_cross, cross_allowed,
                       causal, rotary)
        rec.flush()
        done["layers"] = layer + 1
        x = guard(x)
        if progress is not None:
            progress(layer + 1, config.layers)
    if arch.full_block:
        done["ln_f"] = True
        x = guard(ln_f(rec, x))
    predictions = None
    if predict_top_k:
        done["logits"] = True
        predictions = predict(x, batch, weights, engine, rec, predict_top_k, temperature, guard)
    rec.flush()
    trace = Trace(
        config=config,
        engine={"engine": engine.name, "device": engine.device, "dtype": engine.dtype},
        inputs=batch.inputs,
        steps=rec.steps,
        tensors=rec.tensors,
        selection=selection,
        cross=cross.inputs if cross else None,
        predictions=predictions,
        temperature=temperature,
    )
    return trace, prepared.cut


def given_ids(ids: list[list[int]], max_length: int | None, config: Config, reserve: int = 0):
    """Token lists of --ids (cut to --max-length), and how many ids each cut."""
    n_ctx = config.n_ctx - reserve
    token_lists, cut = [], []
    for i, row in enumerate(ids):
        kept = row[:max_length] if max_length is not None else row
        if len(kept) > n_ctx:
            limit = (f"the checkpoint's context of {config.n_ctx}" if config.weights
                     else f"--n-ctx {config.n_ctx}")
            raise UsageError(f"--ids {i} has {len(kept)} tokens, more than {limit}; cut it with "
                             f"--max-length {n_ctx}")
        token_lists.append([tokens.id_token(t) for t in kept])
        cut.append(len(row) - len(kept))
    return token_lists, cut


def ids_text(toks: list[tokens.Token]) -> str:
    """The text of tokens given by id: GPT-2's bytes decoded where every id is GPT-2's, else
    the labels (`<id N>`) separated by spaces."""
    if all(t.bytes for t in toks):
        return b"".join(t.bytes for t in toks).decode("utf-8", errors="replace")
    return " ".join(t.text for t in toks)


def tokenize_all(texts, allow_special, max_length, config: Config, what, reserve: int = 0,
                 tokenizer: tokenizers.Tokenizer | None = None):
    """Token lists of `texts`, and for each how many tokens --max-length cut (a count, or how
    to count them: see Input.cut_off).

    Only as much of a text is tokenized as can be used: --max-length tokens, or one more than
    the context when there is no --max-length (a longer text is refused either way). A text of
    megabytes costs what its first tokens cost.
    `reserve`: positions of the context taken by tokens put around each text (--bos, or what
    the tokenizer adds).
    """
    tok = tokenizer or tokenizers.of(config)
    n_ctx = config.n_ctx - reserve
    # A checkpoint's context is fixed by its position table; only random weights can grow it.
    added = (" less the --bos token" if reserve == 1 and not tok.prefix and not tok.suffix
             else f" less the {plural_tokens(reserve)} the tokenizer adds" if reserve else "")
    limit = (f"the checkpoint's context of {config.n_ctx}" if config.weights
             else f"--n-ctx {config.n_ctx}") + added
    grow = "" if config.weights else " or raise --n-ctx"
    keep = max_length if max_length is not None else n_ctx + 1
    token_lists, cut = [], []
    for i, text in enumerate(texts):
        ids, total = tok.encode_head(text, keep, allow_special=allow_special)
        if not ids:
            raise UsageError(f"{what} {i} is empty: there is nothing to attend to")
        if max_length is None or (total is not None and total <= max_length):
            cut.append(0)
        elif total is not None:
            cut.append(total - max_length)
        else:
            cut.append(lambda text=text: tok.count(text, allow_special=allow_special)
                       - max_length)
        if len(ids) > n_ctx:
            # The whole text's count when it was all tokenized; the cut one with --max-length.
            many = len(ids) if max_length is not None else total
            raise UsageError(
                (f"{what} {i} has {many} tokens, more than {limit}" if many is not None
                 else f"{what} {i} has more tokens than {limit}")
                + f"; cut it with --max-length {n_ctx}{grow}"
            )
        _check_vocab(ids, config, tok)
        token_lists.append([tok.token(t) for t in ids])
    return token_lists, cut


def _check_vocab(ids: list[int], config: Config, tok: tokenizers.Tokenizer) -> None:
    if ids and config.weights and (top := max(ids)) >= config.vocab:
        raise AttnError(f"{tok.describe()} gives token id {top}, past the checkpoint's "
                        f"vocabulary of {config.vocab}: the tokenizer is not this model's")


def plural_tokens(n: int) -> str:
    return f"{n} token{'' if n == 1 else 's'}"


def predict(x, batch: Batch, weights: Weights, engine: Engine, rec, top_k: int,
            temperature: float, guard: _Finite | None = None) -> list[Prediction]:
    """logits = h·W_Eᵀ (or h·W_U, an untied head) at the last real position of each row;
    softmax(logits / T)."""
    xp = engine.xp
    values, last = _logits(x, batch, weights, engine)
    op = ("logits = h·W_Eᵀ (at the last real position; W_U = W_E, tied)" if weights.tied
          else "logits = (h / rms(h))·W_Uᵀ (at the last real position; random W_U, untied)"
          if weights.normalizes_logits
          else "logits = h·W_Uᵀ (at the last real position; random W_U, untied)"
          if "wte" not in weights.params
          else "logits = h·W_U (at the last real position; lm_head, untied)")
    logits = rec("logits", op, values, ("batch", "vocab"))
    if guard is not None:
        guard(logits)
    # Shifted by the row's max first (softmax does not change): a tiny T (even one that is 0 in
    # float32) then sends the other logits to −∞, probability 0, instead of the row to NaN.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        shifted = logits - xp.max(logits, axis=-1, keepdims=True)  # ≤ 0; 0 at the max
        scaled = xp.where(shifted == 0, xp.zeros_like(shifted), shifted / temperature)
    probs = rec("probs", f"softmax(logits / T), T = {temperature:g}",
                layers.softmax(scaled), ("batch", "vocab"))
    # Both are only [batch, vocab]: keep them whatever the selection captures, so every logit,
    # not just the top k, can be read off the trace.
    logits, probs = rec.keep("logits", logits).astype(np.float64), rec.keep("probs", probs)
    out = []
    tok = tokenizers.of(weights.config)
    for b in range(logits.shape[0]):
        top = np.argsort(-logits[b], kind="stable")[:top_k]
        out.append(Prediction(b, int(last[b]), [
            {"id": int(t), "text": tok.label(int(t)), "prob": float(probs[b, t]),
             "logit": float(logits[b, t])} for t in top]))
    return out


def _logits(x, batch: Batch, weights: Weights, engine: Engine):
    """(h·W_Eᵀ or h·W_U at the last real position of each row [batch, vocab], those positions)."""
    xp = engine.xp
    last = batch.valid.shape[1] - 1 - np.argmax(batch.valid[:, ::-1], axis=1)
    index = engine.asarray(last)
    rows = xp.stack([x[b, index[b], :] for b in range(x.shape[0])])
    W = engine.asarray(weights.unembedding())  # [vocab, d_model]: W_E, or lm_head = W_Uᵀ
    if weights.normalizes_logits:  # random weights: logits N(0, 3²), see Weights.unembedding
        rms = xp.sqrt(xp.mean(rows * rows, axis=-1, keepdims=True))
        rows = rows / xp.where(rms > 0, rms, xp.ones_like(rms))
    return rows @ xp.matrix_transpose(W), last


class _NotFinite(Exception):
    def __init__(self, step: str) -> None:
        self.step = step


class _Watch:
    """A recorder for running the stack again: it keeps nothing and stops at the first step
    whose tensor is not finite, so the error can name where the values broke."""

    def __init__(self, selection: Selection, hooks: dict[str, Hook]) -> None:
        self.selection = selection
        self.hooks = hooks  # the run's own (an ablation changes the forward): replayed too

    def __call__(self, name: str, op: str, x, dims, *, all_heads=None):
        if (hook := self.hooks.get(name)) is not None and (replaced := hook(x)) is not None:
            x = replaced
        if not finite(x, masked=name.endswith(".masked")):
            raise _NotFinite(name)
        return x

    def keeps(self, name: str) -> bool:
        return False

    def needs(self, name: str) -> bool:
        return name in self.hooks

    def flush(self) -> None:
        pass


class _Finite:
    """Checks each stage's output (and every tensor kept since the last check) for inf and NaN.

    The check costs one pass over the residual stream per layer. Only when it fails is the
    whole stack run again from its input, step by step, to name the first step anywhere whose
    values were not finite: an overflow can first happen where it is not seen (Q·Kᵀ of a key
    the mask then hides) and break the run only layers later. A non-finite value that vanishes
    entirely, never reaching a kept tensor or the residual stream, changes nothing shown.
    """

    def __init__(self, rec: Recorder, config: Config, engine: Engine,
                 replay: Callable[[_Watch], None]) -> None:
        self.rec, self.config, self.engine, self.replay = rec, config, engine, replay

    def __call__(self, x):
        kept = self.rec.take_fresh()
        bad = [n for n in kept if not finite(self.rec.tensors[n], masked=n.endswith(".masked"))]
        if finite(x) and not bad:
            return x
        # Every step as the formula writes it (torch's fused kernel for unseen heads never
        # forms Q·Kᵀ, where an overflow usually starts), or, if that much does not fit, the
        # steps the run itself took.
        shown = self.rec.selection
        explicit = Selection(tuple(range(self.config.layers)), tuple(range(self.config.heads)),
                             "all")
        for selection in (explicit, shown):
            try:
                self.replay(_Watch(selection, self.rec.hooks))
            except _NotFinite as e:
                raise self.error(e.step) from None
            except MemoryError:
                continue
            except Exception as e:
                if type(e).__name__ != "OutOfMemoryError":  # torch's, on a GPU
                    raise
        raise self.error(bad[0] if bad else kept[-1] if kept else "the output")

    def error(self, step: str) -> AttnError:
        dtype = self.engine.dtype
        top = float(np.finfo(np.float32 if dtype == "bfloat16" else dtype).max)
        if self.config.weights:
            fix = "the checkpoint's weights are too large for this text"
        else:
            fix = (f"a stack of {self.config.layers} random layers grows past that: use fewer "
                   "--layers")
        if dtype != "float64":
            fix += " or --dtype float64"
        return AttnError(f"the activations stop being finite at step {step}: a value overflowed "
                         f"{dtype}'s range (±{top:.3g}) into inf or NaN, which no output can "
                         f"show; {fix}")


def finite(x, masked: bool = False) -> bool:
    """Whether a step's tensor holds only finite numbers (a masked score may be −∞)."""
    xp = namespace(x)
    if not xp.isdtype(x.dtype, "real floating"):
        return True
    if masked:
        return not bool(xp.any(xp.isnan(x) | (x == math.inf)))
    return bool(xp.all(xp.isfinite(x)))


def _on(engine: Engine, allowed: np.ndarray | None):
    return None if allowed is None else engine.asarray(allowed)
