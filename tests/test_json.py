"""The --json contract: every output validates against the shipped schema (checked by the
`jsonschema` package), and its numbers are the engine's, read back from `pipeline.run` directly.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from importlib.resources import files

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from attn_tracer.cli import app
from attn_tracer.model import tokens
from attn_tracer.model.config import Config
from attn_tracer.model.engine import Engine
from attn_tracer.model.pipeline import run as pipeline_run
from attn_tracer.model.trace import Selection
from attn_tracer.model.weights import random_weights
from attn_tracer.render import json_doc as render_json
from tolerance import assert_close, softmax_rtol, step_tolerances

jsonschema = pytest.importorskip("jsonschema")

runner = CliRunner()
SMALL = ["--d-model", "64", "--heads", "4", "--engine", "numpy"]
ENGLISH = "The cat sat on the mat because it was tired."
CHINESE = "今天天气很好，我们去公园散步吧。"


def schema(which: str = "trace") -> dict:
    return json.loads(files("attn_tracer.data").joinpath(f"{which}.schema.json").read_text("utf-8"))


TRACE_VALIDATOR = jsonschema.Draft202012Validator(schema("trace"))
LINES_VALIDATOR = jsonschema.Draft202012Validator(schema("trace-lines"))
TOKENS_VALIDATOR = jsonschema.Draft202012Validator(schema("tokens"))


def trace_json(*args: str) -> dict:
    """Run `attn trace ARGS --json`; it must succeed, print one JSON document, and validate."""
    result = runner.invoke(app, ["trace", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # exactly one document: trailing data would raise
    errors = sorted(TRACE_VALIDATOR.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout
    return doc


def engine_trace(texts, *, d_model=64, heads=4, layers=(0, 1), head_sel=None, capture="patterns",
                 cross=None, padding="right", predict=None, temperature=1.0, engine="numpy",
                 dtype="float32"):
    """The same run as the command line's, straight through pipeline.run."""
    config = Config(d_model=d_model, heads=heads)
    weights = random_weights(config, cross=bool(cross))
    head_sel = tuple(range(heads)) if head_sel is None else head_sel
    trace, _ = pipeline_run(texts, config, Engine(engine, "cpu", dtype), weights,
                            Selection(tuple(layers), tuple(head_sel), capture),
                            cross_texts=cross, padding=padding, predict_top_k=predict,
                            temperature=temperature)
    return trace


def entries(doc: dict, block: str = "attn") -> dict[tuple[int, int, int], dict]:
    return {(e["layer"], e["batch"], e["head"]): e for e in doc["attention"] if e["block"] == block}


def assert_patterns_equal(doc: dict, trace, block: str = "attn") -> None:
    """Bit for bit: default precision is float32's shortest round-trip form."""
    got = entries(doc, block)
    want = {}
    for layer, pattern in trace.patterns(block):
        for b in range(pattern.shape[0]):
            for i, h in enumerate(trace.selection.heads):
                want[layer, b, h] = pattern[b, i]
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        got_w = np.array(got[key]["weights"], np.float32)
        np.testing.assert_array_equal(got_w, w, err_msg=str(key))


def steps_of(trace) -> list[dict]:
    return [{"name": s.name, "op": s.op, "shape": list(s.shape), "dims": list(s.dims)}
            for s in trace.steps]


# ── the schemas ────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("which", ["trace", "trace-lines", "tokens"])
def test_schema_is_valid_2020_12_and_printed_by_attn_schema(which):
    s = schema(which)
    jsonschema.Draft202012Validator.check_schema(s)
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s["$id"] and s["title"] and s["description"]
    args = ["schema"] if which == "trace" else ["schema", which]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == s


def test_every_schema_property_is_described():
    def walk(node, path):
        if isinstance(node, dict):
            for name, sub in node.get("properties", {}).items():
                assert "description" in sub, f"{path}.{name} has no description"
            for key, sub in node.items():
                walk(sub, f"{path}.{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{path}[{i}]")

    walk(schema("trace"), "trace")
    walk(schema("trace-lines"), "trace-lines")
    walk(schema("tokens"), "tokens")


def test_unknown_schema_name_is_a_usage_error():
    result = runner.invoke(app, ["schema", "nope"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("attn: error: ") and result.stderr.count("\n") == 1


def test_schema_rejects_what_the_contract_forbids():
    good = trace_json(ENGLISH, *SMALL, "--layer", "0", "--head", "0")
    assert TRACE_VALIDATOR.is_valid(good)
    bad_schema = {**good, "schema": "attn-trace/2"}
    negative = json.loads(json.dumps(good))
    negative["attention"][0]["weights"][0][0] = -0.5
    masked_null = json.loads(json.dumps(good))
    masked_null["attention"][0]["weights"][0][1] = None
    bad_dim = json.loads(json.dumps(good))
    bad_dim["steps"][0]["dims"] = ["batch", "sequence"]
    upper_hex = json.loads(json.dumps(good))
    upper_hex["inputs"][0]["tokens"][0]["bytes"] = "5A"
    for doc in (bad_schema, negative, masked_null, bad_dim, upper_hex):
        assert not TRACE_VALIDATOR.is_valid(doc)
    # Adding a field never breaks a reader of attn-trace/1.
    extended = {**good, "future_field": [1, 2]}
    extended["attention"][0] = {**good["attention"][0], "future": True}
    assert TRACE_VALIDATOR.is_valid(extended)


# ── attn trace --json ─────────────────────────────────────────────────────────────────────────

def test_english_sentence_matches_the_engine():
    doc = trace_json(ENGLISH, *SMALL)
    trace = engine_trace([ENGLISH])
    assert doc["schema"] == "attn-trace/1"
    assert doc["steps"] == steps_of(trace)
    assert_patterns_equal(doc, trace)
    assert [t["id"] for t in doc["inputs"][0]["tokens"]] == [t.id for t in trace.inputs[0].tokens]
    c = doc["config"]
    assert (c["d_model"], c["heads"], c["d_head"], c["layers"]) == (64, 4, 16, 2)
    assert (c["engine"], c["device"], c["dtype"]) == ("numpy", "cpu", "float32")
    # Default for --json: every layer and every head.
    assert sorted({(e["layer"], e["head"]) for e in doc["attention"]}) == [
        (layer, h) for layer in (0, 1) for h in range(4)]
    for e in doc["attention"]:
        w = np.array(e["weights"])
        n = len(doc["inputs"][0]["tokens"])
        assert w.shape == (n, n)
        np.testing.assert_allclose(w.sum(axis=1), 1, rtol=1e-5)
        assert (w[np.triu_indices(n, 1)] == 0).all()  # causal: exactly 0


def test_chinese_sentence_tokens_and_bytes():
    doc = trace_json(CHINESE, *SMALL, "--layer", "0")
    toks = doc["inputs"][0]["tokens"]
    # The bytes, concatenated, are the text's UTF-8 even where a token splits a character.
    assert b"".join(bytes.fromhex(t["bytes"]) for t in toks) == CHINESE.encode("utf-8")
    # Some tokens hold part of a character: their labels show the bytes, never a broken char.
    partial = [t for t in toks if len(bytes.fromhex(t["bytes"])) < 3 and t["text"].startswith("<")]
    assert partial and "\ufffd" not in "".join(t["text"] for t in toks)
    assert doc["inputs"][0]["text"] == CHINESE
    assert doc["inputs"][0]["length"] == len(toks)
    trace = engine_trace([CHINESE], layers=(0,))
    assert_patterns_equal(doc, trace)
    assert doc["steps"] == steps_of(trace)


def test_stages_add_scores_with_null_for_minus_infinity():
    doc = trace_json(ENGLISH, *SMALL, "--stages", "--layer", "0")
    trace = engine_trace([ENGLISH], layers=(0,), capture="stages")
    assert_patterns_equal(doc, trace)
    for (layer, b, h), e in entries(doc).items():
        for stage in ("scores", "scaled", "masked"):
            engine = trace.tensors[f"blocks.{layer}.attn.{stage}"][b, h]
            got = np.array([[np.nan if v is None else v for v in row] for row in e[stage]],
                           np.float32)
            finite = np.isfinite(engine)
            # null exactly where the engine has −∞, the engine's numbers everywhere else.
            assert (np.isnan(got) == ~finite).all()
            assert (engine[~finite] == -np.inf).all()
            np.testing.assert_array_equal(got[finite], engine[finite])
        n = len(e["scores"])
        assert all(v is not None for row in e["scores"] for v in row)
        assert all(e["masked"][i][j] is None for i in range(n) for j in range(i + 1, n))
        w = np.array(e["weights"])
        assert (w[np.triu_indices(n, 1)] == 0).all()


def test_head_and_layer_selection():
    doc = trace_json(ENGLISH, *SMALL, "--layer", "1", "--head", "0,3")
    assert sorted({(e["layer"], e["head"]) for e in doc["attention"]}) == [(1, 0), (1, 3)]
    trace = engine_trace([ENGLISH], layers=(1,), head_sel=(0, 3))
    assert_patterns_equal(doc, trace)
    # The selection changes which entries appear, never the shapes in the step list.
    assert doc["steps"] == steps_of(trace)
    full = engine_trace([ENGLISH])
    np.testing.assert_array_equal(np.array(entries(doc)[1, 0, 3]["weights"], np.float32),
                                  full.tensors["blocks.1.attn.pattern"][0, 3])


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_with_padding(side):
    texts = ["The cat sat on the mat.", "Hello"]
    doc = trace_json(*texts, *SMALL, "--layer", "0", "--padding", side)
    trace = engine_trace(texts, layers=(0,), padding=side)
    assert_patterns_equal(doc, trace)
    assert doc["steps"] == steps_of(trace)
    long, short = doc["inputs"]
    assert long["padding"] == 0 and short["padding"] == long["length"] - short["length"] > 0
    assert short["padding_side"] == side
    assert doc["config"]["mask_description"]["padding"] is True
    n = long["length"]
    valid = np.zeros(n, bool)
    valid[: short["length"]] = True
    if side == "left":
        valid = valid[::-1]
    for (_, b, _), e in entries(doc).items():
        w = np.array(e["weights"])
        assert w.shape == (n, n)
        if b == 1:
            assert (w[:, ~valid] == 0).all()  # pad keys: exactly 0
            assert (w[~valid] == 0).all()  # pad queries attend to nothing
            np.testing.assert_allclose(w[valid].sum(axis=1), 1, rtol=1e-5)


def test_cross_attention_entries():
    doc = trace_json(ENGLISH, *SMALL, "--layer", "0", "--cross", "Le chat est assis.")
    trace = engine_trace([ENGLISH], layers=(0,), cross=["Le chat est assis."])
    assert_patterns_equal(doc, trace, "attn")
    assert_patterns_equal(doc, trace, "cross_attn")
    assert doc["steps"] == steps_of(trace)
    assert doc["config"]["cross"] is True
    q_len = len(doc["inputs"][0]["tokens"])
    k_len = len(doc["cross_inputs"][0]["tokens"])
    assert q_len != k_len
    cross = [e for e in doc["attention"] if e["block"] == "cross_attn"]
    assert len(cross) == 4
    for e in cross:
        w = np.array(e["weights"])
        assert w.shape == (q_len, k_len)
        np.testing.assert_allclose(w.sum(axis=1), 1, rtol=1e-5)  # no causal mask across texts
        assert (w > 0).all()


def test_predict():
    doc = trace_json(ENGLISH, *SMALL, "--layer", "0", "--predict", "--top-k", "5",
                     "--temperature", "0.7")
    trace = engine_trace([ENGLISH], layers=(0,), predict=5, temperature=0.7, capture="all")
    (p,) = doc["predictions"]
    (want,) = trace.predictions
    assert p["batch"] == 0 and p["position"] == want.position == len(doc["inputs"][0]["tokens"]) - 1
    assert p["temperature"] == 0.7
    assert p["top"] == want.top
    # Reference: softmax(logits / T) from the captured logits, by hand in float64.
    logits = trace.tensors["logits"][0].astype(np.float64)
    order = np.argsort(-logits, kind="stable")[:5]
    z = logits / 0.7
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert [t["id"] for t in p["top"]] == order.tolist()
    # The same logits on both sides: only the float32 softmax's own rounding.
    np.testing.assert_allclose([t["prob"] for t in p["top"]], probs[order], atol=0,
                               rtol=softmax_rtol(len(logits), "float32", float(np.ptp(z))))
    np.testing.assert_allclose([t["logit"] for t in p["top"]], logits[order], rtol=1e-6)
    assert [t["text"] for t in p["top"]] == [tokens.token(int(i)).text for i in order]


def test_precision_rounds_to_n_decimals():
    doc = trace_json(ENGLISH, *SMALL, "--layer", "0", "--stages", "--precision", "3",
                     "--predict", "--top-k", "3")
    for t in doc["predictions"][0]["top"]:
        assert round(t["prob"], 3) == t["prob"] and round(t["logit"], 3) == t["logit"]
    trace = engine_trace([ENGLISH], layers=(0,), capture="stages")
    for (layer, b, h), e in entries(doc).items():
        for key, stage in (("weights", "pattern"), ("scores", "scores"), ("masked", "masked")):
            values = [v for row in e[key] for v in row if v is not None]
            assert all(round(v, 3) == v for v in values)
            engine = trace.tensors[f"blocks.{layer}.attn.{stage}"][b, h].astype(np.float64)
            got = np.array([[np.nan if v is None else v for v in row] for row in e[key]])
            finite = np.isfinite(engine)
            assert np.abs(got[finite] - engine[finite]).max() <= 0.5e-3 + 1e-6 * np.abs(
                engine[finite]).max()


@pytest.mark.slow
def test_default_size_and_float64_round_trip():
    doc = trace_json("The cat sat on the mat", "--engine", "numpy", "--layer", "1", "--head",
                     "11", "--dtype", "float64")
    assert (doc["config"]["d_model"], doc["config"]["heads"]) == (768, 12)
    assert doc["config"]["dtype"] == "float64"
    trace = engine_trace(["The cat sat on the mat"], d_model=768, heads=12, layers=(1,),
                         head_sel=(11,), dtype="float64")
    (e,) = doc["attention"]
    want = trace.tensors["blocks.1.attn.pattern"][0, 0]
    assert want.dtype == np.float64
    np.testing.assert_array_equal(np.array(e["weights"], np.float64), want)
    assert doc["steps"] == steps_of(trace)
    assert doc["steps"][-1]["shape"] == [1, 6, 768]


@pytest.mark.slow
def test_default_size_float32():
    doc = trace_json("The cat sat on the mat", "--engine", "numpy")
    trace = engine_trace(["The cat sat on the mat"], d_model=768, heads=12)
    assert len(doc["attention"]) == 2 * 12
    assert_patterns_equal(doc, trace)
    assert doc["steps"] == steps_of(trace)


def test_torch_engine_json_equals_numpy_engine():
    pytest.importorskip("torch")
    doc = trace_json(ENGLISH, "--d-model", "64", "--heads", "4", "--engine", "torch", "--stages",
                     "--layer", "1", "--head", "1,2")
    assert doc["config"]["engine"] == "torch"
    ref = engine_trace([ENGLISH], layers=(1,), head_sel=(1, 2), capture="stages")
    # Equal to rounding, layer 0's included (tests/tolerance.py): from a trace that has it all.
    tol = step_tolerances(engine_trace([ENGLISH], capture="all"))["blocks.1.attn.pattern"]
    got = entries(doc)
    assert sorted(got) == [(1, 0, 1), (1, 0, 2)]
    for i, h in enumerate((1, 2)):
        assert_close("pattern", np.array(got[1, 0, h]["weights"]),
                     ref.tensors["blocks.1.attn.pattern"][0, i], tol)
        masked = got[1, 0, h]["masked"]
        assert [[v is None for v in row] for row in masked] == (
            ~np.isfinite(ref.tensors["blocks.1.attn.masked"][0, i])).tolist()


def test_failed_run_prints_nothing_on_stdout():
    result = runner.invoke(app, ["trace", ENGLISH, *SMALL, "--json", "--layer", "7"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("attn: error: ") and result.stderr.count("\n") == 1


# ── attn tokens --json ────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("text", [ENGLISH, CHINESE, "emoji 🙂 and tabs\tand\nnewlines"])
def test_tokens_json_validates(text):
    result = runner.invoke(app, ["tokens", text, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert TOKENS_VALIDATOR.is_valid(doc), list(TOKENS_VALIDATOR.iter_errors(doc))[:3]
    assert b"".join(bytes.fromhex(t["bytes"]) for t in doc) == text.encode("utf-8")
    assert [t["id"] for t in doc] == [t.id for t in tokens.tokenize(text)]


# ── the writer itself ─────────────────────────────────────────────────────────────────────────

def test_orjson_writes_null_for_non_finite_float32():
    # The writer relies on this: JSON has no −∞; a masked score must come out as null.
    x = np.array([[0.5, -np.inf], [np.inf, np.nan]], np.float32)
    assert render_json.array_json(x) == b"[[0.5,null],[null,null]]"
    assert render_json.array_json(x, precision=2) == b"[[0.5,null],[null,null]]"


def test_default_precision_round_trips_float32_exactly():
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32) * 10.0 ** np.arange(
        -20, 12, 0.5).astype(np.float32)[:, None]
    back = np.array(json.loads(render_json.array_json(x)), np.float32)
    np.testing.assert_array_equal(back, x)
    back = np.array(json.loads(render_json.array_json(x.astype(np.float64))), np.float64)
    np.testing.assert_array_equal(back, x.astype(np.float64))


def test_writer_streams_one_array_at_a_time():
    trace = engine_trace([ENGLISH * 3])
    pieces = list(render_json.chunks(trace))
    whole = b"".join(pieces)
    json.loads(whole)
    biggest = max(len(p) for p in pieces)
    one = len(render_json.array_json(trace.tensors["blocks.0.attn.pattern"][0, 0]))
    # No piece holds more than one matrix (plus the small header or step list).
    header = len(pieces[0]) + len(pieces[1])
    assert biggest <= max(one * 1.5, header)
    assert len(pieces) > 2 * 4 * 2


def test_json_numbers_have_no_exponent_surprises():
    doc = trace_json("a b", *SMALL, "--layer", "0", "--stages")
    for e in doc["attention"]:
        for row in e["weights"]:
            for v in row:
                assert isinstance(v, float | int) and math.isfinite(v)


# ── pipes ─────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.slow
def test_closed_pipe_ends_quietly():
    text = "the cat sat on the mat " * 35  # about 210 tokens: megabytes of JSON
    proc = subprocess.Popen(
        [sys.executable, "-m", "attn_tracer", "trace", text, "--d-model", "64", "--heads", "4",
         "--engine", "numpy", "--layer", "all", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = proc.stdout.read(100)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    code = proc.wait(timeout=60)
    assert head.startswith(b'{"schema":"attn-trace/1"')
    assert code == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr
    assert stderr == ""


def test_output_of_the_pipe_case_is_megabytes():
    # The pipe case above only tests something if the output is far bigger than a pipe buffer.
    text = "the cat sat on the mat " * 35
    result = runner.invoke(app, ["trace", text, *SMALL, "--layer", "all", "--json"])
    assert result.exit_code == 0
    assert len(result.stdout_bytes) > 1_000_000
    assert re.match(r'\{"schema":"attn-trace/1"', result.stdout)
    orjson.loads(result.stdout_bytes)


def _no_constant(name: str):
    raise AssertionError(f"{name} in the JSON output")


# ── --json-lines ──────────────────────────────────────────────────────────────────────────────

def trace_lines(*args: str) -> list[dict]:
    """Run `attn trace ARGS --json-lines`: every line one JSON object, each valid on its own."""
    result = runner.invoke(app, ["trace", *args, "--json-lines"])
    assert result.exit_code == 0, result.stderr
    raw = result.stdout_bytes
    assert raw.endswith(b"\n")
    # NaN, Infinity and -Infinity literals raise (a token's text may spell "NaN": that is fine).
    records = [json.loads(line, parse_constant=_no_constant) for line in raw.split(b"\n")[:-1]]
    for n, record in enumerate(records):
        errors = list(LINES_VALIDATOR.iter_errors(record))
        assert not errors, (n, [f"{list(e.path)}: {e.message}" for e in errors[:3]])
    return records


LINE_CASES = {
    "one text": [ENGLISH, *SMALL],
    "padded batch, stages": [ENGLISH, "A dog", *SMALL, "--padding", "left", "--stages"],
    "cross": ["The cat", *SMALL, "--cross", "Le chat est assis"],
    "predict, precision": [ENGLISH, *SMALL, "--predict", "--top-k", "3", "--precision", "3"],
    "one head of layer 1": [ENGLISH, *SMALL, "--layer", "1", "--head", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LINE_CASES))
def test_json_lines_are_the_document_line_by_line(case):
    args = LINE_CASES[case]
    doc = trace_json(*args)
    records = trace_lines(*args)
    header, rest = records[0], records[1:]
    assert header["record"] == "header" and header["schema"] == "attn-trace-lines/1"
    for key in ("version", "config", "inputs", "cross_inputs", "steps"):
        assert header.get(key) == doc.get(key), key
    kinds = [r["record"] for r in rest]
    assert kinds == sorted(kinds)  # attention lines first, then predictions
    strip = [{k: v for k, v in r.items() if k != "record"} for r in rest]
    assert [e for e, k in zip(strip, kinds, strict=True) if k == "attention"] == doc["attention"]
    assert [e for e, k in zip(strip, kinds, strict=True) if k == "prediction"] == doc.get(
        "predictions", [])


def test_json_lines_weights_are_the_engines_float32_bit_for_bit():
    records = trace_lines(ENGLISH, "A dog", *SMALL, "--padding", "left")
    trace = engine_trace([ENGLISH, "A dog"], padding="left")
    assert_patterns_equal({"attention": [r for r in records if r["record"] == "attention"]},
                          trace)


@pytest.mark.slow
def test_json_lines_stream_through_jq():
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed")
    attn = subprocess.run([sys.executable, "-m", "attn_tracer", "trace", ENGLISH, *SMALL,
                           "--json-lines"], capture_output=True, check=True)
    jq = subprocess.run(["jq", "-c", 'select(.record == "attention") | [.layer, .head, '
                         '(.weights[-1] | add)]'], input=attn.stdout, capture_output=True,
                        check=True)
    rows = [json.loads(line) for line in jq.stdout.splitlines()]
    assert [r[:2] for r in rows] == [[layer, head] for layer in (0, 1) for head in range(4)]
    assert all(abs(r[2] - 1) < 1e-5 for r in rows)  # the last query's row is a distribution


def test_json_lines_read_by_pandas():
    pandas = pytest.importorskip("pandas")
    result = runner.invoke(app, ["trace", ENGLISH, *SMALL, "--json-lines"])
    frame = pandas.read_json(io.StringIO(result.stdout), lines=True)
    attention = frame[frame.record == "attention"]
    assert len(frame) == 1 + 8 and len(attention) == 8
    assert attention.layer.tolist() == [0] * 4 + [1] * 4


def test_lines_schema_shares_the_documents_definitions():
    lines, document = schema("trace-lines"), schema("trace")
    for name, definition in document["$defs"].items():
        assert lines["$defs"][name] == definition, name
    for key in ("config", "inputs", "cross_inputs", "steps", "version"):
        assert lines["$defs"]["headerLine"]["properties"][key] == document["properties"][key]


def test_lines_schema_rejects_what_the_contract_forbids():
    entry = {"record": "attention", "layer": 0, "head": 0, "batch": 0, "block": "attn",
             "weights": [[1.0, 0.0], [0.5, 0.5]]}
    assert LINES_VALIDATOR.is_valid(entry)
    for bad in ({**entry, "record": "heads"}, {k: v for k, v in entry.items() if k != "record"},
                {**entry, "weights": [[None, 0.0]]}, {**entry, "weights": [[1.5]]},
                {"record": "header", "schema": "attn-trace/1"}):
        assert not LINES_VALIDATOR.is_valid(bad), bad


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--json", "--json-lines"])
def test_closed_pipe_ends_quietly_while_the_next_matrix_is_made(flag):
    text = "the cat sat on the mat " * 35
    proc = subprocess.Popen(
        [sys.executable, "-m", "attn_tracer", "trace", text, *SMALL, "--layer", "all", flag],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = proc.stdout.read(100)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, stderr
    assert head.startswith(b'{"schema":"attn-trace/1"' if flag == "--json" else
                           b'{"record":"header","schema":"attn-trace-lines/1"')
    assert stderr == ""


def test_the_writer_raises_what_the_serializer_raised():
    def pieces():
        yield b"a"
        raise ValueError("a bug in a serializer")

    sink = io.BytesIO()
    with pytest.raises(ValueError, match="a bug"):
        render_json._write_all(pieces(), sink)
    assert sink.getvalue() == b"a"


def test_the_helper_thread_stops_when_the_writer_does():
    made = []

    def pieces():
        for n in range(10_000):
            made.append(n)
            yield b"x"

    stream = render_json.ahead(pieces(), depth=2)
    next(stream)
    stream.close()  # the writer failed (a closed pipe) or was interrupted
    deadline = time.monotonic() + 5
    while any(t.name == "attn-json" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the helper thread is still running"
        time.sleep(0.01)
    assert len(made) < 10  # it stopped at once, not after making everything


@pytest.mark.slow
def test_the_whole_vocabulary_is_in_the_json():
    """--top-k 50257: the terminal draws 100 rows, JSON and JSON Lines have every token."""
    result = runner.invoke(app, ["trace", "The cat", *SMALL, "--layer", "0", "--predict",
                                 "--top-k", "50257", "--json"])
    assert result.exit_code == 0, result.stderr
    # Not trace_json: its substring check for "NaN" would find GPT-2's token "NaN" itself.
    doc = json.loads(result.stdout, parse_constant=_no_constant)
    assert TRACE_VALIDATOR.is_valid(doc)
    (prediction,) = doc["predictions"]
    assert sorted(t["id"] for t in prediction["top"]) == list(range(50257))
    probs = [t["prob"] for t in prediction["top"]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
    result = runner.invoke(app, ["trace", "The cat", *SMALL, "--layer", "0", "--predict",
                                 "--top-k", "50257", "--json-lines"])
    last = json.loads(result.stdout_bytes.splitlines()[-1], parse_constant=_no_constant)
    assert last["record"] == "prediction" and last["top"] == prediction["top"]
