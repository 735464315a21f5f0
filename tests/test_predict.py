"""`--predict`: next-token top-k ids and probabilities, checked against Hugging Face GPT-2.

The reference logits come from `GPT2LMHeadModel` (random weights, saved with `save_pretrained`
and loaded through `--weights`); the expected distribution is softmax(logits / T) computed here
in float64 from those logits. Its ln_f gain is raised so the logits spread over several units:
a near-uniform distribution would not show what the temperature does.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")

from typer.testing import CliRunner  # noqa: E402  (after the importorskip guards)

from attn_tracer.cli import app  # noqa: E402
from attn_tracer.commands.run import Request, build_config  # noqa: E402
from attn_tracer.model import tokens  # noqa: E402
from attn_tracer.model.engine import select_engine  # noqa: E402
from attn_tracer.model.pipeline import run  # noqa: E402
from attn_tracer.model.trace import Selection  # noqa: E402
from tolerance import assert_close, prob_rtol, softmax_rtol, step_tolerances  # noqa: E402

VOCAB = 50257
TEXTS = ["The capital of France is", "Hello", "One, two, three,"]
runner = CliRunner()


def _sharpen(hf) -> None:
    hf.transformer.ln_f.weight.mul_(30.0)  # logits with a spread of several units


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    built = hf_checkpoint("gpt2", seed=3, prepare=_sharpen, n_embd=64, n_head=4, n_layer=2,
                          n_positions=64, vocab_size=VOCAB)
    return built.model, built.directory


@pytest.fixture(scope="module")
def loaded(model):
    return build_config(Request(weights=str(model[1])))


def logit_tolerance(config, weights, texts, padding="right") -> float:
    """How far our float32 logits may be from HF's (tests/tolerance.py), from a full trace."""
    everything = Selection(tuple(range(config.layers)), tuple(range(config.heads)), "all")
    t, _ = run(texts, config, select_engine("numpy", "cpu", "float32", 8), weights, everything,
               padding=padding, predict_top_k=1)
    return step_tolerances(t)["logits"]


def assert_ranked(logits: np.ndarray, k: int, logit_tol: float) -> np.ndarray:
    """The k highest logits, best first, checked far enough apart (and from the next one) that
    rounding cannot swap them on another CPU: then the ranking is a fair thing to compare."""
    order = np.argsort(-logits, kind="stable")
    gaps = -np.diff(logits[order[: k + 1]])
    assert gaps.min() > 2 * logit_tol, f"near-tie in the top {k}: gap {gaps.min():.3g}"
    return order[:k]


def hf_last_logits(hf, texts: list[str], padding: str) -> tuple[np.ndarray, np.ndarray]:
    """HF logits at the last real position of each row: ([batch, vocab], positions)."""
    rows = [tokens.encode(t) for t in texts]
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), 50256, np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        cols = slice(0, len(r)) if padding == "right" else slice(length - len(r), length)
        ids[b, cols], mask[b, cols] = r, 1
    position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(position_ids)).logits.numpy()
    last = length - 1 - np.argmax(mask[:, ::-1], axis=1)
    return logits[np.arange(len(rows)), last].astype(np.float64), last


def softmax64(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# -- the pipeline against the reference -------------------------------------------------------


# Every temperature on NumPy with both paddings; torch (the same math) with left padding.
CASES = [(t, "numpy", pad) for t in (1.0, 0.5, 2.0) for pad in ("right", "left")]
CASES += [(t, "torch", "left") for t in (1.0, 0.5, 2.0)]


@pytest.mark.slow
@pytest.mark.parametrize(("temperature", "engine", "padding"), CASES)
def test_top_k_matches_hf(model, loaded, temperature: float, engine: str, padding: str) -> None:
    config, weights = loaded
    k = 10
    t, _ = run(TEXTS, config, select_engine(engine, "cpu", "float32", 8), weights,
               Selection((0,), (0,)), padding=padding, predict_top_k=k, temperature=temperature)
    ref_logits, last = hf_last_logits(model[0], TEXTS, padding)
    ref_probs = softmax64(ref_logits, temperature)
    logit_tol = logit_tolerance(config, weights, TEXTS, padding)
    # A logit off by δ moves its probability by a factor e^(δ/T): compare relatively.
    spread = float(np.ptp(ref_logits))
    rtol = prob_rtol(logit_tol, temperature, VOCAB, "float32", spread)
    assert t.temperature == temperature
    assert [(p.batch, p.position) for p in t.predictions] == list(enumerate(last.tolist()))
    for p in t.predictions:
        want = assert_ranked(ref_logits[p.batch], k, logit_tol)
        assert [e["id"] for e in p.top] == want.tolist()
        np.testing.assert_allclose([e["prob"] for e in p.top], ref_probs[p.batch][want],
                                   rtol=rtol, atol=0)
        assert_close("logits", [e["logit"] for e in p.top], ref_logits[p.batch][want], logit_tol)
        assert [e["text"] for e in p.top] == [tokens.token(int(i)).text for i in want]
    # The whole distribution, not only its head; its sum taken in float64, so that only the
    # softmax's own float32 sum of 50,257 terms is measured.
    np.testing.assert_allclose(t.tensors["probs"], ref_probs, rtol=rtol, atol=0)
    np.testing.assert_allclose(t.tensors["probs"].sum(axis=-1, dtype=np.float64), 1.0, rtol=0,
                               atol=softmax_rtol(VOCAB, "float32", spread / temperature))


def test_temperature_sharpens_and_flattens(loaded) -> None:
    """T < 1 sharpens the distribution, T > 1 flattens it; the ranking never changes."""
    config, weights = loaded
    engine = select_engine("numpy", "cpu", "float32", 8)
    tops = {}
    for temperature in (0.5, 1.0, 2.0):
        t, _ = run(TEXTS[:1], config, engine, weights, Selection((0,), (0,)),
                   predict_top_k=5, temperature=temperature)
        tops[temperature] = t.predictions[0].top
    assert len({tuple(e["id"] for e in top) for top in tops.values()}) == 1
    first = [tops[temperature][0]["prob"] for temperature in (0.5, 1.0, 2.0)]
    assert first[0] > first[1] > first[2]
    assert [e["logit"] for e in tops[0.5]] == [e["logit"] for e in tops[2.0]]


def test_top_k_whole_vocabulary(model, loaded) -> None:
    config, weights = loaded
    t, _ = run(TEXTS[:1], config, select_engine("numpy", "cpu", "float32", 8), weights,
               Selection((0,), (0,)), predict_top_k=VOCAB)
    ref_logits, _ = hf_last_logits(model[0], TEXTS[:1], "right")
    top = t.predictions[0].top
    assert len(top) == VOCAB
    want = assert_ranked(ref_logits[0], 50, logit_tolerance(config, weights, TEXTS[:1]))
    assert [e["id"] for e in top[:50]] == want.tolist()
    assert sorted(e["id"] for e in top) == list(range(VOCAB))
    assert math.isclose(math.fsum(e["prob"] for e in top), 1.0, rel_tol=0,
                        abs_tol=softmax_rtol(VOCAB, "float32", float(np.ptp(ref_logits))))


# -- the command line ----------------------------------------------------------------------


def test_cli_json_predictions(model, loaded) -> None:
    hf, directory = model
    result = runner.invoke(app, ["trace", "--weights", str(directory), "--predict", "--top-k",
                                 "5", "--padding", "left", *TEXTS[:2], "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    schema = json.loads(files("attn_tracer.data").joinpath("trace.schema.json").read_text())
    jsonschema.validate(doc, schema)
    ref_logits, last = hf_last_logits(hf, TEXTS[:2], "left")
    ref_probs = softmax64(ref_logits, 1.0)
    logit_tol = logit_tolerance(*loaded, TEXTS[:2], "left")
    assert [p["batch"] for p in doc["predictions"]] == [0, 1]
    assert [p["position"] for p in doc["predictions"]] == last.tolist()
    for p in doc["predictions"]:
        assert {"batch", "position", "top"} <= set(p)
        assert all(set(e) == {"id", "text", "prob", "logit"} for e in p["top"])
        want = assert_ranked(ref_logits[p["batch"]], 5, logit_tol)
        assert [e["id"] for e in p["top"]] == want.tolist()
        np.testing.assert_allclose([e["prob"] for e in p["top"]], ref_probs[p["batch"]][want],
                                   rtol=prob_rtol(logit_tol, 1.0, VOCAB, "float32",
                                                  float(np.ptp(ref_logits))))
        assert all(isinstance(e["text"], str) and e["text"] for e in p["top"])


def test_cli_view_shows_table(model, loaded) -> None:
    hf, directory = model
    result = runner.invoke(app, ["trace", "--weights", str(directory), "--predict", "--top-k",
                                 "5", "-T", "0.5", TEXTS[0]])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "next token after" in out and "T = 0.5" in out
    assert "untrained" not in out
    ref_logits, _ = hf_last_logits(hf, TEXTS[:1], "right")
    ref_probs = softmax64(ref_logits, 0.5)[0]
    rtol = prob_rtol(logit_tolerance(*loaded, TEXTS[:1]), 0.5, VOCAB, "float32",
                     float(np.ptp(ref_logits)))
    for i in np.argsort(-ref_logits[0])[:5]:
        assert str(i) in out
        # Printed to 4 decimals: a probability within rounding of a boundary may show either.
        assert any(f"{ref_probs[i] * (1 + e):.4f}" in out for e in (-rtol, 0, rtol))


def test_cli_d_head_keeps_the_checkpoints(model) -> None:
    """--d-head may restate a checkpoint's head width (64 / 4 = 16), never change it."""
    ok = runner.invoke(app, ["trace", "--weights", str(model[1]), "--d-head", "16", "--json",
                             "--layer", "0", "--head", "0", "Hello"])
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["config"]["d_head"] == 16
    bad = runner.invoke(app, ["trace", "--weights", str(model[1]), "--d-head", "8", "Hello"])
    assert bad.exit_code == 2 and bad.stdout == ""
    assert "--d-head 8 conflicts with the checkpoint's 16-dimensional heads" in bad.stderr


@pytest.mark.parametrize("arch", ["attn", "gpt2"])
def test_cli_random_weights_say_untrained(arch: str) -> None:
    result = runner.invoke(app, ["trace", "--predict", "--top-k", "3", "--d-model", "16",
                                 "--heads", "2", "--arch", arch, "Hello world"])
    assert result.exit_code == 0, result.stderr
    assert "next token after" in result.stdout
    assert "untrained" in " ".join(result.stdout.split())


@pytest.mark.parametrize(("args", "needle"), [
    (["--temperature", "0"], "--temperature must be a positive number"),
    (["--temperature", "-1"], "--temperature must be a positive number"),
    (["-T", "-0.5"], "--temperature must be a positive number"),
    (["--temperature", "nan"], "--temperature must be a positive number"),
    (["--temperature", "inf"], "--temperature must be a positive number"),
    (["--top-k", "0"], "--top-k must be between 1 and the vocabulary size 50257"),
    (["--top-k", "-3"], "--top-k must be between 1 and the vocabulary size 50257"),
    (["--top-k", "50258"], "--top-k must be between 1 and the vocabulary size 50257"),
])
def test_cli_bad_prediction_options(model, args: list[str], needle: str) -> None:
    result = runner.invoke(app, ["trace", "--weights", str(model[1]), "--predict", *args,
                                 "Hello"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn: error: ") and needle in lines[0]



def test_padded_vocabulary(tmp_path_factory: pytest.TempPathFactory) -> None:
    """nanoGPT-style checkpoints pad wte past the tokenizer (50304): logits cover every row,
    as HF's do; ids without a token get a placeholder label."""
    torch.manual_seed(4)
    config = transformers.GPT2Config(n_embd=32, n_head=2, n_layer=1, n_positions=16,
                                     vocab_size=50304, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("padded") / "m"
    hf.save_pretrained(directory)
    cfg, weights = build_config(Request(weights=str(directory)))
    t, _ = run(TEXTS[:1], cfg, select_engine("numpy", "cpu", "float32", 8), weights,
               Selection((0,), (0,)), predict_top_k=VOCAB)
    ref_logits, _ = hf_last_logits(hf, TEXTS[:1], "right")
    assert t.tensors["logits"].shape == (1, 50304)
    logit_tol = logit_tolerance(cfg, weights, TEXTS[:1])
    assert_close("logits", t.tensors["logits"], ref_logits, logit_tol)
    top = t.predictions[0].top
    assert [e["id"] for e in top[:20]] == assert_ranked(ref_logits[0], 20, logit_tol).tolist()
    unused = [e for e in top if e["id"] >= VOCAB]
    assert unused and all(e["text"] == f"<unused {e['id']}>" for e in unused)
