"""`attn heads` against TransformerLens's own `detect_head`, where TransformerLens is installed.

A test-only reference, not in the test extras: transformer-lens 3.9 installs in about five
minutes with a few hundred MB of dependencies, and its `from_pretrained` needs the Hub. So the
model is built here from the same random Hugging Face checkpoint (HookedTransformerConfig from
its config, `convert_gpt2_weights`, no folding or centering, which would not change a pattern),
and `to_tokens` is given the token ids attn ran on: no tokenizer is downloaded. Run it with
transformer-lens installed (`pip install "transformer-lens<4"` after the CPU torch), e.g. in a
virtual environment of its own; without it the module is skipped.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformer_lens = pytest.importorskip("transformer_lens")

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.head_detector import detect_head  # noqa: E402
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from attn_tracer.cli import app  # noqa: E402
from attn_tracer.model import tokens  # noqa: E402

# Both run float32 GPT-2 on the same weights; test_heads.py bounds the scores' difference
# between two such implementations by 1e-5 (patterns within a few ulps, weights summing to ≤ 1).
TOL = 1e-5
N_CTX = 64
DETECTORS = {"previous_token": "previous_token_head", "duplicate_token": "duplicate_token_head",
             "induction": "induction_head"}
TEXTS = ["The cat sat on the mat. The cat sat on the mat again.",
         "When Mary and John went to the store, John gave a drink to Mary"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=N_CTX,
                                     vocab_size=tokens.VOCAB, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("heads-tl") / "saved"
    hf.save_pretrained(path)
    cfg = HookedTransformerConfig(
        n_layers=config.n_layer, d_model=config.n_embd, n_ctx=config.n_positions,
        d_head=config.n_embd // config.n_head, n_heads=config.n_head, d_mlp=4 * config.n_embd,
        d_vocab=config.vocab_size, act_fn="gelu_new", normalization_type="LN",
        eps=config.layer_norm_epsilon, positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", default_prepend_bos=True, device="cpu")
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False,
                                   center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False)
    return tl, path


def attn_heads(path, *args: str) -> dict:
    result = CliRunner().invoke(app, ["heads", *args, "--weights", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def tl_scores(tl, ids: list[int], score: str) -> np.ndarray:
    # detect_head tokenizes its text with model.to_tokens; hand it the ids attn ran on instead.
    tl.to_tokens = lambda seq, **kwargs: torch.tensor([ids])
    return detect_head(tl, "(ids given above)", DETECTORS[score]).numpy()


@pytest.mark.parametrize("text", TEXTS, ids=["repeats", "ioi"])
def test_detection_scores_equal_detect_head(text, models):
    tl, path = models
    doc = attn_heads(path, text, "--bos")  # detect_head runs on to_tokens: BOS first
    ids = [t["id"] for t in doc["inputs"][0]["tokens"]]
    assert ids[0] == tokens.ENDOFTEXT_ID
    for score in DETECTORS:
        theirs = tl_scores(tl, ids, score)
        diff = np.abs(np.array(doc["scores"][score]) - theirs).max()
        assert diff <= TOL, f"{score}: max abs diff {diff}"


def test_a_batch_is_the_mean_of_detect_head_on_each_text(models):
    """detect_head on a list of texts runs each alone and averages: padding must not matter."""
    tl, path = models
    doc = attn_heads(path, *TEXTS, "--bos", "--padding", "left")
    for score in DETECTORS:
        theirs = np.mean([tl_scores(tl, [t["id"] for t in inp["tokens"]], score)
                          for inp in doc["inputs"]], axis=0)
        diff = np.abs(np.array(doc["scores"][score]) - theirs).max()
        assert diff <= TOL, f"{score}: max abs diff {diff}"


def test_the_probe_is_the_demos_stripe(models):
    """The TransformerLens demos' induction score: the stripe pattern.diagonal(1 − N), averaged.

    Their diagonal runs from query N − 1, two rows before the second half: it holds N + 2
    entries where attn's figure averages the N of the second half. Both are compared here.
    """
    tl, path = models
    n = 20
    doc = attn_heads(path, "--repeat", str(n))
    ids = torch.tensor([[t["id"] for t in doc["inputs"][0]["tokens"]]])
    _, cache = tl.run_with_cache(ids)
    ours = np.array(doc["scores"]["induction"])
    for layer in range(tl.cfg.n_layers):
        pattern = cache["pattern", layer][0]  # [heads, q, k]
        stripe = pattern.diagonal(offset=1 - n, dim1=-2, dim2=-1)  # the demos' stripe
        assert stripe.shape[-1] == n + 2
        np.testing.assert_allclose(ours[layer], stripe[:, 2:].mean(-1).numpy(), atol=TOL)
