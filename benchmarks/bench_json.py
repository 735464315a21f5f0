"""How long writing one 1024×1024 attention pattern as JSON takes (issue 4's target: ≤ 1 s on a
2-core laptop-class CPU), through our writer (orjson on the NumPy array) and, for comparison,
through the standard `json` module on nested lists.

Run: .venv/bin/python benchmarks/bench_json.py   (a script that prints figures, not a test)
`measure()` returns the figures as a dict for benchmarks/run.py.
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from attn_tracer.render.json_doc import array_json

SIZE = 1024
TARGET_S = 1.0


def pattern(n: int = SIZE, seed: int = 0) -> np.ndarray:
    """A realistic causal pattern [n, n] in float32: softmax of random scores, zeros above."""
    scores = np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32) * 2
    scores[np.triu_indices(n, 1)] = -np.inf
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(runs: int = 5, size: int = SIZE) -> dict:
    """Median seconds to serialize and write one size×size float32 pattern, by each method."""
    x = pattern(size)

    def ours(precision: int | None = None) -> int:
        sink = io.BytesIO()
        sink.write(array_json(x, precision))
        return sink.tell()

    def stdlib() -> int:
        sink = io.StringIO()
        json.dump(x.tolist(), sink)
        return sink.tell()

    return {
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "size": size,
        "runs": runs,
        "json_1024x1024_s": _median(ours, runs),
        "json_1024x1024_precision4_s": _median(lambda: ours(4), runs),
        "stdlib_json_1024x1024_s": _median(stdlib, max(1, runs // 2)),
        "json_1024x1024_bytes": ours(),
        "stdlib_json_1024x1024_bytes": stdlib(),
    }


def main() -> None:
    m = measure()
    print(f"machine: {m['machine']}, {m['cpus']} CPUs, Python {m['python']}; "
          f"median of {m['runs']} runs")
    print(f"json_1024x1024_s             {m['json_1024x1024_s']:.3f}  (target ≤ {TARGET_S:g} s; "
          f"{m['json_1024x1024_bytes'] / 1e6:.1f} MB, orjson on the float32 array)")
    print(f"json_1024x1024_precision4_s  {m['json_1024x1024_precision4_s']:.3f}  (--precision 4)")
    print(f"stdlib_json_1024x1024_s      {m['stdlib_json_1024x1024_s']:.3f}  (json.dump of "
          f"x.tolist(), {m['stdlib_json_1024x1024_bytes'] / 1e6:.1f} MB: float64 digits)")


if __name__ == "__main__":
    main()
