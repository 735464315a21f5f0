"""Real GPT-2 weights traced through `attn`, checked against Hugging Face `transformers`.

The reference is `GPT2LMHeadModel` itself (eager attention, `output_attentions=True`), built
with seeded random weights and saved with `save_pretrained`. The same weights are loaded from a
directory, from the bare .safetensors file, and as `gpt2` from a Hugging Face cache folder, and
traced on the NumPy and the torch engine, for single texts and padded batches: every layer's
attention pattern and the next-token logits must match the reference to float32's rounding
(tests/tolerance.py; about 1e-5 here).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402  (after the importorskip guards)

from attn_tracer.cli import app  # noqa: E402
from attn_tracer.commands.run import Request, build_config  # noqa: E402
from attn_tracer.errors import AttnError  # noqa: E402
from attn_tracer.model import tokens  # noqa: E402
from attn_tracer.model.engine import select_engine  # noqa: E402
from attn_tracer.model.pipeline import run  # noqa: E402
from attn_tracer.model.safetensors_io import CheckpointError  # noqa: E402
from attn_tracer.model.trace import Selection  # noqa: E402
from conftest import check_one_line_error as assert_error  # noqa: E402
from tolerance import assert_close, step_tolerances  # noqa: E402

N_CTX = 64
VOCAB = 50257  # the real vocabulary: our tokenizer emits ids up to 50256
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
SIZES = {  # name → (d_model, heads, layers, seed)
    "small": (64, 4, 2, 0),
    "wide": (96, 12, 2, 1),  # 12 heads as GPT-2 small has, d_head 8
}
TEXTS = {  # name → (texts, padding)
    "single": (["The quick brown fox jumps over the lazy dog"], "right"),
    "right": (["Hello world, this is attention", "Hi", "A cat sat."], "right"),
    "left": (["Hello world, this is attention", "Hi", "A cat sat."], "left"),
}
ENGINES = ("numpy", "torch")
SOURCES = ("dir", "file", "cache")
runner = CliRunner()


@dataclass
class Model:
    hf: transformers.GPT2LMHeadModel
    heads: int
    layers: int
    dir: Path  # save_pretrained: config.json + model.safetensors
    file: Path  # the bare .safetensors
    hub: Path  # a Hugging Face cache holding it as openai-community/gpt2

    def source(self, kind: str) -> str:
        return {"dir": str(self.dir), "file": str(self.file), "cache": "gpt2"}[kind]


def make_cache(hub: Path, folder: str, source_dir: Path) -> None:
    """Lay `source_dir` out as huggingface_hub does: refs/main, snapshots/ symlinked to blobs/."""
    repo = hub / folder
    snapshot = repo / "snapshots" / COMMIT
    for sub in (repo / "refs", repo / "blobs", snapshot):
        sub.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name in ("config.json", "model.safetensors"):
        data = (source_dir / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    out = {}
    for name, (d_model, heads, layers, seed) in SIZES.items():
        torch.manual_seed(seed)
        config = transformers.GPT2Config(
            n_embd=d_model, n_head=heads, n_layer=layers, n_positions=N_CTX, vocab_size=VOCAB,
            attn_implementation="eager",
        )
        hf = transformers.GPT2LMHeadModel(config).eval()
        assert hf.config._attn_implementation == "eager"
        root = tmp_path_factory.mktemp(f"gpt2-{name}")
        hf.save_pretrained(root / "saved")  # safetensors
        file = root / "weights.safetensors"
        file.write_bytes((root / "saved" / "model.safetensors").read_bytes())
        make_cache(root / "hub", "models--openai-community--gpt2", root / "saved")
        out[name] = Model(hf, heads, layers, root / "saved", file, root / "hub")
    return out


@pytest.fixture(scope="module")
def loaded(models: dict[str, Model]):
    """(size, source) → (Config, Weights) through run.build_config, as `--weights` loads them."""
    cache: dict[tuple[str, str], tuple] = {}
    mp = pytest.MonkeyPatch()

    def get(size: str, source: str):
        if (size, source) not in cache:
            m = models[size]
            mp.setenv("HF_HUB_CACHE", str(m.hub))
            # A bare file has no config: the head count comes from --heads.
            heads = m.heads if source == "file" else None
            cache[size, source] = build_config(Request(weights=m.source(source), heads=heads))
        return cache[size, source]

    yield get
    mp.undo()


@pytest.fixture(scope="module")
def reference(models: dict[str, Model]):
    """(size, texts) → the Hugging Face outputs for the batch our pipeline builds."""
    cache: dict[tuple[str, str], dict] = {}

    def get(size: str, texts_name: str) -> dict:
        if (size, texts_name) not in cache:
            cache[size, texts_name] = hf_forward(models[size].hf, *TEXTS[texts_name])
        return cache[size, texts_name]

    return get


@pytest.fixture(scope="module")
def tolerances(loaded):
    """(size, texts) → each step's tolerance against HF (both float32: a pair), from a full
    NumPy trace of the same run, which has every softmax's input (tests/tolerance.py)."""
    cache: dict[tuple[str, str], dict] = {}

    def get(size: str, texts_name: str) -> dict:
        if (size, texts_name) not in cache:
            config, weights = loaded(size, "dir")
            cache[size, texts_name] = step_tolerances(
                trace(config, weights, texts_name, "numpy", capture="all"))
        return cache[size, texts_name]

    return get


def hf_forward(hf, texts: list[str], padding: str) -> dict:
    """Pad with <|endoftext|> and mask by hand, then run HF (tokenizing is tested elsewhere)."""
    rows = [tokens.encode(t) for t in texts]
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), 50256, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, r in enumerate(rows):
        cols = slice(0, len(r)) if padding == "right" else slice(length - len(r), length)
        ids[b, cols], mask[b, cols] = r, 1
    # Left padding: the first real token is position 0, as in the pipeline.
    position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(position_ids), output_attentions=True,
                 output_hidden_states=True)
    last = length - 1 - np.argmax(mask[:, ::-1], axis=1)  # the last real position of each row
    logits = out.logits.numpy()
    return {
        "ids": ids,
        "valid": mask.astype(bool),
        "last": last,
        "patterns": [a.numpy() for a in out.attentions],  # [batch, heads, len, len] per layer
        "hidden": [h.numpy() for h in out.hidden_states],  # embeddings, each layer, after ln_f
        "logits": logits[np.arange(len(rows)), last],  # [batch, vocab]
    }


def trace(config, weights, texts_name: str, engine: str, *, heads=None, capture="patterns"):
    texts, padding = TEXTS[texts_name]
    selection = Selection(tuple(range(config.layers)),
                          tuple(range(config.heads)) if heads is None else heads, capture)
    t, _ = run(texts, config, select_engine(engine, "cpu", "float32", 8), weights, selection,
               padding=padding, predict_top_k=5)
    return t


def assert_patterns_match(t, ref: dict, tol: dict, heads=None) -> None:
    """Every captured layer's pattern equals HF's on real query rows; pad query rows are 0."""
    valid = ref["valid"]
    assert [layer for layer, _ in t.patterns()] == list(range(len(ref["patterns"])))
    for layer, ours in t.patterns():
        want = ref["patterns"][layer] if heads is None else ref["patterns"][layer][:, list(heads)]
        assert ours.shape == want.shape and ours.dtype == np.float32
        limit = tol[f"blocks.{layer}.attn.pattern"]
        for b in range(valid.shape[0]):
            rows = valid[b]
            assert_close(f"layer {layer} row {b}", ours[b][:, rows], want[b][:, rows], limit)
            assert (ours[b][:, ~rows] == 0).all()  # our pad query rows: defined as all zeros
            assert (ours[b][:, :, ~rows] == 0).all()  # no real query looks at a pad key


def assert_logits_match(t, ref: dict, tol: dict) -> None:
    assert [p.position for p in t.predictions] == ref["last"].tolist()
    ours = t.tensors["logits"]
    assert ours.shape == ref["logits"].shape == (len(ref["last"]), VOCAB)
    assert_close("logits", ours, ref["logits"], tol["logits"])


# -- parity: every source × engine × batch shape ---------------------------------------------


# Every size × engine × batch shape from the directory; the file and the cache id (which load
# the same bytes another way) on both engines with the hardest batch, left padding.
PARITY = [(size, "dir", engine, texts) for size in SIZES for engine in ENGINES for texts in TEXTS]
PARITY += [(size, source, engine, "left") for size in SIZES for source in SOURCES[1:]
           for engine in ENGINES]


@pytest.mark.slow
@pytest.mark.parametrize(("size", "source", "engine", "texts_name"), PARITY)
def test_patterns_and_logits_match_hf(size, source, engine, texts_name, loaded, reference,
                                      tolerances):
    config, weights = loaded(size, source)
    assert (config.arch, config.pos, weights.trained) == ("gpt2", "learned", True)
    assert (config.heads, config.layers) == (SIZES[size][1], SIZES[size][2])
    t = trace(config, weights, texts_name, engine)
    ref, tol = reference(size, texts_name), tolerances(size, texts_name)
    for inp, ids, valid in zip(t.inputs, ref["ids"], ref["valid"], strict=True):
        assert [tok.id for tok in inp.tokens] == ids[valid].tolist()
    assert_patterns_match(t, ref, tol)
    assert_logits_match(t, ref, tol)


@pytest.mark.parametrize("texts_name", ["single", "left"])
@pytest.mark.parametrize("engine", ENGINES)
def test_every_step_matches_hf_hidden_states(engine, texts_name, loaded, reference, tolerances):
    """capture="all" (torch then runs the unfused path): the residual stream at every layer."""
    config, weights = loaded("small", "dir")
    t = trace(config, weights, texts_name, engine, capture="all")
    ref, tol = reference("small", texts_name), tolerances("small", texts_name)
    valid = ref["valid"]
    np.testing.assert_array_equal(t.tensors["tokens"], ref["ids"])
    names = ["resid_pre"] + [f"blocks.{i}.resid_post" for i in range(config.layers)]
    names[-1] = "ln_f"  # HF's last hidden state is after ln_f
    for i, (name, want) in enumerate(zip(names, ref["hidden"], strict=True)):
        assert_close(f"hidden state {i}", t.tensors[name][valid], want[valid], tol[name])
    assert_patterns_match(t, ref, tol)
    assert_logits_match(t, ref, tol)


@pytest.mark.parametrize("engine", ENGINES)
def test_selected_heads_match_hf(engine, loaded, reference, tolerances):
    """Only some heads captured: torch builds the matrix for those heads alone (fused path)."""
    config, weights = loaded("wide", "cache")
    heads = (1, 7, 11)
    t = trace(config, weights, "right", engine, heads=heads)
    ref, tol = reference("wide", "right"), tolerances("wide", "right")
    assert_patterns_match(t, ref, tol, heads)
    assert_logits_match(t, ref, tol)


def test_gpt2_steps_are_recorded_with_shapes(loaded) -> None:
    config, weights = loaded("small", "dir")
    t = trace(config, weights, "right", "numpy")
    batch, d, d_mlp = 3, 64, 256
    length = max(len(tokens.encode(text)) for text in TEXTS["right"][0])
    assert t.step("tokens").shape == (batch, length)
    want = {
        "blocks.1.ln_1": ((batch, length, d), ("batch", "len", "d_model")),
        "blocks.1.attn.pattern": ((batch, 4, length, length),
                                  ("batch", "heads", "q_len", "k_len")),
        "blocks.1.resid_mid": ((batch, length, d), ("batch", "len", "d_model")),
        "blocks.1.ln_2": ((batch, length, d), ("batch", "len", "d_model")),
        "blocks.1.mlp.in": ((batch, length, d_mlp), ("batch", "len", "d_mlp")),
        "blocks.1.mlp.gelu": ((batch, length, d_mlp), ("batch", "len", "d_mlp")),
        "blocks.1.mlp.out": ((batch, length, d), ("batch", "len", "d_model")),
        "blocks.1.resid_post": ((batch, length, d), ("batch", "len", "d_model")),
        "ln_f": ((batch, length, d), ("batch", "len", "d_model")),
        "logits": ((batch, VOCAB), ("batch", "vocab")),
        "probs": ((batch, VOCAB), ("batch", "vocab")),
    }
    for name, (shape, dims) in want.items():
        step = t.step(name)
        assert (step.shape, step.dims) == (shape, dims), name
    names = [s.name for s in t.steps]
    order = ["pos_embed", "blocks.0.ln_1", "blocks.0.attn.q", "blocks.0.resid_mid",
             "blocks.0.ln_2", "blocks.0.mlp.in", "blocks.0.resid_post", "ln_f", "logits"]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)


def test_single_file_needs_heads(models: dict[str, Model]) -> None:
    """A bare file has no config: without --heads, GPT-2's d_head 64 gives d_model/64 heads."""
    config, _ = build_config(Request(weights=str(models["small"].file)))
    assert config.heads == 1
    config, _ = build_config(Request(weights=str(models["small"].file), heads=4))
    assert config.heads == 4


# -- the command line --------------------------------------------------------------------------


def invoke(args: list[str], env: dict | None = None):
    return runner.invoke(app, args, env=env)




@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("source", SOURCES)
def test_cli_json_matches_hf(source, engine, models, reference, tolerances) -> None:
    m = models["small"]
    args = ["trace", "--weights", m.source(source), "--engine", engine, "--json", "--predict",
            *TEXTS["single"][0]]
    if source == "file":
        args += ["--heads", "4"]
    result = invoke(args, env={"HF_HUB_CACHE": str(m.hub)})
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["config"]["weights"] == m.source(source)
    assert (doc["config"]["arch"], doc["config"]["engine"]) == ("gpt2", engine)
    ref, tol = reference("small", "single"), tolerances("small", "single")
    assert len(doc["attention"]) == m.layers * m.heads
    for entry in doc["attention"]:
        got = np.array(entry["weights"])
        want = ref["patterns"][entry["layer"]][entry["batch"], entry["head"]]
        assert_close("pattern", got, want, tol[f"blocks.{entry['layer']}.attn.pattern"])
    top = doc["predictions"][0]["top"]
    want_ids = np.argsort(-ref["logits"][0], kind="stable")[:10]
    # The ranking is the reference's: its neighbours are further apart than rounding moves them.
    assert np.diff(ref["logits"][0][want_ids]).max() < -2 * tol["logits"]
    assert [t["id"] for t in top] == want_ids.tolist()
    assert_close("logits", [t["logit"] for t in top], ref["logits"][0][want_ids], tol["logits"])


def test_cli_view_renders_real_weights(models) -> None:
    m = models["small"]
    result = invoke(["trace", "--weights", str(m.dir), "Hello world", "--layer", "all"])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert f"GPT-2 weights from {m.dir}" in out
    assert "untrained" not in out
    for step in ("blocks.1", "ln_1", "ln_2", "mlp.gelu", "resid_mid", "ln_f",
                 "attn layer 1 head 3"):
        assert step in out, step


def test_cli_cache_id_and_alias(models) -> None:
    m = models["small"]
    env = {"HF_HUB_CACHE": str(m.hub)}
    for model_id in ("gpt2", "openai-community/gpt2"):
        result = invoke(["trace", "--weights", model_id, "Hello world"], env=env)
        assert result.exit_code == 0, result.stderr
        assert f"GPT-2 weights from {model_id}" in result.stdout


def test_cli_missing_model_id(tmp_path: Path) -> None:
    hub = tmp_path / "no-hub"
    result = invoke(["trace", "--weights", "gpt2-medium", "Hello"], env={"HF_HUB_CACHE": str(hub)})
    assert_error(result, 1, str(hub), "huggingface-cli download gpt2-medium")


@pytest.mark.parametrize(("extra", "needle"), [
    (["--d-model", "32"], "--d-model conflicts with --weights"),
    (["--layers", "3"], "--layers conflicts with --weights"),
    (["--n-ctx", "16"], "--n-ctx conflicts with --weights"),
    (["--heads", "8"], "--heads 8 conflicts with the checkpoint's 4 heads"),
    (["--arch", "attn"], "--arch gpt2"),
    (["--pos", "sinusoidal"], "learned positions"),
    (["--no-bias"], "--no-bias conflicts with --weights"),
    (["--cross", "other text"], "--cross conflicts with --weights"),
])
def test_cli_conflicts_with_weights(models, extra: list[str], needle: str) -> None:
    result = invoke(["trace", "--weights", str(models["small"].dir), "Hello", *extra])
    assert_error(result, 2, needle)


def test_error_is_an_attn_error() -> None:
    assert issubclass(CheckpointError, AttnError) and CheckpointError.exit_code == 1


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"echo pwned > {self.marker}",))


def test_cli_malicious_pickle(tmp_path: Path) -> None:
    marker, path = tmp_path / "MARKER", tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil(marker)}, f, protocol=2)
    assert_error(invoke(["trace", "--weights", str(path), "Hello"]), 1, "refusing to load")
    assert not marker.exists()


def test_cli_truncated_safetensors(tmp_path: Path, models) -> None:
    data = models["small"].file.read_bytes()
    for cut, needle in ((4, "shorter than the 8-byte header length"),
                        (200, "truncated or not a safetensors file"),
                        (len(data) - 100, "outside the")):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        assert_error(invoke(["trace", "--weights", str(path), "Hello"]), 1, str(path), needle)


def test_cli_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("just some text, not a checkpoint at all")
    assert_error(invoke(["trace", "--weights", str(path), "Hello"]), 1, "not a valid safetensors")
    assert_error(invoke(["trace", "--weights", str(tmp_path / "nope"), "Hi"]), 2,
                 "no such file or directory")


def test_cli_vocabulary_smaller_than_the_tokenizer(tmp_path: Path) -> None:
    """Token ids run to 50256: a smaller wte cannot embed them, so it is refused up front."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_head=2, n_layer=1, n_positions=16,
                                     vocab_size=1000, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "m")
    assert_error(invoke(["trace", "--weights", str(tmp_path / "m"), "Hello"]), 1,
                 "the vocabulary has 1000 tokens, fewer than the 50257")
