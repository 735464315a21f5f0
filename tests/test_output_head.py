"""An output head of its own (tie_word_embeddings=False): the logits come from lm_head.weight,
checked against Hugging Face `GPT2LMHeadModel`, which built and saved the checkpoint.

GPT-2 ties its output head to the token embedding (logits = h·W_Eᵀ); a checkpoint saved with
`tie_word_embeddings=False` carries its own `lm_head.weight`, and using W_E instead changes the
top token and the logits by whole units (issue 12). The same weights are read from a
`save_pretrained` folder, from the bare .safetensors file (no config: the head is untied because
it differs from wte, which is what transformers decides too) and from a torch.save .bin.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st_torch = pytest.importorskip("safetensors.torch")

from typer.testing import CliRunner  # noqa: E402  (after the importorskip guards)

from attn_tracer.cli import app  # noqa: E402
from attn_tracer.commands.run import Request, build_config  # noqa: E402
from attn_tracer.model import tokens  # noqa: E402
from attn_tracer.model.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from attn_tracer.model.engine import select_engine  # noqa: E402
from attn_tracer.model.pipeline import run  # noqa: E402
from attn_tracer.model.trace import Selection  # noqa: E402

# README's bound for real GPT-2 against transformers in float32, logits included.
TOL = 1e-5
VOCAB = 50257
TEXTS = ["The capital of France is", "Hello", "One, two, three,"]
runner = CliRunner()


def hf_logits(hf, text: str) -> np.ndarray:
    ids = torch.tensor([tokens.encode(text)])
    with torch.no_grad():
        return hf(input_ids=ids).logits[0, -1].double().numpy()


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(5)
    config = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=64,
                                     vocab_size=VOCAB, tie_word_embeddings=False,
                                     attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        hf.transformer.ln_f.weight.mul_(30.0)  # logits spread over several units
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    root = tmp_path_factory.mktemp("untied")
    hf.save_pretrained(root / "saved")
    assert json.loads((root / "saved" / "config.json").read_text())["tie_word_embeddings"] is False
    bare = root / "weights.safetensors"
    shutil.copy(root / "saved" / "model.safetensors", bare)
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith(".attn.bias")}
    torch.save(state, root / "weights.bin")
    return hf, root


SOURCES = {"dir": "saved", "file": "weights.safetensors", "bin": "weights.bin"}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_untied_logits_match_hf(untied, source: str, engine: str) -> None:
    hf, root = untied
    config, weights = build_config(Request(weights=str(root / SOURCES[source]),
                                           heads=None if source == "dir" else 4))
    assert not weights.tied
    np.testing.assert_array_equal(weights.unembedding(), hf.lm_head.weight.detach().numpy())
    for text in TEXTS:
        t, _ = run([text], config, select_engine(engine, "cpu", "float32", 8), weights,
                   Selection((0,), (0,)), predict_top_k=10)
        ref = hf_logits(hf, text)
        want = np.argsort(-ref, kind="stable")[:10]
        assert [e["id"] for e in t.predictions[0].top] == want.tolist()
        np.testing.assert_allclose(t.tensors["logits"][0], ref, rtol=0, atol=TOL)
        assert t.step("logits").op.startswith("logits = h·W_U")
        # The bug this guards against: logits from W_E are nowhere near the reference.
        with torch.no_grad():
            h = hf.transformer(input_ids=torch.tensor([tokens.encode(text)])).last_hidden_state
            tied = (h[0, -1] @ hf.transformer.wte.weight.T).double().numpy()
        assert np.abs(tied - ref).max() > 1.0


def test_cli_untied_top_k_matches_hf(untied) -> None:
    hf, root = untied
    result = runner.invoke(app, ["trace", "--weights", str(root / "saved"), "--predict",
                                 "--top-k", "5", "--json", TEXTS[0]])
    assert result.exit_code == 0, result.stderr
    top = json.loads(result.stdout)["predictions"][0]["top"]
    ref = hf_logits(hf, TEXTS[0])
    assert [e["id"] for e in top] == np.argsort(-ref)[:5].tolist()
    np.testing.assert_allclose([e["logit"] for e in top], np.sort(ref)[::-1][:5], atol=TOL)


def test_a_head_equal_to_wte_is_tied(tmp_path: Path) -> None:
    """A .bin of a tied model stores lm_head.weight as wte itself: no second table is kept."""
    torch.manual_seed(6)
    config = transformers.GPT2Config(n_embd=32, n_head=2, n_layer=1, n_positions=16,
                                     vocab_size=VOCAB)
    hf = transformers.GPT2LMHeadModel(config)
    torch.save(hf.state_dict(), tmp_path / "tied.bin")
    ck = load_checkpoint(str(tmp_path / "tied.bin"), heads=2)
    assert "lm_head" not in ck.params


def test_a_head_that_differs_from_a_tied_config_is_used_as_transformers_uses_it(
        untied, tmp_path: Path) -> None:
    hf, root = untied
    folder = tmp_path / "m"
    shutil.copytree(root / "saved", folder)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    reference = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    # transformers itself keeps the stored head when it differs from wte (and warns).
    assert torch.equal(reference.lm_head.weight, hf.lm_head.weight)
    result = runner.invoke(app, ["trace", "--weights", str(folder), "--predict", "--top-k",
                                 "5", "--json", TEXTS[0]])
    assert result.exit_code == 0, result.stderr
    assert "lm_head.weight differs" in result.stderr and "as transformers does" in result.stderr
    top = json.loads(result.stdout)["predictions"][0]["top"]
    ref = hf_logits(reference, TEXTS[0])
    np.testing.assert_allclose([e["logit"] for e in top], np.sort(ref)[::-1][:5], atol=TOL)


def test_an_untied_config_without_a_head_is_refused(untied, tmp_path: Path) -> None:
    _, root = untied
    folder = tmp_path / "m"
    shutil.copytree(root / "saved", folder)
    state = st_torch.load_file(folder / "model.safetensors")
    del state["lm_head.weight"]
    st_torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"no 'lm_head.weight'.*tie_word_embeddings is false"):
        load_checkpoint(str(folder))


def test_an_untied_head_of_the_wrong_shape_is_refused(untied, tmp_path: Path) -> None:
    _, root = untied
    state = st_torch.load_file(root / "weights.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"][:, :10].contiguous()
    st_torch.save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' has shape \[50257, 10\]"):
        load_checkpoint(str(tmp_path / "w.safetensors"), heads=4)
