"""Which tokenizer a run uses, and one interface to it: text → ids → readable tokens.

    random weights, or a checkpoint without tokenizer files  → GPT-2's (tiktoken, shipped)
    a checkpoint whose tokenizer.json is provably GPT-2's     → GPT-2's (tiktoken), said so
    any other tokenizer.json (its folder, or its cache snapshot) → that file, through Hugging
                                                                Face's `tokenizers` (an extra)

"Provably GPT-2's": a byte-level BPE with GPT-2's pre-tokenizer, no normalizer, a post-processor
that adds nothing, GPT-2's 50,257-entry vocabulary and its 50,000 merges (each compared by hash
with what the shipped ranks give); extra special tokens after GPT-2's own (GPT-J's) are
allowed. Then tiktoken gives exactly the ids `tokenizers` would, faster, and
without the optional package.

Every label is made by tokens.label from the bytes a token stands for, so every tokenizer's
tokens read alike: SentencePiece's ▁ is a space (shown ␣), a byte-fallback token <0x0A> is the
byte it holds (↵), a piece of a character is its bytes (`<e4 bb>`), and a special token keeps
its name (<s>) and is marked special. The tokens a tokenizer puts around every text (Llama's
BOS) are added as it adds them, marked `added`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

from attn_tracer.errors import AttnError, UsageError
from attn_tracer.model import tokens
from attn_tracer.model.tokens import Token

INSTALL_TOKENIZERS = 'pip install "attn-tracer[tokenizers]"'
TOKENIZER_FILE = "tokenizer.json"
# sha256 of GPT-2's 50,000 merges, one "a b" per line joined by "\n" (the merges.txt of GPT-2,
# less its "#version" line, in the byte-level alphabet). They follow from the shipped ranks
# (merge i makes the token of rank 256 + i; tests/test_tokenizer.py derives them and this
# hash), and the derived list equals the merges.txt that openai-whisper 20230124 ships as
# whisper/assets/gpt2/merges.txt, line for line (checked when this was written).
GPT2_MERGES_SHA256 = "04e3597d7996f292ca9b8b7285ca4d58a6ae171ac47d73fc7140ceb0c7a6bbc0"
# sha256 of GPT-2's vocab.json's tokens in id order, written as one JSON array (ensure_ascii
# off): the shipped ranks give it (tests/test_tokenizer.py recomputes it), and it equals
# openai-whisper 20230124's whisper/assets/gpt2/vocab.json (checked when this was written).
# A hash, not a comparison with a dict built from the ranks: that costs 0.2 s and 30 MB.
GPT2_VOCAB_SHA256 = "3eec753ec2898a20d38172a5e4488c7612b730d67ef26d18bbdb2722c51a8c1d"
_MAX_TOKENIZER = 256_000_000  # Llama 3's tokenizer.json is 9 MB, Gemma's 33 MB
_MAX_CONFIG = 1_000_000
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|endoftext|>")


class Tokenizer:
    """What every tokenizer answers. `encode` gives a text's own tokens; `added` the ids the
    tokenizer puts before (`prefix`) and after (`suffix`) every text."""

    library = ""  # "tiktoken" or "tokenizers"
    file: Path | None = None  # the tokenizer.json read, if any
    vocab = 0  # ids run from 0 to vocab - 1
    pad_id = 0
    bos_id: int | None = None  # what --bos puts first
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    who = "the tokenizer"  # in sentences: "the pieces of one character that {who} split"
    special_names = "special tokens"  # --allow-special reads these in the text

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_head(self, text: str, limit: int, *, allow_special: bool = False
                    ) -> tuple[list[int], int | None]:
        """(encode(text)[:limit], len(encode(text)) or None if more than `limit`)."""
        ids = self.encode(text, allow_special=allow_special)
        return ids[:limit], len(ids)

    def count(self, text: str, *, allow_special: bool = False) -> int:
        return len(self.encode(text, allow_special=allow_special))

    def token(self, token_id: int) -> Token:
        raise NotImplementedError

    def label(self, token_id: int) -> str:
        """A token's label; ids past the tokenizer's (a vocabulary padded to 50304) have none."""
        return self.token(token_id).text if token_id < self.vocab else f"<unused {token_id}>"

    def added(self, token_id: int) -> Token:
        t = self.token(token_id)
        return Token(t.id, t.text, t.bytes, special=t.special, added=True)

    def tokenize(self, text: str, *, allow_special: bool = False) -> list[Token]:
        """The text's tokens as the model sees them: with what the tokenizer adds around it."""
        return ([self.added(i) for i in self.prefix]
                + [self.token(i) for i in self.encode(text, allow_special=allow_special)]
                + [self.added(i) for i in self.suffix])

    def describe(self) -> str:
        raise NotImplementedError

    def short(self) -> str:
        """describe() without the path, for a title line."""
        if self.library == "tiktoken":
            return "GPT-2's (tiktoken)"
        return f"{self.name}, tokenizers"

    def notes(self, toks: list[Token]) -> list[str]:
        """What a token list cannot say by itself: which tokens this tokenizer put around the
        text (Llama's BOS), and which are special tokens read from the text."""
        out = []
        if any(t.added and (t.id in self.prefix or t.id in self.suffix) for t in toks):
            where = [*([f"{' '.join(map(self.label, self.prefix))} before"] if self.prefix
                       else []),
                     *([f"{' '.join(map(self.label, self.suffix))} after"] if self.suffix
                       else [])]
            out.append(f"{' and '.join(where)} every text: added by the tokenizer, as the "
                       "model saw its texts in training")
        named = list(dict.fromkeys(t.text for t in toks if t.special and not t.added))
        if named:
            out.append(f"{' '.join(named)}: special token{'s' if len(named) > 1 else ''} "
                       "(--allow-special), not text")
        return out

    def to_json(self) -> dict:
        return {"library": self.library, "name": self.name,
                "file": None if self.file is None else str(self.file),
                "vocab": self.vocab, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "adds": {"before": list(self.prefix), "after": list(self.suffix)}}

    @property
    def name(self) -> str:
        raise NotImplementedError

    def bos_text(self) -> str:
        return self.label(self.bos_id) if self.bos_id is not None else ""

    def pad_text(self) -> str:
        return self.label(self.pad_id)


class GPT2(Tokenizer):
    """GPT-2's tokenizer through tiktoken (tokens.py): bounded tokenizing, shipped ranks."""

    library = "tiktoken"
    who = "GPT-2"

    def __init__(self, file: Path | None = None, extra: dict[str, int] | None = None,
                 pad_id: int = tokens.ENDOFTEXT_ID, bos_id: int = tokens.ENDOFTEXT_ID) -> None:
        self.file = file  # a tokenizer.json proven GPT-2's
        self.extra = dict(extra or {})  # special tokens past GPT-2's own (GPT-J's)
        self.vocab = max([tokens.VOCAB - 1, *self.extra.values()]) + 1
        self.pad_id, self.bos_id = pad_id, bos_id
        self._names = {i: s for s, i in self.extra.items()}
        self.special_names = "<|endoftext|>" if not self.extra else "special tokens"

    @functools.cached_property
    def _encoding(self):
        if not self.extra:
            return tokens.encoding()
        import tiktoken

        return tiktoken.Encoding(name="gpt2+", pat_str=tokens.GPT2_PATTERN,
                                 mergeable_ranks=tokens.load_ranks(),
                                 special_tokens={tokens.ENDOFTEXT: tokens.ENDOFTEXT_ID,
                                                 **self.extra})

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        return tokens.encode(text, allow_special=allow_special, enc=self._encoding)

    def encode_head(self, text, limit, *, allow_special=False):
        return tokens.encode_head(text, limit, allow_special=allow_special, enc=self._encoding)

    def count(self, text, *, allow_special=False):
        return tokens.count(text, allow_special=allow_special, enc=self._encoding)

    def token(self, token_id: int) -> Token:
        if token_id in self._names:
            name = self._names[token_id]
            return Token(token_id, name, name.encode(), special=True)
        return tokens.token(token_id)

    @property
    def name(self) -> str:
        return "gpt2"

    def describe(self) -> str:
        if self.file is None:
            return "GPT-2's tokenizer (tiktoken)"
        return f"GPT-2's tokenizer (tiktoken): {self.file} has GPT-2's vocabulary and merges"


class HuggingFace(Tokenizer):
    """A checkpoint's own tokenizer.json, through the `tokenizers` package."""

    library = "tokenizers"

    def __init__(self, file: Path, doc: dict, text: str, model_config: dict) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise AttnError(f"{file} needs Hugging Face's tokenizers package, which is not "
                            f"installed: {INSTALL_TOKENIZERS}") from None
        try:
            self._tok = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exceptions with its own message
            raise AttnError(f"cannot read {file}: {_first_line(e)}") from None
        self._tok.no_truncation()  # a tokenizer.json may carry both; attn cuts and pads itself
        self._tok.no_padding()
        self.file = file
        model = doc.get("model") or {}
        self.model = str(model.get("type") or "?")
        self.byte_fallback = bool(model.get("byte_fallback"))
        self.byte_level = _has(doc, "ByteLevel")
        self.space_marks = _space_marks(doc)
        self.specials = {t["id"]: t["content"] for t in doc.get("added_tokens") or []
                         if isinstance(t, dict) and t.get("special") and isinstance(t.get("id"),
                                                                                     int)}
        self.vocab = self._tok.get_vocab_size(with_added_tokens=True)
        self._cache: dict[int, Token] = {}
        self.prefix, self.suffix = self._around()
        self.bos_id = _config_id(model_config, "bos_token_id", self.vocab)
        if self.bos_id is None and self.prefix and self.prefix[0] in self.specials:
            self.bos_id = self.prefix[0]
        self.pad_id = self._pad(doc, model_config)

    @property
    def name(self) -> str:
        return f"{self.model} ({TOKENIZER_FILE})"

    def describe(self) -> str:
        parts = [self.model, *(["byte fallback"] if self.byte_fallback else []),
                 f"{self.vocab:,} tokens"]
        return f"{self.file} ({', '.join(parts)}; tokenizers)"

    def _around(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ids the post-processor puts around a text: found from one probe text."""
        self._tok.encode_special_tokens = True
        body = self._tok.encode("a", add_special_tokens=False).ids
        whole = self._tok.encode("a", add_special_tokens=True).ids
        for at in range(len(whole) - len(body) + 1):
            if whole[at:at + len(body)] == body:
                return tuple(whole[:at]), tuple(whole[at + len(body):])
        raise AttnError(f"{self.file}: its post-processor changes a text's own tokens, not only "
                        "adds tokens around them; attn cannot follow it")

    def _pad(self, doc: dict, model_config: dict) -> int:
        if (pad := _config_id(model_config, "pad_token_id", self.vocab)) is not None:
            return pad
        padding = doc.get("padding")
        if isinstance(padding, dict) and isinstance(padding.get("pad_id"), int) and \
                0 <= padding["pad_id"] < self.vocab:
            return padding["pad_id"]
        for name in _PAD_NAMES:
            for i, content in self.specials.items():
                if content == name:
                    return i
        eos = _config_id(model_config, "eos_token_id", self.vocab)
        for candidate in (eos, self.bos_id, *self.suffix):
            if candidate is not None:
                return candidate
        return 0

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        # encode_special_tokens: a special token's name in the text is ordinary text unless
        # --allow-special, as a literal <|endoftext|> is for GPT-2.
        self._tok.encode_special_tokens = not allow_special
        return self._tok.encode(text, add_special_tokens=False).ids

    def token(self, token_id: int) -> Token:
        if (cached := self._cache.get(token_id)) is not None:
            return cached
        if token_id in self.specials:
            name = self.specials[token_id]
            t = Token(token_id, name, name.encode(), special=True)
        else:
            piece = self._tok.id_to_token(token_id)
            if piece is None:
                t = Token(token_id, f"<unused {token_id}>", b"")
            else:
                raw = self.piece_bytes(piece)
                t = Token(token_id, tokens.label(raw), raw)
        self._cache[token_id] = t
        return t

    def piece_bytes(self, piece: str) -> bytes:
        """The bytes of text a vocabulary entry stands for."""
        if self.byte_fallback and (m := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(m.group(1), 16)])
        if self.byte_level:
            chars = _byte_chars()
            if all(c in chars for c in piece):
                return bytes(chars[c] for c in piece)
        for mark in self.space_marks:
            piece = piece.replace(mark, " ")
        return piece.encode("utf-8", errors="surrogatepass")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _walk(node):
    """Every component object of a tokenizer.json section (Sequence nests them)."""
    if isinstance(node, dict):
        yield node
        for key in ("pretokenizers", "decoders", "normalizers", "processors"):
            for child in node.get(key) or []:
                yield from _walk(child)


def _has(doc: dict, kind: str) -> bool:
    return any(part.get("type") == kind for section in ("pre_tokenizer", "decoder")
               for part in _walk(doc.get(section)))


def _space_marks(doc: dict) -> list[str]:
    """The characters that stand for a space: Metaspace's ▁, or what a Replace decoder turns
    into " " (Llama 2's tokenizer.json writes ▁ that way)."""
    marks = []
    for section in ("pre_tokenizer", "decoder"):
        for part in _walk(doc.get(section)):
            if part.get("type") == "Metaspace":
                marks.append(part.get("replacement") or "▁")
            if part.get("type") == "Replace" and part.get("content") == " ":
                pattern = part.get("pattern") or {}
                if isinstance(pattern.get("String"), str) and pattern["String"]:
                    marks.append(pattern["String"])
    return list(dict.fromkeys(marks))


def _config_id(config: dict, key: str, vocab: int) -> int | None:
    value = config.get(key)
    if isinstance(value, list) and value:  # Llama 3.1 lists several end tokens
        value = value[0]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab:
        return value
    return None


@functools.cache
def _byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character → byte (bytes_to_unicode, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@functools.cache
def _gpt2_vocab() -> dict[str, int]:
    """GPT-2's vocab.json, from the shipped ranks: each token in the byte-level alphabet → id."""
    to_char = {b: c for c, b in _byte_chars().items()}
    vocab = {"".join(to_char[b] for b in raw): rank for raw, rank in tokens.load_ranks().items()}
    vocab[tokens.ENDOFTEXT] = tokens.ENDOFTEXT_ID
    return vocab


def vocab_hash(vocab: dict) -> str | None:
    """sha256 of the tokens in id order as one JSON array; None unless the ids are exactly
    0 … len - 1, each once."""
    if not all(isinstance(i, int) for i in vocab.values()):
        return None
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        return None
    keys = json.dumps([k for k, _ in ordered], ensure_ascii=False)
    return hashlib.sha256(keys.encode("utf-8", errors="surrogatepass")).hexdigest()


def merges_hash(merges: list) -> str | None:
    """sha256 of merges written as "a b" lines (tokenizer.json writes a merge as "a b" or as
    ["a", "b"]); None when one is neither."""
    lines = []
    for m in merges:
        if isinstance(m, str):
            lines.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            lines.append(f"{m[0]} {m[1]}")
        else:
            return None
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def gpt2_specials(doc: dict) -> dict[str, int] | None:
    """The special tokens past <|endoftext|> when the tokenizer.json is provably GPT-2's (see
    the module's docstring), else None."""
    model = doc.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return None
    vocab, merges = model.get("vocab"), model.get("merges")
    if not (isinstance(vocab, dict) and len(vocab) == tokens.VOCAB and isinstance(merges, list)
            and len(merges) == tokens.VOCAB - 257):
        return None
    if model.get("dropout") is not None or model.get("byte_fallback") or model.get("fuse_unk"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    if doc.get("normalizer") is not None:
        return None
    pre = doc.get("pre_tokenizer")
    if not (isinstance(pre, dict) and pre.get("type") == "ByteLevel"
            and not pre.get("add_prefix_space") and pre.get("use_regex", True)):
        return None
    post = doc.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel" and not _adds_nothing(post):
        return None
    extra: dict[str, int] = {}
    for t in doc.get("added_tokens") or []:
        if not isinstance(t, dict) or any(t.get(k) for k in ("lstrip", "rstrip", "single_word")):
            return None
        content, i = t.get("content"), t.get("id")
        if not isinstance(content, str) or not isinstance(i, int):
            return None
        if i == tokens.ENDOFTEXT_ID and content == tokens.ENDOFTEXT:
            continue
        if i < tokens.VOCAB or not t.get("special") or content in extra:
            return None  # a token in GPT-2's range renamed, or an added non-special token
        extra[content] = i
    if vocab_hash(vocab) != GPT2_VOCAB_SHA256 or merges_hash(merges) != GPT2_MERGES_SHA256:
        return None
    return extra


def _adds_nothing(post: dict) -> bool:
    """A TemplateProcessing whose single-text template is the text alone."""
    return post.get("type") == "TemplateProcessing" and post.get("single") == [
        {"Sequence": {"id": "A", "type_id": 0}}]


# ── which tokenizer ───────────────────────────────────────────────────────────────────────────

@functools.cache
def gpt2() -> GPT2:
    return GPT2()


def of(config) -> Tokenizer:
    """The tokenizer of a run: its checkpoint's (config.weights), or GPT-2's."""
    return for_source(config.weights) if getattr(config, "weights", None) else gpt2()


def for_source(source: str) -> Tokenizer:
    """The tokenizer of a --weights source: its tokenizer.json, or GPT-2's when it has none."""
    from attn_tracer.model.checkpoint import source_folder

    folder = source_folder(source)
    if folder is None:
        return gpt2()
    path = folder / TOKENIZER_FILE
    try:
        stat = path.stat() if path.is_file() else None
    except OSError as e:
        raise AttnError(f"cannot read {path}: {e.strerror or e}") from None
    if stat is None:
        _no_tokenizer_json(folder)
        return gpt2()
    return _load(path, stat.st_mtime_ns, stat.st_size)


def _no_tokenizer_json(folder: Path) -> None:
    """A folder without tokenizer.json: GPT-2's tokenizer, unless it ships another one in a
    form attn does not read."""
    for name, what in (("tokenizer.model", "a SentencePiece tokenizer.model"),
                       ("vocab.json", "its tokenizer as vocab.json and merges.txt")):
        if (folder / name).is_file():
            raise UsageError(
                f"{folder} ships {what} but no {TOKENIZER_FILE}, which is what attn reads; "
                "write one with transformers: AutoTokenizer.from_pretrained(DIR)"
                ".save_pretrained(DIR)")


@functools.lru_cache(maxsize=8)
def _load(path: Path, mtime: int, size: int) -> Tokenizer:
    if size > _MAX_TOKENIZER:
        raise AttnError(f"{path} is over {_MAX_TOKENIZER // 1_000_000} MB: not a tokenizer file")
    try:
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text)
    except OSError as e:
        raise AttnError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise AttnError(f"cannot read {path}: it is not UTF-8 text ({e.reason} at byte "
                        f"{e.start})") from None
    except (ValueError, RecursionError) as e:
        raise AttnError(f"cannot read {path}: it is not JSON ({_first_line(e)})") from None
    if not isinstance(doc, dict):
        raise AttnError(f"cannot read {path}: it is not a JSON object")
    model_config = _model_config(path.parent / "config.json")
    extra = gpt2_specials(doc)
    if extra is not None:
        pad = _config_id(model_config, "pad_token_id", tokens.VOCAB)
        return GPT2(path, extra, pad_id=tokens.ENDOFTEXT_ID if pad is None else pad)
    return HuggingFace(path, doc, text, model_config)


def _model_config(path: Path) -> dict:
    """config.json's token ids (bos, pad, eos), when there is one; {} otherwise."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_CONFIG:
            return {}
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}  # the model loader says what is wrong with it; the tokenizer needs little
    return doc if isinstance(doc, dict) else {}
