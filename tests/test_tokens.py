"""The offline GPT-2 tokenizer and its labels, checked against tiktoken's own r50k_base.

The reference is built by tiktoken itself (`tiktoken.get_encoding("r50k_base")`): its own
pattern, its own special tokens, and its own hash check of the ranks file, which we place where
tiktoken's `read_file_cached` looks for it (the sha1 of the URL, in TIKTOKEN_CACHE_DIR) with the
network blocked, so a file that is not byte-identical to OpenAI's fails instead of downloading.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import socket
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_tracer.cli import app
from attn_tracer.errors import AttnError
from attn_tracer.model import tokens

tiktoken = pytest.importorskip("tiktoken")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_texts"
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
PACKAGED = Path(tokens.__file__).parents[1] / "data" / tokens.RANKS_FILE  # attn_tracer/data
HEX_LABEL = re.compile(r"<[0-9a-f]{2}(?: [0-9a-f]{2})*>")

CHINESE_SHORT = "今天天气很好"
TEXTS = {
    "english": "The cat sat on the mat. It's a truth universally acknowledged, isn't it?",
    "chinese_short": CHINESE_SHORT,
    "chinese_paragraph": "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？"
                         "今天天气很好，我们去公园散步吧。",
    "emoji": "Hi 👋🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 rainbow 🏳️‍🌈 ❤️ café",
    "spaces": "a  b   c    d",
    "tabs": "\tindented\t\ttwice\t",
    "newlines": "line one\nline two\n\n\nafter blanks\r\nwindows\n",
    "trailing_spaces": "trailing   ",
    "only_whitespace": " \t\n  \n\t ",
    "leading_spaces": "   leading",
    "code": "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n\n\nprint(f(7))\n",
    "numbers": "In 1776, 3.14159 and 1,000,000 and 12345678901234567890",
    "contractions": "I'll we've they're she'd he's don't DON'T",
    "endoftext_in_text": "before<|endoftext|>after <|endoftext|>",
    "mixed": "Ünïcödé ñ — “quotes” … Ελληνικά русский עברית العربية हिन्दी 日本語 한국어",
    "control": "bell\x07 nul\x00 del\x7f nbsp\u00a0 zwsp\u200b rlo\u202e end",
}

# Any text, with the characters labels must take care of drawn more often than by chance.
_TRICKY = st.sampled_from([" ", "\n", "\t", "\r", "\ufffd", "\u200d", "\u202e", "\u00a0",
                           "\u0301", "今", "👨‍👩‍👧", "🇯🇵", "<", "<|endoftext|>"])
ANY_TEXT = st.lists(st.text(max_size=8) | _TRICKY, max_size=12).map("".join)


@pytest.fixture(scope="module")
def r50k(tmp_path_factory):
    """tiktoken's own r50k_base, built from our shipped ranks placed in its cache, offline."""
    import tiktoken.load
    import tiktoken.registry

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    # The cache file name, as tiktoken.load.read_file_cached derives it.
    (cache / hashlib.sha1(R50K_URL.encode()).hexdigest()).write_bytes(
        gzip.decompress(PACKAGED.read_bytes())
    )

    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        mp.delenv("DATA_GYM_CACHE_DIR", raising=False)
        mp.setattr(socket, "socket", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        # Not tiktoken's in-process registry cache: build it from the file now.
        mp.delitem(tiktoken.registry.ENCODINGS, "r50k_base", raising=False)
        enc = tiktoken.get_encoding("r50k_base")
        mp.delitem(tiktoken.registry.ENCODINGS, "r50k_base", raising=False)
    assert enc.name == "r50k_base"
    return enc


# ── ids ───────────────────────────────────────────────────────────────────────────────────────


def test_hello_world(r50k):
    assert tokens.encode("hello world") == [31373, 995]
    assert r50k.encode_ordinary("hello world") == [31373, 995]


def test_vocabulary_matches_tiktoken(r50k):
    enc = tokens.encoding()
    assert enc.n_vocab == r50k.n_vocab == tokens.VOCAB == 50257
    assert enc.eot_token == r50k.eot_token == tokens.ENDOFTEXT_ID == 50256
    for i in range(r50k.n_vocab):
        assert enc.decode_single_token_bytes(i) == r50k.decode_single_token_bytes(i), i


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_ids_match_r50k(r50k, name):
    text = TEXTS[name]
    assert tokens.encode(text) == r50k.encode_ordinary(text)
    assert [t.id for t in tokens.tokenize(text)] == r50k.encode_ordinary(text)


def test_chinese_ids(r50k):
    ids = tokens.encode(CHINESE_SHORT)
    assert ids == r50k.encode_ordinary(CHINESE_SHORT)
    assert len(ids) == 10  # byte-level BPE: 6 characters, 10 tokens


def test_endoftext_is_ordinary_text_by_default(r50k):
    text = "a<|endoftext|>b"
    ids = tokens.encode(text)
    assert ids == r50k.encode_ordinary(text)
    assert 50256 not in ids
    # tiktoken's own encode() refuses the special text unless told; ours reads it as text.
    with pytest.raises(ValueError):
        r50k.encode(text)


def test_endoftext_with_allow_special(r50k):
    text = "a<|endoftext|>b <|endoftext|>"
    ids = tokens.encode(text, allow_special=True)
    assert ids == r50k.encode(text, allowed_special={"<|endoftext|>"})
    assert ids.count(50256) == 2
    toks = tokens.tokenize(text, allow_special=True)
    special = [t for t in toks if t.id == 50256]
    assert [t.text for t in special] == ["<|endoftext|>"] * 2
    assert all(t.bytes == b"<|endoftext|>" for t in special)


SAMPLE_FILES = sorted(SAMPLES.glob("*.txt"))


def test_sample_texts_present():
    names = {p.name for p in SAMPLE_FILES}
    assert {"short.txt", "chinese_short.txt", "chinese_paragraph.txt", "english_paragraph.txt",
            "code.py.txt", "emoji.txt", "long.txt"} <= names


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name)
def test_sample_texts_match_r50k(r50k, path):
    text = path.read_text("utf-8")
    assert tokens.encode(text) == r50k.encode_ordinary(text)


def test_long_sample_fits_gpt2_context(r50k):
    n = len(r50k.encode_ordinary((SAMPLES / "long.txt").read_text("utf-8")))
    assert 950 <= n <= 1024


@settings(max_examples=200, deadline=None)
@given(ANY_TEXT)
def test_any_text_matches_r50k(r50k, text):
    assert tokens.encode(text) == r50k.encode_ordinary(text)


# ── labels ────────────────────────────────────────────────────────────────────────────────────

_HIDDEN = ("Cc", "Cf", "Zl", "Zp", "Zs", "Cs", "Co")


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT)
def test_labels_round_trip_and_readable(text):
    toks = tokens.tokenize(text)
    assert b"".join(t.bytes for t in toks) == text.encode("utf-8")
    for t in toks:
        assert t.text, t
        assert "\ufffd" not in t.text, t
        # Nothing a reader cannot see: no raw whitespace, control or format characters
        # (outside the hex groups, whose bytes are separated by plain spaces).
        shown = HEX_LABEL.sub("", t.text)
        assert not any(unicodedata.category(ch) in _HIDDEN for ch in shown), t
        assert not any(ch.isspace() for ch in shown), t


_MARKERS = "<>␣↵⇥␍␡◌"
_PLAIN = st.characters(
    blacklist_categories=("Cs", *_HIDDEN, "Mn", "Mc", "Me"), blacklist_characters=_MARKERS
)
_UNVISIBLE = {"␣": " ", "↵": "\n", "⇥": "\t"}


_CODEPOINT = re.compile(r"<U\+[0-9A-F]{4,6}>")


def _bytes_of(label: str) -> bytes:
    """Read a label back: hex groups are bytes, <U+XXXX> is that character, the
    visible-whitespace marks are whitespace."""
    out = b""
    for piece in re.split(f"({HEX_LABEL.pattern}|{_CODEPOINT.pattern})", label):
        if HEX_LABEL.fullmatch(piece):
            out += bytes.fromhex(piece[1:-1])
        elif _CODEPOINT.fullmatch(piece):
            out += chr(int(piece[3:-1], 16)).encode("utf-8")
        else:
            out += "".join(_UNVISIBLE.get(ch, ch) for ch in piece).encode("utf-8")
    return out


@settings(max_examples=200, deadline=None)
@given(st.text(_PLAIN | st.sampled_from(" \n\t")))
def test_labels_are_exact(text):
    # With no literal markers in the text, each label reads back to exactly its token's bytes.
    for t in tokens.tokenize(text):
        assert _bytes_of(t.text) == t.bytes, t
        try:
            t.bytes.decode("utf-8")
        except UnicodeDecodeError:
            assert HEX_LABEL.search(t.text), t


def test_partial_utf8_label_is_hex():
    # 天 is e5 a4 a9; a token made of only its first two bytes is shown as those bytes.
    assert tokens.label(b"\xe5\xa4") == "<e5 a4>"
    assert tokens.label(b"\xa9") == "<a9>"
    assert tokens.label(b" \xf0\x9f\x91") == "␣<f0 9f 91>"
    assert tokens.label("天".encode()) == "天"


def test_literal_replacement_character_is_named():
    # A U+FFFD in a label would read as a failed decode; the character is spelled out instead.
    toks = tokens.tokenize("a\ufffdb")
    assert b"".join(t.bytes for t in toks) == "a\ufffdb".encode()
    assert all("\ufffd" not in t.text for t in toks)
    assert "U+FFFD" in "".join(t.text for t in toks)


@pytest.mark.parametrize(("text", "label"), [
    (" ", "␣"), ("\n", "↵"), ("\t", "⇥"), ("  ", "␣␣"), ("\n\n", "↵↵"), (" world", "␣world"),
])
def test_whitespace_is_visible(text, label):
    assert tokens.label(text.encode()) == label


def test_whitespace_labels_in_context():
    toks = tokens.tokenize("a b\tc\nd   ")
    joined = "".join(t.text for t in toks)
    assert joined == "a␣b⇥c↵d␣␣␣"


def test_chinese_labels_map_back_to_characters(r50k):
    toks = tokens.tokenize(CHINESE_SHORT)
    assert [t.id for t in toks] == r50k.encode_ordinary(CHINESE_SHORT)
    raw = [r50k.decode_single_token_bytes(i) for i in r50k.encode_ordinary(CHINESE_SHORT)]
    assert [t.bytes for t in toks] == raw
    # What UTF-8 says: 今 = e4 bb 8a, 天 = e5 a4 a9, 气 = e6 b0 94, 很 = e5 be 88, 好 = e5 a5 bd.
    assert [t.text for t in toks] == [
        "<e4 bb>", "<8a>", "天", "天", "<e6 b0>", "<94>", "<e5 be>", "<88>", "<e5 a5>", "<bd>",
    ]
    assert tokens.split_characters(toks) == ["今", "今", "", "", "气", "气", "很", "很", "好", "好"]
    for t, part in zip(toks, tokens.split_characters(toks), strict=True):
        if part:
            # The named character's UTF-8 contains the token's bytes.
            assert t.bytes in part.encode("utf-8")


def _split_reference(text: str, toks: list[tokens.Token]) -> list[str]:
    """The definition: characters whose UTF-8 bytes straddle a token's start or end."""
    spans = []
    offset = 0
    for ch in text:
        size = len(ch.encode("utf-8"))
        spans.append((offset, offset + size, ch))
        offset += size
    out, start = [], 0
    for t in toks:
        end = start + len(t.bytes)
        out.append("".join(ch for a, b, ch in spans
                           if a < end and b > start and (a < start or b > end)))
        start = end
    return out


@settings(max_examples=200, deadline=None)
@given(ANY_TEXT)
def test_split_characters_names_straddling_characters(text):
    toks = tokens.tokenize(text)
    parts = tokens.split_characters(toks)
    # The characters are shown as labels show them (a zero-width joiner as <U+200D>).
    assert parts == [tokens.label(p.encode()) for p in _split_reference(text, toks)]
    for t, part in zip(toks, parts, strict=True):
        try:
            t.bytes.decode("utf-8")
        except UnicodeDecodeError:
            assert part, t  # a token that is not whole characters names what it is part of
        else:
            assert part == "", t


# ── offline ───────────────────────────────────────────────────────────────────────────────────


def test_tokenizing_needs_no_network_or_cache(tmp_path, monkeypatch, no_network, fresh_encoding):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o500)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(cache))
    with pytest.raises(RuntimeError, match="network"):  # the block really is in place
        socket.create_connection(("example.com", 443))
    try:
        assert tokens.encode("hello world") == [31373, 995]
        assert len(tokens.tokenize(CHINESE_SHORT)) == 10
        # Root ignores the read-only bit, so check nothing was written there either.
        assert os.listdir(cache) == []
    finally:
        cache.chmod(0o700)


# ── a corrupted vocabulary ────────────────────────────────────────────────────────────────────


def _good_ranks() -> bytes:
    return gzip.decompress(PACKAGED.read_bytes())


def test_load_ranks_accepts_the_shipped_file(r50k):
    ranks = tokens.load_ranks(_good_ranks())
    assert len(ranks) == 50256
    assert hashlib.sha256(_good_ranks()).hexdigest() == tokens.RANKS_SHA256


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_load_ranks_refuses_corrupted_bytes(damage):
    data = bytearray(_good_ranks())
    if damage == "flip":
        data[1000] ^= 0x01
    elif damage == "truncate":
        data = data[:-10]
    else:
        data += b"QQ== 50257\n"
    with pytest.raises(AttnError, match="corrupted"):
        tokens.load_ranks(bytes(data))


def _packaged_as(monkeypatch, tmp_path, gz: bytes) -> None:
    """Make `tokens.load_ranks()` read `gz` as if it were the packaged file."""
    (tmp_path / tokens.RANKS_FILE).write_bytes(gz)
    monkeypatch.setattr(tokens, "files", lambda package: tmp_path)


@pytest.mark.parametrize("kind", ["bad hash", "truncated gzip", "not gzip"])
def test_cli_reports_a_corrupted_vocabulary(runner, monkeypatch, tmp_path, fresh_encoding, kind):
    good = _good_ranks()
    if kind == "bad hash":
        gz = gzip.compress(good.replace(b"IQ== 0", b"Ig== 0", 1))
    elif kind == "truncated gzip":
        gz = gzip.compress(good)[:-100]
    else:
        gz = b"this is not gzip data"
    _packaged_as(monkeypatch, tmp_path, gz)
    result = runner.invoke(app, ["tokens", "hello world"])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("attn: error: ")
    assert "corrupted" in lines[0]


# ── bounded tokenizing: a prefix's tokens are exactly the whole text's first tokens ───────────

# Characters at the edges of GPT-2's pieces: contractions, runs of spaces and newlines, Unicode
# spaces (NBSP, U+3000, the U+001C separators that str.isspace calls space), digits, marks,
# CJK (letters), emoji and NUL (neither), and the special token split anywhere.
EDGES = [*"ab 'sltvdmre\n\t0123456789.,!?-_()\u00a0\u3000\x1c\x00今天🙂é\u0301<|>",
         "<|endoftext|>", "'ll", "'ve", "'re", " 's", "  ", "\n\n", "I'", "x1", "1x", "<|endo",
         "ftext|>", "٣", "Ⅻ"]
EDGE_TEXT = st.lists(st.sampled_from(EDGES), min_size=1, max_size=40).map("".join)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=EDGE_TEXT, repeat=st.integers(1, 30), limit=st.integers(1, 40),
       special=st.booleans())
def test_a_bounded_prefix_tokenizes_as_the_whole_text(r50k, text, repeat, limit, special):
    text = text * repeat  # long enough, often, that only a prefix is tokenized
    allowed = {"allowed_special": {tokens.ENDOFTEXT}} if special else {}
    whole = r50k.encode(text, disallowed_special=(), **allowed)
    ids, total = tokens.encode_head(text, limit, allow_special=special)
    assert ids == whole[:limit]
    assert total == len(whole) if total is not None else len(whole) > limit
    assert tokens.count(text, allow_special=special, chunk=7) == len(whole)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=EDGE_TEXT, special=st.booleans(), data=st.data())
def test_every_boundary_found_splits_the_tokens(r50k, text, special, data):
    end = data.draw(st.integers(0, len(text)))
    allowed = {"allowed_special": {tokens.ENDOFTEXT}} if special else {}
    cut = tokens._boundary(text, 0, end, special)
    assert 0 <= cut <= max(end, 0)
    if cut:
        assert (r50k.encode(text[:cut], disallowed_special=(), **allowed)
                + r50k.encode(text[cut:], disallowed_special=(), **allowed)
                == r50k.encode(text, disallowed_special=(), **allowed))


@pytest.mark.slow
def test_max_length_bounds_what_is_tokenized(runner, monkeypatch, tmp_path, r50k):
    """A 4 MB text cut to 10 tokens: tiktoken sees a few hundred characters, not 4 MB, and the
    number of tokens cut is counted only for the JSON that reports it."""
    seen: list[int] = []
    encode = tokens.encode

    def watched(text, **kwargs):
        seen.append(len(text))
        return encode(text, **kwargs)

    monkeypatch.setattr(tokens, "encode", watched)
    text = "The cat sat on the mat. " * 170_000
    (tmp_path / "big.txt").write_text(text)
    args = ["trace", "--file", str(tmp_path / "big.txt"), "--max-length", "10",
            "--d-model", "8", "--heads", "2", "--layers", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "--max-length 10 cut text 0" in result.stderr
    assert seen and max(seen) < 1_000, seen
    seen.clear()
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    inp = json.loads(result.stdout)["inputs"][0]
    assert inp["length"] == 10
    assert inp["truncated"] == len(r50k.encode_ordinary(text)) - 10
    assert max(seen) <= (1 << 20) + 100  # counted a chunk at a time


def test_a_text_beyond_the_context_is_refused_without_tokenizing_it_all(runner, monkeypatch):
    seen: list[int] = []
    encode = tokens.encode
    monkeypatch.setattr(tokens, "encode",
                        lambda text, **kw: seen.append(len(text)) or encode(text, **kw))
    result = runner.invoke(app, ["trace", "word " * 100_000, "--d-model", "8", "--heads", "2",
                                 "--n-ctx", "16"])
    assert result.exit_code == 2
    assert "text 0 has more tokens than --n-ctx 16; cut it with --max-length 16" in result.stderr
    assert max(seen) < 1_000
