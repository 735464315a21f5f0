"""Files a run writes on request (--save, --svg, --html): checked before the run, written whole.

Every target is checked before the model runs: its name, its directory, and whether that
directory really takes a new file (a probe file is created and removed: permission bits say
nothing when running as root, and /proc or a read-only mount refuse writes the bits allow).
A file is written to a temporary name beside its target and renamed into place, so a failure
never leaves half a file, and an existing file is replaced only with --force.

--save writes, under its step name, every tensor captured for the selected layers (and the
steps outside the layers: tokens, embeddings, logits), or with --steps only the steps named
there; the token ids (step `tokens`) always. Each distinct tensor is stored once: a step that
is another one's numbers rearranged (q.split, q.heads, z, z.transpose, …) is listed in `views`
with the reshape, head selection and transpose that rebuild it (see `view`). Beside the tensors,
two JSON texts: `config` (the run's config, heads_saved, layers_saved, steps_saved: every step
name the file holds, views included) and `views`: in an `.npz` as 0-d unicode arrays (loadable
without pickle), in a `.safetensors` file as metadata keys. Tensors with a `heads` axis hold only
the selected heads; boolean tensors are stored as uint8. Nothing is compressed: the write runs
at the disk's speed.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from attn_tracer.errors import AttnError, UsageError
from attn_tracer.model.steps import (
    ALWAYS_SAVED,
    ATTENTION_STEPS,
    EVERY_LAYER_STEP,
    FAMILY_LAYER_STEPS,
    LAYER_STEPS,
    MODERN_ATTENTION_STEPS,
    MODERN_LAYER_STEPS,
    OUTER_STEPS,
    REPEATS,
    VIEWS,
)
from attn_tracer.model.trace import Trace

TENSOR_SUFFIXES = (".npz", ".safetensors")


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_target(path: Path, force: bool, flag: str, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse a target we could not or should not write, before any work is done."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: the name must end in {' or '.join(suffixes)}")
    try:
        _check_target(path, force, flag)
    except OSError as e:  # a name too long, a directory we may not search
        raise UsageError(f"{flag} {path}: {e.strerror or e}; choose another name or place"
                         ) from None


def _check_target(path: Path, force: bool, flag: str) -> None:
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    if path.exists() and not force:
        raise UsageError(f"{flag} {path} exists; add --force to overwrite it")
    parent = _parent(path)
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UsageError(f"{flag} {path}: {folder} is a file, not a directory")
            break
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: the directory {parent} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name[:64]}.", dir=parent)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {parent} ({e.strerror or e}); "
                         "choose another place") from None
    os.close(fd)
    os.unlink(probe)


# Files written inside `staged()`, as (temporary file, target), waiting for the run to end well.
_staged: list[tuple[Path, Path]] | None = None
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def staged() -> Iterator[None]:
    """Hold every file written inside under its temporary name until the block ends: then all
    are renamed into place; if anything failed (an exception, a signal's SystemExit), none are,
    and the temporary files are removed. A run that fails after --save was written, while the
    view or stdout is being written, so leaves no file. A closed pipe on stdout is a success
    (the reader left early), so its files are kept."""
    global _staged
    outer, _staged = _staged, []
    try:
        yield
    except BrokenPipeError:
        _commit(_staged)
        raise
    except BaseException:
        _discard(_staged)
        raise
    else:
        _commit(_staged)
    finally:
        _staged = outer


def _commit(files: list[tuple[Path, Path]]) -> None:
    try:
        while files:
            tmp, path = files[0]
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise AttnError(f"cannot write {path}: {e.strerror or e}") from None
            files.pop(0)
    finally:
        _discard(files)  # after a failed rename (or a signal), the rest are not kept either


def _discard(files: list[tuple[Path, Path]]) -> None:
    while files:
        files.pop()[0].unlink(missing_ok=True)


_created: list[Path] = []  # the temporary file being written, until it is renamed or staged


def _temporary(parent: Path, target: Path) -> Path:
    """A new empty file beside `target`, remembered in _created. Signals wait while it is made
    and remembered, so that none can leave it behind unnamed; the prefix is cut so that a
    target whose own name is near the 255-byte limit still has room for the temporary one."""
    mask = getattr(signal, "pthread_sigmask", None)
    old = mask(signal.SIG_BLOCK, _SIGNALS) if mask else None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name[:64]}.", dir=parent)
        os.close(fd)
        _created.append(Path(name))
        return Path(name)
    finally:
        if mask:
            mask(signal.SIG_SETMASK, old)


def _forget_created() -> None:
    _discard([(tmp, tmp) for tmp in _created])
    _created.clear()


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp)` beside `path`, then rename into place (or, inside `staged()`,
    when the run has ended well); on failure, no file."""
    try:
        tmp = _temporary(_parent(path), path)
        write(tmp)
        # mkstemp makes the file private (0600); a saved file gets the usual 0666 − umask.
        os.chmod(tmp, 0o666 & ~_umask())
        if _staged is not None:
            _staged.append((tmp, path))
        else:
            os.replace(tmp, path)
        _created.remove(tmp)
    except OSError as e:
        _forget_created()
        raise AttnError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:  # a signal's SystemExit among them
        _forget_created()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: tmp.write_bytes(data))


# ── what --save writes ────────────────────────────────────────────────────────────────────────

# Every step a run can record, by its name inside a layer (after `blocks.L.`) or outside the
# layers: the step catalogue's (model/steps.py).


def step_kinds(name: str) -> set[str]:
    """The --steps names that select step `name`: its name inside the layer (`attn.pattern`,
    `mlp.out`), for attention steps also their name inside the attention (`pattern`, which
    matches self- and cross-attention alike), and outside the layers the name itself (and for
    the cross text's steps, the name without `cross.`)."""
    if name.startswith("blocks."):
        inner = name.split(".", 2)[2]
        kinds = {inner}
        block, _, step = inner.partition(".")
        if block in ("attn", "cross_attn") and step:
            kinds.add(step)
        return kinds
    return {name, name.removeprefix("cross.")}


STEP_NAMES = tuple(sorted(set().union(*(step_kinds(f"blocks.0.{s}")
                                        for s in EVERY_LAYER_STEP),
                                      *(step_kinds(s) for s in OUTER_STEPS))))


def parse_steps(values: list[str]) -> tuple[str, ...] | None:
    """--steps pattern,z (repeatable) → the step kinds to save; None: every step."""
    if not values:
        return None
    chosen = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part not in STEP_NAMES:
                close = difflib.get_close_matches(part, STEP_NAMES, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                outer = [s for s in OUTER_STEPS if not s.startswith("cross.")]
                layer = [s for s in LAYER_STEPS if not s.startswith(("attn.", "cross_attn."))]
                modern = [s for s in (*MODERN_LAYER_STEPS, *FAMILY_LAYER_STEPS)
                          if not s.startswith("attn.")]
                raise UsageError(
                    f"--steps: no step named {part!r}{hint}; choose from "
                    f"{', '.join(ATTENTION_STEPS)} (each also as attn.NAME or cross_attn.NAME), "
                    f"{', '.join(layer)}, {', '.join(outer)} (cross.NAME for the cross text's); "
                    f"with modern attention also {', '.join(MODERN_ATTENTION_STEPS)} and "
                    f"{', '.join(modern)}")
            chosen.append(part)
    return tuple(dict.fromkeys(chosen))


def recordable(arch: str, predict: bool, cross: bool, pos: str, scale: bool) -> set[str]:
    """The step names a run of this configuration can record (for layer 0; every layer has the
    same): what --steps may ask of it. `masked` is among them, though a run whose every key is
    allowed (one text under a causal mask of one token, --mask none without padding) has none."""
    from attn_tracer.model.arch import family

    gpt2 = family(arch).full_block  # norms, an MLP and a final norm around the attention
    outer = {"tokens", "embed", "resid_pre"} | ({"pos_embed"} if pos != "none" else set())
    if cross:
        outer |= {"cross." + s for s in outer}
    outer |= ({"ln_f"} if gpt2 else set()) | ({"logits", "probs"} if predict else set())
    attention = {s for s in ATTENTION_STEPS if scale or s != "scaled"}
    layer = {f"attn.{s}" for s in attention} | {"resid_post"}
    layer |= {f"cross_attn.{s}" for s in attention} if cross else set()
    layer |= {"resid_mid"} if gpt2 or cross else set()
    layer |= {"ln_1", "ln_2", "mlp.in", "mlp.gelu", "mlp.out"} if gpt2 else set()
    return outer | {f"blocks.0.{s}" for s in layer}


def check_recordable(steps: tuple[str, ...] | None, arch: str, predict: bool, cross: bool,
                     pos: str, scale: bool) -> None:
    """Refuse a --steps name that no run of this configuration records, saying what would
    record it: a file silently without the step asked for is the failure users trust least."""
    if steps is None:
        return
    have = recordable(arch, predict, cross, pos, scale)
    fixes = (("add --predict", dict(predict=True)),
             ("it is a step of --arch gpt2 (LayerNorm, MLP), and this run is --arch attn",
              dict(arch="gpt2")),
             ("add --cross TEXT: it is a step of cross-attention", dict(cross=True)),
             ("--pos none adds no positional embedding", dict(pos="learned")),
             ("--no-scale leaves the scores unscaled", dict(scale=True)))
    for kind in steps:
        if kind in ALWAYS_SAVED or any(kind in step_kinds(name) for name in have):
            continue
        why = "no run records it"
        for fix, change in fixes:
            other = dict(arch=arch, predict=predict, cross=cross, pos=pos, scale=scale) | change
            if any(kind in step_kinds(name) for name in recordable(**other)):
                why = fix
                break
        raise UsageError(f"--steps {kind}: this run records no such step; {why}")


def unrecorded(steps: tuple[str, ...] | None, names) -> list[str]:
    """The --steps kinds that matched none of the step `names` a run recorded."""
    if steps is None:
        return []
    names = list(names)
    return [kind for kind in steps if kind not in ALWAYS_SAVED
            and not any(kind in step_kinds(name) for name in names)]


def selected(name: str, steps: tuple[str, ...] | None) -> bool:
    """Whether --steps `steps` saves step `name` (None: every step is saved)."""
    return steps is None or name in ALWAYS_SAVED or bool(step_kinds(name) & set(steps))


def captured_steps(steps: tuple[str, ...], layers: tuple[int, ...]) -> tuple[str, ...]:
    """The full step names that --steps needs kept, for Selection.extra."""
    names = [*OUTER_STEPS, *(f"blocks.{layer}.{s}" for layer in layers
                             for s in EVERY_LAYER_STEP)]
    return tuple(n for n in names if selected(n, steps))


def estimate_capture(steps: tuple[str, ...] | None, capture: str) -> str:
    """The capture level whose memory estimate covers `capture` plus the steps --save keeps."""
    if steps is None:
        return "all"
    order = ("patterns", "stages", "all")
    stage = {s.rpartition(".")[2] if s.startswith(("attn.", "cross_attn.")) else s
             for s in steps} - set(ALWAYS_SAVED)
    need = ("patterns" if stage <= {"pattern"} else
            "stages" if stage <= {"scores", "scaled", "masked", "pattern"} else "all")
    return max(capture, need, key=order.index)


# A step that is only another step's numbers rearranged (Q split into heads, then transposed;
# Z transposed and merged; K and V repeated for the query heads) is stored once, as the tensor
# it rearranges (model/steps.VIEWS): that one holds every head (or K/V head), while a tensor
# with a heads axis holds only the saved heads. The others are recorded in the file's `views`
# as how to get them back from it:
#   x = tensors[of]; x = x.reshape(reshape); x = x.take(take.index, take.axis);
#   x = x.transpose(permute); x = x.repeat(repeat.count, repeat.axis); x = x.take(pick…)
# (each only where the recipe has it: take when not every head was saved, permute for a
# transposed step, repeat and pick for repeat_kv: K/V head j as query heads j·g … j·g+g−1).


def view(base: np.ndarray, recipe: dict) -> np.ndarray:
    """A step rebuilt from the tensor it is a view of, by its entry in the file's `views`."""
    x = base.reshape(recipe["reshape"]) if "reshape" in recipe else base
    if "take" in recipe:
        x = x.take(recipe["take"]["index"], axis=recipe["take"]["axis"])
    x = x.transpose(recipe["permute"]) if "permute" in recipe else x
    if "repeat" in recipe:
        x = np.repeat(x, recipe["repeat"]["count"], axis=recipe["repeat"]["axis"])
    if "pick" in recipe:
        x = x.take(recipe["pick"]["index"], axis=recipe["pick"]["axis"])
    return x


def views_of(trace: Trace, tensors: dict[str, np.ndarray]) -> dict[str, dict]:
    """The steps of `tensors` that are views of another one kept there, with their recipe.

    Each candidate is compared with its recipe's result before it is dropped: a step that a
    hook replaced, or any other surprise, is simply stored whole. The head counts and widths
    come from the config (K and V have kv_heads heads), never from a shape.
    """
    from attn_tracer.model.steps import heads_of

    config = trace.config
    heads, d_head = config.heads, config.d_head
    saved_heads = list(trace.selection.heads)
    views = {}
    for name in tensors:
        prefix, _, step = name.partition(".attn.")
        if not step:
            prefix, _, step = name.partition(".cross_attn.")
            block = "cross_attn"
        else:
            block = "attn"
        if not prefix.startswith("blocks."):
            continue
        if step in REPEATS:
            recipe = _repeat_recipe(trace, tensors, f"{prefix}.{block}", step)
        elif step in VIEWS:
            of, transposed = VIEWS[step]
            of = f"{prefix}.{block}.{of}"
            if of not in tensors or tensors[of].ndim != 3:
                continue
            batch, length, _ = tensors[of].shape
            n = heads_of(config, step) if block == "attn" else heads
            recipe = {"of": of, "reshape": [batch, length, n, d_head]}
            if n == heads and saved_heads != list(range(heads)):
                recipe["take"] = {"axis": 2, "index": saved_heads}
            if transposed:
                recipe["permute"] = [0, 2, 1, 3]
        else:
            continue
        if recipe is None:
            continue
        x = tensors[name]
        rebuilt = view(tensors[recipe["of"]], recipe)
        if rebuilt.shape == x.shape and rebuilt.dtype == x.dtype and np.array_equal(rebuilt, x):
            views[name] = recipe
    return views


def _repeat_recipe(trace: Trace, tensors: dict[str, np.ndarray], prefix: str, step: str
                   ) -> dict | None:
    """k.repeat_kv / v.repeat_kv as their K/V heads repeated: from the rotated K where there
    is one (stored whole: it is no view), else from K or V itself."""
    config = trace.config
    rotated, plain = REPEATS[step]
    saved_heads = list(trace.selection.heads)
    pick = ({"pick": {"axis": 1, "index": saved_heads}}
            if saved_heads != list(range(config.heads)) else {})
    repeat = {"repeat": {"axis": 1, "count": config.groups}}
    if rotated is not None and f"{prefix}.{rotated}" in tensors:
        return {"of": f"{prefix}.{rotated}", **repeat, **pick}
    if f"{prefix}.{plain}" in tensors and tensors[f"{prefix}.{plain}"].ndim == 3:
        if rotated is not None and config.pos == "rotary":
            return None  # turned after the projection: not a view of K
        batch, length, _ = tensors[f"{prefix}.{plain}"].shape
        return {"of": f"{prefix}.{plain}", "reshape": [batch, length, config.kv_heads,
                                                        config.d_head],
                "permute": [0, 2, 1, 3], **repeat, **pick}
    return None


def tensors_of(trace: Trace, config_json: dict, steps: tuple[str, ...] | None = None
               ) -> tuple[dict[str, np.ndarray], str, str]:
    """The tensors to write (each distinct one once), the config as JSON, and the views as JSON.

    `steps`: the --steps kinds to save (None: every captured step).
    """
    kept = {name: x for name, x in trace.tensors.items() if selected(name, steps)}
    views = views_of(trace, kept)
    out = {}
    for name, x in kept.items():
        if name in views:
            continue
        # One contiguous little-endian block per tensor, written as it is: a copy only where
        # the recorded array is not one already.
        out[name] = np.ascontiguousarray(x.astype(np.uint8) if x.dtype == np.bool_ else x)
    meta = dict(config_json)
    meta["heads_saved"] = list(trace.selection.heads)
    meta["layers_saved"] = list(trace.selection.layers)
    meta["steps_saved"] = sorted(kept)
    return out, json.dumps(meta), json.dumps(views)


def save_tensors(trace: Trace, path: Path, config_json: dict,
                 steps: tuple[str, ...] | None = None) -> None:
    tensors, meta, views = tensors_of(trace, config_json, steps)
    write_tensors(path, tensors, {"config": meta, "views": views})


def write_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Named arrays to `path` (.npz or .safetensors), atomically, with `metadata` (strings:
    JSON) beside them: in a .npz as plain unicode arrays, loadable without allow_pickle."""
    if path.suffix.lower() == ".npz":
        # Stored, not deflated: zlib runs at 10-20 MB/s and float32 noise hardly compresses.
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **tensors, **{k: np.array(v) for k, v in metadata.items()})

        _atomic(path, write)
    else:
        from attn_tracer.model.safetensors_io import write_safetensors

        _atomic(path, lambda tmp: write_safetensors(tmp, tensors, metadata))
