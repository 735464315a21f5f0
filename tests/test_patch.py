"""`attn patch` against a reference nobody here wrote: Hugging Face GPT-2 with forward hooks.

The model is `GPT2LMHeadModel` (eager attention), random-initialised, its LayerNorms and biases
drawn away from 1 and 0, saved with `save_pretrained` and loaded through `--weights`. The
reference runs the definition: one HF forward per cell, with one hook that replaces one
activation by the other run's (caught by the same hooks in HF's clean and corrupted runs):

- resid_pre: a forward pre-hook on block L replacing its input hidden state at a position;
- attn_out, mlp_out: a forward hook on block L's `attn` (its first output) or `mlp`;
- z: a pre-hook on `attn.c_proj` replacing one head's slice of its input, merge(Z) (at every
  position, or at one with --per-position);
- q, k, v: a forward hook on `attn.c_attn` replacing one head's slice of Q, K or V;
- pattern: a forward hook on `attn` that recomputes the block's output from HF's own Q, K, V
  (caught on `c_attn`) with one head's softmax(Q·Kᵀ/√d_head + mask) replaced, through HF's
  `c_proj`.

The metric is read off HF's logits; the grids are normalised as the issue defines. Both
directions, both engines, every target.

Tolerance (tests/tolerance.py): every logit of the two computations agrees within
t = tolerance(max |logit|, float32, S) with pair=True, S the largest |score| entering a softmax
(measured on HF's Q and K). The metric is a difference of two logits (or log-softmax, within
2t too: log Σ exp moves by at most the largest change of a logit), so within 2t; the
normalised value r = (m − c₀)/(c₁ − c₀) then within (4t + |r|·4t) / |c₁ − c₀|: its numerator
and denominator each subtract two metrics.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from attn_tracer.commands import patch as patch_command  # noqa: E402
from attn_tracer.model import tokens  # noqa: E402
from tolerance import tolerance  # noqa: E402

pytestmark = pytest.mark.slow

D_MODEL, HEADS, LAYERS = 64, 4, 3
D_HEAD = D_MODEL // HEADS
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
TARGET, VERSUS = " Mary", " John"
ENGINES = ("numpy", "torch")


def randomize(hf, seed: int) -> None:
    """LayerNorm gains and biases, and every bias, away from HF's 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif name.endswith("attn.c_attn.weight"):
                param.mul_(8.0)  # patterns that are not nearly uniform
        hf.transformer.ln_f.weight.mul_(20.0)  # logits that spread over several units


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(11)
    config = transformers.GPT2Config(n_embd=D_MODEL, n_head=HEADS, n_layer=LAYERS,
                                     n_positions=64, vocab_size=50257,
                                     attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(config).eval()
    randomize(hf, 11)
    directory = tmp_path_factory.mktemp("patch") / "gpt2-tiny"
    hf.save_pretrained(directory)
    return hf, directory


class HF:
    """Forwards of the HF model with one activation replaced, and the activations to take."""

    def __init__(self, hf) -> None:
        self.hf = hf
        self.ids = {name: torch.tensor([tokens.encode(text)])
                    for name, text in (("clean", CLEAN), ("corrupt", CORRUPT))}
        self.length = self.ids["clean"].shape[1]
        self.caught = {name: self.catch(name) for name in self.ids}
        self.t, self.v = tokens.encode(TARGET)[0], tokens.encode(VERSUS)[0]

    def catch(self, name: str) -> dict:
        caught: dict = {}
        handles = []
        for layer, block in enumerate(self.hf.transformer.h):
            handles += [
                block.register_forward_pre_hook(
                    lambda m, args, kwargs, layer=layer: caught.__setitem__(
                        ("resid_pre", layer), _hidden(args, kwargs).clone()), with_kwargs=True),
                block.attn.register_forward_hook(
                    lambda m, args, out, layer=layer: caught.__setitem__(
                        ("attn_out", layer), out[0].clone())),
                block.mlp.register_forward_hook(
                    lambda m, args, out, layer=layer: caught.__setitem__(
                        ("mlp_out", layer), out.clone())),
                block.attn.c_proj.register_forward_pre_hook(
                    lambda m, args, layer=layer: caught.__setitem__(("z", layer),
                                                                    args[0].clone())),
                block.attn.c_attn.register_forward_hook(
                    lambda m, args, out, layer=layer: caught.__setitem__(("qkv", layer),
                                                                         out.clone())),
            ]
        try:
            with torch.no_grad():
                out = self.hf(input_ids=self.ids[name], output_attentions=True)
        finally:
            for h in handles:
                h.remove()
        for layer, a in enumerate(out.attentions):
            caught["pattern", layer] = a.clone()
        caught["logits"] = out.logits[0].double().numpy()
        return caught

    def metric(self, logits: np.ndarray, position: int, kind: str) -> float:
        row = logits[position]
        if kind == "diff":
            return float(row[self.t] - row[self.v])
        logprob = row[self.t] - (np.log(np.exp(row - row.max()).sum()) + row.max())
        return float(logprob) if kind == "logprob" else float(np.exp(logprob))

    def patched(self, base: str, source: str, target: str, layer: int, head: int | None,
                position: int | None, kind: str, at: int) -> float:
        """One forward of `base` with one activation from `source`: the metric at `at`."""
        src = self.caught[source]
        block = self.hf.transformer.h[layer]
        p = slice(None) if position is None else position

        def heads(cols: int) -> slice:
            return slice(cols + head * D_HEAD, cols + (head + 1) * D_HEAD)

        if target == "resid_pre":
            def pre(m, args, kwargs):
                x = _hidden(args, kwargs).clone()
                x[:, p] = src["resid_pre", layer][:, p]
                if args:
                    return (x, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": x}
            handle = block.register_forward_pre_hook(pre, with_kwargs=True)
        elif target == "attn_out":
            def post(m, args, out):
                x = out[0].clone()
                x[:, p] = src["attn_out", layer][:, p]
                return (x, *out[1:])
            handle = block.attn.register_forward_hook(post)
        elif target == "mlp_out":
            def post(m, args, out):
                x = out.clone()
                x[:, p] = src["mlp_out", layer][:, p]
                return x
            handle = block.mlp.register_forward_hook(post)
        elif target == "z":
            def pre(m, args):
                x = args[0].clone()
                x[:, p, heads(0)] = src["z", layer][:, p, heads(0)]
                return (x,)
            handle = block.attn.c_proj.register_forward_pre_hook(pre)
        elif target in ("q", "k", "v"):
            cols = heads("qkv".index(target) * D_MODEL)

            def post(m, args, out):
                x = out.clone()
                x[..., cols] = src["qkv", layer][..., cols]
                return x
            handle = block.attn.c_attn.register_forward_hook(post)
        else:  # pattern: the block's output again, from HF's Q, K, V, one head's pattern replaced
            caught = {}
            grab = block.attn.c_attn.register_forward_hook(
                lambda m, args, out: caught.__setitem__("qkv", out))

            def post(m, args, out):
                q, k, v = (caught["qkv"][..., i * D_MODEL:(i + 1) * D_MODEL]
                           .reshape(1, -1, HEADS, D_HEAD).transpose(1, 2) for i in range(3))
                scores = q @ k.transpose(-1, -2) / D_HEAD**0.5
                n = scores.shape[-1]
                causal = torch.ones(n, n, dtype=torch.bool).tril()
                pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
                pattern[:, head] = src["pattern", layer][:, head]
                z = (pattern @ v).transpose(1, 2).reshape(1, n, D_MODEL)
                return (m.c_proj(z), *out[1:])
            handle = block.attn.register_forward_hook(post)
        try:
            with torch.no_grad():
                logits = self.hf(input_ids=self.ids[base]).logits[0].double().numpy()
        finally:
            handle.remove()
            if target == "pattern":
                grab.remove()
        return self.metric(logits, at, kind)

    def gain(self) -> float:
        """S: the largest |Q·Kᵀ/√d_head| entering a softmax, in either run."""
        top = 1.0
        for caught in self.caught.values():
            for layer in range(LAYERS):
                qkv = caught["qkv", layer]
                q, k = (qkv[..., i * D_MODEL:(i + 1) * D_MODEL].reshape(1, -1, HEADS, D_HEAD)
                        .transpose(1, 2) for i in range(2))
                s = (q @ k.transpose(-1, -2) / D_HEAD**0.5).tril()
                top = max(top, float(s.abs().max()))
        return top


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@pytest.fixture(scope="module")
def hf(model):
    return HF(model[0])


def reference(ref: HF, target: str, direction: str, per_position: bool, kind: str,
              at: int) -> tuple[np.ndarray, float, float]:
    """The normalised grid, and the two baselines, one HF forward per cell."""
    clean = ref.metric(ref.caught["clean"]["logits"], at, kind)
    corrupted = ref.metric(ref.caught["corrupt"]["logits"], at, kind)
    base, source = ("corrupt", "clean") if direction == "denoise" else ("clean", "corrupt")
    n = ref.length
    if target in ("resid_pre", "attn_out", "mlp_out"):
        shape, cells = (LAYERS, n), [((L, p), None, p) for L in range(LAYERS) for p in range(n)]
    elif target == "z" and per_position:
        shape = (LAYERS, HEADS, n)
        cells = [((L, h, p), h, p) for L in range(LAYERS) for h in range(HEADS) for p in range(n)]
    else:
        shape, cells = (LAYERS, HEADS), [((L, h), h, None) for L in range(LAYERS)
                                         for h in range(HEADS)]
    grid = np.empty(shape)
    for index, head, position in cells:
        grid[index] = ref.patched(base, source, target, index[0], head, position, kind, at)
    return (grid - corrupted) / (clean - corrupted), clean, corrupted


def ours(model, engine: str, targets: list[str], direction: str, per_position: bool = False,
         metric: str = "diff", position: int | None = None):
    request = patch_command.PatchRequest(
        {"texts": [CLEAN], "weights": str(model[1]), "engine": engine}, corrupt=CORRUPT,
        target=TARGET, versus=VERSUS if metric == "diff" else None, patch=targets,
        direction=direction, per_position=per_position, metric=metric, position=position)
    return patch_command.compute(request, lambda message: None)


def check(result, ref: HF, direction: str, per_position: bool = False, kind: str = "diff"):
    at = result.position
    logit_scale = float(np.abs([ref.caught[r]["logits"][at] for r in ref.caught]).max())
    t = tolerance(logit_scale, "float32", ref.gain(), pair=True)
    for grid in result.grids:
        want, clean, corrupted = reference(ref, grid.target, direction, per_position, kind, at)
        den = abs(clean - corrupted)
        # A probability moves by a factor e^(±2t) when its log does by 2t: relative to itself.
        raw = want * (clean - corrupted) + corrupted
        t_metric = 2 * t * (1.01 * max(abs(clean), abs(corrupted), np.abs(raw).max())
                            if kind == "prob" else 1.0)
        assert abs(result.clean - clean) <= t_metric
        assert abs(result.corrupted - corrupted) <= t_metric
        tol = (2 * t_metric + np.abs(want) * 2 * t_metric) / den
        assert grid.values.shape == want.shape
        bad = np.abs(grid.values - want) > tol
        worst = np.abs(grid.values - want).max()
        assert not bad.any(), (f"{grid.target} {direction}: worst {worst} over tolerance "
                               f"{tol.max():.3g} at {np.argwhere(bad)[:3]}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("direction", ("denoise", "noise"))
def test_every_grid_matches_hf_forward_hooks(model, hf, engine: str, direction: str):
    targets = ["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"]
    result = ours(model, engine, targets, direction)
    assert [g.target for g in result.grids] == targets
    check(result, hf, direction)
    # The grids are not trivially 0: the runs differ from the name's position on.
    assert np.abs(result.grids[0].values).max() > 0.5


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("direction", ("denoise", "noise"))
def test_z_per_position_matches_hf(model, hf, engine: str, direction: str):
    result = ours(model, engine, ["z"], direction, per_position=True)
    assert result.grids[0].axes == ("layer", "head", "position")
    check(result, hf, direction, per_position=True)


@pytest.mark.parametrize(("kind", "position"), [("logprob", 12), ("prob", None)])
def test_other_metrics_and_position_match_hf(model, hf, kind: str, position: int | None):
    result = ours(model, "numpy", ["resid_pre", "z"], "denoise", metric=kind, position=position)
    assert result.position == (13 if position is None else position)
    check(result, hf, "denoise", kind=kind)
