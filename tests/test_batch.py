"""Batches: padding, the padding mask, and a row's independence from the rest of its batch.

The reference for a batch row is the same text traced alone (no padding at all). The fused path
is checked against `torch.nn.functional.scaled_dot_product_attention` on the rows it defines.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from importlib.resources import files

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from attn_tracer.cli import app
from attn_tracer.model import pipeline, tokens
from attn_tracer.model.config import Config
from attn_tracer.model.engine import select_engine
from attn_tracer.model.trace import Selection
from attn_tracer.model.weights import random_weights
from attn_tracer.render import heatmaps as render_heatmaps
from attn_tracer.render import terminal as render_terminal
from tolerance import assert_close, step_tolerances

SMALL = Config(d_model=32, heads=4, layers=2, n_ctx=64, seed=3)
TEXTS = ["The cat sat on the mat and looked at the door", "Hello", "A dog ran far away"]
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "house", "red", "is"]
SMALL_ARGS = ["--d-model", "64", "--heads", "4", "--layers", "2"]


def trace(texts, engine="numpy", padding="right", mask="causal", capture="all"):
    config = replace(SMALL, mask=mask)
    eng = select_engine(engine, "cpu", "float32", 1)
    selection = Selection(tuple(range(config.layers)), tuple(range(config.heads)), capture)
    t, _ = pipeline.run(texts, config, eng, random_weights(config), selection, padding=padding)
    return t


def real(x: np.ndarray, valid: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """The entries of `x` at real-token positions along each of `axes`."""
    for axis in axes:
        x = np.compress(valid, x, axis=axis)
    return x


# ── the batch row equals the text alone ───────────────────────────────────────────────────────

@pytest.mark.slow
@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_row_equals_text_alone(engine, padding):
    if engine == "torch":
        pytest.importorskip("torch")
    batch = trace(TEXTS, engine, padding)
    assert any(i.padding for i in batch.inputs)
    for b, text in enumerate(TEXTS):
        alone = trace([text], engine, padding)
        valid = batch.inputs[b].valid
        assert valid.sum() == alone.inputs[0].length
        # Equal to rounding: a batch is multiplied in other blocks than one text alone.
        tol = step_tolerances(alone)
        for layer in range(SMALL.layers):
            name = f"blocks.{layer}.attn.pattern"
            assert_close(name, real(batch.tensors[name][b], valid, (1, 2)),
                         alone.tensors[name][0], tol[name])
            name = f"blocks.{layer}.resid_post"
            assert_close(name, real(batch.tensors[name][b], valid, (0,)), alone.tensors[name][0],
                         tol[name])


def test_left_padding_starts_positions_at_zero():
    batch = pipeline.make_batch([tokens.tokenize("a b c"), tokens.tokenize("a")],
                                ["a b c", "a"], "left")
    assert batch.ids[1].tolist() == [pipeline.PAD_ID, pipeline.PAD_ID, batch.ids[0, 0]]
    assert batch.positions[1, -1] == 0
    assert batch.positions[0].tolist() == [0, 1, 2]


# ── no NaN, masked entries exactly 0: property test ───────────────────────────────────────────

texts_strategy = st.lists(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join),
    min_size=1, max_size=4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=texts_strategy, padding=st.sampled_from(["right", "left"]),
       mask=st.sampled_from(["causal", "none"]))
def test_padding_never_gives_nan(texts, padding, mask):
    t = trace(texts, "numpy", padding, mask)
    for name, x in t.tensors.items():
        assert not np.isnan(x).any(), name
        # Only the masked scores hold −∞ (what softmax turns into exact zeros).
        assert np.isfinite(x).all() or name.endswith(".masked"), name
    valid = np.stack([i.valid for i in t.inputs])  # [batch, len]
    for layer in range(SMALL.layers):
        p = t.tensors[f"blocks.{layer}.attn.pattern"]  # [batch, heads, len, len]
        assert (p.transpose(0, 3, 1, 2)[~valid] == 0).all()  # pad keys: columns of exactly 0
        assert (p.transpose(0, 2, 1, 3)[~valid] == 0).all()  # pad queries: rows of exactly 0
        sums = p.sum(-1).transpose(0, 2, 1)[valid]  # real queries: rows sum to 1
        # ≤ 48 keys: softmax's sum and this one err by ≤ 48u each in any order, each entry by a
        # few u: below 7e-6 in float32.
        np.testing.assert_allclose(sums, 1, atol=1e-5)
    for b, inp in enumerate(t.inputs):  # and each row still equals its text alone
        alone = trace([inp.text], "numpy", padding, mask)
        last = f"blocks.{SMALL.layers - 1}.resid_post"
        assert_close(last, real(t.tensors[last][b], inp.valid, (0,)), alone.tensors[last][0],
                     step_tolerances(alone)[last])


def test_pad_query_rows_and_pad_key_columns_are_zero():
    t = trace(TEXTS, "numpy", "left")
    p = t.tensors["blocks.0.attn.pattern"]
    for b, inp in enumerate(t.inputs):
        pad = ~inp.valid
        assert (p[b][:, pad, :] == 0).all()
        assert (p[b][:, :, pad] == 0).all()
    assert (~t.inputs[1].valid).sum() > 0


def test_fused_path_zeroes_pad_queries_like_the_explicit_path():
    torch = pytest.importorskip("torch")
    from attn_tracer.model.torch_ops import fused_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen) for _ in range(3))
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    allowed = (valid[:, None, :, None] & valid[:, None, None, :]
               & torch.ones(5, 5, dtype=torch.bool).tril())
    z = fused_attention(q, k, v, allowed, 8 ** -0.5)
    assert torch.isfinite(z).all()
    assert (z[1, :, :2] == 0).all()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(z[0], ref[0])
    torch.testing.assert_close(z[1, :, 2:], ref[1, :, 2:])


@pytest.mark.parametrize("padding", ["right", "left"])
def test_fused_torch_rows_equal_numpy(padding):
    pytest.importorskip("torch")
    config = SMALL
    sel = Selection((0, 1), (1, 2), "patterns", extra=(f"blocks.{SMALL.layers - 1}.resid_post",))
    fused, _ = pipeline.run(TEXTS, config, select_engine("torch", "cpu", "float32", 1),
                            random_weights(config), sel, padding=padding)
    ref = trace(TEXTS, "numpy", padding)
    tol = step_tolerances(ref)
    last = f"blocks.{SMALL.layers - 1}.resid_post"
    valid = np.stack([i.valid for i in ref.inputs])
    assert_close(last, fused.tensors[last][valid], ref.tensors[last][valid], tol[last])
    name = "blocks.1.attn.pattern"
    assert_close(name, fused.tensors[name], ref.tensors[name][:, [1, 2]], tol[name])


# ── the seeds' example: four sentences padded/cut to 16 tokens ────────────────────────────────

SEEDS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old barn",
    "Attention is all you need",
    "Transformers read every token of a sentence at once and weigh how much each one matters",
    "Padding fills the short rows",
]


@pytest.mark.slow
def test_seed_example_shapes(runner, tmp_path):
    lengths = [len(tokens.tokenize(t)) for t in SEEDS]
    assert max(lengths) > 16 and min(lengths) < 16
    result = runner.invoke(app, ["trace", *SEEDS, "--d-model", "768", "--heads", "12",
                                 "--max-length", "16", "--json", "--layer", "0", "--head", "0"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    shapes = {s["name"]: s["shape"] for s in doc["steps"]}
    assert shapes["resid_pre"] == [4, 16, 768]
    assert shapes["blocks.0.attn.q.split"] == [4, 16, 12, 64]
    assert shapes["blocks.0.attn.q.heads"] == [4, 12, 16, 64]
    assert shapes["blocks.0.attn.pattern"] == [4, 12, 16, 16]
    cut = [i for i, n in enumerate(lengths) if n > 16]
    assert f"cut text{'s' if len(cut) > 1 else ''} {', '.join(map(str, cut))}" in result.stderr
    for b, inp in enumerate(doc["inputs"]):
        assert inp["length"] == min(lengths[b], 16)
        assert inp["padding"] == 16 - inp["length"]
        assert len(inp["tokens"]) == inp["length"]
    assert sorted(e["batch"] for e in doc["attention"]) == [0, 1, 2, 3]
    mask = doc["config"]["mask_description"]
    assert mask["padding"] is True and mask["pad_id"] == tokens.ENDOFTEXT_ID
    schema = json.loads(files("attn_tracer.data").joinpath("trace.schema.json").read_text())
    jsonschema.validate(doc, schema)
    for entry in doc["attention"]:
        w = np.array(entry["weights"], dtype=float)
        pad = ~np.array(_valid(doc["inputs"][entry["batch"]]))
        assert (w[:, pad] == 0).all() and (w[pad] == 0).all()


def _valid(inp: dict) -> list[bool]:
    n = inp["length"] + inp["padding"]
    if inp["padding_side"] == "left":
        return [i >= inp["padding"] for i in range(n)]
    return [i < inp["length"] for i in range(n)]


# ── batch input on the command line ──────────────────────────────────────────────────────────

def test_several_text_arguments(runner):
    result = runner.invoke(app, ["trace", "one two three", "four", *SMALL_ARGS, "--json",
                                 "--padding", "left"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [i["text"] for i in doc["inputs"]] == ["one two three", "four"]
    assert [i["padding"] for i in doc["inputs"]] == [0, 2]
    assert {i["padding_side"] for i in doc["inputs"]} == {"left"}


def test_lines_file_skips_empty_lines(runner, tmp_path):
    path = tmp_path / "batch.txt"
    path.write_text("first line here\n\n   \nsecond\n", encoding="utf-8")
    result = runner.invoke(app, ["trace", "--lines", str(path), *SMALL_ARGS, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [i["text"] for i in doc["inputs"]] == ["first line here", "second"]
    assert result.stderr.count("\n") == 1  # one notice, one line
    assert "skipped 2 empty lines" in result.stderr and "(line 2, 3)" in result.stderr


def test_lines_from_stdin(runner):
    result = runner.invoke(app, ["trace", "--lines", "-", *SMALL_ARGS, "--json"],
                           input="alpha beta\n\ngamma\n")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [i["text"] for i in doc["inputs"]] == ["alpha beta", "gamma"]
    assert "skipped 1 empty line" in result.stderr


def test_mask_description_without_padding(runner):
    result = runner.invoke(app, ["trace", "same length", "same size", *SMALL_ARGS, "--json"])
    doc = json.loads(result.stdout)
    assert doc["config"]["mask_description"]["padding"] is False
    assert doc["config"]["mask_description"]["causal"] is True


# ── the terminal view of a batch ──────────────────────────────────────────────────────────────

def _view(runner, args):
    result = runner.invoke(app, ["trace", *args], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_batch_index_chooses_rows(runner):
    out = _view(runner, ["The cat sat on the mat", "Hi there", "A dog", *SMALL_ARGS,
                         "--head", "0", "--batch-index", "1"])
    assert "attn layer 0 head 0 · text 1" in out
    assert "· text 0" not in out and "· text 2" not in out
    out = _view(runner, ["The cat sat on the mat", "Hi there", "A dog", *SMALL_ARGS,
                         "--head", "0"])
    for b in range(3):
        assert f"attn layer 0 head 0 · text {b}" in out


@pytest.mark.parametrize("padding", ["right", "left"])
def test_pad_positions_drawn_distinctly(runner, padding):
    out = _view(runner, ["The cat sat on the mat", "Hi", *SMALL_ARGS, "--head", "0",
                         "--batch-index", "1", "--padding", padding])
    block = out.split("attn layer 0 head 0 · text 1")[1].split("\n\n")[0].splitlines()
    rows = block[2:2 + 6]  # the six query rows of the batch length
    pad_rows = [line for line in rows if line.split()[0] == render_heatmaps.PAD_LABEL]
    assert len(pad_rows) == 6 - len(tokens.tokenize("Hi")) == 5
    # A pad query's every cell is the padding mask; the real query's row has numbers, and ×
    # only under the pad keys.
    assert all(line.split()[1:] == [render_heatmaps.PADDED] * 6 for line in pad_rows)
    (real,) = [line for line in rows if line not in pad_rows]
    assert real.split()[1:].count(render_heatmaps.PADDED) == 5
    assert block[1].split().count("pad") == 5  # the pad key columns, labelled as the rows are
    assert "padding mask (pad key, or pad query)" in out  # the legend says what × is


def test_rendered_pad_rows_in_a_recorded_console():
    t = trace(["one two three four", "five"], "numpy", "right", capture="patterns")
    console = Console(file=io.StringIO(), width=100, force_terminal=True, record=True)
    render_terminal.render(t, console, batch_rows=[1])
    text = console.export_text()
    assert render_heatmaps.PAD_LABEL in text and render_heatmaps.PADDED in text
    assert "· text 0" not in text


# ── bad batch input: one line, exit 2 ────────────────────────────────────────────────────────

@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n"])
def test_lines_file_without_text(runner, tmp_path, content, one_line_error):
    path = tmp_path / "blank.txt"
    path.write_text(content, encoding="utf-8")
    message = one_line_error(runner.invoke(app, ["trace", "--lines", str(path), *SMALL_ARGS]))
    assert "--lines" in message and "empty" in message


@pytest.mark.parametrize("args, words", [
    (["a b c", "--max-length", "0"], "--max-length"),
    (["a b c", "--max-length", "-3"], "--max-length"),
    (["a", "b", "--batch-index", "2"], "--batch-index 2"),
    (["a", "b", "--batch-index", "-1"], "--batch-index -1"),
    (["a", "--padding", "middle"], "--padding"),
    (["a", "", "c"], "text 1"),
    (["a", "--lines", "x.txt"], "one way"),
])
def test_bad_batch_input(runner, args, words, one_line_error):
    message = one_line_error(runner.invoke(app, ["trace", *args, *SMALL_ARGS]))
    assert words in message


def test_stages_follow_the_batch_index(runner):
    out = _view(runner, ["The cat sat on the mat", "Hi", *SMALL_ARGS, "--head", "0",
                         "--stages", "--batch-index", "1"])
    stages = out.split("stages of layer 0 head 0 (text 1)")[1].split("attention patterns")[0]
    assert render_heatmaps.PAD_LABEL in stages and "␣cat" not in stages
