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
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attn_tracer.model.memory import human
from attn_tracer.model.safetensors_io import (
    CheckpointError,
    CheckpointUsageError,
    json_problem,
    read_safetensors,
)

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

# Keys in GPT-2 checkpoints that are not weights: the causal-mask buffers.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_PREFIX = "transformer."  # GPT2LMHeadModel nests the GPT2Model weights under this
_HEAD = "lm_head.weight"  # GPT2LMHeadModel's output head, [vocab, d_model]; tied to wte in GPT-2

# Bounds on what a checkpoint's metadata may claim, checked before anything is allocated. A real
# config.json is about 1 KB, and a state dict's pickle about 100 KB for GPT-2 XL; no GPT-2 has a
# dimension anywhere near 2^31 (NumPy would need int64 strides long before that).
_MAX_CONFIG = 1_000_000
_MAX_PICKLE = 64_000_000
_MAX_DIM = 2**31 - 1
_MAX_REF = 256  # refs/main holds a 40-character commit hash


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
    # config.json ties the output head to wte, but the file's lm_head.weight differs: it is used,
    # as transformers uses it (and warns); the command line says so.
    head_untied_against_config: bool = False

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
    tied: bool | None = None  # config.json's tie_word_embeddings; None: a bare file, no config


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repos, resolved from the environment as it does."""
    if hub_cache := os.environ.get("HF_HUB_CACHE"):
        return _expand("HF_HUB_CACHE", hub_cache)
    if hf_home := os.environ.get("HF_HOME"):
        return _expand("HF_HOME", hf_home) / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return _expand("XDG_CACHE_HOME", xdg_cache) / "huggingface" / "hub"


def _expand(variable: str, value: str) -> Path:
    try:
        return Path(value).expanduser()
    except RuntimeError as e:  # ~user of a user that does not exist, or no home directory
        raise CheckpointError(f"cannot use {variable}={value}: {e}; set it to a path") from None


def load_checkpoint(source: str, heads: int | None = None,
                    max_bytes: int | None = None) -> Checkpoint:
    """Load GPT-2 weights from a directory, a .safetensors/.bin file or a cached model id.

    `heads` is only used for a single file, which has no config to say it; a directory's
    config.json always wins. `max_bytes`: refuse, from the file's header and the config alone,
    before any tensor is read or copied, weights that would need more memory than this.
    """
    if not source.strip():
        raise CheckpointUsageError("--weights is empty: give a directory, a .safetensors or .bin "
                                   "file, or a model id such as gpt2")
    try:
        path = Path(source).expanduser()
        is_dir, is_file = path.is_dir(), path.is_file()
    except RuntimeError as e:  # ~user that does not exist
        raise CheckpointUsageError(f"cannot expand {source}: {e}") from None
    except OSError as e:  # a name too long, a directory we may not search
        raise CheckpointUsageError(f"cannot use {source}: {e.strerror or e}") from None
    if is_dir:
        return _load_directory(source, path, max_bytes)
    if is_file:
        return _load_file(source, path, heads, max_bytes)
    if _looks_like_model_id(source):
        return _load_directory(source, _find_in_cache(source), max_bytes)
    raise CheckpointUsageError(f"no such file or directory: {source}")


# -- sources ---------------------------------------------------------------------------------


def _load_directory(source: str, directory: Path, max_bytes: int | None) -> Checkpoint:
    dims = _read_config(directory)
    weights_path = _weights_file(directory)
    raw = _strip_keys(_read_weights(weights_path, max_bytes))
    _check_layers(weights_path, raw, dims.layers, f"{directory / 'config.json'} says n_layer="
                                                  f"{dims.layers}")
    _check_size(weights_path, raw, dims, max_bytes)
    params, against_config = _canonical_params(weights_path, raw, dims)
    return _checkpoint(source, weights_path, dims, params, against_config)


def _load_file(source: str, path: Path, heads: int | None, max_bytes: int | None) -> Checkpoint:
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
        try:
            found = repo.is_dir()
        except OSError as e:  # a cache folder we may not search
            raise CheckpointError(f"cannot look in the Hugging Face cache at {cache}: "
                                  f"{e.strerror or e}") from None
        if found:
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
        candidates = [snapshots / _read_ref(ref)]
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


def _read_small(path: Path, limit: int, too_long: str) -> bytes:
    """A small metadata file whole, reading at most `limit` + 1 bytes whatever its size."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise CheckpointError(too_long)
    return data


def _read_ref(ref: Path) -> str:
    """The commit refs/main names: one short line of a hash, never a path out of the cache."""
    data = _read_small(ref, _MAX_REF, f"{ref} is over {_MAX_REF} bytes long; it should hold "
                       "one commit hash: download the model again")
    commit = data.decode("ascii", errors="replace").strip()
    if not re.fullmatch(r"[A-Za-z0-9_-][\w.-]*", commit):
        raise CheckpointError(f"{ref} does not hold a commit hash (it holds {data[:40]!r}); "
                              "download the model again")
    return commit


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
    data = _read_small(config_path, _MAX_CONFIG, f"{config_path} is over {human(_MAX_CONFIG)}: "
                       "not a model config (a GPT-2 config.json is about 1 KB)")
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"cannot read {config_path}: it is not UTF-8 text ({e.reason} at "
                              f"byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {config_path}: {json_problem(e)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    model_type = config.get("model_type", "gpt2")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{config_path}: 'model_type' must be a string, got a JSON "
                              f"{_json_type(model_type)}")
    if model_type != "gpt2":
        raise CheckpointError(
            f"{config_path} describes a {_short(model_type)} model; only GPT-2 checkpoints are "
            "supported"
        )
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


def _short(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), "number")


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
            value = config[name]
            shown = (_short(value) if isinstance(value, str) else repr(value)
                     if isinstance(value, bool) else f"a JSON {_json_type(value)}")
            raise CheckpointError(
                f"{config_path} sets {name} to {shown}; attn implements GPT-2's "
                f"{allowed[0]!r} only, so it would trace different math"
            )


def _config_int(config_path: Path, config: dict[str, Any], name: str) -> int:
    if name not in config:
        raise CheckpointError(f"{config_path} has no {name!r} field (is it a GPT-2 config?)")
    value = config[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _MAX_DIM:
        shown = (f"a JSON {_json_type(value)}" if not isinstance(value, int) or
                 isinstance(value, bool) else "a larger one" if value > 0 else repr(value))
        raise CheckpointError(f"{config_path}: {name!r} must be a positive integer up to "
                              f"{_MAX_DIM}, got {shown}")
    return value


def _config_eps(config_path: Path, config: dict[str, Any]) -> float:
    eps = config.get("layer_norm_epsilon", DEFAULT_LN_EPS)
    valid = isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1
    if not valid:
        shown = repr(eps) if isinstance(eps, float) else f"a JSON {_json_type(eps)}"
        raise CheckpointError(
            f"{config_path}: 'layer_norm_epsilon' must be a small positive number, got {shown}"
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


def _shape(path: Path, raw: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    if key not in raw:
        raise CheckpointError(f"{path} has no {key!r} tensor (is it a GPT-2 checkpoint?)")
    shape = tuple(raw[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{path}: {key!r} has shape {list(shape)}, expected {ndim} dims")
    return shape


# -- weights ---------------------------------------------------------------------------------


def _read_weights(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    if path.name.endswith(_SAFETENSORS):
        # Memory-mapped: no tensor is read until it is copied, after the sizes are checked.
        tensors, _metadata = read_safetensors(path)
        return tensors
    if path.name.endswith(_TORCH_SUFFIXES):
        return _read_torch(path, max_bytes)
    raise CheckpointError(
        f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
        "expected a .safetensors or .bin file, or a model directory"
    )


def _read_torch(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    _check_torch_signature(path)
    # Whether torch is there first: without it no .bin can be read, whatever the file says.
    try:
        import torch
    except ImportError as e:
        from attn_tracer.model.engine import INSTALL_TORCH

        raise CheckpointError(
            f"reading {path} needs PyTorch, which is not installed: {INSTALL_TORCH}, or use "
            "a .safetensors file"
        ) from e
    _check_storage_sizes(path, max_bytes)
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
        raise _corrupt(path) from e
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError... on corrupt files
        raise _corrupt(path) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict of named tensors"
        )
    return {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}


def _corrupt(path: Path) -> CheckpointError:
    """A .bin that torch.load could not read. What torch says then is about its pickle
    machinery (a cut zip archive is read as a legacy pickle: "persistent IDs in protocol 0
    must be ASCII strings"), not about the file; --debug shows it in the traceback."""
    return CheckpointError(f"truncated or corrupt checkpoint: {path}; download or save it "
                           "again (torch.load could not read it)")


class _Anything:
    """What the size scan builds in place of every object a pickle names: it runs nothing."""

    name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return _Anything()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


# Bytes per element of torch's storage classes (pickled as torch.FloatStorage and so on); an
# unknown one counts 1, so the scan never overstates a file.
_STORAGE_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4,
                  "Short": 2, "Char": 1, "Byte": 1, "Bool": 1, "ComplexDouble": 16,
                  "ComplexFloat": 8}


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py's MAGIC_NUMBER


class _SizeScan(pickle.Unpickler):
    """Adds up the storage sizes a torch pickle declares, without building anything real: every
    class it names becomes _Anything, so no code of the file's choosing can run."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.storages: dict[str, int] = {}  # by key: tensors that share a storage name it twice

    @property
    def declared(self) -> int:
        return sum(self.storages.values())

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Anything,), {"name": name})

    def persistent_load(self, pid: Any) -> _Anything:
        # torch.save's persistent ids: ("storage", storage class, key, location, numel[, view]).
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind = getattr(pid[1], "name", "").removesuffix("Storage")
            if isinstance(pid[4], int) and not isinstance(pid[4], bool):
                self.storages[str(pid[2])] = max(pid[4], 0) * _STORAGE_BYTES.get(kind, 1)
        return _Anything()


def _check_storage_sizes(path: Path, max_bytes: int | None) -> None:
    """Refuse a .bin whose tensors declare more bytes than the file holds (a zip bomb or a forged
    size: torch would allocate the declared size first) or than max_bytes, before torch.load."""
    file_size = path.stat().st_size
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")
                           or i.filename == "data.pkl"]
                if not pickles:
                    return  # not torch.save's layout: torch.load will say what it is
                if pickles[0].file_size > _MAX_PICKLE:
                    raise CheckpointError(f"{path}: its data.pkl declares "
                                          f"{human(pickles[0].file_size)}, which no state dict "
                                          "needs; it is corrupt or crafted")
                scan = _SizeScan(archive.open(pickles[0]))
                scan.load()
        else:
            with open(path, "rb") as f:
                scan = _SizeScan(f)
                # torch's legacy format is four pickles: a magic number, the protocol, sys info,
                # then the data; anything else is one pickle, which torch.load will judge.
                if scan.load() == _LEGACY_MAGIC:
                    for _ in range(3):
                        scan.load()
    except CheckpointError:
        raise
    except Exception as e:  # any malformed pickle or zip: torch.load would fail on it too
        raise _corrupt(path) from e
    if scan.declared > file_size:
        raise CheckpointError(
            f"{path} declares {human(scan.declared)} of tensor data but the file is "
            f"{human(file_size)}: it is corrupt, compressed or crafted (torch.save stores "
            "tensors uncompressed)")
    if max_bytes is not None and scan.declared > max_bytes:
        raise CheckpointUsageError(
            f"{path}: its tensors need {human(scan.declared)} of memory to read, over the "
            f"{human(max_bytes)} allowed; raise --max-memory if the machine has it")


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


def _checked(path: Path, raw: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor under `key` as a fresh float32 C-contiguous array, after checking its shape."""
    if key not in raw:
        raise CheckpointError(f"{path} is missing the weight {key!r} (is it a GPT-2 checkpoint?)")
    try:
        array = _to_numpy(raw[key])
    except _TensorKind as e:
        raise CheckpointError(f"{path}: weight {key!r} is {e}; attn reads dense floating-point "
                              "tensors only") from None
    if array.shape != shape:
        raise CheckpointError(
            f"{path}: weight {key!r} has shape {list(array.shape)}, expected {list(shape)}"
        )
    if array.dtype.kind != "f":
        raise CheckpointError(
            f"{path}: weight {key!r} has dtype {array.dtype}, expected a floating-point type"
        )
    # astype copies, which also detaches the result from the file's memory map; a float64 beyond
    # float32's range becomes inf, which the check below names.
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(array.astype(np.float32))
    _check_finite(path, key, out)
    return out


def _check_finite(path: Path, key: str, array: np.ndarray) -> None:
    """Weights must be finite: one NaN or inf makes every activation after it NaN, and JSON has
    no NaN. A finite weight, however large, is accepted: whether it overflows depends on the
    activations it meets, and the run checks those (pipeline.run names the first bad step)."""
    finite = np.isfinite(array)
    if finite.all():
        return
    where = tuple(int(i) for i in np.argwhere(~finite)[0])
    raise CheckpointError(
        f"{path}: weight {key!r} is {array[where]} at index {list(where)} (in float32); a "
        "checkpoint's weights must be finite numbers")


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    # A torch tensor (only .bin files produce them): widen in torch, since NumPy lacks bf16.
    tensor = value.detach()
    if tensor.is_meta:
        raise _TensorKind("a meta tensor (a shape with no data)")
    if tensor.is_quantized:
        raise _TensorKind(f"a quantized tensor ({tensor.dtype})")
    if tensor.layout != _strided():
        raise _TensorKind(f"a {str(tensor.layout).removeprefix('torch.')} tensor")
    tensor = tensor.cpu()
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.numpy()


class _TensorKind(Exception):
    """A tensor that holds no plain array of numbers; _checked names it."""


def _strided():
    import torch

    return torch.strided
