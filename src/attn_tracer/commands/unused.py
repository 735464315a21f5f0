"""Options a run will not use: the one rule for every option of every command.

Every option either changes what the command writes, or the run says on stderr, in a notice,
that it changes nothing this time (and goes on): nothing given is silently dropped. The
notices wait, as every notice does, until the run has worked.

Two families of options are named here, by command, because whether they are used depends on
the output chosen, not on the option itself:

- VIEW_ONLY shape the terminal view. With --json or --json-lines, and neither --svg nor --html
  to draw the view into a file, there is no view: the run says so and leaves them out (they are
  not checked against the text either: `--query 99 --json` is not refused).
- JSON_ONLY shape the JSON; without --json (or --json-lines) they change nothing.

The other conditional notices (--top-k without --predict, --steps without --save, --seed with
--weights, …) stay beside the checks of the command they belong to. tests/test_option_rules.py
walks every option of every command against its own table of what each one does, so an option
added without a rule fails there by name.
"""

from __future__ import annotations

import dataclasses

# command → {flag: the field of the command's request that holds it}
VIEW_ONLY: dict[str, dict[str, str]] = {
    "trace": {"--batch-index": "batch_index", "--query": "query", "--keys": "keys",
              "--numbers": "numbers", "--values": "values", "--cost": "cost",
              "--circuits": "circuits", "--width": "width"},
    "heads": {"--sort": "sort", "--top": "top", "--width": "width", "--score": "score"},
    "attribute": {"--components": "components", "--width": "width"},
}
JSON_ONLY: dict[str, dict[str, str]] = {
    "trace": {"--precision": "precision"},
    "heads": {"--thumbnails": "thumbnails"},
}


def given(request, field: str) -> bool:
    """Whether `field` of the request dataclass differs from its default (was given). An
    option given at its default value (`--sort layer`) is not told apart: it asks for what
    happens anyway."""
    f = next(f for f in dataclasses.fields(request) if f.name == field)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return getattr(request, field) != default


def _listed(flags: list[str]) -> str:
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"


def view_notice(command: str, request, output: str, hint: str) -> list[str]:
    """The notice for VIEW_ONLY options given when `output` (--json, --json-lines) writes no
    view; `hint`: how to get the view too."""
    flags = [flag for flag, field in VIEW_ONLY.get(command, {}).items() if given(request, field)]
    if not flags:
        return []
    verb = "shapes" if len(flags) == 1 else "shape"
    return [f"{_listed(flags)} {verb} the terminal view, which {output} does not write, so "
            f"{'it changes' if len(flags) == 1 else 'they change'} nothing; {hint}"]


def json_notice(command: str, request, outputs: str = "--json") -> list[str]:
    """The notice for JSON_ONLY options given without `outputs` (--json, or --json or
    --json-lines)."""
    flags = [flag for flag, field in JSON_ONLY.get(command, {}).items() if given(request, field)]
    if not flags:
        return []
    verb = "shapes" if len(flags) == 1 else "shape"
    return [f"{_listed(flags)} {verb} the JSON output; without {outputs} "
            f"{'it changes' if len(flags) == 1 else 'they change'} nothing"]


def without_view(command: str, request):
    """The request with its VIEW_ONLY options back at their defaults: a run that draws no view
    neither uses nor checks them."""
    defaults = {}
    for field in VIEW_ONLY.get(command, {}).values():
        f = next(f for f in dataclasses.fields(request) if f.name == field)
        defaults[field] = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                           else f.default)
    return dataclasses.replace(request, **defaults)
