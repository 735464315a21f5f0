"""Modern attention at a real model's shape, whole process, against transformers.

    .venv/bin/python benchmarks/bench_modern.py [--reps N] [--length N]

A Qwen2.5-0.5B-shaped checkpoint (24 layers, 14 query heads, 2 K/V heads, d_model 896, SwiGLU
4864, vocabulary 151,936, tied embeddings, Q/K/V biases; random weights, `save_pretrained`),
512 token ids, every head of every layer captured and written to an .npz:

  m1  `attn trace --weights DIR --ids … --save OUT.npz --steps pattern` (NumPy, and with
      --engine torch) ÷ a script that loads the same directory with `Qwen2ForCausalLM`
      (eager attention), runs it with `output_attentions=True` under `torch.no_grad()` and
      writes the 24 attention tensors with `np.savez`. Wall time, CPU time (user + system:
      the machine is shared, so wall time carries the other sessions' load) and peak RSS,
      each the child's own (os.wait4). Targets: ≤ 1.0× the time and the memory.

Before any timing, attn's saved patterns are compared with the reference's: they must agree
within 1e-4, so a wrong load cannot look fast.
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

SHAPE = dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
             num_hidden_layers=24, intermediate_size=4864, vocab_size=151936,
             max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6,
             rope_theta=1000000.0)

REFERENCE = r'''
import sys
import numpy as np
import torch
from transformers import Qwen2ForCausalLM

path, ids, out = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], sys.argv[3]
model = Qwen2ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
with torch.no_grad():
    attentions = model(torch.tensor([ids]), output_attentions=True).attentions
np.savez(out, **{f"blocks.{i}.attn.pattern": a.numpy() for i, a in enumerate(attentions)})
'''


def run_measured(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS bytes of one fresh process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd[:4])}… failed: {err.read().decode()[-600:]}")
        return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def attn() -> list[str]:
    script = Path(sys.executable).parent / "attn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "attn_tracer"]


def checkpoint(directory: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPE, attn_implementation="eager")
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # biases are initialised to 0: make them real
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(directory)
    return directory


def measure(reps: int = 3, length: int = 512, work: Path | None = None) -> dict:
    import numpy as np

    work = work or Path(tempfile.gettempdir()) / "attn-bench-qwen2"
    model = checkpoint(work / "model")
    ids = ",".join(str(t) for t in np.random.default_rng(0).integers(0, 50000, length))
    ours_out, ref_out = work / "attn.npz", work / "reference.npz"
    sides = {
        "attn numpy": [*attn(), "trace", "--weights", str(model), "--ids", ids, "--save",
                       str(ours_out), "--steps", "pattern", "--force", "--engine", "numpy"],
        "attn torch": [*attn(), "trace", "--weights", str(model), "--ids", ids, "--save",
                       str(ours_out), "--steps", "pattern", "--force", "--engine", "torch"],
        "transformers": [sys.executable, "-c", REFERENCE, str(model), ids, str(ref_out)],
    }
    # Agreement first: a wrong load must not look fast.
    for side in ("attn numpy", "transformers"):
        subprocess.run(sides[side], check=True, stdout=subprocess.DEVNULL)
    ours, ref = np.load(ours_out), np.load(ref_out)
    worst = max(float(np.abs(ours[f"blocks.{i}.attn.pattern"] - ref[f"blocks.{i}.attn.pattern"])
                      .max()) for i in range(SHAPE["num_hidden_layers"]))
    if worst > 1e-4:
        raise SystemExit(f"attn's patterns differ from transformers' by {worst:.2g}")
    figures: dict[str, list] = {side: [] for side in sides}
    for _ in range(reps):  # interleaved: the same load on each side within a round
        for side, cmd in sides.items():
            figures[side].append(run_measured(cmd))
    result = {"length": length, "agreement": worst, "reps": reps}
    for side, runs in figures.items():
        result[side] = {k: statistics.median(r[i] for r in runs)
                        for i, k in enumerate(("wall_s", "cpu_s", "peak_bytes"))}
        result[side]["rounds_wall_s"] = [round(r[0], 2) for r in runs]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args()
    result = measure(args.reps, args.length)
    ref = result["transformers"]
    for side in ("attn numpy", "attn torch"):
        r = result[side]
        print(f"{side}: wall {r['wall_s']:.1f} s ({r['wall_s'] / ref['wall_s']:.2f}×), "
              f"CPU {r['cpu_s']:.1f} s ({r['cpu_s'] / ref['cpu_s']:.2f}×), peak "
              f"{r['peak_bytes'] / 1e6:,.0f} MB ({r['peak_bytes'] / ref['peak_bytes']:.2f}×)")
    print(f"transformers: wall {ref['wall_s']:.1f} s, CPU {ref['cpu_s']:.1f} s, peak "
          f"{ref['peak_bytes'] / 1e6:,.0f} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
