"""Figure i (issue 14): what `attn attribute` costs, against a Hugging Face GPT-2 forward.

    .venv/bin/python benchmarks/bench_attribute.py [--reps 3] [--lengths 1024,256]

GPT-2-small shape (12 layers, 12 heads, d_model 768), seeded random weights, saved with
`save_pretrained` into a temporary directory, and loaded by both sides from there.

  i1  `attn attribute --weights DIR --file F --max-length N` (the whole process: start-up,
      loading the checkpoint, the forward, the analyses, the view) ÷ one forward of HF
      `GPT2LMHeadModel` with `output_hidden_states=True` (in process, the model loaded
      already, `torch.no_grad`). Target ≤ 1.3. Measured with --engine auto and with each
      engine named, at each length.
  i2  `--ablate L0H0` costs one more forward: in process, exactly two pipeline.run calls, and
      (attribute.compute with --ablate − without) ÷ the time of the forward of the run
      without. Target ≤ 1.2 (one forward, give or take the noise of two medians).

Interleaved rounds, medians. Run by run.py as figure i, or alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing


def attn_command() -> list[str]:
    script = Path(sys.executable).parent / "attn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "attn_tracer"]


def make_checkpoint(directory: Path):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    model.save_pretrained(directory)
    return model


def long_text(tokens: int) -> str:
    base = (ROOT / "sample_texts" / "long.txt").read_text("utf-8")
    return "\n".join([base] * (tokens // 900 + 1))


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.decode()[-400:]}")
    return elapsed


def measure(reps: int = 3, lengths: tuple[int, ...] = (1024,),
            engines: tuple[str, ...] = ("auto", "numpy", "torch")) -> list[dict]:
    import torch

    from attn_tracer.model import tokens

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "gpt2-small"
        model = make_checkpoint(directory)
        text = Path(tmp) / "long.txt"
        text.write_text(long_text(max(lengths)), "utf-8")
        ids = tokens.encode(text.read_text("utf-8"))
        for n in lengths:
            batch = torch.tensor([ids[:n]])

            def hf(batch=batch):
                with torch.no_grad():
                    return model(batch, output_hidden_states=True).logits

            hf()  # warm-up: the first call pays for kernels and allocator growth
            cmds = {e: [*attn_command(), "attribute", "--weights", str(directory), "--file",
                        str(text), "--max-length", str(n), "--engine", e] for e in engines}
            times: dict[str, list[float]] = {"hf": [], **{e: [] for e in engines}}
            for _ in range(reps):
                for e, cmd in cmds.items():
                    times[e].append(wall(cmd))
                start = time.perf_counter()
                hf()
                times["hf"].append(time.perf_counter() - start)
            ref = statistics.median(times["hf"])
            for e in engines:
                t = statistics.median(times[e])
                rows.append({"figure": f"i1. attn attribute {n} tok, --engine {e} (whole "
                                       "process) ÷ HF GPT2LMHeadModel forward, "
                                       "output_hidden_states",
                             "value": t / ref, "target": 1.3, "seconds": t,
                             "reference_seconds": ref, "all_seconds": times, "reps": reps})
        rows.append(ablation_cost(directory, text, max(lengths), reps))
    return rows


def ablation_cost(directory: Path, text: Path, length: int, reps: int) -> dict:
    """--ablate L0H0 in process: the forwards it runs, and what they cost.

    The value is (the whole run with --ablate − without) ÷ the run's first forward; loading the
    checkpoint is in both runs and cancels, but its noise stays, so the time of the ablated
    forward itself (the second pipeline.run) ÷ the first is reported beside it."""
    from attn_tracer.commands import attribute as attr
    from attn_tracer.commands.run import Request
    from attn_tracer.model import pipeline

    forwards: list[float] = []
    real = pipeline.run

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = real(*args, **kwargs)
        forwards.append(time.perf_counter() - start)
        return out

    pipeline.run = timed
    try:
        def compute(ablate: list[str]) -> float:
            request = attr.AttributeRequest(Request(file=text, weights=str(directory),
                                                    max_length=length, engine="torch"),
                                            ablate=ablate)
            forwards.clear()
            start = time.perf_counter()
            attr.compute(request, [].append)
            return time.perf_counter() - start

        compute([])  # warm-up
        plain, ablated, first, second = [], [], [], []
        for _ in range(reps):
            plain.append(compute([]))
            assert len(forwards) == 1
            first.append(forwards[0])
            ablated.append(compute(["L0H0"]))
            assert len(forwards) == 2  # exactly one more forward
            second.append(forwards[1] / forwards[0])
    finally:
        pipeline.run = real
    extra = statistics.median(ablated) - statistics.median(plain)
    forward = statistics.median(first)
    return {"figure": f"i2. --ablate L0H0, {length} tok, torch: (with − without) ÷ one forward",
            "value": extra / forward, "target": 1.2, "seconds": extra,
            "reference_seconds": forward, "forwards_with_ablate": 2,
            "ablated_forward_over_first": statistics.median(second), "plain_seconds": plain,
            "ablate_seconds": ablated, "forward_seconds": first, "reps": reps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--engines", default="auto,numpy,torch")
    args = parser.parse_args()
    rows = measure(args.reps, tuple(int(n) for n in args.lengths.split(",")),
                   tuple(args.engines.split(",")))
    for r in rows:
        verdict = "pass" if r["value"] <= r["target"] else "MISS"
        extra = (f"; ablated forward ÷ first {r['ablated_forward_over_first']:.2f}"
                 if "ablated_forward_over_first" in r else "")
        print(f"{r['figure']:<100} {r['value']:6.2f}× (≤ {r['target']}) {verdict}  "
              f"{r['seconds']:.2f} s vs {r['reference_seconds']:.2f} s{extra}", flush=True)
    print(json.dumps(rows, indent=1, default=float), file=sys.stderr)


if __name__ == "__main__":
    main()
