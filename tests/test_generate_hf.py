"""Greedy generation against Hugging Face `transformers`' own `generate(do_sample=False)`.

The reference is `GPT2LMHeadModel`, random-initialised from a seeded config, its weights
sharpened (below) and saved with `save_pretrained`; `attn` loads the folder with `--weights`
and generates on the NumPy and the torch engine. The ids must be the same, token for token,
for 32 new tokens. That can only be asked where the argmax is not a near-tie: at every step
the reference's top two logits must differ by more than twice the logits' rounding tolerance
(tests/tolerance.py; each engine's logits are within it of the exact ones), which the test
checks before it compares.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from attn_tracer.commands.run import Request, build_config  # noqa: E402
from attn_tracer.model import generate as gen  # noqa: E402
from attn_tracer.model import tokens  # noqa: E402
from attn_tracer.model.engine import Engine  # noqa: E402
from attn_tracer.model.pipeline import Prepared, make_batch, run  # noqa: E402
from attn_tracer.model.trace import Selection  # noqa: E402
from tolerance import step_tolerances  # noqa: E402

pytestmark = pytest.mark.slow

NEW = 32
PROMPT = "Once upon a time there was a"
# GPT-2's init draws its weights with std 0.02: ln_f's unit-scale output then gives logits of
# std 0.02·√d_model ≈ 0.16, and among 50,257 of them the top two are often within 1e-3 — a
# near-tie that rounding could flip. The output head, scaled ×40 (std 0.8), spreads the logits
# to std ~6 and the margins to ~1. It is untied (tie_word_embeddings false, a head of its own,
# which attn reads as lm_head.weight): tied, the same scaling would make every token's own
# logit |e|² the largest, and greedy decoding would repeat the prompt's last token forever.
SHARPEN = 40.0
SIZES = {"d64": (64, 4, 2, 0), "d96x12": (96, 12, 3, 1)}  # d_model, heads, layers, seed


@pytest.fixture(scope="module", params=list(SIZES))
def checkpoint(request, tmp_path_factory):
    d_model, heads, layers, seed = SIZES[request.param]
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=d_model, n_head=heads, n_layer=layers,
                                     n_positions=128, vocab_size=50257,
                                     tie_word_embeddings=False, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(SHARPEN)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    folder = tmp_path_factory.mktemp(f"gen-{request.param}") / "m"
    hf.save_pretrained(folder)
    return hf, folder


def hf_greedy(hf, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """transformers' greedy ids after the prompt, and its logits at each step [steps, vocab]."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                          do_sample=False, pad_token_id=50256, output_scores=True,
                          output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, len(prompt):].tolist()
    return new, torch.stack(out.logits)[:, 0].double().numpy()


@pytest.mark.parametrize("engine_name", ["numpy", "torch"])
def test_greedy_ids_equal_transformers_generate(checkpoint, engine_name):
    hf, folder = checkpoint
    prompt = tokens.encode(PROMPT)
    want, hf_logits = hf_greedy(hf, prompt)
    config, weights = build_config(Request(weights=str(folder)))
    engine = Engine(engine_name, "cpu", "float32")

    # The margin: rounding of our logits is bounded by tolerance.py's bound for the logits
    # of a full forward over the whole sequence (its largest |logit| and softmax gain).
    every = [tokens.token(t) for t in [*prompt, *want[:-1]]]
    selection = Selection(tuple(range(config.layers)), tuple(range(config.heads)), "stages")
    trace, _ = run(["-"], config, engine, weights, selection, predict_top_k=1,
                   prepared=Prepared(make_batch([every], ["-"], "right"), None))
    tol = step_tolerances(trace)["logits"]
    top2 = np.sort(hf_logits, axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    assert margins.min() > 2 * tol, (margins.min(), tol)

    plan = gen.Plan(prompt, NEW, keep_logits=True)
    got = list(gen.generate(plan, config, engine, weights))
    assert [s.token for s in got] == want
    assert len(want) == NEW or want[-1] == gen.END_OF_TEXT  # transformers stops there too
    assert len(set(want)) > NEW // 4  # a real sequence, not one token repeated
    # And the logits themselves: the same model, to rounding.
    worst = max(float(np.abs(s.logits - hf_logits[i]).max()) for i, s in enumerate(got))
    assert worst < 2 * tol, (worst, tol)
