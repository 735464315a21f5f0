"""Property tests (hypothesis) over what users type: any text, any bytes on stdin, texts at and
beyond --n-ctx, and option values. Every example either succeeds with a valid document or fails
cleanly: exit 1 or 2, one line `attn: error: …` on stderr, nothing on stdout, no traceback.

A valid document validates against the shipped schema (`attn schema`), has no NaN or Infinity,
and its patterns are distributions: each row of a real query sums to 1 within 1e-5, the row of
a pad query is all 0, entries above the diagonal are exactly 0 under the causal mask, and
masked pad keys are exactly 0. Tiny models (d_model 8, 2 heads, 1 layer) keep the file fast.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from attn_tracer.cli import app
from tolerance import softmax_rtol

TINY = ["--d-model", "8", "--heads", "2", "--layers", "1", "--engine", "numpy"]
RUNNER = CliRunner()
SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow],
            "derandomize": True}

VALIDATOR = jsonschema.Draft202012Validator(
    json.loads(files("attn_tracer.data").joinpath("trace.schema.json").read_text("utf-8")))

# Pieces users actually paste, mixed into arbitrary text.
PIECES = [
    "<|endoftext|>", "[bold]x[/]", "[red]", "[/]", "[link=https://x.org]a[/link]", ":smile:",
    "\\[b]", "é", "e\u0301", "\u0301", "\u200b", "\u200d", "\u202e", "שלום", "مرحبا",
    "今天天气很好", "🙂", "👩‍👩‍👧", "🇫🇷", "\x00", "\x1b[31m", "\r\n", "\t", "\x7f", "\ufeff",
    "\U0010ffff",
    " ", "  ", "\n", "The cat", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
# Any code point but lone surrogates: a command-line argument cannot carry those.
ANY_CHAR = st.characters(exclude_categories=("Cs",))
TEXTS = st.lists(st.one_of(st.text(ANY_CHAR, max_size=12), st.sampled_from(PIECES)),
                 max_size=6).map("".join)
# Texts with something to attend to: any text around at least one visible character.
VISIBLE = st.tuples(TEXTS, st.sampled_from(["a", "今", "🙂", "[red]", "<|endoftext|>", "́"]),
                    TEXTS).map("".join)


def _no_constants(name: str):
    raise AssertionError(f"{name} in the JSON output")


def invoke(args: list[str], stdin: bytes | None = None, env: dict | None = None):
    result = RUNNER.invoke(app, args, input=stdin, env={"ATTN_DEBUG": None, **(env or {})})
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        repr(result.exception))
    return result


def assert_clean_failure(result, codes=(1, 2), fragment: str = "") -> str:
    event("clean failure")
    assert result.exit_code in codes, (result.exit_code, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn: error: "), lines
    assert "Traceback" not in result.stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


def pad_rows(inp: dict, q_len: int) -> set[int]:
    """Positions of a row that are padding."""
    length, padding = inp.get("length", len(inp["tokens"])), inp.get("padding", 0)
    if inp.get("padding_side", "right") == "left":
        return set(range(padding))
    return set(range(length, q_len))


def check_document(text: str) -> dict:
    """The whole contract of a --json document, as far as it can be checked without a model."""
    # NaN and Infinity can only appear as JSON constants (the vocabulary has them as words).
    doc = json.loads(text, parse_constant=_no_constants)
    VALIDATOR.validate(doc)
    causal = doc["config"]["mask"] == "causal"
    inputs, cross_inputs = doc["inputs"], doc.get("cross_inputs")
    for entry in doc["attention"]:
        w = np.asarray(entry["weights"], dtype=np.float64)
        inp = inputs[entry["batch"]]
        q_pad = pad_rows(inp, w.shape[0])
        keys = inp if entry["block"] == "attn" else cross_inputs[entry["batch"]]
        k_pad = pad_rows(keys, w.shape[1])
        assert np.all((w >= 0) & (w <= 1))
        sums = w.sum(axis=-1)
        for i, s in enumerate(sums):
            if i in q_pad and s == 0:
                continue  # a pad query attends to nothing: all zeros, by contract
            # At most 64 keys (--n-ctx 64), summed here in float64: softmax_rtol(64) = 3e-6.
            assert abs(s - 1) <= 1e-5, (entry["layer"], entry["head"], i, s)
        if k_pad:
            assert np.all(w[:, sorted(k_pad)] == 0), "a pad key got weight"
        if causal and entry["block"] == "attn":
            assert np.all(np.triu(w, k=1) == 0), "a query saw a later key"
    for p in doc.get("predictions", []):
        probs = [t["prob"] for t in p["top"]]
        assert probs == sorted(probs, reverse=True)
        # The listed ones sum to at most 1, give or take the softmax's rounding over all of
        # GPT-2's tokens (tests/tolerance.py), each listed entry's own included.
        spread = (p["top"][0]["logit"] - p["top"][-1]["logit"]) / p["temperature"]
        assert all(0 <= q <= 1 for q in probs)
        assert math.fsum(probs) <= 1 + softmax_rtol(50257, "float32", spread)
    return doc


# ── any text ─────────────────────────────────────────────────────────────────────────────────

@pytest.mark.slow
@settings(max_examples=250, **SETTINGS)
@given(text=TEXTS)
@example(text="<|endoftext|>")
@example(text="[bold]x[/]")
@example(text="")
@example(text=" \t\n\u3000")
@example(text="-")
@example(text="\x00")
def test_any_text_traces_or_fails_cleanly(text: str):
    result = invoke(["trace", *TINY, "--n-ctx", "64", "--json", "--", text])
    if not text.strip():
        # Empty and whitespace-only text: nothing to attend to. "-" reads the (empty) stdin.
        assert_clean_failure(result, (2,), "")
        return
    if text == "-":
        assert_clean_failure(result, (2,), "empty")
        return
    if result.exit_code == 2 and "--n-ctx" in result.stderr:
        assert_clean_failure(result, (2,), "--max-length")
        return
    assert result.exit_code == 0, result.stderr
    doc = check_document(result.stdout)
    assert doc["inputs"][0]["text"] == text
    # The labels cover the text: joined bytes decode back to it (the tokenizer is lossless).
    raw = bytes.fromhex("".join(t["bytes"] for t in doc["inputs"][0]["tokens"]))
    assert raw.decode("utf-8") == text


@settings(max_examples=80, **SETTINGS)
@given(text=VISIBLE)
def test_tokens_json_of_any_text(text: str):
    result = invoke(["tokens", "--json", "--", text])
    assert result.exit_code == 0, result.stderr
    toks = json.loads(result.stdout, parse_constant=_no_constants)
    assert bytes.fromhex("".join(t["bytes"] for t in toks)).decode("utf-8") == text


# ── arbitrary bytes on standard input ────────────────────────────────────────────────────────

@pytest.mark.slow
@settings(max_examples=150, **SETTINGS)
@given(data=st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),  # lone surrogates
    st.sampled_from([b"\xed\xa0\x80", b"\xff\xfe", b"\xc3", b"caf\xe9", b"\xef\xbb\xbfhi"]),
), command=st.sampled_from(["tokens", "trace"]))
@example(data=b"hi\r\n", command="tokens")  # one line ending, \r\n or \n, is dropped
@example(data=b"hi\n\n", command="tokens")  # only one
@example(data=b"\n", command="trace")  # nothing left: empty
def test_bytes_on_stdin(data: bytes, command: str):
    args = ["tokens", "--json", "-"] if command == "tokens" else [
        "trace", *TINY, "--n-ctx", "64", "--json", "-"]
    result = invoke(args, stdin=data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        assert_clean_failure(result, (2,), "standard input is not valid UTF-8")
        return
    if command == "tokens":
        # Tokenizing is defined for any text, the empty one included (it has no tokens).
        assert result.exit_code == 0, result.stderr
        toks = json.loads(result.stdout)
        # One final line ending is the end of the input, not part of the text.
        expected = data[:-2] if data.endswith(b"\r\n") else data.removesuffix(b"\n")
        assert bytes.fromhex("".join(t["bytes"] for t in toks)) == expected
        return
    if not text.strip():
        assert_clean_failure(result, (2,), "empty")
    elif result.exit_code == 2 and "--n-ctx" in result.stderr:
        assert_clean_failure(result, (2,), "--max-length")
    else:
        assert result.exit_code == 0, result.stderr
        check_document(result.stdout)


# ── at and beyond --n-ctx ────────────────────────────────────────────────────────────────────

@settings(max_examples=80, **SETTINGS)
@given(n=st.integers(1, 14), n_ctx=st.integers(1, 10), cut=st.none() | st.integers(1, 12))
def test_lengths_around_n_ctx(n: int, n_ctx: int, cut: int | None):
    text = "x" + " x" * (n - 1)  # exactly n GPT-2 tokens: "x" then n-1 times " x"
    args = ["trace", *TINY, "--n-ctx", str(n_ctx), "--json", text]
    if cut is not None:
        args += ["--max-length", str(cut)]
    result = invoke(args)
    length = n if cut is None else min(n, cut)
    if length > n_ctx:
        assert_clean_failure(result, (2,), "--max-length")
        return
    assert result.exit_code == 0, result.stderr
    doc = check_document(result.stdout)
    assert doc["inputs"][0]["length"] == length
    assert all(len(e["weights"]) == length for e in doc["attention"])
    # Cutting is said on stderr (never on stdout), and only when something was cut.
    assert ("--max-length" in result.stderr) == (length < n)


# ── option values ────────────────────────────────────────────────────────────────────────────

def selection(count: int):
    """A valid --layer/--head value for `count` layers or heads, or None for the default."""
    return st.one_of(st.none(), st.just("all"), st.integers(0, count - 1).map(str),
                     st.lists(st.integers(0, count - 1), min_size=1, max_size=3).map(
                         lambda xs: ",".join(map(str, xs))))


# Values that must be refused, one option at a time: (option, strategy of bad values).
BAD = {
    "d_model": st.integers(-3, 0),
    "heads": st.integers(-2, 0),
    "indivisible": st.just(None),  # heads that do not divide d_model
    "layers": st.integers(-2, 0),
    "temperature": st.one_of(st.floats(max_value=0.0, width=32),
                             st.sampled_from([float("nan"), float("inf"), -0.0, 0.0])),
    "top_k": st.one_of(st.integers(-5, 0), st.integers(50258, 10**12)),
    "layer": st.sampled_from(["3", "-1", "x", "0,9", "1.5", ""]),
    "head": st.sampled_from(["{heads}", "-1", "all,{heads}", "one", "0,,1"]),
}


@settings(max_examples=300, **SETTINGS)
@given(data=st.data(), broken=st.sampled_from([None, None, None, None, *BAD]),
       d_model=st.sampled_from([8, 12, 16, 24]), layers=st.integers(1, 3),
       # Any T > 0 is valid, those that are 0 or ∞ in float32 included (5e-324, 1e300).
       temperature=st.one_of(st.floats(1e-3, 1e3),
                             st.floats(0.0, exclude_min=True, allow_infinity=False),
                             st.sampled_from([1e-30, 1e-45, 5e-324, 1e30, 1e300, 1.0])),
       top_k=st.integers(1, 40),
       predict=st.booleans(), stages=st.booleans(), no_scale=st.booleans(),
       mask=st.sampled_from(["causal", "none"]),
       pos=st.sampled_from(["sinusoidal", "learned", "none"]),
       arch=st.sampled_from(["attn", "gpt2"]), padding=st.sampled_from(["right", "left"]),
       texts=st.lists(st.sampled_from(["The cat sat", "a", "今天天气很好", "🙂 ok", "x y z w"]),
                      min_size=1, max_size=3))
@pytest.mark.slow
def test_option_values(data, broken, d_model, layers, temperature, top_k, predict, stages,
                       no_scale, mask, pos, arch, padding, texts):
    heads = data.draw(st.sampled_from([h for h in (1, 2, 3, 4, 6) if d_model % h == 0]))
    layer = data.draw(selection(layers))
    head = data.draw(selection(heads))
    if broken == "indivisible":
        heads = data.draw(st.sampled_from([h for h in (5, 7, 9, 10) if d_model % h]))
    elif broken is not None:
        bad = data.draw(BAD[broken])
        if broken == "head":
            bad = bad.format(heads=heads)
        d_model, heads, layers, temperature, top_k, layer, head = (
            bad if broken == name else value for name, value in (
                ("d_model", d_model), ("heads", heads), ("layers", layers),
                ("temperature", temperature), ("top_k", top_k), ("layer", layer),
                ("head", head)))
    args = ["trace", *texts, "--engine", "numpy", "--json", "--d-model", str(d_model),
            "--heads", str(heads), "--layers", str(layers), "--temperature", repr(temperature),
            "--top-k", str(top_k), "--mask", mask, "--pos", pos, "--arch", arch,
            "--padding", padding]
    args += ["--predict"] * predict + ["--stages"] * stages + ["--no-scale"] * no_scale
    if layer is not None:
        args += ["--layer", layer]
    if head is not None:
        args += ["--head", head]
    result = invoke(args)
    event(f"broken: {broken}")
    if broken is not None:
        assert_clean_failure(result, (2,))
        return
    assert result.exit_code == 0, result.stderr
    doc = check_document(result.stdout)
    assert len(doc["inputs"]) == len(texts)
    shown_layers = range(layers) if layer in (None, "all") else {int(p) for p in layer.split(",")}
    shown_heads = range(heads) if head in (None, "all") else {int(p) for p in head.split(",")}
    assert {(e["layer"], e["head"]) for e in doc["attention"]} == {
        (la, h) for la in shown_layers for h in shown_heads}
    if predict:
        assert [p["batch"] for p in doc["predictions"]] == list(range(len(texts)))
        assert all(len(p["top"]) == top_k for p in doc["predictions"])
    if stages:
        assert all("scores" in e for e in doc["attention"])


def test_top_k_of_the_whole_vocabulary_is_a_distribution():
    # --top-k at its largest allowed value lists every token: the probabilities sum to 1.
    result = invoke(["trace", "The cat sat", "a", *TINY, "--json", "--predict", "--top-k",
                     "50257", "--temperature", "0.5"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout, parse_constant=_no_constants)
    for p in doc["predictions"]:
        assert len(p["top"]) == 50257 and len({t["id"] for t in p["top"]}) == 50257
        logits = np.array([t["logit"] for t in p["top"]], dtype=np.float64)
        total = math.fsum(t["prob"] for t in p["top"])  # exactly: only the softmax's rounding
        assert abs(total - 1) <= softmax_rtol(50257, "float32", float(np.ptp(logits)) / 0.5)
        assert np.all(np.diff(logits) <= 0)


@pytest.mark.slow
@settings(max_examples=60, **SETTINGS)
@given(texts=st.lists(VISIBLE, min_size=1, max_size=3), cross=VISIBLE,
       padding=st.sampled_from(["right", "left"]))
def test_batches_with_cross_attention(texts: list[str], cross: str, padding: str):
    result = invoke(["trace", *TINY, "--n-ctx", "64", "--json", "--padding", padding,
                     "--cross", cross, "--", *texts])
    if result.exit_code == 2 and "--n-ctx" in result.stderr:
        assert_clean_failure(result, (2,), "--max-length")
        return
    if texts.count("-") > 1:
        assert_clean_failure(result, (2,))
        return
    if "-" in texts:
        assert_clean_failure(result, (2,), "empty")  # "-" is standard input, empty here
        return
    assert result.exit_code == 0, result.stderr
    doc = check_document(result.stdout)
    assert {e["block"] for e in doc["attention"]} == {"attn", "cross_attn"}


# ── Rich markup is data ──────────────────────────────────────────────────────────────────────

MARKUP = st.lists(st.sampled_from(["[bold]", "[/]", "[red]", "[/bold]", "[link=x]", ":smile:",
                                   "[b]x[/b]", "\\[", "x", " "]), min_size=1, max_size=5
                  ).map("".join).filter(lambda t: t.strip())


@pytest.mark.slow
@settings(max_examples=50, **SETTINGS)
@given(text=MARKUP)
@example(text="[bold]x[/] [red]")
def test_rich_markup_in_the_text_is_shown_literally(text: str):
    toks = json.loads(invoke(["tokens", "--json", "--", text]).stdout)
    env = {"COLUMNS": "400", "NO_COLOR": "1"}
    table = invoke(["tokens", "--", text], env=env)
    assert table.exit_code == 0, table.stderr
    view = invoke(["trace", *TINY, "--", text], env=env)
    assert view.exit_code == 0, view.stderr
    tokens_line = next(line for line in view.stdout.splitlines() if line.startswith("0:"))
    for i, t in enumerate(toks):
        assert t["text"] in table.stdout, (t["text"], table.stdout)
        assert f"{i}:{t['text']}" in tokens_line, (t["text"], tokens_line)
    assert "😄" not in view.stdout + table.stdout  # :smile: is not an emoji code here


@pytest.mark.parametrize("text", ["[bold]x[/]", "[red]alarm", ":smile: [link=x]y[/link]"])
def test_markup_never_reaches_rich_as_markup(text: str):
    # One rendering at a width where nothing is cut: the characters of the text are all there.
    view = invoke(["trace", *TINY, "--", text], env={"COLUMNS": "400", "NO_COLOR": "1"})
    assert view.exit_code == 0
    tokens_line = next(line for line in view.stdout.splitlines() if line.startswith("0:"))
    labels = "".join(part.split(":", 1)[1] for part in tokens_line.split())
    assert labels.replace("␣", "") == text.replace(" ", "")


# ── any terminal width, any ATTN_DEBUG ──────────────────────────────────────────────────────

WIDTHS = st.one_of(st.integers(-10**6, 10**6).map(str), st.text(max_size=6),
                   st.sampled_from(["0", "", "1", "19", "20", "99999999", "9" * 5000, " 80",
                                    "80.5", "+40", "٤٠"]))


@pytest.mark.slow
@settings(max_examples=60, **SETTINGS)
@given(columns=WIDTHS, lines=WIDTHS,
       command=st.sampled_from(["trace", "stages", "tokens", "help"]))
def test_any_columns_draws_or_fails_cleanly(columns: str, lines: str, command: str):
    args = {"trace": ["trace", "The cat sat", *TINY, "--predict"],
            "stages": ["trace", "The cat sat", *TINY, "--stages", "--values"],
            "tokens": ["tokens", "The cat 今天"], "help": ["trace", "--help"]}[command]
    if "\x00" in columns + lines:
        return  # an environment variable cannot hold NUL
    result = invoke(args, env={"COLUMNS": columns, "LINES": lines})
    assert result.exit_code == 0, (columns, result.stderr)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    # Drawn within the width that was asked, brought inside 20 … 1000 columns (80 when unusable).
    try:
        asked = int(columns)
    except ValueError:
        asked = 0
    width = min(max(asked, 20), 1000) if asked > 0 else 80
    from rich.cells import cell_len

    assert max(cell_len(line) for line in result.stdout.splitlines()) <= width


@settings(max_examples=40, **SETTINGS)
@given(value=st.text(max_size=8))
def test_attn_debug_is_on_only_when_it_says_so(value: str):
    if "\x00" in value:
        return
    result = invoke(["trace", "hi", "--d-model", "10", "--heads", "4"],
                    env={"ATTN_DEBUG": value})
    assert result.exit_code == 2 and result.stdout == ""
    on = value.strip().lower() in ("1", "true", "yes", "on")
    assert ("Traceback" in result.stderr) == on, (value, result.stderr)
    assert result.stderr.splitlines()[-1].startswith("attn: error: --heads 4 does not divide")
