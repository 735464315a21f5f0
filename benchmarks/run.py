"""The benchmark suite of `attn`: one entry point, run by hand, never a pass/fail test.

    .venv/bin/python benchmarks/run.py            # everything (about 3-5 minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --quick    # fewer repetitions and lengths (about 1 minute)

Prints a table (figure, value, target, pass/miss) and writes every figure, with the machine it
came from, to benchmarks/results/latest.json (git-ignored); BENCHMARKS.md keeps the latest
results by hand. Shared machines are noisy, so each figure is a ratio of two things measured
in the same run, interleaved, over several repetitions, and the medians are compared.

Figures (issue 7):
  a  `attn --help`, `attn tokens …`, `attn trace …` wall time ÷ `python -c "import numpy,
     tiktoken, rich, typer"`, each in a fresh subprocess; and whether `attn trace` imported torch
     (PYTHONPROFILEIMPORTTIME lists every module a process imports).
  b  GPT-2-small shape (12 layers, 12 heads, d_model 768, gpt2, random weights), 1,024 tokens,
     CPU, torch engine, one head captured ÷ the same forward written here with plain torch ops
     and F.scaled_dot_product_attention, on the same weights.
  c  the same with all 144 heads captured ÷ Hugging Face GPT2Model (eager attention,
     output_attentions=True, torch.no_grad) loaded with the same weights.
  d  peak memory of the forward with one head captured minus that of the untraced forward, each
     in its own subprocess: after the weights are built the kernel's high-water mark is reset
     (`echo 5 > /proc/self/clear_refs`), the forward runs once, and VmHWM − VmRSS-before is the
     memory the forward itself needed (falls back to ru_maxrss where clear_refs is unavailable).
  e  one 1024×1024 pattern written as JSON: benchmarks/bench_json.py's measure().
  f  the NumPy/torch crossover on the CPU for the default stack (2 layers, d_model 768): whole
     `attn trace` wall time, --engine numpy vs --engine torch, at 16 … 2,048 tokens (2,048 with
     --n-ctx 2048). Sets engine.TORCH_FROM_LEN (the `--engine auto` rule).
  g  on CUDA (skipped without a GPU): 1,024 and 4,096 tokens, one head captured ÷ untraced SDPA.
  h  `attn heads` (issue 13), whole process: benchmarks/bench_heads.py's measure() — GPT-2-small
     shape at 1,024 tokens ÷ HF GPT2Model output_attentions + the same scores in NumPy (time and
     peak memory), and `--repeat 50` wall time.
  i  `attn attribute` (issue 14), GPT-2-small shape from a saved checkpoint, 1,024 tokens: the
     whole process ÷ one HF GPT2LMHeadModel forward with output_hidden_states=True; and what
     --ablate of one head adds ÷ one forward (benchmarks/bench_attribute.py's measure()).

  j  attn explore (issue 17), GPT-2-small shape (random weights), 1,024 tokens: the peak memory
     of computing what the app shows, as built (each layer's Q and K cached, a head's stages
     computed when it is opened) and with the alternatives (every pattern kept as float16, or
     float32), each in its own subprocess; and, in the app run headless, the time of a key
     press to the next frame: the next head (its stages computed), the next query, the next
     stage, a page down.
  k  attn explore start-up: `attn explore "<short>" --exit-after-first-frame` minus `attn trace
     "<short>"`, both whole processes on a pseudo-terminal (160 × 50); also with Textual imported
     after the run instead of in a thread beside it, and `python -c "import textual.app"`.
  l  outputs that scale (issue 12): --save, --json and --json-lines of every head of the
     GPT-2-small shape at 1,024 tokens, MB/s of the writers alone and of whole processes, and
     `--save --steps pattern` wall time: benchmarks/bench_outputs.py's rows().

Repetitions (medians of): a 7 rounds; b and c 3 each after one warm-up call; d one forward per
subprocess; e bench_json's own 5; f 2 rounds up to 256 tokens, 1 above; g 10; h 3; i 3; j one run
per subprocess, 5 presses of each key; k 7 rounds. --quick: a 3, b/c/h/i 1, f 1 round at 16, 256
and 1,024 tokens, k 3. --only picks figures (e.g. --only ab).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "latest.json"
LONG_TEXT = ROOT / "sample_texts" / "long.txt"
SHORT = "The cat sat on the mat"
FLOOR = "import numpy, tiktoken, rich, typer"
LENGTHS = (16, 64, 128, 256, 512, 1024, 2048)  # 2,048: past the default n_ctx


# ── helpers ───────────────────────────────────────────────────────────────────────────────────

def attn_command() -> list[str]:
    """The installed `attn` script beside this interpreter, else `python -m attn_tracer`."""
    script = Path(sys.executable).parent / "attn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "attn_tracer"]


def wall(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.decode()[-400:]}")
    return elapsed


def interleaved(fns: dict[str, callable], reps: int) -> dict[str, list[float]]:
    """Run each function once per round, round after round, so load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def row(figure: str, value: float | None, target: float | None, unit: str = "×",
        note: str = "", **details) -> dict:
    ok = None if value is None or target is None else value <= target
    return {"figure": figure, "value": value, "unit": unit, "target": target, "pass": ok,
            "note": note, **details}


def long_text(tokens: int) -> str:
    """A text of at least `tokens` GPT-2 tokens: the long sample, repeated."""
    base = LONG_TEXT.read_text("utf-8")
    return "\n".join([base] * (tokens // 900 + 1))


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "numpy": np.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    if importlib.util.find_spec("transformers"):
        import transformers

        info["transformers"] = transformers.__version__
    return info


# ── a: start-up ───────────────────────────────────────────────────────────────────────────────

def bench_startup(reps: int) -> list[dict]:
    attn = attn_command()
    cmds = {
        "floor": [sys.executable, "-c", FLOOR],
        "attn --help": [*attn, "--help"],
        'attn tokens "hello world"': [*attn, "tokens", "hello world"],
        f'attn trace "{SHORT}"': [*attn, "trace", SHORT],
    }
    times = interleaved({k: (lambda c=c: wall(c)) for k, c in cmds.items()}, reps)
    floor = median(times["floor"])
    rows = []
    for name in list(cmds)[1:]:
        rows.append(row(f"a. {name} ÷ floor", median(times[name]) / floor, 1.5,
                        note=f"median {median(times[name]):.3f} s vs floor {floor:.3f} s",
                        seconds=median(times[name]), floor_seconds=floor, reps=reps))
    # Does the default trace path import torch? Every imported module is listed on stderr.
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run([*attn, "trace", SHORT], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env, text=True)
    imported = sorted({line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                       if "|" in line})
    torch_in = "torch" in imported
    rows.append(row(f'a. attn trace "{SHORT}" imports torch', float(torch_in), 0.0, unit="bool",
                    note="torch imported" if torch_in else "torch not imported"))
    return rows


# ── b, c, g: the GPT-2-small forward ──────────────────────────────────────────────────────────

def gpt2_small(n_ctx: int = 1024):
    """GPT-2-small shape with seeded random weights; the full embedding tables drawn once."""
    from attn_tracer.model.config import Config
    from attn_tracer.model.weights import random_weights

    config = Config(d_model=768, heads=12, layers=12, n_ctx=n_ctx, pos="learned", arch="gpt2")
    weights = random_weights(config)
    weights.unembedding()  # draws the whole W_E into params["wte"], as a checkpoint has it
    weights.params["wpe"] = weights.position_rows(np.arange(n_ctx))
    return config, weights


def token_ids(text: str, length: int) -> np.ndarray:
    from attn_tracer.model import tokens

    ids = [t.id for t in tokens.tokenize(text)][:length]
    if len(ids) < length:
        raise RuntimeError(f"benchmark text has {len(ids)} tokens, fewer than {length}")
    return np.asarray(ids, np.int64)[None, :]  # [batch, len]


def torch_params(weights, device: str = "cpu", dtype: str = "float32") -> dict:
    import torch

    return {k: torch.as_tensor(v).to(device, getattr(torch, dtype))
            for k, v in weights.params.items()}


def reference_forward(P: dict, ids, config):
    """GPT-2 untraced: plain torch ops and fused SDPA, nothing kept. ids: [batch, len] tensor."""
    import torch
    import torch.nn.functional as F

    batch, length = ids.shape
    d, heads, d_head, eps = config.d_model, config.heads, config.d_head, config.ln_eps
    x = P["wte"][ids] + P["wpe"][torch.arange(length, device=ids.device)]
    for i in range(config.layers):
        b = f"blocks.{i}"
        h = F.layer_norm(x, (d,), P[f"{b}.ln_1.w"], P[f"{b}.ln_1.b"], eps)

        def split(name: str, h=h, b=b):
            y = h @ P[f"{b}.attn.W_{name}"] + P[f"{b}.attn.b_{name}"]
            return y.view(batch, length, heads, d_head).transpose(1, 2)  # (B, nh, T, hs)

        z = F.scaled_dot_product_attention(split("Q"), split("K"), split("V"), is_causal=True)
        z = z.transpose(1, 2).reshape(batch, length, d)
        x = x + z @ P[f"{b}.attn.W_O"] + P[f"{b}.attn.b_O"]
        h = F.layer_norm(x, (d,), P[f"{b}.ln_2.w"], P[f"{b}.ln_2.b"], eps)
        h = F.gelu(h @ P[f"{b}.mlp.W_in"] + P[f"{b}.mlp.b_in"], approximate="tanh")
        x = x + h @ P[f"{b}.mlp.W_out"] + P[f"{b}.mlp.b_out"]
    x = F.layer_norm(x, (d,), P["ln_f.w"], P["ln_f.b"], eps)
    if x.is_cuda:
        torch.cuda.synchronize()
    return x


def traced_forward(text: str, length: int, config, weights, engine, selection):
    from attn_tracer.model import pipeline

    trace, _ = pipeline.run([text], config, engine, weights, selection, max_length=length)
    return trace


def hf_model(weights, config):
    """transformers' GPT2Model (eager attention) holding our weights; c_attn = [W_Q|W_K|W_V]."""
    import torch
    from transformers import GPT2Config, GPT2Model

    hf_config = GPT2Config(vocab_size=config.vocab, n_positions=config.n_ctx,
                           n_embd=config.d_model, n_layer=config.layers, n_head=config.heads,
                           activation_function="gelu_new", layer_norm_epsilon=config.ln_eps,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_config._attn_implementation = "eager"  # the path that can return the weights
    model = GPT2Model(hf_config)
    p = {k: torch.as_tensor(v) for k, v in weights.params.items()}
    state = {"wte.weight": p["wte"], "wpe.weight": p["wpe"], "ln_f.weight": p["ln_f.w"],
             "ln_f.bias": p["ln_f.b"]}
    for i in range(config.layers):
        b, h = f"blocks.{i}", f"h.{i}"
        state.update({
            f"{h}.ln_1.weight": p[f"{b}.ln_1.w"], f"{h}.ln_1.bias": p[f"{b}.ln_1.b"],
            f"{h}.ln_2.weight": p[f"{b}.ln_2.w"], f"{h}.ln_2.bias": p[f"{b}.ln_2.b"],
            f"{h}.attn.c_attn.weight": torch.cat([p[f"{b}.attn.W_{n}"] for n in "QKV"], 1),
            f"{h}.attn.c_attn.bias": torch.cat([p[f"{b}.attn.b_{n}"] for n in "QKV"]),
            f"{h}.attn.c_proj.weight": p[f"{b}.attn.W_O"],
            f"{h}.attn.c_proj.bias": p[f"{b}.attn.b_O"],
            f"{h}.mlp.c_fc.weight": p[f"{b}.mlp.W_in"], f"{h}.mlp.c_fc.bias": p[f"{b}.mlp.b_in"],
            f"{h}.mlp.c_proj.weight": p[f"{b}.mlp.W_out"],
            f"{h}.mlp.c_proj.bias": p[f"{b}.mlp.b_out"],
        })
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"GPT2Model state_dict mismatch: missing {missing}, extra {unexpected}")
    return model.eval()


def bench_forward(reps: int, have_hf: bool) -> list[dict]:
    import torch

    from attn_tracer.model.engine import Engine
    from attn_tracer.model.trace import Selection

    length = 1024
    start = time.perf_counter()
    config, weights = gpt2_small()
    setup = time.perf_counter() - start
    text = long_text(length)
    ids = torch.as_tensor(token_ids(text, length))
    P = torch_params(weights)
    engine = Engine("torch", "cpu", "float32")
    one = Selection((0,), (0,), "patterns")
    every = Selection(tuple(range(12)), tuple(range(12)), "patterns")

    # Warm-up: the first call of each pays for kernels and allocator growth.
    reference_forward(P, ids, config)
    traced_forward(text, length, config, weights, engine, one)
    times = interleaved({
        "untraced": lambda: reference_forward(P, ids, config),
        "one head": lambda: traced_forward(text, length, config, weights, engine, one),
    }, reps)
    untraced = median(times["untraced"])
    rows = [row("b. GPT-2-small 1,024 tok CPU, one head captured ÷ untraced SDPA",
                median(times["one head"]) / untraced, 1.2,
                note=f"median {median(times['one head']):.2f} s vs {untraced:.2f} s; {reps} reps",
                seconds=median(times["one head"]), reference_seconds=untraced,
                all_seconds=times, reps=reps, weights_setup_seconds=setup)]

    if not have_hf:
        rows.append(row("c. all 144 heads captured ÷ HF GPT2Model eager output_attentions", None,
                        1.0, note="skipped: transformers is not installed"))
        return rows
    model = hf_model(weights, config)

    def hf():
        with torch.no_grad():
            return model(ids, output_attentions=True).attentions

    # Same weights, same numbers: check it before timing, so a wrong load cannot look fast.
    attentions = hf()
    trace = traced_forward(text, length, config, weights, engine, every)
    diff = max(float(np.abs(trace.tensors[f"blocks.{i}.attn.pattern"] -
                            attentions[i].numpy()).max()) for i in range(config.layers))
    del attentions, trace
    times = interleaved({
        "hf": hf,
        "all heads": lambda: traced_forward(text, length, config, weights, engine, every),
    }, reps)
    hf_s = median(times["hf"])
    rows.append(row("c. all 144 heads captured ÷ HF GPT2Model eager output_attentions",
                    median(times["all heads"]) / hf_s, 1.0,
                    note=f"median {median(times['all heads']):.2f} s vs {hf_s:.2f} s; {reps} reps;"
                         f" patterns agree within {diff:.1e}",
                    seconds=median(times["all heads"]), reference_seconds=hf_s,
                    all_seconds=times, reps=reps, max_pattern_diff=diff))
    return rows


def bench_cuda(reps: int) -> list[dict]:
    try:
        import torch
    except ImportError:
        return [row("g. CUDA", None, 1.2, note="skipped: torch is not installed")]
    if not torch.cuda.is_available():
        why = "CPU-only build of torch" if torch.version.cuda is None else "no GPU visible"
        return [row(f"g. CUDA {n:,} tok, one head captured ÷ untraced SDPA", None, 1.2,
                    note=f"skipped: {why}") for n in (1024, 4096)]
    from attn_tracer.model.engine import Engine
    from attn_tracer.model.trace import Selection

    rows = []
    for length in (1024, 4096):
        config, weights = gpt2_small(n_ctx=length)
        text = long_text(length)
        ids = torch.as_tensor(token_ids(text, length)).cuda()
        P = torch_params(weights, "cuda")
        engine = Engine("torch", "cuda:0", "float32")
        one = Selection((0,), (0,), "patterns")
        reference_forward(P, ids, config)
        traced_forward(text, length, config, weights, engine, one)
        args = (text, length, config, weights, engine, one)
        times = interleaved({
            "untraced": lambda P=P, ids=ids, config=config: reference_forward(P, ids, config),
            "one head": lambda args=args: traced_forward(*args),
        }, reps)
        untraced = median(times["untraced"])
        rows.append(row(f"g. CUDA {length:,} tok, one head captured ÷ untraced SDPA",
                        median(times["one head"]) / untraced, 1.2,
                        note=f"{torch.cuda.get_device_name(0)}: median "
                             f"{median(times['one head']) * 1e3:.0f} ms vs {untraced * 1e3:.0f} ms",
                        all_seconds=times, reps=reps))
        del P, weights
        torch.cuda.empty_cache()
    return rows


# ── d: peak memory ────────────────────────────────────────────────────────────────────────────

def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(mode: str) -> None:
    """One forward in this fresh process; prints {"rise_kb", "method", …} as JSON."""
    import resource

    import torch

    from attn_tracer.model.engine import Engine
    from attn_tracer.model.trace import Selection

    config, weights = gpt2_small()
    length = 1024
    text = long_text(length)
    ids = torch.as_tensor(token_ids(text, length))
    P = torch_params(weights) if mode == "untraced" else None
    engine = Engine("torch", "cpu", "float32")
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to now
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss"
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "untraced":
        reference_forward(P, ids, config)
    else:
        traced_forward(text, length, config, weights, engine, Selection((0,), (0,), "patterns"))
    if method == "ru_maxrss":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rise = peak - maxrss_before
    else:
        peak = _status_kb("VmHWM")
        rise = peak - before
    print(json.dumps({"mode": mode, "rss_before_kb": before, "peak_kb": peak, "rise_kb": rise,
                      "method": method}))


def bench_memory() -> list[dict]:
    out = {}
    for mode in ("untraced", "traced"):
        done = subprocess.run([sys.executable, __file__, "--memory-child", mode],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return [row("d. peak memory, one head captured − untraced", None, 100, unit="MB",
                        note=f"child failed: {done.stderr[-300:]}")]
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    extra = (out["traced"]["rise_kb"] - out["untraced"]["rise_kb"]) / 1024
    return [row("d. peak memory, one head captured − untraced", extra, 100, unit="MB",
                note=f"forward's own peak: traced {out['traced']['rise_kb'] / 1024:.0f} MB, "
                     f"untraced {out['untraced']['rise_kb'] / 1024:.0f} MB "
                     f"({out['traced']['method']})", children=out)]


def _sibling(name: str):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ── e: JSON ───────────────────────────────────────────────────────────────────────────────────

def bench_json_figure() -> list[dict]:
    path = Path(__file__).with_name("bench_json.py")
    name = "e. one 1024×1024 pattern written as JSON"
    if not path.exists():
        return [row(name, None, 1.0, unit="s", note="skipped: benchmarks/bench_json.py is missing")]
    module = _sibling("bench_json")
    if not hasattr(module, "measure"):
        return [row(name, None, 1.0, unit="s", note="skipped: bench_json.py has no measure()")]
    result = module.measure()
    seconds = result.get("json_1024x1024_s")
    if not isinstance(seconds, int | float):
        return [row(name, None, 1.0, unit="s", note=f"measure() returned {sorted(result)}",
                    details=result)]
    note = f"median of {result.get('runs', '?')} runs"
    if isinstance(result.get("stdlib_json_1024x1024_s"), int | float):
        note += f"; stdlib json.dumps takes {result['stdlib_json_1024x1024_s']:.2f} s"
    return [row(name, seconds, 1.0, unit="s", note=note, details=result)]


# ── h: attn attribute ─────────────────────────────────────────────────────────────────────────

def bench_attribute_figure(reps: int) -> list[dict]:
    module = _sibling("bench_attribute")
    out = []
    for r in module.measure(reps):
        details = {k: v for k, v in r.items() if k not in ("figure", "value", "target")}
        out.append(row(r["figure"], r["value"], r["target"],
                       note=f"median {r['seconds']:.2f} s vs {r['reference_seconds']:.2f} s; "
                            f"{reps} reps", **details))
    return out


# ── p: attn patch against HF forward hooks ───────────────────────────────────────────────────

def bench_patch_figure(reps: int) -> list[dict]:
    out = []
    for r in _sibling("bench_patch").measure(reps):
        for kind in ("wall", "cpu"):
            ratio = r[f"{kind}_ratio"]
            out.append({**row(f"p1. attn patch IOI grids, --engine {r['engine']}: HF hooks ÷ attn "
                              f"({kind} time)", ratio, 3.0,
                              note=f"{r[f'attn_{kind}']:.1f} s vs {r[f'hf_{kind}']:.1f} s; "
                                   f"{r['runs']} of {r['cells']} cells in {r['forwards']} "
                                   f"forwards vs {r['hf_forwards']}", **r),
                        "pass": ratio >= 3.0, "higher_is_better": True})
    return out


# ── l: outputs that scale ─────────────────────────────────────────────────────────────────────

def bench_outputs_figure(quick: bool) -> list[dict]:
    module = _sibling("bench_outputs")
    return [{**r, "figure": f"l. {r['figure']}"} for r in module.rows(quick)]


# ── f: NumPy / torch crossover ────────────────────────────────────────────────────────────────

def bench_crossover(lengths: tuple[int, ...], reps: int) -> list[dict]:
    attn = attn_command()
    rows, table = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.txt"
        path.write_text(long_text(max(lengths)), "utf-8")
        for n in lengths:
            r = reps if n <= 256 else 1  # the long ones take seconds each: one round
            cmd = {e: [*attn, "trace", "--file", str(path), "--max-length", str(n),
                       "--n-ctx", str(max(n, 1024)), "--engine", e] for e in ("numpy", "torch")}
            times = interleaved({e: (lambda c=c: wall(c)) for e, c in cmd.items()}, r)
            table[n] = {e: median(t) for e, t in times.items()}
    # The shortest length from which torch is at least as fast at every longer length measured.
    first_torch = next((n for i, n in enumerate(lengths)
                        if all(table[m]["torch"] <= table[m]["numpy"] for m in lengths[i:])), None)
    for n in lengths:
        ratio = table[n]["torch"] / table[n]["numpy"]
        rows.append(row(f"f. attn trace {n:>4} tok: torch ÷ numpy", ratio, None,
                        note=f"numpy {table[n]['numpy']:.2f} s, torch {table[n]['torch']:.2f} s",
                        numpy_seconds=table[n]["numpy"], torch_seconds=table[n]["torch"]))
    from attn_tracer.model.engine import TORCH_FROM_LEN

    rows.append(row("f. torch wins from (engine.TORCH_FROM_LEN)", first_torch, None,
                    unit="tokens",
                    note=f"engine.TORCH_FROM_LEN is {TORCH_FROM_LEN}"
                         + ("" if first_torch is not None else "; torch never won here")))
    return rows


# ── h: attn heads ─────────────────────────────────────────────────────────────────────────────

def bench_heads_figure(reps: int) -> list[dict]:
    module = _sibling("bench_heads")
    result = module.measure(reps)
    return [row(r["figure"], r["value"], r["target"], unit=r["unit"], note=r["note"])
            for r in module.rows(result)]
# ── h, i: attn explore ────────────────────────────────────────────────────────────────────────

EXPLORE_MODES = ("qk", "float16", "float32")


def explore_child(mode: str) -> None:
    """attn explore's data for GPT-2-small's shape on 1,024 tokens, in this fresh process, with
    `mode`: qk (as built), or float16/float32 (every pattern kept instead of Q and K). Prints
    {"peak_kb", "rise_kb", …} as JSON; the qk run also times key presses in the app."""
    import asyncio

    from attn_tracer.analysis import heads as heads_module
    from attn_tracer.commands.run import Request
    from attn_tracer.explore import data as explore_data

    text = long_text(1024)
    r = Request(texts=[text], arch="gpt2", layers=12, max_length=1024)
    kept: list = []
    if mode != "qk":
        dtype = np.float16 if mode == "float16" else np.float32
        explore_data.q_k_names = lambda layers, kinds: ()  # no Q and K: the patterns instead
        hook = heads_module.HeadScorer.hook

        def keeping(self, layer):
            observe = hook(self, layer)

            def both(pattern):
                kept.append(self.engine.to_host(pattern).astype(dtype))
                return observe(pattern)

            return both

        heads_module.HeadScorer.hook = keeping
    from attn_tracer.model import pipeline  # noqa: F401 - imported before the high-water mark resets

    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "VmHWM (from process start)"
    start = time.perf_counter()
    data = explore_data.compute(r, lambda message: None, 160)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    out = {"mode": mode, "rss_before_kb": before, "peak_kb": peak, "rise_kb": peak - before,
           "kept_bytes": sum(int(x.nbytes) for x in kept) + sum(
               int(x.nbytes) for x in data.trace.tensors.values()),
           "compute_seconds": seconds, "method": method}
    if mode == "qk":
        stage_times = []
        for head in range(5):
            t = time.perf_counter()
            data.stages(5, head, 0)
            stage_times.append(time.perf_counter() - t)
        out["stages_seconds"] = statistics.median(stage_times)
        out["keys_seconds"] = asyncio.run(_press_times(data))
        out["peak_with_app_kb"] = _status_kb("VmHWM")
    print(json.dumps(out))


async def _press_times(data) -> dict[str, dict[str, float]]:
    """Median seconds from a key press to the frame after it, in the app run headless: wall
    time, and the CPU time of the process (what the press costs, whatever else the machine
    runs)."""
    from attn_tracer.explore.app import ExploreApp

    app = ExploreApp(data)
    times: dict[str, dict[str, list[float]]] = {}
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()
        for key, name in (("right_square_bracket", "next head (its stages computed)"),
                          ("down", "next query"), ("t", "next stage"),
                          ("pagedown", "page down"), ("n", "numbers on/off")):
            for _ in range(5):
                wall, cpu = time.perf_counter(), time.process_time()
                await pilot.press(key)
                await pilot.pause()
                got = times.setdefault(name, {"wall": [], "cpu": []})
                got["wall"].append(time.perf_counter() - wall)
                got["cpu"].append(time.process_time() - cpu)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def bench_explore_memory() -> list[dict]:
    if importlib.util.find_spec("textual") is None:
        return [row("j. attn explore, GPT-2 small, 1,024 tok: peak memory", None, None,
                    unit="MB", note="skipped: textual is not installed")]
    out = {}
    for mode in EXPLORE_MODES:
        done = subprocess.run([sys.executable, __file__, "--explore-child", mode],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return [row("j. attn explore, GPT-2 small, 1,024 tok: peak memory", None, None,
                        unit="MB", note=f"{mode} child failed: {done.stderr[-300:]}")]
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    # MB = 10⁶ bytes here, as the issue counts 144 patterns of 1,024² float32 as 604 MB.
    mb = {m: out[m]["rise_kb"] * 1024 / 1e6 for m in EXPLORE_MODES}
    kept = {m: out[m]["kept_bytes"] / 1e6 for m in EXPLORE_MODES}
    qk = out["qk"]
    rows = [row("j. attn explore, GPT-2 small, 1,024 tok: peak memory, Q and K cached", mb["qk"],
                None, unit="MB", note=f"keeps {kept['qk']:.0f} MB; whole process "
                f"{qk['peak_kb'] * 1.024e-3:.0f} MB, "
                f"{qk['peak_with_app_kb'] * 1.024e-3:.0f} MB with the app; computed in "
                f"{qk['compute_seconds']:.1f} s ({qk['method']})",
                children=out)]
    for m in ("float16", "float32"):
        rows.append(row(f"j. the same, every pattern kept as {m} instead", mb[m], None,
                        unit="MB", note=f"keeps {kept[m]:.0f} MB; whole process "
                        f"{out[m]['peak_kb'] * 1.024e-3:.0f} MB"))
    rows.append(row("j. one head's four stages from Q and K (1,024 × 1,024)",
                    qk["stages_seconds"] * 1e3, None, unit="ms", note="median of 5 heads"))
    for name, seconds in qk["keys_seconds"].items():
        rows.append(row(f"j. in the app (160 × 50), CPU time of a key press: {name}",
                        seconds["cpu"] * 1e3, 100, unit="ms",
                        note=f"wall {seconds['wall'] * 1e3:.0f} ms to the next frame; "
                             "median of 5 presses"))
    return rows


CHILD_CPU: dict[str, list[float]] = {}  # on_a_terminal's CPU seconds (user + system), by label


def on_a_terminal(cmd: list[str], env: dict | None = None, label: str = "") -> float:
    """Wall seconds of `cmd` with stdin, stdout and stderr on a 160 × 50 pseudo-terminal; its
    CPU seconds go to CHILD_CPU[label] (robust where other work shares the machine)."""
    import fcntl
    import pty
    import resource
    import select
    import struct
    import termios

    used = resource.getrusage(resource.RUSAGE_CHILDREN)

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave,
                            env={**os.environ, "TERM": "xterm-256color", **(env or {})})
    os.close(slave)
    while True:  # drain the terminal, or the child blocks writing to it
        ready, _, _ = select.select([master], [], [], 0.05)
        if ready:
            try:
                if not os.read(master, 65536):
                    break
            except OSError:
                break
        elif proc.poll() is not None:
            break
    code = proc.wait()
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CHILD_CPU.setdefault(label, []).append(after.ru_utime + after.ru_stime - used.ru_utime
                                           - used.ru_stime)
    os.close(master)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}")
    return elapsed


def bench_explore_startup(reps: int) -> list[dict]:
    if importlib.util.find_spec("textual") is None:
        return [row("k. attn explore first frame − attn trace", None, 0.5, unit="s",
                    note="skipped: textual is not installed")]
    from attn_tracer.explore.command import SERIAL_IMPORT

    attn = attn_command()
    explore = [*attn, "explore", SHORT, "--exit-after-first-frame"]
    cmds = {"trace": ([*attn, "trace", SHORT], None), "explore": (explore, None),
            "explore, serial import": (explore, {SERIAL_IMPORT: "1"}),
            "import textual.app": ([sys.executable, "-c", "import textual.app"], None)}
    times = interleaved({k: (lambda c=c, e=e, k=k: on_a_terminal(c, e, k))
                         for k, (c, e) in cmds.items()}, reps)
    m = {k: median(v) for k, v in times.items()}
    cpu = {k: median(CHILD_CPU[k]) for k in cmds}
    return [row(f'k. attn explore "{SHORT}" to its first frame − attn trace', m["explore"] -
                m["trace"], 0.5, unit="s", note=f"median {m['explore']:.3f} s vs {m['trace']:.3f} s"
                f" on a terminal; CPU {cpu['explore']:.3f} s vs {cpu['trace']:.3f} s; "
                f"{reps} rounds", all_seconds=times, cpu_seconds=CHILD_CPU, reps=reps),
            row("k. the same, Textual imported after the run (no thread)",
                m["explore, serial import"] - m["trace"], None, unit="s",
                note=f"median {m['explore, serial import']:.3f} s, CPU "
                     f"{cpu['explore, serial import']:.3f} s"),
            row('k. python -c "import textual.app"', m["import textual.app"], None, unit="s",
                note="the interpreter's start included")]


# ── main ──────────────────────────────────────────────────────────────────────────────────────

def show(rows: list[dict], header: bool = True) -> None:
    def fmt(v, unit):
        if v is None:
            return "—"
        if unit == "bool":
            return "yes" if v else "no"
        if unit == "tokens":
            return f"{v:g}"
        return f"{v:.3g} {unit}" if unit != "×" else f"{v:.2f}×"

    if header:
        title = f"{'figure':<66} {'value':>10} {'target':>9} {'':>5}  note"
        print(title)
        print("─" * len(title))
    for r in rows:
        verdict = {True: "pass", False: "MISS", None: ""}[r["pass"]]
        at_least = "≥" if r.get("higher_is_better") else "≤"
        target = "" if r["target"] is None else (
            "no" if r["unit"] == "bool" else f"{at_least} {fmt(r['target'], r['unit'])}")
        print(f"{r['figure']:<66} {fmt(r['value'], r['unit']):>10} {target:>9} {verdict:>5}  "
              f"{r['note']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and lengths")
    parser.add_argument("--only", default="abcdefghijklp", help="which figures, e.g. --only ab")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--memory-child", choices=("traced", "untraced"), help=argparse.SUPPRESS)
    parser.add_argument("--explore-child", choices=EXPLORE_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if args.explore_child:
        explore_child(args.explore_child)
        return
    reps = {"startup": 3 if args.quick else 7, "forward": 1 if args.quick else 3,
            "crossover": 1 if args.quick else 2, "cuda": 3 if args.quick else 10,
            "heads": 1 if args.quick else 3, "explore": 3 if args.quick else 7}
    lengths = (16, 256, 1024) if args.quick else LENGTHS
    have_hf = importlib.util.find_spec("transformers") is not None
    started = time.perf_counter()
    rows: list[dict] = []
    steps = {"a": lambda: bench_startup(reps["startup"]),
             "b": lambda: bench_forward(reps["forward"], have_hf and "c" in args.only),
             "d": bench_memory,
             "e": bench_json_figure,
             "f": lambda: bench_crossover(lengths, reps["crossover"]),
             "g": lambda: bench_cuda(reps["cuda"]),
             "h": lambda: bench_heads_figure(reps["heads"]),
             "i": lambda: bench_attribute_figure(reps["forward"]),
             "j": bench_explore_memory,
             "k": lambda: bench_explore_startup(reps["explore"]),
             "l": lambda: bench_outputs_figure(args.quick),
             "p": lambda: bench_patch_figure(1)}
    for key, step in steps.items():
        if key in args.only or (key == "b" and "c" in args.only):
            start = time.perf_counter()
            new = step()
            show(new, header=False)
            rows.extend(new)
            print(f"  ({key}: {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    print()
    show(rows)
    document = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(),
                "repetitions": reps, "seconds": time.perf_counter() - started,
                "figures": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2, default=float) + "\n", "utf-8")
    print(f"\nwrote {args.out} ({document['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
