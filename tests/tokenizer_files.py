"""tokenizer.json files made in the test with Hugging Face's `tokenizers`, the reference.

- `bpe`: a byte-level BPE trained on the sample texts (GPT-NeoX's and Qwen2's kind), whose
  post-processor puts <|begin_of_text|> first, as Llama 3's does.
- `unigram`: a Unigram over Metaspace pieces with byte fallback (SentencePiece's kind, Llama 2's
  layout: <unk> <s> </s>, then <0x00>…<0xFF>, then the pieces), its pieces learned from English
  and code only, without line breaks: Chinese, emoji and "\\n" then fall back to bytes. Its
  post-processor puts <s> first.
- `gpt2_like`: GPT-2's own vocabulary and merges (from the shipped ranks; the merge derivation
  is checked against the hash tokenizer.py holds), as GPT-Neo's and TinyStories' ship it.
"""

from __future__ import annotations

import json
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "sample_texts"


def sample_texts() -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(SAMPLES.glob("*.txt"))}


def write_config(folder: Path, **ids) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **ids}))


def bpe(folder: Path, vocab_size: int = 600) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_texts().values(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def unigram(folder: Path, vocab_size: int = 700) -> Path:
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    from attn_tracer.model.tokenizer import _byte_chars

    # The pieces: what a byte-level BPE learns from English and code without line breaks, in
    # its order, as SentencePiece writes them (▁ for a space), scored by that order, all near
    # −1 so that fewer pieces win. (Unigram's own trainer is not deterministic from run to
    # run, and the README shows these ids.)
    texts = sample_texts()
    english = [texts[k].replace("\n", " ") for k in ("english_paragraph", "code.py", "short")]
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learner.train_from_iterator(english, trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    chars = _byte_chars()
    learned = sorted(learner.get_vocab().items(), key=lambda item: item[1])
    pieces = []
    for piece, _ in learned:
        raw = bytes(chars[c] for c in piece)
        if all(0x20 <= b < 0x7F for b in raw):  # printable ASCII: the rest falls back to bytes
            pieces.append(raw.decode().replace(" ", "▁"))
    vocab = ([("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
             + [(f"<0x{b:02X}>", -100.0) for b in range(256)]
             + [(p, -1.0 - i / 10_000) for i, p in enumerate(dict.fromkeys(pieces))])
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def gpt2_merges() -> list[tuple[bytes, bytes]]:
    """GPT-2's merges from its ranks: the token of rank r ≥ 256 is what BPE with only the
    ranks below r makes of its bytes in one last merge; that merge's two halves."""
    from attn_tracer.model import tokens

    ranks = tokens.load_ranks()
    by_rank = sorted(ranks, key=ranks.__getitem__)
    out = []
    for r in range(256, len(by_rank)):
        parts = [by_rank[r][i:i + 1] for i in range(len(by_rank[r]))]
        while len(parts) > 2:
            best = min((ranks.get(parts[i] + parts[i + 1], r), i) for i in range(len(parts) - 1))
            if best[0] >= r:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2, (r, parts)
        out.append((parts[0], parts[1]))
    return out


def gpt2_like(folder: Path, extra: list[str] = ()) -> Path:
    """GPT-2's tokenizer.json, written as transformers' GPT2TokenizerFast saves it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    from attn_tracer.model.tokenizer import _byte_chars, _gpt2_vocab

    to_char = {b: c for c, b in _byte_chars().items()}
    text = lambda raw: "".join(to_char[b] for b in raw)  # noqa: E731
    vocab = {k: v for k, v in _gpt2_vocab().items()}
    merges = [(text(a), text(b)) for a, b in gpt2_merges()]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True), *(
        AddedToken(t, special=True) for t in extra)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"
