"""Load GPT-2 weights into plain float32 NumPy arrays under one set of names.

A source is a `save_pretrained` directory, a single .safetensors or .bin file, or a model id
(`gpt2`, `openai-community/gpt2`) looked up in the local Hugging Face cache. Nothing is ever
downloaded, and huggingface_hub is not needed: the cache layout is simple enough to walk.

Names follow the `x @ W` convention with W as [in, out], which is how GPT-2's Conv1D already
stores its weights, so c_attn/c_proj/c_fc need no transpose; c_attn is only split into Q, K, V.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attn_tracer.safetensors_io import CheckpointError, CheckpointUsageError, read_safetensors

__all__ = ["Checkpoint", "CheckpointError", "hf_cache_dir", "load_checkpoint"]

DEFAULT_LN_EPS = 1e-5
GPT2_D_HEAD = 64  # every GPT-2 size uses 64-wide heads; the default when a file has no config
GPT2_VOCAB = 50257  # the tokenizer's ids run to 50256 (<|endoftext|>): wte needs every one

_SAFETENSORS = ".safetensors"
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")

# Ids that moved on the Hub: the cache may hold either spelling, depending on which was used.
_ID_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

# Keys in GPT-2 checkpoints that are not weights: causal-mask buffers and the tied unembedding.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_IGNORED_KEYS = {"lm_head.weight"}
_PREFIX = "transformer."  # GPT2LMHeadModel nests the GPT2Model weights under this


@dataclass(frozen=True)
class Checkpoint:
    source: str  # what the user passed, for messages/JSON
    path: str  # the resolved file that was read
    d_model: int
    heads: int
    layers: int
    n_ctx: int
    vocab: int
    ln_eps: float
    params: dict[str, np.ndarray] = field(repr=False)  # float32, canonical names
    d_mlp: int = 0  # the MLP's width (GPT-2: 4·d_model; n_inner where a config sets it)
    heads_guessed: bool = False  # a bare weights file: heads from GPT-2's head size, not told

    @property
    def d_head(self) -> int:
        return self.d_model // self.heads


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


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repos, resolved from the environment as it does."""
    if hub_cache := os.environ.get("HF_HUB_CACHE"):
        return Path(hub_cache).expanduser()
    if hf_home := os.environ.get("HF_HOME"):
        return Path(hf_home).expanduser() / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg_cache).expanduser() / "huggingface" / "hub"


def load_checkpoint(source: str, heads: int | None = None) -> Checkpoint:
    """Load GPT-2 weights from a directory, a .safetensors/.bin file or a cached model id.

    `heads` is only used for a single file, which has no config to say it; a directory's
    config.json always wins.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_directory(source, path)
    if path.is_file():
        return _load_file(source, path, heads)
    if _looks_like_model_id(source):
        return _load_directory(source, _find_in_cache(source))
    raise CheckpointUsageError(f"no such file or directory: {source}")


# -- sources ---------------------------------------------------------------------------------


def _load_directory(source: str, directory: Path) -> Checkpoint:
    dims = _read_config(directory)
    weights_path = _weights_file(directory)
    raw = _read_weights(weights_path)
    params = _canonical_params(weights_path, _strip_keys(raw), dims)
    return _checkpoint(source, weights_path, dims, params)


def _load_file(source: str, path: Path, heads: int | None) -> Checkpoint:
    raw = _strip_keys(_read_weights(path))
    dims = _infer_dims(path, raw, heads)
    params = _canonical_params(path, raw, dims)
    return _checkpoint(source, path, dims, params)


def _checkpoint(source: str, path: Path, dims: _Dims, params: dict[str, np.ndarray]) -> Checkpoint:
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
    )


def _looks_like_model_id(source: str) -> bool:
    if source.endswith((_SAFETENSORS, *_TORCH_SUFFIXES)) or ".." in source:
        return False
    # `org/name` contains "/" (os.sep on POSIX), so the id pattern decides, not the separator.
    return _MODEL_ID.fullmatch(source) is not None


def _cache_folder_names(model_id: str) -> list[str]:
    ids = [model_id]
    alias = _ID_ALIASES.get(model_id)
    if alias is None:  # the reverse direction: `openai-community/gpt2` may be cached as `gpt2`
        alias = next((short for short, full in _ID_ALIASES.items() if full == model_id), None)
    if alias is not None:
        ids.append(alias)
    return ["models--" + i.replace("/", "--") for i in ids]


def _find_in_cache(model_id: str) -> Path:
    """Return the snapshot folder of a cached model, as huggingface_hub would resolve `main`."""
    cache = hf_cache_dir()
    names = _cache_folder_names(model_id)
    for name in names:
        repo = cache / name
        if repo.is_dir():
            return _snapshot(model_id, repo)
    raise CheckpointError(
        f"model {model_id!r} not found in the Hugging Face cache at {cache} "
        f"(looked for {', '.join(names)}); "
        f"download it once with: huggingface-cli download {model_id}"
    )


def _snapshot(model_id: str, repo: Path) -> Path:
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        candidates = [snapshots / commit]
    else:
        # Without refs/main (a cache copied by hand), one snapshot is unambiguous; more are not.
        candidates = sorted(p for p in snapshots.glob("*") if p.is_dir())
        if len(candidates) != 1:
            candidates = []
    if not candidates or not candidates[0].is_dir():
        raise CheckpointError(
            f"model {model_id!r} is only partly in the Hugging Face cache at {repo} "
            f"(no snapshot for refs/main); download it again with: "
            f"huggingface-cli download {model_id}"
        )
    return candidates[0]


def _weights_file(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():  # is_file follows the cache's symlinks into blobs/
            return directory / name
    if (directory / "model.safetensors.index.json").is_file():
        raise CheckpointError(
            f"{directory} holds a sharded checkpoint (model.safetensors.index.json), "
            "which is not supported; GPT-2 sizes ship as one model.safetensors"
        )
    raise CheckpointError(
        f"{directory} has no model.safetensors or pytorch_model.bin "
        "(for a cached model, download the weights with: huggingface-cli download <model id>)"
    )


# -- config ----------------------------------------------------------------------------------


def _read_config(directory: Path) -> _Dims:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} is not a model directory: config.json is missing "
            "(pass a .safetensors/.bin file directly, or a save_pretrained folder)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {config_path}: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    model_type = config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(
            f"{config_path} describes a {model_type!r} model; only GPT-2 checkpoints are supported"
        )
    _check_supported(config_path, config)
    d_model = _config_int(config_path, config, "n_embd")
    heads = _config_int(config_path, config, "n_head")
    n_inner = config.get("n_inner")
    dims = _Dims(
        d_model=d_model,
        heads=heads,
        layers=_config_int(config_path, config, "n_layer"),
        n_ctx=_config_int(config_path, config, "n_positions"),
        vocab=_config_int(config_path, config, "vocab_size"),
        d_mlp=4 * d_model if n_inner is None else _config_int(config_path, config, "n_inner"),
        ln_eps=_config_eps(config_path, config),
    )
    _check_heads(str(config_path), d_model, heads)
    return dims


# Config switches that change the math, and the value GPT-2 has: attn implements only that
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
            raise CheckpointError(
                f"{config_path} sets {name}={config[name]!r}; attn implements GPT-2's "
                f"{allowed[0]!r} only, so it would trace different math"
            )


def _config_int(config_path: Path, config: dict[str, Any], name: str) -> int:
    if name not in config:
        raise CheckpointError(f"{config_path} has no {name!r} field (is it a GPT-2 config?)")
    value = config[name]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{config_path}: {name!r} must be a positive integer, got {value!r}")
    return value


def _config_eps(config_path: Path, config: dict[str, Any]) -> float:
    eps = config.get("layer_norm_epsilon", DEFAULT_LN_EPS)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise CheckpointError(
            f"{config_path}: 'layer_norm_epsilon' must be a positive number, got {eps!r}"
        )
    return float(eps)


def _check_heads(where: str, d_model: int, heads: int) -> None:
    if heads <= 0 or d_model % heads:
        raise CheckpointError(
            f"{where}: heads={heads} does not divide d_model={d_model}; "
            "pick a head count that divides it"
        )


def _infer_dims(path: Path, raw: Mapping[str, Any], heads: int | None) -> _Dims:
    """Read the dimensions of a bare weights file off its tensor shapes."""
    wte = _shape(path, raw, "wte.weight", ndim=2)
    wpe = _shape(path, raw, "wpe.weight", ndim=2)
    c_fc = _shape(path, raw, "h.0.mlp.c_fc.weight", ndim=2)
    vocab, d_model = wte
    layer_ids = {int(m.group(1)) for key in raw if (m := re.match(r"h\.(\d+)\.", key))}
    # Gaps in the numbering surface later as a missing key, which names the block.
    layers = max(layer_ids) + 1
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


def _shape(path: Path, raw: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    if key not in raw:
        raise CheckpointError(f"{path} has no {key!r} tensor (is it a GPT-2 checkpoint?)")
    shape = tuple(raw[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{path}: {key!r} has shape {list(shape)}, expected {ndim} dims")
    return shape


# -- weights ---------------------------------------------------------------------------------


def _read_weights(path: Path) -> dict[str, Any]:
    if path.name.endswith(_SAFETENSORS):
        tensors, _metadata = read_safetensors(path)
        return tensors
    if path.name.endswith(_TORCH_SUFFIXES):
        return _read_torch(path)
    raise CheckpointError(
        f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
        "expected a .safetensors or .bin file, or a model directory"
    )


def _read_torch(path: Path) -> dict[str, Any]:
    _check_torch_signature(path)
    try:
        import torch
    except ImportError as e:
        from attn_tracer.engine import INSTALL_TORCH

        raise CheckpointError(
            f"reading {path} needs PyTorch, which is not installed: {INSTALL_TORCH}, or use "
            "a .safetensors file"
        ) from e
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it then reads fine; not the user's concern.
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(
                f"refusing to load {path}: it is not a plain tensor checkpoint "
                f"(weights_only=True rejected it: {_short_reason(e)})"
            ) from e
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {_short_reason(e)}"
        ) from e
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError... on corrupt files
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {_short_reason(e)}"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict of named tensors"
        )
    return {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}


def _check_torch_signature(path: Path) -> None:
    """Reject files that are neither torch's zip format nor a pickle before torch sees them."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    # torch.save writes a zip archive; the legacy format and plain pickles open with PROTO 0x80.
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: it is neither a zip archive nor a pickle"
        )


def _short_reason(error: BaseException) -> str:
    """The informative line of a torch error, without its boilerplate about weights_only."""
    boilerplate = ("weights only load failed", "please file an issue", "check the documentation")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.lower().startswith(boilerplate)]
    reason = (useful or lines or [type(error).__name__])[0]
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _strip_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    stripped = {}
    for key, value in raw.items():
        if key in _IGNORED_KEYS or key.endswith(_IGNORED_SUFFIXES):
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


def _canonical_params(path: Path, raw: Mapping[str, Any], dims: _Dims) -> dict[str, np.ndarray]:
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
    return params


def _checked(path: Path, raw: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor under `key` as a fresh float32 C-contiguous array, after checking its shape."""
    if key not in raw:
        raise CheckpointError(f"{path} is missing the weight {key!r} (is it a GPT-2 checkpoint?)")
    array = _to_numpy(raw[key])
    if array.shape != shape:
        raise CheckpointError(
            f"{path}: weight {key!r} has shape {list(array.shape)}, expected {list(shape)}"
        )
    if array.dtype.kind != "f":
        raise CheckpointError(
            f"{path}: weight {key!r} has dtype {array.dtype}, expected a floating-point type"
        )
    # astype copies, which also detaches the result from the file's memory map.
    return np.ascontiguousarray(array.astype(np.float32))


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    # A torch tensor (only .bin files produce them): widen in torch, since NumPy lacks bf16.
    tensor = value.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.numpy()
