"""`attn heads --corpus`: head statistics over many texts, against a per-text reference.

The reference is the definition of the corpus figures, computed the slow way: every text run
alone through `attn heads` (commands/heads.compute, one text a batch, no padding), its scores
collected, and the mean, the sample standard deviation and the top texts taken with NumPy over
the texts, each text weighing 1. The corpus run shares only the per-text scorer with it; the
batching, padding, length buckets, running moments (Chan's update), heaps, shards and state
files are what is tested.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from attn_tracer.analysis.corpus import Statistics
from attn_tracer.analysis.head_definitions import SCORES
from attn_tracer.cli import app

runner = CliRunner()
MODEL = ["--d-model", "32", "--heads", "4", "--layers", "2", "--n-ctx", "128"]
EXACT = [*MODEL, "--dtype", "float64"]
SCHEMA = json.loads(files("attn_tracer.data").joinpath("heads.schema.json").read_text("utf-8"))

# float64 throughout. A text's score is the same computation in both runs except for padding:
# a batch pads the text, which changes the lengths of the sums over keys (masked keys add
# exact zeros, but BLAS may block the products differently), so each per-text score may differ
# by a few float64 roundings of a sum of ≤ 128 terms: ~128 · 2⁻⁵³ ≈ 1.4e-14 for the [0, 1]
# scores, times log₂ 128 = 7 for entropy in bits. The mean of such differences is no larger,
# and Chan's update adds a relative 1e-16 per batch. 1e-9 leaves a margin of 10⁴; a wrong
# weighting (by tokens instead of texts) moves the means by 1e-2.
MEAN_TOL = 1e-9
# Shards, resumes and Ray run each text in the same batch, padded the same: its scores are the
# same bits. Only the order of combining partial moments differs: Chan's merge of k partial
# results errs by a few k · 2⁻⁵³ relative to the values (≤ 7 bits of entropy): < 1e-14.
MERGE_TOL = 1e-12

ENGLISH = ("the cat sat on the mat", "a stitch in time saves nine", "all that glitters is not "
           "gold", "the quick brown fox jumps over the lazy dog", "to be or not to be")
CHINESE = ("学而时习之，不亦说乎", "千里之行，始于足下", "知之为知之，不知为不知，是知也",
           "三人行，必有我师焉")
CODE = ("def add(a, b):\treturn a + b", "for i in range(10): print(i * i)",
        "x = {'key': [1, 2, 3]}  # a dict", "if (x > 0) { y = x; } else { y = -x; }")


def make_corpus(n: int = 240, seed: int = 0) -> list[str]:
    """English, Chinese and code, 1 to ~60 tokens, some repeated within a line (induction)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pool = (ENGLISH, CHINESE, CODE)[i % 3]
        parts = [pool[j] for j in rng.integers(0, len(pool), rng.integers(1, 5))]
        sep = "; " if pool is CODE else " "
        text = sep.join(parts)
        if i % 11 == 0:
            text = text.split(" ")[0][:3]  # a few one- or two-token texts
        out.append(text)
    return out


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "mixed.txt"
    path.write_text("\n".join(make_corpus()) + "\n", encoding="utf-8")
    return path


def run_json(*args: str) -> dict:
    result = runner.invoke(app, ["heads", *args, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def one_run(corpus_file) -> dict:
    return run_json("--corpus", str(corpus_file), *EXACT, "--batch-size", "8",
                    "--examples", "3")


def reference(texts: list[str], k: int = 3):
    """Each text alone through attn heads: mean, std over texts (weight 1 each), top-k."""
    from attn_tracer.commands import heads
    from attn_tracer.commands.run import Request

    per_text = []
    for t in texts:
        r = Request(texts=[t], d_model=32, heads=4, layers=2, n_ctx=128, dtype="float64")
        result = heads.compute(r, heads.HeadsOptions(json=True), lambda m: None)
        per_text.append(np.stack([result.scores[s] for s in SCORES]))  # [scores, layers, heads]
    x = np.stack(per_text, axis=-1)  # [scores, layers, heads, texts]
    index = np.arange(x.shape[-1])
    top = np.empty((*x.shape[:-1], k), np.int64)
    for pos in np.ndindex(x.shape[:-1]):
        top[pos] = sorted(index, key=lambda i: (-x[pos][i], i))[:k]  # ties: the earlier text
    return x.mean(axis=-1), x.std(axis=-1, ddof=1), top, x


def test_means_std_and_top_texts_match_each_text_alone(corpus_file, one_run):
    texts = make_corpus()
    mean, std, top, x = reference(texts)
    doc = one_run
    assert doc["corpus"]["texts"] == len(texts)
    assert doc["corpus"]["weighting"].startswith("each text counts once")
    for i, s in enumerate(SCORES):
        np.testing.assert_allclose(doc["scores"][s], mean[i], rtol=0, atol=MEAN_TOL)
        np.testing.assert_allclose(doc["corpus"]["std"][s], std[i], rtol=0, atol=MEAN_TOL)
        ci = 1.959963984540054 * std[i] / math.sqrt(len(texts))
        np.testing.assert_allclose(doc["corpus"]["ci95"][s], ci, rtol=0, atol=MEAN_TOL)
        for layer in range(2):
            for h in range(4):
                got = doc["examples"][s][layer][h]
                want = top[i, layer, h]
                # The top texts' scores match; their ranks too, unless two texts score within
                # the tolerance (a tie up to rounding may then swap).
                np.testing.assert_allclose([e["score"] for e in got], x[i, layer, h][want],
                                           atol=MEAN_TOL)
                for e, j in zip(got, want, strict=True):
                    if e["index"] != j:
                        assert abs(x[i, layer, h][e["index"]] - x[i, layer, h][j]) < MEAN_TOL
                    else:
                        assert e["line"] == j + 1 and texts[j].startswith(e["text"][:20])
    # A token-weighted mean would differ: the test can tell the weightings apart.
    lengths = np.array([len(t.encode()) for t in texts], float)
    by_length = (x * lengths).sum(axis=-1) / lengths.sum()
    assert np.abs(by_length - mean).max() > 1e-3


def test_document_validates_against_the_schema(one_run):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(one_run, SCHEMA)
    assert one_run["schema"] == "attn-heads/1" and one_run["inputs"] == []
    assert one_run["heads"][0]["name"] == "L0H0" and "ci95" in one_run["heads"][0]


def assert_same(a: dict, b: dict, tol: float = MERGE_TOL) -> None:
    for s in SCORES:
        np.testing.assert_allclose(a["scores"][s], b["scores"][s], rtol=0, atol=tol)
        np.testing.assert_allclose(a["corpus"]["std"][s], b["corpus"]["std"][s], rtol=0,
                                   atol=tol)
    assert a["examples"] == b["examples"]
    for key in ("texts", "tokens", "records", "skipped_empty", "skipped_bad", "cut"):
        assert a["corpus"][key] == b["corpus"][key], key


def test_three_shards_merged_equal_one_run(corpus_file, one_run, tmp_path):
    states = []
    for i in (1, 2, 3):
        state = tmp_path / f"shard{i}.json"
        part = run_json("--corpus", str(corpus_file), *EXACT, "--batch-size", "8",
                        "--examples", "3", "--shard", f"{i}/3", "--state", str(state))
        assert 0 < part["corpus"]["texts"] < one_run["corpus"]["texts"]
        states.append(str(state))
    merged = runner.invoke(app, ["heads", "merge", *reversed(states), "--json"])
    assert merged.exit_code == 0, merged.stderr
    assert_same(json.loads(merged.stdout), one_run)
    missing = runner.invoke(app, ["heads", "merge", *states[:2]])
    assert missing.exit_code == 1 and "shard 3 of 3 missing" in missing.stderr


def test_a_finished_state_is_its_result_and_other_options_are_refused(corpus_file, tmp_path,
                                                                     one_run):
    state = tmp_path / "state.json"
    args = ["--corpus", str(corpus_file), *EXACT, "--batch-size", "8", "--examples", "3",
            "--state", str(state)]
    first = run_json(*args)
    assert_same(first, one_run, 0)
    again = runner.invoke(app, ["heads", *args, "--json"])
    assert again.exit_code == 0 and "finished already" in again.stderr
    assert_same(json.loads(again.stdout), one_run, 0)
    other = runner.invoke(app, ["heads", *args[:-2], "--batch-size", "4", "--state", str(state)])
    assert other.exit_code == 2 and "batch_size was 8, this run has 4" in other.stderr
    seed = runner.invoke(app, ["heads", *args, "--seed", "1"])
    assert seed.exit_code == 2 and "model.seed" in seed.stderr


@pytest.mark.slow
def test_kill_9_midway_then_resume_gives_the_same_result(corpus_file, tmp_path, one_run):
    state = tmp_path / "state.json"
    cmd = [sys.executable, "-m", "attn_tracer", "heads", "--corpus", str(corpus_file), *EXACT,
           "--batch-size", "8", "--examples", "3", "--state", str(state), "--state-every", "1",
           "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = json.loads(state.read_bytes())
    assert not saved["done"] and saved["position"]["at"] != [0, 0], "killed too late"
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same(json.loads(done.stdout), one_run, 0)  # the same numbers, bit for bit


def test_bad_records_stop_the_run_or_are_skipped_and_counted(tmp_path):
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"a good line\nbroken \xff here\n\nanother good line\n")
    stop = runner.invoke(app, ["heads", "--corpus", str(txt), *MODEL])
    assert stop.exit_code == 1 and stop.stdout == ""
    assert "bad.txt line 2: invalid UTF-8 (byte 0xff" in stop.stderr
    assert "--skip-bad" in stop.stderr
    skip = runner.invoke(app, ["heads", "--corpus", str(txt), *MODEL, "--skip-bad", "--json"])
    assert skip.exit_code == 0, skip.stderr
    doc = json.loads(skip.stdout)
    assert (doc["corpus"]["texts"], doc["corpus"]["skipped_bad"],
            doc["corpus"]["skipped_empty"]) == (2, 1, 1)
    assert "skipped 1 bad record (--skip-bad): bad.txt line 2" in skip.stderr
    assert "skipped 1 empty record" in skip.stderr

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": "broken"\n{"body": "no text field"}\n'
                     '{"text": 3}\n{"text": "fine too"}\n', encoding="utf-8")
    stop = runner.invoke(app, ["heads", "--corpus", str(jsonl), *MODEL])
    assert stop.exit_code == 1 and "bad.jsonl line 2: broken JSON" in stop.stderr
    skip = runner.invoke(app, ["heads", "--corpus", str(jsonl), *MODEL, "--skip-bad", "--json"])
    assert skip.exit_code == 0, skip.stderr
    doc = json.loads(skip.stdout)
    assert (doc["corpus"]["texts"], doc["corpus"]["skipped_bad"]) == (2, 3)
    assert "line 3: no field 'text'" in skip.stderr and "line 4: field 'text' is not a string" \
        in skip.stderr
    body = runner.invoke(app, ["heads", "--corpus", str(jsonl), *MODEL, "--skip-bad",
                               "--text-field", "body", "--json"])
    assert json.loads(body.stdout)["corpus"]["texts"] == 1


def test_an_empty_corpus_is_one_line_and_exit_1(tmp_path, one_line_error):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    one_line_error(runner.invoke(app, ["heads", "--corpus", str(empty), *MODEL]), 1,
                   "has no text to score: it is empty")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")
    one_line_error(runner.invoke(app, ["heads", "--corpus", str(blank), *MODEL]), 1,
                   "3 records, 3 empty")


def test_a_folder_and_standard_input(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("second text here", encoding="utf-8")
    (folder / "a.txt").write_text("first text\nwith two lines", encoding="utf-8")
    (folder / "skip.md").write_text("not a .txt", encoding="utf-8")
    doc = run_json("--corpus", str(folder), *MODEL, "--sort", "self")
    assert doc["corpus"]["texts"] == 2 and doc["corpus"]["kind"] == "folder"
    assert {e["source"] for e in doc["examples"]["self"][0][0]} == {"a.txt", "b.txt"}
    result = runner.invoke(app, ["heads", "--corpus", "-", *MODEL, "--json"],
                           input="one text\ntwo texts\n")
    assert result.exit_code == 0 and json.loads(result.stdout)["corpus"]["texts"] == 2


def test_usage_errors(tmp_path, corpus_file, one_line_error):
    one_line_error(runner.invoke(app, ["heads", "--batch-size", "4", "hello"]), 2,
                   "--batch-size works with --corpus")
    one_line_error(runner.invoke(app, ["heads", "--corpus", str(corpus_file), "hello"]), 2,
                   "one way")
    one_line_error(runner.invoke(app, ["heads", "--corpus", str(corpus_file), "--shard",
                                       "4/3"]), 2, "1 ≤ i ≤ N")
    one_line_error(runner.invoke(app, ["heads", "--corpus", str(corpus_file), "--text-field",
                                       "body"]), 2, "--text-field")
    one_line_error(runner.invoke(app, ["heads", "--corpus", str(tmp_path / "nope.txt")]), 2,
                   "no such file")


def test_merge_is_a_subcommand_only_right_after_heads():
    # `attn heads -- merge` is the text "merge", as before; `attn heads merge` merges.
    text = runner.invoke(app, ["heads", *MODEL, "--json", "--", "merge"])
    assert text.exit_code == 0, text.stderr
    assert json.loads(text.stdout)["inputs"][0]["text"] == "merge"
    after = runner.invoke(app, ["heads", *MODEL, "--json", "merge"])
    assert after.exit_code == 0 and json.loads(after.stdout)["inputs"][0]["text"] == "merge"
    merge = runner.invoke(app, ["heads", "merge"])
    assert merge.exit_code == 2 and "STATE" in merge.stderr


def test_without_ray_one_line_says_how_to_install_it(corpus_file, monkeypatch, one_line_error):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    one_line_error(runner.invoke(app, ["heads", "--corpus", str(corpus_file), *MODEL, "--ray"]),
                   1, 'pip install "attn-tracer[ray]"')


@pytest.mark.slow
def test_ray_with_two_local_workers_equals_one_run(corpus_file, one_run):
    pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    cmd = [sys.executable, "-m", "attn_tracer", "heads", "--corpus", str(corpus_file), *EXACT,
           "--batch-size", "8", "--examples", "3", "--ray", "--workers", "2", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=os.pathsep.join(sys.path), RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(json.loads(done.stdout), one_run)


# ── the statistics alone ──────────────────────────────────────────────────────────────────────

def test_chan_updates_and_merges_match_numpy_and_keep_ties_in_corpus_order():
    rng = np.random.default_rng(1)
    x = rng.normal(3, 2, size=(len(SCORES), 2, 3, 500)).round(2)  # rounding makes ties
    whole = Statistics(2, 3, 4)
    parts = [Statistics(2, 3, 4) for _ in range(3)]
    for start in range(0, 500, 37):
        index = np.arange(start, min(start + 37, 500))
        info = {int(i): {"source": "s", "line": int(i) + 1, "text": str(i)} for i in index}
        whole.add(x[..., index], index, len(index), info)
        parts[(start // 37) % 3].add(x[..., index], index, len(index), info)
    merged = parts[0]
    merged.merge(parts[1])
    merged.merge(parts[2])
    for s in (whole, merged):
        assert s.n == 500
        np.testing.assert_allclose(s.mean, x.mean(axis=-1), rtol=0, atol=1e-12)
        np.testing.assert_allclose(s.m2 / 499, x.var(axis=-1, ddof=1), rtol=1e-12)
    np.testing.assert_array_equal(merged.top_index, whole.top_index)
    order = np.lexsort((np.broadcast_to(np.arange(500), x.shape), -x), axis=-1)[..., :4]
    np.testing.assert_array_equal(whole.top_index, order)
    again = Statistics.from_json(json.loads(json.dumps(whole.to_json())))
    np.testing.assert_array_equal(again.mean, whole.mean)
    np.testing.assert_array_equal(again.top_value, whole.top_value)


def test_the_readme_sample_is_what_the_tool_prints(monkeypatch):
    import re
    import shlex

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```\n\$ attn heads (--corpus .+?)\n(.*?)```", readme, re.S)
    assert block, "the README's Many texts sample is missing"
    monkeypatch.chdir(root)  # the command names sample_texts/corpus.txt, as a user types it
    result = runner.invoke(app, ["heads", *shlex.split(block.group(1))],
                           env={"COLUMNS": "100", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.stderr
    actual = "\n".join(line.rstrip() for line in result.stdout.rstrip("\n").splitlines())
    assert actual == block.group(2).rstrip("\n")


def test_a_run_stopped_by_a_bad_record_resumes_once_it_is_fixed(corpus_file, tmp_path, one_run):
    lines = corpus_file.read_text("utf-8").splitlines()
    broken = tmp_path / "mixed.txt"  # the same name: the examples' sources compare equal
    raw = [line.encode() for line in lines]
    raw[200] = b"\xff" + raw[200]  # in window 3 (records 192-255 at --batch-size 8)
    broken.write_bytes(b"\n".join(raw) + b"\n")
    state = tmp_path / "state.json"
    args = ["heads", "--corpus", str(broken), *EXACT, "--batch-size", "8", "--examples", "3",
            "--state", str(state), "--state-every", "1", "--json"]
    stop = runner.invoke(app, args)
    assert stop.exit_code == 1 and "mixed.txt line 201: invalid UTF-8" in stop.stderr
    saved = json.loads(state.read_bytes())
    assert not saved["done"] and saved["position"]["at"][0] == 2  # windows 0-2 are in it
    changed = list(raw)
    changed[5] = b"another text"
    broken.write_bytes(b"\n".join(changed) + b"\n")
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "not the one the state was made from" in refused.stderr
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.stderr
    assert_same(json.loads(resumed.stdout), one_run, 0)
    broken.write_bytes(b"\n".join(changed) + b"\n")
    done = runner.invoke(app, args)  # a finished state checks the whole corpus
    assert done.exit_code == 2 and "not the one the state was made from" in done.stderr
