"""Issue 7: the fused path (SDPA for layers and heads nobody looks at) computes what the explicit
path computes, and says so in the same steps.

The torch engine takes the fused path when `capture` is not "all". Both runs below use the torch
engine and the same weights; the fused one keeps each layer's merged Z, output and residual
through `Selection.extra`, so the outputs can be compared without switching the fused path off.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from attn_tracer.model import pipeline  # noqa: E402  after the importorskip guard
from attn_tracer.model.config import Config  # noqa: E402
from attn_tracer.model.engine import select_engine  # noqa: E402
from attn_tracer.model.trace import Selection  # noqa: E402
from attn_tracer.model.weights import random_weights  # noqa: E402
from tolerance import assert_close, step_tolerances  # noqa: E402

SMALL = {"d_model": 64, "heads": 4, "layers": 2}
TEXTS = ["The cat sat on the mat because it was tired.", "A short one"]
CROSS = ["Le chat est assis sur le tapis", "Bonjour"]


def outputs(config: Config, cross: bool) -> tuple[str, ...]:
    """Every layer's merged Z, attention output and residual: all that SDPA feeds downstream."""
    kinds = ("attn", "cross_attn") if cross else ("attn",)
    names = [f"blocks.{layer}.{kind}.{step}" for layer in range(config.layers) for kind in kinds
             for step in ("z", "z.merge", "out")]
    names += [f"blocks.{layer}.resid_post" for layer in range(config.layers)]
    return (*names, *(["ln_f"] if config.arch == "gpt2" else []))


def explicit_and_fused(texts, *, device="cpu", dtype="float32", capture="patterns",
                       padding="right", cross_texts=None, **options):
    config = Config(**{**SMALL, **options})
    weights = random_weights(config, cross=cross_texts is not None)
    engine = select_engine("torch", device, dtype, 1)
    everything = Selection(tuple(range(config.layers)), tuple(range(config.heads)), "all")
    shown = Selection((1,), (2,), capture, extra=outputs(config, cross_texts is not None))
    traces = [pipeline.run(texts, config, engine, weights, selection, padding=padding,
                           cross_texts=cross_texts)[0] for selection in (everything, shown)]
    return (*traces, config)


def heads_of(x, dims, heads):
    return np.take(x, list(heads), axis=dims.index("heads")) if "heads" in dims else x


CASES = {
    "one text": {"texts": TEXTS[:1]},
    "right padding": {"texts": TEXTS},
    "left padding": {"texts": TEXTS, "padding": "left"},
    "left padding, no mask": {"texts": TEXTS, "padding": "left", "mask": "none"},
    "no mask, no scale, no bias": {"texts": TEXTS[:1], "mask": "none", "scale": False,
                                   "bias": False},
    "stages": {"texts": TEXTS, "capture": "stages"},
    "gpt2": {"texts": TEXTS, "padding": "left", "arch": "gpt2"},
    "cross": {"texts": TEXTS, "cross_texts": CROSS},
    "cross, left padding": {"texts": TEXTS, "cross_texts": CROSS, "padding": "left"},
    "float64": {"texts": TEXTS, "dtype": "float64"},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_fused_and_explicit_paths_agree(case):
    options = dict(CASES[case])
    explicit, fused, config = explicit_and_fused(options.pop("texts"), **options)
    # The same story, step by step: names, formulas, shapes and dimension words.
    assert fused.steps == explicit.steps
    # To rounding (tolerance.py): SDPA sums in its own order, and Q·Kᵀ for one head and for all
    # heads block the matmul differently.
    tol = step_tolerances(explicit)
    for name in outputs(config, fused.cross is not None):
        dims = fused.step(name).dims
        expected = heads_of(explicit.tensors[name], dims, fused.selection.heads)
        assert fused.tensors[name].shape == expected.shape, name
        assert_close(name, fused.tensors[name], expected, tol[name])
    # The pattern (and its stages) of the one head shown is the explicit path's, to rounding;
    # layer 1's input went through SDPA.
    stages = ("pattern",) if fused.selection.capture == "patterns" else (
        "scores", "scaled", "masked", "pattern")
    kinds = ("attn", "cross_attn") if fused.cross is not None else ("attn",)
    kept = {f"blocks.1.{kind}.{stage}" for kind in kinds for stage in stages}
    kept &= {s.name for s in fused.steps}  # --no-scale and --mask none drop a stage
    assert set(fused.tensors) == kept | set(outputs(config, fused.cross is not None))
    for name in kept:
        expected = explicit.tensors[name][:, [2]]
        finite = np.isfinite(expected)
        assert (np.isfinite(fused.tensors[name]) == finite).all(), name  # the same −∞ entries
        assert_close(name, fused.tensors[name], expected, tol[name])


def test_pad_queries_give_zero_z_on_both_paths():
    explicit, fused, _ = explicit_and_fused(TEXTS, padding="left")
    pad = ~fused.inputs[1].valid
    assert pad.any()
    for trace in (explicit, fused):
        z = trace.tensors["blocks.0.attn.z.merge"]  # [batch, len, d_model]
        assert np.isfinite(z).all()
        assert (z[1][pad] == 0).all()
    pattern = explicit.tensors["blocks.1.attn.pattern"][1]  # [heads, q_len, k_len]
    assert (pattern[:, pad] == 0).all()


def test_the_fused_path_is_what_runs(monkeypatch):
    """The fused run must not secretly be explicit: SDPA runs once a layer, on every head."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return original(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    _, _, config = explicit_and_fused(TEXTS)  # the explicit run calls no SDPA at all
    assert len(calls) == config.layers
    assert all(shape[1] == config.heads for shape in calls)


# --- CUDA ------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("padding", ["right", "left"])
def test_cuda_matches_cpu(padding):
    config = Config(**SMALL)
    weights = random_weights(config)
    everything = Selection((0, 1), (0, 1, 2, 3), "all")
    traces = [pipeline.run(TEXTS, config, select_engine("torch", device, "float32", 1), weights,
                           everything, padding=padding)[0] for device in ("cpu", "cuda")]
    cpu, gpu = traces
    assert gpu.engine["device"].startswith("cuda")
    assert gpu.steps == cpu.steps
    for name, x in cpu.tensors.items():
        scale = max(1.0, float(np.abs(x[np.isfinite(x)]).max(initial=0)))  # raw Q·Kᵀ scores
        np.testing.assert_allclose(gpu.tensors[name], x, rtol=0, atol=1e-4 * scale, err_msg=name)
    # And the fused path on the GPU against the explicit one on the CPU.
    _, fused, _ = explicit_and_fused(TEXTS, device="cuda", padding=padding)
    for name in outputs(config, False):
        expected = heads_of(cpu.tensors[name], fused.step(name).dims, (2,))
        np.testing.assert_allclose(fused.tensors[name], expected, rtol=0, atol=1e-4,
                                   err_msg=name)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", ["attn", "gpt2"])
def test_half_precision_patterns_are_distributions(dtype, arch):
    explicit, fused, _ = explicit_and_fused(TEXTS, device="cuda", dtype=dtype,
                                                 padding="left", arch=arch)
    valid = np.stack([inp.valid for inp in explicit.inputs])  # [batch, len]
    for trace in (explicit, fused):
        assert trace.engine["dtype"] == dtype
        for name, x in trace.tensors.items():
            assert not np.isnan(x).any(), name
        for _, pattern in trace.patterns():
            sums = pattern.astype(np.float64).sum(-1)  # [batch, heads, q_len]
            real = np.broadcast_to(valid[:, None, :], sums.shape)
            np.testing.assert_allclose(sums[real], 1.0, atol=1e-2)
            assert (sums[~real] == 0).all()
