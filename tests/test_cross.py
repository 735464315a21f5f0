"""Cross-attention: queries from the main text, keys and values from another text.

The reference is `torch.nn.MultiheadAttention(batch_first=True)` loaded with our weights and
given different query and key/value inputs: the stream entering the cross block
(`blocks.N.resid_mid`) and the cross text's embeddings (`cross.resid_pre`).
"""

from __future__ import annotations

import json
from importlib.resources import files

import jsonschema
import numpy as np
import pytest

from attn_tracer.cli import app
from attn_tracer.model import pipeline
from attn_tracer.model.config import Config
from attn_tracer.model.engine import select_engine
from attn_tracer.model.trace import Selection
from attn_tracer.model.weights import random_weights
from tolerance import assert_close, magnitude, softmax_gain, step_tolerances, tolerance

torch = pytest.importorskip("torch")

SMALL = Config(d_model=32, heads=4, layers=2, n_ctx=64, seed=5)
SMALL_ARGS = ["--d-model", "64", "--heads", "4", "--layers", "2"]


def cross_trace(texts, cross_texts, engine="numpy", padding="right", capture="all"):
    weights = random_weights(SMALL, cross=True)
    selection = Selection(tuple(range(SMALL.layers)), tuple(range(SMALL.heads)), capture)
    t, _ = pipeline.run(texts, SMALL, select_engine(engine, "cpu", "float32", 1), weights,
                        selection, cross_texts=cross_texts, padding=padding)
    return t, weights.params


def reference_mha(params: dict, layer: int) -> torch.nn.MultiheadAttention:
    p = {k: torch.from_numpy(v) for k, v in params.items()
         if k.startswith(f"blocks.{layer}.cross_attn.")}
    name = f"blocks.{layer}.cross_attn"
    mha = torch.nn.MultiheadAttention(SMALL.d_model, SMALL.heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([p[f"{name}.W_{n}"].T for n in "QKV"]))
        mha.in_proj_bias.copy_(torch.cat([p[f"{name}.b_{n}"] for n in "QKV"]))
        mha.out_proj.weight.copy_(p[f"{name}.W_O"].T)
        mha.out_proj.bias.copy_(p[f"{name}.b_O"])
    return mha.eval()


def check_against_mha(t, params):
    valid_q = np.stack([i.valid for i in t.inputs])  # [batch, q_len]
    valid_k = np.stack([i.valid for i in t.cross])  # [batch, k_len]
    kv = torch.from_numpy(t.tensors["cross.resid_pre"])
    for layer in range(SMALL.layers):
        query = torch.from_numpy(t.tensors[f"blocks.{layer}.resid_mid"])
        mha = reference_mha(params, layer)
        with torch.no_grad():
            out, weights = mha(query, kv, kv, need_weights=True, average_attn_weights=False,
                               key_padding_mask=None if valid_k.all()
                               else torch.from_numpy(~valid_k))
        ours = t.tensors[f"blocks.{layer}.cross_attn.pattern"]  # [batch, heads, q_len, k_len]
        assert ours.shape == tuple(weights.shape)
        # From the same inputs: only this block's rounding, through its softmax's gain.
        block = f"blocks.{layer}.cross_attn"
        gain, dtype = softmax_gain(t, block), t.engine["dtype"]
        for b in range(ours.shape[0]):  # MHA does not define pad queries; we make them 0
            q = valid_q[b]
            assert_close("pattern", ours[b][:, q], weights[b][:, q].numpy(),
                         tolerance(1, dtype, gain))
            assert_close("out", t.tensors[f"{block}.out"][b][q], out[b][q].numpy(),
                         tolerance(magnitude(out.numpy()), dtype, gain))
            assert (ours[b][:, ~q] == 0).all()
            assert (ours[b][:, :, ~valid_k[b]] == 0).all()


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_cross_attention_equals_multihead_attention(engine):
    t, params = cross_trace(["The cat sat on the mat today"], ["Le chat"], engine)
    pattern = t.step("blocks.0.cross_attn.pattern")
    assert pattern.shape == (1, SMALL.heads, 7, 2)  # q_len ≠ k_len
    assert pattern.dims == ("batch", "heads", "q_len", "k_len")
    assert t.step("blocks.0.cross_attn.k.heads").dims == ("batch", "heads", "k_len", "d_head")
    # Keys come from the cross text alone: no causal mask, every key is seen by every query.
    assert (t.tensors["blocks.0.cross_attn.pattern"] > 0).all()
    check_against_mha(t, params)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_batched_cross_with_padding(padding):
    texts = ["The cat sat on the mat", "Hi", "A dog ran"]
    cross = ["Le chat est assis sur le tapis", "Salut", "Un chien"]
    t, params = cross_trace(texts, cross, padding=padding)
    assert any(i.padding for i in t.inputs) and any(i.padding for i in t.cross)
    check_against_mha(t, params)
    # Each row equals its own pair traced alone.
    for b in range(len(texts)):
        alone, _ = cross_trace([texts[b]], [cross[b]], padding=padding)
        q, k = t.inputs[b].valid, t.cross[b].valid
        name = "blocks.1.cross_attn.pattern"
        assert_close(name, t.tensors[name][b][:, q][:, :, k], alone.tensors[name][0],
                     step_tolerances(alone)[name])


def test_one_cross_text_is_shared_by_the_batch():
    t, params = cross_trace(["one two three", "four five"], ["shared keys here"])
    assert [i.text for i in t.cross] == ["shared keys here"] * 2
    check_against_mha(t, params)


def test_fused_cross_equals_explicit():
    # Two of four heads shown: the other two run through SDPA (the fused path), and so does
    # every cross-attention output; those outputs must equal the explicit NumPy ones.
    texts, cross = ["The cat sat on the mat", "Hi"], ["Le chat", "Salut toi"]
    weights = random_weights(SMALL, cross=True)
    outs = tuple(f"blocks.{layer}.cross_attn.out" for layer in range(SMALL.layers))
    fused_sel = Selection(tuple(range(SMALL.layers)), (1, 3), "patterns", extra=outs)
    fused, _ = pipeline.run(texts, SMALL, select_engine("torch", "cpu", "float32", 1), weights,
                            fused_sel, cross_texts=cross)
    ref, _ = cross_trace(texts, cross, "numpy", capture="all")
    tol = step_tolerances(ref)
    for layer in range(SMALL.layers):
        name = f"blocks.{layer}.cross_attn.pattern"
        assert_close(name, fused.tensors[name], ref.tensors[name][:, [1, 3]], tol[name])
        out = f"blocks.{layer}.cross_attn.out"
        assert_close(out, fused.tensors[out], ref.tensors[out], tol[out])


# ── command line ──────────────────────────────────────────────────────────────────────────────

def schema():
    return json.loads(files("attn_tracer.data").joinpath("trace.schema.json").read_bytes())


def test_cli_cross_json(runner):
    result = runner.invoke(app, ["trace", "The cat sat on the mat", "--cross", "Le chat",
                                 *SMALL_ARGS, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, schema())
    assert doc["config"]["cross"] is True
    assert [i["text"] for i in doc["cross_inputs"]] == ["Le chat"]
    entries = [e for e in doc["attention"] if e["block"] == "cross_attn"]
    assert {(e["layer"], e["head"]) for e in entries} == {(a, h) for a in (0, 1) for h in range(4)}
    w = np.array(entries[0]["weights"])
    assert w.shape == (6, 2)  # rows: the main text's tokens, columns: the cross text's
    np.testing.assert_allclose(w.sum(-1), 1, atol=1e-5)


def test_cli_cross_batch_json_validates(runner, tmp_path):
    path = tmp_path / "cross.txt"
    path.write_text("Die Katze sitzt auf der Matte", encoding="utf-8")
    result = runner.invoke(app, ["trace", "The cat sat", "A long sentence with more words",
                                 "--cross-file", str(path), *SMALL_ARGS, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, schema())
    assert [i["text"] for i in doc["cross_inputs"]] == ["Die Katze sitzt auf der Matte"] * 2


def test_cli_cross_heatmap_rows_and_columns(runner):
    result = runner.invoke(app, ["trace", "The cat sat", "--cross", "Le chat noir",
                                 *SMALL_ARGS, "--head", "0"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.stderr
    block = result.stdout.split("cross_attn layer 0 head 0")[1].split("\n\n")[0].splitlines()
    # Columns: the cross text's four tokens (Le, ␣chat, ␣no, ir), drawn without the ␣, whole:
    # at 120 columns there is room for "chat" (a 3-cell column would cut it to "ch…").
    assert block[1].split() == ["Le", "chat", "no", "ir"]
    rows = [line.split()[0] for line in block[2:5]]
    assert rows == ["The", "␣cat", "␣sat"]  # rows: the main text's tokens


@pytest.mark.parametrize("args, words", [
    (["x", "--cross", ""], "--cross"),
    (["x", "--cross", "   "], "--cross"),
    (["x", "--cross", "y", "--arch", "gpt2"], "--cross"),
    (["x", "--cross", "y", "--cross-file", "f.txt"], "--cross"),
    (["a", "b", "c", "--cross", "1", "--cross", "2"], "one per batch row"),
])
def test_cli_cross_usage_errors(runner, args, words):
    result = runner.invoke(app, ["trace", *args, *SMALL_ARGS])
    assert result.exit_code == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn: error: ") and words in lines[0]


def test_cli_empty_cross_file(runner, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n \n", encoding="utf-8")
    result = runner.invoke(app, ["trace", "x", "--cross-file", str(path), *SMALL_ARGS])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("attn: error: ")
