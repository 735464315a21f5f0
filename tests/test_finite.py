"""No NaN ever: non-finite weights are refused at load, and a run whose activations overflow ends
with one line naming the first step where they did, with no output and no file left behind.

References: Hugging Face `GPT2LMHeadModel` (forward hooks say which of its modules first
produces a non-finite value for a checkpoint with one huge weight); the `safetensors` package
writes the poisoned files; and for a deep random stack, the stack recomputed here in float64
with torch from the formula says at which step the true values first leave float32's range.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st_numpy = pytest.importorskip("safetensors.numpy")

from typer.testing import CliRunner  # noqa: E402  (after the importorskip guards)

from attn_tracer.cli import app  # noqa: E402
from attn_tracer.errors import AttnError  # noqa: E402
from attn_tracer.model import tokens  # noqa: E402
from attn_tracer.model.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from attn_tracer.model.config import Config  # noqa: E402
from attn_tracer.model.engine import select_engine  # noqa: E402
from attn_tracer.model.pipeline import run  # noqa: E402
from attn_tracer.model.trace import Selection  # noqa: E402
from attn_tracer.model.weights import random_weights  # noqa: E402
from conftest import check_one_line_error  # noqa: E402

VOCAB = 50257
F32_MAX = float(np.finfo(np.float32).max)
TEXT = "The cat sat on the mat"
DEEP = ["--d-model", "8", "--heads", "1", "--layers", "150", "--layer", "149", "--engine",
        "numpy"]  # the example: a deep random stack that overflows float32
runner = CliRunner()


@pytest.fixture(scope="module")
def gpt2_state(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(7)
    config = transformers.GPT2Config(n_embd=32, n_head=2, n_layer=2, n_positions=32,
                                     vocab_size=VOCAB, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(config).eval()
    root = tmp_path_factory.mktemp("finite")
    hf.save_pretrained(root / "saved")
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()
             if not k.endswith(".attn.bias") and k != "lm_head.weight"}
    return hf, root, state


def poisoned(root: Path, state: dict, key: str, index: tuple, value: float,
             dtype=np.float32) -> Path:
    """A save_pretrained folder whose `key` holds `value` at `index`."""
    folder = root / f"poisoned-{key}-{value}-{np.dtype(dtype).name}"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text((root / "saved" / "config.json").read_text())
    tensors = {k: v.astype(dtype) for k, v in state.items()}
    with np.errstate(over="ignore"):
        tensors[key][index] = value
    st_numpy.save_file(tensors, str(folder / "model.safetensors"))
    return folder


# ── non-finite weights: refused at load, with the tensor's name ────────────────────────────────

@pytest.mark.parametrize(("value", "dtype"), [
    (np.nan, np.float32), (np.inf, np.float32), (-np.inf, np.float32), (np.inf, np.float16),
    (1e300, np.float64),  # finite in the file, inf once in float32
], ids=["nan", "inf", "-inf", "f16-inf", "f64-beyond-f32"])
def test_non_finite_weights_are_refused_naming_the_tensor(gpt2_state, value, dtype) -> None:
    _, root, state = gpt2_state
    folder = poisoned(root, state, "transformer.h.1.attn.c_proj.weight", (3, 5), value, dtype)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(folder))
    message = str(info.value)
    assert "'h.1.attn.c_proj.weight'" in message and "[3, 5]" in message
    assert "must be finite" in message
    result = runner.invoke(app, ["trace", TEXT, "--weights", str(folder), "--json"])
    check_one_line_error(result, 1, "h.1.attn.c_proj.weight", "must be finite")


# ── a finite weight that overflows: the first step, as transformers sees it ────────────────────

# Our steps that each Hugging Face module's output covers.
HF_MODULE_STEPS = {
    "ln_1": {"ln_1"},
    "attn.c_attn": {f"attn.{n}{s}" for n in "qkv" for s in ("", ".split", ".heads")},
    "attn": {"attn.scores", "attn.scaled", "attn.masked", "attn.pattern", "attn.z",
             "attn.z.transpose", "attn.z.merge", "attn.out"},
    "ln_2": {"resid_mid", "ln_2"},
    "mlp.c_fc": {"mlp.in"},
    "mlp": {"mlp.gelu", "mlp.out", "resid_post"},
}


def hf_first_non_finite(hf, text: str) -> tuple[int, str]:
    """(layer, module) of the first module of a GPT-2 block whose output is not finite."""
    seen: list[tuple[int, str]] = []
    hooks = []
    for layer, block in enumerate(hf.transformer.h):
        for name in ("ln_1", "attn.c_attn", "attn", "ln_2", "mlp.c_fc", "mlp"):
            module = block.get_submodule(name)

            def hook(module, args, output, where=(layer, name)):
                out = output[0] if isinstance(output, tuple) else output
                if not torch.isfinite(out).all():
                    seen.append(where)

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            hf(input_ids=torch.tensor([tokens.encode(text)]))
    finally:
        for h in hooks:
            h.remove()
    assert seen, "the reference did not overflow: the test needs a larger weight"
    # Hooks fire when a module returns; attn returns after c_attn, its child.
    order = ["ln_1", "attn.c_attn", "attn", "ln_2", "mlp.c_fc", "mlp"]
    return min(seen, key=lambda w: (w[0], order.index(w[1])))


@pytest.mark.parametrize(("key", "index"), [
    ("transformer.h.1.attn.c_attn.weight", (0, 0)),
    ("transformer.h.0.ln_2.weight", (4,)),
    ("transformer.h.1.mlp.c_fc.weight", (0, 3)),
    ("transformer.wte.weight", (464, 0)),  # the row of "The"
], ids=["c_attn", "ln_2", "mlp-in", "wte"])
def test_a_huge_weight_fails_at_the_step_transformers_overflows(gpt2_state, key, index) -> None:
    _, root, state = gpt2_state
    folder = poisoned(root, state, key, index, 3e38)  # finite: loads, then overflows
    reference = transformers.GPT2LMHeadModel.from_pretrained(folder,
                                                             attn_implementation="eager").eval()
    layer, module = hf_first_non_finite(reference, TEXT)
    result = runner.invoke(app, ["trace", TEXT, "--weights", str(folder), "--json", "--predict"])
    line = check_one_line_error(result, 1, "the activations stop being finite at step")
    step = line.split("at step ")[1].split(":")[0]
    assert step.startswith(f"blocks.{layer}."), (line, layer, module)
    assert step.split(".", 2)[2] in HF_MODULE_STEPS[module], (line, module)


def test_a_layer_norm_whose_variance_overflows_is_refused_not_zeroed(gpt2_state) -> None:
    """A residual stream of ~1e37 is finite, but its variance is not: float32 LayerNorm then
    divides by inf and returns b, a finite answer that is wrong (transformers does exactly
    that). attn refuses at that LayerNorm instead."""
    _, root, state = gpt2_state
    folder = poisoned(root, state, "transformer.h.1.mlp.c_proj.weight", (0, 3), 3e38)
    reference = transformers.GPT2LMHeadModel.from_pretrained(folder,
                                                             attn_implementation="eager").eval()
    seen = {}
    hook = reference.transformer.ln_f.register_forward_hook(
        lambda module, args, output: seen.update(x=args[0], y=output))
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([tokens.encode(TEXT)])).logits
    hook.remove()
    assert torch.isfinite(logits).all() and torch.isfinite(seen["x"]).all()
    assert seen["x"].double().var(dim=-1, unbiased=False).max() > F32_MAX  # beyond float32
    result = runner.invoke(app, ["trace", TEXT, "--weights", str(folder), "--json", "--predict"])
    check_one_line_error(result, 1, "at step ln_f:")


# ── a deep random stack: where the true values leave float32's range ──────────────────────────

def float64_overflow_window(layers: int) -> tuple[str, int, int]:
    """Where float32 must overflow, from the stack recomputed in float64 with torch from the
    formula (softmax(Q·Kᵀ/√d_head + mask)·V·W_O + b_O per layer, on a residual stream).

    A float32 dot product can overflow as soon as the products it adds do (Σ|qᵢ·kᵢ| beyond
    float32's range, in whatever order an engine adds them), and must once their sum does
    (|Σ qᵢ·kᵢ| beyond it). Returns (step, first layer where it can, first where it must); the
    step is the first whose values leave float32's range, and nothing before it can overflow.
    """
    weights = random_weights(Config(d_model=8, heads=1, layers=layers))
    # The stack's input, X = W_E[tokens] + P, as attn draws it (one layer is enough for that).
    one = Config(d_model=8, heads=1, layers=1)
    t, _ = run([TEXT], one, select_engine("numpy", "cpu", "float32", 8), random_weights(one),
               Selection((0,), (0,), "all"))
    x = torch.from_numpy(t.tensors["resid_pre"].astype(np.float64))
    n = x.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    can = None
    for layer in range(layers):
        p = {k.rsplit(".", 1)[1]: torch.from_numpy(v.astype(np.float64))
             for k, v in weights.params.items() if k.startswith(f"blocks.{layer}.attn.")}
        q, k, v = (x @ p[f"W_{n_}"] + p[f"b_{n_}"] for n_ in "QKV")
        for name, value in {"attn.q": q, "attn.k": k, "attn.v": v}.items():
            assert (value.abs().max() < F32_MAX / 8), (layer, name)  # far from overflowing
        scores = q @ k.mT
        if can is None and (q.abs() @ k.abs().mT).max() > F32_MAX:
            can = layer
        if scores.abs().max() > F32_MAX:
            return "attn.scores", can, layer
        pattern = torch.softmax((scores / 8**0.5).masked_fill(~causal, -torch.inf), dim=-1)
        x = x + (pattern @ v) @ p["W_O"] + p["b_O"]
        assert x.abs().max() < F32_MAX / 8, layer
    raise AssertionError("the float64 stack stayed within float32's range")


@pytest.fixture(scope="module")
def deep() -> tuple[str, int, int]:
    return float64_overflow_window(150)


def failed_step(result, deep) -> str:
    step, can, must = deep
    line = check_one_line_error(result, 1, "the activations stop being finite at step",
                                "float32", "--dtype float64")
    name = line.split("at step ")[1].split(":")[0]
    layer, rest = int(name.split(".")[1]), name.split(".", 2)[2]
    assert rest == step and can <= layer <= must, (line, deep)
    return name


@pytest.mark.slow
@pytest.mark.parametrize("output", [["--json", "--predict"], [], ["--stages"]],
                         ids=["json", "view", "stages"])
def test_a_deep_stack_fails_at_the_first_step_beyond_float32(deep, output) -> None:
    result = runner.invoke(app, ["trace", TEXT, *DEEP, *output])
    failed_step(result, deep)
    assert "internal error" not in result.stderr


def test_a_failed_run_leaves_no_file(deep, tmp_path: Path) -> None:
    for name in ("t.npz", "t.safetensors"):
        result = runner.invoke(app, ["trace", TEXT, *DEEP, "--save", str(tmp_path / name),
                                     "--svg", str(tmp_path / "t.svg")])
        failed_step(result, deep)
    assert list(tmp_path.iterdir()) == []


def test_the_pipeline_raises_naming_the_step(deep) -> None:
    config = Config(d_model=8, heads=1, layers=150)
    with pytest.raises(AttnError, match=r"at step blocks\.\d+\.attn\.scores:"):
        run([TEXT], config, select_engine("numpy", "cpu", "float32", 8), random_weights(config),
            Selection((149,), (0,)), predict_top_k=5)


def test_float64_carries_the_same_stack_and_the_json_has_no_nan() -> None:
    result = runner.invoke(app, ["trace", TEXT, *DEEP, "--dtype", "float64", "--json",
                                 "--predict"])
    assert result.exit_code == 0, result.stderr

    def constant(name):
        raise AssertionError(f"{name} in the JSON")

    doc = json.loads(result.stdout, parse_constant=constant)
    assert all(isinstance(e["prob"], float) for e in doc["predictions"][0]["top"])
    rows = np.asarray(doc["attention"][0]["weights"])
    np.testing.assert_allclose(rows.sum(axis=-1), 1.0, rtol=1e-12)


@pytest.mark.slow
def test_the_torch_engine_names_the_same_step(deep) -> None:
    # Its fused kernel for unseen heads never forms Q·Kᵀ: the step is found by running the
    # stack again step by step, so it is the same as NumPy's, within the window.
    result = runner.invoke(app, ["trace", TEXT, *DEEP[:-2], "--engine", "torch", "--json"])
    failed_step(result, deep)


@pytest.mark.slow
@pytest.mark.parametrize("warnings", ["default", "error"])
def test_overflow_warnings_never_reach_stderr(warnings: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": warnings, "NO_COLOR": "1"}
    env.pop("ATTN_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "attn_tracer", "trace", TEXT, *DEEP, "--json"],
                          capture_output=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == b""
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and "at step" in lines[0], lines
