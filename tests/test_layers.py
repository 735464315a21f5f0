"""The attention math, checked against references we did not write.

PyTorch's `scaled_dot_product_attention` and `nn.MultiheadAttention` recompute each layer from
our own X, Q, K, V; the two engines must agree on every captured tensor; and the properties of
a pattern (rows sum to 1, masked entries exactly 0, seeds reproducible) hold on both engines.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from attn_tracer.model import embeddings, layers, pipeline  # noqa: E402  (after the guard)
from attn_tracer.model.config import Config  # noqa: E402
from attn_tracer.model.engine import select_engine  # noqa: E402
from attn_tracer.model.trace import Selection  # noqa: E402
from attn_tracer.model.weights import random_weights  # noqa: E402
from tolerance import assert_close, magnitude, softmax_gain, step_tolerances, tolerance  # noqa: E402

SMALL = {"d_model": 64, "heads": 4, "layers": 2}
SENTENCE = "The cat sat on the mat because it was tired."
TEXTS = [SENTENCE, "A short one"]  # different lengths: the second row is padded


def run(texts, engine="numpy", dtype="float32", padding="right", weights=None, config=None,
        **options):
    config = config or Config(**{**SMALL, **options})
    selection = Selection(tuple(range(config.layers)), tuple(range(config.heads)), "all")
    eng = select_engine(engine, "cpu", dtype, 1)
    trace, _ = pipeline.run(texts, config, eng, weights or random_weights(config), selection,
                            padding=padding)
    return trace


def assert_trace_close(ours, theirs):
    """Every tensor of `theirs` matches `ours` within its rounding tolerance (tolerance.py):
    each layer's inherits the softmax gain of the layers before it."""
    tolerances = step_tolerances(ours)
    for name, a in ours.tensors.items():
        if name == "tokens":
            assert np.array_equal(a, theirs.tensors[name])
            continue
        assert_close(name, theirs.tensors[name], a, tolerances[name])


# --- NumPy engine vs torch engine -------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "dtype"),
    [
        ({}, "float32"),
        ({"arch": "gpt2"}, "float32"),
        # No scale: scores of ±35 saturate the patterns, and layer 1 inherits 35× the rounding.
        ({"mask": "none", "scale": False, "bias": False}, "float32"),
        ({"pos": "learned"}, "float32"),
        ({}, "float64"),
        ({"arch": "gpt2"}, "float64"),
    ],
)
def test_numpy_and_torch_engines_agree_on_every_captured_tensor(options, dtype):
    ours = run(TEXTS, "numpy", dtype, **options)
    theirs = run(TEXTS, "torch", dtype, **options)
    assert ours.tensors.keys() == theirs.tensors.keys()
    assert {s.name for s in ours.steps} == set(ours.tensors)  # capture="all": nothing missing
    for name, a in ours.tensors.items():
        assert a.dtype == np.dtype(dtype) or name == "tokens", name
    assert_trace_close(ours, theirs)


def test_engines_agree_at_the_default_size():
    config = Config()  # 768 / 12, as the command line runs by default
    weights = random_weights(config)
    ours = run(["The cat sat."], "numpy", weights=weights, config=config)
    theirs = run(["The cat sat."], "torch", weights=weights, config=config)
    assert ours.step("blocks.1.attn.pattern").shape == (1, 12, 4, 4)
    assert_trace_close(ours, theirs)
    for layer in range(config.layers):
        check_against_mha(ours, weights.params, config, layer)


# --- Each layer against PyTorch's own attention ---------------------------------------------


def sdpa_pattern_and_z(trace, layer, scale, causal, attn_mask=None, kind="attn"):
    """SDPA on our Q/K/V heads; with V = identity its output is the attention pattern itself."""
    q, k, v = (torch.from_numpy(trace.tensors[f"blocks.{layer}.{kind}.{n}.heads"]) for n in "qkv")
    eye = torch.eye(k.shape[-2], dtype=k.dtype).expand(*k.shape[:-1], k.shape[-2])
    kwargs = {"is_causal": causal, "attn_mask": attn_mask, "scale": scale}
    return (F.scaled_dot_product_attention(q, k, eye, **kwargs).numpy(),
            F.scaled_dot_product_attention(q, k, v, **kwargs).numpy())


def check_against_mha(trace, params, config, layer):
    d, heads = config.d_model, config.heads
    x_name = "resid_pre" if layer == 0 else f"blocks.{layer - 1}.resid_post"
    x = torch.from_numpy(trace.tensors[x_name])  # the layer's input X
    p = {name: torch.from_numpy(w) for name, w in params.items()
         if name.startswith(f"blocks.{layer}.attn.")}
    a = f"blocks.{layer}.attn"
    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True, bias=config.bias)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([p[f"{a}.W_Q"].T, p[f"{a}.W_K"].T, p[f"{a}.W_V"].T]))
        mha.out_proj.weight.copy_(p[f"{a}.W_O"].T)
        if config.bias:
            mha.in_proj_bias.copy_(torch.cat([p[f"{a}.b_Q"], p[f"{a}.b_K"], p[f"{a}.b_V"]]))
            mha.out_proj.bias.copy_(p[f"{a}.b_O"])
    mha.eval()
    length = x.shape[1]
    not_allowed = None
    if config.mask == "causal":
        not_allowed = torch.ones(length, length, dtype=torch.bool).triu(diagonal=1)
    with torch.no_grad():
        out, weights = mha(x, x, x, attn_mask=not_allowed, need_weights=True,
                           average_attn_weights=False)
    # From the same X: only this layer's rounding, through its own softmax's gain.
    gain, dtype = softmax_gain(trace, a), trace.engine["dtype"]
    assert_close(f"{a}.pattern", weights.numpy(), trace.tensors[f"{a}.pattern"],
                 tolerance(1, dtype, gain))
    assert_close(f"{a}.out", out.numpy(), trace.tensors[f"{a}.out"],
                 tolerance(magnitude(out.numpy()), dtype, gain))


def assert_attention_close(trace, block: str, pattern, z):
    """SDPA's pattern and Z, from our Q, K, V: only this block's rounding, through its gain."""
    gain, dtype = softmax_gain(trace, block), trace.engine["dtype"]
    assert_close(f"{block}.pattern", pattern, trace.tensors[f"{block}.pattern"],
                 tolerance(1, dtype, gain))
    assert_close(f"{block}.z", z, trace.tensors[f"{block}.z"], tolerance(magnitude(z), dtype, gain))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("options", [{}, {"mask": "none"}, {"bias": False},
                                     {"mask": "none", "bias": False}])
def test_each_layer_matches_multihead_attention(engine, options):
    config = Config(**{**SMALL, **options})
    weights = random_weights(config)
    trace = run([SENTENCE], engine, weights=weights, **options)
    for layer in range(config.layers):
        check_against_mha(trace, weights.params, config, layer)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("options", [{}, {"mask": "none"}, {"scale": False},
                                     {"scale": False, "mask": "none", "bias": False}])
def test_each_layer_matches_sdpa(engine, options):
    config = Config(**{**SMALL, **options})
    trace = run([SENTENCE], engine, **options)
    # MultiheadAttention always divides by √d_head; SDPA lets --no-scale be checked: scale=1.
    scale = None if config.scale else 1.0  # None: SDPA's own default, 1/√(Q's last axis)
    for layer in range(config.layers):
        pattern, z = sdpa_pattern_and_z(trace, layer, scale, config.mask == "causal")
        assert_attention_close(trace, f"blocks.{layer}.attn", pattern, z)


def allowed_from_inputs(trace, causal: bool):
    """[batch, 1, len, len] built here from which positions are real, not by pipeline.py."""
    valid = torch.from_numpy(np.stack([inp.valid for inp in trace.inputs]))
    length = valid.shape[1]
    allowed = valid[:, None, :, None] & valid[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    return allowed


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("mask", ["causal", "none"])
def test_padded_batch_matches_sdpa_with_a_boolean_mask(engine, padding, mask):
    trace = run(TEXTS, engine, padding=padding, mask=mask)
    assert trace.inputs[1].padding > 0
    allowed = allowed_from_inputs(trace, mask == "causal")
    for layer in range(SMALL["layers"]):
        pattern, z = sdpa_pattern_and_z(trace, layer, None, False, allowed)
        # A pad query has no key to look at: SDPA gives zeros there, and so must we.
        assert_attention_close(trace, f"blocks.{layer}.attn", pattern, z)


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_cross_attention_matches_sdpa(engine):
    config = Config(**SMALL)
    selection = Selection((0, 1), (0, 1, 2, 3), "all")
    trace, _ = pipeline.run(TEXTS, config, select_engine(engine, "cpu", "float32", 1),
                            random_weights(config, cross=True), selection,
                            cross_texts=["Le chat est assis sur le tapis", "Bonjour"])
    valid_q = torch.from_numpy(np.stack([inp.valid for inp in trace.inputs]))
    valid_k = torch.from_numpy(np.stack([inp.valid for inp in trace.cross]))
    allowed = valid_q[:, None, :, None] & valid_k[:, None, None, :]
    for layer in range(config.layers):
        pattern, z = sdpa_pattern_and_z(trace, layer, None, False, allowed, "cross_attn")
        assert_attention_close(trace, f"blocks.{layer}.cross_attn", pattern, z)


# --- Properties -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("options", [{}, {"scale": False}, {"arch": "gpt2"}])
def test_pattern_rows_sum_to_one_and_future_is_exactly_zero(engine, padding, options):
    trace = run(TEXTS, engine, padding=padding, **options)
    valid = np.stack([inp.valid for inp in trace.inputs])  # [batch, len]
    length = valid.shape[1]
    future = np.triu(np.ones((length, length), bool), k=1)
    for layer in range(SMALL["layers"]):
        pattern = trace.tensors[f"blocks.{layer}.attn.pattern"]  # [batch, heads, q_len, k_len]
        assert np.isfinite(pattern).all()
        sums = pattern.sum(-1)
        real = np.broadcast_to(valid[:, None, :], sums.shape)
        # In any order: softmax's sum of ≤ 11 keys and this one err by ≤ 11u each, and each
        # entry's exp and division by a few u: below 2e-6 in float32.
        np.testing.assert_allclose(sums[real], 1.0, atol=1e-5)
        assert (pattern[~real] == 0).all()  # a pad query's row is all zeros
        assert (pattern[..., future] == 0).all()  # exactly 0, not merely small
        pad_keys = np.broadcast_to(~valid[:, None, None, :], pattern.shape)
        assert (pattern[pad_keys] == 0).all()


def test_without_mask_every_position_is_used():
    trace = run([SENTENCE], "numpy", mask="none")
    pattern = trace.tensors["blocks.0.attn.pattern"]
    assert (pattern > 0).all()
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)  # as in the test above


def test_same_seed_gives_the_same_numbers_on_every_engine():
    config = Config(**SMALL, seed=7)
    first, second = random_weights(config), random_weights(Config(**SMALL, seed=7))
    assert first.params.keys() == second.params.keys()
    torch_engine = select_engine("torch", "cpu", "float32", 1)
    for name, w in first.params.items():
        assert np.array_equal(w, second.params[name]), name
        assert np.array_equal(torch_engine.to_host(torch_engine.asarray(w)), w), name
    ids = np.array([[464, 3797, 3332]])
    assert np.array_equal(first.token_rows(ids), second.token_rows(ids))
    # Embedding is gathering and one float32 addition: bit-identical on both engines.
    a = run([SENTENCE], "numpy", seed=7)
    b = run([SENTENCE], "torch", seed=7)
    c = run([SENTENCE], "numpy", seed=7)
    assert np.array_equal(a.tensors["resid_pre"], b.tensors["resid_pre"])
    for name in a.tensors:
        assert np.array_equal(a.tensors[name], c.tensors[name]), name  # run to run: identical


def test_different_seeds_differ():
    a, b = random_weights(Config(**SMALL, seed=0)), random_weights(Config(**SMALL, seed=1))
    for name, w in a.params.items():
        assert not np.allclose(w, b.params[name]), name
    ids = np.array([464, 3797])
    assert not np.allclose(a.token_rows(ids), b.token_rows(ids))
    pa = run([SENTENCE], seed=0).tensors["blocks.1.attn.pattern"]
    pb = run([SENTENCE], seed=1).tensors["blocks.1.attn.pattern"]
    assert not np.allclose(pa, pb)


@pytest.mark.parametrize("arch", ["attn", "gpt2"])
def test_layer_0_does_not_depend_on_how_many_layers_follow(arch):
    two = random_weights(Config(**{**SMALL, "layers": 2, "arch": arch}), cross=True)
    five = random_weights(Config(**{**SMALL, "layers": 5, "arch": arch}), cross=True)
    layer0 = [name for name in two.params if name.startswith("blocks.0.")]
    assert any(".cross_attn." in name for name in layer0)
    for name in layer0:
        assert np.array_equal(two.params[name], five.params[name]), name
    assert sum(name.startswith("blocks.4.") for name in five.params) == len(layer0)


def test_no_bias_keeps_the_same_matrices():
    with_bias = random_weights(Config(**SMALL))
    without = random_weights(Config(**SMALL, bias=False))
    assert not any(".b_" in name for name in without.params)
    for name, w in without.params.items():
        assert np.array_equal(w, with_bias.params[name]), name


# --- softmax ----------------------------------------------------------------------------------


def test_softmax_of_a_fully_masked_row_is_zeros_not_nan():
    rows = np.array([[-np.inf, -np.inf, -np.inf], [0.0, -np.inf, 1.0]], np.float32)
    for x in (rows, torch.from_numpy(rows)):
        out = np.asarray(layers.softmax(x))
        assert np.isfinite(out).all()
        assert (out[0] == 0).all()
        # Exact inputs: only the softmax's own rounding (no gain; see tolerance.py).
        assert_close("softmax", out[1], torch.softmax(torch.from_numpy(rows[1]), -1).numpy(),
                     tolerance(1, "float32"))
        assert out[1, 1] == 0


def test_softmax_matches_torch_on_ordinary_rows():
    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32) * 10
    expected = torch.softmax(torch.from_numpy(x), dim=-1).numpy()
    # Exact inputs, however large: rounding x − max errs by u·|x − max|, and p·|x − max| ≤ 1/e.
    tol = tolerance(1, "float32")
    assert_close("numpy", layers.softmax(x), expected, tol)
    assert_close("torch", layers.softmax(torch.from_numpy(x)).numpy(), expected, tol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_softmax_in_half_precision_sums_to_one(dtype):
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32))
    x = (x * 8).to(getattr(torch, dtype))
    out = layers.softmax(x)
    assert out.dtype == x.dtype
    assert not torch.isnan(out).any()
    # Each entry rounded once to half precision errs by ≤ u·p (u = 2⁻⁸ in bfloat16): the row
    # sums to 1 within u = 4e-3 in any order.
    torch.testing.assert_close(out.float().sum(-1), torch.ones(4), atol=1e-2, rtol=0)


# --- Positional encodings --------------------------------------------------------------------


def vaswani(positions, d_model):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(the same angle)."""
    pe = np.zeros((len(positions), d_model))
    for row, pos in enumerate(positions):
        for j in range(d_model):
            two_i = j - j % 2
            angle = pos / 10000 ** (two_i / d_model)
            pe[row, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return pe


@pytest.mark.parametrize("d_model", [1, 2, 7, 64, 65])
def test_sinusoidal_matches_the_formula(d_model):
    positions = np.arange(0, 50, 3)
    # Computed in float64 and rounded once to float32: within u·|PE| ≤ 6e-8 on any CPU.
    np.testing.assert_allclose(embeddings.sinusoidal(positions, d_model),
                               vaswani(positions, d_model), atol=1e-6)
    batched = np.stack([positions, positions[::-1]])
    assert embeddings.sinusoidal(batched, d_model).shape == (2, len(positions), d_model)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_positions_count_real_tokens_only(padding):
    trace = run(TEXTS, "numpy", padding=padding)
    pos = trace.tensors["pos_embed"]  # [batch, len, d_model]
    for b, inp in enumerate(trace.inputs):
        np.testing.assert_allclose(pos[b][inp.valid], vaswani(range(inp.length), SMALL["d_model"]),
                                   atol=1e-6)
    # A text's numbers do not depend on the side its padding went to (to rounding: the batch
    # is multiplied in other blocks than the text alone).
    alone = run([TEXTS[1]], "numpy")
    name = "blocks.1.attn.out"
    assert_close(name, trace.tensors[name][1][trace.inputs[1].valid], alone.tensors[name][0],
                 step_tolerances(alone)[name])


@pytest.mark.parametrize("module", ["numpy", "torch"])
def test_float64_stays_float64(module):
    x = np.random.default_rng(2).standard_normal((3, 9)) * 5
    expected_softmax = torch.softmax(torch.from_numpy(x), -1).numpy()
    expected_norm = F.layer_norm(torch.from_numpy(x), (9,), eps=1e-5).numpy()
    arr, ones, zeros = x, np.ones(9), np.zeros(9)
    if module == "torch":
        arr, ones, zeros = (torch.from_numpy(a) for a in (arr, ones, zeros))
    out, norm = layers.softmax(arr), layers.layer_norm(arr, ones, zeros, 1e-5)
    assert out.dtype == arr.dtype and norm.dtype == arr.dtype
    # Within float64's rounding (1e-14 here), which float32 (u = 6e-8) could never reach.
    assert_close("softmax", np.asarray(out), expected_softmax, tolerance(1, "float64"))
    assert_close("layer_norm", np.asarray(norm), expected_norm,
                 tolerance(magnitude(expected_norm), "float64"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_gelu_and_relu_against_math_and_torch(dtype):
    """The MLP activations checkpoints ask for (config.act): the exact GELU x·Φ(x) against
    math.erfc per element, in the tail too (x = −12, where 1 + erf cancels to nothing), and
    torch's F.gelu / relu on the torch engine."""
    x = np.linspace(-12, 12, 4001).astype(dtype)
    ref = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    u = np.finfo(dtype).eps
    # One rounding of the product and erfcc's 1.2e-7 relative error (2 float32 ulp): a few ulp
    # of the output's scale max(|x|, 1); float64 uses math.erfc itself, to its last bits.
    scale = np.maximum(np.abs(x.astype(np.float64)), 1)
    assert np.all(np.abs(layers.gelu(x) - ref) <= 4 * u * scale)
    assert layers.gelu(x).dtype == dtype
    t = torch.from_numpy(x)
    # torch computes x/2·(1 + erf(x/√2)): in the tail 1 + erf cancels, an absolute error of
    # about u·|x| there.
    assert_close("gelu on torch", layers.gelu(t).numpy(), ref, 4 * u * 12)
    assert np.array_equal(layers.relu(x), np.maximum(x, 0))
    assert np.array_equal(layers.relu(t).numpy(), np.maximum(x, 0))
