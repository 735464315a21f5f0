"""Load a checkpoint into plain float32 NumPy arrays under one set of names.

A source is a `save_pretrained` directory, a single .safetensors or .bin file, or a model id
(`gpt2`, `openai-community/gpt2`) looked up in the local Hugging Face cache. By concern:
source.py resolves it (and walks the cache), config_json.py reads config.json, torch_bin.py
pre-scans and reads a .bin, tensors.py checks and copies each tensor; the name map of each
family (HF names → ours) is the family's own, in model/arch/ (gpt2_map.py, llama_map.py).
Names follow the `x @ W` convention with W as [in, out].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attn_tracer.model.checkpoint.source import (
    _find_in_cache,
    _looks_like_model_id,
    hf_cache_dir,
    source_folder,
)
from attn_tracer.model.safetensors_io import CheckpointError, CheckpointUsageError

__all__ = ["Checkpoint", "CheckpointError", "hf_cache_dir", "load_checkpoint", "source_folder"]


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
    # The checkpoint's own Config fields beside its sizes: arch, pos, bias, and for the
    # modern families kv_heads, window, norm, mlp, rope_theta, model_type, …
    model: dict[str, Any] = field(default_factory=lambda: {"arch": "gpt2", "pos": "learned",
                                                          "bias": True})
    d_head_: int | None = None  # a head's width where the config sets it (head_dim)

    @property
    def d_head(self) -> int:
        return self.d_head_ or self.d_model // self.heads


def load_checkpoint(source: str, heads: int | None = None, max_bytes: int | None = None,
                    expect: Callable[[dict[str, Any]], None] | None = None) -> Checkpoint:
    """Load a checkpoint from a directory, a .safetensors/.bin file or a cached model id.

    `heads` is only used for a single file, which has no config to say it; a directory's
    config.json always wins. `max_bytes`: refuse, from the file's header and the config alone,
    before any tensor is read or copied, weights that would need more memory than this.
    `expect(model)`: called with the checkpoint's Config fields (Checkpoint.model) as soon as
    config.json has said them, before any tensor is read, to refuse options that conflict.
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
        return _load_directory(source, path, max_bytes, expect)
    if is_file:
        from attn_tracer.model.arch import gpt2_map

        return gpt2_map.load_file(source, path, heads, max_bytes, expect)
    if _looks_like_model_id(source):
        return _load_directory(source, _find_in_cache(source), max_bytes, expect)
    raise CheckpointUsageError(f"no such file or directory: {source}")


def _load_directory(source: str, directory: Path, max_bytes: int | None,
                    expect=None) -> Checkpoint:
    """A save_pretrained folder, read by the family its config.json's model_type names."""
    from attn_tracer.model.arch import for_model_type, model_types
    from attn_tracer.model.checkpoint.config_json import _short, model_type, read_config

    config_path, config = read_config(directory)
    kind = model_type(config_path, config)
    arch = for_model_type(kind)
    if arch is None:
        raise CheckpointError(
            f"{config_path} describes a {_short(kind)} model; attn reads "
            f"{', '.join(model_types())} checkpoints")
    return arch.load(source, directory, config, max_bytes, expect)
