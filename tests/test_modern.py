"""Modern attention on the random stack: rotary positions, grouped-query K/V, sliding windows,
RMSNorm and SwiGLU, each a visible step, and every view and command on such a config.

References nobody here wrote: transformers' own `apply_rotary_pos_emb` (Llama: halves, and GPT-J:
interleaved), torch's `scaled_dot_product_attention` with `enable_gqa=True`, and transformers'
`repeat_kv`. The whole Llama/Mistral/Qwen2 block is compared with transformers in
tests/test_llama_family.py.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files

import jsonschema
import numpy as np
import pytest
from typer.testing import CliRunner

from attn_tracer.cli import app
from attn_tracer.commands import save
from attn_tracer.errors import UsageError
from attn_tracer.model import layers, memory
from attn_tracer.model.config import Config
from attn_tracer.model.engine import Engine
from attn_tracer.model.pipeline import causal_mask, run
from attn_tracer.model.steps import LAYER_STEPS, MODERN_LAYER_STEPS, score_inputs
from attn_tracer.model.trace import Selection
from attn_tracer.model.weights import random_weights
from test_teaching import block, check_product
from tolerance import assert_close, step_tolerances

runner = CliRunner()
WIDE = {"COLUMNS": "200", "NO_COLOR": "1"}
# A grouped-query + rotary + window config small enough for every view.
MODERN = ["--arch", "llama", "--d-model", "16", "--heads", "4", "--kv-heads", "2", "--window",
          "3", "--layers", "2"]
TEXT = "The cat sat on the mat"


def invoke(*args: str, env=WIDE):
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.stderr
    return result


def modern_config(**changes) -> Config:
    fields = dict(d_model=16, heads=4, kv_heads=2, window=3, layers=2, arch="llama",
                  pos="rotary", norm="rms", mlp="swiglu", bias=False, ln_eps=1e-6)
    return Config(**{**fields, **changes})


def trace_of(config, texts, engine="numpy", heads=None, capture="all", padding="right",
             hooks=None):
    heads = tuple(range(config.heads)) if heads is None else heads
    t, _ = run(texts, config, Engine(engine, "cpu", "float32"), random_weights(config),
               Selection(tuple(range(config.layers)), heads, capture), padding=padding,
               predict_top_k=3, hooks=hooks)
    return t


# ── the steps and their shapes ───────────────────────────────────────────────────────────────

def test_the_issues_trace_shows_rotation_and_repeat():
    doc = json.loads(invoke("trace", TEXT, "--pos", "rotary", "--kv-heads", "4", "--json").stdout)
    jsonschema.validate(doc, json.loads(files("attn_tracer.data")
                                        .joinpath("trace.schema.json").read_text()))
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["blocks.0.attn.k.heads"]["shape"] == [1, 4, 6, 64]
    assert steps["blocks.0.attn.k.heads"]["dims"] == ["batch", "kv_heads", "len", "d_head"]
    assert steps["blocks.0.attn.q.rot"]["shape"] == [1, 12, 6, 64]
    assert steps["blocks.0.attn.k.rot"]["shape"] == [1, 4, 6, 64]
    assert steps["blocks.0.attn.k.repeat_kv"]["shape"] == [1, 12, 6, 64]
    assert steps["blocks.0.attn.v.repeat_kv"]["shape"] == [1, 12, 6, 64]
    assert "halves" in steps["blocks.0.attn.q.rot"]["op"]
    names = list(steps)
    assert names.index("blocks.0.attn.k.rot") < names.index("blocks.0.attn.k.repeat_kv") < \
        names.index("blocks.0.attn.scores")
    assert "pos_embed" not in steps  # rotary positions add nothing to the embeddings
    assert doc["config"]["kv_heads"] == 4 and doc["config"]["pos"] == "rotary"


def test_classic_json_config_has_no_modern_fields():
    doc = json.loads(invoke("trace", "Hi there", "--d-model", "8", "--heads", "2", "--json").stdout)
    for name in ("kv_heads", "window", "norm", "mlp", "rotary_dims", "rope_theta", "model_type"):
        assert name not in doc["config"]


def test_modern_steps_are_in_the_catalogue():
    """Every step a modern run records is one --steps accepts (model/steps.py)."""
    t = trace_of(modern_config(), [TEXT, "A dog"], capture="patterns")
    inner = {s.name.split(".", 2)[2] for s in t.steps if s.name.startswith("blocks.")}
    assert inner <= set(LAYER_STEPS) | set(MODERN_LAYER_STEPS)
    assert set(MODERN_LAYER_STEPS) <= inner
    for s in t.steps:
        assert save.step_kinds(s.name) <= set(save.STEP_NAMES), s.name


def test_memory_shapes_follow_the_kv_width():
    config = modern_config()
    t = trace_of(config, [TEXT], capture="patterns")
    shapes = memory.attention_shapes(config, 1, 6, 6)
    for name, shape in shapes.items():
        assert t.step(f"blocks.0.attn.{name}").shape == shape, name
    assert shapes["k"] == (1, 6, 2 * 4)  # kv_heads·d_head, not heads·d_head
    # Qwen2.5-0.5B's attention (14 heads, 2 K/V heads): W_K and W_V are 1/7 as wide.
    big = dict(d_model=896, heads=14, layers=4, d_mlp=4864)
    grouped = memory.estimate(modern_config(**big, kv_heads=2), "float32", 1, 64, 64, 1, 1,
                              "patterns", False)
    classic = memory.estimate(modern_config(**big, kv_heads=14), "float32", 1, 64, 64, 1, 1,
                              "patterns", False)
    saved = 4 * 2 * 896 * (14 - 2) * 64 * (4 + 4)  # W_K, W_V: host float32 + engine copies
    assert classic - grouped >= 0.99 * saved  # less two repeat_kv steps' bookkeeping


# ── rotary positions ─────────────────────────────────────────────────────────────────────────

@pytest.mark.slow  # imports transformers: seconds
@pytest.mark.parametrize("style", ["halves", "interleaved"])
@pytest.mark.parametrize("rotary_dims", [8, 4])
def test_rotation_matches_transformers(style, rotary_dims):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if style == "halves":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_rope
    else:
        from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as hf_rope
    config = Config(d_model=16, heads=2, pos="rotary", rotary_dims=rotary_dims,
                    rotary_style=style, rope_theta=500.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 7, 8)).astype(np.float32)
    positions = np.array([np.arange(7), np.maximum(np.arange(7) - 2, 0)])
    cos, sin = layers.rotary_angles(positions, config)
    ours = layers.rotate(x, cos.astype(np.float32), sin.astype(np.float32), config)
    t = torch.from_numpy(x)
    rot, rest = t[..., :rotary_dims], t[..., rotary_dims:]
    inv = 1.0 / 500.0 ** (torch.arange(0, rotary_dims, 2, dtype=torch.float64) / rotary_dims)
    angle = torch.from_numpy(positions).double()[..., None] * inv  # [batch, len, r/2]
    if style == "halves":
        emb = torch.cat([angle, angle], dim=-1)
        q, _ = hf_rope(rot, rot, emb.cos().float(), emb.sin().float())  # unsqueeze_dim=1
    else:  # GPT-J: sin/cos [batch, len, r/2], repeated per pair inside, x [batch, len, heads, d]
        q = hf_rope(rot.transpose(1, 2), angle.sin().float(), angle.cos().float()).transpose(1, 2)
    want = torch.cat([q, rest], dim=-1).numpy()
    # Both round the same few float32 products of unit-scale numbers: a few ulps of 4.
    np.testing.assert_allclose(ours, want, rtol=0, atol=64 * 2**-24 * 4)


def test_turned_scores_depend_only_on_the_distance():
    config = Config(d_model=16, heads=2, pos="rotary")
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 1, 1, 1, 8))
    def score(p, p2):
        cq, sq = layers.rotary_angles(np.array([[p]]), config)
        ck, sk = layers.rotary_angles(np.array([[p2]]), config)
        return float(layers.rotate(q, cq, sq, config).ravel() @
                     layers.rotate(k, ck, sk, config).ravel())
    assert math.isclose(score(5, 2), score(105, 102), rel_tol=1e-9, abs_tol=1e-9)
    assert not math.isclose(score(5, 2), score(5, 4), rel_tol=1e-3)


def test_left_padding_turns_a_text_as_it_would_alone():
    config = modern_config()
    alone = trace_of(config, ["A dog"])
    padded = trace_of(config, [TEXT, "A dog"], padding="left")
    n = alone.inputs[0].length
    name = "blocks.1.attn.pattern"
    tol = step_tolerances(alone)[name]
    assert_close(name, padded.tensors[name][1, :, -n:, -n:], alone.tensors[name][0], tol)


# ── grouped-query attention and the window: fused and blocked paths ──────────────────────────

@pytest.mark.slow  # imports transformers: seconds
def test_repeat_kv_matches_transformers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(layers.repeat_kv(x, 4), hf_repeat(torch.from_numpy(x), 4))


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_unseen_heads_match_the_explicit_path(engine):
    """One head shown: the others go through SDPA (torch, against its own enable_gqa below) or
    NumPy's blocked path, with a window and padding; the residual stream must not change."""
    if engine == "torch":
        pytest.importorskip("torch")
    config = modern_config()
    texts = [TEXT, "A dog"]
    full = trace_of(config, texts, engine, capture="all", padding="left")
    one = trace_of(config, texts, engine, heads=(1,), capture="patterns", padding="left")
    tol = step_tolerances(full)
    for layer in range(config.layers):
        name = f"blocks.{layer}.attn.pattern"
        assert_close(name, one.tensors[name], full.tensors[name][:, [1]], tol[name])
    assert_close("logits", one.tensors["logits"], full.tensors["logits"], tol["logits"])


def test_sdpa_with_enable_gqa_agrees_with_repeat_first():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from attn_tracer.model.torch_ops import fused_attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 9, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    allowed = torch.from_numpy(causal_mask(9, 4))[None, None]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    got = fused_attention(q, torch.from_numpy(layers.repeat_kv(k.numpy(), 3)),
                          torch.from_numpy(layers.repeat_kv(v.numpy(), 3)), allowed, 8**-0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=64 * 2**-24 * 8)


def test_window_mask():
    m = causal_mask(5, 2)
    assert m.tolist() == [[True, False, False, False, False], [True, True, False, False, False],
                          [False, True, True, False, False], [False, False, True, True, False],
                          [False, False, False, True, True]]
    t = trace_of(modern_config(window=2), [TEXT])
    pattern = t.tensors["blocks.0.attn.pattern"][0]
    assert (pattern[:, ~causal_mask(6, 2)] == 0).all()
    np.testing.assert_allclose(pattern.sum(-1), 1, atol=1e-6)


def test_window_has_its_own_mark_and_legend():
    out = invoke("trace", TEXT, *MODERN, "--head", "0").stdout
    assert "∘ sliding window (a query sees its last 3 keys)" in out
    assert "· causal mask" in out
    rows = [line for line in out.splitlines() if line.lstrip().startswith("␣mat")]
    assert rows and rows[0].split()[1:4] == ["∘", "∘", "∘"]  # keys 0-2: out of the window
    doc = json.loads(invoke("trace", TEXT, *MODERN, "--json").stdout)
    assert doc["config"]["mask_description"]["window"] == 3


# ── --values: the rotation and the sharing, recomputed from the printed numbers ─────────────

@pytest.fixture(scope="module")
def tiny():
    return invoke("trace", "a cat cat cat", "--arch", "llama", "--d-model", "8", "--heads", "4",
                  "--kv-heads", "2", "--layers", "1", "--values").stdout


def test_values_show_the_rotation(tiny):
    cos_sin = layers.rotary_angles(np.arange(4)[None], Config(d_model=8, heads=4, pos="rotary"))
    cos, sin = (a[0, 0] for a in cos_sin)  # [len, d_head / 2]
    for name in ("Q L0H0", "Q L0H1", "K kv0", "K kv1"):
        before, turned = block(tiny, f"{name} before"), block(tiny, f"{name} turned")
        a, b = before.m[:, :1], before.m[:, 1:]  # d_head 2: the pair (x_0, x_1)
        want = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=1)
        assert np.all(np.abs(turned.m - want) <= 2 * before.d + turned.d + 1e-9), name
    # The same token at three positions: one row before the turn, three different ones after.
    q = block(tiny, "Q L0H0 before")
    assert q.rows[1:] == ["␣cat"] * 3
    assert np.array_equal(q.m[1], q.m[2]) and np.array_equal(q.m[2], q.m[3])
    turned = block(tiny, "Q L0H0 turned").m
    assert not np.array_equal(turned[1], turned[2]) and not np.array_equal(turned[2], turned[3])


def test_values_show_which_query_heads_share_which_kv_head(tiny):
    assert "K/V head 0 → query heads 0, 1; K/V head 1 → query heads 2, 3" in tiny
    assert block(tiny, "W_K  ").cols == ["kv0.0", "kv0.1", "kv1.0", "kv1.1"]
    assert block(tiny, "W_Q  ").m.shape == (8, 8) and block(tiny, "W_K  ").m.shape == (8, 4)
    for h in range(4):
        q = block(tiny, f"Q L0H{h} turned")
        k = block(tiny, f"K kv{h // 2} turned")  # head h scores against its group's K
        check_product(q, q.d, k.m.T, k.d, block(tiny, f"scores L0H{h}  "))


# ── every view and command on a grouped-query + rotary + window config ───────────────────────

def test_save_stores_kv_at_their_width_and_the_repeat_as_a_view(tmp_path):
    path = tmp_path / "run.npz"
    invoke("trace", TEXT, *MODERN, "--head", "1,2", "--save", str(path))
    data = np.load(path)
    views = json.loads(str(data["views"]))
    config = json.loads(str(data["config"]))
    assert config["kv_heads"] == 2
    assert data["blocks.0.attn.k"].shape == (1, 6, 2 * 4)  # kv_heads·d_head
    assert data["blocks.0.attn.k.rot"].shape == (1, 2, 6, 4)  # every K/V head, turned
    assert views["blocks.0.attn.k.repeat_kv"]["of"] == "blocks.0.attn.k.rot"
    assert views["blocks.0.attn.v.repeat_kv"]["of"] == "blocks.0.attn.v"
    assert views["blocks.0.attn.k.heads"]["reshape"] == [1, 6, 2, 4]
    t = trace_of(modern_config(), [TEXT], heads=(1, 2))
    for name, recipe in views.items():
        rebuilt = save.view(data[recipe["of"]], recipe)
        np.testing.assert_array_equal(rebuilt, t.tensors[name], err_msg=name)


def test_circuits_use_the_groups_w_v():
    from attn_tracer.analysis.circuits import value_circuit

    config = modern_config()
    p = random_weights(config).params
    W_V, W_O = p["blocks.0.attn.W_V"], p["blocks.0.attn.W_O"]
    assert W_V.shape == (16, 8)
    for h in range(4):
        vc = value_circuit(W_V, W_O, 4, h, kv_heads=2)
        g = h // 2
        np.testing.assert_array_equal(vc.down, W_V[:, 4 * g:4 * g + 4])
        np.testing.assert_array_equal(vc.up, W_O[4 * h:4 * h + 4])
    out = invoke("trace", TEXT, *MODERN, "--circuits").stdout
    assert "query head h reads W_V's block of K/V head ⌊h / 2⌋" in " ".join(out.split())


def test_cost_shows_the_kv_saving():
    out = " ".join(invoke("trace", TEXT, *MODERN, "--cost").stdout.split())
    assert ("K and V are kv_heads·d_head = 2·4 = 8 wide where Q is 16: W_K and W_V hold 256 "
            "numbers a layer instead of 512") in out


def test_heads_runs_on_a_modern_config():
    doc = json.loads(invoke("heads", TEXT, *MODERN, "--json").stdout)
    assert len(doc["heads"]) == 2 * 4
    jsonschema.validate(doc, json.loads(files("attn_tracer.data")
                                        .joinpath("heads.schema.json").read_text()))


def test_attribute_ablates_and_adds_up_on_a_modern_config():
    doc = json.loads(invoke("attribute", TEXT, *MODERN, "--ablate", "L1H2", "--json").stdout)
    jsonschema.validate(doc, json.loads(files("attn_tracer.data")
                                        .joinpath("attribute.schema.json").read_text()))
    assert [h["name"] for h in doc["ablation"]["heads"]] == ["L1H2"]
    assert doc["final_norm"]["kind"] == "rms"  # Llama's final RMSNorm, σ frozen
    total = sum(c["logit"] for c in doc["components"]) + doc["constant"]
    # The parts add up to the logit the model computed (float32 forward, float64 parts).
    assert math.isclose(total, doc["total"], rel_tol=1e-9)
    assert math.isclose(total, doc["prediction"]["value"], rel_tol=1e-5)


def test_explore_data_rebuilds_the_traces_patterns():
    from attn_tracer.commands.run import Request
    from attn_tracer.explore.data import compute

    r = Request(texts=[TEXT], arch="llama", d_model=16, heads=4, kv_heads=2, window=3, layers=2)
    data = compute(r, lambda m: None, 120, color=False)
    t = trace_of(modern_config(), [TEXT])
    for layer in range(2):
        for h in range(4):
            got = np.squeeze(data.stages(layer, h, 0, "attn")["pattern"])
            want = t.tensors[f"blocks.{layer}.attn.pattern"][0, h]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    q, k, _ = score_inputs(modern_config(), "blocks.0.attn")
    assert (q, k) == ("blocks.0.attn.q.rot", "blocks.0.attn.k.repeat_kv")


# ── options ──────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize(("args", "needle"), [
    (["--heads", "4", "--kv-heads", "3"], "--kv-heads 3 does not divide --heads 4"),
    (["--window", "2", "--mask", "none"], "--window is a sliding causal mask"),
    (["--norm", "rms"], "--norm sets a part of the full block"),
    (["--pos", "rotary", "--rotary-dims", "3", "--d-model", "8", "--heads", "2"],
     "--rotary-dims must be even"),
    (["--rope-theta", "100"], "--rope-theta shapes rotary positions"),
    (["--ids", "1,x"], "--ids takes token ids"),
    (["--ids", "99999"], "token id 99999 is out of range"),
])
def test_option_errors(args, needle, one_line_error):
    result = runner.invoke(app, ["trace", *args] + ([] if "--ids" in args else ["Hi"]))
    one_line_error(result, 2, needle)


def test_ids_give_the_same_run_as_the_text():
    by_text = json.loads(invoke("trace", TEXT, "--d-model", "8", "--heads", "2", "--json").stdout)
    ids = ",".join(str(t["id"]) for t in by_text["inputs"][0]["tokens"])
    by_ids = json.loads(invoke("trace", "--ids", ids, "--d-model", "8", "--heads", "2",
                               "--json").stdout)
    assert by_ids["attention"] == by_text["attention"]
    assert by_ids["inputs"][0]["text"] == TEXT


def test_arch_llama_preset():
    doc = json.loads(invoke("trace", "Hi", "--arch", "llama", "--d-model", "8", "--heads", "2",
                            "--json").stdout)
    c = doc["config"]
    assert (c["pos"], c["norm"], c["mlp"], c["bias"]) == ("rotary", "rms", "swiglu", False)
    with pytest.raises(UsageError):
        Config(d_model=8, heads=2, kv_heads=0)
