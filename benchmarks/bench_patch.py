"""Figure p (issue 23): `attn patch` against the same grids computed with Hugging Face hooks.

    .venv/bin/python benchmarks/bench_patch.py [--reps 1]

GPT-2-small shape (12 layers, 12 heads, d_model 768), seeded random weights, saved with
`save_pretrained` into a temporary directory and loaded by both sides from there. A 15-token
IOI-style pair ("So when John and Mary went to the shops, John gave the bag to", the second
John → Mary), grids resid_pre + attn_out + mlp_out (12 × 15 each) + z (12 × 12 heads):
684 cells.

  p1  `attn patch --weights DIR --clean … --corrupt … --patch resid_pre,attn_out,mlp_out,z
      --json` (the whole process: start-up, checkpoint, the forwards, the document), engine
      auto (NumPy) and torch, ÷ a Python process that loads the same checkpoint into HF
      `GPT2LMHeadModel` and computes the same grids by the definition: two base forwards with
      hooks catching each block's input, attention output, MLP output and c_proj input, then
      one full forward per cell with one hook replacing one activation. Target: HF ÷ attn ≥ 3.

Wall time and the CPU time of each child process (getrusage); the machine is shared, so CPU
time is the steadier figure. Run by run.py as figure p, or alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

CLEAN = "So when John and Mary went to the shops, John gave the bag to"
CORRUPT = "So when John and Mary went to the shops, Mary gave the bag to"
TARGETS = ("resid_pre", "attn_out", "mlp_out", "z")


def attn_command() -> list[str]:
    script = Path(sys.executable).parent / "attn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "attn_tracer"]


def make_checkpoint(directory: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().save_pretrained(directory)


def timed(cmd: list[str]) -> tuple[float, float, bytes]:
    """(wall seconds, CPU seconds of the child, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.decode()[-400:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu, done.stdout


def hf_side(directory: str) -> None:
    """The reference process: the grids by the definition, one HF forward per cell."""
    import numpy as np
    import torch
    import transformers

    from attn_tracer.model import tokens

    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    d, heads = hf.config.n_embd, hf.config.n_head
    d_head = d // heads
    t, v = tokens.encode(" Mary")[0], tokens.encode(" John")[0]
    ids = {k: torch.tensor([tokens.encode(x)]) for k, x in (("clean", CLEAN),
                                                              ("corrupt", CORRUPT))}
    blocks = hf.transformer.h

    def hidden(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def catch(name: str) -> tuple[dict, float]:
        caught, handles = {}, []
        for layer, block in enumerate(blocks):
            handles += [
                block.register_forward_pre_hook(lambda m, a, k, layer=layer: caught.__setitem__(
                    ("resid_pre", layer), hidden(a, k).clone()), with_kwargs=True),
                block.attn.register_forward_hook(lambda m, a, o, layer=layer: caught.__setitem__(
                    ("attn_out", layer), o[0].clone())),
                block.mlp.register_forward_hook(lambda m, a, o, layer=layer: caught.__setitem__(
                    ("mlp_out", layer), o.clone())),
                block.attn.c_proj.register_forward_pre_hook(
                    lambda m, a, layer=layer: caught.__setitem__(("z", layer), a[0].clone()))]
        with torch.no_grad():
            logits = hf(input_ids=ids[name]).logits[0, -1].double()
        for h in handles:
            h.remove()
        return caught, float(logits[t] - logits[v])

    clean, clean_value = catch("clean")
    _, corrupted_value = catch("corrupt")
    n = ids["clean"].shape[1]
    grids = {}
    forwards = 2
    for target in TARGETS:
        shape = (len(blocks), heads) if target == "z" else (len(blocks), n)
        grid = np.empty(shape)
        for layer, block in enumerate(blocks):
            for i in range(shape[1]):
                src = clean[target, layer]
                if target == "resid_pre":
                    def pre(m, a, k, i=i, src=src):
                        x = hidden(a, k).clone()
                        x[:, i] = src[:, i]
                        return ((x, *a[1:]), k) if a else (a, {**k, "hidden_states": x})
                    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
                elif target == "attn_out":
                    def post(m, a, o, i=i, src=src):
                        x = o[0].clone()
                        x[:, i] = src[:, i]
                        return (x, *o[1:])
                    handle = block.attn.register_forward_hook(post)
                elif target == "mlp_out":
                    def post(m, a, o, i=i, src=src):
                        x = o.clone()
                        x[:, i] = src[:, i]
                        return x
                    handle = block.mlp.register_forward_hook(post)
                else:
                    cols = slice(i * d_head, (i + 1) * d_head)

                    def pre(m, a, cols=cols, src=src):
                        x = a[0].clone()
                        x[..., cols] = src[..., cols]
                        return (x,)
                    handle = block.attn.c_proj.register_forward_pre_hook(pre)
                with torch.no_grad():
                    logits = hf(input_ids=ids["corrupt"]).logits[0, -1].double()
                handle.remove()
                forwards += 1
                grid[layer, i] = (float(logits[t] - logits[v]) - corrupted_value) / (
                    clean_value - corrupted_value)
        grids[target] = grid.tolist()
    sys.stdout.write(json.dumps({"forwards": forwards, "grids": grids}) + "\n")


def measure(reps: int = 1) -> list[dict]:
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "gpt2-small"
        make_checkpoint(directory)
        ours = [*attn_command(), "patch", "--weights", str(directory), "--clean", CLEAN,
                "--corrupt", CORRUPT, "--target", " Mary", "--versus", " John",
                "--patch", ",".join(TARGETS), "--json"]
        reference = [sys.executable, __file__, "--hf-side", str(directory)]
        for _ in range(reps):
            hf_wall, hf_cpu, hf_out = timed(reference)
            hf_doc = json.loads(hf_out)
            for engine in ("auto", "torch"):
                wall, cpu, out = timed([*ours, "--engine", engine])
                doc = json.loads(out)
                worst = max(float(abs(np.subtract(g["values"], hf_doc["grids"][g["target"]]))
                                  .max()) for g in doc["grids"])
                rows.append({"engine": engine, "attn_wall": wall, "attn_cpu": cpu,
                             "hf_wall": hf_wall, "hf_cpu": hf_cpu,
                             "wall_ratio": hf_wall / wall, "cpu_ratio": hf_cpu / cpu,
                             "cells": doc["cells"], "runs": doc["runs"],
                             "forwards": doc["forwards"], "hf_forwards": hf_doc["forwards"],
                             "worst_difference": worst})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--hf-side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_side:
        hf_side(args.hf_side)
        sys.exit(0)
    for row in measure(args.reps):
        print(f"p1 engine {row['engine']}: attn {row['attn_wall']:.1f} s wall, "
              f"{row['attn_cpu']:.1f} s CPU ({row['runs']} of {row['cells']} cells run in "
              f"{row['forwards']} batched forwards + 1) · HF hooks {row['hf_wall']:.1f} s wall, "
              f"{row['hf_cpu']:.1f} s CPU ({row['hf_forwards']} forwards) · HF ÷ attn "
              f"{row['wall_ratio']:.2f}× wall, {row['cpu_ratio']:.2f}× CPU · grids agree to "
              f"{row['worst_difference']:.1e}")
