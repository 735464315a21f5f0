"""`attn generate`: the cached decode against a full forward, the sampler against its formula,
the outputs against their schemas, and the bad invocations.

The reference of the cache is `pipeline.run` itself (the trace's forward, tested against
Hugging Face's GPT-2 in test_gpt2.py) over the prompt and the generated tokens so far: at every
step its logits at the last position and every head's last attention row must equal the
cached step's within tests/tolerance.py's bounds. The greedy ids against `transformers`'
`generate` are in test_generate_hf.py (slow).
"""

from __future__ import annotations

import io
import json
import math
from importlib.resources import files

import numpy as np
import pytest
from typer.testing import CliRunner

from attn_tracer.cli import app
from attn_tracer.commands.session import SharedOptions, ensure_weights, load_model
from attn_tracer.model import generate as gen
from attn_tracer.model import sampling, tokens
from attn_tracer.model.engine import Engine
from attn_tracer.model.pipeline import Prepared, make_batch, run
from attn_tracer.model.trace import Selection
from conftest import check_one_line_error
from tolerance import assert_close, step_tolerances

runner = CliRunner()
PROMPT = "The cat sat on the mat"
SMALL = ["--d-model", "32", "--heads", "4", "--layers", "2"]
CONFIGS = {  # name → Request fields
    "attn": {"d_model": 32, "heads": 4, "layers": 2},
    "gpt2": {"d_model": 32, "heads": 4, "layers": 2, "arch": "gpt2"},
    "d_head": {"d_model": 24, "heads": 3, "layers": 2, "d_head": 5, "arch": "gpt2"},
    # Rotary positions, grouped-query K/V (the cache is kv_heads wide), a sliding window.
    "llama": {"d_model": 32, "heads": 4, "layers": 2, "arch": "llama", "kv_heads": 2},
    "window": {"d_model": 32, "heads": 4, "layers": 2, "arch": "llama", "kv_heads": 2,
               "window": 4},
}


def model(name: str):
    config, weights = load_model(SharedOptions.of(CONFIGS[name]).model, lambda m: None)
    return config, ensure_weights(config, weights)


def engines():
    out = ["numpy"]
    try:
        import torch  # noqa: F401

        out.append("torch")
    except ImportError:
        pass
    return out


def full_forward(ids: list[int], config, weights, engine):
    """pipeline.run over `ids` with every head's stages kept: the uncached reference."""
    toks = [tokens.token(t) for t in ids]
    prepared = Prepared(make_batch([toks], ["-"], "right"), None)
    selection = Selection(tuple(range(config.layers)), tuple(range(config.heads)), "stages")
    trace, _ = run(["-"], config, engine, weights, selection, prepared=prepared,
                   predict_top_k=1)
    return trace


@pytest.mark.parametrize("engine_name", engines())
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_equals_a_full_forward_at_every_step(name, engine_name):
    config, weights = model(name)
    engine = Engine(engine_name, "cpu", "float32")
    prompt = tokens.encode(PROMPT)
    every = (tuple(range(config.layers)), tuple(range(config.heads)))
    plan = gen.Plan(prompt, 12, shown=every, keep_logits=True)
    steps = list(gen.generate(plan, config, engine, weights))
    assert [s.index for s in steps] == list(range(1, len(steps) + 1))
    ids = list(prompt)
    for s in steps:
        reference = full_forward(ids, config, weights, engine)
        tol = step_tolerances(reference)
        # The cache changes the order of nothing but which K, V rows exist already: the same
        # formula on the same numbers, so within rounding of each other (pair tolerances).
        assert_close(f"logits of token {s.index}", s.logits,
                     reference.tensors["logits"][0], tol["logits"])
        for layer in range(config.layers):
            name_ = f"blocks.{layer}.attn.pattern"
            want = reference.tensors[name_][0, :, -1, :]  # every head's last row
            for h in range(config.heads):
                assert_close(f"{name_} head {h} token {s.index}", s.rows[layer, h], want[h],
                             tol[name_])
        assert s.cached == (0 if s.index == 1 else len(ids) - 1)
        assert s.position == len(ids)
        ids.append(s.token)


def test_the_cache_holds_the_k_and_v_a_full_forward_computes():
    config, weights = model("gpt2")
    engine = Engine("numpy", "cpu", "float32")
    prompt = tokens.encode(PROMPT)
    cache = gen.KVCache(config, len(prompt) + 6)
    steps = list(gen.generate(gen.Plan(prompt, 6), config, engine, weights, cache))
    fed = [*prompt, *(s.token for s in steps[:-1])]  # the last token is never fed back
    assert cache.length == len(fed)
    selection = Selection(tuple(range(config.layers)), tuple(range(config.heads)), "all")
    toks = [tokens.token(t) for t in fed]
    trace, _ = run(["-"], config, engine, weights, selection,
                   prepared=Prepared(make_batch([toks], ["-"], "right"), None))
    tol = step_tolerances(trace)
    saved = cache.tensors(engine)
    for layer in range(config.layers):
        for kind in "kv":
            got = saved[f"blocks.{layer}.attn.{kind}_cache"]
            assert got.shape == (1, gen.kv_heads(config), len(fed), config.d_head)
            name = f"blocks.{layer}.attn.{kind}.heads"
            assert_close(name, got, trace.tensors[name], tol[name])


def test_each_step_records_one_query_against_the_whole_cache():
    config, weights = model("attn")
    engine = Engine("numpy", "cpu", "float32")
    prompt = tokens.encode(PROMPT)
    steps = list(gen.generate(gen.Plan(prompt, 3), config, engine, weights))
    n, h, d = len(prompt), config.heads, config.d_head
    shapes = [{s.name: s.shape for s in step.steps} for step in steps]
    assert shapes[0]["blocks.0.attn.q.heads"] == (1, h, n, d)
    assert shapes[0]["blocks.0.attn.scores"] == (1, h, n, n)
    for i, sh in enumerate(shapes[1:], start=1):
        past = n + i - 1
        assert sh["blocks.1.attn.q.heads"] == (1, h, 1, d)
        assert sh["blocks.1.attn.k_cache"] == (1, h, past + 1, d)
        assert sh["blocks.1.attn.v_cache"] == (1, h, past + 1, d)
        assert sh["blocks.1.attn.scores"] == (1, h, 1, past + 1)
        assert sh["tokens"] == (1, 1)


def test_the_cost_with_the_cache_grows_linearly_and_without_it_quadratically():
    config, weights = model("gpt2")
    engine = Engine("numpy", "cpu", "float32")
    prompt = tokens.encode(PROMPT)
    steps = list(gen.generate(gen.Plan(prompt, 5), config, engine, weights))
    prefill = steps[0].steps
    # Recomputing the prompt is the prefill itself (less the cache, which it also made).
    first_cached, first_full = gen.step_costs(prefill, steps[0], config, "float32")
    assert first_full.multiply_adds == first_cached.multiply_adds
    for s in steps[1:]:
        cached, full = gen.step_costs(prefill, s, config, "float32")
        t = s.position  # keys of the step's scores row
        one_row = 2 * config.layers * config.heads * t * config.d_head  # Q·Kᵀ and pattern·V
        assert cached.attention == one_row
        assert full.attention == one_row * t  # every row of the len × len scores
        assert full.multiply_adds > cached.multiply_adds


# ── sampling ─────────────────────────────────────────────────────────────────────────────────

def chi_square_threshold(df: int, alpha: float) -> float:
    """x with P(χ²_df > x) = alpha, by bisection on the survival function, computed from the
    regularized upper incomplete gamma Q(df/2, x/2) by its series (no scipy)."""
    def survival(x: float) -> float:
        a, z = df / 2, x / 2
        term = total = 1 / a
        n = 0
        while term > 1e-16 * total:
            n += 1
            term *= z / (a + n)
            total += term
        return 1 - math.exp(a * math.log(z) - z - math.lgamma(a)) * total

    lo, hi = 0.0, df + 40 * math.sqrt(2 * df) + 100
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if survival(mid) > alpha else (lo, mid)
    return hi


def test_chi_square_threshold_matches_known_quantiles():
    # Tabulated χ² quantiles (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.4).
    assert chi_square_threshold(1, 0.05) == pytest.approx(3.841, abs=1e-3)
    assert chi_square_threshold(10, 0.01) == pytest.approx(23.209, abs=1e-3)
    assert chi_square_threshold(20, 0.001) == pytest.approx(45.315, abs=1e-3)


@pytest.mark.parametrize("top_k, top_p", [(None, None), (12, None), (None, 0.8), (30, 0.9)])
def test_ten_thousand_draws_follow_the_filtered_softmax(top_k, top_p):
    """The counts of 10,000 seeded draws of one step against 10,000·softmax(logits / T) after
    the filters: Pearson's χ² below its 1 − 10⁻⁶ quantile. The seed is fixed, so the test is
    deterministic; the threshold says a correct sampler fails it for one seed in a million."""
    logits = np.random.default_rng(7).normal(0, 2.5, 400)
    s = sampling.Sampling(temperature=1.3, top_k=top_k, top_p=top_p, seed=11)
    p = sampling.distribution(logits, s)
    # The formula, written again here: softmax(z / T), the k largest, the nucleus.
    z = logits / 1.3
    want = np.exp(z - z.max())
    if top_k is not None:
        want[np.argsort(-want)[top_k:]] = 0
    want /= want.sum()
    if top_p is not None:
        order = np.argsort(-want)
        before = np.cumsum(want[order]) - want[order]  # mass of the more likely tokens
        want[order[before >= top_p]] = 0
        want /= want.sum()
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-15)
    rng = s.rng()
    draws = np.array([sampling.draw(p, rng) for _ in range(10_000)])
    counts = np.bincount(draws, minlength=p.size)
    assert counts[p == 0].sum() == 0  # a filtered token is never drawn
    expected = 10_000 * p
    # Pearson's χ² needs expected counts of at least 5: the rarest kept tokens share one bin.
    order = np.argsort(expected)
    kept = order[expected[order] > 0]
    big = kept[expected[kept] >= 5]
    small = kept[expected[kept] < 5]
    observed = [*counts[big], counts[small].sum()] if small.size else list(counts[big])
    exp = [*expected[big], expected[small].sum()] if small.size else list(expected[big])
    observed, exp = np.array(observed, float), np.array(exp)
    if exp[-1] < 5 and exp.size > 1:  # fold a still-small rest bin into the next
        observed[-2] += observed[-1]
        exp[-2] += exp[-1]
        observed, exp = observed[:-1], exp[:-1]
    stat = float(((observed - exp) ** 2 / exp).sum())
    assert stat < chi_square_threshold(exp.size - 1, 1e-6), (stat, exp.size)


def test_the_filters_keep_what_transformers_keeps():
    torch = pytest.importorskip("torch")
    warpers = pytest.importorskip("transformers.generation.logits_process")
    logits = np.random.default_rng(3).normal(0, 3, 1000)
    for t, k, p in [(0.7, 50, None), (1.0, None, 0.9), (1.5, 20, 0.5), (0.5, None, 0.3)]:
        s = sampling.Sampling(temperature=t, top_k=k, top_p=p)
        scores = torch.tensor(logits[None], dtype=torch.float64)
        scores = warpers.TemperatureLogitsWarper(t)(None, scores)
        if k is not None:
            scores = warpers.TopKLogitsWarper(k)(None, scores)
        if p is not None:
            scores = warpers.TopPLogitsWarper(p)(None, scores)
        want = torch.softmax(scores, -1)[0].numpy()
        got = sampling.distribution(logits, s)
        assert np.array_equal(got > 0, want > 0), (t, k, p)
        # Both compute exp and a sum of ≤ 1,000 float64 terms: softmax's rounding bound.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_a_seed_gives_the_same_tokens_on_every_run():
    config, weights = model("gpt2")
    engine = Engine("numpy", "cpu", "float32")
    prompt = tokens.encode(PROMPT)

    def tokens_of(seed):
        plan = gen.Plan(prompt, 16, sampling.Sampling(1.0, 40, 0.95, seed))
        return [s.token for s in gen.generate(plan, config, engine, weights)]

    assert tokens_of(5) == tokens_of(5)
    assert tokens_of(5) != tokens_of(6)


def test_sampling_uses_no_global_random_state():
    state = np.random.get_state()[1].copy()
    config, weights = model("attn")
    plan = gen.Plan(tokens.encode(PROMPT), 4, sampling.Sampling(1.0, seed=1))
    list(gen.generate(plan, config, Engine("numpy", "cpu", "float32"), weights))
    assert np.array_equal(np.random.get_state()[1], state)


def test_greedy_takes_the_argmax_and_reports_softmax_probabilities():
    logits = np.array([1.0, 3.0, 2.0, 3.0])
    token, p = sampling.choose(logits, sampling.Sampling(), None)
    assert token == 1  # the first of equal maxima, as torch.argmax
    np.testing.assert_allclose(p, np.exp(logits) / np.exp(logits).sum())


# ── the command line ─────────────────────────────────────────────────────────────────────────

def schema(which: str) -> dict:
    return json.loads(files("attn_tracer.data").joinpath(f"{which}.schema.json").read_text())


def invoke(*args, env=None):
    return runner.invoke(app, ["generate", *args], env={"COLUMNS": "100", **(env or {})})


def test_json_document_follows_its_schema():
    jsonschema = pytest.importorskip("jsonschema")
    result = invoke(PROMPT, *SMALL, "-n", "5", "--head", "1", "--layer", "0,1", "--cost",
                    "--alternatives", "3", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema("generate"))
    jsonschema.validate(doc, schema("generate"))
    assert doc["schema"] == "attn-generate/1"
    assert len(doc["steps"]) == 5 and doc["stopped"] == "max"
    assert doc["heads"] == ["L0H1", "L1H1"]
    for i, step in enumerate(doc["steps"]):
        assert len(step["alternatives"]) == 3
        for row in step["attention"]:
            assert len(row["weights"]) == step["position"]
            assert math.isclose(sum(row["weights"]), 1, abs_tol=1e-5)
        assert step["shapes"]["scores"][-1] == step["position"]
        if i:
            assert step["shapes"]["q"][2] == 1
        assert step["cost"]["uncached"]["attention_multiply_adds"] >= \
            step["cost"]["cached"]["attention_multiply_adds"]
    assert doc["text"] == tokens.encoding().decode([t["id"] for t in doc["generated"]])


def test_json_lines_are_one_line_per_token_each_valid():
    jsonschema = pytest.importorskip("jsonschema")
    result = invoke(PROMPT, *SMALL, "-n", "4", "-T", "0.9", "--top-k", "20", "--seed", "3",
                    "--head", "0", "--json-lines", "--precision", "4")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    jsonschema.Draft202012Validator.check_schema(schema("generate-lines"))
    for line in lines:
        jsonschema.validate(line, schema("generate-lines"))
    assert [line["record"] for line in lines] == ["header", "step", "step", "step", "step",
                                                  "end"]
    assert lines[0]["schema"] == "attn-generate-lines/1"
    assert lines[0]["sampling"] == {"greedy": False, "temperature": 0.9, "top_k": 20,
                                    "top_p": None, "seed": 3}
    # Sampled from the JSON document's run with the same seed: the same tokens.
    again = json.loads(invoke(PROMPT, *SMALL, "-n", "4", "-T", "0.9", "--top-k", "20",
                              "--seed", "3", "--json").stdout)
    assert [s["token"] for s in lines[1:-1]] == [s["token"] for s in again["steps"]]


def test_quiet_writes_the_text_alone():
    doc = json.loads(invoke(PROMPT, *SMALL, "-n", "6", "--json").stdout)
    result = invoke(PROMPT, *SMALL, "-n", "6", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == doc["text"] + "\n"
    assert result.stderr == ""


def test_stop_text_ends_the_generation_after_the_token_that_completes_it():
    doc = json.loads(invoke(PROMPT, *SMALL, "-n", "8", "--json").stdout)
    third = doc["generated"][2]
    stop = bytes.fromhex(third["bytes"]).decode("utf-8", "replace")[-1:]
    written = b""
    expect = None
    for i, t in enumerate(doc["generated"]):
        written += bytes.fromhex(t["bytes"])
        if stop.encode() in written:
            expect = i + 1
            break
    stopped = json.loads(invoke(PROMPT, *SMALL, "-n", "8", "--stop", stop, "--json").stdout)
    assert len(stopped["steps"]) == expect and stopped["stopped"] == "stop"


def test_plain_view_draws_the_growing_rows():
    result = invoke(PROMPT, *SMALL, "-n", "4", "--head", "2", "--cost", "--alternatives", "2",
                    env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "prefill: the prompt's 6 tokens" in out
    assert "blocks.0" in out and "attn.k_cache" in out  # the prefill's shape trace
    rows = [line for line in out.splitlines() if line.strip().startswith("L0H2 ")]
    assert len(rows) == 4
    widths = [len(line.split()[1]) for line in rows]  # one shade a key
    assert widths == [6, 7, 8, 9]
    assert "6 cached: q [1, 4, 1, 8] · cache [1, 4, 7, 8] · scores [1, 4, 1, 7]" in out
    assert "stopped: --max-new-tokens reached after 4 tokens" in out
    assert out.count("cost, with the cache") == 4 and out.count("from: ") == 4


def test_live_view_redraws_a_triangle_in_a_terminal():
    from rich.console import Console
    from rich.text import Text

    from attn_tracer.commands import generate as command
    from attn_tracer.commands.session import SharedOptions

    request = command.GenerateRequest(base=SharedOptions.of({**CONFIGS["attn"],
                                                             "texts": [PROMPT]}),
                                      max_new_tokens=3, head=["0"])
    buffer = io.StringIO()
    target = Console(file=buffer, width=100, force_terminal=True, color_system="truecolor")
    command.execute(request, notice=lambda m: None, console=lambda: target)
    raw = buffer.getvalue()
    assert "\x1b[48;2;" in raw or ";48;2;" in raw  # the cells are coloured backgrounds
    out = Text.from_ansi(raw).plain
    assert "L0H0: each generated token's attention row" in out
    assert "text so far: The cat sat on the mat" in out
    assert out.count("   1  ") == 1  # the per-token lines scroll above it, each once


def test_save_keeps_the_cache_and_the_rows(tmp_path):
    path = tmp_path / "gen.npz"
    result = invoke(PROMPT, *SMALL, "-n", "5", "--head", "0,3", "--save", str(path), "--quiet")
    assert result.exit_code == 0, result.stderr
    with np.load(path) as f:
        assert f["blocks.1.attn.k_cache"].shape == (1, 4, 10, 8)  # 6 + 5 − 1 tokens fed
        assert f["tokens"].shape == (11,)
        rows = f["rows.L0H3"]
        assert rows.shape == (5, 10)
        np.testing.assert_allclose(rows.sum(axis=1), 1, atol=1e-5)
        assert (rows[0, 6:] == 0).all()
        json.loads(str(f["config"]))


def test_temperature_zero_means_greedy_and_says_so():
    greedy = invoke(PROMPT, *SMALL, "-n", "4", "--json")
    zero = invoke(PROMPT, *SMALL, "-n", "4", "-T", "0", "--json")
    assert zero.exit_code == 0
    assert json.loads(zero.stdout)["generated"] == json.loads(greedy.stdout)["generated"]
    assert "--temperature 0 means greedy decoding" in zero.stderr


@pytest.mark.parametrize("args, needle", [
    (["-n", "1020"], "at most 1018 new tokens"),
    (["-n", "60", "--n-ctx", "64"], "more than --n-ctx 64; at most 58 new tokens"),
    (["-n", "0"], "--max-new-tokens must be at least 1"),
    (["-T", "-1"], "--temperature must be 0 (greedy) or a positive number"),
    (["-T", "nan"], "--temperature must be 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "0"], "--top-k must be between 1"),
    (["--alternatives", "99"], "--alternatives must be between 0 and 20"),
    (["--json", "--json-lines"], "choose one"),
    (["--quiet", "--json"], "--quiet writes the bare text"),
    (["--mask", "none"], "needs --mask causal"),
    (["--pad-to", "10"], "--pad-to pads a text"),
    (["--stop", ""], "--stop is empty"),
    (["--head", "9"], "--head 9 is out of range"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    check_one_line_error(invoke(PROMPT, *SMALL, *args), 2, needle)


def test_two_texts_are_refused():
    check_one_line_error(invoke("a b", "c d", *SMALL), 2, "continues one text")


def test_the_default_path_does_not_import_torch():
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            "sys.argv = ['attn', 'generate', 'The cat sat', '--d-model', '16', '--heads', '2',"
            " '-n', '3', '--head', '0', '--cost']\n"
            "try:\n    runpy.run_module('attn_tracer', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch' in sys.modules, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "False"
    assert "stopped:" in done.stdout

