"""A checkpoint's own tokenizer, against Hugging Face's `tokenizers` (the reference).

The tokenizer.json files are made here (tests/tokenizer_files.py): a byte-level BPE trained on
the sample texts, a Unigram over Metaspace pieces with byte fallback, and GPT-2's own vocabulary
and merges. attn's ids must be `tokenizers`' own `encode` of each, and GPT-2's file must run on
tiktoken with tiktoken's ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
from tokenizers import Tokenizer as Reference

import tokenizer_files as files
from attn_tracer.cli import app
from attn_tracer.model import tokenizer as tokenizers
from attn_tracer.model import tokens
from attn_tracer.model.config import Config
from attn_tracer.model.pipeline import prepare
from attn_tracer.model.safetensors_io import write_safetensors

ROOT = Path(__file__).resolve().parent.parent
TEXTS = files.sample_texts()
# English, Chinese, emoji, code: each kind of text the labels must keep exact.
KINDS = ["english_paragraph", "chinese_paragraph", "chinese_short", "emoji", "code.py", "long"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for name, make in (("bpe", files.bpe), ("unigram", files.unigram),
                       ("gpt2", files.gpt2_like)):
        make(base / name)
        out[name] = base / name
    files.gpt2_like(base / "gptj", extra=["<|extratoken_1|>", "<|extratoken_2|>"])
    out["gptj"] = base / "gptj"
    return out


def reference(folder: Path) -> Reference:
    return Reference.from_file(str(folder / "tokenizer.json"))


def ids(toks) -> list[int]:
    return [t.id for t in toks]


# ── the ids are the reference's ───────────────────────────────────────────────────────────────

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["bpe", "unigram"])
def test_ids_are_the_reference_encode(made, name, kind):
    tok = tokenizers.for_source(str(made[name]))
    assert isinstance(tok, tokenizers.HuggingFace)
    assert ids(tok.tokenize(TEXTS[kind])) == reference(made[name]).encode(TEXTS[kind]).ids


@pytest.mark.parametrize("kind", KINDS)
def test_gpt2_vocabulary_runs_on_tiktoken_with_the_reference_ids(made, kind):
    tok = tokenizers.for_source(str(made["gpt2"]))
    assert isinstance(tok, tokenizers.GPT2) and tok.file == made["gpt2"] / "tokenizer.json"
    got = ids(tok.tokenize(TEXTS[kind]))
    assert got == tokens.encode(TEXTS[kind])
    assert got == reference(made["gpt2"]).encode(TEXTS[kind]).ids


def test_gpt2_merges_follow_from_the_shipped_ranks():
    """The hash tokenizer.py compares merges with is that of the merges the ranks imply."""
    to_char = {b: c for c, b in tokenizers._byte_chars().items()}
    text = lambda raw: "".join(to_char[b] for b in raw)  # noqa: E731
    merges = [f"{text(a)} {text(b)}" for a, b in files.gpt2_merges()]
    assert tokenizers.merges_hash(merges) == tokenizers.GPT2_MERGES_SHA256
    assert tokenizers.merges_hash([m.split(" ") for m in merges]) == tokenizers.GPT2_MERGES_SHA256


def test_gpt2_vocabulary_hash_is_the_shipped_ranks():
    assert tokenizers.vocab_hash(tokenizers._gpt2_vocab()) == tokenizers.GPT2_VOCAB_SHA256
    assert tokenizers.vocab_hash({"a": 0, "b": 2}) is None  # ids with a gap


def test_extra_special_tokens_stay_on_tiktoken(made):
    """GPT-J's tokenizer.json: GPT-2's, with special tokens after <|endoftext|>."""
    tok = tokenizers.for_source(str(made["gptj"]))
    assert isinstance(tok, tokenizers.GPT2) and tok.vocab == 50259
    ref = reference(made["gptj"])
    text = "a<|extratoken_2|>b<|endoftext|> c"
    ref.encode_special_tokens = False
    assert ids(tok.tokenize(text, allow_special=True)) == ref.encode(text).ids
    assert tok.token(50258).special and tok.token(50258).text == "<|extratoken_2|>"
    ref.encode_special_tokens = True
    assert ids(tok.tokenize(text)) == ref.encode(text).ids == tokens.encode(text)


def test_anything_else_than_gpt2_vocabulary_is_not_taken_for_it(made, tmp_path):
    doc = json.loads((made["gpt2"] / "tokenizer.json").read_text(encoding="utf-8"))
    doc["model"]["merges"][10], doc["model"]["merges"][11] = (doc["model"]["merges"][11],
                                                              doc["model"]["merges"][10])
    assert tokenizers.gpt2_specials(doc) is None
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    tok = tokenizers.for_source(str(tmp_path))
    assert isinstance(tok, tokenizers.HuggingFace)
    text = TEXTS["english_paragraph"]
    assert ids(tok.tokenize(text)) == reference(tmp_path).encode(text).ids


def test_special_tokens_in_the_text_need_allow_special(made):
    tok = tokenizers.for_source(str(made["bpe"]))
    ref = reference(made["bpe"])
    text = "one<|end_of_text|>two"
    end = ref.token_to_id("<|end_of_text|>")
    ref.encode_special_tokens = True
    plain = tok.tokenize(text)
    assert ids(plain) == ref.encode(text).ids and end not in ids(plain)
    ref.encode_special_tokens = False
    allowed = tok.tokenize(text, allow_special=True)
    assert ids(allowed) == ref.encode(text).ids
    marked = [t for t in allowed if t.id == end]
    assert len(marked) == 1 and marked[0].special and not marked[0].added
    assert marked[0].text == "<|end_of_text|>"


# ── labels ────────────────────────────────────────────────────────────────────────────────────

def test_metaspace_and_byte_fallback_labels(made):
    tok = tokenizers.for_source(str(made["unigram"]))
    ref = reference(made["unigram"])
    text = "the model\n今天 👋 x"
    toks = tok.tokenize(text)
    pieces = [ref.id_to_token(t.id) for t in toks]
    assert toks[0].text == "<s>" and toks[0].special and toks[0].added  # the tokenizer's BOS
    body = toks[1:]
    for t, piece in zip(body, pieces[1:], strict=True):
        assert "▁" not in t.text
        if piece.startswith("▁"):
            assert t.text.startswith("␣") and t.bytes.startswith(b" ")
    newline = [t for t, p in zip(toks, pieces, strict=True) if p == "<0x0A>"]
    assert len(newline) == 1 and newline[0].bytes == b"\n" and newline[0].text == "↵"
    # Every byte is where the text has it: Metaspace's one leading space, then the text.
    assert b"".join(t.bytes for t in body) == b" " + text.encode()
    # 今, 天 and 👋 are not in the vocabulary: one token a byte, each named by its character.
    split = tokens.split_characters(body)
    assert [p for p in split if p] == ["今"] * 3 + ["天"] * 3 + ["👋"] * 4
    assert [t.text for t, p in zip(body, split, strict=True) if p == "今"] == [
        "<e4>", "<bb>", "<8a>"]


def test_byte_level_bpe_labels_are_gpt2s(made):
    """A byte-level BPE's tokens read exactly as GPT-2's do (Ġ is a space, ␣)."""
    tok = tokenizers.for_source(str(made["bpe"]))
    for kind in KINDS:
        toks = tok.tokenize(TEXTS[kind])
        assert toks[0].text == "<|begin_of_text|>" and toks[0].added
        assert b"".join(t.bytes for t in toks[1:]) == TEXTS[kind].encode()
        assert all(t.text == tokens.label(t.bytes) for t in toks[1:])
        assert not any("Ġ" in t.text for t in toks)


# ── through the run ───────────────────────────────────────────────────────────────────────────

def gpt2_folder(folder: Path, tokenizer=None, **config) -> Path:
    """A tiny random GPT-2 checkpoint (vocab 50257, so every test tokenizer's ids fit)."""
    from test_without_torch import gpt2_state

    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", gpt2_state())
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1, "n_positions": 16,
         "vocab_size": 50257, **config}))
    if tokenizer is not None:
        tokenizer(folder)
    return folder


def test_prepare_adds_the_bos_and_pads_with_the_tokenizers_pad(made):
    config = Config(weights=str(made["unigram"]))
    ref = reference(made["unigram"])
    p = prepare(["a cat", "the cat sat on the mat"], config)
    rows = p.batch.ids.tolist()
    long = ref.encode("the cat sat on the mat").ids
    short = ref.encode("a cat").ids
    assert rows[1] == long and rows[0][:len(short)] == short
    tok = tokenizers.of(config)
    assert tok.pad_id == tok.bos_id == 1  # no pad token, no config: its BOS stands in
    assert set(rows[0][len(short):]) == {tok.pad_id}
    # --max-length cuts the text's own tokens; the BOS is not counted.
    cut = prepare(["the cat sat on the mat"], config, max_length=2)
    assert cut.batch.ids.tolist()[0] == long[:3]


def test_bos_is_not_added_twice(made):
    config = Config(weights=str(made["unigram"]))
    assert prepare(["a cat"], config, bos=True).batch.ids.tolist() == [
        reference(made["unigram"]).encode("a cat").ids]


def test_config_json_names_the_pad_and_bos(tmp_path):
    files.unigram(tmp_path)
    files.write_config(tmp_path, pad_token_id=2, bos_token_id=1)
    tok = tokenizers.for_source(str(tmp_path))
    assert (tok.pad_id, tok.bos_id) == (2, 1)


def test_trace_names_the_tokenizer_and_marks_what_it_added(runner, tmp_path):
    folder = gpt2_folder(tmp_path / "m", files.unigram)
    result = runner.invoke(app, ["trace", "--weights", str(folder), "a cat", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema = pytest.importorskip("jsonschema")
    schema = runner.invoke(app, ["schema", "trace"]).stdout
    jsonschema.validate(doc, json.loads(schema))
    described = doc["config"]["tokenizer"]
    assert described["library"] == "tokenizers" and described["name"] == "Unigram (tokenizer.json)"
    assert described["file"] == str(folder / "tokenizer.json")
    assert described["adds"] == {"before": [1], "after": []}
    first = doc["inputs"][0]["tokens"][0]
    assert first == {"id": 1, "text": "<s>", "bytes": b"<s>".hex(), "special": True,
                     "added": True}
    assert [t["id"] for t in doc["inputs"][0]["tokens"]] == reference(folder).encode("a cat").ids
    view = runner.invoke(app, ["trace", "--weights", str(folder), "a cat", "--width", "200"])
    assert view.exit_code == 0, view.stderr
    assert f"tokenizer: {folder / 'tokenizer.json'} (Unigram, byte fallback" in view.stdout
    assert "<s> before every text: added by the tokenizer" in view.stdout


def test_gpt2_outputs_name_tiktoken(runner):
    result = runner.invoke(app, ["trace", "--d-model", "8", "--heads", "2", "--layers", "1",
                                 "hi there", "--json"])
    described = json.loads(result.stdout)["config"]["tokenizer"]
    assert described == {"library": "tiktoken", "name": "gpt2", "file": None, "vocab": 50257,
                         "pad_id": 50256, "bos_id": 50256, "adds": {"before": [], "after": []}}


def test_a_gpt2_checkpoint_with_gpt2s_tokenizer_json_says_so(runner, tmp_path):
    folder = gpt2_folder(tmp_path / "m", files.gpt2_like)
    result = runner.invoke(app, ["trace", "--weights", str(folder), "a cat", "--width", "200"])
    assert result.exit_code == 0, result.stderr
    assert (f"tokenizer: GPT-2's tokenizer (tiktoken): {folder / 'tokenizer.json'} has GPT-2's "
            "vocabulary and merges") in result.stdout


def test_ids_past_the_checkpoint_vocabulary_are_refused(made):
    from attn_tracer.errors import AttnError

    config = Config(weights=str(made["bpe"]), vocab=300)  # the BPE has 600 ids
    text = TEXTS["english_paragraph"]
    top = max(reference(made["bpe"]).encode(text).ids)
    with pytest.raises(AttnError, match=f"gives token id {top}, past the checkpoint's "
                                        "vocabulary of 300"):
        prepare([text], config)


def test_repeat_probe_draws_the_tokenizers_words(made):
    from attn_tracer.analysis.heads import repeat_probe, word_ids

    tok = tokenizers.for_source(str(made["unigram"]))
    words = word_ids(tok)
    assert len(words) >= 5  # the tiny vocabulary has ten
    assert all(tok.token(int(i)).bytes[:1] == b" " for i in words)
    probe = repeat_probe(5, 0, True, tok)
    assert probe[0] == tok.bos_id == 1 and probe[1:6] == probe[6:]
    assert set(probe[1:]) <= set(words.tolist())
    assert len(word_ids()) == 19383  # GPT-2's, unchanged


def test_heads_repeat_with_a_checkpoints_tokenizer(runner, tmp_path):
    folder = gpt2_folder(tmp_path / "m", files.unigram)
    result = runner.invoke(app, ["heads", "--weights", str(folder), "--repeat", "5", "--json"])
    assert result.exit_code == 0, result.stderr
    toks = json.loads(result.stdout)["inputs"][0]["tokens"]
    assert toks[0]["text"] == "<s>" and toks[0]["added"]
    assert [t["id"] for t in toks[1:6]] == [t["id"] for t in toks[6:]]


def test_attribute_target_in_the_checkpoints_tokenizer(runner, tmp_path):
    folder = gpt2_folder(tmp_path / "m", files.bpe)
    tok = tokenizers.for_source(str(folder))
    result = runner.invoke(app, ["attribute", "--weights", str(folder), "the cat sat on the",
                                 "--target", " the", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["target"]["id"] == tok.encode(" the")[0]
    assert doc["config"]["tokenizer"]["library"] == "tokenizers"


# ── attn tokens --weights ─────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("kind", ["english_paragraph", "chinese_short", "emoji", "code.py"])
def test_tokens_weights_gives_the_reference_ids(runner, made, kind):
    result = runner.invoke(app, ["tokens", "--weights", str(made["unigram"]), "--file",
                                 str(files.SAMPLES / f"{kind}.txt"), "--keep-newline", "--json"])
    assert result.exit_code == 0, result.stderr
    got = [t["id"] for t in json.loads(result.stdout)]
    assert got == reference(made["unigram"]).encode(TEXTS[kind]).ids


def test_tokens_weights_table(runner, made):
    result = runner.invoke(app, ["tokens", "--weights", str(made["unigram"]), "hi\n今"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert f"tokenizer: {made['unigram'] / 'tokenizer.json'} (Unigram" in out
    assert "<s> before every text: added by the tokenizer" in out
    assert "↵" in out and "<e4>" in out and "今" in out


def test_tokens_weights_reads_no_weights(runner, tmp_path):
    """Only tokenizer.json (and config.json): a folder without weights is enough."""
    files.bpe(tmp_path)
    result = runner.invoke(app, ["tokens", "--weights", str(tmp_path), "hello", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["text"] == "<|begin_of_text|>"


def test_tokens_weights_finds_a_cached_model(runner, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    files.unigram(snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    result = runner.invoke(app, ["tokens", "--weights", "org/tiny", "a cat", "--json"])
    assert result.exit_code == 0, result.stderr
    assert [t["id"] for t in json.loads(result.stdout)] == reference(snapshot).encode(
        "a cat").ids


def test_a_tokenizer_attn_cannot_read_is_one_line(runner, tmp_path, one_line_error):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    one_line_error(runner.invoke(app, ["tokens", "--weights", str(tmp_path), "hi"]), 2,
                   "tokenizer.model", "tokenizer.json")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    one_line_error(runner.invoke(app, ["tokens", "--weights", str(bad), "hi"]), 1,
                   "not JSON")


def test_without_the_tokenizers_package_one_line_says_what_to_install(
        runner, made, monkeypatch, one_line_error):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now fails
    tokenizers._load.cache_clear()
    try:
        line = one_line_error(runner.invoke(app, ["tokens", "--weights", str(made["bpe"]),
                                                  "hi"]), 1)
        assert tokenizers.INSTALL_TOKENIZERS in line
        # GPT-2's vocabulary needs no tokenizers: tiktoken runs it.
        result = runner.invoke(app, ["tokens", "--weights", str(made["gpt2"]), "hi", "--json"])
        assert result.exit_code == 0, result.stderr
        assert [t["id"] for t in json.loads(result.stdout)] == tokens.encode("hi")
    finally:
        tokenizers._load.cache_clear()


_PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    import attn_tracer.cli
    seen = {}
    for argv in json.loads(sys.argv[1]):
        sys.argv = ["attn", *argv]
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                attn_tracer.cli.main()
            except SystemExit as e:
                code = e.code
        seen[" ".join(argv[:2])] = ["tokenizers" in sys.modules, code]
    sys.__stdout__.write(json.dumps(seen))
""")


@pytest.mark.slow
def test_the_default_path_never_imports_tokenizers(tmp_path):
    plain = gpt2_folder(tmp_path / "plain")
    gpt2 = gpt2_folder(tmp_path / "gpt2", files.gpt2_like)
    tiny = ["--d-model", "8", "--heads", "2", "--layers", "1"]
    cases = [["tokens", "hello world"], ["trace", *tiny, "hi", "--json"],
             ["heads", *tiny, "hi there"], ["attribute", *tiny, "hi there"],
             ["trace", "--weights", str(plain), "hi"], ["tokens", "--weights", str(gpt2), "hi"]]
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen == {k: [False, 0] for k in seen} and len(seen) == len(cases)


def test_an_id_past_the_tokenizer_has_no_label(made):
    assert tokenizers.gpt2().label(50300) == "<unused 50300>"
    assert tokenizers.for_source(str(made["bpe"])).label(5000) == "<unused 5000>"


def test_explore_title_names_the_tokenizer(tmp_path):
    pytest.importorskip("textual")
    from attn_tracer.explore.panels import title_line
    from explore_setup import explore_data

    folder = gpt2_folder(tmp_path / "m", files.unigram)
    data = explore_data(["a cat"], width=200, weights=str(folder))
    assert "tokenizer Unigram (tokenizer.json), tokenizers" in title_line(data, 200).plain
    assert data.trace.inputs[0].tokens[0].text == "<s>"
