"""The GPT-2 tokenizer, offline, and token labels a person can read.

tiktoken's `get_encoding("gpt2")` downloads its vocabulary on first use. We ship GPT-2's merge
ranks (byte-identical to tiktoken's r50k_base file, checked by hash) and build the encoding
from them, so tokenizing never touches the network or tiktoken's cache directory.
"""

from __future__ import annotations

import binascii
import functools
import gzip
import hashlib
import unicodedata
import zlib
from dataclasses import dataclass
from importlib.resources import files

from attn_tracer.errors import AttnError

RANKS_FILE = "gpt2.tiktoken.gz"
# The hash tiktoken itself expects for r50k_base, whose ranks are GPT-2's.
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k_base pattern (tiktoken_ext/openai_public.py).
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
VOCAB = 50257


@dataclass(frozen=True)
class Token:
    id: int
    text: str  # the readable label, see `label`; a special token's own name (<|endoftext|>)
    bytes: bytes
    special: bool = False  # a control token (<|endoftext|>, <s>), not a piece of text
    added: bool = False  # put before or after the text (its BOS: --bos, or the tokenizer's own)


def load_ranks(data: bytes | None = None) -> dict[bytes, int]:
    """Parse the shipped ranks file, refusing one whose hash is not GPT-2's."""
    if data is None:
        packed = files("attn_tracer.data").joinpath(RANKS_FILE).read_bytes()
        try:
            data = gzip.decompress(packed)
        except (OSError, EOFError, zlib.error) as e:
            # EOFError would otherwise reach Typer, which turns it into a bare Abort.
            raise AttnError(
                f"the bundled GPT-2 vocabulary is corrupted (not a valid gzip file: {e}); "
                "reinstall attn-tracer"
            ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise AttnError(
            f"the bundled GPT-2 vocabulary is corrupted (sha256 {digest[:12]}…, expected "
            f"{RANKS_SHA256[:12]}…); reinstall attn-tracer"
        )
    # Each line is "<base64 token> <rank>", and in this file (its hash just matched) the rank
    # of line i is i: parsed in bulk, since this is on every command's path.
    tokens = data.split()[0::2]
    return dict(zip(map(binascii.a2b_base64, tokens), range(len(tokens)), strict=True))


@functools.cache
def encoding():
    import tiktoken

    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_ranks(),
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
        explicit_n_vocab=VOCAB,
    )


def encode(text: str, *, allow_special: bool = False, enc=None) -> list[int]:
    """Token ids of `text`; a literal `<|endoftext|>` is ordinary text unless allowed.

    `enc`: another tiktoken encoding of GPT-2's ranks (one with a checkpoint's extra special
    tokens, model/tokenizer.py); GPT-2's own by default."""
    enc = enc or encoding()
    if allow_special:
        return enc.encode(text, allowed_special=enc.special_tokens_set, disallowed_special=())
    return enc.encode_ordinary(text)


def tokenize(text: str, *, allow_special: bool = False) -> list[Token]:
    return [token(i) for i in encode(text, allow_special=allow_special)]


# ── bounded tokenizing ─────────────────────────────────────────────────────────────────────
#
# A text of megabytes cut to --max-length 10 needs 10 tokens, not millions: tokenizing only a
# prefix bounds the work, provided the prefix ends where the whole text's tokenization has a
# boundary, so that its tokens are exactly the first tokens of the whole.
#
# GPT-2 first splits a text into pieces with GPT2_PATTERN, then merges bytes within each piece;
# a token never spans two pieces. Position p (0 < p < len) is a piece boundary whatever comes
# before or after, when the character before it ends a run that no piece can extend:
#   - a letter (\p{L}) followed by a non-letter: ` ?\p{L}++` stops there, and a contraction
#     ('s 'll 've …) ending in that letter ends there too;
#   - a digit (\p{N}) followed by a non-digit: ` ?\p{N}++` stops there;
#   - ASCII punctuation other than ' followed by a letter or digit: ` ?[^\s\p{L}\p{N}]++` stops.
# No piece's match reads across such a p (no run contains both sides, the pattern has no
# lookbehind, and its lookahead only follows whitespace), so the pieces of text[:p] and of
# text[p:] are those of the whole text. With <|endoftext|> allowed, p must also not fall inside
# one. tests/test_tokens.py checks all this against tiktoken's encoding of the whole text.

_ASCII_PUNCTUATION = frozenset("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~")  # not ': it starts 's 'll


def _boundary(text: str, start: int, end: int, allow_special: bool,
              specials: frozenset[str] = frozenset({ENDOFTEXT})) -> int:
    """The last boundary p with start < p ≤ end (see above), or `start` if the window has none
    (one piece longer than the window: a run of letters with no space, a file of NUL bytes)."""
    for p in range(min(end, len(text) - 1), start, -1):
        before, after = unicodedata.category(text[p - 1])[0], unicodedata.category(text[p])[0]
        ends = ((before == "L" and after != "L") or (before == "N" and after != "N")
                or (text[p - 1] in _ASCII_PUNCTUATION and after in "LN"))
        if ends and not (allow_special and any(_inside_special(text, p, s) for s in specials)):
            return p
    return start


def _inside_special(text: str, p: int, special: str = ENDOFTEXT) -> bool:
    n = len(special)
    at = text.find(special, max(p - n + 1, 0), p + n - 1)
    return at != -1 and at < p


def encode_head(text: str, limit: int, *, allow_special: bool = False, enc=None
                ) -> tuple[list[int], int | None]:
    """(encode(text)[:limit], the number of tokens of the whole text or None if more than
    `limit`), tokenizing only a prefix of the text when that settles it."""
    enc = enc or encoding()
    specials = frozenset(enc.special_tokens_set)
    size = 4 * limit + 64  # GPT-2 averages about 4 characters a token in English, fewer elsewhere
    while size < len(text):
        cut = _boundary(text, 0, size, allow_special, specials)
        if cut:
            ids = encode(text[:cut], allow_special=allow_special, enc=enc)
            if len(ids) >= limit:  # text[cut:] is not empty: it has at least one more token
                return ids[:limit], None
        size *= 4
    ids = encode(text, allow_special=allow_special, enc=enc)
    return ids[:limit], len(ids)


def count(text: str, *, allow_special: bool = False, chunk: int = 1 << 20, enc=None) -> int:
    """len(encode(text)), a chunk at a time: memory holds one chunk's ids, not the whole list."""
    enc = enc or encoding()
    specials = frozenset(enc.special_tokens_set)
    total, start = 0, 0
    while len(text) - start > chunk:
        cut = _boundary(text, start, start + chunk, allow_special, specials)
        if cut == start:  # one piece longer than the chunk
            chunk *= 2
            continue
        total += len(encode(text[start:cut], allow_special=allow_special, enc=enc))
        start = cut
    return total + len(encode(text[start:], allow_special=allow_special, enc=enc))


def token(token_id: int) -> Token:
    raw = encoding().decode_single_token_bytes(token_id)
    if token_id == ENDOFTEXT_ID:
        return Token(token_id, ENDOFTEXT, raw, special=True)
    return Token(token_id, label(raw), raw)


def id_token(token_id: int) -> Token:
    """A token given by its id (--ids): GPT-2's label where the id is one of GPT-2's, else
    `<id N>` (a checkpoint's vocabulary may be another tokenizer's or larger)."""
    if 0 <= token_id < VOCAB:
        return token(token_id)
    return Token(token_id, f"<id {token_id}>", b"")


# Whitespace a reader must see: a leading space is most of GPT-2's tokens.
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍", "\x7f": "␡"}


def label(raw: bytes) -> str:
    """A label that is exact and readable for one token's bytes.

    Whole characters are shown as themselves; bytes of a character split across tokens (common
    for CJK and emoji, since GPT-2 is byte-level) are shown as hex, e.g. `<e5 a4>`, instead of
    the `�` a plain decode gives; whitespace and invisible characters are made visible.
    """
    # surrogateescape keeps each undecodable byte as a lone surrogate we can spot and print.
    decoded = raw.decode("utf-8", errors="surrogateescape")
    out: list[str] = []
    stray: list[int] = []
    for ch in decoded:
        if 0xDC80 <= ord(ch) <= 0xDCFF:
            stray.append(ord(ch) - 0xDC00)
            continue
        if stray:
            out.append(_hex(stray))
            stray = []
        out.append(_visible(ch))
    if stray:
        out.append(_hex(stray))
    return "".join(out)


def _hex(values: list[int]) -> str:
    return "<" + " ".join(f"{v:02x}" for v in values) + ">"


def _visible(ch: str) -> str:
    if ch in _VISIBLE:
        return _VISIBLE[ch]
    code = ord(ch)
    if code < 0x20:
        return chr(0x2400 + code)  # the Control Pictures block: ␀ … ␟
    category = unicodedata.category(ch)
    if category in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn") or (
        category == "Zs" and ch != " "
    ) or ch == "\ufffd":  # a literal U+FFFD must not look like a failed decode
        return f"<U+{code:04X}>"
    if 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF:
        # A variation selector only picks how the character before it is drawn (❤️ vs ❤);
        # alone it is invisible, and a dotted circle would claim a mark that is not there.
        return f"<U+{code:04X}>"
    if category.startswith("M"):
        return "◌" + ch  # a combining mark alone needs a base to be seen
    return ch


def split_characters(tokens: list[Token]) -> list[str]:
    """For each token that holds only part of a character, the character(s) it is part of.

    The hex label alone is exact but does not let a reader map `<e4 bb>` back to 今; seen
    in the context of the whole text, the split character can be named. Empty for tokens
    made of whole characters.
    """
    whole = b"".join(t.bytes for t in tokens)
    # Byte span of each character of the whole text.
    char_spans: list[tuple[int, int, str]] = []
    offset = 0
    for ch in whole.decode("utf-8", errors="surrogateescape"):
        size = 1 if 0xDC80 <= ord(ch) <= 0xDCFF else len(ch.encode("utf-8"))
        char_spans.append((offset, offset + size, ch))
        offset += size
    out = []
    start = 0
    first = 0  # the first character that ends after `start`: one pass, not one per token
    for t in tokens:
        end = start + len(t.bytes)
        while first < len(char_spans) and char_spans[first][1] <= start:
            first += 1
        split = []
        i = first
        while i < len(char_spans) and char_spans[i][0] < end:
            a, b, ch = char_spans[i]
            if (a < start or b > end) and not 0xDC80 <= ord(ch) <= 0xDCFF:
                split.append(ch)
            i += 1
        out.append("".join(_visible(ch) for ch in split))  # a zero-width joiner is seen too
        start = end
    return out
