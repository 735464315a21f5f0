"""The array engine that runs the math: NumPy on the CPU, or PyTorch on the CPU or a GPU.

The layer code is written once against the Python Array API; an engine only says where arrays
live, in which dtype, and how they come back to the host. NumPy needs no torch import, which
is why it is the default on the CPU: `import torch` alone costs seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from attn_tracer.errors import AttnError, UsageError
from attn_tracer.model.config import DTYPES, ENGINES, HALF

# `--engine auto` on the CPU: NumPy below this many tokens, torch from it on. Measured by
# benchmarks/run.py (figure f, BENCHMARKS.md) for the default stack (2 layers, d_model 768),
# whole `attn trace` wall time on 2 cores: torch's import (1.5-3 s) outweighs its faster
# kernels at every length up to 1,024 (torch ÷ numpy 1.7-3.7×); the two tie at 2,048 tokens
# and torch wins at 4,096 (12.7 s vs 22.5 s). So the default n_ctx never leaves NumPy.
TORCH_FROM_LEN = 2048


def namespace(x: Any):
    # NumPy ≥ 2 is itself an Array API namespace; its compat wrapper costs 0.3 s to import.
    if isinstance(x, np.ndarray | np.generic):
        return np
    return array_namespace(x)


@dataclass(frozen=True)
class Engine:
    name: str  # "numpy" or "torch"
    device: str  # "cpu", "cuda:0", …
    dtype: str

    @property
    def xp(self):
        if self.name == "numpy":
            return np
        import array_api_compat.torch as xp

        return xp

    def asarray(self, x: np.ndarray):
        """A host array moved to this engine's device, floats in the engine's dtype."""
        floating = np.issubdtype(x.dtype, np.floating)
        if self.name == "numpy":
            return np.asarray(x, dtype=self.dtype) if floating else x
        import torch

        # Any positive strides as they are (a checkpoint's transposed projections: no copy);
        # negative ones, which torch cannot view, copied.
        t = torch.as_tensor(x if all(s >= 0 for s in x.strides) and x.flags.writeable
                            else np.ascontiguousarray(x))
        return t.to(self.device, getattr(torch, self.dtype)) if floating else t.to(self.device)

    def to_host(self, x) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        # numpy has no bfloat16: widen half precision on the way out.
        if self.dtype in HALF:
            x = x.float()
        return x.detach().cpu().numpy()

    @property
    def fused(self) -> bool:
        """Whether attention that nobody looks at can run as one fused kernel."""
        return self.name == "torch"


def check_choices(engine: str, device: str, dtype: str) -> str:
    """Refuse unknown names; the device, normalized. Needs nothing installed."""
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    device = device.strip().lower()
    if device not in ("auto", "cpu", "cuda") and not _is_cuda_index(device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")
    if engine == "numpy" and device not in ("auto", "cpu"):
        raise UsageError("--engine numpy runs on the CPU only; use --engine torch for a GPU")
    if dtype in HALF and (device == "cpu" or engine == "numpy"):
        raise _half_on_the_cpu(dtype)  # never works, whatever is installed: said first
    return device


def _half_on_the_cpu(dtype: str) -> UsageError:
    return UsageError(
        f"--dtype {dtype} is for GPUs: CPU kernels in half precision are slow and lossy; "
        "use float32 on the CPU"
    )


# What to install for the torch engine, GPUs and .bin checkpoints (the `torch` extra).
INSTALL_TORCH = 'pip install "attn-tracer[torch]"'


def check_torch(engine: str, device: str) -> None:
    """Refuse, before any work, a run that needs PyTorch where it is not installed."""
    if torch_installed():
        return
    if engine == "torch":
        raise AttnError(f"--engine torch needs PyTorch, which is not installed: {INSTALL_TORCH}")
    if device.startswith("cuda"):
        raise AttnError(f"--device {device} needs PyTorch with CUDA, which is not installed: "
                        f"{INSTALL_TORCH}")


def select_engine(engine: str, device: str, dtype: str, length: int) -> Engine:
    """Resolve `auto` choices and refuse combinations that cannot run, before any work."""
    device = check_choices(engine, device, dtype)

    if device == "auto":
        device = "cuda" if engine != "numpy" and cuda_present() else "cpu"
    if device.startswith("cuda"):
        device = check_cuda(device)
        engine = "torch"
    elif engine == "auto":
        engine = "torch" if length >= TORCH_FROM_LEN and torch_installed() else "numpy"
    if dtype in HALF and not device.startswith("cuda"):
        raise _half_on_the_cpu(dtype)
    check_torch(engine, device)
    return Engine(engine, device, dtype)


def _is_cuda_index(device: str) -> bool:
    return device.startswith("cuda:") and device[5:].isdigit()


def torch_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("torch") is not None


def cuda_present() -> bool:
    """Whether a GPU is worth asking torch about; without an NVIDIA driver, skip the import."""
    if not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")):
        return False
    if not torch_installed():
        return False
    import torch

    return torch.cuda.is_available()


def free_memory(engine: Engine) -> int | None:
    """Bytes free on the engine's GPU, or None on the CPU (where the host's RAM is the limit)."""
    if not engine.device.startswith("cuda"):
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(engine.device))
    return free


def check_cuda(device: str) -> str:
    check_torch("auto", device)
    import torch

    if not torch.cuda.is_available():
        build = torch.version.cuda
        why = "this PyTorch is a CPU-only build" if build is None else (
            f"PyTorch (CUDA {build}) sees no GPU"
        )
        raise AttnError(
            f"--device {device}: CUDA is not available ({why}, torch {torch.__version__}); "
            "run on the CPU with --device cpu, or install a CUDA build of PyTorch")
    count = torch.cuda.device_count()
    index = int(device[5:]) if ":" in device else 0
    if index >= count:
        raise UsageError(
            f"--device {device}: this machine has {count} GPU{'s' if count != 1 else ''} "
            f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})"
        )
    return f"cuda:{index}"
