"""GPT-2's checkpoints under our names (`x @ W`, W as [in, out]: GPT-2's Conv1D already stores
its weights so, and c_attn/c_proj/c_fc need no transpose; c_attn is only split into Q, K, V)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attn_tracer.model.checkpoint import Checkpoint
from attn_tracer.model.checkpoint.config_json import (
    _check_heads,
    _config_eps,
    _config_int,
    _json_type,
    _short,
)
from attn_tracer.model.checkpoint.source import _weights_file
from attn_tracer.model.checkpoint.tensors import _checked, _read_weights, _shape
from attn_tracer.model.memory import human
from attn_tracer.model.safetensors_io import (
    CheckpointError,
    CheckpointUsageError,
)

DEFAULT_LN_EPS = 1e-5
GPT2_D_HEAD = 64  # every GPT-2 size uses 64-wide heads; the default when a file has no config
GPT2_VOCAB = 50257  # the tokenizer's ids run to 50256 (<|endoftext|>): wte needs every one

# Keys in GPT-2 checkpoints that are not weights: the causal-mask buffers.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_PREFIX = "transformer."  # GPT2LMHeadModel nests the GPT2Model weights under this
_HEAD = "lm_head.weight"  # GPT2LMHeadModel's output head, [vocab, d_model]; tied to wte in GPT-2


@dataclass(frozen=True)
class _Dims:
    d_model: int
    heads: int
    layers: int
    n_ctx: int
    vocab: int
    d_mlp: int
    ln_eps: float
    heads_guessed: bool = False
    tied: bool | None = None  # config.json's tie_word_embeddings; None: a bare file, no config



# The Config fields of every GPT-2 checkpoint, beside its sizes.
MODEL = {"arch": "gpt2", "pos": "learned", "bias": True}


def load_directory(source: str, directory: Path, config: dict[str, Any], max_bytes: int | None,
                   expect=None) -> Checkpoint:
    config_path = directory / "config.json"
    dims = _dims(config_path, config)
    if expect is not None:
        expect(MODEL)
    weights_path = _weights_file(directory)
    raw = _strip_keys(_read_weights(weights_path, max_bytes))
    _check_layers(weights_path, raw, dims.layers, f"{directory / 'config.json'} says n_layer="
                                                  f"{dims.layers}")
    _check_size(weights_path, raw, dims, max_bytes)
    params, against_config = _canonical_params(weights_path, raw, dims)
    return _checkpoint(source, weights_path, dims, params, against_config)


def load_file(source: str, path: Path, heads: int | None, max_bytes: int | None,
              expect=None) -> Checkpoint:
    """A bare weights file: GPT-2's names, the sizes read off the tensors."""
    if expect is not None:
        expect(MODEL)
    raw = _strip_keys(_read_weights(path, max_bytes))
    dims = _infer_dims(path, raw, heads)
    _check_size(path, raw, dims, max_bytes)
    params, against_config = _canonical_params(path, raw, dims)
    return _checkpoint(source, path, dims, params, against_config)


def _checkpoint(source: str, path: Path, dims: _Dims, params: dict[str, np.ndarray],
                head_untied_against_config: bool = False) -> Checkpoint:
    if dims.vocab < GPT2_VOCAB:
        raise CheckpointError(
            f"{path}: the vocabulary has {dims.vocab} tokens, fewer than the {GPT2_VOCAB} of "
            "GPT-2's tokenizer, which attn uses; this is not a GPT-2 checkpoint"
        )
    return Checkpoint(
        source=source,
        path=str(path.absolute()),
        d_model=dims.d_model,
        heads=dims.heads,
        layers=dims.layers,
        n_ctx=dims.n_ctx,
        vocab=dims.vocab,
        ln_eps=dims.ln_eps,
        params=params,
        d_mlp=dims.d_mlp,
        heads_guessed=dims.heads_guessed,
        head_untied_against_config=head_untied_against_config,
    )



def _dims(config_path: Path, config: dict[str, Any]) -> _Dims:
    _check_supported(config_path, config)
    d_model = _config_int(config_path, config, "n_embd")
    heads = _config_int(config_path, config, "n_head")
    n_inner = config.get("n_inner")
    tied = config.get("tie_word_embeddings", True)
    if not isinstance(tied, bool):
        raise CheckpointError(f"{config_path}: 'tie_word_embeddings' must be true or false, got "
                              f"a JSON {_json_type(tied)}")
    dims = _Dims(
        d_model=d_model,
        heads=heads,
        layers=_config_int(config_path, config, "n_layer"),
        n_ctx=_config_int(config_path, config, "n_positions"),
        vocab=_config_int(config_path, config, "vocab_size"),
        d_mlp=4 * d_model if n_inner is None else _config_int(config_path, config, "n_inner"),
        ln_eps=_config_eps(config_path, config),
        tied=tied,
    )
    _check_heads(str(config_path), d_model, heads)
    return dims



# value, so a checkpoint that sets another is refused rather than traced wrong. (Hugging Face's
# reorder_and_upcast_attn only changes the rounding in half precision, so it may take any value.)
GPT2_SWITCHES = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # the same tanh approximation
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
}


def _check_supported(config_path: Path, config: dict[str, Any]) -> None:
    for name, allowed in GPT2_SWITCHES.items():
        if name in config and config[name] not in allowed:
            value = config[name]
            shown = (_short(value) if isinstance(value, str) else repr(value)
                     if isinstance(value, bool) else f"a JSON {_json_type(value)}")
            raise CheckpointError(
                f"{config_path} sets {name} to {shown}; attn implements GPT-2's "
                f"{allowed[0]!r} only, so it would trace different math"
            )



def _infer_dims(path: Path, raw: Mapping[str, Any], heads: int | None) -> _Dims:
    """Read the dimensions of a bare weights file off its tensor shapes."""
    wte = _shape(path, raw, "wte.weight", ndim=2)
    wpe = _shape(path, raw, "wpe.weight", ndim=2)
    c_fc = _shape(path, raw, "h.0.mlp.c_fc.weight", ndim=2)
    vocab, d_model = wte
    layers = _check_layers(path, raw, None, "")
    guessed = heads is None
    if guessed:
        heads = d_model // GPT2_D_HEAD
        if heads == 0:
            raise CheckpointUsageError(
                f"{path}: d_model={d_model} is smaller than GPT-2's head size {GPT2_D_HEAD}; "
                "say how many heads the model has with --heads"
            )
    elif heads <= 0 or d_model % heads:
        raise CheckpointUsageError(
            f"--heads {heads}: heads={heads} does not divide d_model={d_model} of {path.name}; "
            "pick a head count that divides it"
        )
    _check_heads(str(path), d_model, heads)
    return _Dims(
        d_model=d_model,
        heads=heads,
        layers=layers,
        n_ctx=wpe[0],
        vocab=vocab,
        d_mlp=c_fc[1],
        ln_eps=DEFAULT_LN_EPS,
        heads_guessed=guessed,
    )


def _check_layers(path: Path, raw: Mapping[str, Any], expected: int | None, claim: str) -> int:
    """The number of blocks h.0 … h.N-1 the file holds, checked to be numbered without gaps (and
    to be `expected`, which `claim` states), before a table of shapes is built for any of them:
    a key h.99999999 or an n_layer of ten million must not make us build ten million rows."""
    # At most 9 digits: a longer number is no block of ours, and int() of a 5,000-digit one fails.
    layer_ids = {int(m.group(1)) for key in raw if (m := re.match(r"h\.(\d{1,9})\.", key))}
    found = max(layer_ids) + 1 if layer_ids else 0
    if found != len(layer_ids):
        # The first gap, from the ids present: range(found) may be a hundred million long.
        missing = next(i for i, n in enumerate(sorted(layer_ids)) if i != n)
        raise CheckpointError(f"{path} numbers its blocks up to h.{found - 1} but has no h."
                              f"{missing}: it holds {len(layer_ids)} of {found} blocks")
    if expected is not None and expected != found:
        raise CheckpointError(f"{claim} but {path.name} holds {found} block"
                              f"{'s' if found != 1 else ''} (h.0 to h.{found - 1})"
                              if found else f"{claim} but {path.name} holds no blocks")
    if not found:
        raise CheckpointError(f"{path} has no 'h.0.…' tensors (is it a GPT-2 checkpoint?)")
    return found


def _check_size(path: Path, raw: Mapping[str, Any], dims: _Dims, max_bytes: int | None) -> None:
    """Refuse, from the shapes alone, weights whose float32 copies would not fit in max_bytes."""
    if max_bytes is None:
        return
    d, m = dims.d_model, dims.d_mlp
    per_layer = 4 * d + 4 * d * d + 4 * d + 2 * d * m + m + d
    tables = (dims.vocab * (2 if _HEAD in raw else 1) + dims.n_ctx) * d
    # c_attn is copied whole, then split into Q, K and V: both are alive until the end of loading.
    needed = 4 * (tables + dims.layers * (per_layer + 3 * d * d + 3 * d) + 2 * d)
    if needed > max_bytes:
        raise CheckpointUsageError(
            f"{path}: its weights ({dims.layers} block{'s' if dims.layers != 1 else ''}, "
            f"d_model {d}) need about {human(needed)} of memory in float32, "
            f"over the {human(max_bytes)} allowed; raise --max-memory if the machine has it")



def _strip_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    stripped = {}
    for key, value in raw.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        stripped[key.removeprefix(_PREFIX)] = value
    return stripped


def _expected_shapes(dims: _Dims) -> dict[str, tuple[int, ...]]:
    """Source key → shape, for every weight a GPT-2 of these dimensions must have."""
    d, d_mlp = dims.d_model, dims.d_mlp
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (dims.vocab, d),
        "wpe.weight": (dims.n_ctx, d),
    }
    for i in range(dims.layers):
        shapes |= {
            f"h.{i}.ln_1.weight": (d,),
            f"h.{i}.ln_1.bias": (d,),
            f"h.{i}.attn.c_attn.weight": (d, 3 * d),
            f"h.{i}.attn.c_attn.bias": (3 * d,),
            f"h.{i}.attn.c_proj.weight": (d, d),
            f"h.{i}.attn.c_proj.bias": (d,),
            f"h.{i}.ln_2.weight": (d,),
            f"h.{i}.ln_2.bias": (d,),
            f"h.{i}.mlp.c_fc.weight": (d, d_mlp),
            f"h.{i}.mlp.c_fc.bias": (d_mlp,),
            f"h.{i}.mlp.c_proj.weight": (d_mlp, d),
            f"h.{i}.mlp.c_proj.bias": (d,),
        }
    shapes |= {"ln_f.weight": (d,), "ln_f.bias": (d,)}
    return shapes


def _canonical_params(path: Path, raw: Mapping[str, Any],
                      dims: _Dims) -> tuple[dict[str, np.ndarray], bool]:
    """The weights under canonical names, and whether lm_head is used against config.json."""
    source = {key: _checked(path, raw, key, shape) for key, shape in _expected_shapes(dims).items()}
    d = dims.d_model
    params = {"wte": source["wte.weight"], "wpe": source["wpe.weight"]}
    for i in range(dims.layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        w_qkv, b_qkv = source[h + "attn.c_attn.weight"], source[h + "attn.c_attn.bias"]
        for j, name in enumerate("QKV"):  # c_attn's output columns are [q | k | v]
            params[f"{b}attn.W_{name}"] = w_qkv[:, j * d : (j + 1) * d].copy()
            params[f"{b}attn.b_{name}"] = b_qkv[j * d : (j + 1) * d].copy()
        params |= {
            b + "ln_1.w": source[h + "ln_1.weight"],
            b + "ln_1.b": source[h + "ln_1.bias"],
            b + "attn.W_O": source[h + "attn.c_proj.weight"],
            b + "attn.b_O": source[h + "attn.c_proj.bias"],
            b + "ln_2.w": source[h + "ln_2.weight"],
            b + "ln_2.b": source[h + "ln_2.bias"],
            b + "mlp.W_in": source[h + "mlp.c_fc.weight"],
            b + "mlp.b_in": source[h + "mlp.c_fc.bias"],
            b + "mlp.W_out": source[h + "mlp.c_proj.weight"],
            b + "mlp.b_out": source[h + "mlp.c_proj.bias"],
        }
    params |= {"ln_f.w": source["ln_f.weight"], "ln_f.b": source["ln_f.bias"]}
    head = _output_head(path, raw, dims, params["wte"])
    if head is not None:
        params["lm_head"] = head
    return params, head is not None and dims.tied is True


def _output_head(path: Path, raw: Mapping[str, Any], dims: _Dims,
                 wte: np.ndarray) -> np.ndarray | None:
    """lm_head.weight [vocab, d_model] when the checkpoint has an output head of its own; None
    when logits come from wte (tied, as in GPT-2).

    As transformers decides: a head that is present and differs from wte is used, whatever
    config.json says about tying (transformers then warns and does not tie); one equal to wte
    (a .bin of a tied model stores both) is the same as none. A config that unties the head but
    a file without one is refused: transformers would use a freshly random head.
    """
    if _HEAD not in raw:
        if dims.tied is False:
            raise CheckpointError(f"{path} has no {_HEAD!r}, but its config.json unties the output "
                                  "head (tie_word_embeddings is false): the logits have no weights")
        return None
    head = _checked(path, raw, _HEAD, (dims.vocab, dims.d_model))
    return None if np.array_equal(head, wte) else head

