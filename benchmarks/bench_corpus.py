"""What `attn heads --corpus` costs: memory flat in the number of texts, and its throughput
against a hand-written loop.

    .venv/bin/python benchmarks/bench_corpus.py [--reps N] [--texts N] [--quick]

  m1  peak RSS (the child's ru_maxrss, from os.wait4) of `attn heads --corpus` over 1,000 and
      10,000 texts (sample_texts/corpus.txt's lines, repeated), a small random stack
      (d_model 128, 4 heads, 2 layers): target, the two differ by < 10%.
  m2  GPT-2-small shape (12 layers × 12 heads, d_model 768, random weights written with
      save_pretrained), the same corpus and --batch-size 16, each side a fresh process,
      interleaved, medians: `attn heads --weights DIR --corpus FILE --batch-size 16 --json`
      ÷ a script that loads the directory with Hugging Face `GPT2Model` (eager attention), runs
      the texts in batches of 16 (in file order, right-padded, attention_mask) with
      `output_attentions=True` under `torch.no_grad()`, and computes the seven scores of each
      text in NumPy from the attentions (dense detection patterns, as head_detector.py builds
      them), accumulating their mean. texts/s and tokens/s of each (whole process: model
      load included), and the CPU time (user + system) of each. Target: ≥ 1.0× texts/s.

Before timing, the reference's means are compared with attn's (--json): within 1e-5 (float32
patterns; tests/test_heads.py derives that bound), so a wrong loop cannot look fast.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_heads import attn, checkpoint

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_texts" / "corpus.txt"
BATCH = 16

REFERENCE = r'''
import json, sys
import numpy as np
import torch
from transformers import GPT2Model
from attn_tracer.model import tokens

torch.set_num_threads(int(sys.argv[3]))
path, corpus = sys.argv[1], sys.argv[2]
texts = [line.rstrip("\n") for line in open(corpus, encoding="utf-8") if line.strip()]
model = GPT2Model.from_pretrained(path, attn_implementation="eager").eval()
names = ("previous_token", "duplicate_token", "induction", "first_token", "self", "entropy",
         "entropy_norm")
total = {s: 0.0 for s in names}
n_tok = 0
for start in range(0, len(texts), 16):
    ids = [tokens.encode(t) for t in texts[start:start + 16]]
    L = max(map(len, ids))
    x = torch.tensor([i + [50256] * (L - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i in ids])
    with torch.no_grad():
        att = model(x, attention_mask=mask, output_attentions=True).attentions
    att = np.stack([a.numpy() for a in att], axis=1)  # [batch, layers, heads, len, len]
    for b, i in enumerate(ids):
        n = len(i)
        n_tok += n
        A = att[b, :, :, :n, :n].astype(np.float64)
        tok = np.array(i)
        prev = np.zeros((n, n)); prev[np.arange(1, n), np.arange(n - 1)] = 1
        dup = np.tril((tok[:, None] == tok[None, :]).astype(float), -1)
        ind = np.zeros((n, n)); ind[:, 1:] = dup[:, :-1]; ind = np.tril(ind)
        s = A.sum(axis=(-2, -1))
        total["previous_token"] += (A * prev).sum(axis=(-2, -1)) / s
        total["duplicate_token"] += (A * dup).sum(axis=(-2, -1)) / s
        total["induction"] += (A * ind).sum(axis=(-2, -1)) / s
        total["first_token"] += A[..., :, 0].mean(axis=-1)
        total["self"] += np.diagonal(A, axis1=-2, axis2=-1).mean(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rows = -np.where(A > 0, A * np.log2(A), 0).sum(axis=-1)
        total["entropy"] += rows.mean(axis=-1)
        keys = np.arange(1, n + 1)
        total["entropy_norm"] += np.where(keys > 1, rows / np.log2(np.maximum(keys, 2)),
                                          0).mean(axis=-1)
print(json.dumps({"texts": len(texts), "tokens": n_tok,
                  "scores": {k: (v / len(texts)).tolist() for k, v in total.items()}}))
'''


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, int, bytes]:
    """Wall seconds, CPU seconds (user + system), peak RSS bytes and stdout of a process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])}… failed: {err.read().decode()[-800:]}")
        return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, out.read()


def corpus(path: Path, n: int) -> Path:
    lines = [line for line in SAMPLE.read_text("utf-8").splitlines() if line.strip()]
    path.write_text("\n".join(lines[i % len(lines)] for i in range(n)) + "\n", "utf-8")
    return path


def memory(tmp: Path) -> dict:
    out = {}
    for n in (1_000, 10_000):
        file = corpus(tmp / f"corpus{n}.txt", n)
        cmd = [*attn(), "heads", "--corpus", str(file), "--d-model", "128", "--heads", "4",
               "--layers", "2", "--batch-size", str(BATCH), "--json"]
        seconds, cpu, peak, _ = run_measured(cmd)
        out[n] = {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak / 1e6}
    return out


def throughput(tmp: Path, texts: int, reps: int, threads: int) -> dict:
    model = checkpoint(tmp / "gpt2-small-random")
    file = corpus(tmp / "throughput.txt", texts)
    script = tmp / "reference.py"
    script.write_text(REFERENCE)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    commands = {
        "attn heads --corpus": [*attn(), "heads", "--weights", str(model), "--corpus",
                                str(file), "--batch-size", str(BATCH), "--json"],
        "attn heads --corpus --engine torch": [*attn(), "heads", "--weights", str(model),
                                               "--corpus", str(file), "--batch-size",
                                               str(BATCH), "--engine", "torch", "--json"],
        "HF GPT2Model + NumPy loop": [sys.executable, str(script), str(model), str(file),
                                      str(threads)],
    }
    ours = json.loads(run_measured(commands["attn heads --corpus"], env)[3])
    theirs = json.loads(run_measured(commands["HF GPT2Model + NumPy loop"], env)[3])
    diff = max(abs(a - b) for s in theirs["scores"] for la, lb in
               zip(theirs["scores"][s], ours["scores"][s], strict=True)
               for a, b in zip(la, lb, strict=True))
    if diff > 1e-5 or theirs["texts"] != ours["corpus"]["texts"]:
        raise RuntimeError(f"attn and the reference loop disagree by {diff:.2e}")
    figures = {k: {"seconds": [], "cpu": [], "peak": []} for k in commands}
    for _ in range(reps):
        for name, cmd in commands.items():
            seconds, cpu, peak, _ = run_measured(cmd, env)
            figures[name]["seconds"].append(seconds)
            figures[name]["cpu"].append(cpu)
            figures[name]["peak"].append(peak)
    tokens = ours["corpus"]["tokens"]
    out = {"texts": texts, "tokens": tokens, "max_score_diff": diff, "figures": {}}
    for name, f in figures.items():
        s = statistics.median(f["seconds"])
        out["figures"][name] = {"seconds": s, "cpu_seconds": statistics.median(f["cpu"]),
                                "peak_mb": statistics.median(f["peak"]) / 1e6,
                                "texts_per_s": texts / s, "tokens_per_s": tokens / s,
                                "all_seconds": f["seconds"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of both sides")
    parser.add_argument("--quick", action="store_true", help="one round, 64 texts")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_memory:
            m = memory(tmp)
            a, b = m[1_000]["peak_mb"], m[10_000]["peak_mb"]
            print(f"m1. peak RSS, 1,000 texts {a:.0f} MB vs 10,000 texts {b:.0f} MB: "
                  f"{abs(b - a) / a:.1%} apart (target < 10%)  "
                  f"[{m[1_000]['seconds']:.1f} s / {m[1_000]['cpu_seconds']:.1f} s CPU, "
                  f"{m[10_000]['seconds']:.1f} s / {m[10_000]['cpu_seconds']:.1f} s CPU]")
        t = throughput(tmp, 64 if args.quick else args.texts, 1 if args.quick else args.reps,
                       args.threads)
    ref = t["figures"]["HF GPT2Model + NumPy loop"]
    print(f"m2. GPT-2-small shape, {t['texts']} texts, {t['tokens']} tokens, batch {BATCH}; "
          f"means agree within {t['max_score_diff']:.1e}")
    for name, f in t["figures"].items():
        print(f"  {name:<36} {f['texts_per_s']:7.1f} texts/s {f['tokens_per_s']:8.0f} tokens/s"
              f"  {f['seconds']:6.2f} s wall {f['cpu_seconds']:6.2f} s CPU  "
              f"{f['peak_mb']:5.0f} MB  ({f['texts_per_s'] / ref['texts_per_s']:.2f}×) "
              f"{[round(s, 2) for s in f['all_seconds']]}")


if __name__ == "__main__":
    main()
