"""The outputs of `attn generate`, each fed one generated token at a time.

- `Plain`: lines, printed as each token comes (stdout is not a terminal): the prefill's shape
  trace, then one line a token (its probability, the shapes of q, of the cache after the append
  and of the scores row), the chosen heads' attention rows, one shade a key (so the lines draw
  the growing triangle), with the strongest keys; at the end the text and the cache.
- `Live`: the same lines scrolling above a live region (Rich) that redraws the triangle of each
  chosen head in colour, one row per generated token, and the text so far (a terminal).
- `TextStream` (--quiet): only the generated text's bytes, as they come.
- `JsonLines` (--json-lines, schema attn-generate-lines/1) and `document` (--json, schema
  attn-generate/1, written once at the end).

Renderers read plain data (model/generate.Generated), never an engine's arrays.
"""

from __future__ import annotations

import contextlib
from typing import BinaryIO

import numpy as np
import orjson
from rich.console import Console, Group
from rich.text import Text

from attn_tracer import __version__
from attn_tracer.model import generate as gen
from attn_tracer.model import memory, tokens
from attn_tracer.render.layout import cell_style

SCHEMA = "attn-generate/1"
LINES_SCHEMA = "attn-generate-lines/1"
SHADES = " ░▒▓█"  # a weight ÷ its row's largest: 0, then quarters up to 1
STRONGEST = 3  # keys listed per row
LIVE_ROWS = 16  # generated tokens the live triangle keeps on screen, per head


def label(token_id: int) -> str:
    return tokens.token(token_id).text if token_id < tokens.VOCAB else f"<unused {token_id}>"


def token_json(token_id: int) -> dict:
    raw = tokens.token(token_id).bytes if token_id < tokens.VOCAB else b""
    return {"id": token_id, "text": label(token_id), "bytes": raw.hex()}


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def shade(row: np.ndarray) -> str:
    """One character a key: the weight ÷ the row's largest, in quarters."""
    top = float(row.max(initial=0)) or 1.0
    return "".join(SHADES[min(4, int(np.ceil(4 * w / top - 1e-9)))] if w > 0 else SHADES[0]
                   for w in row)


def strongest(row: np.ndarray, ids: list[int], k: int = STRONGEST) -> list[tuple[int, float]]:
    """The k keys with the largest weights (position, weight), strongest first; ties by
    position."""
    order = np.lexsort((np.arange(row.size), -row))[:k]
    return [(int(i), float(row[i])) for i in order]


def sampling_words(s) -> str:
    if s.greedy:
        return "greedy (the most likely token each step)"
    parts = [f"T = {s.temperature:g}"]
    if s.top_k is not None:
        parts.append(f"top-k {s.top_k}")
    if s.top_p is not None:
        parts.append(f"top-p {s.top_p:g}")
    return "sampling " + ", ".join(parts) + f", seed {s.seed}"


def shapes(step: gen.Generated, layer: int = 0) -> dict[str, list[int]]:
    """This step's q, cache (after the append) and scores shapes, in layer `layer`."""
    prefix = f"blocks.{layer}.attn."
    found = {s.name[len(prefix):]: list(s.shape) for s in step.steps
             if s.name.startswith(prefix)}
    return {"q": found["q.heads"], "k_cache": found["k_cache"], "v_cache": found["v_cache"],
            "scores": found["scores"]}


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _count(n: float) -> str:
    for unit, size in (("billion", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{' ' if len(unit) > 1 else ''}{unit}"
    return f"{n:.0f}"


class _Lines:
    """The per-token lines that Plain prints and Live scrolls."""

    def __init__(self, console: Console, cost: bool, alternatives: int, precision: int | None
                 ) -> None:
        self.console, self.cost, self.alternatives = console, cost, alternatives
        self.prompt = None
        self.ids: list[int] = []
        self.prefill: list = []

    def header(self, prompt) -> list:
        self.prompt, self.ids = prompt, list(prompt.ids)
        c = prompt.config
        words = Text()
        words.append("prompt: ", style="bold")
        words.append(f"{len(prompt.ids)} token{'s' if len(prompt.ids) > 1 else ''}  ")
        words.append(" ".join(label(t) for t in prompt.ids), style="cyan")
        model = Text()
        model.append("model: ", style="bold")
        model.append(f"{'GPT-2 weights from ' + c.weights if c.weights else 'random weights'} "
                     f"({c.layers} layers, {c.heads} heads of d_head {c.d_head}, n_ctx "
                     f"{c.n_ctx}); {sampling_words(prompt.sampling)}")
        out = [words, model]
        if not c.weights:
            out.append(Text("These weights are random: the model is untrained, so what it "
                            "writes means nothing. Use --weights for a real GPT-2.",
                            style="yellow"))
        return out

    def lines(self, step: gen.Generated) -> list:
        from attn_tracer.render.shapes import shape_table

        out: list = []
        sh = shapes(step)
        if step.index == 1:
            self.prefill = step.steps
            n = len(self.ids)
            out.append(Text(f"\nprefill: the prompt's {n} tokens through every layer at once; "
                            f"each layer keeps its K and V, [batch, kv_heads, len, d_head] = "
                            f"{_shape(sh['k_cache'])}, in the cache", style="bold"))
            out.append(shape_table(step.steps, self.console.width))
            out.append(Text("\nthen one token a step: only its own q, k, v; k and v appended "
                            "to the cache; its scores row against the whole cache",
                            style="bold"))
        line = Text()
        line.append(f"{step.index:>4}  ")
        line.append(f"{label(step.token):<10}", style="bold cyan")
        line.append(f" p {step.prob:.4f}  ")
        where = "prefill" if step.cached == 0 else f"{step.cached} cached"
        line.append(f"{where}: q {_shape(sh['q'])} · cache {_shape(sh['k_cache'])} · scores "
                    f"{_shape(sh['scores'])}", style="dim")
        out.append(line)
        if self.alternatives:
            alt = Text("        from: ", style="dim")
            alt.append(" · ".join(f"{label(t)} {p:.4f}" for t, p in step.alternatives))
            out.append(alt)
        if self.cost:
            out.append(self.cost_line(step))
        context = self.ids  # every token before the generated one: the keys of its row
        for (layer, head), row in step.rows.items():
            out.append(self.row_line(layer, head, row, context))
        self.ids = [*self.ids, step.token]
        return out

    def cost_line(self, step: gen.Generated) -> Text:
        """Two rows: this forward's work with the cache, and a forward over every token."""
        c = self.prompt.config
        dtype = self.prompt.engine.dtype
        cached, full = gen.step_costs(self.prefill, step, c, dtype)
        t = Text()
        t.append("        cost, with the cache ", style="dim")
        t.append(f"{_count(cached.multiply_adds):>8} multiply-adds  "
                 f"{memory.human(cached.bytes):>9}   Q·Kᵀ, pattern·V {_count(cached.attention)}")
        t.append(f"\n{'recomputing ' + str(step.position) + ' tokens':>29} ", style="dim")
        ratio = full.multiply_adds / max(cached.multiply_adds, 1)
        attention = full.attention / max(cached.attention, 1)
        t.append(f"{_count(full.multiply_adds):>8} {f'(×{ratio:.1f})':<13}  "
                 f"{memory.human(full.bytes):>9}   Q·Kᵀ, pattern·V {_count(full.attention)} "
                 f"(×{attention:.1f})")
        return t

    def row_line(self, layer: int, head: int, row: np.ndarray, context: list[int]) -> Text:
        t = Text(f"        {head_name(layer, head)} ")
        room = max(8, self.console.width - 60)
        cells = shade(row)
        t.append(("…" + cells[-room:]) if len(cells) > room else cells, style="magenta")
        t.append("  strongest: ", style="dim")
        t.append(" · ".join(f"{label(context[k])} {w:.2f} ({k})" for k, w
                            in strongest(row, context)))
        return t

    def footer(self, generated: list[gen.Generated]) -> list:
        if not generated:
            return []
        last = generated[-1]
        text = Text("\n")
        text.append("text: ", style="bold")
        text.append(_readable(self.prompt.ids), style="dim")
        text.append(_readable([g.token for g in generated]))
        c = self.prompt.config
        length = len(self.prompt.ids) + len(generated) - 1  # the last token is never fed back
        stop = Text(f"stopped: {gen.STOPS[last.stopped]} after {len(generated)} token"
                    f"{'s' if len(generated) > 1 else ''}; the cache holds {length} tokens: K "
                    f"and V [1, {gen.kv_heads(c)}, {length}, {c.d_head}] in each of {c.layers} "
                    f"layers, {memory.human(gen.cache_bytes(c, length, self.prompt.engine.dtype))}")
        return [text, stop]


def _readable(ids: list[int]) -> str:
    raw = b"".join(tokens.token(t).bytes for t in ids if t < tokens.VOCAB)
    return raw.decode("utf-8", errors="replace")


class Plain(_Lines):
    @contextlib.contextmanager
    def open(self, prompt):
        for r in self.header(prompt):
            self.console.print(r)
        yield

    def step(self, step: gen.Generated) -> None:
        for r in self.lines(step):
            self.console.print(r)

    def end(self, generated) -> None:
        for r in self.footer(generated):
            self.console.print(r)


class Live(_Lines):
    """Plain's lines scrolling above a redrawn triangle (Rich Live, on a terminal)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        self.generated: list[int] = []
        self.live = None

    @contextlib.contextmanager
    def open(self, prompt):
        from rich.live import Live as RichLive

        for r in self.header(prompt):
            self.console.print(r)
        with RichLive(self.frame(), console=self.console, auto_refresh=False,
                      transient=False) as self.live:
            yield

    def step(self, step: gen.Generated) -> None:
        for r in self.lines(step):
            self.live.console.print(r)
        self.generated.append(step.token)
        for key, row in step.rows.items():
            self.rows.setdefault(key, []).append((step.token, row))
        self.live.update(self.frame(), refresh=True)

    def end(self, generated) -> None:
        for r in self.footer(generated):
            self.live.console.print(r)

    def frame(self):
        parts = []
        width = self.console.width
        for (layer, head), rows in self.rows.items():
            t = Text(f"{head_name(layer, head)}: each generated token's attention row, the "
                     "prompt's keys then the generated ones (darker: more)\n", style="bold")
            for token, row in rows[-LIVE_ROWS:]:
                t.append(f"{label(token)[:10]:>10} ", style="cyan")
                top = float(row.max(initial=0)) or 1.0
                cells = row[-(width - 12):]
                for w in cells:
                    t.append(" ", style=cell_style(float(w) / top))
                t.append("\n")
            parts.append(t)
        if self.prompt is not None:
            so_far = Text()
            so_far.append("text so far: ", style="bold")
            so_far.append(_readable(self.prompt.ids), style="dim")
            so_far.append(_readable(self.generated))
            parts.append(so_far)
        return Group(*parts)


class TextStream:
    """--quiet: the generated text itself, byte for byte, flushed after each token."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    @contextlib.contextmanager
    def open(self, prompt):
        yield

    def step(self, step: gen.Generated) -> None:
        if step.token != gen.END_OF_TEXT and step.token < tokens.VOCAB:
            self.stream.write(tokens.token(step.token).bytes)
            self.stream.flush()

    def end(self, generated) -> None:
        self.stream.write(b"\n")
        self.stream.flush()


class Collect:
    """--json: nothing until the end (the document is written whole, by `document`)."""

    @contextlib.contextmanager
    def open(self, prompt):
        self.prompt = prompt
        yield

    def step(self, step) -> None:
        pass

    def end(self, generated) -> None:
        pass


# ── JSON ─────────────────────────────────────────────────────────────────────────────────────

def _round(x: float, precision: int | None) -> float:
    return round(x, precision) if precision is not None else x


def header_json(prompt) -> dict:
    c = prompt.config.to_dict()
    c.update({"engine": prompt.engine.name, "device": prompt.engine.device,
              "dtype": prompt.engine.dtype, "kv_heads": gen.kv_heads(prompt.config)})
    s = prompt.sampling
    layers, heads = prompt.shown
    return {"config": c,
            "prompt": {"text": prompt.text, "tokens": [token_json(t) for t in prompt.ids]},
            "sampling": {"greedy": s.greedy, "temperature": s.temperature, "top_k": s.top_k,
                         "top_p": s.top_p, "seed": s.seed},
            "heads": [head_name(layer, h) for layer in layers for h in heads]}


def step_json(step: gen.Generated, prompt, prefill, precision: int | None,
              cost: bool) -> dict:
    out = {"index": step.index, "position": step.position, "token": token_json(step.token),
           "prob": _round(step.prob, precision), "logit": _round(step.logit, precision),
           "alternatives": [{**token_json(t), "prob": _round(p, precision)}
                            for t, p in step.alternatives],
           "cached": step.cached, "shapes": shapes(step),
           "attention": [{"layer": layer, "head": head, "name": head_name(layer, head),
                          "weights": _weights(row, precision)}
                         for (layer, head), row in step.rows.items()]}
    if step.stopped:
        out["stopped"] = step.stopped
    if cost:
        cached, full = gen.step_costs(prefill, step, prompt.config, prompt.engine.dtype)
        out["cost"] = {name: {"multiply_adds": c.multiply_adds, "bytes": c.bytes,
                              "attention_multiply_adds": c.attention}
                       for name, c in (("cached", cached), ("uncached", full))}
    return out


def _weights(row: np.ndarray, precision: int | None) -> list[float]:
    """A row's weights: rounded to `precision` decimals, or in float32's shortest round-trip
    form, as attn trace writes its patterns (orjson writes a float32 array that way)."""
    if precision is not None:
        return np.round(np.asarray(row, np.float64), precision).tolist()
    return orjson.loads(orjson.dumps(np.asarray(row, np.float32),
                                     option=orjson.OPT_SERIALIZE_NUMPY))


def end_json(prompt, generated: list[gen.Generated]) -> dict:
    ids = [g.token for g in generated]
    return {"stopped": generated[-1].stopped if generated else None,
            "generated": [token_json(t) for t in ids],
            "text": _readable(ids),
            "cache_length": len(prompt.ids) + len(generated) - 1}


def prefill_steps_json(prefill) -> list[dict]:
    return [{"name": s.name, "op": s.op, "shape": list(s.shape), "dims": list(s.dims)}
            for s in prefill]


class JsonLines:
    """--json-lines: a header line, one `step` line per generated token, an `end` line."""

    def __init__(self, stream: BinaryIO, precision: int | None) -> None:
        self.stream, self.precision = stream, precision
        self.prefill: list = []

    def _write(self, obj: dict) -> None:
        self.stream.write(orjson.dumps(obj) + b"\n")
        self.stream.flush()

    @contextlib.contextmanager
    def open(self, prompt):
        self.prompt = prompt
        self._write({"record": "header", "schema": LINES_SCHEMA, "version": __version__,
                     **header_json(prompt)})
        yield

    def step(self, step: gen.Generated) -> None:
        if step.index == 1:
            self.prefill = step.steps
        self._write({"record": "step", **step_json(step, self.prompt, self.prefill,
                                                   self.precision, cost=True)})

    def end(self, generated) -> None:
        self._write({"record": "end", **end_json(self.prompt, generated)})


def document(prompt, generated: list[gen.Generated], precision: int | None, cost: bool) -> bytes:
    prefill = generated[0].steps if generated else []
    doc = {"schema": SCHEMA, "version": __version__, **header_json(prompt),
           "prefill": {"steps": prefill_steps_json(prefill)},
           "steps": [step_json(g, prompt, prefill, precision, cost) for g in generated],
           **end_json(prompt, generated)}
    return orjson.dumps(doc) + b"\n"


def saved(prompt, generated: list[gen.Generated], cache: dict[str, np.ndarray]
          ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """--save: the final cache (blocks.L.attn.k_cache / v_cache [batch, kv_heads, len,
    d_head]), the token ids [len + 1], and each shown head's rows as one matrix
    `rows.L{l}H{h}` [generated, len]: row i is generated token i's, 0 past its keys."""
    ids = np.array([*prompt.ids, *(g.token for g in generated)], np.int64)
    tensors = {**cache, "tokens": ids}
    if generated:
        width = generated[-1].position
        for key in generated[0].rows:
            m = np.zeros((len(generated), width), np.float32)
            for i, g in enumerate(generated):
                m[i, :g.rows[key].size] = g.rows[key]
            tensors[f"rows.{head_name(*key)}"] = m
    meta = {"config": orjson.dumps(header_json(prompt)).decode(),
            "generate": orjson.dumps(end_json(prompt, generated)).decode()}
    return tensors, meta
