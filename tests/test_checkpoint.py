"""The checkpoint loader and the safetensors reader, checked against references we did not write.

Hugging Face `transformers` builds and saves a small GPT-2; the `safetensors` package writes and
reads the files our NumPy reader/writer must agree with; torch says what bf16 → f32 gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st_numpy = pytest.importorskip("safetensors.numpy")
st_torch = pytest.importorskip("safetensors.torch")
safetensors = pytest.importorskip("safetensors")

from attn_tracer.model.checkpoint import (  # noqa: E402  (after the importorskip guards)
    Checkpoint,
    CheckpointError,
    hf_cache_dir,
    load_checkpoint,
)
from attn_tracer.model.safetensors_io import read_safetensors, write_safetensors  # noqa: E402
from tolerance import assert_close, step_tolerances  # noqa: E402

D_MODEL, HEADS, LAYERS, N_CTX, VOCAB = 64, 4, 2, 32, 50257
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Canonical name → (HF key, column/element slice of it) for one block; Q, K, V split c_attn.
_THIRDS = {
    "Q": slice(0, D_MODEL),
    "K": slice(D_MODEL, 2 * D_MODEL),
    "V": slice(2 * D_MODEL, 3 * D_MODEL),
}


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hf_model() -> transformers.GPT2LMHeadModel:
    """The reference: a seeded, randomly initialised Hugging Face GPT-2 with the real vocab."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=D_MODEL, n_head=HEADS, n_layer=LAYERS, n_positions=N_CTX, vocab_size=VOCAB
    )
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="session")
def hf_state(hf_model: transformers.GPT2LMHeadModel) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="session")
def saved_dir(tmp_path_factory: pytest.TempPathFactory, hf_model) -> Path:
    """A `save_pretrained` folder (config.json + model.safetensors) of the reference model."""
    directory = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    hf_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def bin_dir(tmp_path_factory: pytest.TempPathFactory, saved_dir: Path, hf_model) -> Path:
    """The same model as config.json + pytorch_model.bin, which is torch.save of the state dict.

    transformers 5 ignores safe_serialization=False, so write the .bin as older versions did;
    the state dict keeps the tied lm_head.weight, which the loader must skip.
    """
    directory = tmp_path_factory.mktemp("hf-bin")
    shutil.copy(saved_dir / "config.json", directory / "config.json")
    torch.save(hf_model.state_dict(), directory / "pytorch_model.bin")
    return directory


def hf_reference(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical name → expected array, built from HF keys independently of the loader."""
    s = {k.removeprefix("transformer."): v for k, v in state.items()}
    expected = {"wte": s["wte.weight"], "wpe": s["wpe.weight"]}
    for i in range(LAYERS):
        h, b = f"h.{i}.", f"blocks.{i}."
        for name, cols in _THIRDS.items():
            expected[f"{b}attn.W_{name}"] = s[h + "attn.c_attn.weight"][:, cols]
            expected[f"{b}attn.b_{name}"] = s[h + "attn.c_attn.bias"][cols]
        expected[b + "attn.W_O"] = s[h + "attn.c_proj.weight"]
        expected[b + "attn.b_O"] = s[h + "attn.c_proj.bias"]
        for ln in ("ln_1", "ln_2"):
            expected[f"{b}{ln}.w"] = s[f"{h}{ln}.weight"]
            expected[f"{b}{ln}.b"] = s[f"{h}{ln}.bias"]
        expected[b + "mlp.W_in"] = s[h + "mlp.c_fc.weight"]
        expected[b + "mlp.b_in"] = s[h + "mlp.c_fc.bias"]
        expected[b + "mlp.W_out"] = s[h + "mlp.c_proj.weight"]
        expected[b + "mlp.b_out"] = s[h + "mlp.c_proj.bias"]
    expected["ln_f.w"] = s["ln_f.weight"]
    expected["ln_f.b"] = s["ln_f.bias"]
    return expected


def assert_matches(ck: Checkpoint, state: dict[str, np.ndarray]) -> None:
    expected = hf_reference(state)
    assert set(ck.params) == set(expected)
    for name, want in expected.items():
        got = ck.params[name]
        assert got.dtype == np.float32, name
        assert got.flags.c_contiguous, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def state_for_file(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference state as a real hub gpt2 file has it: no prefix, mask buffers, no lm_head."""
    s = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    for i in range(LAYERS):
        s[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, N_CTX, N_CTX), dtype=np.float32))
        s[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    return s


def make_cache(hub: Path, folder: str, source_dir: Path) -> Path:
    """Lay `source_dir` out as huggingface_hub does: refs/main, snapshots/ symlinked to blobs/."""
    repo = hub / folder
    snapshot = repo / "snapshots" / COMMIT
    for sub in (repo / "refs", repo / "blobs", snapshot):
        sub.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)  # the hub writes it without a newline
    for name in ("config.json", "model.safetensors"):
        data = (source_dir / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


# -- loading a directory, a file, a cached id -------------------------------------------------


def assert_small_dims(ck) -> None:
    assert (ck.d_model, ck.heads, ck.layers, ck.n_ctx, ck.vocab) == (
        D_MODEL, HEADS, LAYERS, N_CTX, VOCAB)
    assert ck.ln_eps == pytest.approx(1e-5)


def test_directory_safetensors_matches_hf(saved_dir: Path, hf_state: dict) -> None:
    ck = load_checkpoint(str(saved_dir))
    assert_matches(ck, hf_state)
    assert_small_dims(ck)
    assert ck.d_head == D_MODEL // HEADS
    assert ck.source == str(saved_dir)
    assert ck.path == str(saved_dir / "model.safetensors")


def test_directory_bin_matches_hf(bin_dir: Path, hf_state: dict) -> None:
    ck = load_checkpoint(str(bin_dir))
    assert_matches(ck, hf_state)
    assert ck.path.endswith("pytorch_model.bin")


def test_params_are_owned_copies(saved_dir: Path) -> None:
    # A memory-mapped, read-only view would tie the arrays to the file and fail on writes.
    ck = load_checkpoint(str(saved_dir))
    for name, array in ck.params.items():
        assert type(array) is np.ndarray, name
        assert array.flags.writeable and array.flags.owndata, name


def test_directory_config_wins_over_heads_argument(saved_dir: Path) -> None:
    assert load_checkpoint(str(saved_dir), heads=1).heads == HEADS


def test_config_epsilon_and_default(tmp_path: Path, saved_dir: Path) -> None:
    shutil.copy(saved_dir / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((saved_dir / "config.json").read_text())
    config["layer_norm_epsilon"] = 1e-6
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(str(tmp_path)).ln_eps == pytest.approx(1e-6)
    del config["layer_norm_epsilon"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(str(tmp_path)).ln_eps == pytest.approx(1e-5)


@pytest.mark.parametrize("model_id", ["gpt2", "openai-community/gpt2"])
def test_model_id_from_hf_hub_cache(
    model_id: str, tmp_path: Path, saved_dir: Path, hf_state: dict, monkeypatch
) -> None:
    snapshot = make_cache(tmp_path / "hub", "models--openai-community--gpt2", saved_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ck = load_checkpoint(model_id)
    assert_matches(ck, hf_state)
    assert ck.source == model_id
    assert ck.path == str(snapshot / "model.safetensors")


def test_model_id_via_hf_home(tmp_path: Path, saved_dir: Path, hf_state: dict, monkeypatch) -> None:
    make_cache(tmp_path / "home" / "hub", "models--gpt2", saved_dir)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert_matches(load_checkpoint("gpt2"), hf_state)
    # The new id finds a cache that holds the legacy folder name, too.
    assert_matches(load_checkpoint("openai-community/gpt2"), hf_state)


def test_distilgpt2_alias(tmp_path: Path, saved_dir: Path, hf_state: dict, monkeypatch) -> None:
    make_cache(tmp_path / "hub", "models--distilbert--distilgpt2", saved_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert_matches(load_checkpoint("distilgpt2"), hf_state)
    assert_matches(load_checkpoint("distilbert/distilgpt2"), hf_state)


def test_hf_cache_dir_precedence(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "b"))
    assert hf_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hf_cache_dir() == tmp_path / "b" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hf_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"


def test_single_safetensors_file(tmp_path: Path, hf_state: dict) -> None:
    path = tmp_path / "gpt2.safetensors"
    st_numpy.save_file(state_for_file(hf_state), str(path))
    ck = load_checkpoint(str(path), heads=HEADS)
    assert_matches(ck, hf_state)
    assert_small_dims(ck)
    # Without a config the default is GPT-2's head size of 64.
    assert load_checkpoint(str(path)).heads == D_MODEL // 64


def test_single_bin_file(tmp_path: Path, hf_state: dict) -> None:
    path = tmp_path / "weights.bin"
    torch.save({k: torch.from_numpy(v) for k, v in state_for_file(hf_state).items()}, path)
    ck = load_checkpoint(str(path), heads=HEADS)
    assert_matches(ck, hf_state)
    assert ck.heads == HEADS


def test_bf16_checkpoint_widens_like_torch(tmp_path: Path, hf_state: dict) -> None:
    path = tmp_path / "bf16.safetensors"
    state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state_for_file(hf_state).items()}
    st_torch.save_file(state, str(path))
    ck = load_checkpoint(str(path), heads=HEADS)
    want = state["h.1.attn.c_attn.weight"].float().numpy()
    np.testing.assert_array_equal(ck.params["blocks.1.attn.W_V"], want[:, 2 * D_MODEL :])
    np.testing.assert_array_equal(ck.params["wte"], state["wte.weight"].float().numpy())


def test_heads_must_divide_d_model(tmp_path: Path, hf_state: dict) -> None:
    path = tmp_path / "gpt2.safetensors"
    st_numpy.save_file(state_for_file(hf_state), str(path))
    with pytest.raises(CheckpointError, match=r"heads=3 does not divide d_model=64"):
        load_checkpoint(str(path), heads=3)


def test_importing_checkpoint_does_not_import_torch() -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    code = (
        "import sys, attn_tracer.model.checkpoint, attn_tracer.model.safetensors_io\n"
        "heavy = {'torch', 'transformers', 'safetensors'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# -- safetensors_io against the reference package ---------------------------------------------

ROUND_TRIP_DTYPES = [np.float32, np.float16, np.float64, np.int64, np.int32, np.uint8, np.bool_]


def sample(dtype: type, shape: tuple[int, ...] = (3, 5)) -> np.ndarray:
    rng = np.random.default_rng(0)
    values = rng.normal(size=shape) * 100
    return (values > 0) if dtype is np.bool_ else values.astype(dtype)


@pytest.mark.parametrize("dtype", ROUND_TRIP_DTYPES)
def test_read_what_the_reference_writes(tmp_path: Path, dtype: type) -> None:
    tensors = {"b": sample(dtype), "a": sample(dtype, (7,)), "empty": sample(dtype, (0, 2))}
    st_numpy.save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "np"})
    got, metadata = read_safetensors(tmp_path / "x.safetensors")
    assert metadata == {"format": "np"}
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
        np.testing.assert_array_equal(got[name], want)


@pytest.mark.parametrize("dtype", ROUND_TRIP_DTYPES)
def test_reference_reads_what_we_write(tmp_path: Path, dtype: type) -> None:
    tensors = {"z": sample(dtype), "a": sample(dtype, (2, 3, 4)), "scalar": sample(dtype, ())}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"note": "ours"})
    got = st_numpy.load_file(str(tmp_path / "x.safetensors"))
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
        np.testing.assert_array_equal(got[name], want)
    with safetensors.safe_open(str(tmp_path / "x.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"note": "ours"}


def test_written_layout(tmp_path: Path) -> None:
    # Big-endian and non-contiguous input must come out as C-order little-endian bytes.
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)
    strided = np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"b": big_endian, "a": strided})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert list(header) == ["a", "b"]  # sorted by name, no __metadata__ when none was given
    assert header["a"] == {"dtype": "I64", "shape": [3, 2], "data_offsets": [0, 48]}
    assert header["b"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [48, 72]}
    assert raw[8 + n + 48 :] == np.arange(6, dtype="<f4").tobytes()
    got, metadata = read_safetensors(path)
    np.testing.assert_array_equal(got["a"], strided)
    np.testing.assert_array_equal(got["b"], big_endian)
    assert metadata == {}


def test_bf16_read_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    values = torch.randn(4, 6).to(torch.bfloat16)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40], dtype=torch.bfloat16)
    st_torch.save_file({"w": values, "s": special}, str(tmp_path / "x.safetensors"))
    got, _ = read_safetensors(tmp_path / "x.safetensors")
    for name, want in (("w", values), ("s", special)):
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want.float().numpy())


# -- errors, each naming its problem -----------------------------------------------------------


def write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def header_file(path: Path, header: bytes, buffer: bytes = b"") -> str:
    return write_bytes(path, len(header).to_bytes(8, "little") + header + buffer)


def test_error_file_shorter_than_length_prefix(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "x.safetensors", b"\x01\x02\x03\x04\x05")
    with pytest.raises(CheckpointError, match=r"5 bytes long, shorter than the 8-byte"):
        load_checkpoint(path)


def test_error_header_length_beyond_file(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "x.safetensors", (1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"header claims 1000 bytes but the file has only 2"):
        read_safetensors(path)


def test_error_header_not_json(tmp_path: Path) -> None:
    path = header_file(tmp_path / "x.safetensors", b"{not json at all")
    with pytest.raises(CheckpointError, match=r"header is not JSON"):
        load_checkpoint(path)
    path = header_file(tmp_path / "y.safetensors", b"[1, 2]")
    with pytest.raises(CheckpointError, match=r"header is a JSON list, not an object"):
        read_safetensors(path)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}, "unsupported dtype 'F8_E4M3'"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}, "outside the 8-byte data buffer"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "shape [3] of F32 needs 12"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "invalid shape [-2]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8]}, "invalid data_offsets [8]"),
    ],
)
def test_error_bad_header_entry(tmp_path: Path, entry: dict, problem: str) -> None:
    header = json.dumps({"w": entry}).encode()
    path = header_file(tmp_path / "x.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError) as excinfo:
        read_safetensors(path)
    message = str(excinfo.value)
    assert problem in message and "'w'" in message and "\n" not in message


def test_error_random_bytes(tmp_path: Path) -> None:
    data = bytes(np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8))
    for name in ("x.safetensors", "x.bin"):
        with pytest.raises(CheckpointError, match=r"not a (valid safetensors file|PyTorch)"):
            load_checkpoint(write_bytes(tmp_path / name, data))


def test_error_text_file_named_bin(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"x\.bin is not a PyTorch checkpoint"):
        load_checkpoint(str(path))


def test_error_unsupported_suffix(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "weights.txt", b"hello")
    with pytest.raises(CheckpointError, match=r"unsupported file type '\.txt'"):
        load_checkpoint(path)


class Evil:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused(tmp_path: Path, writer: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.bin"
    if writer == "torch.save":
        torch.save({"x": Evil(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"x": Evil(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(str(path))
    message = str(excinfo.value)
    assert message.startswith(f"refusing to load {path}: it is not a plain tensor checkpoint")
    assert "weights_only=True rejected it" in message and "\n" not in message
    assert not marker.exists()


def test_error_missing_key(tmp_path: Path, saved_dir: Path, hf_state: dict) -> None:
    shutil.copy(saved_dir / "config.json", tmp_path / "config.json")
    state = {k: v for k, v in hf_state.items() if k != "transformer.h.1.mlp.c_proj.bias"}
    st_numpy.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing the weight 'h\.1\.mlp\.c_proj\.bias'"):
        load_checkpoint(str(tmp_path))


def test_error_wrong_shape(tmp_path: Path, saved_dir: Path, hf_state: dict) -> None:
    shutil.copy(saved_dir / "config.json", tmp_path / "config.json")
    state = dict(hf_state)
    state["transformer.h.0.attn.c_attn.weight"] = np.zeros((D_MODEL, 190), np.float32)
    st_numpy.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"'h\.0\.attn\.c_attn\.weight' has shape \[64, 190\], expected \[64, 192\]",
    ):
        load_checkpoint(str(tmp_path))


def test_error_model_not_in_cache(tmp_path: Path, monkeypatch) -> None:
    hub = tmp_path / "empty-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint("gpt2-medium")
    message = str(excinfo.value)
    assert str(hub) in message
    assert "models--gpt2-medium, models--openai-community--gpt2-medium" in message
    assert "huggingface-cli download gpt2-medium" in message
    assert "\n" not in message


def test_error_cache_without_snapshot(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "hub" / "models--gpt2" / "refs").mkdir(parents=True)
    (tmp_path / "hub" / "models--gpt2" / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"only partly in the Hugging Face cache"):
        load_checkpoint("gpt2")


def test_error_no_such_path(tmp_path: Path) -> None:
    for source in (str(tmp_path / "nope"), "missing.safetensors", "./gpt2"):
        with pytest.raises(CheckpointError, match=r"no such file or directory"):
            load_checkpoint(source)


def test_error_directory_without_config(tmp_path: Path, saved_dir: Path) -> None:
    shutil.copy(saved_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_checkpoint(str(tmp_path))


def test_error_directory_without_weights(tmp_path: Path, saved_dir: Path) -> None:
    shutil.copy(saved_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or pytorch_model\.bin"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize(
    ("config_text", "problem"),
    [
        ("{oops", r"cannot read .*config\.json"),
        ('{"n_embd": 64}', r"no 'n_head' field"),
        ('{"model_type": "bert"}', r"describes a 'bert' model"),
        (
            '{"n_embd": 64, "n_head": 3, "n_layer": 2, "n_positions": 32, "vocab_size": 50257}',
            r"heads=3 does not divide d_model=64",
        ),
    ],
)
def test_error_bad_config(tmp_path: Path, saved_dir: Path, config_text: str, problem: str) -> None:
    shutil.copy(saved_dir / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(config_text)
    with pytest.raises(CheckpointError, match=problem):
        load_checkpoint(str(tmp_path))


# ── config switches and widths the math depends on ─────────────────────────────────────────


def _tiny_gpt2(tmp_path: Path, **config):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=2, n_layer=1, n_positions=16,
                                       **config)).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("switch", [{"activation_function": "relu"},
                                    {"scale_attn_by_inverse_layer_idx": True},
                                    {"scale_attn_weights": False}])
def test_config_switches_that_change_the_math_are_refused(tmp_path: Path, switch: dict) -> None:
    _tiny_gpt2(tmp_path, **switch)
    name = next(iter(switch))
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(str(tmp_path))


def test_n_inner_is_honoured_and_matches_hugging_face(tmp_path: Path) -> None:
    from attn_tracer.commands.run import Request, build_config
    from attn_tracer.model.engine import select_engine
    from attn_tracer.model.pipeline import run
    from attn_tracer.model.tokens import encode
    from attn_tracer.model.trace import Selection

    model = _tiny_gpt2(tmp_path, n_inner=48)  # not 4·n_embd
    config, weights = build_config(Request(weights=str(tmp_path)))
    assert config.d_mlp == 48
    text = "Attention is all you need"
    everything = Selection(tuple(range(config.layers)), tuple(range(config.heads)), "all")
    trace, _ = run([text], config, select_engine("numpy", "cpu", "float32", 8), weights,
                   everything, predict_top_k=1)
    with torch.no_grad():
        reference = model(torch.tensor([encode(text)])).logits[0, -1].numpy()
    # Both float32: equal to rounding (tests/tolerance.py).
    assert_close("logits", trace.tensors["logits"][0], reference,
                 step_tolerances(trace)["logits"])


def test_heads_that_do_not_fit_a_bare_file_are_a_usage_error(tmp_path: Path,
                                                              hf_state: dict) -> None:
    from attn_tracer.errors import UsageError

    path = tmp_path / "gpt2.safetensors"
    st_numpy.save_file(state_for_file(hf_state), str(path))
    with pytest.raises(UsageError, match="--heads 3"):
        load_checkpoint(str(path), heads=3)
    with pytest.raises(UsageError, match="no such file"):
        load_checkpoint(str(tmp_path / "missing.safetensors"))
