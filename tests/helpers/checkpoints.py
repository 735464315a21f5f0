"""Small Hugging Face checkpoints, built once per test session: the references nobody here wrote.

`hf_checkpoint("gpt2", n_embd=32, n_head=4, n_layer=1)` (the `hf_checkpoint` fixture of
conftest.py) makes `transformers`' own model of that family from a config — random-initialised
from `seed`, then changed in place by `prepare(model)` if given (sharper logits, bigger biases)
— saves it with `save_pretrained` and returns the model (in eval mode) and its folder. The same
arguments give the same object for the rest of the session, so twelve files asking for a tiny
GPT-2 build one.

Any family `transformers` knows works by its `model_type` (gpt2, llama, mistral, qwen2,
gpt_neo, gptj, gpt_neox, opt, …): `AutoConfig.for_model` and
`AutoModelForCausalLM.from_config`, with eager attention so that `output_attentions` returns
the patterns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Built:
    model: Any  # the transformers model, in eval mode
    directory: Path  # its save_pretrained folder: config.json + model.safetensors


class Checkpoints:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[tuple, Built] = {}

    def __call__(self, model_type: str = "gpt2", *, seed: int = 0,
                 prepare: Callable[[Any], None] | None = None, **config: Any) -> Built:
        key = (model_type, seed, prepare, tuple(sorted(config.items(), key=lambda kv: kv[0])))
        if key not in self.built:
            self.built[key] = self._build(model_type, seed, prepare, config)
        return self.built[key]

    def _build(self, model_type: str, seed: int, prepare, config: dict) -> Built:
        import torch
        import transformers

        config.setdefault("vocab_size", 50257)  # GPT-2's tokenizer, which attn uses by default
        hf_config = transformers.AutoConfig.for_model(model_type, **config)
        hf_config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config, attn_implementation="eager").eval()
        if prepare is not None:
            with torch.no_grad():
                prepare(model)
        directory = self.root / f"{model_type}-{len(self.built)}"
        model.save_pretrained(directory)
        return Built(model, directory)
