"""The trace describes what was computed: every step's shape and dimension names match the tensor
it names, the steps of a layer come in the order of the formula, and only what the selection
asks for is kept on the host.
"""

from __future__ import annotations

import numpy as np
import pytest

from attn_tracer.model import pipeline
from attn_tracer.model.config import Config
from attn_tracer.model.engine import select_engine
from attn_tracer.model.trace import Selection
from attn_tracer.model.weights import random_weights
from tolerance import assert_close, softmax_rtol, step_tolerances

SMALL = {"d_model": 64, "heads": 4, "layers": 2}
SENTENCE = "The cat sat on the mat."
DIMS = {"batch", "len", "q_len", "k_len", "d_model", "heads", "d_head", "heads·d_head", "d_mlp",
        "vocab"}
SIZES = {"d_model": 64, "heads": 4, "d_head": 16, "d_mlp": 256, "vocab": 50257}


def run(texts, engine="numpy", selection=None, cross_texts=None, padding="right",
        predict_top_k=None, **options):
    config = Config(**{**SMALL, **options})
    selection = selection or Selection(tuple(range(config.layers)), tuple(range(config.heads)),
                                       "all")
    weights = random_weights(config, cross=cross_texts is not None)
    trace, _ = pipeline.run(texts, config, select_engine(engine, "cpu", "float32", 1), weights,
                            selection, cross_texts=cross_texts, padding=padding,
                            predict_top_k=predict_top_k)
    return trace


CASES = {
    "default": {},
    "gpt2": {"arch": "gpt2"},
    "mask none": {"mask": "none"},
    "no scale": {"scale": False},
    "pos none": {"pos": "none"},
    "pos learned": {"pos": "learned"},
    "no bias": {"bias": False},
    "batch of 2": {"texts": [SENTENCE, "Hi"]},
    "batch of 2, left": {"texts": [SENTENCE, "Hi"], "padding": "left"},
    "cross": {"texts": [SENTENCE, "Hi"], "cross_texts": ["Le chat est assis sur le tapis"]},
    "cross, 2 texts": {"texts": [SENTENCE, "Hi"], "cross_texts": ["Le chat", "Bonjour à tous"]},
    # --d-head: heads·d_head (4·24 = 96) is not d_model (64); the word says so in dims.
    "d_head 24, gpt2": {"d_head": 24, "arch": "gpt2"},
    "d_head 5, cross": {"d_head": 5, "texts": [SENTENCE, "Hi"], "cross_texts": ["Le chat"]},
}


@pytest.fixture(scope="module", params=["numpy", "torch"])
def engine(request):
    if request.param == "torch":
        pytest.importorskip("torch")
    return request.param


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_step_has_the_shape_of_its_tensor(case, engine):
    options = dict(CASES[case])
    texts = options.pop("texts", [SENTENCE])
    trace = run(texts, engine, **options)
    names = [s.name for s in trace.steps]
    assert len(names) == len(set(names)), "a step name repeats"
    assert set(names) == set(trace.tensors), "capture='all' keeps every step"
    length = trace.inputs[0].length + trace.inputs[0].padding
    cross_len = None if trace.cross is None else trace.cross[0].length + trace.cross[0].padding
    for step in trace.steps:
        assert trace.tensors[step.name].shape == step.shape, step.name
        assert len(step.dims) == len(step.shape), step.name
        assert set(step.dims) <= DIMS, (step.name, step.dims)
        assert step.op, step.name
        # A dimension word means one size: len is the batch length (the cross text's own, in
        # its "cross." stages); keys are the cross text's tokens in cross-attention only.
        d_head = options.get("d_head", SIZES["d_head"])
        sizes = {"batch": len(texts), **SIZES, "d_head": d_head, "heads·d_head": 4 * d_head,
                 "q_len": length, "k_len": length,
                 "len": cross_len if step.name.startswith("cross.") else length}
        if ".cross_attn." in step.name:
            sizes["k_len"] = cross_len
        for dim, size in zip(step.dims, step.shape, strict=True):
            assert size == sizes[dim], (step.name, dim)


def test_cross_attention_names_its_two_lengths():
    trace = run([SENTENCE], cross_texts=["Le chat"])
    q_len, k_len = trace.inputs[0].length, trace.cross[0].length
    assert q_len != k_len
    assert trace.step("blocks.0.cross_attn.pattern").shape == (1, 4, q_len, k_len)
    assert trace.step("blocks.0.cross_attn.q").dims == ("batch", "q_len", "d_model")
    assert trace.step("blocks.0.cross_attn.k.heads").dims == ("batch", "heads", "k_len", "d_head")
    assert trace.step("blocks.0.cross_attn.out").shape == (1, q_len, 64)
    assert trace.step("cross.resid_pre").shape == (1, k_len, 64)


def test_predictions_are_traced_too():
    trace = run([SENTENCE, "Hi"], predict_top_k=3, d_model=16, heads=2)
    assert trace.step("logits").dims == ("batch", "vocab")
    assert trace.tensors["logits"].shape == trace.step("logits").shape == (2, 50257)
    # Summed in float64, so that only the softmax's own float32 sum over 50,257 tokens counts.
    spread = float(np.ptp(trace.tensors["logits"]))
    np.testing.assert_allclose(trace.tensors["probs"].sum(-1, dtype=np.float64), 1.0, rtol=0,
                               atol=softmax_rtol(50257, "float32", spread))
    assert [p.position for p in trace.predictions] == [trace.inputs[0].length - 1, 1 - 1]


ATTN = ["q", "q.split", "q.heads", "k", "k.split", "k.heads", "v", "v.split", "v.heads"]
AFTER = ["z", "z.transpose", "z.merge", "out"]


@pytest.mark.parametrize(
    ("options", "stages"),
    [
        ({}, ["scores", "scaled", "masked", "pattern"]),
        ({"scale": False}, ["scores", "masked", "pattern"]),
        ({"mask": "none"}, ["scores", "scaled", "pattern"]),
    ],
)
def test_the_steps_of_a_layer_follow_the_formula(options, stages, engine):
    trace = run([SENTENCE], engine, **options)
    names = [s.name for s in trace.steps]
    assert names[:4] == ["tokens", "embed", "pos_embed", "resid_pre"]
    for layer in range(SMALL["layers"]):
        b = f"blocks.{layer}"
        expected = [f"{b}.attn.{n}" for n in ATTN + stages + AFTER] + [f"{b}.resid_post"]
        assert [n for n in names if n.startswith(f"{b}.")] == expected
    assert names[4:] == [n for layer in range(2) for n in names if n.startswith(f"blocks.{layer}.")]


def test_gpt2_layer_order():
    names = [s.name for s in run([SENTENCE], arch="gpt2").steps]
    b = "blocks.0"
    expected = ([f"{b}.ln_1"] + [f"{b}.attn.{n}" for n in ATTN] +
                [f"{b}.attn.{n}" for n in ("scores", "scaled", "masked", "pattern")] +
                [f"{b}.attn.{n}" for n in AFTER] +
                [f"{b}.resid_mid", f"{b}.ln_2", f"{b}.mlp.in", f"{b}.mlp.gelu", f"{b}.mlp.out",
                 f"{b}.resid_post"])
    assert [n for n in names if n.startswith(f"{b}.")] == expected
    assert names[-1] == "ln_f"


def test_cross_attention_comes_after_self_attention():
    names = [s.name for s in run([SENTENCE], cross_texts=["Le chat"]).steps]
    assert names[4:8] == ["cross.tokens", "cross.embed", "cross.pos_embed", "cross.resid_pre"]
    b = "blocks.0"
    layer = [n for n in names if n.startswith(f"{b}.")]
    assert layer.index(f"{b}.resid_mid") == layer.index(f"{b}.attn.out") + 1
    assert layer[layer.index(f"{b}.resid_mid") + 1] == f"{b}.cross_attn.q"
    assert layer[-2:] == [f"{b}.cross_attn.out", f"{b}.resid_post"]


@pytest.mark.parametrize("capture", ["patterns", "stages"])
def test_only_the_selected_layer_and_head_are_kept(capture, engine):
    trace = run([SENTENCE], engine, Selection(layers=(0,), heads=(0,), capture=capture))
    full = run([SENTENCE], engine)
    expected = {"blocks.0.attn.pattern"}
    if capture == "stages":
        expected |= {"blocks.0.attn.scores", "blocks.0.attn.scaled", "blocks.0.attn.masked"}
    assert set(trace.tensors) == expected
    # To rounding: on torch the one head is multiplied apart from the others (tolerance.py).
    tol = step_tolerances(full)
    for name in expected:
        assert trace.tensors[name].shape == (1, 1, 7, 7)  # one head of four
        assert_close(name, trace.tensors[name], full.tensors[name][:, :1], tol[name])
    # The steps still describe the whole stack, every head.
    assert trace.steps == full.steps
    assert trace.step("blocks.1.attn.pattern").shape == (1, 4, 7, 7)


def test_selected_heads_keep_their_order(engine):
    trace = run([SENTENCE], engine, Selection(layers=(1,), heads=(3, 1), capture="all"))
    full = run([SENTENCE], engine)
    # Of layer 0 only its output is kept: it is layer 1's input, so layer 1's numbers add up.
    assert {n for n in trace.tensors if n.startswith("blocks.0.")} == {"blocks.0.resid_post"}
    assert "resid_pre" in trace.tensors  # steps outside any layer are kept with "all"
    tol = step_tolerances(full)
    for name, x in trace.tensors.items():
        dims = trace.step(name).dims
        expected = full.tensors[name]
        if "heads" in dims:
            expected = np.take(expected, [3, 1], axis=dims.index("heads"))
        if name == "tokens":
            assert np.array_equal(x, expected)
        else:
            assert_close(name, x, expected, tol[name])


def test_extra_names_are_kept_whatever_the_capture():
    selection = Selection((1,), (2,), "patterns", extra=("blocks.0.resid_post", "blocks.1.attn.z"))
    trace = run([SENTENCE], selection=selection)
    assert set(trace.tensors) == {"blocks.1.attn.pattern", "blocks.0.resid_post", "blocks.1.attn.z"}
    assert trace.tensors["blocks.1.attn.z"].shape == (1, 1, 7, 16)
