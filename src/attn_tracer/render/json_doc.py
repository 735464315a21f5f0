"""The machine-readable trace: one JSON document, streamed, following schema `attn-trace/1`.

Everything that can fail is computed before the first byte is written, so a failed run leaves
stdout empty. Arrays go through orjson, which writes NumPy arrays natively and fast; floats are
float32's shortest round-trip form unless --precision rounds them. JSON has no −∞ or NaN:
masked scores are written as null (orjson writes non-finite floats as null; a test pins it).
The document is yielded piece by piece, one attention matrix at a time, so memory does not grow
with the number of heads, layers or batch rows written. The schema is data/trace.schema.json.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import orjson

from attn_tracer import __version__
from attn_tracer.model.tokens import ENDOFTEXT_ID, Token
from attn_tracer.model.trace import Input, Trace

SCHEMA = "attn-trace/1"
TOKENS_SCHEMA = "attn-tokens/1"
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def token_json(t: Token) -> dict:
    return {"id": t.id, "text": t.text, "bytes": t.bytes.hex()}


def tokens_document(tokens: list[Token]) -> bytes:
    return orjson.dumps([token_json(t) for t in tokens]) + b"\n"


def input_json(inp: Input) -> dict:
    """One input as every document (trace, heads, attribute) writes it."""
    return {"text": inp.text, "tokens": [token_json(t) for t in inp.tokens],
            "length": inp.length, "padding": inp.padding, "padding_side": inp.side,
            "truncated": inp.truncated}


def config_json(trace: Trace) -> dict:
    c = trace.config.to_dict()
    c.update(trace.engine)
    batched = any(i.padding for i in trace.inputs)
    c["mask_description"] = {
        "causal": c["mask"] == "causal",
        "padding": batched,
        "pad_id": ENDOFTEXT_ID,
        "masked_value": "-inf before softmax, exactly 0 after",
        "pad_query_rows": "all 0: a pad query attends to nothing",
    }
    c["cross"] = trace.cross is not None
    return c


def array_json(x: np.ndarray, precision: int | None = None) -> bytes:
    """A float array as JSON: −∞ (and any other non-finite value) as null.

    Without `precision`, float32 (and the widened half types) is written in float32's shortest
    round-trip form, float64 in float64's: json.loads then the same dtype gives the array back
    bit for bit. With `precision`, values are rounded to that many decimals in float64, so
    rounding adds no float32 error of its own.
    """
    x = np.asarray(x)
    if precision is not None:
        x = np.round(x.astype(np.float64), precision)
    elif x.dtype != np.float64:
        x = x.astype(np.float32, copy=False)
    return orjson.dumps(np.ascontiguousarray(x), option=_NUMPY)


def chunks(trace: Trace, precision: int | None = None, stages: bool = False) -> Iterator[bytes]:
    """The document, piece by piece: memory holds one array at a time, not the whole text."""

    def arr(x: np.ndarray) -> bytes:
        return array_json(x, precision)

    head = {
        "schema": SCHEMA,
        "version": __version__,
        "config": config_json(trace),
        "inputs": [input_json(i) for i in trace.inputs],
    }
    if trace.cross is not None:
        head["cross_inputs"] = [input_json(i) for i in trace.cross]
    yield orjson.dumps(head)[:-1]
    yield b',"steps":' + orjson.dumps([
        {"name": s.name, "op": s.op, "shape": list(s.shape), "dims": list(s.dims)}
        for s in trace.steps])
    yield b',"attention":['
    first = True
    for kind in ("attn", "cross_attn"):
        for layer, pattern in trace.patterns(kind):
            for b in range(pattern.shape[0]):
                for i, h in enumerate(trace.selection.heads):
                    entry = orjson.dumps({"layer": layer, "head": h, "batch": b, "block": kind})
                    yield (b"" if first else b",") + entry[:-1] + b',"weights":'
                    yield arr(pattern[b, i])
                    first = False
                    if stages:
                        for stage in ("scores", "scaled", "masked"):
                            name = f"blocks.{layer}.{kind}.{stage}"
                            if name in trace.tensors:
                                yield f',"{stage}":'.encode() + arr(trace.tensors[name][b, i])
                    yield b"}"
    yield b"]"
    if trace.predictions is not None:
        def number(v: float) -> float:
            return v if precision is None else round(v, precision)

        yield b',"predictions":' + orjson.dumps([
            {"batch": p.batch, "position": p.position, "temperature": trace.temperature,
             "top": [{**t, "prob": number(t["prob"]), "logit": number(t["logit"])}
                     for t in p.top]} for p in trace.predictions])
    yield b"}\n"


def write(trace: Trace, out: BinaryIO, precision: int | None = None, stages: bool = False) -> None:
    for chunk in chunks(trace, precision, stages):
        out.write(chunk)
    out.flush()
