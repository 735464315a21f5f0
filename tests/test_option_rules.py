"""The rule for every option of every command: it changes what the command writes, or the run
says on stderr that it changes nothing this time (src/attn_tracer/commands/unused.py).

RULES below says what each option does, command by command. The test walks the options of the
Click commands that Typer builds (what `--help` lists, hidden ones aside), so an option added
to any command, or a new command, fails here by name until it has a rule. The rules:

- "data":   it changes what every output of the command holds (the input, the model, the
            engine, the analysis). Nothing to say.
- "output": it chooses or names an output (--json, --save PATH, --svg PATH).
- view(…):  it shapes only the terminal view. Given with --json (and no --svg/--html drawing
            the view into a file), the run says so in a notice naming it, and the JSON is the
            one without it. Add the flag to unused.VIEW_ONLY too; the test runs it.
- json(…):  it shapes only the JSON; without --json, a notice naming it. unused.JSON_ONLY.
- unused(…): it matters only with another option or input (--top-k needs --predict, --seed
            random weights, --steps --save, …); the arguments given are a run where it does
            not, and the test checks that the run's notice names it.

Typical additions: `attn patch --plot FILE` is "output"; a `--corpus DIR` input is "data";
an option that only changes how the view is drawn is view(["--flag", "value"]).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from attn_tracer.cli import app
from attn_tracer.commands import unused

TINY = ["--d-model", "8", "--heads", "2", "--layers", "1", "--engine", "numpy"]
RUNNER = CliRunner()


def view(args: list[str]) -> tuple:
    return ("view", args)


def json_only(args: list[str]) -> tuple:
    return ("json", args)


def unused_with(args: list[str]) -> tuple:
    return ("unused", args)


INPUT = {
    "texts": "data", "--file": "data", "--lines": "data", "--allow-special": "data",
    "--keep-newline": unused_with(["hi", "--keep-newline"]),  # a TEXT argument is exact
    "--padding": "data", "--max-length": "data", "--pad-to": "data", "--ids": "data",
}
CROSS = {"--cross": "data", "--cross-file": "data"}
MODEL = {
    "--d-model": "data", "--heads": "data", "--d-head": "data", "--layers": "data",
    "--n-ctx": "data", "--pos": "data", "--mask": "data", "--no-scale": "data",
    "--no-bias": "data", "--arch": "data", "--weights": "data",
    # Modern attention: each changes the stack, or is refused where it cannot (model_options).
    "--kv-heads": "data", "--window": "data", "--norm": "data", "--mlp": "data",
    "--d-mlp": "data", "--rotary-dims": "data", "--rope-theta": "data",
    "--rotary-style": "data",
    "--seed": unused_with(["hi", "--seed", "3", "--weights", "{gpt2}"]),
}
ENGINE = {"--device": "data", "--engine": "data", "--dtype": "data", "--max-memory": "data"}
# --plot writes a figure whatever stdout is (a file, like --svg); its theme only shapes it.
PLOT = {"--plot": "output", "--plot-theme": "data"}
PREDICT = {
    "--predict": "data",
    "--top-k": unused_with(["hi", "--top-k", "3"]),
    "--temperature": unused_with(["hi", "--temperature", "2"]),
}

RULES: dict[str, dict[str, object]] = {
    "tokens": {"text": "data", "--file": "data", "--json": "output", "--allow-special": "data",
               "--weights": "data",
               "--keep-newline": unused_with(["hi", "--keep-newline"])},
    "schema": {"which": "data"},
    "trace": {
        **INPUT, **CROSS, **MODEL, **ENGINE, **PREDICT, **PLOT,
        "--layer": "data", "--head": "data", "--stages": "data",
        "--batch-index": view(["--batch-index", "0"]), "--query": view(["--query", "0"]),
        "--keys": view(["--keys", "0"]), "--numbers": view(["--numbers", "--query", "0"]),
        "--values": view(["--values"]), "--cost": view(["--cost"]),
        "--circuits": view(["--circuits"]), "--width": view(["--width", "50"]),
        "--json": "output", "--json-lines": "output",
        "--precision": json_only(["--precision", "3"]),
        "--save": "output", "--steps": unused_with(["hi", "--steps", "pattern"]),
        "--svg": "output", "--html": "output",
        "--force": unused_with(["hi", "--force"]),
    },
    "heads": {
        **INPUT, **MODEL, **ENGINE, **PLOT, "--score": view(["--score", "induction"]),
        "--sort": view(["--sort", "induction"]), "--top": view(["--top", "1"]),
        "--repeat": "data", "--bos": "data", "--json": "output",
        "--thumbnails": json_only(["--thumbnails"]), "--svg": "output", "--html": "output",
        "--width": view(["--width", "50"]), "--force": unused_with(["hi", "--force"]),
        # attn heads --corpus: each corpus option is refused without --corpus.
        "--corpus": "data", "--text-field": "data", "--batch-size": "data", "--examples": "data",
        "--state": "data", "--state-every": "data", "--shard": "data", "--ray": "data",
        "--workers": "data", "--skip-bad": "data",
    },
    # The merged result of shard states: the view and JSON of attn heads --corpus.
    "heads-merge": {"states": "data", "--sort": "data", "--top": "data", "--json": "output",
                    "--thumbnails": "data", "--svg": "output", "--html": "output",
                    "--width": "data", "--force": "data"},
    # attn patch: every option of its own changes the grids or is refused where it cannot
    # (commands/patch.py says the ones a run leaves unused, --restore-window among them).
    "patch": {
        **INPUT, **MODEL, **ENGINE,
        **{flag: "data" for flag in (
            "--clean", "--corrupt", "--corrupt-noise", "--direction", "--metric", "--patch",
            "--per-position", "--position", "--restore-window", "--samples", "--noise-scale",
            "--noise-seed", "--target", "--versus", "--top", "--width", "--force")},
        "--json": "output", "--svg": "output", "--html": "output",
        # Its runs need a corruption: these two are said unused as in the other commands.
        "--keep-newline": "data", "--seed": "data",
    },
    # attn generate: every option of its own changes what is generated or shown, or is
    # refused where it cannot (commands/generate.py).
    "generate": {
        **INPUT, **MODEL, **ENGINE,
        **{flag: "data" for flag in (
            "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--stop",
            "--alternatives", "--head", "--layer", "--cost", "--quiet", "--precision",
            "--force")},
        "--json": "output", "--json-lines": "output", "--save": "output",
        "--keep-newline": "data", "--seed": "data",
    },
    "attribute": {
        **INPUT, **MODEL, **ENGINE, **PLOT,
        "--target": "data", "--versus": "data", "--position": "data", "--ablate": "data",
        "--ablate-mode": unused_with(["hi", "--ablate-mode", "mean"]),
        "--all-positions": "data", "--rollout": "data", "--top-k": "data",
        "--components": view(["--components", "3"]), "--json": "output",
        "--svg": "output", "--html": "output", "--width": view(["--width", "50"]),
        "--force": unused_with(["hi", "--force"]),
    },
    "explore": {**INPUT, **CROSS, **MODEL, **ENGINE, **PREDICT},
}
ROOT = {"--version", "--debug", "--install-completion", "--show-completion"}


def command_options() -> dict[str, list[str]]:
    """Every command's parameters as --help lists them (its longest flag; arguments by name)."""
    group = typer.main.get_command(app)
    out = {}
    for name, command in group.commands.items():
        out[name] = [max(p.opts, key=len) if p.param_type_name == "option" else p.name
                     for p in command.params if not getattr(p, "hidden", False)]
    out[""] = [max(p.opts, key=len) for p in group.params]
    return out


def test_every_option_of_every_command_has_a_rule():
    missing = []
    for command, options in command_options().items():
        if command == "":
            missing += [f"attn {o}" for o in options if o not in ROOT]
            continue
        if command not in RULES:
            missing.append(f"attn {command} (a new command: add RULES[{command!r}])")
            continue
        missing += [f"attn {command} {o}" for o in options if o not in RULES[command]]
    assert not missing, (
        "options without a rule in tests/test_option_rules.py RULES: " + ", ".join(missing)
        + ". Say what each does with --json and where it has no effect (see the module's "
        "docstring): 'data', 'output', view([...]) (also in commands/unused.py VIEW_ONLY: a "
        "notice with --json), json_only([...]) (unused.JSON_ONLY: a notice without --json), or "
        "unused_with([...]) (a run where it changes nothing, whose notice must name it).")
    stale = [f"attn {c} {o}" for c, rules in RULES.items() for o in rules
             if o not in command_options().get(c, [])]
    assert not stale, f"RULES names options that no longer exist: {stale}"


def test_the_notice_tables_agree_with_the_rules():
    for command, rules in RULES.items():
        views = {o for o, rule in rules.items() if isinstance(rule, tuple) and rule[0] == "view"}
        jsons = {o for o, rule in rules.items() if isinstance(rule, tuple) and rule[0] == "json"}
        assert views == set(unused.VIEW_ONLY.get(command, {})), command
        assert jsons == set(unused.JSON_ONLY.get(command, {})), command


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 checkpoint (a random-initialised Hugging Face model, save_pretrained)."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=8, n_head=2, n_layer=1, n_positions=16,
                                     vocab_size=50257)
    path = tmp_path_factory.mktemp("gpt2-rules") / "m"
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _cases():
    for command, rules in RULES.items():
        for option, rule in rules.items():
            if isinstance(rule, tuple):
                yield pytest.param(command, option, rule, id=f"{command} {option}")


class _NoApp:
    return_code = 0

    def __init__(self, *args, **kwargs) -> None:
        pass

    def run(self) -> int:
        return 0


@pytest.mark.parametrize(("command", "option", "rule"), list(_cases()))
def test_an_option_that_changes_nothing_says_so(command: str, option: str, rule: tuple,
                                                request, monkeypatch):
    kind, args = rule
    if "{gpt2}" in " ".join(args):
        args = [a.replace("{gpt2}", str(request.getfixturevalue("gpt2"))) for a in args]
    model = [] if "--weights" in args or command == "tokens" else TINY
    if kind == "view":
        full = [command, "hi", *model, "--json", *args]
    elif kind == "json":
        full = [command, "hi", *model, *args]
    else:
        full = [command, *model, *args]
    if command == "explore":  # no terminal here: the run and its notices, not the app
        pytest.importorskip("textual")
        from attn_tracer.explore import app as explore_app
        from attn_tracer.explore import command as explore_command

        monkeypatch.setattr(explore_command, "check_terminal", lambda: None)
        monkeypatch.setattr(explore_app, "ExploreApp", _NoApp)
    result = RUNNER.invoke(app, full)
    assert result.exit_code == 0, (full, result.stderr)
    notices = [line for line in result.stderr.splitlines() if line.startswith("attn: ")]
    assert any(option in line for line in notices), (
        f"attn {command} {option} changes nothing in `attn {' '.join(full)}`, and no notice "
        f"says so (the rule of commands/unused.py); stderr: {result.stderr!r}")
    if kind == "view":  # the JSON is the one without the option
        plain = RUNNER.invoke(app, [command, "hi", *model, "--json"])
        assert json.loads(result.stdout) == json.loads(plain.stdout)


def test_view_options_with_svg_draw_into_the_file(tmp_path: Path):
    # --json --svg draws the view into the file: the view's options are used, nothing said.
    result = RUNNER.invoke(app, ["trace", "hi", *TINY, "--json", "--cost", "--svg",
                                 str(tmp_path / "v.svg")])
    assert result.exit_code == 0, result.stderr
    assert "--cost" not in result.stderr
    assert "memory" in (tmp_path / "v.svg").read_text(encoding="utf-8") or "bytes" in (
        tmp_path / "v.svg").read_text(encoding="utf-8")


def test_view_options_with_json_are_not_checked_against_the_text():
    # Not used, so not refused either: --query 99 of a one-token text changes nothing here.
    result = RUNNER.invoke(app, ["trace", "hi", *TINY, "--json", "--query", "99", "--values",
                                 "--d-model", "768", "--heads", "12"])
    assert result.exit_code == 0, result.stderr
    assert "--query and --values shape the terminal view" in result.stderr
