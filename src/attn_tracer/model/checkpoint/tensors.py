"""A checkpoint's tensors: read from a .safetensors or .bin file, each checked (shape, dtype,
finite) and copied to a float32 array."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from attn_tracer.model.checkpoint.source import _SAFETENSORS, _TORCH_SUFFIXES
from attn_tracer.model.checkpoint.torch_bin import _read_torch
from attn_tracer.model.safetensors_io import (
    CheckpointError,
    read_safetensors,
    release,
)


def _shape(path: Path, raw: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    if key not in raw:
        raise CheckpointError(f"{path} has no {key!r} tensor (is it a GPT-2 checkpoint?)")
    shape = tuple(raw[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{path}: {key!r} has shape {list(shape)}, expected {ndim} dims")
    return shape


# -- weights ---------------------------------------------------------------------------------


def _read_weights(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    if path.name.endswith(_SAFETENSORS):
        # Memory-mapped: no tensor is read until it is copied, after the sizes are checked.
        tensors, _metadata = read_safetensors(path)
        return tensors
    if path.name.endswith(_TORCH_SUFFIXES):
        return _read_torch(path, max_bytes)
    raise CheckpointError(
        f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
        "expected a .safetensors or .bin file, or a model directory"
    )



def _checked(path: Path, raw: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor under `key` as a fresh float32 C-contiguous array, after checking its shape."""
    if key not in raw:
        raise CheckpointError(f"{path} is missing the weight {key!r} (is it a GPT-2 checkpoint?)")
    try:
        array = _to_numpy(raw[key])
    except _TensorKind as e:
        raise CheckpointError(f"{path}: weight {key!r} is {e}; attn reads dense floating-point "
                              "tensors only") from None
    if array.shape != shape:
        raise CheckpointError(
            f"{path}: weight {key!r} has shape {list(array.shape)}, expected {list(shape)}"
        )
    if array.dtype.kind != "f":
        raise CheckpointError(
            f"{path}: weight {key!r} has dtype {array.dtype}, expected a floating-point type"
        )
    # astype copies, which also detaches the result from the file's memory map; a float64 beyond
    # float32's range becomes inf, which the check below names.
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(array.astype(np.float32))
    release(array)  # the copy is ours: the mapped pages need not count in the peak
    _check_finite(path, key, out)
    return out


def _check_finite(path: Path, key: str, array: np.ndarray) -> None:
    """Weights must be finite: one NaN or inf makes every activation after it NaN, and JSON has
    no NaN. A finite weight, however large, is accepted: whether it overflows depends on the
    activations it meets, and the run checks those (pipeline.run names the first bad step)."""
    finite = np.isfinite(array)
    if finite.all():
        return
    where = tuple(int(i) for i in np.argwhere(~finite)[0])
    raise CheckpointError(
        f"{path}: weight {key!r} is {array[where]} at index {list(where)} (in float32); a "
        "checkpoint's weights must be finite numbers")


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    # A torch tensor (only .bin files produce them): widen in torch, since NumPy lacks bf16.
    tensor = value.detach()
    if tensor.is_meta:
        raise _TensorKind("a meta tensor (a shape with no data)")
    if tensor.is_quantized:
        raise _TensorKind(f"a quantized tensor ({tensor.dtype})")
    if tensor.layout != _strided():
        raise _TensorKind(f"a {str(tensor.layout).removeprefix('torch.')} tensor")
    tensor = tensor.cpu()
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.numpy()


class _TensorKind(Exception):
    """A tensor that holds no plain array of numbers; _checked names it."""


def _strided():
    import torch

    return torch.strided
