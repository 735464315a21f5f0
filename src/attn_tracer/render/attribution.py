"""The view and the JSON document of `attn attribute`, drawn from its Result (plain arrays).

In the order a reader meets it: the header and tokens, the prediction being explained, the
direct logit attribution (a [layers × heads] grid on a diverging scale, the per-layer parts,
the strongest components, the check that they add up), the logit lens, and, when asked, the
ablation and the rollout. Signs are always written (+0.12, −0.05), so the view reads the same
without color; the colors only repeat them: blue pushes toward the target, red away, gray is 0.
"""

from __future__ import annotations

import numpy as np
import orjson
from rich.cells import cell_len
from rich.color import Color
from rich.console import Console, RenderableType
from rich.style import Style
from rich.text import Text

from attn_tracer import __version__
from attn_tracer.analysis import attribution as dla
from attn_tracer.model import tokenizer as tokenizers
from attn_tracer.render import formats
from attn_tracer.render.formats import signed
from attn_tracer.render.heatmaps import (
    PAD_LABEL,
    column_labels,
    heatmap,
    legend,
    mask_marks,
    reading_labels,
)
from attn_tracer.render.json_doc import array_json, config_json, input_json, token_json
from attn_tracer.render.layout import GAP, cell_style, fit, flow, grid, plural
from attn_tracer.render.terminal import header, show, token_notes, token_strip

SCHEMA = "attn-attribute/1"
# A diverging scale (ColorBrewer RdBu's ends): readable with the common color blindnesses,
# which confuse red with green, not red with blue. Zero is a neutral gray.
TOWARD = (33, 102, 172)
AWAY = (178, 24, 43)
ZERO = (118, 118, 118)
BAR_HALF = 20  # cells of the strongest component's bar in the ranked table
LENS_COLUMNS = 64  # positions of the --all-positions table in the view (the JSON has them all)


# ── numbers and colors ────────────────────────────────────────────────────────────────────────

def diverging(t: float) -> tuple[int, int, int]:
    """t in [−1, 1] → RGB: AWAY at −1, ZERO at 0, TOWARD at +1, linear in between."""
    t = min(max(t, -1.0), 1.0)
    end = TOWARD if t >= 0 else AWAY
    a = abs(t)
    return tuple(round(ZERO[c] + (end[c] - ZERO[c]) * a) for c in range(3))  # type: ignore


def diverging_style(v: float, scale: float) -> Style:
    r, g, b = diverging(v / scale if scale > 0 else 0.0)
    light = 0.299 * r + 0.587 * g + 0.114 * b > 140
    return Style(bgcolor=Color.from_rgb(r, g, b), color="black" if light else "white")


def label(token_id: int, result) -> str:
    """The token's label in the tokenizer of the attributed run."""
    return tokenizers.of(result.trace.config).label(token_id)


def measure(result) -> str:
    """What the attribution explains: the target's logit, or the difference with --versus."""
    t = label(result.target, result)
    if result.versus is None:
        return f"logit({t})"
    return f"logit({t}) − logit({label(result.versus, result)})"


# ── the view ──────────────────────────────────────────────────────────────────────────────────

def render(result, console: Console, *, top_k: int = 5, components: int = 10) -> None:
    width = console.width
    trace = result.trace
    show(console, header(trace, width, title="attn attribute"))
    console.print()
    inp = trace.inputs[0]
    show(console, token_strip(inp, "tokens", width))
    for note in token_notes([inp], tokenizers.of(trace.config)):
        console.print(note)
    if inp.padding:  # --pad-to: the heatmap's pad rows and columns need their key
        tok = tokenizers.of(trace.config)
        console.print(Text(f"  + {plural(inp.padding, PAD_LABEL)} ({inp.side}): "
                           f"{tok.pad_text()}, id {tok.pad_id}, masked out as a key; positions "
                           "count the real tokens", style="dim"))
    console.print()
    show(console, prediction(result, width, top_k))
    console.print()
    for item in attribution_view(result, width, components):
        show(console, item)
    console.print()
    for item in lens_view(result, width):
        show(console, item)
    if result.ablated is not None:
        console.print()
        show(console, ablation_view(result, width))
    if result.rollout is not None:
        console.print()
        for item in rollout_view(result, width):
            show(console, item)
    if not result.trained:
        console.print()
        show(console, Text("These weights are random: the model is untrained, so what it "
                           "predicts and which heads push it mean nothing. Use --weights for a "
                           "real GPT-2.", style="yellow"))


def prediction(result, width: int, top_k: int) -> Text:
    inp = result.trace.inputs[0]
    p = result.position
    t = Text("next token after position ", style="bold")
    t.append(f"{p} ", style="bold")
    t.append(inp.tokens[p].text, style="bold cyan")
    t.append(f"  ({p + 1} of {inp.length} tokens)\n", style="dim")
    items = [Text("predicted:", style="dim")]
    for token_id, prob, _ in result.before.top[:top_k]:
        item = Text(label(token_id, result), style="cyan")
        item.append(f" {formats.prob(prob)}", style="dim")
        items.append(item)
    t.append_text(flow(items, width, sep="  "))
    t.append("\n")
    b = result.before
    target = [Text("explained: ", style="bold"), Text(measure(result), style="bold cyan"),
              Text(f"= {signed(b.logit, 3)}")]
    line = flow(target, width, sep=" ")
    line.append("\n")
    rank = "the top token" if b.rank == 1 else f"rank {b.rank}"
    facts = [Text(f"target {label(result.target, result)} (#{result.target})"),
             Text(f"logit {signed(b.target_logit, 3)}"),
             Text(f"prob {formats.prob(b.target_prob)}"),
             Text(rank)]
    if result.versus is not None:
        facts.append(Text(f"versus {label(result.versus, result)} (#{result.versus})"))
    line.append_text(flow([Text(f.plain, style="dim") for f in facts], width))
    t.append_text(line)
    return t


def attribution_view(result, width: int, components: int) -> list[RenderableType]:
    a = result.attribution
    c = result.trace.config
    title = Text("direct logit attribution", style="bold")
    title.append(f": each component's share of {measure(result)}", style="bold")
    how = ("the attn arch has no final LayerNorm: x·u directly" if a.norm is None else
           "through the final LayerNorm with its scale σ frozen from the run" if a.norm.centred
           else "random weights divide h by rms(h) before W_U: that scale frozen from the run")
    out: list[RenderableType] = [flow([title, Text(f"({how})", style="dim")], width, sep=" ")]
    grid_values = dla.head_grid(a, c.layers, c.heads)
    scale, digits = grid_scale(a)
    blocks = head_blocks(grid_values, scale, digits, width)
    per_layer = layer_block(result, scale, digits)
    if per_layer is not None:
        blocks.append(per_layer)
    out.append(grid(blocks, width))
    items = []
    for comp, v in zip(a.components, a.logits, strict=True):
        if comp.kind in ("embed", "pos_embed"):
            item = Text(f"{comp.name} ", style="cyan")
            item.append(signed(float(v), digits), style=diverging_style(float(v), scale))
            items.append(item)
    out.append(flow(items, width, sep="   "))
    out.append(diverging_legend(result, scale, digits, width))
    out.append(Text())
    out.append(ranked(result, components, width))
    out.append(check(result, width))
    return out


def grid_scale(a) -> tuple[float, int]:
    """The color scale (largest |share|) and decimals of the grids: the layers' parts alone.

    The token embedding is left out: with tied embeddings it is often the largest share by
    far (the last token's own row), and on its scale every head would be drawn gray."""
    layered = np.array([float(v) for c, v in zip(a.components, a.logits, strict=True)
                        if c.layer is not None])
    if not layered.size or not np.any(layered):
        layered = np.asarray(a.logits, np.float64)
    return (float(np.max(np.abs(layered))) or 1.0), formats.signed_decimals(layered)


def head_blocks(values: np.ndarray, scale: float, digits: int, width: int) -> list[Text]:
    """The [layers × heads] grid, cut into blocks of heads that each fit `width`."""
    layers, heads = values.shape
    cell = max(len(signed(float(v), digits)) for v in values.ravel()) if values.size else 5
    cell = max(cell, len(f"H{heads - 1}"))
    label_w = len(f"L{layers - 1}")
    per_block = max(1, (width - label_w) // (cell + 1))
    blocks = []
    for start in range(0, heads, per_block):
        chosen = range(start, min(start + per_block, heads))
        t = Text(no_wrap=True, overflow="crop")
        t.append("heads" if start == 0 else f"heads (H{start}–)", style="bold")
        t.append("\n" + " " * label_w)
        for h in chosen:
            t.append(" " + f"H{h}".rjust(cell), style="cyan")
        for layer in range(layers):
            t.append("\n")
            t.append(f"L{layer}".ljust(label_w), style="cyan")
            for h in chosen:
                v = float(values[layer, h])
                t.append(" ")
                t.append(signed(v, digits).rjust(cell), style=diverging_style(v, scale))
        blocks.append(t)
    return blocks


def layer_block(result, scale: float, digits: int) -> Text | None:
    """Each layer's other parts: b_O and the MLP output (the attn arch has no MLP)."""
    a = result.attribution
    kinds = [k for k in ("attn_bias", "mlp") if any(c.kind == k for c in a.components)]
    if not kinds:
        return None
    names = {"attn_bias": "b_O", "mlp": "MLP"}
    values = {(c.kind, c.layer): float(v) for c, v in zip(a.components, a.logits, strict=True)}
    cell = max([len(signed(v, digits)) for (k, _), v in values.items() if k in kinds] + [5])
    label_w = len(f"L{result.layers - 1}")
    t = Text(no_wrap=True, overflow="crop")
    t.append("per layer", style="bold")
    t.append("\n" + " " * label_w)
    for k in kinds:
        t.append(" " + names[k].rjust(cell), style="cyan")
    for layer in range(result.layers):
        t.append("\n")
        t.append(f"L{layer}".ljust(label_w), style="cyan")
        for k in kinds:
            v = values.get((k, layer), 0.0)
            t.append(" ")
            t.append(signed(v, digits).rjust(cell), style=diverging_style(v, scale))
    return t


def diverging_legend(result, scale: float, digits: int, width: int) -> Text:
    ramp = Text(f"{signed(-scale, digits)} ")
    shades = "█▓▒░"
    for i in range(4):
        ramp.append(shades[i], style=Style(color=Color.from_rgb(*diverging(-1 + i / 4))))
    ramp.append("0", style=Style(color=Color.from_rgb(*ZERO)))
    for i in range(4):
        ramp.append(shades[3 - i], style=Style(color=Color.from_rgb(*diverging((i + 1) / 4))))
    ramp.append(f" {signed(scale, digits)}")
    t = label(result.target, result) if result.versus is None else (
        f"{label(result.target, result)} over {label(result.versus, result)}")
    words = [ramp, Text(f"+ (blue) pushes toward {t}", style="dim"),
             Text("− (red) away", style="dim"), Text("0 gray", style="dim")]
    return flow(words, width, sep="  ·  ")


def ranked(result, count: int, width: int) -> Text:
    """The strongest components by |logit|, each with a bar left (−) or right (+) of an axis."""
    a = result.attribution
    order = dla.ranked(a)[:count]
    scale = float(np.max(np.abs(a.logits))) or 1.0
    # Each value with the decimals its size allows: a +756 beside a −0.27 keeps both readable.
    values = {i: signed(float(a.logits[i]), formats.signed_decimals(a.logits[i:i + 1]))
              for i in order}
    name_w = max(cell_len("component"), *(cell_len(a.components[i].name) for i in order))
    value_w = max(len("logit"), *(len(values[i]) for i in order))
    rank_w = len(str(count))
    fixed = rank_w + GAP + name_w + GAP + value_w + GAP
    half = min(BAR_HALF, (width - fixed - 1) // 2)
    t = Text(no_wrap=True, overflow="crop")
    t.append(f"strongest components ({len(order)} of {len(a.components)}, by |logit|)\n",
             style="bold")
    t.append(f"{'#':>{rank_w}}  {'component':<{name_w}}  {'logit':>{value_w}}", style="dim")
    for rank, i in enumerate(order, 1):
        v = float(a.logits[i])
        t.append(f"\n{rank:>{rank_w}}  ", style="dim")
        t.append(f"{a.components[i].name:<{name_w}}  ", style="cyan")
        t.append(f"{values[i]:>{value_w}}")
        if half >= 3:
            n = round(abs(v) / scale * half)
            color = Style(color=Color.from_rgb(*(TOWARD if v > 0 else AWAY)))
            t.append("  ")
            t.append(" " * (half - n if v < 0 else half))
            if v < 0:
                t.append("█" * n, style=color)
            t.append("│", style="dim")
            if v > 0:
                t.append("█" * n, style=color)
    return t


def check(result, width: int) -> Text:
    """The sum of the parts against the whole, with the constant said and printed."""
    a = result.attribution
    model = result.before.logit
    parts = float(a.logits.sum())
    sums = [Text("check:", style="bold"), Text(f"Σ components {signed(parts, 4)}"),
            Text(f"+ constant {signed(a.constant, 4)}"), Text(f"= {signed(a.total, 4)};"),
            Text(f"the run's {measure(result)} = {signed(model, 4)}")]
    t = flow(sums, width, sep=" ")
    t.append("\n")
    if a.norm is not None and not a.norm.centred:
        what = (f"constant = 0: no LayerNorm, no bias; the random unembedding reads h / rms(h), "
                f"rms = {a.norm.scale:.4g} frozen from the run, so each component is x·u / rms.")
    elif a.norm is not None:
        what = (f"constant = b_f·u, what the final LayerNorm's bias adds to "
                f"{measure(result)} whatever its input "
                f"(u = W_U[:, {label(result.target, result)}]"
                + (f" − W_U[:, {label(result.versus, result)}]" if result.versus is not None
                   else "")
                + f"; GPT-2 has no unembedding bias). σ = {a.norm.scale:.4g} frozen from the run;"
                " centring is linear, so each component is centred on its own.")
    else:
        what = ("constant = 0: the attn arch has no final LayerNorm and no unembedding bias, so "
                "the logit is the plain sum of the components' x·u.")
    t.append_text(flow([Text(w, style="dim") for w in what.split(" ")], width, sep=" "))
    return t


def lens_view(result, width: int) -> list[RenderableType]:
    lens = result.lens
    p = result.position
    inp = result.trace.inputs[0]
    title = Text("logit lens", style="bold")
    title.append(f" at position {p} ", style="bold")
    title.append(inp.tokens[p].text, style="bold cyan")
    how = ("the residual after each layer through the final LayerNorm and W_U"
           if result.attribution.norm is not None else "the residual after each layer · W_U")
    out: list[RenderableType] = [flow([title, Text(f"({how})", style="dim")], width, sep=" ")]
    column = lens.positions.index(p)
    target = label(result.target, result)
    tops = [label(int(i), result) for i in lens.top_ids[:, column]]
    token_w = max(cell_len("top token"), *(min(cell_len(s), 16) for s in tops))
    layer_w = max(len("layer"), len(f"L{result.layers - 1}"))
    t = Text(no_wrap=True, overflow="crop")
    t.append(f"{'layer':>{layer_w}}  ", style="dim")
    t.append("top token".ljust(token_w), style="dim")
    t.append(f"  {'prob':>6}  ", style="dim")
    t.append(fit(f"p({target})", 10), style="dim")
    t.append(f"  {'rank':>6}", style="dim")
    for layer in range(result.layers):
        t.append(f"\n{f'L{layer}':>{layer_w}}  ", style="cyan")
        name = tops[layer]
        shown = fit(name, token_w).lstrip() if cell_len(name) > token_w else name
        t.append(shown + " " * (token_w - cell_len(shown)), style="bold cyan")
        prob = float(lens.top_probs[layer, column])
        t.append("  ")
        t.append(f"{formats.prob(prob):>6}", style=cell_style(prob))
        t.append(f"  {formats.prob(float(lens.target_probs[layer])):>10}")
        t.append(f"  {int(lens.target_ranks[layer]):>6}")
    out.append(t)
    if result.all_positions:
        out.append(Text())
        out.extend(lens_table(result, width))
    return out


def lens_table(result, width: int) -> list[RenderableType]:
    """Layers × positions: the top next token at each, colored by its probability."""
    lens = result.lens
    inp = result.trace.inputs[0]
    n = len(lens.positions)
    # A window that ends at the explained position where it can.
    start = min(max(0, result.position - LENS_COLUMNS + 1), max(0, n - LENS_COLUMNS))
    shown = list(range(start, min(start + LENS_COLUMNS, n)))
    cell = 7
    layer_w = len(f"L{result.layers - 1}")
    per_block = max(1, (width - layer_w) // (cell + 1))
    title = Text("logit lens, every position: the top next token after each layer", style="bold")
    out: list[RenderableType] = [flow([title, Text("(color: its probability, viridis)",
                                                   style="dim")], width, sep=" ")]
    for b in range(0, len(shown), per_block):
        cols = shown[b:b + per_block]
        t = Text(no_wrap=True, overflow="crop")
        t.append(" " * layer_w)
        for j in cols:
            style = "bold" if lens.positions[j] == result.position else "dim"
            t.append(" " + fit(f"{lens.positions[j]}", cell), style=style)
        t.append("\n" + " " * layer_w)
        for j in cols:
            t.append(" " + fit(inp.tokens[lens.positions[j]].text, cell), style="cyan")
        for layer in range(result.layers):
            t.append("\n")
            t.append(f"L{layer}".ljust(layer_w), style="cyan")
            for j in cols:
                prob = float(lens.top_probs[layer, j])
                t.append(" ")
                t.append(fit(label(int(lens.top_ids[layer, j]), result), cell),
                         style=cell_style(prob))
        out.append(t)
    if len(shown) < n:
        out.append(Text(f"(positions {shown[0]} to {shown[-1]} of {n}; --json has them all)",
                        style="dim italic"))
    return out


def ablation_view(result, width: int) -> Text:
    ab = result.ablated
    names = ", ".join(dla.head_name(layer, head) for layer, head in ab.heads)
    how = ("Z = 0 at every position" if ab.mode == "zero"
           else "Z = its mean over the text's positions")
    t = Text(no_wrap=True, overflow="crop")
    head = flow([Text(f"ablation: {names} {'zeroed' if ab.mode == 'zero' else 'mean-ablated'}",
                      style="bold"), Text(f"({how}; one more forward)", style="dim")],
                width, sep=" ")
    head.no_wrap = False
    target = label(result.target, result)
    rows = [(measure(result), signed(ab.before.logit, 3), signed(ab.after.logit, 3),
             signed(ab.after.logit - ab.before.logit, 3))]
    if result.versus is not None:
        rows.append((f"logit({target})", signed(ab.before.target_logit, 3),
                     signed(ab.after.target_logit, 3),
                     signed(ab.after.target_logit - ab.before.target_logit, 3)))
    rows.append((f"p({target})", formats.prob(ab.before.target_prob),
                 formats.prob(ab.after.target_prob),
                 formats.signed_prob(ab.after.target_prob - ab.before.target_prob)))
    rows.append((f"rank of {target}", str(ab.before.rank), str(ab.after.rank),
                 signed(ab.after.rank - ab.before.rank, 0)))
    name_w = max(cell_len(r[0]) for r in rows)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in
              enumerate(("before", "after", "Δ"), 1)]
    t.append(" " * name_w, style="dim")
    for h, w in zip(("before", "after", "Δ"), widths, strict=True):
        t.append(f"  {h:>{w}}", style="dim")
    for r in rows:
        t.append("\n")
        t.append(r[0] + " " * (name_w - cell_len(r[0])), style="cyan")
        for value, w in zip(r[1:], widths, strict=True):
            t.append(f"  {value:>{w}}")
    out = Text()
    out.append_text(head)
    out.append("\n")
    out.append_text(t)
    for when, o in (("before", ab.before), ("after", ab.after)):
        items = [Text(f"top {len(o.top)} {when}:", style="dim")]
        for token_id, prob, _ in o.top:
            item = Text(label(token_id, result), style="bold cyan" if token_id == result.target
                        else "cyan")
            item.append(f" {formats.prob(prob)}", style="dim")
            items.append(item)
        out.append("\n")
        out.append_text(flow(items, width, sep="  "))
    return out


def rollout_view(result, width: int) -> list[RenderableType]:
    trace = result.trace
    inp = trace.inputs[0]
    title = Text("attention rollout", style="bold")
    formula = Text("(Abnar & Zuidema 2020: Â_l = (mean over heads of A_l + I), each row "
                   "normalised; R = Â_L·…·Â_1; row i: how much of each input token reaches "
                   "position i)", style="dim")
    out: list[RenderableType] = [flow([title, *formula.split(" ")], width, sep=" ")]
    out.append(heatmap(result.rollout, reading_labels(inp), column_labels(inp),
                       f"rollout through {plural(result.layers, 'layer')}", width,
                       mask_marks(trace, "attn", 0)))
    out.append(legend(bool(inp.padding), width, causal=trace.config.mask == "causal",
                      window=trace.config.window))
    return out


# ── JSON ──────────────────────────────────────────────────────────────────────────────────────

def _token(token_id: int, result) -> dict:
    tok = tokenizers.of(result.trace.config)
    if token_id < tok.vocab:
        return token_json(tok.token(token_id))
    return {"id": token_id, "text": label(token_id, result), "bytes": ""}


def _outcome(o, result) -> dict:
    return {"value": o.logit, "target_logit": o.target_logit, "target_prob": o.target_prob,
            "target_rank": o.rank,
            "top": [{"id": i, "text": label(i, result), "prob": p, "logit": lg}
                    for i, p, lg in o.top]}


def document(result) -> bytes:
    """The whole `attn-attribute/1` document (data/attribute.schema.json)."""
    a = result.attribution
    trace = result.trace
    lens = result.lens
    doc = {
        "schema": SCHEMA,
        "version": __version__,
        "config": config_json(trace),
        "inputs": [input_json(i) for i in trace.inputs],
        "trained": result.trained,
        "position": result.position,
        "batch_position": result.batch_position,
        "token": token_json(trace.inputs[0].tokens[result.position]),
        "target": _token(result.target, result),
        "versus": None if result.versus is None else _token(result.versus, result),
        "measure": "logit" if result.versus is None else "logit_difference",
        "prediction": _outcome(result.before, result),
        "final_norm": None if a.norm is None else {
            "kind": "layer_norm" if a.norm.centred else "rms", "scale": a.norm.scale},
        "components": [{"name": c.name, "kind": c.kind, "layer": c.layer, "head": c.head,
                        "logit": float(v)} for c, v in zip(a.components, a.logits,
                                                           strict=True)],
        "constant": a.constant,
        "total": a.total,
        "logit_lens_positions": lens.positions,
        "logit_lens": [[{"id": int(lens.top_ids[layer, j]),
                         "text": label(int(lens.top_ids[layer, j]), result),
                         "prob": float(lens.top_probs[layer, j])}
                        for j in range(len(lens.positions))] for layer in range(result.layers)],
        "logit_lens_target": [{"logit": float(lens.target_logits[layer]),
                               "prob": float(lens.target_probs[layer]),
                               "rank": int(lens.target_ranks[layer])}
                              for layer in range(result.layers)],
    }
    if result.ablated is not None:
        ab = result.ablated
        doc["ablation"] = {"mode": ab.mode,
                           "heads": [{"name": dla.head_name(layer, head), "layer": layer,
                                      "head": head} for layer, head in ab.heads],
                           "before": _outcome(ab.before, result),
                           "after": _outcome(ab.after, result),
                           "delta_value": ab.after.logit - ab.before.logit,
                           "delta_target_prob": ab.after.target_prob - ab.before.target_prob}
    body = orjson.dumps(doc)
    if result.rollout is None:
        return body + b"\n"
    return (body[:-1] + b',"rollout":{"layers":' + str(result.layers).encode()
            + b',"matrix":' + array_json(result.rollout) + b"}}\n")
