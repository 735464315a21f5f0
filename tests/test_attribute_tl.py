"""`attn attribute`'s direct logit attribution against TransformerLens's `logit_attrs`.

TransformerLens is not a test dependency: it brings datasets, pandas, wandb and more (about
five minutes to install beside torch on our 2-core machines), so CI skips this file. Run it
where TransformerLens is installed:

    pip install torch==2.13.0 && pip install "transformer-lens<4"
    pytest tests/test_attribute_tl.py

The model is the same kind of small Hugging Face GPT-2 as tests/test_attribute.py's, with
LayerNorms and biases drawn away from 1 and 0, converted with TransformerLens's own
`convert_gpt2_weights` into a `HookedTransformer` built from a config (nothing downloaded).

`logit_attrs` centres each component and divides it by the final LayerNorm's cached scale,
then dots it with the model's W_U; it does not apply ln_final's gain or bias (it expects them
folded into W_U and b_U). So the comparisons are:

- fold_ln=True (gains folded into the next weights, ln_final's into W_U and its bias into b_U),
  center_writing_weights=False, center_unembed=False, fold_value_biases=False (which would move
  b_V into b_O and change each head's output): every component's share equals ours, and b_U
  of the target is our constant;
- fold_ln=False (as the issue suggests), center_writing_weights=False, center_unembed=False, on
  a model whose ln_final has gain 1 and bias 0: again equal, and the constant is 0.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformer_lens = pytest.importorskip("transformer_lens")

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights  # noqa: E402

from attn_tracer.commands import attribute as attr  # noqa: E402
from attn_tracer.commands.run import Request  # noqa: E402
from attn_tracer.model import tokens  # noqa: E402

# TransformerLens 3 says HookedTransformer will give way to TransformerBridge in 4.0.
pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated")

D_MODEL, HEADS, LAYERS, N_CTX, VOCAB = 64, 4, 3, 64, 50257
TEXT = "The quick brown fox jumps over the lazy dog"
TOL = 1e-5  # float32 forwards of O(1) values on two implementations (tests/test_attribute.py)


def hf_model(seed: int, plain_ln_final: bool):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=D_MODEL, n_head=HEADS, n_layer=LAYERS,
                                     n_positions=N_CTX, vocab_size=VOCAB,
                                     attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
        hf.transformer.ln_f.weight.mul_(20.0)
        if plain_ln_final:
            hf.transformer.ln_f.weight.fill_(1.0)
            hf.transformer.ln_f.bias.zero_()
    return hf


def tl_model(hf, fold_ln: bool) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        d_model=D_MODEL, d_head=D_MODEL // HEADS, n_heads=HEADS, n_layers=LAYERS, n_ctx=N_CTX,
        d_vocab=VOCAB, d_mlp=4 * D_MODEL, act_fn="gelu_new", normalization_type="LN",
        eps=hf.config.layer_norm_epsilon, positional_embedding_type="standard",
        default_prepend_bos=False, tokenizer_name=None, device="cpu", dtype=torch.float32)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=fold_ln,
                                      center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    model.set_use_attn_result(True)
    return model.eval()


def tl_attribution(model: HookedTransformer, ids: list[int], position: int, target: int,
                   versus: int | None) -> tuple[list[str], np.ndarray, float, float]:
    """(names, shares, b_U along u, logit) in our components' order, from TransformerLens."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(torch.tensor([ids]))
        heads, labels = cache.stack_head_results(layer=-1, pos_slice=position,
                                                 return_labels=True)
        parts: dict[str, torch.Tensor] = {
            "embed": cache["hook_embed"][:, position], "pos_embed":
            cache["hook_pos_embed"][:, position]}
        for layer in range(LAYERS):
            for h in range(HEADS):
                parts[f"L{layer}H{h}"] = heads[labels.index(f"L{layer}H{h}")]
            parts[f"b_O {layer}"] = model.blocks[layer].attn.b_O[None].clone()
            parts[f"MLP {layer}"] = cache[f"blocks.{layer}.hook_mlp_out"][:, position]
        stack = torch.stack(list(parts.values()))  # [components, batch, d_model]
        shares = cache.logit_attrs(stack, tokens=torch.tensor([target]),
                                   incorrect_tokens=None if versus is None
                                   else torch.tensor([versus]), pos_slice=position)
        b_U = model.b_U[target] - (model.b_U[versus] if versus is not None else 0)
        value = logits[0, position, target] - (logits[0, position, versus]
                                               if versus is not None else 0)
    return list(parts), shares[:, 0].numpy(), float(b_U), float(value)


@pytest.mark.parametrize(("fold_ln", "plain_ln_final"), [(True, False), (False, True)])
@pytest.mark.parametrize("versus", [None, " cat"])
@pytest.mark.parametrize("position", [8, 4])
def test_shares_match_transformer_lens_logit_attrs(tmp_path, fold_ln, plain_ln_final, versus,
                                                   position):
    hf = hf_model(5, plain_ln_final)
    hf.save_pretrained(tmp_path / "m")
    model = tl_model(hf, fold_ln)
    target = tokens.encode(" the")[0]
    v = tokens.encode(versus)[0] if versus else None
    request = attr.AttributeRequest(Request(texts=[TEXT], weights=str(tmp_path / "m")),
                                    target=" the", versus=versus, position=position)
    ours = attr.compute(request, [].append).attribution
    names, shares, constant, value = tl_attribution(model, tokens.encode(TEXT), position,
                                                    target, v)
    assert [c.name for c in ours.components] == names
    np.testing.assert_allclose(ours.logits, shares, rtol=0, atol=TOL)
    assert ours.constant == pytest.approx(constant, abs=TOL)
    assert (abs(constant) > 0.01) == (not plain_ln_final)
    # TransformerLens's own logit, from its own forward: the parts and the constant add up to it.
    assert ours.total == pytest.approx(value, abs=1e-4)
    assert float(shares.sum()) + constant == pytest.approx(value, abs=1e-4)
