"""Reading a PyTorch .bin checkpoint safely: its storage sizes scanned from the pickle without
building anything, before torch.load(weights_only=True) reads it."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attn_tracer.model.memory import human
from attn_tracer.model.safetensors_io import (
    CheckpointError,
    CheckpointUsageError,
)

_MAX_PICKLE = 64_000_000


def _read_torch(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    _check_torch_signature(path)
    # Whether torch is there first: without it no .bin can be read, whatever the file says.
    try:
        import torch
    except ImportError as e:
        from attn_tracer.model.engine import INSTALL_TORCH

        raise CheckpointError(
            f"reading {path} needs PyTorch, which is not installed: {INSTALL_TORCH}, or use "
            "a .safetensors file"
        ) from e
    _check_storage_sizes(path, max_bytes)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it then reads fine; not the user's concern.
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(
                f"refusing to load {path}: it is not a plain tensor checkpoint "
                f"(weights_only=True rejected it: {_short_reason(e)})"
            ) from e
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {_short_reason(e)}"
        ) from e
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError... on corrupt files
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {_short_reason(e)}"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict of named tensors"
        )
    return {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}


class _Anything:
    """What the size scan builds in place of every object a pickle names: it runs nothing."""

    name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return _Anything()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


# Bytes per element of torch's storage classes (pickled as torch.FloatStorage and so on); an
# unknown one counts 1, so the scan never overstates a file.
_STORAGE_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4,
                  "Short": 2, "Char": 1, "Byte": 1, "Bool": 1, "ComplexDouble": 16,
                  "ComplexFloat": 8}


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py's MAGIC_NUMBER


class _SizeScan(pickle.Unpickler):
    """Adds up the storage sizes a torch pickle declares, without building anything real: every
    class it names becomes _Anything, so no code of the file's choosing can run."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.storages: dict[str, int] = {}  # by key: tensors that share a storage name it twice

    @property
    def declared(self) -> int:
        return sum(self.storages.values())

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Anything,), {"name": name})

    def persistent_load(self, pid: Any) -> _Anything:
        # torch.save's persistent ids: ("storage", storage class, key, location, numel[, view]).
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind = getattr(pid[1], "name", "").removesuffix("Storage")
            if isinstance(pid[4], int) and not isinstance(pid[4], bool):
                self.storages[str(pid[2])] = max(pid[4], 0) * _STORAGE_BYTES.get(kind, 1)
        return _Anything()


def _check_storage_sizes(path: Path, max_bytes: int | None) -> None:
    """Refuse a .bin whose tensors declare more bytes than the file holds (a zip bomb or a forged
    size: torch would allocate the declared size first) or than max_bytes, before torch.load."""
    file_size = path.stat().st_size
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")
                           or i.filename == "data.pkl"]
                if not pickles:
                    return  # not torch.save's layout: torch.load will say what it is
                if pickles[0].file_size > _MAX_PICKLE:
                    raise CheckpointError(f"{path}: its data.pkl declares "
                                          f"{human(pickles[0].file_size)}, which no state dict "
                                          "needs; it is corrupt or crafted")
                scan = _SizeScan(archive.open(pickles[0]))
                scan.load()
        else:
            with open(path, "rb") as f:
                scan = _SizeScan(f)
                # torch's legacy format is four pickles: a magic number, the protocol, sys info,
                # then the data; anything else is one pickle, which torch.load will judge.
                if scan.load() == _LEGACY_MAGIC:
                    for _ in range(3):
                        scan.load()
    except CheckpointError:
        raise
    except Exception as e:  # any malformed pickle or zip: torch.load would fail on it too
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: "
                              f"{_short_reason(e)}") from None
    if scan.declared > file_size:
        raise CheckpointError(
            f"{path} declares {human(scan.declared)} of tensor data but the file is "
            f"{human(file_size)}: it is corrupt, compressed or crafted (torch.save stores "
            "tensors uncompressed)")
    if max_bytes is not None and scan.declared > max_bytes:
        raise CheckpointUsageError(
            f"{path}: its tensors need {human(scan.declared)} of memory to read, over the "
            f"{human(max_bytes)} allowed; raise --max-memory if the machine has it")


def _check_torch_signature(path: Path) -> None:
    """Reject files that are neither torch's zip format nor a pickle before torch sees them."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    # torch.save writes a zip archive; the legacy format and plain pickles open with PROTO 0x80.
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: it is neither a zip archive nor a pickle"
        )


def _short_reason(error: BaseException) -> str:
    """The informative line of a torch error, without its boilerplate about weights_only."""
    boilerplate = ("weights only load failed", "please file an issue", "check the documentation")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.lower().startswith(boilerplate)]
    reason = (useful or lines or [type(error).__name__])[0]
    return reason if len(reason) <= 200 else reason[:197] + "..."

