"""Llama, Mistral and Qwen2 checkpoints traced through `attn`, checked against `transformers`.

The references are `LlamaForCausalLM` (grouped-query: fewer K/V heads than query heads, and
one: multi-query), `MistralForCausalLM` (a sliding window shorter than the text) and
`Qwen2ForCausalLM` (biases on Q, K and V), random-initialised, saved with `save_pretrained` and
run eagerly with `output_attentions=True`. The text is given as token ids (no tokenizer), in
single texts and padded batches, left padding included: rotary positions must count real tokens
only, as transformers' generate() counts them (position_ids = cumsum(attention_mask) − 1).
Every layer's attention pattern and the logits at each row's last real token must match to
float32's rounding (tests/tolerance.py), on the NumPy and the torch engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from attn_tracer.commands.run import Request, build_config  # noqa: E402
from attn_tracer.model.engine import select_engine  # noqa: E402
from attn_tracer.model.pipeline import prepare, run  # noqa: E402
from attn_tracer.model.trace import Selection  # noqa: E402
from tolerance import assert_close, step_tolerances  # noqa: E402

pytestmark = pytest.mark.slow  # Hugging Face references: seconds each

VOCAB = 300
COMMON = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
              vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager",
              # 0.02 (the default) makes every pattern nearly uniform: no test of the scores.
              initializer_range=0.2)
MODELS = {  # name → (config class, model class, config fields beyond COMMON)
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "llama-mqa": ("LlamaConfig", "LlamaForCausalLM",
                  dict(num_key_value_heads=1, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(num_key_value_heads=2, sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
}
rng = np.random.default_rng(7)
ROWS = {  # name → (token id rows, padding)
    "single": ([rng.integers(1, VOCAB, 11).tolist()], "right"),
    "right": ([rng.integers(1, VOCAB, n).tolist() for n in (9, 3, 6)], "right"),
    "left": ([rng.integers(1, VOCAB, n).tolist() for n in (9, 3, 6)], "left"),
}
ENGINES = ("numpy", "torch")


@dataclass
class Model:
    hf: object
    dir: Path


def build(name: str, root: Path, **changes) -> Model:
    config_class, model_class, extra = MODELS[name]
    torch.manual_seed(sum(map(ord, name)))
    config = getattr(transformers, config_class)(**COMMON, **{**extra, **changes})
    hf = getattr(transformers, model_class)(config).eval()
    assert hf.config._attn_implementation == "eager"
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: make them count
        for key, p in hf.named_parameters():
            if key.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif key.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    hf.save_pretrained(root)
    return Model(hf, root)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Model]:
    return {name: build(name, tmp_path_factory.mktemp(name)) for name in MODELS}


def hf_forward(hf, rows: list[list[int]], padding: str) -> dict:
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)  # 0 pads, as the pipeline does here
    mask = np.zeros((len(rows), length), np.int64)
    for b, r in enumerate(rows):
        cols = slice(0, len(r)) if padding == "right" else slice(length - len(r), length)
        ids[b, cols], mask[b, cols] = r, 1
    position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(position_ids), output_attentions=True)
    last = length - 1 - np.argmax(mask[:, ::-1], axis=1)
    return {"valid": mask.astype(bool), "last": last,
            "patterns": [a.float().numpy() for a in out.attentions],
            "logits": out.logits.float().numpy()[np.arange(len(rows)), last]}


def trace(config, weights, rows_name: str, engine: str, capture: str = "patterns", heads=None):
    rows, padding = ROWS[rows_name]
    prepared = prepare(["?"] * len(rows), config, padding=padding, ids=rows)
    selection = Selection(tuple(range(config.layers)),
                          tuple(range(config.heads)) if heads is None else heads, capture)
    t, _ = run([], config, select_engine(engine, "cpu", "float32", 8), weights, selection,
               prepared=prepared, predict_top_k=3)
    return t


def compare(t, ref: dict, tol: dict, heads=None) -> None:
    valid = ref["valid"]
    for layer, ours in t.patterns():
        want = ref["patterns"][layer] if heads is None else ref["patterns"][layer][:, list(heads)]
        assert ours.shape == want.shape
        for b in range(valid.shape[0]):
            real = valid[b]
            assert_close(f"layer {layer} row {b}", ours[b][:, real], want[b][:, real],
                         tol[f"blocks.{layer}.attn.pattern"])
            assert (ours[b][:, :, ~real] == 0).all()
    assert [p.position for p in t.predictions] == ref["last"].tolist()
    assert_close("logits", t.tensors["logits"], ref["logits"], tol["logits"])


@pytest.fixture(scope="module")
def loaded(models):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_config(Request(weights=str(models[name].dir)))
        return cache[name]

    return get


@pytest.mark.parametrize("rows_name", list(ROWS))
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(MODELS))
def test_patterns_and_logits_match_hf(name, engine, rows_name, models, loaded) -> None:
    config, weights = loaded(name)
    ref = hf_forward(models[name].hf, *ROWS[rows_name])
    tol = step_tolerances(trace(config, weights, rows_name, "numpy", capture="all"))
    compare(trace(config, weights, rows_name, engine), ref, tol)


@pytest.mark.parametrize("engine", ENGINES)
def test_selected_heads_fused_path_match_hf(engine, models, loaded) -> None:
    """Some heads shown: the others run through SDPA (torch) or the blocked path (NumPy), with
    grouped-query K/V and the sliding window."""
    config, weights = loaded("mistral")
    ref = hf_forward(models["mistral"].hf, *ROWS["left"])
    tol = step_tolerances(trace(config, weights, "left", "numpy", capture="all"))
    compare(trace(config, weights, "left", engine, heads=(1, 2)), ref, tol, heads=(1, 2))


def test_checkpoint_settings_are_read(loaded) -> None:
    expected = {"llama-gqa": (2, None, 10000.0, False), "llama-mqa": (1, None, 500.0, False),
                "mistral": (2, 4, 10000.0, False), "qwen2": (2, None, 10000.0, True)}
    for name, (kv_heads, window, theta, bias) in expected.items():
        config, weights = loaded(name)
        assert (config.arch, config.pos, config.norm, config.mlp) == \
            ("llama", "rotary", "rms", "swiglu")
        assert (config.kv_heads, config.window, config.rope_theta) == (kv_heads, window, theta)
        assert ("blocks.0.attn.b_Q" in weights.params) is bias
        assert "blocks.0.attn.b_O" not in weights.params
        assert weights.params["blocks.0.attn.W_K"].shape == (64, kv_heads * 16)
        assert ("lm_head" in weights.params) is (name != "llama-mqa")  # llama-mqa ties them


def test_the_window_matters(models, loaded, tmp_path) -> None:
    """Mistral's window (4) is shorter than the text (11): without it, HF's own patterns and
    logits change, so the parity above cannot pass with the window ignored."""
    with_window = hf_forward(models["mistral"].hf, *ROWS["single"])
    wide = build("mistral", tmp_path / "wide", sliding_window=None)
    without = hf_forward(wide.hf, *ROWS["single"])
    assert np.abs(with_window["logits"] - without["logits"]).max() > 1e-2
    assert np.abs(with_window["patterns"][0] - without["patterns"][0]).max() > 1e-2
    # And ours, on the window-less checkpoint, matches that one instead.
    config, weights = build_config(Request(weights=str(wide.dir)))
    assert config.window is None
    tol = step_tolerances(trace(config, weights, "single", "numpy", capture="all"))
    compare(trace(config, weights, "single", "numpy"), without, tol)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_is_computed_in_float32(dtype, tmp_path) -> None:
    """A bf16/fp16 checkpoint is widened to float32 on load; the reference is transformers
    loading the same file in float32."""
    model = build("llama-gqa", tmp_path / "f32")
    model.hf.to(getattr(torch, dtype)).save_pretrained(tmp_path / dtype)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / dtype, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    config, weights = build_config(Request(weights=str(tmp_path / dtype)))
    assert weights.params["blocks.0.attn.W_Q"].dtype == np.float32
    ref = hf_forward(hf, *ROWS["right"])
    tol = step_tolerances(trace(config, weights, "right", "numpy", capture="all"))
    compare(trace(config, weights, "right", "numpy"), ref, tol)


def test_cli_with_ids_and_refusals(models, one_line_error) -> None:
    from typer.testing import CliRunner

    from attn_tracer.cli import app

    runner = CliRunner()
    where = str(models["mistral"].dir)
    result = runner.invoke(app, ["trace", "--weights", where, "--ids", "5,17,42,9,100,3",
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    import json

    doc = json.loads(result.stdout)
    assert (doc["config"]["model_type"], doc["config"]["window"]) == ("mistral", 4)
    assert doc["config"]["mask_description"]["pad_id"] == 0  # vocabulary of 300: no 50256
    view = runner.invoke(app, ["trace", "--weights", where, "--ids", "5,17,42,9,100,3"],
                         env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert "Mistral weights from" in view.stdout and "∘" in view.stdout
    one_line_error(runner.invoke(app, ["trace", "--weights", where, "Hello"]), 2,
                   "(Mistral) has no tokenizer.json", "--ids")
    one_line_error(runner.invoke(app, ["trace", "--weights", where, "--ids", "300"]), 2,
                   "token id 300 is out of range")
    one_line_error(runner.invoke(app, ["trace", "--weights", where, "--ids", "1",
                                       "--kv-heads", "4"]), 2, "--kv-heads conflicts")
    one_line_error(runner.invoke(app, ["trace", "--weights", where, "--ids", "1",
                                       "--arch", "gpt2"]), 2, "--arch gpt2 conflicts")


def test_other_model_types_are_refused_naming_the_supported(tmp_path, one_line_error) -> None:
    from typer.testing import CliRunner

    from attn_tracer.cli import app

    (tmp_path / "config.json").write_text('{"model_type": "gemma"}')
    one_line_error(CliRunner().invoke(app, ["trace", "--weights", str(tmp_path), "--ids", "1"]),
                   1, "describes a 'gemma' model; attn reads gpt2, llama, mistral, qwen2")
