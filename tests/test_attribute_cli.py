"""`attn attribute` on the command line: the JSON document against its schema, the view at 80
and 160 columns with and without color (read back and compared with the JSON's numbers), and
the diverging colors themselves."""

from __future__ import annotations

import io
import json
import math
import re
from importlib.resources import files

import numpy as np
import pytest
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from attn_tracer.cli import app
from attn_tracer.commands import attribute as attr
from attn_tracer.commands.run import Request
from attn_tracer.render import attribution as render_attribution

jsonschema = pytest.importorskip("jsonschema")

runner = CliRunner()
SCHEMA = json.loads(files("attn_tracer.data").joinpath("attribute.schema.json").read_text())
TEXT = "The cat sat on the mat"
SMALL = ["--d-model", "32", "--heads", "4", "--layers", "2"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
BG = re.compile(r"\x1b\[([0-9;]*)m")

CASES = {
    "attn": [],
    "gpt2": ["--arch", "gpt2"],
    "gpt2-versus-ablate-rollout": ["--arch", "gpt2", "--versus", "#11", "--ablate", "L1H2",
                                   "--rollout", "--all-positions"],
    "attn-mean-ablation": ["--ablate", "L0H1,L1H3", "--ablate-mode", "mean", "--target",
                           "␣the", "--position", "3"],
    "no-pos-no-bias": ["--pos", "none", "--no-bias", "--rollout", "--mask", "none"],
}


def json_of(args: list[str], text: str = TEXT, sizes: list[str] = SMALL) -> dict:
    result = runner.invoke(app, ["attribute", text, *sizes, *args, "--json"])
    assert result.exit_code == 0, result.stderr
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, SCHEMA)
    return doc


@pytest.mark.parametrize("case", list(CASES))
def test_json_is_one_valid_document_whose_parts_add_up(case: str):
    doc = json_of(CASES[case])
    assert doc["schema"] == "attn-attribute/1"
    logits = [c["logit"] for c in doc["components"]]
    # Σ components + constant is the measure the run computed; float32 forward, float64 sum.
    assert sum(logits) + doc["constant"] == pytest.approx(doc["total"], abs=1e-9)
    assert doc["total"] == pytest.approx(doc["prediction"]["value"],
                                         abs=1e-5 * max(1.0, abs(doc["total"])))
    heads = [c for c in doc["components"] if c["kind"] == "head"]
    assert len(heads) == 2 * 4
    assert all(c["name"] == f"L{c['layer']}H{c['head']}" for c in heads)
    assert len(doc["logit_lens"]) == 2 == len(doc["logit_lens_target"])
    assert all(len(row) == len(doc["logit_lens_positions"]) for row in doc["logit_lens"])
    # The lens after the last layer is the model's prediction at the position.
    j = doc["logit_lens_positions"].index(doc["position"])
    assert doc["logit_lens"][-1][j]["id"] == doc["prediction"]["top"][0]["id"]
    assert ("ablation" in doc) == ("--ablate" in CASES[case])
    assert ("rollout" in doc) == ("--rollout" in CASES[case])
    if "rollout" in doc:
        R = np.array(doc["rollout"]["matrix"])
        np.testing.assert_allclose(R.sum(-1), 1.0, rtol=0, atol=1e-6)
    kinds = {c["kind"] for c in doc["components"]}
    assert ("mlp" in kinds) == ("gpt2" in case)
    assert ("pos_embed" in kinds) == ("no-pos" not in case)
    assert ("attn_bias" in kinds) == ("no-bias" not in case)


def test_json_position_target_and_versus():
    doc = json_of(["--position", "2", "--target", "#464", "--versus", "␣cat"])
    assert doc["position"] == 2 and doc["token"]["text"] == "␣sat"
    assert doc["target"]["id"] == 464 and doc["versus"]["text"] == "␣cat"
    assert doc["measure"] == "logit_difference"
    # Random attention-only weights divide h by its RMS before W_U: frozen like ln_f's σ.
    assert doc["trained"] is False and doc["final_norm"]["kind"] == "rms"
    assert doc["final_norm"]["scale"] > 0


def test_schema_command_prints_the_shipped_schema():
    result = runner.invoke(app, ["schema", "attribute"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == SCHEMA
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_label_form_and_raw_text_name_the_same_token():
    assert attr.parse_token("␣the", 50257, "--target") == attr.parse_token(" the", 50257,
                                                                           "--target")
    assert attr.parse_token("#50256", 50257, "--target") == 50256
    assert attr.parse_token("#", 50257, "--target") == 2  # a lone # is the token "#"


# -- the view ------------------------------------------------------------------------------------


def result_of(*args: str, text: str = TEXT) -> attr.Result:
    from attn_tracer.cli import attribute  # noqa: F401  (the command exists)

    options = dict(arch="gpt2", d_model=32, heads=4, layers=2)
    extra = dict(zip(args[::2], args[1::2], strict=True))
    request = attr.AttributeRequest(Request(texts=[text], **options), **extra)
    return attr.compute(request, [].append)


def view(result, width: int, color: bool, **options) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=color,
                      color_system="truecolor" if color else None, highlight=False)
    render_attribution.render(result, console, **options)
    return console.file.getvalue()


@pytest.fixture(scope="module")
def full():
    request = attr.AttributeRequest(Request(texts=[TEXT], arch="gpt2", d_model=32, heads=4,
                                            layers=2), versus=" dog", ablate=["L1H1", "L0H3"],
                                    rollout=True, all_positions=True)
    return attr.compute(request, [].append)


@pytest.mark.parametrize("width", [80, 160])
@pytest.mark.parametrize("color", [False, True])
def test_view_fits_and_reads_the_same_with_and_without_color(full, width: int, color: bool):
    out = view(full, width, color)
    plain = ANSI.sub("", out)
    assert ("\x1b[" in out) == color
    for line in plain.splitlines():
        assert cell_len(line) <= width, line
    assert plain == ANSI.sub("", view(full, width, not color))  # color only repeats the text
    for needle in ("direct logit attribution", "strongest components", "check:", "logit lens",
                   "ablation: L0H3, L1H1 zeroed", "attention rollout", "untrained",
                   "logit(", "− logit(␣dog)"):
        assert needle in " ".join(plain.split()), needle


def grid_numbers(plain: str, layers: int, heads: int) -> np.ndarray:
    """The [layers × heads] grid read back from the view."""
    lines = plain.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("heads"))
    rows = []
    for line in lines[start + 2:start + 2 + layers]:
        cells = line.split()
        assert cells[0] == f"L{len(rows)}"
        rows.append([float(c.replace("−", "-")) for c in cells[1:1 + heads]])
    return np.array(rows)


@pytest.mark.parametrize("width", [80, 160])
def test_grid_shows_each_heads_share_with_its_sign(full, width: int):
    plain = view(full, width, False)
    shown = grid_numbers(plain, 2, 4)
    a = full.attribution
    want = np.zeros((2, 4))
    for c, v in zip(a.components, a.logits, strict=True):
        if c.kind == "head":
            want[c.layer, c.head] = v
    _, digits = render_attribution.grid_scale(a)
    np.testing.assert_allclose(shown, want, rtol=0, atol=0.5 * 10 ** -digits + 1e-12)
    assert (np.sign(shown) == np.sign(np.round(want, digits))).all()


def test_ranked_table_is_by_magnitude_with_signed_values(full):
    plain = view(full, 160, False, components=6)
    lines = plain.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("strongest components"))
    a = full.attribution
    order = sorted(range(len(a.logits)), key=lambda i: -abs(a.logits[i]))[:6]
    rows = lines[start + 2:start + 8]
    assert len({line.index("│") for line in rows}) == 1  # one axis for every bar
    for line, i in zip(rows, order, strict=True):
        m = re.match(r"\s*(\d+)  (.+?)\s+([+−][\d.]+)\s", line)
        assert m, line
        assert m.group(2) == a.components[i].name
        assert float(m.group(3).replace("−", "-")) == pytest.approx(a.logits[i], abs=0.006)
        # The bar is on the side of the sign: left of the axis for −, right for +.
        right = line.split("│")[1]
        assert ("█" in right) == (a.logits[i] > 0) or round(abs(a.logits[i]), 2) < 0.03


def backgrounds(out: str, token: str) -> list[tuple[int, int, int]]:
    """The background colors of the cells whose text is `token`."""
    found = []
    for m in re.finditer(r"\x1b\[([0-9;]*)m([^\x1b]*)", out):
        codes, text = m.group(1), m.group(2)
        if text.strip() == token:
            parts = codes.split(";")
            for k in range(len(parts) - 4):
                if parts[k] == "48" and parts[k + 1] == "2":
                    found.append(tuple(int(p) for p in parts[k + 2:k + 5]))
    return found


def test_diverging_colors_blue_toward_red_away_gray_zero():
    assert render_attribution.diverging(0.0) == render_attribution.ZERO
    assert render_attribution.diverging(1.0) == render_attribution.TOWARD
    assert render_attribution.diverging(-1.0) == render_attribution.AWAY
    r, _, b = render_attribution.diverging(0.5)
    assert b > r  # halfway toward: bluer than gray
    r, _, b = render_attribution.diverging(-0.5)
    assert r > b
    result = result_of("ablate", ["L0H0"])
    out = view(result, 160, True)
    a = result.attribution
    _, digits = render_attribution.grid_scale(a)
    seen = 0
    for c, v in zip(a.components, a.logits, strict=True):
        if c.kind != "head" or abs(v) < 10 ** -digits:
            continue
        for rgb in backgrounds(out, render_attribution.signed(float(v), digits)):
            r, _, b = rgb
            assert (b > r) == (v > 0), (c.name, v, rgb)
            seen += 1
    assert seen >= 4


def test_random_weights_say_untrained_and_a_checkpoint_does_not(hf_checkpoint):
    built = hf_checkpoint("gpt2", n_embd=32, n_head=4, n_layer=1, n_positions=16)
    result = runner.invoke(app, ["attribute", TEXT, "--weights", str(built.directory)],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    assert "untrained" not in result.stdout and f"GPT-2 weights from {built.directory}" in " ".join(
        result.stdout.split())
    plain = runner.invoke(app, ["attribute", TEXT, *SMALL], env={"COLUMNS": "80"})
    assert "untrained" in plain.stdout


def test_notices_go_to_stderr_after_the_run():
    result = runner.invoke(app, ["attribute", TEXT, *SMALL, "--ablate-mode", "mean", "--json"])
    assert result.exit_code == 0
    assert "--ablate-mode" in result.stderr
    json.loads(result.stdout)


@pytest.mark.slow
def test_nothing_is_nan_even_for_extreme_weights():
    """Huge random embeddings (attn arch, d_model 512): logits in the thousands, softmax
    probabilities that underflow to 0 — still finite numbers, still a valid document."""
    doc = json_of(["--rollout", "--ablate", "L0H0"], text="a b c " * 20,
                  sizes=["--d-model", "512", "--heads", "8", "--layers", "2"])

    def walk(x):
        if isinstance(x, float):
            assert math.isfinite(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(doc)


@pytest.mark.slow
def test_a_small_attribution_does_not_import_torch():
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            "sys.argv = ['attn', 'attribute', 'The cat sat', '--d-model', '16', '--heads', '2',"
            " '--rollout', '--ablate', 'L0H1']\n"
            "try:\n    runpy.run_module('attn_tracer', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch' in sys.modules, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "False"
    assert "direct logit attribution" in done.stdout


def test_a_padded_vocabulary_has_targets_without_text(hf_checkpoint):
    """nanoGPT-style checkpoints pad wte to 50304 rows: ids past the tokenizer can be targets
    (#ID), labelled <unused ID>, with empty bytes in the JSON."""
    m = hf_checkpoint("gpt2", seed=1, n_embd=32, n_head=2, n_layer=1, n_positions=16,
                      vocab_size=50304).directory
    doc = json_of(["--weights", str(m), "--target", "#50300", "--versus", "#7"], sizes=[])
    assert doc["target"] == {"id": 50300, "text": "<unused 50300>", "bytes": ""}
    result = runner.invoke(app, ["attribute", TEXT, "--weights", str(m),
                                 "--target", "#50304"])
    assert result.exit_code == 2 and "token ids run from 0 to 50303" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("padding", ["right", "left"])
def test_pad_to_changes_nothing_but_the_padded_row(padding: str):
    """--pad-to pads the one text: every figure is the unpadded run's, positions count real
    tokens, and the rollout's pad rows and columns are 0."""
    args = ["--arch", "gpt2", "--ablate", "L1H2", "--ablate-mode", "mean", "--rollout",
            "--all-positions", "--position", "3"]
    plain = json_of(args)
    padded = json_of([*args, "--pad-to", "9", "--padding", padding])
    n = plain["inputs"][0]["length"]
    assert padded["inputs"][0]["padding"] == 9 - n
    assert padded["position"] == 3
    assert padded["batch_position"] == (3 if padding == "right" else 3 + 9 - n)
    assert padded["logit_lens_positions"] == plain["logit_lens_positions"] == list(range(n))
    # float32 forwards of the same rows: a padded row only adds masked keys (exact zeros).
    close = {"abs": 1e-5}
    for a, b in zip(plain["components"], padded["components"], strict=True):
        assert a["name"] == b["name"] and a["logit"] == pytest.approx(b["logit"], **close)
    assert [[e["id"] for e in row] for row in padded["logit_lens"]] == [
        [e["id"] for e in row] for row in plain["logit_lens"]]
    assert padded["ablation"]["after"]["value"] == pytest.approx(
        plain["ablation"]["after"]["value"], **close)
    R = np.array(padded["rollout"]["matrix"])
    valid = np.array([True] * n + [False] * (9 - n))
    if padding == "left":
        valid = valid[::-1]
    np.testing.assert_allclose(R[np.ix_(valid, valid)], plain["rollout"]["matrix"], atol=1e-5)
    assert (R[~valid] == 0).all() and (R[:, ~valid] == 0).all()
