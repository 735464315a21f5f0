"""--dtype float64 end to end: every reported logit is computed in float64.

The reference is Hugging Face's GPT-2 in float64 (`.double()`), random-initialised and saved
with `save_pretrained`: the same weights, which are float32 numbers, exactly representable in
float64, so the only difference left is rounding. In float64 it is bounded by tests/tolerance.py's
K·u·scale with u = 2⁻⁵³ (1.4e-14·scale between two computations); a single product in float32
anywhere on the way (the unembedding of `attn attribute`, the normaliser of entropy_norm) leaves
errors of 1e-7 or 1e-9, a million times that, which each test also checks it can tell apart.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from attn_tracer.cli import app
from tolerance import tolerance

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # Hugging Face references, as the fast tier counts them

TEXT = "The quick brown fox jumps over the lazy dog"
RUNNER = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(3)
    config = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=32,
                                     vocab_size=50257, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("gpt2-f64") / "saved"
    hf.save_pretrained(path)
    return hf.double(), path


def ids_of(text: str) -> list[int]:
    from attn_tracer.model import tokens

    return tokens.encode(text)


def reference(hf, ids: list[int], ablate: tuple[int, int] | None = None):
    """HF's float64 logits [len, vocab], hidden states and attentions; with `ablate` (layer,
    head), that head's Z set to 0 before W_O, as --ablate does."""
    handle = None
    if ablate is not None:
        layer, head = ablate
        d_head = hf.config.n_embd // hf.config.n_head

        def zero(module, args):
            z = args[0].clone()
            z[..., head * d_head:(head + 1) * d_head] = 0
            return (z,)

        handle = hf.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    finally:
        if handle is not None:
            handle.remove()
    return (out.logits[0].numpy(), [h[0].numpy() for h in out.hidden_states],
            [a[0].numpy() for a in out.attentions])


def invoke(args: list[str]) -> dict:
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def tol(x) -> float:
    return tolerance(float(np.abs(x).max()), "float64")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_attribute_logits_lens_and_ablation_in_float64(model, dtype: str):
    hf, path = model
    ids = ids_of(TEXT)
    logits, hidden, _ = reference(hf, ids)
    ablated, _, _ = reference(hf, ids, ablate=(1, 2))
    doc = invoke(["attribute", TEXT, "--weights", str(path), "--dtype", dtype, "--engine",
                  "numpy", "--ablate", "L1H2", "--top-k", "20", "--json"])
    last = logits[-1]
    got = {t["id"]: t["logit"] for t in doc["prediction"]["top"]}
    after = {t["id"]: t["logit"] for t in doc["ablation"]["after"]["top"]}
    target = doc["target"]["id"]
    # The lens after layer L: ln_f(residual after L)·W_Eᵀ, HF's own ln_f in float64; after the
    # last layer it is the model's own logits (HF's last hidden state is already through ln_f).
    with torch.no_grad():
        lens = [hf.lm_head(hf.transformer.ln_f(torch.from_numpy(h[-1]))).numpy()[target]
                for h in hidden[1:-1]] + [last[target]]
    errors = {
        "prediction": max(abs(v - last[i]) for i, v in got.items()),
        "ablation": max(abs(v - ablated[-1][i]) for i, v in after.items()),
        "lens": max(abs(e["logit"] - want) for e, want in zip(doc["logit_lens_target"], lens,
                                                              strict=True)),
    }
    bound = {"prediction": tol(last), "ablation": tol(ablated[-1]), "lens": tol(last)}
    if dtype == "float64":
        for name, error in errors.items():
            assert error <= bound[name], (name, error, bound[name])
    else:  # float32 is visibly worse: the float64 bound is a real test of the dtype
        assert max(errors[n] / bound[n] for n in errors) > 100, errors


def test_trace_predictions_in_float64(model):
    hf, path = model
    logits, _, _ = reference(hf, ids_of(TEXT))
    doc = invoke(["trace", TEXT, "--weights", str(path), "--dtype", "float64", "--engine",
                  "numpy", "--predict", "--top-k", "20", "--json"])
    worst = max(abs(t["logit"] - logits[-1][t["id"]]) for t in doc["predictions"][0]["top"])
    assert worst <= tol(logits[-1]), worst


def entropy_norm(pattern: np.ndarray) -> float:
    """The schema's definition over a causal pattern [len, len] of one text: mean over queries
    of (−Σ_k A·log₂ A) / log₂ n_q, n_q = q + 1 keys; the first query (one key) counts as 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(pattern > 0, pattern * np.log2(pattern), 0.0)
    rows = -plogp.sum(axis=-1)
    n = np.arange(1, len(rows) + 1)
    return float(np.mean(np.where(n > 1, rows / np.log2(np.maximum(n, 2)), 0.0)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_heads_entropy_norm_in_float64(model, dtype: str):
    hf, path = model
    _, _, attentions = reference(hf, ids_of(TEXT))
    doc = invoke(["heads", TEXT, "--weights", str(path), "--dtype", dtype, "--engine", "numpy",
                  "--json"])
    got = np.array(doc["scores"]["entropy_norm"])
    want = np.array([[entropy_norm(a[h]) for h in range(a.shape[0])] for a in attentions])
    error = float(np.abs(got - want).max())
    # Each entry is a mean of sums of len terms of at most 1/log₂2 = 1: scale 1.
    bound = tolerance(1.0, "float64")
    if dtype == "float64":
        assert error <= bound, error
    else:
        assert error > 100 * bound, error


def test_float64_on_both_engines(model):
    # The same command on the torch engine agrees with the NumPy one to float64's rounding.
    _, path = model
    docs = [invoke(["attribute", TEXT, "--weights", str(path), "--dtype", "float64",
                    "--engine", engine, "--json"]) for engine in ("numpy", "torch")]
    a, b = (np.array([t["logit"] for t in d["prediction"]["top"]]) for d in docs)
    assert np.abs(a - b).max() <= tolerance(float(np.abs(a).max()), "float64")
