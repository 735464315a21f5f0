"""Read and write the safetensors format with NumPy alone.

The format (https://huggingface.co/docs/safetensors) is three parts:

    [8 bytes]  N, the header length, little-endian u64
    [N bytes]  UTF-8 JSON: {name: {"dtype", "shape", "data_offsets": [begin, end]},
                            "__metadata__": {str: str}}   (metadata optional)
    [rest]     the raw little-endian bytes; offsets count from the start of this part

Reading memory-maps the file, so a tensor costs nothing until it is touched: a GPT-2 file
also holds the [1, 1, 1024, 1024] causal-mask buffers of every layer, which we never need.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from attn_tracer.errors import AttnError, UsageError

__all__ = ["CheckpointError", "json_problem", "read_safetensors", "write_safetensors"]


class CheckpointError(AttnError):
    """A checkpoint that cannot be loaded (exit 1); the message is one line a user can act on."""


class CheckpointUsageError(CheckpointError, UsageError):
    """A checkpoint request that is itself wrong (exit 2): a path that does not exist, a
    --heads that does not fit the weights."""


# Little-endian NumPy dtypes by safetensors name. BF16 has no NumPy dtype: it is read as
# u16 and widened to float32 (bf16 is the upper half of an f32, so a shift is exact).
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES: dict[str, str] = {
    "f8": "F64", "f4": "F32", "f2": "F16",
    "i8": "I64", "i4": "I32", "i2": "I16", "i1": "I8",
    "u8": "U64", "u4": "U32", "u2": "U16", "u1": "U8",
    "b1": "BOOL",
}  # fmt: skip

# The reference implementation refuses headers above 100 MB; a larger one is a corrupt file.
_MAX_HEADER = 100_000_000


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Return (tensors, metadata) of a .safetensors file.

    Arrays are read-only views of a memory map (BF16 ones are float32 copies); take a copy
    of what you keep if the file may change underneath.
    """
    path = Path(path)
    header, buffer_start, file_size = _read_header(path)
    metadata = _parse_metadata(path, header.pop("__metadata__", None))
    buffer_len = file_size - buffer_start
    entries = {name: _parse_entry(path, name, info, buffer_len) for name, info in header.items()}
    _check_no_overlap(path, entries)
    buffer = _map_buffer(path, buffer_start, buffer_len)
    tensors = {}
    for name, (dtype_name, shape, begin, end) in entries.items():
        raw = buffer[begin:end].view(_DTYPES[dtype_name]).reshape(shape)
        tensors[name] = _bf16_to_f32(raw) if dtype_name == "BF16" else raw
    return tensors, metadata


def _check_no_overlap(path: Path, entries: dict[str, tuple]) -> None:
    """Tensors must not share bytes, as the reference implementation requires: otherwise a
    small file can name the same megabytes thousands of times, and every copy is real."""
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items()
                   if end > begin)
    for (_, end, name), (begin, _, other) in itertools.pairwise(spans):
        if begin < end:
            raise CheckpointError(f"{path} is not a valid safetensors file: tensors {name!r} and "
                                  f"{other!r} share bytes (their data_offsets overlap)")


def json_problem(error: Exception) -> str:
    """What is wrong with a JSON text, in words a user can act on."""
    if isinstance(error, RecursionError):
        return "it is nested too deeply to be a model's metadata"
    if "digits" in str(error) and not isinstance(error, json.JSONDecodeError):
        return "it holds an integer thousands of digits long"  # int() refuses past 4,300
    return str(error)


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors (sorted by name, C-contiguous, little-endian) and optional metadata."""
    arrays = {name: _little_endian(name, tensors[name]) for name in sorted(tensors)}
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, array in arrays.items():
        header[name] = {
            "dtype": _NAMES[array.dtype.str[1:]],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces to a multiple of 8, as the reference writer does, so the buffer is aligned.
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for array in arrays.values():
            # The array's own memory, not a tobytes() copy of it: one pass at the disk's speed.
            f.write(array.reshape(-1).view(np.uint8).data)


def _read_header(path: Path) -> tuple[dict, int, int]:
    """Return the parsed JSON header, where the byte buffer starts, and the file size."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path} is not a safetensors file: it is {file_size} bytes long, "
                    "shorter than the 8-byte header length"
                )
            header_len = int.from_bytes(prefix, "little")
            if header_len > file_size - 8 or header_len > _MAX_HEADER:
                raise CheckpointError(
                    f"{path} is not a valid safetensors file: its header claims {header_len} "
                    f"bytes but the file has only {file_size - 8} after the length "
                    "(truncated or not a safetensors file)"
                )
            raw_header = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{path} is not a valid safetensors file: its header is not JSON ({json_problem(e)})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path} is not a valid safetensors file: its header is a JSON "
            f"{type(header).__name__}, not an object"
        )
    return header, 8 + header_len, file_size


def _parse_metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{path} is not a valid safetensors file: __metadata__ must map strings to strings"
        )
    return metadata


def _parse_entry(
    path: Path, name: str, info: object, buffer_len: int
) -> tuple[str, tuple[int, ...], int, int]:
    """Validate one header entry; return (dtype name, shape, begin, end)."""

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file: tensor {name!r} {reason}")

    if not isinstance(info, dict):
        raise bad("has no dtype/shape/data_offsets entry")
    dtype_name = info.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        known = ", ".join(_DTYPES)
        raise bad(f"has unsupported dtype {_short(dtype_name)} (supported: {known})")
    shape = info.get("shape")
    if not _is_int_list(shape) or any(n < 0 for n in shape):
        raise bad(f"has an invalid shape {_short(shape)}")
    offsets = info.get("data_offsets")
    if not _is_int_list(offsets) or len(offsets) != 2:
        raise bad(f"has invalid data_offsets {_short(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end <= buffer_len:
        raise bad(f"has data_offsets {_short(offsets)} outside the {buffer_len}-byte data buffer")
    expected = math.prod(shape) * _DTYPES[dtype_name].itemsize
    if end - begin != expected:
        raise bad(
            f"has data_offsets {offsets} spanning {end - begin} bytes, but shape {_short(shape)} "
            f"of {dtype_name} needs {expected if expected < 10**30 else 'more than 10^30'}"
        )
    return dtype_name, tuple(shape), begin, end


def _short(value: object) -> str:
    """A value from the file, for a message: a hostile header must not make the message huge."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more than 4,300 digits has no repr
        return "an integer thousands of digits long"
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int_list(value: object) -> bool:
    # bool is an int subclass; JSON true/false in a shape is still malformed.
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) for n in value
    )


def _map_buffer(path: Path, start: int, length: int) -> np.ndarray:
    if length == 0:  # mmap refuses empty ranges; a file of only empty tensors is valid
        return np.empty(0, dtype=np.uint8)
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(length,))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot memory-map {path}: {e}") from e
    # Plain ndarray views: the memmap subclass would leak into every array we hand out.
    return np.asarray(mapped)


def release(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped tensor from this process once it has been copied.

    The file's pages stay in the page cache; only our mapping of them goes, so the copy is the
    one the process holds. Without this a checkpoint counts twice in the peak memory while it
    loads: every byte mapped and then copied (a 2 GB Qwen2.5-0.5B peaked at 4 GB). Pages of a
    neighbouring tensor that share the first or last page are read again if touched: nothing is
    lost, a read-only file mapping is only ever a cache of the file. No-op for arrays that are
    not views of a map (BF16 widened on read, .bin tensors).
    """
    import mmap

    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or not hasattr(base, "madvise") or not array.nbytes:
        return
    try:
        start = array.ctypes.data - np.frombuffer(base, dtype=np.uint8).ctypes.data
        page = mmap.PAGESIZE
        first = start // page * page
        base.madvise(mmap.MADV_DONTNEED, first, start + array.nbytes - first)
    except (ValueError, OSError, AttributeError):
        pass  # only memory is at stake: keep the pages


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype("<u4") << 16).view("<f4")


def _little_endian(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    key = array.dtype.str[1:]
    if key not in _NAMES:
        raise TypeError(
            f"cannot write tensor {name!r}: dtype {array.dtype} has no safetensors name"
        )
    # astype, not ascontiguousarray: the latter turns a 0-d array into shape (1,).
    return array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
