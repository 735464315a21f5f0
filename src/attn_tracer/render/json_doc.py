"""The machine-readable trace: one JSON document, streamed, following schema `attn-trace/1`;
or the same as JSON Lines (`--json-lines`, schema `attn-trace-lines/1`): a header line, then a
line per attention entry, then a line per prediction.

Everything that can fail is computed before the first byte is written, so a failed run leaves
stdout empty. Arrays go through orjson, which writes NumPy arrays natively and fast; floats are
float32's shortest round-trip form unless --precision rounds them. JSON has no −∞ or NaN:
masked scores are written as null (orjson writes non-finite floats as null; a test pins it).
The document is yielded piece by piece, one attention matrix at a time, so memory does not grow
with the number of heads, layers or batch rows written; a helper thread formats the next matrix
while this one is written (`ahead`). The schemas are data/trace.schema.json and
data/trace-lines.schema.json.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from queue import Queue
from typing import BinaryIO

import numpy as np
import orjson

from attn_tracer import __version__
from attn_tracer.model import tokenizer as tokenizers
from attn_tracer.model.tokens import Token
from attn_tracer.model.trace import Input, Trace

SCHEMA = "attn-trace/1"
LINES_SCHEMA = "attn-trace-lines/1"
TOKENS_SCHEMA = "attn-tokens/1"
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def token_json(t: Token) -> dict:
    out = {"id": t.id, "text": t.text, "bytes": t.bytes.hex()}
    if t.special:  # only when true, so that a text's ordinary tokens read as they always did
        out["special"] = True
    if t.added:
        out["added"] = True
    return out


def tokens_document(tokens: list[Token]) -> bytes:
    return orjson.dumps([token_json(t) for t in tokens]) + b"\n"


def input_json(inp: Input) -> dict:
    """One input as every document (trace, heads, attribute) writes it."""
    return {"text": inp.text, "tokens": [token_json(t) for t in inp.tokens],
            "length": inp.length, "padding": inp.padding, "padding_side": inp.side,
            "truncated": inp.truncated}


def pad_id(config, tok=None) -> int:
    from attn_tracer.model.pipeline import pad_id

    return pad_id(config, tok)


def config_json(trace: Trace) -> dict:
    c = trace.config.to_dict()
    c.update(trace.engine)
    batched = any(i.padding for i in trace.inputs)
    tok = tokenizers.of(trace.config)
    c["tokenizer"] = tok.to_json()
    c["mask_description"] = {
        "causal": c["mask"] == "causal",
        "padding": batched,
        "pad_id": pad_id(trace.config, tok),
        "masked_value": "-inf before softmax, exactly 0 after",
        "pad_query_rows": "all 0: a pad query attends to nothing",
    }
    if trace.config.window is not None:  # the sliding window (absent without one)
        c["mask_description"]["window"] = trace.config.window
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


def _header(trace: Trace) -> dict:
    head = {"config": config_json(trace), "inputs": [input_json(i) for i in trace.inputs]}
    if trace.cross is not None:
        head["cross_inputs"] = [input_json(i) for i in trace.cross]
    return head


def _steps(trace: Trace) -> list[dict]:
    return [{"name": s.name, "op": s.op, "shape": list(s.shape), "dims": list(s.dims)}
            for s in trace.steps]


def _attention(trace: Trace, precision: int | None, stages: bool,
               record: bool = False) -> Iterator[list[bytes]]:
    """Each attention entry as the pieces of one JSON object, one matrix a piece, in the
    schema's order: self-attention, then cross-attention; by layer, batch row, then head."""
    for kind in ("attn", "cross_attn"):
        for layer, pattern in trace.patterns(kind):
            for b in range(pattern.shape[0]):
                for i, h in enumerate(trace.selection.heads):
                    entry = {"layer": layer, "head": h, "batch": b, "block": kind}
                    if record:
                        entry = {"record": "attention", **entry}
                    pieces = [orjson.dumps(entry)[:-1] + b',"weights":',
                              array_json(pattern[b, i], precision)]
                    if stages:
                        for stage in ("scores", "scaled", "masked"):
                            name = f"blocks.{layer}.{kind}.{stage}"
                            if name in trace.tensors:
                                pieces.append(f',"{stage}":'.encode()
                                              + array_json(trace.tensors[name][b, i], precision))
                    pieces.append(b"}")
                    yield pieces


def _predictions(trace: Trace, precision: int | None) -> list[dict]:
    out = []
    for p in trace.predictions or []:
        prob = np.array([t["prob"] for t in p.top])
        logit = np.array([t["logit"] for t in p.top])
        if precision is not None:  # one vectorized rounding, not a round() per number
            prob, logit = np.round(prob, precision), np.round(logit, precision)
        out.append({"batch": p.batch, "position": p.position, "temperature": trace.temperature,
                    "top": [{**t, "prob": pr, "logit": lo} for t, pr, lo
                            in zip(p.top, prob.tolist(), logit.tolist(), strict=True)]})
    return out


def chunks(trace: Trace, precision: int | None = None, stages: bool = False) -> Iterator[bytes]:
    """The document, piece by piece: memory holds one array at a time, not the whole text."""
    head = {"schema": SCHEMA, "version": __version__, **_header(trace)}
    yield orjson.dumps(head)[:-1]
    yield b',"steps":' + orjson.dumps(_steps(trace))
    yield b',"attention":['
    for n, pieces in enumerate(_attention(trace, precision, stages)):
        if n:
            yield b","
        yield from pieces
    yield b"]"
    if trace.predictions is not None:
        yield b',"predictions":' + orjson.dumps(_predictions(trace, precision))
    yield b"}\n"


def lines(trace: Trace, precision: int | None = None, stages: bool = False) -> Iterator[bytes]:
    """JSON Lines (schema `attn-trace-lines/1`, data/trace-lines.schema.json): a header line
    (config, inputs, steps), one line per attention entry of the document, then one line per
    prediction; each line's `record` says which. The same numbers as `chunks`, byte for byte."""
    head = {"record": "header", "schema": LINES_SCHEMA, "version": __version__,
            **_header(trace), "steps": _steps(trace)}
    yield orjson.dumps(head) + b"\n"
    for pieces in _attention(trace, precision, stages, record=True):
        yield from pieces
        yield b"\n"
    for p in _predictions(trace, precision):
        yield orjson.dumps({"record": "prediction", **p}) + b"\n"


def write(trace: Trace, out: BinaryIO, precision: int | None = None, stages: bool = False) -> None:
    _write_all(chunks(trace, precision, stages), out)


def write_lines(trace: Trace, out: BinaryIO, precision: int | None = None,
                stages: bool = False) -> None:
    _write_all(lines(trace, precision, stages), out)


def _write_all(pieces: Iterator[bytes], out: BinaryIO) -> None:
    for piece in ahead(pieces):
        out.write(piece)
    out.flush()


_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def ahead(pieces: Iterator[bytes], depth: int = 4) -> Iterator[bytes]:
    """`pieces`, made by a helper thread up to `depth` ahead of the caller.

    Serializing (orjson, which holds the GIL) and writing (a system call, which releases it)
    then overlap: the output takes the longer of the two instead of their sum. The caller's
    thread does every write, so a closed pipe, a full disk or Ctrl-C surface there as usual;
    the helper only makes bytes, and stops when the caller stops reading.
    """
    queue: Queue = Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for piece in pieces:
                if stop.is_set():
                    return
                queue.put(piece)
            queue.put(_END)
        except BaseException as e:  # handed to the caller, raised there
            queue.put(_Failed(e))

    threading.Thread(target=produce, name="attn-json", daemon=True).start()
    try:
        while (item := queue.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        while not queue.empty():  # a helper blocked on a full queue wakes up, sees stop
            queue.get_nowait()
