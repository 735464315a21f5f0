"""Llama, Mistral and Qwen2 checkpoints under our names.

transformers' nn.Linear stores W as [out, in]; ours is [in, out] (x @ W), so every projection is
read as its transpose, here (a view: x @ W runs on it as it is). The three families share their
names:

    model.embed_tokens.weight                  → wte         [vocab, d_model]
    model.layers.L.input_layernorm.weight      → blocks.L.ln_1.w
    model.layers.L.self_attn.q_proj.weight     → blocks.L.attn.W_Q   (.bias → b_Q: Qwen2)
    model.layers.L.self_attn.k_proj / v_proj   → W_K, W_V  [d_model, kv_heads·d_head]
    model.layers.L.self_attn.o_proj.weight     → blocks.L.attn.W_O
    model.layers.L.post_attention_layernorm    → blocks.L.ln_2.w
    model.layers.L.mlp.gate_proj / up_proj     → blocks.L.mlp.W_gate, W_in
    model.layers.L.mlp.down_proj               → blocks.L.mlp.W_out
    model.norm.weight                          → ln_f.w
    lm_head.weight                             → lm_head (absent when tied to wte)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from attn_tracer.model.checkpoint import Checkpoint
from attn_tracer.model.checkpoint.config_json import _config_eps, _config_int, _json_type, _short
from attn_tracer.model.checkpoint.source import _weights_file
from attn_tracer.model.checkpoint.tensors import _checked, _read_weights
from attn_tracer.model.memory import human
from attn_tracer.model.safetensors_io import CheckpointError, CheckpointUsageError

_PREFIX = "model."
_HEAD = "lm_head.weight"
# Buffers some checkpoints store beside the weights: not parameters.
_IGNORED = ("rotary_emb.inv_freq",)


def load_directory(source: str, directory: Path, config: dict[str, Any], max_bytes: int | None,
                   expect=None) -> Checkpoint:
    config_path = directory / "config.json"
    kind = config["model_type"]
    sizes, model = _read(config_path, config, kind)
    if expect is not None:
        expect(model)
    weights_path = _weights_file(directory)
    raw = {k: v for k, v in _read_weights(weights_path, max_bytes).items()
           if not k.endswith(_IGNORED)}
    _check_layers(weights_path, raw, sizes["layers"])
    _check_size(weights_path, raw, sizes, model, max_bytes)
    params = _params(weights_path, raw, sizes, model)
    return Checkpoint(source=source, path=str(weights_path.absolute()), d_model=sizes["d_model"],
                      heads=sizes["heads"], layers=sizes["layers"], n_ctx=sizes["n_ctx"],
                      vocab=sizes["vocab"], ln_eps=sizes["ln_eps"], params=params,
                      d_mlp=sizes["d_mlp"], model=model, d_head_=sizes["d_head"])


def _read(config_path: Path, config: dict[str, Any], kind: str) -> tuple[dict, dict]:
    """(sizes, Config fields) from config.json, refusing switches attn does not implement."""
    def integer(name: str) -> int:
        return _config_int(config_path, config, name)

    act = config.get("hidden_act", "silu")
    if act != "silu":
        shown = _short(act) if isinstance(act, str) else f"a JSON {_json_type(act)}"
        raise CheckpointError(f"{config_path} sets hidden_act to {shown}; attn implements the "
                              "SwiGLU MLP with 'silu' only, so it would trace different math")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    rope_type = (rope.get("rope_type") if isinstance(rope, dict) else None) or (
        scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None)
    if rope_type not in (None, "default"):
        raise CheckpointError(f"{config_path} scales its rotary positions ({_short(str(rope_type))}"
                              "); attn implements plain rotary positions only")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta if theta is not None else config.get("rope_theta", 10000.0)
    if not isinstance(theta, int | float) or isinstance(theta, bool) or not theta > 1:
        raise CheckpointError(f"{config_path}: rope_theta must be a number above 1")
    d_model, heads = integer("hidden_size"), integer("num_attention_heads")
    kv_heads = integer("num_key_value_heads") if config.get("num_key_value_heads") else heads
    d_head = integer("head_dim") if config.get("head_dim") else None
    if d_head is None:
        if d_model % heads:
            raise CheckpointError(f"{config_path}: heads={heads} does not divide "
                                  f"d_model={d_model} and no head_dim is set")
        d_head = d_model // heads
    if heads % kv_heads:
        raise CheckpointError(f"{config_path}: num_key_value_heads={kv_heads} does not divide "
                              f"num_attention_heads={heads}")
    factor = config.get("partial_rotary_factor", 1.0)
    rotary_dims = int(d_head * factor) if isinstance(factor, int | float) else d_head
    window = None
    if kind == "mistral":
        window = config.get("sliding_window")
    elif kind == "qwen2" and config.get("use_sliding_window"):
        raise CheckpointError(f"{config_path} turns on Qwen2's per-layer sliding windows "
                              "(use_sliding_window); attn implements one window for every layer")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                               or window < 1):
        raise CheckpointError(f"{config_path}: sliding_window must be a positive integer")
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise CheckpointError(f"{config_path}: 'tie_word_embeddings' must be true or false")
    qkv_bias = kind == "qwen2" or bool(config.get("attention_bias", False))
    sizes = {"d_model": d_model, "heads": heads, "kv_heads": kv_heads, "d_head": d_head,
             "layers": integer("num_hidden_layers"), "d_mlp": integer("intermediate_size"),
             "vocab": integer("vocab_size"), "n_ctx": integer("max_position_embeddings"),
             "ln_eps": _config_eps(config_path, config, "rms_norm_eps", 1e-6), "tied": tied,
             "qkv_bias": qkv_bias,
             "o_bias": kind == "llama" and bool(config.get("attention_bias", False)),
             "mlp_bias": kind == "llama" and bool(config.get("mlp_bias", False))}
    model = {"arch": "llama", "pos": "rotary", "norm": "rms", "mlp": "swiglu",
             "bias": qkv_bias, "kv_heads": kv_heads, "window": window,
             "rotary_dims": rotary_dims, "rope_theta": float(theta), "model_type": kind}
    return sizes, model


def _check_layers(path: Path, raw: Mapping[str, Any], expected: int) -> None:
    found = {int(m.group(1)) for key in raw
             if (m := re.match(r"model\.layers\.(\d{1,9})\.", key))}
    if found != set(range(expected)):
        raise CheckpointError(f"config.json says num_hidden_layers={expected} but {path.name} "
                              f"holds {len(found)} layer{'s' if len(found) != 1 else ''}")


def _check_size(path: Path, raw, sizes: dict, model: dict, max_bytes: int | None) -> None:
    """Refuse, from the shapes alone, weights whose float32 copies would not fit."""
    if max_bytes is None:
        return
    d, m, w = sizes["d_model"], sizes["d_mlp"], sizes["heads"] * sizes["d_head"]
    kv = sizes["kv_heads"] * sizes["d_head"]
    per_layer = 2 * d * w + 2 * d * kv + 3 * d * m + 2 * d + 2 * (w + kv)
    tables = sizes["vocab"] * d * (2 if _HEAD in raw else 1)
    # Each projection is read, then transposed into a copy: two alive at once, briefly.
    needed = 4 * (tables + sizes["layers"] * per_layer + d) + 4 * max(d * m, sizes["vocab"] * d)
    if needed > max_bytes:
        raise CheckpointUsageError(
            f"{path}: its weights ({sizes['layers']} layers, d_model {d}) need about "
            f"{human(needed)} of memory in float32, over the {human(max_bytes)} allowed; raise "
            "--max-memory if the machine has it")


def _params(path: Path, raw: Mapping[str, Any], sizes: dict, model: dict
            ) -> dict[str, np.ndarray]:
    d, m = sizes["d_model"], sizes["d_mlp"]
    w, kv = sizes["heads"] * sizes["d_head"], sizes["kv_heads"] * sizes["d_head"]

    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        return _checked(path, raw, key, shape)

    def linear(key: str, n_in: int, n_out: int) -> np.ndarray:
        """nn.Linear's [out, in] weight as our [in, out]: the transposed view, not a copy (BLAS
        multiplies by a transposed operand as fast; copying every projection of a 0.5B model
        into the other order took 3 s of a 12 s run)."""
        return get(key, (n_out, n_in)).T

    params = {"wte": get(_PREFIX + "embed_tokens.weight", (sizes["vocab"], d))}
    for i in range(sizes["layers"]):
        h, b = f"{_PREFIX}layers.{i}.", f"blocks.{i}."
        a = h + "self_attn."
        params[b + "ln_1.w"] = get(h + "input_layernorm.weight", (d,))
        for name, width in (("q", w), ("k", kv), ("v", kv)):
            params[f"{b}attn.W_{name.upper()}"] = linear(f"{a}{name}_proj.weight", d, width)
            if sizes["qkv_bias"]:
                params[f"{b}attn.b_{name.upper()}"] = get(f"{a}{name}_proj.bias", (width,))
        params[b + "attn.W_O"] = linear(a + "o_proj.weight", w, d)
        if sizes["o_bias"]:
            params[b + "attn.b_O"] = get(a + "o_proj.bias", (d,))
        params[b + "ln_2.w"] = get(h + "post_attention_layernorm.weight", (d,))
        params[b + "mlp.W_gate"] = linear(h + "mlp.gate_proj.weight", d, m)
        params[b + "mlp.W_in"] = linear(h + "mlp.up_proj.weight", d, m)
        params[b + "mlp.W_out"] = linear(h + "mlp.down_proj.weight", m, d)
        if sizes["mlp_bias"]:
            params[b + "mlp.b_gate"] = get(h + "mlp.gate_proj.bias", (m,))
            params[b + "mlp.b_in"] = get(h + "mlp.up_proj.bias", (m,))
            params[b + "mlp.b_out"] = get(h + "mlp.down_proj.bias", (d,))
    params["ln_f.w"] = get(_PREFIX + "norm.weight", (d,))
    if _HEAD in raw:
        head = get(_HEAD, (sizes["vocab"], d))
        if not np.array_equal(head, params["wte"]):
            params["lm_head"] = head
    elif not sizes["tied"]:
        raise CheckpointError(f"{path} has no {_HEAD!r}, but its config.json unties the output "
                              "head (tie_word_embeddings is false): the logits have no weights")
    return params
