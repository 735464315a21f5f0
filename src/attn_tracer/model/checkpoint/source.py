"""Where a checkpoint is: a directory, a file, or a model id in the local Hugging Face cache.

Nothing is ever downloaded, and huggingface_hub is not needed: the cache layout is simple
enough to walk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from attn_tracer.model.safetensors_io import (
    CheckpointError,
    CheckpointUsageError,
)

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
_MAX_REF = 256  # refs/main holds a 40-character commit hash


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



def source_folder(source: str) -> Path | None:
    """The folder a source's config.json and tokenizer files are in, resolved as load_checkpoint
    resolves it (a directory, or a cached model id's snapshot); None for a bare weights file,
    which has neither. Reads no weights: `attn tokens --weights` needs only this."""
    if not source.strip():
        raise CheckpointUsageError("--weights is empty: give a directory, a .safetensors or .bin "
                                   "file, or a model id such as gpt2")
    try:
        path = Path(source).expanduser()
        is_dir, is_file = path.is_dir(), path.is_file()
    except RuntimeError as e:
        raise CheckpointUsageError(f"cannot expand {source}: {e}") from None
    except OSError as e:
        raise CheckpointUsageError(f"cannot use {source}: {e.strerror or e}") from None
    if is_dir:
        return path
    if is_file:
        return None
    if _looks_like_model_id(source):
        return _find_in_cache(source)
    raise CheckpointUsageError(f"no such file or directory: {source}")
