"""--save, --svg and --html: files read back with numpy.load and the safetensors package, the
numbers checked against the JSON document of the same run, and every refusal made before the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from attn_tracer.cli import app
from tolerance import assert_close, magnitude, tolerance

st_numpy = pytest.importorskip("safetensors.numpy")
safetensors = pytest.importorskip("safetensors")

runner = CliRunner()
SMALL = ["--d-model", "64", "--heads", "4", "--engine", "numpy"]
TEXT = "Zebras graze quietly near Kilimanjaro"


def invoke(*args: str):
    return runner.invoke(app, ["trace", TEXT, *SMALL, *args])


def load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The saved tensors and config, through the reference readers only."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            tensors = {name: f[name] for name in f.files}
        return tensors, json.loads(str(tensors.pop("config")))
    tensors = st_numpy.load_file(str(path))
    with safetensors.safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    return tensors, json.loads(meta["config"])


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_saved_tensors_equal_the_json(tmp_path, suffix):
    out = tmp_path / f"trace{suffix}"
    result = invoke("--layer", "1", "--head", "0,3", "--json", "--save", str(out))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    tensors, config = load(out)

    # Every step of the selected layer and every step outside the layers, under its step name.
    wanted = [s for s in doc["steps"] if layer_of(s["name"]) in (None, 1)]
    assert {s["name"] for s in wanted} <= set(tensors)
    # Of layer 0 only its output, layer 1's input, so layer 1 can be recomputed from the file.
    assert {name for name in tensors if layer_of(name) == 0} == {"blocks.0.resid_post"}
    for s in wanted:
        shape = list(s["shape"])
        if "heads" in s["dims"]:
            shape[s["dims"].index("heads")] = 2  # only the selected heads are kept
        assert list(tensors[s["name"]].shape) == shape, s["name"]

    assert tensors["tokens"].tolist() == [[t["id"] for t in doc["inputs"][0]["tokens"]]]
    assert {k: config[k] for k in doc["config"]} == doc["config"]
    assert config["heads_saved"] == [0, 3] and config["layers_saved"] == [1]

    # The same numbers as the JSON document, bit for bit.
    pattern = tensors["blocks.1.attn.pattern"]
    assert pattern.dtype == np.float32
    for e in doc["attention"]:
        i = [0, 3].index(e["head"])
        np.testing.assert_array_equal(pattern[e["batch"], i], np.array(e["weights"], np.float32))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_saved_tensors_re_derive_the_pattern(tmp_path, suffix):
    """Anyone can recompute a number from its inputs: scores = Q·Kᵀ, pattern = softmax(masked)."""
    out = tmp_path / f"trace{suffix}"
    result = invoke("--layer", "0", "--save", str(out))
    assert result.exit_code == 0, result.stderr
    t, config = load(out)
    p = "blocks.0.attn"
    d_head = config["d_head"]
    q_split = t[f"{p}.q"].reshape(1, -1, config["heads"], d_head)
    np.testing.assert_array_equal(q_split, t[f"{p}.q.split"])
    np.testing.assert_array_equal(q_split.transpose(0, 2, 1, 3), t[f"{p}.q.heads"])
    # Each recomputed here from the saved inputs of its step, in float32 as the trace was: equal
    # to that one step's rounding (tests/tolerance.py), on whatever CPU either ran.
    scores = t[f"{p}.q.heads"] @ t[f"{p}.k.heads"].transpose(0, 1, 3, 2)
    assert_close("scores", scores, t[f"{p}.scores"], tolerance(magnitude(scores), "float32"))
    # One division, correctly rounded, recomputed in float64: within u = 6e-8.
    np.testing.assert_allclose(t[f"{p}.scaled"], t[f"{p}.scores"] / np.sqrt(d_head), rtol=1e-6)
    masked = t[f"{p}.masked"].astype(np.float64)
    e = np.exp(masked - masked.max(axis=-1, keepdims=True))
    exact = e / e.sum(axis=-1, keepdims=True)  # in float64: only the trace's rounding is left
    assert_close("pattern", t[f"{p}.pattern"], exact, tolerance(1, "float32", pair=False))
    z = t[f"{p}.pattern"] @ t[f"{p}.v.heads"]
    assert_close("z", t[f"{p}.z"], z, tolerance(magnitude(z), "float32"))


def test_npz_and_safetensors_hold_the_same_numbers(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.safetensors"
    assert invoke("--layer", "all", "--save", str(a)).exit_code == 0
    assert invoke("--layer", "all", "--save", str(b)).exit_code == 0
    ta, ca = load(a)
    tb, cb = load(b)
    assert sorted(ta) == sorted(tb) and ca == cb
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)


def test_saved_file_has_ordinary_permissions(tmp_path):
    out = tmp_path / "t.npz"
    assert invoke("--save", str(out)).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


# ── refusals: one line, exit 2, stdout empty, nothing written ─────────────────────────────────

def _refused(result, tmp_path: Path, before: set[str], fragment: str) -> None:
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn: error: "), result.stderr
    assert fragment in lines[0]
    assert {p.name for p in tmp_path.iterdir()} == before  # no file, no temporary left


@pytest.mark.parametrize("flag,name", [("--save", "t.npz"), ("--save", "t.safetensors"),
                                       ("--svg", "t.svg"), ("--html", "t.html")])
def test_missing_directory(tmp_path, flag, name):
    result = invoke("--json", flag, str(tmp_path / "nope" / name))
    _refused(result, tmp_path, set(), "does not exist")


@pytest.mark.parametrize("flag,name", [("--save", "t.npz"), ("--svg", "t.svg"),
                                       ("--html", "t.html")])
def test_parent_is_a_regular_file(tmp_path, flag, name):
    # Root ignores permission bits, but nobody can create a file under a regular file.
    (tmp_path / "plain").write_text("x")
    result = invoke("--json", flag, str(tmp_path / "plain" / name))
    _refused(result, tmp_path, {"plain"}, "not a directory")
    assert (tmp_path / "plain").read_text() == "x"


def test_unwritable_directory(tmp_path):
    # /proc accepts no new files, even for root, though its permission bits say writable.
    target = Path("/proc/attn-test-unwritable.npz")
    if not Path("/proc").is_dir():
        pytest.skip("no /proc")
    result = invoke("--json", "--save", str(target))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("attn: error: ") and result.stderr.count("\n") == 1
    assert "cannot write" in result.stderr
    assert not target.exists()


@pytest.mark.parametrize("flag,name", [("--save", "t.npz"), ("--save", "t.safetensors"),
                                       ("--svg", "t.svg"), ("--html", "t.html")])
def test_existing_file_needs_force(tmp_path, flag, name):
    target = tmp_path / name
    target.write_bytes(b"precious")
    result = invoke("--json", flag, str(target))
    _refused(result, tmp_path, {name}, "--force")
    assert target.read_bytes() == b"precious"

    result = invoke("--json", flag, str(target), "--force")
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout)
    assert target.read_bytes() != b"precious"
    if flag == "--save":
        tensors, _ = load(target)
        assert "blocks.0.attn.pattern" in tensors
    assert {p.name for p in tmp_path.iterdir()} == {name}


@pytest.mark.parametrize("flag,name", [("--save", "t.txt"), ("--save", "t.npy"),
                                       ("--svg", "t.png"), ("--html", "t.svg")])
def test_wrong_extension(tmp_path, flag, name):
    result = invoke("--json", flag, str(tmp_path / name))
    _refused(result, tmp_path, set(), "must end in")


def test_target_is_a_directory(tmp_path):
    (tmp_path / "d.npz").mkdir()
    result = invoke("--save", str(tmp_path / "d.npz"), "--force")
    _refused(result, tmp_path, {"d.npz"}, "is a directory")


def test_same_file_twice(tmp_path):
    result = invoke("--svg", str(tmp_path / "a.svg"), "--html", str(tmp_path / "a.svg"))
    assert result.exit_code == 2 and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


# ── pictures ──────────────────────────────────────────────────────────────────────────────────

def test_svg_and_html_hold_the_view(tmp_path):
    svg, html = tmp_path / "view.svg", tmp_path / "view.html"
    result = invoke("--svg", str(svg), "--html", str(html))
    assert result.exit_code == 0, result.stderr
    svg_text, html_text = svg.read_text("utf-8"), html.read_text("utf-8")
    assert svg_text.lstrip().startswith("<svg") and svg_text.rstrip().endswith("</svg>")
    assert "<html" in html_text.lower() and "</html>" in html_text.lower()
    # Token labels of the heatmap (GPT-2 splits the text into Ze·br·as ␣gra·ze ␣quietly ␣near
    # ␣Kil·iman·jar·o), read from `attn tokens --json`, and the step names of the shape trace.
    toks = json.loads(runner.invoke(app, ["tokens", TEXT, "--json"]).stdout)
    labels = [t["text"].lstrip("␣") for t in toks]
    assert "quietly" in labels and "iman" in labels
    for label in ("quietly", "iman", "jar", "attn.pattern", "blocks.0"):
        assert label in html_text, label
        assert label in svg_text, label
        assert label in result.stdout, label  # the same view went to stdout


def test_svg_with_json_keeps_stdout_pure_json(tmp_path):
    svg = tmp_path / "view.svg"
    result = invoke("--json", "--svg", str(svg))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "attn-trace/1"
    assert svg.read_text("utf-8").lstrip().startswith("<svg")
