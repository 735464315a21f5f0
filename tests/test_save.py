"""--save, --svg and --html: files read back with numpy.load and the safetensors package, the
numbers checked against the JSON document of the same run, and every refusal made before the run.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


def _readme_loader():
    """The README's own `load_trace`, run as written: what a user copies must work."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text("utf-8")
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
               if "def load_trace" in block]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope["load_trace"]


load_trace = _readme_loader()


def load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The saved tensors (views rebuilt) and config, through the README's reader: numpy.load and
    the safetensors package only."""
    return load_trace(path)


def stored(path: Path) -> tuple[set[str], dict]:
    """The names of the tensors really stored in the file, and its views."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files) - {"config", "views"}
            return names, json.loads(str(f["views"]))
    with safetensors.safe_open(str(path), framework="numpy") as f:
        return set(f.keys()), json.loads(f.metadata()["views"])


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


# ── each distinct tensor once; --steps ────────────────────────────────────────────────────────

VIEW_STEPS = ("q.split", "q.heads", "k.split", "k.heads", "v.split", "v.heads", "z",
              "z.transpose")


def engine_trace(texts, *, layers=(0, 1), heads=(0, 1, 2, 3), capture="all", arch="attn",
                 cross=None, padding="right", hooks=None, predict=None):
    """The run the command line makes of SMALL, straight through pipeline.run."""
    from attn_tracer.model import pipeline
    from attn_tracer.model.config import Config
    from attn_tracer.model.engine import Engine
    from attn_tracer.model.trace import Selection
    from attn_tracer.model.weights import random_weights

    config = Config(d_model=64, heads=4, arch=arch,
                    pos="learned" if arch == "gpt2" else "sinusoidal")
    trace, _ = pipeline.run(texts, config, Engine("numpy", "cpu", "float32"),
                            random_weights(config, cross=bool(cross)),
                            Selection(tuple(layers), tuple(heads), capture), cross_texts=cross,
                            padding=padding, hooks=hooks, predict_top_k=predict)
    return trace


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, x in want.items():
        x = x.astype(np.uint8) if x.dtype == np.bool_ else x
        assert got[name].dtype == x.dtype and got[name].shape == x.shape, name
        np.testing.assert_array_equal(got[name], x, err_msg=name)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("heads", ["all", "0,3"])
def test_each_distinct_tensor_is_stored_once(tmp_path, suffix, heads):
    out = tmp_path / f"trace{suffix}"
    result = invoke("--layer", "all", "--head", heads, "--save", str(out))
    assert result.exit_code == 0, result.stderr
    names, views = stored(out)
    expected_views = {f"blocks.{layer}.attn.{s}" for layer in (0, 1) for s in VIEW_STEPS}
    assert set(views) == expected_views
    assert not names & expected_views  # not stored a second time
    for v in views.values():
        assert v["of"] in names and v["of"].rsplit(".", 1)[-1] in ("q", "k", "v", "merge")
        assert ("take" in v) == (heads != "all")
    # Rebuilt from the views, the file holds every step the engine recorded, bit for bit.
    selected = (0, 1, 2, 3) if heads == "all" else (0, 3)
    trace = engine_trace([TEXT], heads=selected)
    tensors, config = load(out)
    assert_same_tensors(tensors, trace.tensors)
    assert config["steps_saved"] == sorted(trace.tensors)


def test_npz_is_stored_uncompressed(tmp_path):
    out = tmp_path / "trace.npz"
    assert invoke("--save", str(out)).exit_code == 0
    with zipfile.ZipFile(out) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}


def test_a_step_that_is_not_a_view_is_stored_whole():
    """The views are checked, not assumed: a hook that changes q.split (an ablation) makes it a
    tensor of its own, while the untouched k.split stays a view."""
    from attn_tracer.commands import save
    from attn_tracer.render import json_doc as render_json

    trace = engine_trace([TEXT], layers=(0,),
                         hooks={"blocks.0.attn.q.split": lambda x: x * 2})
    tensors, _, views = save.tensors_of(trace, render_json.config_json(trace))
    views = json.loads(views)
    assert "blocks.0.attn.q.split" in tensors and "blocks.0.attn.q.split" not in views
    assert "blocks.0.attn.k.split" in views and "blocks.0.attn.k.split" not in tensors
    np.testing.assert_array_equal(tensors["blocks.0.attn.q.split"],
                                  trace.tensors["blocks.0.attn.q.split"])


STEP_CASES = {
    # --steps, extra options, the stored names of layer L, names outside the layers
    "pattern,z": ("pattern,z", [], {"attn.pattern", "attn.z"}, set()),
    "q and its heads": ("q,q.heads", [], {"attn.q"}, set()),  # q.heads: a view of q
    "z and z.merge": ("z,z.merge", [], {"attn.z.merge"}, set()),
    "out is the attention's": ("out", [], {"attn.out"}, set()),
    "attn.out": ("attn.out", [], {"attn.out"}, set()),
    "gpt2 mlp.out": ("mlp.out,ln_1", ["--arch", "gpt2"], {"mlp.out", "ln_1"}, set()),
    "outside the layers": ("embed,logits", ["--arch", "gpt2", "--predict"], set(),
                           {"embed", "logits"}),
    "pattern with cross": ("pattern", ["--cross", "Le chat"], {"attn.pattern",
                                                               "cross_attn.pattern"}, set()),
    "cross_attn.pattern": ("cross_attn.pattern", ["--cross", "Le chat"],
                           {"cross_attn.pattern"}, set()),
    "repeated and spaced": (" pattern , pattern", [], {"attn.pattern"}, set()),
}


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_steps_chooses_what_is_saved(tmp_path, suffix, case):
    steps, extra, inner, outer = STEP_CASES[case]
    out = tmp_path / f"trace{suffix}"
    result = invoke("--save", str(out), "--steps", steps, *extra)
    assert result.exit_code == 0, result.stderr
    names, _ = stored(out)
    tokens = {"tokens"} | ({"cross.tokens"} if "--cross" in extra else set())
    assert names == tokens | outer | {f"blocks.{layer}.{s}" for layer in (0, 1) for s in inner}
    # The numbers are the engine's, views rebuilt.
    cross = ["Le chat"] if "--cross" in extra else None
    trace = engine_trace([TEXT], arch="gpt2" if "gpt2" in extra else "attn", cross=cross,
                         predict=10 if "--predict" in extra else None)
    tensors, config = load(out)
    assert_same_tensors(tensors, {n: trace.tensors[n] for n in config["steps_saved"]})


def test_steps_keep_only_what_is_asked_for_in_memory(tmp_path):
    """--steps pattern keeps the patterns, not every step: the run captures what it saves."""
    from attn_tracer.commands import run

    r = run.Request(texts=[TEXT], d_model=64, heads=4, engine="numpy",
                    save=tmp_path / "x.npz", steps=["pattern"])
    trace, _ = run.compute(r, lambda message: None)
    assert set(trace.tensors) == {"tokens", "blocks.0.attn.pattern", "blocks.1.attn.pattern"}


def test_steps_without_save_is_said(tmp_path):
    result = invoke("--steps", "pattern")
    assert result.exit_code == 0, result.stderr
    assert "--steps chooses what --save writes" in result.stderr


def test_step_names_are_every_step_a_run_records():
    """save.LAYER_STEPS and OUTER_STEPS (what --steps accepts) against real runs of both
    architectures, with cross-attention, padding and predictions."""
    from attn_tracer.commands import save

    runs = [engine_trace([TEXT, "A dog"], arch="gpt2", predict=3, capture="patterns"),
            engine_trace([TEXT, "A dog"], cross=["Le chat", "Un chien"], capture="patterns")]
    recorded = {s.name for trace in runs for s in trace.steps}
    inner = {n.split(".", 2)[2] for n in recorded if n.startswith("blocks.")}
    outer = {n for n in recorded if not n.startswith("blocks.")}
    assert inner == set(save.LAYER_STEPS)
    assert outer == set(save.OUTER_STEPS)
    for name in recorded:
        assert save.step_kinds(name) <= set(save.STEP_NAMES), name


@pytest.mark.slow
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(heads=st.sets(st.integers(0, 3), min_size=1), layers=st.sets(st.integers(0, 1), min_size=1),
       texts=st.sampled_from([[TEXT], [TEXT, "A dog"], ["a", "b c d e f"]]),
       padding=st.sampled_from(["right", "left"]), suffix=st.sampled_from([".npz", ".safetensors"]),
       arch=st.sampled_from(["attn", "gpt2"]))
def test_saved_files_round_trip(tmp_path_factory, heads, layers, texts, padding, suffix, arch):
    """Any selection, batch and format: the file read back (views rebuilt) is the engine's trace."""
    out = tmp_path_factory.mktemp("save") / f"trace{suffix}"
    heads, layers = sorted(heads), sorted(layers)
    result = runner.invoke(app, ["trace", *texts, *SMALL, "--arch", arch, "--padding", padding,
                                 "--head", ",".join(map(str, heads)),
                                 "--layer", ",".join(map(str, layers)), "--save", str(out)])
    assert result.exit_code == 0, result.stderr
    trace = engine_trace(texts, layers=layers, heads=heads, arch=arch, padding=padding)
    tensors, config = load(out)
    assert_same_tensors(tensors, trace.tensors)
    assert config["heads_saved"] == heads and config["layers_saved"] == layers
