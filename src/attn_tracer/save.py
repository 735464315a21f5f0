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

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from attn_tracer.errors import AttnError, UsageError
from attn_tracer.trace import Trace

TENSOR_SUFFIXES = (".npz", ".safetensors")


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_target(path: Path, force: bool, flag: str, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse a target we could not or should not write, before any work is done."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: the name must end in {' or '.join(suffixes)}")
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
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {parent} ({e.strerror or e}); "
                         "choose another place") from None
    os.close(fd)
    os.unlink(probe)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp)` beside `path`, then rename into place; on failure, no file."""
    parent = _parent(path)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        # mkstemp makes the file private (0600); a saved file gets the usual 0666 − umask.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise AttnError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
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
        from attn_tracer.safetensors_io import write_safetensors

        _atomic(path, lambda tmp: write_safetensors(tmp, tensors, {"config": meta}))
