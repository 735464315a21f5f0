"""Outputs that scale (issue 12): `--save`, `--json` and `--json-lines` of every head of a
GPT-2-small-shaped stack (12 layers × 12 heads × d_model 768, random weights, `--arch gpt2`)
at 1,024 tokens: seconds, bytes and MB/s, beside the disk's own speed.

    .venv/bin/python benchmarks/bench_outputs.py              # everything, about 5 minutes
    .venv/bin/python benchmarks/bench_outputs.py --quick      # in-process stages only
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/bench_outputs.py   # another version

Two kinds of figure:
  stage  in this process, on one trace built beforehand: only the writer's time
         (save.save_tensors, render_json.write / write_lines) into a file in a temporary
         directory of the current disk, and, for JSON, into /dev/null (serialization alone).
  whole  `python -m attn_tracer trace …` in a fresh subprocess (imports, weights, forward,
         output), stdout to a file or /dev/null: what a user waits for.
MB/s is the output's size ÷ the time (10^6 bytes). `disk` writes the same number of bytes of
an incompressible buffer with plain `file.write`, without fsync as our writers do: the page
cache's speed on this machine, the ceiling for every writer here.

Every output file is deleted as soon as it is measured. Targets: JSON ≥ 100 MB/s of output,
--save ≥ 200 MB/s, `--save --steps pattern` whole process < 10 s.
`rows()` returns the figures for benchmarks/run.py (figure l).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LONG_TEXT = ROOT / "sample_texts" / "long.txt"
LENGTH = 1024
SHAPE = ["--d-model", "768", "--heads", "12", "--layers", "12", "--arch", "gpt2"]


def long_text(tokens: int) -> str:
    base = LONG_TEXT.read_text("utf-8")
    return "\n".join([base] * (tokens // 900 + 1))


def _row(figure: str, seconds: float, size: int, target_mb_s: float | None = None,
         target_s: float | None = None, note: str = "") -> dict:
    rate = size / seconds / 1e6 if seconds > 0 and size else None
    if target_mb_s is not None:  # a rate: the value is MB/s and must reach the target
        ok = None if rate is None else rate >= target_mb_s
        value, unit, target = rate, "MB/s", target_mb_s
    else:
        ok = None if target_s is None else seconds <= target_s
        value, unit, target = seconds, "s", target_s
    return {"figure": figure, "value": value, "unit": unit, "target": target, "pass": ok,
            "higher_is_better": target_mb_s is not None, "seconds": seconds, "bytes": size,
            "mb_per_s": rate, "note": note or f"{seconds:.2f} s, {size / 1e6:,.0f} MB"
            + (f", {rate:,.0f} MB/s" if rate else "")}


def disk_speed(folder: Path, size: int) -> dict:
    """The same number of bytes written with plain file.write (no fsync), in 64 MB pieces."""
    piece = np.random.default_rng(0).bytes(64 * 2**20)
    path = folder / "disk.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(piece[:left] if left < len(piece) else piece)
            left -= len(piece)
    seconds = time.perf_counter() - start
    path.unlink()
    return _row("disk: plain file.write of as many bytes", seconds, size)


def build_trace(capture: str, engine_name: str = "numpy"):
    from attn_tracer.model import pipeline
    from attn_tracer.model.config import Config
    from attn_tracer.model.engine import Engine
    from attn_tracer.model.trace import Selection
    from attn_tracer.model.weights import random_weights

    config = Config(d_model=768, heads=12, layers=12, n_ctx=1024, pos="learned", arch="gpt2")
    selection = Selection(tuple(range(12)), tuple(range(12)), capture)
    trace, _ = pipeline.run([long_text(LENGTH)], config, Engine(engine_name, "cpu", "float32"),
                            random_weights(config), selection, max_length=LENGTH)
    return trace


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def stage_rows(folder: Path) -> list[dict]:
    """The writers alone, each on a trace built beforehand."""
    from attn_tracer.commands import save
    from attn_tracer.render import json_doc as render_json

    rows = []
    trace = build_trace("all")
    for suffix in (".npz", ".safetensors"):
        path = folder / f"trace{suffix}"
        seconds = timed(lambda path=path: save.save_tensors(trace, path,
                                                             render_json.config_json(trace)))
        size = path.stat().st_size
        path.unlink()
        rows.append(_row(f"stage: save_tensors {suffix}, every step", seconds, size, 200))
    saved = size
    del trace
    trace = build_trace("patterns")
    writers = [("--json", render_json.write)]
    if hasattr(render_json, "write_lines"):
        writers.append(("--json-lines", render_json.write_lines))
    for flag, write in writers:
        path = folder / "trace.json"
        with open(path, "wb") as f:
            seconds = timed(lambda f=f, write=write: write(trace, f))
        size = path.stat().st_size
        path.unlink()
        rows.append(_row(f"stage: {flag} into a file", seconds, size, 100))
        with open(os.devnull, "wb") as f:
            seconds = timed(lambda f=f, write=write: write(trace, f))
        rows.append(_row(f"stage: {flag} into /dev/null (serialization alone)", seconds, size,
                         100))
    rows.insert(0, disk_speed(folder, max(saved, size)))
    return rows


def attn(*args: str, stdout) -> dict:
    """One `attn trace ARGS` in a fresh process: wall seconds, CPU seconds (user + system: what
    a loaded machine does not inflate much) and peak RSS, from the kernel's rusage of that child."""
    cmd = [sys.executable, "-m", "attn_tracer", "trace", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {stderr.decode()[-400:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def _whole(figure: str, run: dict, size: int, **target) -> dict:
    r = _row(figure, run["seconds"], size, **target)
    r.update(cpu_seconds=run["cpu_seconds"], peak_rss_mb=run["peak_rss_mb"])
    r["note"] += f"; CPU {run['cpu_seconds']:.1f} s, peak RSS {run['peak_rss_mb']:,.0f} MB"
    return r


def has_option(option: str) -> bool:
    done = subprocess.run([sys.executable, "-m", "attn_tracer", "trace", "--help"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    return option in done.stdout


def whole_rows(folder: Path, engine: str) -> list[dict]:
    text = folder / "long.txt"
    text.write_text(long_text(LENGTH), "utf-8")
    common = ["--file", str(text), "--max-length", str(LENGTH), *SHAPE, "--engine", engine]
    rows = []
    streams = ["--json"] + (["--json-lines"] if has_option("--json-lines") else [])
    for flag in streams:
        path = folder / "out.json"
        with open(path, "wb") as f:
            run = attn(*common, flag, stdout=f)
        size = path.stat().st_size
        path.unlink()
        rows.append(_whole(f"whole ({engine}): {flag} > file", run, size, target_mb_s=100))
    saves = [(".npz", []), (".safetensors", [])]
    if has_option("--steps"):
        saves.append((".npz", ["--steps", "pattern"]))
    for suffix, extra in saves:
        path = folder / f"trace{suffix}"
        with open(os.devnull, "wb") as devnull:
            run = attn(*common, "--save", str(path), *extra, stdout=devnull)
        size = path.stat().st_size
        path.unlink()
        figure = f"whole ({engine}): --save {suffix} {' '.join(extra)}".rstrip()
        target = {"target_s": 10.0} if extra else {"target_mb_s": 200}
        rows.append(_whole(figure, run, size, **target))
    text.unlink()
    return rows


def memory_rows(folder: Path, engines: tuple[str, ...]) -> list[dict]:
    """Issue 12's 4,096-token case: the default stack (2 layers × 12 heads, d_model 768), one
    head shown, the view to /dev/null: peak RSS of the whole process on each engine."""
    text = folder / "long.txt"
    text.write_text(long_text(4096), "utf-8")
    rows = []
    for engine in engines:
        with open(os.devnull, "wb") as devnull:
            run = attn("--file", str(text), "--max-length", "4096", "--n-ctx", "4096", "--head",
                       "0", "--engine", engine, stdout=devnull)
        rows.append({"figure": f"memory ({engine}): 4,096 tokens, one head shown",
                     "value": run["peak_rss_mb"], "unit": "MB", "target": None, "pass": None,
                     **run, "note": f"peak RSS {run['peak_rss_mb']:,.0f} MB; "
                                    f"{run['seconds']:.1f} s, CPU {run['cpu_seconds']:.1f} s"})
    text.unlink()
    return rows


def rows(quick: bool = False, engines: tuple[str, ...] = ("numpy", "torch")) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = Path(tmp)
        # Subprocesses first, while this process is small: a child's peak RSS (rusage) counts
        # the pages it shared with its parent between fork and exec.
        if not quick:
            out += memory_rows(folder, engines)
            for engine in engines:
                out += whole_rows(folder, engine)
        out += stage_rows(folder)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the in-process stages only")
    parser.add_argument("--engine", action="append", choices=("numpy", "torch"),
                        help="engines of the whole-process figures (default: both)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    import attn_tracer

    print(f"attn_tracer from {Path(attn_tracer.__file__).parent}; load average "
          f"{os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs", flush=True)
    figures = []
    for r in rows(args.quick, tuple(args.engine or ("numpy", "torch"))):
        verdict = {True: "pass", False: "MISS", None: ""}[r["pass"]]
        print(f"{r['figure']:<58} {r['note']:<40} {verdict}", flush=True)
        figures.append(r)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n", "utf-8")


if __name__ == "__main__":
    main()
