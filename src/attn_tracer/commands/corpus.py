"""`attn heads --corpus PATH`: the head scores of many texts, streamed, resumable, sharded.

The order of a corpus run, written down once:

    records (lines, JSON lines, files) → windows of WINDOW × --batch-size records
      → (this shard's windows only) decode → tokenize → sort by length → batches
      → forward with the HeadScorer hooks → each text's scores → Statistics (analysis/corpus.py)
      → every --state-every batches: the state file, atomically → the view or --json

A window is the unit of everything that must not depend on how the work is split: batches
are formed inside a window (texts of similar lengths together, so little padding), a shard
takes every N-th window, and the state records a position (window, batch). So a text lands in
the same batch, padded the same, in one run, in a shard, after a resume and on a Ray worker,
and its scores are the same numbers bit for bit; only the order in which partial means are
combined differs (float64 rounding, relative 1e-16).

Memory stays flat in the number of texts: one window of texts, one batch of activations, the
running statistics and the top-K heaps.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from attn_tracer.errors import AttnError, UsageError

WINDOW = 8  # batches per window: the span over which texts are sorted by length
STATE_SCHEMA = "attn-heads-state/1"
BAD_SHOWN = 5  # bad lines named in the notice (all are counted)


@dataclass
class CorpusOptions:
    """The options of `attn heads --corpus`."""

    corpus: str | None = None
    text_field: str | None = None
    batch_size: int = 16
    examples: int = 5
    state: Path | None = None
    state_every: int = 20
    shard: str | None = None
    ray: bool = False
    workers: int | None = None
    skip_bad: bool = False

    def given(self) -> list[str]:
        """The corpus-only options given (refused without --corpus)."""
        d = CorpusOptions()
        flags = (("--text-field", self.text_field != d.text_field),
                 ("--batch-size", self.batch_size != d.batch_size),
                 ("--examples", self.examples != d.examples),
                 ("--state", self.state is not None),
                 ("--state-every", self.state_every != d.state_every),
                 ("--shard", self.shard is not None), ("--ray", self.ray),
                 ("--workers", self.workers is not None), ("--skip-bad", self.skip_bad))
        return [flag for flag, on in flags if on]


# ── reading the corpus ────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class Record:
    index: int  # the record's place in the corpus, from 0: its line - 1, or its file's rank
    source: str  # the file it comes from (- for standard input)
    line: int | None  # its line number (None: a whole file of a folder)
    raw: bytes


class BadRecord(Exception):
    pass


def corpus_kind(spec: str, text_field: str | None) -> str:
    """txt (one text per line), jsonl (one JSON object per line) or folder (a text per file)."""
    if spec == "-":
        return "jsonl" if text_field is not None else "txt"
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--corpus {spec}: no such file or folder")
    if path.is_dir():
        kind = "folder"
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        kind = "jsonl"
    else:
        kind = "txt"
    if text_field is not None and kind != "jsonl":
        raise UsageError(f"--text-field names the field of a .jsonl corpus; {spec} is "
                         + ("a folder of .txt files" if kind == "folder" else
                            "read as text, one per line (name it .jsonl for JSON lines)"))
    return kind


def folder_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
    return files


def read_records(spec: str, kind: str) -> Iterator[Record]:
    """Every record of the corpus, lazily; nothing is decoded here."""
    if kind == "folder":
        for i, p in enumerate(folder_files(Path(spec))):
            yield Record(i, p.name, None, _read_bytes(p))
        return
    if spec == "-":
        yield from _lines(sys.stdin.buffer, "-")
        return
    try:
        f = open(spec, "rb")  # noqa: SIM115 - closed below, also when the caller stops early
    except OSError as e:
        raise AttnError(f"--corpus {spec}: {e.strerror or e}") from None
    try:
        yield from _lines(f, Path(spec).name)
    finally:
        f.close()


def _read_bytes(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise AttnError(f"--corpus {p}: {e.strerror or e}") from None


def _lines(f, source: str) -> Iterator[Record]:
    for i, raw in enumerate(f):
        yield Record(i, source, i + 1, raw.removesuffix(b"\n").removesuffix(b"\r"))


def count_records(spec: str, kind: str) -> int | None:
    """How many records the corpus holds, when that is cheap to know (not standard input)."""
    if spec == "-":
        return None
    if kind == "folder":
        return len(folder_files(Path(spec)))
    n, last = 0, b"\n"
    with open(spec, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def decode(record: Record, kind: str, text_field: str) -> str:
    """The record's text; BadRecord with the reason if it has none."""
    if kind == "jsonl":
        import orjson

        try:
            value = orjson.loads(record.raw)
        except orjson.JSONDecodeError as e:
            raise BadRecord(f"broken JSON ({str(e).split(':')[0]})") from None
        if not isinstance(value, dict):
            raise BadRecord("not a JSON object")
        if text_field not in value:
            raise BadRecord(f"no field {text_field!r} (choose it with --text-field)")
        text = value[text_field]
        if not isinstance(text, str):
            raise BadRecord(f"field {text_field!r} is not a string")
        return text
    try:
        return record.raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(f"invalid UTF-8 (byte 0x{record.raw[e.start]:02x} at byte "
                        f"{e.start + 1})") from None


def where(record: Record) -> str:
    return f"{record.source} line {record.line}" if record.line is not None else record.source


# ── sharding ──────────────────────────────────────────────────────────────────────────────────

def parse_shard(text: str | None) -> tuple[int, int]:
    """--shard i/N → (i, N), 1 ≤ i ≤ N; no --shard: (1, 1)."""
    if text is None:
        return 1, 1
    head, slash, tail = text.partition("/")
    try:
        i, n = int(head), int(tail)
    except ValueError:
        raise UsageError(f"--shard takes i/N (this process's share, 1 to N); got {text!r}"
                         ) from None
    if not (slash and n >= 1 and 1 <= i <= n):
        raise UsageError(f"--shard {text}: i/N needs 1 ≤ i ≤ N")
    return i, n


# ── one batch through the model ───────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class Job:
    """One batch: what a worker needs to score it (token ids), and where it comes from."""

    window: int
    batch: int  # its rank in the window
    index: list[int]  # the texts' corpus indices
    ids: list[list[int]]
    cut: int  # texts of the batch that --max-length (or the context) cut
    info: dict  # corpus index → {source, line, text (a preview)}: the examples' labels


class BatchScorer:
    """Scores every text of a batch alone: (values [scores, layers, heads, batch], thumbnail
    sums, cells drawn, real tokens). The same code in the main process and on a Ray worker."""

    def __init__(self, config, weights, engine, padding: str) -> None:
        self.config, self.weights, self.engine, self.padding = config, weights, engine, padding

    def __call__(self, job: Job):
        from attn_tracer.analysis.corpus import BOX, batch_thumbnails
        from attn_tracer.analysis.head_definitions import SCORES
        from attn_tracer.analysis.heads import HeadScorer, targets
        from attn_tracer.model.pipeline import PAD_ID, Batch, Prepared, run
        from attn_tracer.model.trace import Selection

        c = self.config
        lengths = np.array([len(t) for t in job.ids])
        length = int(lengths.max())
        ids = np.full((len(job.ids), length), PAD_ID, np.int64)
        valid = np.zeros(ids.shape, bool)
        for row, toks in enumerate(job.ids):
            cols = slice(0, len(toks)) if self.padding == "right" else slice(length - len(toks),
                                                                            length)
            ids[row, cols] = toks
            valid[row, cols] = True
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
        batch = Batch([], ids, valid, positions)
        scorer = HeadScorer(targets(ids, valid, c.mask == "causal"), self.engine, c.layers,
                            c.heads, {"corpus": BOX})
        hooks = {f"blocks.{layer}.attn.pattern": scorer.hook(layer) for layer in range(c.layers)}
        run([], c, self.engine, self.weights, Selection((), (), "patterns"),
            prepared=Prepared(batch, None), hooks=hooks)
        values = np.stack([scorer.per_row[s] for s in SCORES]).transpose(0, 1, 3, 2)
        thumbs, drawn, _ = scorer.thumbnail_sets()["corpus"]
        total, count = batch_thumbnails(thumbs, drawn)
        return values, total, count, int(lengths.sum())


# ── the run ───────────────────────────────────────────────────────────────────────────────────

@dataclass
class Counts:
    bad: int = 0
    bad_lines: list[str] = field(default_factory=list)  # the first BAD_SHOWN, as "where: why"
    empty: int = 0
    cut: int = 0
    records: int = 0  # records read, this shard's and the others'

    def copy(self) -> Counts:
        return Counts(self.bad, list(self.bad_lines), self.empty, self.cut, self.records)


@dataclass
class CorpusResult:
    """What the view and the JSON of a corpus run read (render/heads.py)."""

    trace: object  # a stand-in with config, engine, inputs=[], cross=None (the header's)
    stats: object  # analysis.corpus.Statistics
    options: object  # HeadsOptions
    corpus: dict  # source, kind, shards, counts
    seed: int

    @property
    def scores(self) -> dict:
        return self.stats.means()


@dataclass
class _Trace:
    config: object
    engine: dict
    inputs: list = field(default_factory=list)
    cross: None = None


def validate(options, h, c: CorpusOptions) -> None:
    """The corpus options, and what a corpus run cannot combine with (the shared options and
    `attn heads`' own are checked by the session and commands/heads.py)."""
    i = options.input
    if i.texts or i.file is not None or i.lines is not None:
        raise UsageError("give the texts one way: --corpus, or TEXT arguments, --file, --lines")
    if h.repeat is not None:
        raise UsageError("--repeat builds its own input; it cannot be combined with --corpus")
    if i.pad_to is not None:
        raise UsageError("--pad-to conflicts with --corpus: a corpus run pads each batch to its "
                         "longest text")
    if c.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1; got {c.batch_size}")
    if c.examples < 0:
        raise UsageError(f"--examples must be 0 or more; got {c.examples}")
    if c.state_every < 1:
        raise UsageError(f"--state-every must be at least 1 batch; got {c.state_every}")
    if c.workers is not None and c.workers < 1:
        raise UsageError(f"--workers must be at least 1; got {c.workers}")
    if c.workers is not None and not c.ray:
        raise UsageError("--workers sets the number of Ray workers; add --ray")
    parse_shard(c.shard)
    if c.state is not None and c.state.is_dir():
        raise UsageError(f"--state {c.state} is a directory; give a file name")
    if c.state is not None and not c.state.exists():
        from attn_tracer.commands.save import check_target

        check_target(c.state, False, "--state")
    corpus_kind(c.corpus, c.text_field)


def fingerprint(options, h, c: CorpusOptions, kind: str, config) -> dict:
    """What a state's figures depend on: a resume with anything different is refused."""
    i = options.input
    return {
        "model": config.to_dict(),
        "dtype": options.engine.dtype,
        "options": {"batch_size": c.batch_size, "window": WINDOW, "examples": c.examples,
                    "max_length": i.max_length, "padding": i.padding,
                    "allow_special": i.allow_special, "bos": h.with_bos},
        "corpus": {"source": c.corpus, "kind": kind, "text_field": c.text_field or "text"},
    }


def _differs(old: dict, new: dict, prefix: str = "") -> str | None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if (d := _differs(a, b, f"{prefix}{key}.")) is not None:
                return d
        elif a != b:
            return f"{prefix}{key} was {a!r}, this run has {b!r}"
    return None


def load_state(path: Path) -> dict:
    import orjson

    try:
        doc = orjson.loads(path.read_bytes())
    except OSError as e:
        raise AttnError(f"{path}: {e.strerror or e}") from None
    except orjson.JSONDecodeError:
        raise AttnError(f"{path} is not an attn heads state file (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("schema") != STATE_SCHEMA:
        raise AttnError(f"{path} is not an attn heads state file ({STATE_SCHEMA})")
    return doc


def save_state(path: Path, doc: dict) -> None:
    import orjson

    from attn_tracer.commands.save import write_atomic

    write_atomic(path, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))


def execute(r, h, c: CorpusOptions, notice: Callable[[str], None], console: Callable) -> None:
    """`r`: the shared options (a mapping or an object with their fields)."""
    from attn_tracer.commands import output

    views = output.Views(console(), "attn heads", h.svg, h.html, h.width, on_screen=not h.json)
    said: list[str] = []
    try:
        result = compute(r, h, c, said.append)
    finally:
        shutdown_ray()
    shards = result.corpus["shards"]
    if result.stats.n == 0 and shards[1] > 1 and c.state is not None:
        for message in said:
            notice(message)
        notice(f"shard {shards[0]}/{shards[1]} holds no text of the corpus; its state "
               f"{c.state} is saved for attn heads merge")
        return
    finish(result, h, views, said, notice)


def finish(result: CorpusResult, h, views, said: list[str], notice) -> None:
    """The view or the JSON of a finished (or merged) corpus result; notices after it."""
    from attn_tracer.commands import output
    from attn_tracer.render import heads as render_heads

    if result.stats.n == 0:  # one line: the counts are in it
        raise AttnError(f"--corpus {result.corpus['source']} has no text to score"
                        + _why_empty(result.corpus))
    screen, saved = views.render(lambda console, for_files: render_heads.render_corpus(
        result, console))
    for message in said:
        notice(message)
    out = render_heads.corpus_document(result) if h.json else screen.file.getvalue()
    output.emit(out, views.writers(saved))


def _why_empty(corpus: dict) -> str:
    k = corpus["counts"]
    parts = []
    if k["records"] == 0:
        return ": it is empty"
    if k["empty"]:
        parts.append(f"{k['empty']} empty")
    if k["bad"]:
        parts.append(f"{k['bad']} bad (skipped)")
    shards = corpus.get("shards")
    if shards and shards != [1, 1]:
        parts.append(f"none in shard {shards[0]}/{shards[1]}")
    return f": {k['records']} records, {', '.join(parts)}" if parts else ""


def compute(r, h, c: CorpusOptions, notice: Callable[[str], None]) -> CorpusResult:
    """The session's checks and model (no batch: the corpus makes its own), then the stream."""
    from attn_tracer.analysis.corpus import Statistics
    from attn_tracer.commands import heads as heads_command
    from attn_tracer.commands.session import (
        SharedOptions,
        checked_engine,
        ensure_weights,
        open_session,
    )
    from attn_tracer.model import memory

    options = SharedOptions.of(r)

    def check() -> None:
        heads_command.validate(options, h)
        validate(options, h, c)

    session = open_session(options, notice, check=check,
                           ignored=heads_command.ignored(options, h), read_input=False,
                           batch=lambda config: None, bos=h.with_bos)
    config, weights, i = session.config, session.weights, options.input
    kind = corpus_kind(c.corpus, c.text_field)
    shard, shards = parse_shard(c.shard)
    bos = h.with_bos
    # Without --max-length a text longer than the context is cut to it (and counted): a corpus
    # of thousands of texts should not stop at the first long one.
    context = config.n_ctx - bos
    keep = min(i.max_length, context) if i.max_length is not None else context
    length = keep + bos
    needed = memory.estimate(config, options.engine.dtype, c.batch_size, length, length, 0, 0,
                             "patterns", False)
    needed += c.batch_size * length ** 2 * (1 + 3 * 16)  # the scorer's index pairs, blocks
    engine = checked_engine(options.engine, needed, session.limit, length)
    print_ = fingerprint(options, h, c, kind, config)

    stats = Statistics(config.layers, config.heads, c.examples)
    counts = Counts()
    start = (0, 0)
    resumed = None
    if c.state is not None and c.state.exists():
        resumed = load_state(c.state)
        if (why := _differs(resumed["fingerprint"], print_)) is not None:
            raise UsageError(f"--state {c.state} belongs to another run ({why}); give the same "
                             "model, options and corpus, or another --state file")
        if resumed["shard"] != [shard, shards]:
            raise UsageError(f"--state {c.state} is shard {resumed['shard'][0]}/"
                             f"{resumed['shard'][1]}'s, not {shard}/{shards}'s")
        stats = Statistics.from_json(resumed["stats"])
        counts = Counts(**resumed["counts"])
        start = tuple(resumed["position"]["at"])

    engine_info = {"engine": engine.name, "device": engine.device, "dtype": engine.dtype}
    base = {"schema": STATE_SCHEMA, "fingerprint": print_, "shard": [shard, shards],
            "config": config.to_dict(), "engine": engine_info, "seed": options.model.seed}
    corpus_info = {"source": c.corpus, "kind": kind, "text_field": c.text_field or "text"
                   if kind == "jsonl" else None, "shards": [shard, shards]}

    if resumed is None or not resumed["done"]:
        if c.ray:  # each worker builds its own model
            scorer, score = None, _ray_scorer(options, c, engine)
        else:
            scorer = BatchScorer(config, ensure_weights(config, weights), engine, i.padding)
            score = None
        stats, counts = _stream(i, c, kind, (shard, shards), keep, bos, scorer, score,
                                stats, counts, start, resumed, base)
    for message in _notices(i.max_length, counts, config, bos):
        notice(message)
    if resumed is not None and resumed["done"]:
        hasher = hashlib.sha256()
        for _ in _windows(read_records(c.corpus, kind), WINDOW * c.batch_size, hasher):
            pass
        if hasher.hexdigest() != resumed["position"]["sha256"]:
            raise UsageError(f"--state {c.state}: the corpus {c.corpus} is not the one the "
                             "state was made from (its records differ); give the same corpus, "
                             "or another --state file")
        notice(f"--state {c.state} is finished already: its result, without running again")
    corpus_info["counts"] = _counts_json(counts)
    return CorpusResult(_Trace(config, engine_info), stats, h, corpus_info, options.model.seed)


def _counts_json(counts: Counts) -> dict:
    return {"records": counts.records, "empty": counts.empty, "bad": counts.bad,
            "bad_lines": counts.bad_lines, "cut": counts.cut}


def _notices(max_length: int | None, counts: Counts, config, bos: bool) -> list[str]:
    out = []
    if counts.bad:
        shown = "; ".join(counts.bad_lines)
        more = f"; and {counts.bad - len(counts.bad_lines)} more" if counts.bad > BAD_SHOWN else ""
        out.append(f"skipped {counts.bad} bad record{'s' if counts.bad > 1 else ''} "
                   f"(--skip-bad): {shown}{more}")
    if counts.empty:
        out.append(f"skipped {counts.empty} empty record{'s' if counts.empty > 1 else ''} "
                   "(nothing to attend to)")
    if counts.cut:
        how = (f"--max-length {max_length}" if max_length is not None
               else f"the context ({config.n_ctx} tokens{' with --bos' if bos else ''})")
        out.append(f"{how} cut {counts.cut} text{'s' if counts.cut > 1 else ''}")
    return out


def _windows(records: Iterator[Record], size: int, hasher) -> Iterator[tuple[int, str, list]]:
    """(window number, the corpus hash before it, its records), hashing every record."""
    w, chunk = 0, []
    before = hasher.hexdigest()
    for rec in records:
        chunk.append(rec)
        hasher.update(len(rec.raw).to_bytes(8, "little"))
        hasher.update(rec.raw)
        if len(chunk) == size:
            yield w, before, chunk
            w, chunk = w + 1, []
            before = hasher.hexdigest()
    if chunk:
        yield w, before, chunk


@dataclass
class _WindowEnd:
    """After a window's jobs: what its records add to the counts."""

    window: int
    records: int
    empty: int = 0
    bad: list[str] = field(default_factory=list)


def _jobs(window: int, records: list[Record], kind: str, c: CorpusOptions, keep: int,
          bos: bool, allow_special: bool, end: _WindowEnd) -> list[Job]:
    """Decode, tokenize and sort one window's records into its batches."""
    from attn_tracer.analysis.corpus import PREVIEW
    from attn_tracer.model import tokens

    texts = []  # (length, index, ids, cut, the example's record)
    for rec in records:
        try:
            text = decode(rec, kind, c.text_field or "text")
        except BadRecord as e:
            if not c.skip_bad:
                raise AttnError(f"--corpus {where(rec)}: {e}; fix it, or skip bad records "
                                "with --skip-bad") from None
            end.bad.append(f"{where(rec)}: {e}")
            continue
        if not text.strip():
            end.empty += 1
            continue
        ids, total = tokens.encode_head(text, keep, allow_special=allow_special)
        cut = total is None or total > keep
        ids = ([tokens.ENDOFTEXT_ID] if bos else []) + ids[:keep]
        info = {"source": rec.source, "line": rec.line,
                "text": text[:PREVIEW] + ("…" if len(text) > PREVIEW else "")}
        texts.append((len(ids), rec.index, ids, cut, info))
    texts.sort(key=lambda t: (t[0], t[1]))
    jobs = []
    for b, start in enumerate(range(0, len(texts), c.batch_size)):
        part = texts[start:start + c.batch_size]
        jobs.append(Job(window, b, [t[1] for t in part], [t[2] for t in part],
                        sum(t[3] for t in part), {t[1]: t[4] for t in part}))
    return jobs


def _events(c, kind, shard_of, keep, bos, allow_special, start, sha, hasher, seen):
    """The corpus as a stream of this shard's jobs and window ends, from position `start`
    (window, batch) on; `sha`: the corpus hash the state recorded before that window."""
    shard, shards = shard_of
    size = WINDOW * c.batch_size
    for w, before, records in _windows(read_records(c.corpus, kind), size, hasher):
        if w < start[0]:
            continue
        if w == start[0]:
            seen.append(w)
            if sha is not None and before != sha:
                raise UsageError(f"--state {c.state}: the corpus {c.corpus} is not the one the "
                                 "state was made from (its records differ); give the same "
                                 "corpus, or another --state file")
        end = _WindowEnd(w, len(records))
        if w % shards == shard - 1:
            jobs = _jobs(w, records, kind, c, keep, bos, allow_special, end)
            for job in jobs[start[1] if w == start[0] else 0:]:
                yield job, before
        yield end, before


def _scored(events, score, round_size: int):
    """(event, result) in order: the jobs scored in rounds of `round_size` (one for the
    local scorer; for Ray, one Ray Data pipeline per round)."""
    pending = []
    jobs = 0
    for event in events:
        pending.append(event)
        jobs += isinstance(event[0], Job)
        if jobs >= round_size:
            yield from _flush(pending, score)
            pending, jobs = [], 0
    yield from _flush(pending, score)


def _flush(pending, score):
    results = iter(score([e[0] for e in pending if isinstance(e[0], Job)]))
    for event in pending:
        yield event, next(results) if isinstance(event[0], Job) else None


def _stream(i, c, kind, shard_of, keep, bos, scorer, score, stats, counts, start, resumed,
            base):
    hasher = hashlib.sha256()
    total = count_records(c.corpus, kind)
    since_save = 0
    sha = resumed["position"]["sha256"] if resumed is not None else None
    seen: list[int] = []

    def save(position, before, done=False):
        if c.state is None:
            return
        save_state(c.state, {**base, "done": done, "position": {"at": list(position),
                                                                  "sha256": before},
                             "stats": stats.to_json(), "counts": asdict(counts)})

    if score is None:
        def score(jobs):
            return [scorer(j) for j in jobs]

        round_size = 1
    else:
        round_size = 32 * (c.workers or 2)
    events = _events(c, kind, shard_of, keep, bos, i.allow_special, start, sha, hasher, seen)
    with _progress(total, counts.records) as advance:
        for (event, before), result in _scored(events, score, round_size):
            if isinstance(event, _WindowEnd):
                counts.records += event.records
                counts.empty += event.empty
                counts.bad += len(event.bad)
                counts.bad_lines = (counts.bad_lines + event.bad)[:BAD_SHOWN]
                advance(event.records, 0)
                continue
            values, thumb, drawn, n_tokens = result
            stats.add(values, np.array(event.index), n_tokens, event.info, thumb, drawn)
            counts.cut += event.cut
            advance(0, len(event.index), n_tokens)
            since_save += 1
            if since_save >= c.state_every:
                save((event.window, event.batch + 1), before)
                since_save = 0
    if start != (0, 0) and not seen:
        raise UsageError(f"--state {c.state}: the corpus {c.corpus} is shorter than when the "
                         "state was made; give the same corpus, or another --state file")
    save((0, 0), hasher.hexdigest(), done=True)
    return stats, counts


class _Progress:
    def __init__(self, bar, task, total) -> None:
        self.bar, self.task, self.total = bar, task, total
        self.records = self.texts = self.tokens = 0
        self.t0 = time.perf_counter()

    def __call__(self, records: int, texts: int, tokens: int = 0) -> None:
        self.records += records
        self.texts += texts
        self.tokens += tokens
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, completed=self.records,
                        description=f"{self.texts:,} texts · {self.texts / dt:,.1f} texts/s · "
                                    f"{self.tokens / dt:,.0f} tokens/s")


class _progress:
    """A Rich progress bar on stderr (records read, texts/s, tokens/s, the ETA when the number
    of records is known); nothing at all when stderr is not a terminal."""

    def __init__(self, total: int | None, done: int = 0) -> None:
        self.total, self.done = total, done
        self.bar = None

    def __enter__(self):
        if not sys.stderr.isatty():
            return lambda records, texts, tokens=0: None
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.bar.__enter__()
        advance = _Progress(self.bar, self.bar.add_task("starting", total=self.total), self.total)
        advance.records = self.done
        return advance

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


# ── Ray ───────────────────────────────────────────────────────────────────────────────────────

RAY_INSTALL = 'pip install "attn-tracer[ray]"'


def _ray_scorer(options, c: CorpusOptions, engine):
    """A function jobs → results (in order) running the batches as a Ray Data pipeline:
    map_batches over the jobs with one model per worker (an actor pool of --workers)."""
    from importlib.util import find_spec

    if find_spec("ray") is None or find_spec("pyarrow") is None:
        raise AttnError(f"--ray needs Ray Data: {RAY_INSTALL}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the network
    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    import ray

    workers = c.workers or 2
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False, configure_logging=False)
        else:
            # A local cluster of exactly the workers asked for (+1 CPU for the reading task).
            ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
    _RAY_STARTED.append(ray)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # results in job order: the same sums
    ctx.enable_progress_bars = False
    spec = {"model": options.model, "padding": options.input.padding,
            "engine": (engine.name, engine.device, engine.dtype)}

    def score(jobs: list[Job]):
        if not jobs:
            return iter(())
        import pickle

        items = [{"job": pickle.dumps(j)} for j in jobs]
        ds = ray.data.from_items(items).map_batches(
            _RayWorker, batch_size=1, concurrency=min(workers, len(items)), num_cpus=1,
            fn_constructor_kwargs={"spec": spec}, batch_format="numpy")
        out = []
        for row in ds.iter_rows():
            out.append(pickle.loads(row["result"]))
        return iter(out)

    return score


_RAY_STARTED: list = []


def shutdown_ray() -> None:
    while _RAY_STARTED:
        ray = _RAY_STARTED.pop()
        if ray.is_initialized():
            ray.shutdown()


class _RayWorker:
    """One model per Ray worker: built once, then scores one job (one batch) per call."""

    def __init__(self, spec: dict) -> None:
        from attn_tracer.commands import run
        from attn_tracer.commands.session import ensure_weights
        from attn_tracer.model.engine import Engine

        config, weights = run.build_config(spec["model"])
        weights = ensure_weights(config, weights)
        self.scorer = BatchScorer(config, weights, Engine(*spec["engine"]), spec["padding"])

    def __call__(self, batch: dict) -> dict:
        import pickle

        out = []
        for raw in batch["job"]:
            with np.errstate(all="ignore"):
                out.append(pickle.dumps(self.scorer(pickle.loads(raw))))
        return {"result": np.array(out, dtype=object)}


# ── attn heads merge ──────────────────────────────────────────────────────────────────────────

def merge(paths: list[Path], h, notice: Callable[[str], None], console: Callable) -> None:
    """Combine finished shard states into the result of one run over the whole corpus."""
    from attn_tracer.analysis.corpus import Statistics
    from attn_tracer.model.config import Config

    if not paths:
        raise UsageError("attn heads merge needs the state files of the shards")
    docs = []
    for p in paths:
        if not p.is_file():
            raise UsageError(f"{p}: no such state file")
        docs.append((p, load_state(p)))
    first_path, first = docs[0]
    shards = first["shard"][1]
    seen: dict[int, Path] = {}
    for p, d in docs:
        if (why := _differs(first["fingerprint"], d["fingerprint"])) is not None:
            raise AttnError(f"{p} and {first_path} come from different runs ({why})")
        if d["shard"][1] != shards:
            raise AttnError(f"{p} is shard {d['shard'][0]}/{d['shard'][1]}, {first_path} one of "
                            f"{shards}: they come from different splits of the corpus")
        if not d["done"]:
            raise AttnError(f"{p} is not finished: rerun its shard (the same command resumes "
                            "it) before merging")
        i = d["shard"][0]
        if i in seen:
            raise AttnError(f"{p} and {seen[i]} are both shard {i}/{shards}")
        seen[i] = p
    missing = [str(i) for i in range(1, shards + 1) if i not in seen]
    if missing:
        raise AttnError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} of "
                        f"{shards} missing: merge needs the state of every shard")
    docs.sort(key=lambda pd: pd[1]["shard"][0])
    stats = None
    counts = Counts()
    for _, d in docs:
        s = Statistics.from_json(d["stats"])
        if stats is None:
            stats = s
        else:
            stats.merge(s)
        k = d["counts"]
        counts.bad += k["bad"]
        counts.empty += k["empty"]
        counts.cut += k["cut"]
        counts.bad_lines.extend(k["bad_lines"])
        counts.records = max(counts.records, k["records"])
    counts.bad_lines = counts.bad_lines[:BAD_SHOWN]
    config = Config(**first["config"])
    fp = first["fingerprint"]
    corpus = {"source": fp["corpus"]["source"], "kind": fp["corpus"]["kind"],
              "text_field": fp["corpus"]["text_field"] if fp["corpus"]["kind"] == "jsonl"
              else None, "shards": [1, 1], "merged": shards, "counts": _counts_json(counts)}
    h.bos = fp["options"]["bos"]
    result = CorpusResult(_Trace(config, first["engine"]), stats, h, corpus, first["seed"])
    from attn_tracer.commands import output

    views = output.Views(console(), "attn heads", h.svg, h.html, h.width, on_screen=not h.json)
    said = _notices(fp["options"]["max_length"], counts, config, h.bos)
    finish(result, h, views, said, notice)
