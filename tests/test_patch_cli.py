"""`attn patch` on the command line: a model whose one head carries the information by
construction, causal tracing's noise, the JSON document against its schema, the view, and bad
input (one line, exit 2, or 1 for a result).

The known-roles model (tests/heads_model.py) with one change: its induction head L1H0 also
copies what it attends to, V = the key's token code, written back into the token feature T
with gain 3 (the model's own L1 heads have V = 0 and write nothing). After "x a b c a" it
attends from the last " a" to " b" (the token after the earlier " a") and the tied unembedding
then predicts " b"; with " q" in place of " b" it predicts " q". Only L1H0 reads position 2 and
writes to the last position, so patching its Z restores the clean run exactly and no other
head restores anything.
"""

from __future__ import annotations

import json
from importlib.resources import files
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import heads_model
from attn_tracer.cli import app
from tolerance import tolerance

jsonschema = pytest.importorskip("jsonschema")

runner = CliRunner()
SCHEMA = json.loads(files("attn_tracer.data").joinpath("patch.schema.json").read_text())
CLEAN, CORRUPT = "x a b c a", "x a q c a"
SMALL = ["--arch", "gpt2", "--d-model", "32", "--heads", "4", "--layers", "2"]
FACT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def induction(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.numpy import save_file

    directory = heads_model.save(tmp_path_factory.mktemp("patch-roles") / "model")
    w = heads_model.weights()
    d = heads_model.D_MODEL
    qkv = w["h.1.attn.c_attn.weight"].copy()
    qkv[heads_model.T, 2 * d:2 * d + 64] = np.eye(64)  # L1H0's V: the key's token code
    out = w["h.1.attn.c_proj.weight"].copy()
    out[0:64, heads_model.T] = 3 * np.eye(64) / heads_model.LN1  # … written into T, gain 3
    w["h.1.attn.c_attn.weight"], w["h.1.attn.c_proj.weight"] = qkv, out
    save_file({k: v.astype(np.float32) for k, v in w.items()},
              str(directory / "model.safetensors"))
    return directory


def patch_json(args: list[str]) -> dict:
    result = runner.invoke(app, ["patch", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, SCHEMA)
    return doc


def grid(doc: dict, target: str) -> np.ndarray:
    return np.array(next(g for g in doc["grids"] if g["target"] == target)["values"])


@pytest.mark.parametrize("engine", ["numpy", pytest.param("torch", marks=pytest.mark.skipif(
    find_spec("torch") is None, reason="torch is not installed"))])
def test_the_induction_head_alone_restores_the_prediction(induction: Path, engine: str):
    doc = patch_json(["--weights", str(induction), "--clean", CLEAN, "--corrupt", CORRUPT,
                      "--patch", "z,resid_pre", "--engine", engine])
    assert doc["target"]["text"] == "␣b" and doc["versus"]["text"] == "␣q"
    assert doc["differ"] == [2]
    z = grid(doc, "z")
    layer, head = heads_model.ROLES["induction"]
    assert z[layer, head] >= 0.9
    others = np.delete(z.ravel(), layer * heads_model.HEADS + head)
    assert np.all(np.abs(others) <= 0.1)
    # The residual at the changed position carries it at every layer; nothing else does.
    resid = grid(doc, "resid_pre")
    assert np.all(resid[:, 2] >= 0.9)
    assert np.all(np.abs(np.delete(resid, 2, axis=1)) <= 0.1)


def test_noising_the_induction_head_breaks_the_prediction(induction: Path):
    doc = patch_json(["--weights", str(induction), "--clean", CLEAN, "--corrupt", CORRUPT,
                      "--patch", "z", "--direction", "noise"])
    z = grid(doc, "z")
    assert z[1, 0] <= 0.1  # without it, the clean behaviour is gone
    assert np.all(np.abs(np.delete(z.ravel(), 4) - 1) <= 0.1)  # every other head: no loss


def test_the_view_shows_baselines_marks_and_head_names(induction: Path):
    result = runner.invoke(app, ["patch", "--weights", str(induction), CLEAN, "--corrupt",
                                 CORRUPT, "--patch", "z"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "2:␣b*" in out and "2:␣q*" in out
    assert "clean run" in out and "corrupted run" in out
    assert "strongest: L1H0 +1.00" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "patched run" in result.stderr  # the number of forwards, before they ran


def test_causal_tracing_is_seeded_and_restoring_the_input_is_the_clean_run():
    args = ["--clean", FACT, "--corrupt-noise", "Tower", *SMALL, "--samples", "3",
            "--patch", "resid_pre,attn_out,mlp_out", "--restore-window", "3"]
    doc = patch_json(args)
    assert doc["noise"]["positions"] == [4] and doc["metric"] == "prob"  # ␣Tower
    assert doc["noise"]["samples"] == 3
    again = patch_json(args)
    assert again["grids"] == doc["grids"] and again["baselines"] == doc["baselines"]
    other = patch_json([*args, "--noise-seed", "1"])
    assert other["baselines"]["corrupted"] != doc["baselines"]["corrupted"]
    resid = grid(doc, "resid_pre")
    raw = np.array(next(g for g in doc["grids"] if g["target"] == "resid_pre")["raw"])
    # The subject's embedding restored at the first layer is the clean input: the clean run,
    # up to the rounding of a second forward. Random GPT-2 logits are N(0, 3²) (weights.py),
    # below 20 over 50,257 tokens; each within t of the other forward's, so p within e^(±2t).
    t = tolerance(20.0, "float32", pair=True)
    clean = doc["baselines"]["clean"]
    assert abs(raw[0, 4] - clean) <= 2.01 * t * clean
    assert resid[0, 4] > 0.99
    # Before the subject nothing differs: those cells are the noisy runs themselves, exactly.
    assert np.all(resid[:, :4] == 0.0)
    assert [g["window"] for g in doc["grids"]] == [1, 3, 3]


def test_schema_command_prints_the_shipped_schema():
    result = runner.invoke(app, ["schema", "patch"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == SCHEMA
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_json_has_every_grid_with_named_axes():
    doc = patch_json(["The cat sat on the mat", "--corrupt", "The dog sat on the mat", *SMALL,
                      "--target", "␣the", "--versus", "␣a",
                      "--patch", "resid_pre,attn_out,mlp_out,z,q,k,v,pattern"])
    shapes = {g["target"]: (g["axes"], g["shape"]) for g in doc["grids"]}
    assert shapes["resid_pre"] == (["layer", "position"], [2, 6])
    assert shapes["z"] == (["layer", "head"], [2, 4])
    assert shapes["pattern"] == (["layer", "head"], [2, 4])
    assert doc["differ"] == [1] and len(doc["corrupt_tokens"]) == 6
    assert doc["runs"] <= doc["cells"] and doc["forwards"] >= 1
    # Position 0 is the same in both texts: patching it changes nothing, exactly.
    assert np.all(grid(doc, "resid_pre")[:, 0] == 0.0)


@pytest.mark.parametrize(("args", "code", "words"), [
    (["a b c", "--corrupt", "a b c d"], 2, "they first differ at position 3"),
    (["a b c", "--corrupt", "a b c"], 2, "no difference to patch"),
    (["a b c", "--corrupt", "a b d", "--patch", "bogus"], 2, "--patch takes"),
    (["a b c", "--corrupt", "a b d", "--patch", "mlp_out", "--arch", "attn"], 2, "no MLP"),
    (["a b c", "--corrupt-noise", "b", "--samples", "0"], 2, "--samples must be at least 1"),
    (["a b c", "--corrupt-noise", "zebra"], 2, "is not in the text"),
    (["a b c"], 2, "give the corruption one way"),
    (["a b c", "--corrupt", "a b d", "--corrupt-noise", "b"], 2, "give the corruption one way"),
    (["a b c", "--corrupt", "a b d", "--restore-window", "0"], 2,
     "--restore-window must be at least 1"),
    (["a b c", "--corrupt", "a b d", "--position", "7"], 2, "out of range"),
    (["a b c", "--corrupt", "a b d", "--target", "␣x", "--versus", "␣x"], 2, "same token"),
    (["a b c", "--clean", "a b c", "--corrupt", "a b d"], 2, "give the clean text once"),
])
def test_bad_input_is_one_line(args: list[str], code: int, words: str):
    result = runner.invoke(app, ["patch", *args, "--d-model", "16", "--heads", "2"])
    assert result.exit_code == code, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn: error:"), result.stderr
    assert words in lines[0]


def test_equal_baselines_stop_with_exit_1():
    # Without a mask, without positions and with one layer, " a b c" and " b a c" are the same
    # set of tokens: the last position's attention, and so its prediction, is the same.
    result = runner.invoke(app, ["patch", " a b c", "--corrupt", " b a c", "--mask", "none",
                                 "--pos", "none", "--layers", "1", "--d-model", "16",
                                 "--heads", "2", "--target", "#100", "--versus", "#200"])
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no difference for patching to explain" in lines[0]
    assert result.stdout == ""


def test_svg_is_written_with_the_view_and_refused_when_it_exists(tmp_path: Path):
    svg = tmp_path / "patch.svg"
    args = ["patch", "a b c", "--corrupt", "a x c", "--d-model", "16", "--heads", "2",
            "--target", "#100", "--versus", "#200", "--svg", str(svg)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert svg.read_text().startswith("<svg") and "resid_pre" in svg.read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.stderr


@pytest.mark.slow
def test_a_small_patch_does_not_import_torch():
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            "sys.argv = ['attn', 'patch', 'a b c', '--corrupt', 'a x c', '--d-model', '16',"
            " '--heads', '2', '--patch', 'resid_pre,z,pattern', '--target', '#1']\n"
            "try:\n    runpy.run_module('attn_tracer', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch' in sys.modules, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "False"
    assert "layer × head" in done.stdout
