"""The view and the JSON document of `attn patch`, drawn from its Result (plain arrays).

In the order a reader meets it: the header, both token lists with the positions where the runs
differ marked `*`, the metric and its two baselines, then one diverging heatmap per --patch
target (the attribution's colour scale and grid: positions × layers for resid_pre, attn_out and
mlp_out, as ROME draws causal traces; layers × heads for z, q, k, v and pattern), each with its
strongest cells beneath. Numbers are always written, signed, so the view reads the same
without color; the colors show each cell's distance from "no effect": gray.
"""

from __future__ import annotations

import numpy as np
import orjson
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from attn_tracer import __version__
from attn_tracer.analysis import patching
from attn_tracer.analysis.attribution import head_name
from attn_tracer.model.tokens import Token
from attn_tracer.render.attribution import _token, diverging_ramp, head_blocks, label
from attn_tracer.render.formats import signed
from attn_tracer.render.formats import signed_decimals as decimals
from attn_tracer.render.heatmaps import cut_label, reading_labels
from attn_tracer.render.json_doc import config_json, input_json, token_json
from attn_tracer.render.layout import flow, plural
from attn_tracer.render.terminal import header, show

SCHEMA = "attn-patch/1"
MARK = "*"  # a position where the clean and corrupted inputs differ
LABEL_MAX = 16  # cells of a position's row label, at most
TITLES = {"resid_pre": "residual stream (layer input)", "attn_out": "attention output",
          "mlp_out": "MLP output", "z": "each head's output Z", "q": "each head's queries",
          "k": "each head's keys", "v": "each head's values", "pattern": "each head's pattern"}
HOW = {"denoise": "the clean run's activation patched into the corrupted run: how much of the "
                  "clean behaviour it restores alone (sufficient?)",
       "noise": "the corrupted run's activation patched into the clean run: how much of the "
                "clean behaviour survives without it (necessary?)"}


def measure(result) -> str:
    t = label(result.target, result)
    versus = label(result.versus, result) if result.versus is not None else None
    return {"diff": f"logit({t}) − logit({versus})" if versus is not None else f"logit({t})",
            "logit": f"logit({t})", "logprob": f"log p({t})", "prob": f"p({t})"}[result.metric]


def neutral(result) -> float:
    """The normalised value of a patch that changes nothing: 0 denoising, 1 noising."""
    return 0.0 if result.direction == "denoise" else 1.0


def _tokens_line(tokens: list[Token], labels: list[str], differ: set[int], title: str,
                 width: int) -> Text:
    items = []
    for p, name in enumerate(labels[:len(tokens)]):
        marked = p in differ
        items.append(Text(f"{p}:{name}{MARK if marked else ''}",
                          style="bold yellow" if marked else ""))
    return flow(items, width, sep=" ", first=Text(f"{title} ", style="bold"))


def render(result, console: Console) -> None:
    width = console.width
    trace = result.trace
    show(console, header(trace, width, title="attn patch"))
    console.print()
    differ = set(result.differ)
    clean_labels = reading_labels(trace.inputs[0])
    show(console, _tokens_line(result.clean_tokens, clean_labels, differ, "clean    ", width))
    if result.corrupt_tokens is not None:
        show(console, _tokens_line(result.corrupt_tokens, reading_labels(trace.inputs[1]),
                                   differ, "corrupted", width))
        what = f"{MARK} the {plural(len(differ), 'position')} where the two texts differ"
    else:
        n = result.noise
        what = (f"{MARK} the subject {n['subject']!r}: Gaussian noise of σ = {n['scale']:g} × "
                f"{n['std']:.4g} (the embeddings' std) added to its token embeddings, "
                f"{plural(n['samples'], 'seeded draw')} (--noise-seed {n['seed']}) averaged")
    show(console, flow([Text(w, style="dim") for w in what.split(" ")], width, sep=" "))
    console.print()
    at = result.position
    head = Text("metric ", style="bold")
    head.append(measure(result), style="bold cyan")
    head.append(f" at position {at} ", style="bold")
    head.append(clean_labels[at], style="bold cyan")
    show(console, head)
    base = [Text(f"clean run {signed(result.clean, 4)}"),
            Text(f"corrupted run {signed(result.corrupted, 4)}"
                 + (" (mean of the noisy runs)" if result.noise else ""))]
    show(console, flow(base, width, sep="  ·  "))
    how = (f"{result.direction}: {HOW[result.direction]}. Each cell is (patched − corrupted) / "
           f"(clean − corrupted): 1 is the clean run, 0 the corrupted one.")
    show(console, flow([Text(w, style="dim") for w in how.split(" ")], width, sep=" "))
    runs = (f"{result.runs} of {plural(result.cells, 'patched run')} computed in "
            f"{plural(result.forwards, 'batched forward')}; the other "
            f"{result.cells - result.runs} patch an activation that is the same in both runs")
    show(console, flow([Text(w, style="dim") for w in runs.split(" ")], width, sep=" "))
    for grid in result.grids:
        console.print()
        for item in grid_view(result, grid, clean_labels, width):
            show(console, item)
    console.print()
    show(console, legend(result, width))
    if not result.trained:
        console.print()
        show(console, Text("These weights are random: the model is untrained, so which "
                           "activations matter means nothing about language. Use --weights "
                           "for a real GPT-2.", style="yellow"))


def _position_labels(result, labels: list[str], room: int) -> list[str]:
    differ = set(result.differ)
    width = len(str(len(labels) - 1))
    return [cut_label(f"{p:>{width}} {name}{MARK if p in differ else ''}", room)
            for p, name in enumerate(labels[:len(result.clean_tokens)])]


def grid_view(result, grid, labels: list[str], width: int) -> list:
    values = grid.values
    digits = decimals(values)
    away = values - neutral(result)
    title = Text(f"{grid.target}", style="bold")
    title.append(f" ({patching.hook_name(grid.target)}: {TITLES[grid.target]}"
                 + (f", {grid.window} layers restored around each" if grid.window > 1 else "")
                 + ")", style="dim")
    out: list = [title]
    layer_cols = [f"L{layer}" for layer in range(result.layers)]
    cell = max([len(signed(float(v), digits)) for v in values.ravel()]
               + [cell_len(c) for c in layer_cols])
    if grid.axes == ("layer", "position"):
        room = max(6, min(LABEL_MAX, width - (cell + 1) * result.layers))
        rows = _position_labels(result, labels, room)
        out += head_blocks(values.T, 1.0, digits, width, rows=rows, cols=layer_cols,
                           title="position × layer", colors=away.T)
    elif len(grid.axes) == 3:  # z --per-position: a positions × heads grid per layer
        room = max(6, min(LABEL_MAX, width - (cell + 1) * values.shape[1]))
        rows = _position_labels(result, labels, room)
        for layer in range(result.layers):
            out += head_blocks(values[layer].T, 1.0, digits, width, rows=rows,
                               cols=[f"H{h}" for h in range(values.shape[1])],
                               title=f"L{layer}: position × head", colors=away[layer].T)
    else:
        kv = grid.axes[1] == "kv_head"
        out += head_blocks(values, 1.0, digits, width, title="layer × K/V head" if kv
                           else "layer × head", colors=away)
        if kv:
            out.append(Text("a K/V head is shared by several query heads (grouped-query "
                            "attention): patching it patches all of them", style="dim"))
    if result.top:
        out.append(strongest(result, grid, labels, width))
    return out


def cell_name(result, grid, index: tuple[int, ...], labels: list[str]) -> str:
    if grid.axes == ("layer", "position"):
        return f"L{index[0]} {index[1]}:{labels[index[1]]}"
    if grid.axes[1] == "kv_head":
        name = f"L{index[0]} KV{index[1]}"
    else:
        name = head_name(index[0], index[1])
    return name + (f" {index[2]}:{labels[index[2]]}" if len(index) == 3 else "")


def strongest(result, grid, labels: list[str], width: int) -> Text:
    """The cells furthest from no effect, those that show a change at the grid's decimals."""
    digits = decimals(grid.values)
    half = 0.5 * 10.0**-digits
    cells = [(i, v) for i, v in patching.strongest(grid.values, result.top, neutral(result))
             if abs(v - neutral(result)) >= half]
    first = Text("strongest: ", style="bold")
    if not cells:
        return first.append(f"none: every cell is {neutral(result):.{digits}f}, no effect",
                            style="dim")
    items = [Text(f"{cell_name(result, grid, i, labels)} {signed(v, digits)}") for i, v in cells]
    return flow(items, width, sep=" · ", first=first)


def legend(result, width: int) -> Text:
    n = neutral(result)
    ramp = diverging_ramp(1.0, 2, low=signed(n - 1, 0), high=signed(n + 1, 0), middle=f"{n:g}")
    if result.direction == "denoise":
        words = ["blue: restores the clean behaviour", "red: pushes further away", "gray: no "
                 "effect (0)"]
    else:
        words = ["red: the clean behaviour is lost without it", "blue: strengthened",
                 "gray: no effect (1)"]
    return flow([ramp, *(Text(w, style="dim") for w in words)], width, sep="  ·  ")


# ── JSON ──────────────────────────────────────────────────────────────────────────────────────

def _tokens(tokens: list[Token] | None):
    return None if tokens is None else [token_json(t) for t in tokens]


def document(result) -> bytes:
    """The whole `attn-patch/1` document (data/patch.schema.json)."""
    trace = result.trace
    doc = {
        "schema": SCHEMA,
        "version": __version__,
        "config": config_json(trace),
        "inputs": [input_json(i) for i in trace.inputs],
        "trained": result.trained,
        "clean_tokens": _tokens(result.clean_tokens),
        "corrupt_tokens": _tokens(result.corrupt_tokens),
        "differ": result.differ,
        "position": result.position,
        "token": token_json(result.clean_tokens[result.position]),
        "target": _token(result.target, result),
        "versus": None if result.versus is None else _token(result.versus, result),
        "metric": result.metric,
        "measure": measure(result),
        "direction": result.direction,
        "normalised": "(patched - corrupted) / (clean - corrupted)",
        "baselines": {"clean": result.clean, "corrupted": result.corrupted},
        "noise": result.noise,
        "cells": result.cells,
        "runs": result.runs,
        "forwards": result.forwards,
        "grids": [{"target": g.target, "hook": patching.hook_name(g.target),
                   "axes": list(g.axes), "shape": list(g.values.shape), "window": g.window,
                   "skipped": g.skipped, "values": np.asarray(g.values, np.float64).tolist(),
                   "raw": np.asarray(g.raw, np.float64).tolist()} for g in result.grids],
    }
    return orjson.dumps(doc) + b"\n"
