"""`attn heads`: every head's scores against references nobody here wrote, heads whose roles are
known by construction, the JSON document and the induction probe.

The reference scores are computed here, in plain NumPy, from Hugging Face `transformers`' GPT-2
(`output_attentions=True`, eager attention) on the same checkpoint, following TransformerLens's
`head_detector.py` line by line for the three detection scores (dense 0/1 detection patterns built
as it builds them, score = Σ(A ⊙ D) / Σ A per text, then the mean over the texts). attn computes
them from its own patterns, inside a hook, from index lists: the two share no code.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")

from typer.testing import CliRunner  # noqa: E402

import heads_model  # noqa: E402
from attn_tracer.analysis.head_definitions import DEFINITIONS, NOTES, SCORES  # noqa: E402
from attn_tracer.cli import app  # noqa: E402
from attn_tracer.model import tokens  # noqa: E402

# Our patterns match HF's within 1e-5 in float32 (test_gpt2.py; measured ≤ 1e-6). Each score is a
# weighted sum of pattern entries whose weights add up to at most 1 per query row, averaged over
# rows: its error is at most the rows' mean L1 error, a few float32 ulps of 1 (≤ 1e-6). Entropy
# multiplies a relative error ε of each weight p by |log₂ p| + 1/ln 2, which sums to ε·(H + 1.45)
# over a row: ≤ 1e-6·(6 + 1.45) for the ≤ 64 keys used here. So 1e-5 bounds every score.
TOL = 1e-5
N_CTX = 64
runner = CliRunner()
SCHEMA = json.loads(files("attn_tracer.data").joinpath("heads.schema.json").read_text("utf-8"))
TEXT = "The cat sat on the mat. The cat sat on the mat again, and the dog sat too."
BATCH = [TEXT, "Hi there", "A cat sat. A cat sat."]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory):
    """A small random GPT-2 (2 layers × 4 heads, d_model 64), saved with save_pretrained."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=N_CTX,
                                     vocab_size=tokens.VOCAB, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("heads-gpt2") / "saved"
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return heads_model.save(tmp_path_factory.mktemp("heads-built") / "model")


def heads_json(*args: str) -> dict:
    result = runner.invoke(app, ["heads", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, SCHEMA)
    return doc


# ── the reference: TransformerLens's definitions, in NumPy, on HF's attentions ─────────────────

def tl_previous(ids: np.ndarray) -> np.ndarray:
    n = len(ids)
    d = np.zeros((n, n))
    d[1:, :-1] = np.eye(n - 1)  # get_previous_token_head_detection_pattern
    return np.tril(d)


def tl_duplicate(ids: np.ndarray) -> np.ndarray:
    pattern = np.tile(ids, (len(ids), 1))
    eq = (pattern == pattern.T).astype(float)
    np.fill_diagonal(eq, 0)  # get_duplicate_token_head_detection_pattern
    return np.tril(eq)


def tl_induction(ids: np.ndarray) -> np.ndarray:
    shifted = np.roll(tl_duplicate(ids), 1, axis=1)  # torch.roll(..., shifts=1, dims=1)
    shifted[:, 0] = 0  # "replace first column with 0's"
    return np.tril(shifted)


def reference(attentions: list[np.ndarray], ids: np.ndarray, valid: np.ndarray,
              repeat: int | None = None) -> dict[str, np.ndarray]:
    """Each score [layers, heads] from HF's attentions [batch, heads, len, len] per layer."""
    layers, (batch, heads) = len(attentions), attentions[0].shape[:2]
    out = {s: np.zeros((layers, heads)) for s in SCORES}
    for layer, attn in enumerate(attentions):
        for b in range(batch):
            real = valid[b]
            row_ids = ids[b, real]
            n = len(row_ids)
            keys = np.arange(1, n + 1)  # causal: query q sees q + 1 keys
            for h in range(heads):
                A = attn[b, h][np.ix_(real, real)].astype(np.float64)  # the text alone
                got = {
                    "previous_token": (A * tl_previous(row_ids)).sum() / A.sum(),
                    "duplicate_token": (A * tl_duplicate(row_ids)).sum() / A.sum(),
                    "induction": (A * tl_induction(row_ids)).sum() / A.sum(),
                    "first_token": A[:, 0].mean(),
                    "self": np.diag(A).mean(),
                }
                if repeat is not None:  # the probe: the second half's stripe, mean over it
                    q = np.arange(n - repeat, n)
                    got["induction"] = A[q, q - repeat + 1].mean()
                with np.errstate(divide="ignore", invalid="ignore"):
                    rows = -np.where(A > 0, A * np.log2(A), 0).sum(axis=1)
                    norm = np.where(keys > 1, rows / np.log2(keys), 0.0)
                got["entropy"], got["entropy_norm"] = rows.mean(), norm.mean()
                for s in SCORES:
                    out[s][layer, h] += got[s] / batch
    return out


def hf_attentions(hf, doc: dict) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Run HF on the batch the document says was run: its token ids, padding and positions."""
    inputs = doc["inputs"]
    length = max(i["length"] + i["padding"] for i in inputs)
    ids = np.full((len(inputs), length), tokens.ENDOFTEXT_ID, np.int64)
    valid = np.zeros((len(inputs), length), bool)
    for b, inp in enumerate(inputs):
        cols = (slice(0, inp["length"]) if inp["padding_side"] == "right"
                else slice(length - inp["length"], length))
        ids[b, cols] = [t["id"] for t in inp["tokens"]]
        valid[b, cols] = True
    positions = np.clip(np.cumsum(valid, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = hf.transformer(input_ids=torch.from_numpy(ids),
                             attention_mask=torch.from_numpy(valid.astype(np.int64)),
                             position_ids=torch.from_numpy(positions), output_attentions=True)
    return [a.numpy() for a in out.attentions], ids, valid


def assert_scores_match(doc: dict, ref: dict[str, np.ndarray]) -> None:
    for s in SCORES:
        ours = np.array(doc["scores"][s])
        assert ours.shape == ref[s].shape, s
        diff = np.abs(ours - ref[s]).max()
        assert diff <= TOL, f"{s}: max abs diff {diff}"
    for entry in doc["heads"]:  # the per-head objects are the same numbers
        for s in SCORES:
            assert entry[s] == doc["scores"][s][entry["layer"]][entry["head"]]


CASES = {
    "single": ([TEXT], []),
    "right": (BATCH, ["--padding", "right"]),
    "left": (BATCH, ["--padding", "left"]),
    "bos-left": (BATCH, ["--padding", "left", "--bos"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_scores_match_the_reference_on_hf_attentions(case, gpt2):
    hf, path = gpt2
    texts, flags = CASES[case]
    doc = heads_json(*texts, "--weights", str(path), *flags)
    bos = "--bos" in flags
    for inp, text in zip(doc["inputs"], texts, strict=True):  # the tokens HF is given are ours
        want = ([tokens.ENDOFTEXT_ID] if bos else []) + tokens.encode(text)
        assert [t["id"] for t in inp["tokens"]] == want
    assert doc["config"]["bos"] is bos and doc["config"]["repeat"] is None
    attentions, ids, valid = hf_attentions(hf, doc)
    assert_scores_match(doc, reference(attentions, ids, valid))


def test_the_torch_engine_gives_the_same_scores(gpt2):
    hf, path = gpt2
    doc = heads_json(*BATCH, "--weights", str(path), "--padding", "left", "--engine", "torch")
    assert doc["config"]["engine"] == "torch"
    attentions, ids, valid = hf_attentions(hf, doc)
    assert_scores_match(doc, reference(attentions, ids, valid))


@pytest.mark.slow
@pytest.mark.parametrize("bos", [True, False])
def test_the_repeat_probe_matches_the_reference(bos, gpt2):
    hf, path = gpt2
    n = 20
    doc = heads_json("--weights", str(path), "--repeat", str(n), "--seed", "3",
                     "--bos" if bos else "--no-bos")
    ids = [t["id"] for t in doc["inputs"][0]["tokens"]]
    assert len(ids) == 2 * n + bos
    if bos:
        assert ids[0] == tokens.ENDOFTEXT_ID
    first, second = ids[bos:bos + n], ids[bos + n:]
    assert first == second and len(set(first)) == n  # n distinct tokens, then the same again
    for i in first:  # ordinary words: a space and letters, each one token
        raw = tokens.encoding().decode_single_token_bytes(i)
        assert raw[:1] == b" " and raw[1:].isalpha() and raw[1:].islower()
    assert doc["config"]["repeat"] == n and doc["config"]["bos"] is bos
    attentions, ids_, valid = hf_attentions(hf, doc)
    assert_scores_match(doc, reference(attentions, ids_, valid, repeat=n))


def test_the_probe_is_seeded(gpt2):
    _, path = gpt2

    def probe(seed: str) -> list[int]:
        doc = heads_json("--weights", str(path), "--repeat", "8", "--seed", seed)
        return [t["id"] for t in doc["inputs"][0]["tokens"]]

    assert probe("1") == probe("1") != probe("2")


# ── heads whose roles are known by construction ─────────────────────────────────────────────

def ranked(doc: dict, score: str) -> list[tuple[str, float]]:
    return sorted(((h["name"], h[score]) for h in doc["heads"]), key=lambda x: -x[1])


def assert_known_head_first(doc: dict, score: str, expected: float, margin: float = 0.3):
    layer, head = heads_model.ROLES[score]
    order = ranked(doc, score)
    (best, value), (_, runner_up) = order[0], order[1]
    assert best == f"L{layer}H{head}", (score, order[:3])
    assert value == pytest.approx(expected, abs=0.01), (score, value)
    assert value - runner_up >= margin, (score, order[:3])


@pytest.mark.slow
def test_built_heads_rank_first_on_the_probe(built):
    n = 10
    doc = heads_json("--weights", str(built), "--repeat", str(n))
    length = 2 * n + 1  # with <|endoftext|>, the default for --repeat
    # A perfect previous-token head: every query but the first (detect_head's Σ A counts it).
    assert_known_head_first(doc, "previous_token", (length - 1) / length)
    assert_known_head_first(doc, "first_token", 1.0)
    assert_known_head_first(doc, "self", 1.0)
    assert_known_head_first(doc, "induction", 1.0)
    # The second half's n queries each find their copy; Σ A counts all 2n + 1 rows.
    assert_known_head_first(doc, "duplicate_token", n / length)
    for layer, head in heads_model.UNIFORM:  # all-zero weights: uniform rows, but the first
        entry = doc["heads"][layer * heads_model.HEADS + head]
        assert entry["entropy_norm"] == pytest.approx((length - 1) / length, abs=1e-6)
    # The positional heads are focused on every row (the induction head only on the second half).
    for score in ("previous_token", "first_token", "self"):
        layer, head = heads_model.ROLES[score]
        assert doc["heads"][layer * heads_model.HEADS + head]["entropy"] < 0.05


def test_built_heads_on_a_left_padded_batch(built):
    """The sink is the first real token: under left padding that is not position 0."""
    doc = heads_json("The cat sat on the mat, and then the dog sat down too", "A dog ran home",
                     "--weights", str(built), "--padding", "left", "--sort", "first_token")
    lengths = [inp["length"] for inp in doc["inputs"]]
    assert doc["inputs"][1]["padding"] == lengths[0] - lengths[1] > 0
    assert_known_head_first(doc, "first_token", 1.0)
    assert_known_head_first(doc, "self", 1.0)
    assert_known_head_first(doc, "previous_token", np.mean([(n - 1) / n for n in lengths]))


def test_a_one_token_text_has_defined_scores(built):
    doc = heads_json("Hi", "--weights", str(built))
    for entry in doc["heads"]:
        assert entry["first_token"] == pytest.approx(1) and entry["self"] == pytest.approx(1)
        assert entry["previous_token"] == entry["duplicate_token"] == entry["induction"] == 0
        assert entry["entropy"] == 0 and entry["entropy_norm"] == 0  # one key: no choice


# ── the document ────────────────────────────────────────────────────────────────────────────

def test_schema_command_prints_the_shipped_schema():
    result = runner.invoke(app, ["schema", "heads"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == SCHEMA
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_config_and_inputs_are_described_as_in_attn_trace():
    trace = json.loads(files("attn_tracer.data").joinpath("trace.schema.json").read_text("utf-8"))
    for name in ("token", "input"):
        assert SCHEMA["$defs"][name] == trace["$defs"][name]
    ours, theirs = SCHEMA["$defs"]["config"], trace["$defs"]["config"]
    assert {k: v for k, v in ours["properties"].items() if k not in ("bos", "repeat")} == \
        theirs["properties"]
    assert set(theirs["required"]) <= set(ours["required"])


def test_definitions_are_the_same_everywhere():
    help_text = runner.invoke(app, ["heads", "--help"], env={"COLUMNS": "400"}).stdout
    flat = " ".join(help_text.split())
    doc_defs = SCHEMA["properties"]["scores"]["properties"]
    for name, (formula, words) in DEFINITIONS.items():
        assert f"{name} = {formula}" in flat, name
        assert " ".join(words.split()[:6]) in flat, name
        assert formula in doc_defs[name]["description"]
    assert NOTES in SCHEMA["description"] and " ".join(NOTES.split()) in flat


def test_thumbnails_in_json(built):
    doc = heads_json("The cat sat on the mat", "Hi", "--weights", str(built), "--thumbnails")
    thumbs = doc["thumbnails"]
    assert [t["batch"] for t in thumbs] == [0, 1]
    assert (thumbs[0]["rows"], thumbs[0]["cols"]) == (6, 6)  # 6 tokens: one cell each
    assert (thumbs[1]["rows"], thumbs[1]["cols"]) == (1, 1)
    self_head = np.array(thumbs[0]["patterns"][0][2], dtype=float)  # L0H2, null → nan
    assert np.allclose(np.diag(self_head), 1, atol=1e-3)
    assert np.isnan(self_head[np.triu_indices(6, 1)]).all()  # above the diagonal: masked
    for layer in thumbs[0]["patterns"]:
        for head in layer:
            rows = np.nansum(np.array(head, dtype=float), axis=1)
            assert np.allclose(rows, 1, atol=1e-5)  # a query's weight over the key blocks
    assert "thumbnails" not in heads_json("Hi", "--weights", str(built))


@pytest.mark.slow
def test_no_nan_ever(built):
    # Inputs that could divide by zero: one token, a text of one repeated token, a pad-heavy batch.
    for args in (["x"], ["a a a a a a a a"], ["a", "b c d e f g h i j"]):
        result = runner.invoke(app, ["heads", *args, "--weights", str(built), "--json",
                                     "--thumbnails"])
        assert result.exit_code == 0
        assert "NaN" not in result.stdout and "Infinity" not in result.stdout
        jsonschema.validate(json.loads(result.stdout), SCHEMA)
