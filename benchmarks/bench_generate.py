"""Figure m (issue 24): `attn generate` with its KV cache, against transformers' `generate`.

    .venv/bin/python benchmarks/bench_generate.py [--reps 3] [--new 128] [--recompute-new 128]

GPT-2-small shape (12 layers, 12 heads, d_model 768), seeded random weights, saved with
`save_pretrained` into a temporary directory and loaded by both sides from there; a 32-token
prompt (the start of sample_texts/long.txt), greedy, 128 new tokens, CPU.

  m1  tokens/s of `attn generate --file PROMPT --weights DIR -n 128 --quiet` (the whole process:
      start-up, loading the checkpoint, the prefill and 127 cached steps) ÷ tokens/s of a
      process that imports torch and transformers, loads the same folder with
      `GPT2LMHeadModel.from_pretrained` and calls `generate(do_sample=False,
      max_new_tokens=128)` (transformers' own KV cache). Target ≥ 1.0. Both outputs must be the
      same text (the same greedy ids), which is checked. Wall time and CPU time (user + system
      of the child, from resource.getrusage) are both reported: the machine is shared.
  m2  in process, the generation loop alone (model/generate.py, NumPy, weights loaded): with the
      cache ÷ recomputing every token at every step (Plan(use_cache=False): a full forward over
      the prompt and everything generated so far, at each step). Wall and CPU (process time).

Interleaved rounds, medians. Run by run.py as figure m, or alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

PROMPT_TOKENS = 32
HF_SCRIPT = """
import sys
from pathlib import Path

import torch
import transformers

from attn_tracer.model import tokens

ids = tokens.encode(Path(sys.argv[2]).read_text("utf-8"))
model = transformers.GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
x = torch.tensor([ids])
with torch.no_grad():
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=int(sys.argv[3]), pad_token_id=50256)
sys.stdout.buffer.write(tokens.encoding().decode_bytes(out[0, len(ids):].tolist()) + b"\\n")
"""


def attn_command() -> list[str]:
    script = Path(sys.executable).parent / "attn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "attn_tracer"]


def make_checkpoint(directory: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().save_pretrained(directory)


def prompt_text() -> str:
    from attn_tracer.model import tokens

    ids = tokens.encode((ROOT / "sample_texts" / "long.txt").read_text("utf-8"))
    return tokens.encoding().decode(ids[:PROMPT_TOKENS])


def child(cmd: list[str]) -> tuple[float, float, bytes]:
    """(wall seconds, CPU seconds of the child, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.decode()[-400:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def whole_process(directory: Path, prompt: Path, new: int, reps: int) -> dict:
    attn = [*attn_command(), "generate", "--file", str(prompt), "--weights", str(directory),
            "-n", str(new), "--quiet"]
    hf = [sys.executable, "-c", HF_SCRIPT, str(directory), str(prompt), str(new)]
    times: dict[str, list[tuple[float, float]]] = {"attn": [], "hf": []}
    outputs = {}
    for _ in range(reps):
        for name, cmd in (("attn", attn), ("hf", hf)):
            wall, cpu, out = child(cmd)
            times[name].append((wall, cpu))
            outputs[name] = out
    if outputs["attn"] != outputs["hf"]:
        raise RuntimeError("attn generate and transformers' generate wrote different texts")
    med = {n: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
           for n, t in times.items()}
    return {"figure": f"m1. attn generate -n {new} --quiet (whole process) tokens/s ÷ "
                      "transformers generate (whole process), greedy",
            "value": med["hf"][0] / med["attn"][0], "target": 1.0,
            "attn_tokens_per_s": new / med["attn"][0], "hf_tokens_per_s": new / med["hf"][0],
            "attn_seconds": med["attn"][0], "hf_seconds": med["hf"][0],
            "attn_cpu_seconds": med["attn"][1], "hf_cpu_seconds": med["hf"][1],
            "cpu_ratio": med["hf"][1] / med["attn"][1], "same_text": True,
            "all_seconds": times, "reps": reps}


def in_process(directory: Path, prompt: str, new: int, recompute_new: int, reps: int) -> dict:
    from attn_tracer.commands.run import Request, build_config
    from attn_tracer.model import generate as gen
    from attn_tracer.model import tokens
    from attn_tracer.model.engine import Engine

    config, weights = build_config(Request(weights=str(directory)))
    engine = Engine("numpy", "cpu", "float32")
    ids = tokens.encode(prompt)

    def loop(use_cache: bool, n: int) -> tuple[float, float, list[int]]:
        plan = gen.Plan(ids, n, use_cache=use_cache)
        wall, cpu = time.perf_counter(), time.process_time()
        out = [s.token for s in gen.generate(plan, config, engine, weights)]
        return time.perf_counter() - wall, time.process_time() - cpu, out

    loop(True, 4)  # warm-up
    cached, full = [], []
    for _ in range(reps):
        wall, cpu, got = loop(True, new)
        cached.append((wall / len(got), cpu / len(got)))
    for _ in range(max(1, reps // 3)):  # recomputing is slow: fewer rounds
        wall, cpu, again = loop(False, recompute_new)
        if again != got[:len(again)]:
            raise RuntimeError("recomputing every step chose other tokens than the cache")
        full.append((wall / len(again), cpu / len(again)))
    c = statistics.median(w for w, _ in cached), statistics.median(u for _, u in cached)
    f = statistics.median(w for w, _ in full), statistics.median(u for _, u in full)
    return {"figure": f"m2. generation loop, {new} new tokens, NumPy: the KV cache's speed-up "
                      f"over recomputing every token each step ({recompute_new} new)",
            "value": f[0] / c[0], "target": None, "cached_tokens_per_s": 1 / c[0],
            "recompute_tokens_per_s": 1 / f[0], "cpu_speedup": f[1] / c[1],
            "cached_cpu_tokens_per_s": 1 / c[1], "recompute_cpu_tokens_per_s": 1 / f[1],
            "reps": reps}


def measure(reps: int = 3, new: int = 128, recompute_new: int = 128) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "gpt2-small"
        make_checkpoint(directory)
        text = prompt_text()
        prompt = Path(tmp) / "prompt.txt"
        prompt.write_text(text, "utf-8")
        return [whole_process(directory, prompt, new, reps),
                in_process(directory, text, new, recompute_new, reps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--recompute-new", type=int, default=128)
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        print(f"load average at the start: {f.read().split()[:3]}", flush=True)
    m1, m2 = measure(args.reps, args.new, args.recompute_new)
    print(f"{m1['figure']}: {m1['value']:.2f}× wall (attn {m1['attn_tokens_per_s']:.1f} tok/s, "
          f"{m1['attn_seconds']:.1f} s, CPU {m1['attn_cpu_seconds']:.1f} s; transformers "
          f"{m1['hf_tokens_per_s']:.1f} tok/s, {m1['hf_seconds']:.1f} s, CPU "
          f"{m1['hf_cpu_seconds']:.1f} s); CPU time ratio {m1['cpu_ratio']:.2f}×")
    print(f"{m2['figure']}: {m2['value']:.1f}× wall ({m2['cached_tokens_per_s']:.1f} vs "
          f"{m2['recompute_tokens_per_s']:.2f} tok/s), {m2['cpu_speedup']:.1f}× CPU")
    with open("/proc/loadavg") as f:
        print(f"load average at the end: {f.read().split()[:3]}", flush=True)
    print(json.dumps([m1, m2], indent=1, default=float), file=sys.stderr)


if __name__ == "__main__":
    main()
