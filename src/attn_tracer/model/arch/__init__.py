"""The architecture registry: the one place where an architecture's name is compared.

One module per family, as Hugging Face keeps one folder per architecture: `attn` (attention and
the residual stream only), `gpt2` (the pre-norm block: norm, attention, norm, MLP, final norm,
GPT-2's checkpoints) and `llama` (the same block with RMSNorm, SwiGLU and rotary positions by
default; Llama, Mistral and Qwen2 checkpoints). Each is a `Family` (base.py): its random
parameters, its block, its final norm, its positions, its checkpoint name map and its steps.
Everything outside this package asks the family, never "is it GPT-2?".
"""

from __future__ import annotations

from attn_tracer.model.arch.base import Family


def _families() -> dict[str, Family]:
    from attn_tracer.model.arch import attn, gpt2, llama

    return {f.name: f for f in (attn.FAMILY, gpt2.FAMILY, llama.FAMILY)}


_REGISTRY: dict[str, Family] = {}


def family(config_or_name) -> Family:
    """The family of a Config (or of an architecture name)."""
    if not _REGISTRY:
        _REGISTRY.update(_families())
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.arch
    return _REGISTRY[name]


def for_model_type(model_type: str) -> Family | None:
    """The family that loads checkpoints of this config.json `model_type`, or None."""
    if not _REGISTRY:
        _REGISTRY.update(_families())
    return next((f for f in _REGISTRY.values() if model_type in f.model_types), None)


def model_types() -> list[str]:
    """Every checkpoint `model_type` some family loads, for the message refusing another."""
    if not _REGISTRY:
        _REGISTRY.update(_families())
    return [t for f in _REGISTRY.values() for t in f.model_types]


__all__ = ["Family", "family", "for_model_type", "model_types"]
