"""Files a run writes on request (--save, --svg, --html): checked before the run, written whole.

Every target is checked before the model runs: its name, its directory, and whether that
directory really takes a new file (a probe file is created and removed: permission bits say
nothing when running as root, and /proc or a read-only mount refuse writes the bits allow).
A file is written to a temporary name beside its target and renamed into place, so a failure
never leaves half a file, and an existing file is replaced only with --force.

--save writes, under its step name, every tensor captured for the selected layers (and the
steps outside the layers: tokens, embeddings, logits), the token ids (step `tokens`), and the
config as JSON: an `.npz` entry `config` (a 0-d unicode array, loadable without pickle) or the
`.safetensors` metadata key `config`. Tensors with a `heads` axis hold only the selected heads
(`heads_saved` in the config); boolean tensors are stored as uint8.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from attn_tracer.errors import AttnError, UsageError
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


def tensors_of(trace: Trace, config_json: dict) -> tuple[dict[str, np.ndarray], str]:
    """Every captured step tensor under its step name, the token ids, and the config as JSON."""
    out = {name: np.ascontiguousarray(x) for name, x in trace.tensors.items()}
    for name in list(out):
        if out[name].dtype == np.bool_:
            out[name] = out[name].astype(np.uint8)
    meta = dict(config_json)
    meta["heads_saved"] = list(trace.selection.heads)
    meta["layers_saved"] = list(trace.selection.layers)
    return out, json.dumps(meta)


def save_tensors(trace: Trace, path: Path, config_json: dict) -> None:
    tensors, meta = tensors_of(trace, config_json)
    if path.suffix.lower() == ".npz":
        buffer = io.BytesIO()
        # The config as a plain unicode array: loadable without allow_pickle.
        np.savez_compressed(buffer, **tensors, config=np.array(meta))
        write_atomic(path, buffer.getvalue())
    else:
        from attn_tracer.model.safetensors_io import write_safetensors

        _atomic(path, lambda tmp: write_safetensors(tmp, tensors, {"config": meta}))
