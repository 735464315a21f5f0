"""`--arch llama`: the pre-norm block of Llama, Mistral and Qwen2, and their checkpoints.

The block is gpt2's (norm, attention, norm, MLP, final norm) with Llama's parts as defaults:
RMSNorm, the SwiGLU MLP, rotary positions (the halves pairing of `rotate_half`), no biases, and
an unembedding of its own. Mistral adds a sliding window, Qwen2 biases on Q, K and V: both are
Config switches (`window`, the biases a checkpoint has), so one name map reads all three.
"""

from __future__ import annotations

from typing import Any, ClassVar

from attn_tracer.model.arch.gpt2 import PreNorm


class Llama(PreNorm):
    name = "llama"
    title = "Llama"
    titles: ClassVar[dict[str, str]] = {"llama": "Llama", "mistral": "Mistral",
                                        "qwen2": "Qwen2"}
    model_types = ("llama", "mistral", "qwen2")
    defaults: ClassVar[dict[str, Any]] = {"pos": "rotary", "norm": "rms", "mlp": "swiglu",
                                          "bias": False, "ln_eps": 1e-6}

    def load(self, source, path, config, max_bytes, expect=None):
        from attn_tracer.model.arch.llama_map import load_directory

        return load_directory(source, path, config, max_bytes, expect)


FAMILY = Llama()
