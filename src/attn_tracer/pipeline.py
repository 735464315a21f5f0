"""The order of things, written down once:

    text → tokens → batch (pad, mask) → embeddings → layers → (predictions) → Trace

Renderers (terminal, JSON, files) take the Trace from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from attn_tracer import embeddings, layers, memory, tokens
from attn_tracer.config import Config
from attn_tracer.engine import Engine
from attn_tracer.errors import UsageError
from attn_tracer.trace import Hook, Input, Prediction, Recorder, Selection, Trace
from attn_tracer.weights import Weights

PAD_ID = tokens.ENDOFTEXT_ID  # GPT-2 has no pad token; its <|endoftext|> is the usual stand-in


@dataclass(frozen=True)
class Batch:
    inputs: list[Input]
    ids: np.ndarray  # [batch, len]
    valid: np.ndarray  # [batch, len] True at real tokens
    positions: np.ndarray  # [batch, len]


def make_batch(token_lists: list[list[tokens.Token]], texts: list[str], side: str,
               truncated: list[int] | None = None) -> Batch:
    """Pad every row to the longest with <|endoftext|>; positions count real tokens only."""
    length = max(len(t) for t in token_lists)
    truncated = truncated or [0] * len(texts)
    inputs = [Input(text, toks, len(toks), length - len(toks), side, cut)
              for text, toks, cut in zip(texts, token_lists, truncated, strict=True)]
    ids = np.full((len(inputs), length), PAD_ID, np.int64)
    for row, inp in zip(ids, inputs, strict=True):
        row[inp.valid] = [t.id for t in inp.tokens]
    valid = np.stack([inp.valid for inp in inputs])
    # With left padding a row's first real token is still position 0, so a text's result does
    # not depend on what else is in its batch.
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    return Batch(inputs, ids, valid, positions)


def self_mask(config: Config, valid: np.ndarray) -> np.ndarray | None:
    """allowed [batch, 1, len, len]: causal, no pad keys, and nothing for a pad query."""
    length = valid.shape[1]
    allowed = valid[:, None, :, None] & valid[:, None, None, :]
    if config.mask == "causal":
        allowed = allowed & np.tril(np.ones((length, length), bool))
    return None if allowed.all() else allowed


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
        return [b for b, inp in enumerate(self.batch.inputs) if inp.truncated]

    @property
    def cross_cut(self) -> list[int]:
        return [b for b, inp in enumerate(self.cross.inputs) if inp.truncated] if self.cross else []


def prepare(texts: list[str], config: Config, *, cross_texts: list[str] | None = None,
            padding: str = "right", max_length: int | None = None,
            allow_special: bool = False, bos: bool = False) -> Prepared:
    """Tokenize, cut and pad the texts (and the cross texts) into batches.

    `bos`: put <|endoftext|> before each text, as GPT-2 saw it in training (documents were
    separated by it); it is a real token, counted in the length, not cut by --max-length.
    """
    token_lists, cut = tokenize_all(texts, allow_special, max_length, config, "text",
                                    reserve=int(bos))
    if bos:
        token_lists = [[tokens.token(tokens.ENDOFTEXT_ID), *t] for t in token_lists]
    batch = make_batch(token_lists, texts, padding, cut)
    cross = None
    if cross_texts:
        cross_lists, cross_cut = tokenize_all(cross_texts, allow_special, max_length, config,
                                              "--cross text")
        if len(cross_lists) != len(token_lists):
            if len(cross_lists) != 1:
                raise UsageError(
                    f"give one --cross text for the whole batch, or one per batch row "
                    f"({len(token_lists)}); got {len(cross_lists)}")
            rows = len(token_lists)  # one cross text serves every row
            cross_lists, cross_texts, cross_cut = (cross_lists * rows, cross_texts * rows,
                                                   cross_cut * rows)
        cross = make_batch(cross_lists, cross_texts, padding, cross_cut)
    return Prepared(batch, cross)


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
) -> tuple[Trace, list[int]]:
    """Trace `texts` through the stack. Returns the trace and the rows cut by --max-length.

    `prepared` is what `prepare` made of the same texts, when the caller has it already.
    `max_memory`: refuse, before any work, a run estimated above this many bytes (the command
    line checks its limit itself, earlier, before drawing weights).
    `progress(done, total)` is called after each layer (for a progress display).
    `hooks`: step name → function of that step's array (see Recorder), for the analyses.
    """
    if prepared is None:
        prepared = prepare(texts, config, cross_texts=cross_texts, padding=padding,
                           max_length=max_length, allow_special=allow_special)
    batch, cross = prepared.batch, prepared.cross
    if max_memory is not None:
        length = batch.ids.shape[1]
        k_len = cross.ids.shape[1] if cross else length
        memory.check(memory.estimate(config, engine.dtype, len(texts), length, k_len,
                                     len(selection.layers), len(selection.heads),
                                     selection.capture, cross is not None,
                                     predict=bool(predict_top_k)), max_memory)

    # Embedding tables stay on the host: only the rows of this text are looked up and sent.
    p = {name: engine.asarray(w) for name, w in weights.params.items()
         if name not in ("wte", "wpe")}
    rec = Recorder(selection, engine, hooks)
    x = embeddings.embed(batch.ids, batch.positions, config, weights, engine, rec,
                         padded=not batch.valid.all())
    x_cross = (embeddings.embed(cross.ids, cross.positions, config, weights, engine, rec,
                                "cross.", padded=not cross.valid.all()) if cross else None)
    allowed = _on(engine, self_mask(config, batch.valid))
    # One text, causal, no padding: the mask is the plain triangle a fused kernel can skip.
    causal = config.mask == "causal" and bool(batch.valid.all())
    cross_allowed = _on(engine, cross_mask(batch.valid, cross.valid)) if cross else None
    for layer in range(config.layers):
        x = layers.block(x, p, config, allowed, rec, layer, engine, x_cross, cross_allowed,
                         causal)
        rec.flush()
        if progress is not None:
            progress(layer + 1, config.layers)
    if config.arch == "gpt2":
        x = rec("ln_f", "LayerNorm(X)",
                layers.layer_norm(x, p["ln_f.w"], p["ln_f.b"], config.ln_eps),
                ("batch", "len", "d_model"))
    predictions = None
    if predict_top_k:
        predictions = predict(x, batch, weights, engine, rec, predict_top_k, temperature)
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


def tokenize_all(texts, allow_special, max_length, config: Config, what, reserve: int = 0):
    """Token lists of `texts`, and for each how many tokens --max-length cut.

    `reserve`: positions of the context taken by tokens put before each text (--bos).
    """
    n_ctx = config.n_ctx - reserve
    # A checkpoint's context is fixed by its position table; only random weights can grow it.
    limit = (f"the checkpoint's context of {config.n_ctx}" if config.weights
             else f"--n-ctx {config.n_ctx}") + (" less the --bos token" if reserve else "")
    grow = "" if config.weights else " or raise --n-ctx"
    token_lists, cut = [], []
    for i, text in enumerate(texts):
        toks = tokens.tokenize(text, allow_special=allow_special)
        if not toks:
            raise UsageError(f"{what} {i} is empty: there is nothing to attend to")
        cut.append(max(0, len(toks) - max_length) if max_length is not None else 0)
        if cut[-1]:
            toks = toks[:max_length]
        if len(toks) > n_ctx:
            raise UsageError(
                f"{what} {i} has {len(toks)} tokens, more than {limit}; "
                f"cut it with --max-length {n_ctx}{grow}"
            )
        token_lists.append(toks)
    return token_lists, cut


def predict(x, batch: Batch, weights: Weights, engine: Engine, rec, top_k: int,
            temperature: float) -> list[Prediction]:
    """logits = h·W_Eᵀ at the last real position of each row; softmax(logits / T)."""
    xp = engine.xp
    last = batch.valid.shape[1] - 1 - np.argmax(batch.valid[:, ::-1], axis=1)
    index = engine.asarray(last)
    rows = xp.stack([x[b, index[b], :] for b in range(x.shape[0])])
    W_E = engine.asarray(weights.unembedding())
    logits = rec("logits", "logits = h·W_Eᵀ (at the last real position)",
                 rows @ xp.matrix_transpose(W_E), ("batch", "vocab"))
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
    for b in range(logits.shape[0]):
        top = np.argsort(-logits[b], kind="stable")[:top_k]
        out.append(Prediction(b, int(last[b]), [
            {"id": int(t), "text": _label(int(t)), "prob": float(probs[b, t]),
             "logit": float(logits[b, t])} for t in top]))
    return out


def _label(token_id: int) -> str:
    # A checkpoint may pad its vocabulary past the tokenizer's (nanoGPT: 50304): no text there.
    return tokens.token(token_id).text if token_id < tokens.VOCAB else f"<unused {token_id}>"


def _on(engine: Engine, allowed: np.ndarray | None):
    return None if allowed is None else engine.asarray(allowed)
