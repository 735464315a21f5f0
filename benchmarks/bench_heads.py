"""What `attn heads` costs, whole process, against the obvious way to get the same numbers.

    .venv/bin/python benchmarks/bench_heads.py [--reps N] [--quick]

On a GPT-2-small-shaped checkpoint (12 layers × 12 heads, d_model 768, random weights written
with save_pretrained), each side in a fresh subprocess, interleaved, medians of the rounds:

  h1  `attn heads --weights DIR --file TEXT --max-length 1024` (and with --engine torch) ÷ a
      script that loads the same directory with Hugging Face `GPT2Model` (eager attention),
      runs it with `output_attentions=True` under `torch.no_grad()`, and computes the same seven
      scores from those attentions in NumPy. Wall time and peak RSS (the child's ru_maxrss, from
      os.wait4). Targets: ≤ 1.0× the time, ≤ its memory.
  h2  `attn heads --weights DIR --repeat 50`: wall time, target under 2 s.

Before timing, the reference's scores are compared with attn's (--json): they must agree within
1e-5, so a wrong load cannot look fast. `measure()` returns the figures; benchmarks/run.py
shows them as figure h.
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

ROOT = Path(__file__).resolve().parent.parent
LONG_TEXT = ROOT / "sample_texts" / "long.txt"
LENGTH = 1024

# The reference: HF's forward with every attention returned, then the scores in NumPy, dense, as
# anyone would write them from head_detector.py. It prints the scores as JSON.
REFERENCE = r'''
import json, sys
import numpy as np
import tiktoken  # noqa: F401  (the ids come from attn's tokenizer, passed in)
import torch
from transformers import GPT2Model

path, ids_file = sys.argv[1], sys.argv[2]
ids = json.load(open(ids_file))
model = GPT2Model.from_pretrained(path, attn_implementation="eager").eval()
with torch.no_grad():
    attentions = model(torch.tensor([ids]), output_attentions=True).attentions
tok = np.array(ids)
n = len(ids)
prev = np.zeros((n, n)); prev[np.arange(1, n), np.arange(n - 1)] = 1
dup = np.tril((tok[:, None] == tok[None, :]).astype(float), -1)
ind = np.zeros((n, n)); ind[:, 1:] = dup[:, :-1]
ind = np.tril(ind)
keys = np.arange(1, n + 1)
out = {s: [] for s in ("previous_token", "duplicate_token", "induction", "first_token", "self",
                       "entropy", "entropy_norm")}
for a in attentions:
    A = a[0].numpy()  # [heads, len, len]
    total = A.sum(axis=(1, 2))
    out["previous_token"].append(((A * prev).sum(axis=(1, 2)) / total).tolist())
    out["duplicate_token"].append(((A * dup).sum(axis=(1, 2)) / total).tolist())
    out["induction"].append(((A * ind).sum(axis=(1, 2)) / total).tolist())
    out["first_token"].append(A[:, :, 0].mean(axis=1).tolist())
    out["self"].append(np.diagonal(A, axis1=1, axis2=2).mean(axis=1).tolist())
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = -np.where(A > 0, A * np.log2(A), 0).sum(axis=2)
    out["entropy"].append(rows.mean(axis=1).tolist())
    norm = np.where(keys > 1, rows / np.log2(keys), 0)
    out["entropy_norm"].append(norm.mean(axis=1).tolist())
print(json.dumps(out))
'''


def run_measured(cmd: list[str]) -> tuple[float, int, bytes]:
    """Wall seconds, peak RSS (bytes, the child's ru_maxrss) and stdout of one fresh process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it with its rusage
        elapsed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])}… failed: {err.read().decode()[-600:]}")
        return elapsed, usage.ru_maxrss * 1024, out.read()


def attn() -> list[str]:
    script = Path(sys.executable).parent / "attn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "attn_tracer"]


def checkpoint(directory: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=768, n_head=12, n_layer=12, n_positions=1024, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def measure(reps: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = checkpoint(tmp / "gpt2-small-random")
        text = tmp / "long.txt"
        text.write_text("\n".join([LONG_TEXT.read_text("utf-8")] * 2), "utf-8")
        base = [*attn(), "heads", "--weights", str(model), "--file", str(text),
                "--max-length", str(LENGTH)]
        doc = json.loads(run_measured([*base, "--json"])[2])
        ids = [t["id"] for t in doc["inputs"][0]["tokens"]]
        assert len(ids) == LENGTH, len(ids)
        ids_file = tmp / "ids.json"
        ids_file.write_text(json.dumps(ids))
        script = tmp / "reference.py"
        script.write_text(REFERENCE)
        reference = [sys.executable, str(script), str(model), str(ids_file)]
        theirs = json.loads(run_measured(reference)[2])
        diff = max(abs(a - b) for s in theirs for la, lb in zip(theirs[s], doc["scores"][s],
                                                                  strict=True)
                   for a, b in zip(la, lb, strict=True))
        if diff > 1e-5:
            raise RuntimeError(f"attn heads and the reference disagree by {diff:.2e}")
        commands = {"attn heads": base, "attn heads --engine torch": [*base, "--engine", "torch"],
                    "HF GPT2Model + NumPy scores": reference,
                    "attn heads --repeat 50": [*attn(), "heads", "--weights", str(model),
                                               "--repeat", "50"]}
        figures: dict[str, dict[str, list[float]]] = {k: {"seconds": [], "peak_bytes": []}
                                                      for k in commands}
        for _ in range(reps):
            for name, cmd in commands.items():
                seconds, peak, _ = run_measured(cmd)
                figures[name]["seconds"].append(seconds)
                figures[name]["peak_bytes"].append(peak)
    medians = {name: {"all_seconds": f["seconds"], "all_peak_bytes": f["peak_bytes"],
                      "seconds": statistics.median(f["seconds"]),
                      "peak_mb": statistics.median(f["peak_bytes"]) / 1e6}
               for name, f in figures.items()}
    return {"length": LENGTH, "reps": reps, "max_score_diff": diff, "figures": medians}


def rows(result: dict) -> list[dict]:
    """The figures as benchmarks/run.py's rows."""
    f = result["figures"]
    ref = f["HF GPT2Model + NumPy scores"]
    out = []
    for name in ("attn heads", "attn heads --engine torch"):
        mine = f[name]
        out.append({"figure": f"h. {name}, 12×12 d768, 1,024 tok ÷ HF GPT2Model + NumPy scores, "
                              "time", "value": mine["seconds"] / ref["seconds"], "unit": "×",
                    "target": 1.0, "note": f"median {mine['seconds']:.2f} s vs "
                                           f"{ref['seconds']:.2f} s; {result['reps']} reps"})
        out.append({"figure": f"h. {name}, same, peak memory (whole process)",
                    "value": mine["peak_mb"] / ref["peak_mb"], "unit": "×", "target": 1.0,
                    "note": f"{mine['peak_mb']:.0f} MB vs {ref['peak_mb']:.0f} MB"})
    probe = f["attn heads --repeat 50"]
    out.append({"figure": "h. attn heads --repeat 50, same model, wall time",
                "value": probe["seconds"], "unit": "s", "target": 2.0,
                "note": f"peak {probe['peak_mb']:.0f} MB; scores agree within "
                        f"{result['max_score_diff']:.1e}"})
    for r in out:
        r["pass"] = r["value"] <= r["target"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args()
    result = measure(1 if args.quick else args.reps)
    for r in rows(result):
        verdict = "pass" if r["pass"] else "MISS"
        print(f"{r['figure']:<84} {r['value']:6.2f}{r['unit']}  ≤ {r['target']:g}  {verdict}  "
              f"{r['note']}")
    for name, f in result["figures"].items():
        print(f"  {name}: seconds {[round(s, 2) for s in f['all_seconds']]}, peak MB "
              f"{[round(b / 1e6) for b in f['all_peak_bytes']]}")


if __name__ == "__main__":
    main()
