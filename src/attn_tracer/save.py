"""Files a run writes on request (--save, --svg, --html): checked before the run, written whole.

A file is written to a temporary name beside its target and renamed into place, so a failure
never leaves half a file, and an existing file is replaced only with --force.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from attn_tracer.errors import UsageError
from attn_tracer.trace import Trace

TENSOR_SUFFIXES = (".npz", ".safetensors")


def check_target(path: Path, force: bool, flag: str, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse a target we could not or should not write, before any work is done."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: the name must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    if path.exists() and not force:
        raise UsageError(f"{flag} {path} exists; add --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: cannot write in {parent} (permission denied)")


def write_atomic(path: Path, data: bytes) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    import io

    tensors, meta = tensors_of(trace, config_json)
    if path.suffix.lower() == ".npz":
        buffer = io.BytesIO()
        # The config as a plain unicode array: loadable without allow_pickle.
        np.savez_compressed(buffer, **tensors, config=np.array(meta))
        write_atomic(path, buffer.getvalue())
    else:
        from attn_tracer.safetensors_io import write_safetensors

        parent = path.parent if str(path.parent) else Path(".")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
        os.close(fd)
        try:
            write_safetensors(Path(tmp), tensors, {"config": meta})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
