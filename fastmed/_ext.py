"""Loads the compiled kernel modules and says what was built.

``fastmed._C`` (CPU, C++/OpenMP) is always built; ``fastmed._C_cuda`` is built when a CUDA
toolkit was found at build time. Neither links libtorch: ops hand them raw pointers and strides.
"""
from __future__ import annotations

import importlib
import os

import torch

__all__ = ["cpu", "cuda", "build_info", "require", "DTYPE_CODES", "MissingBackendError"]

# must match csrc/common/common.h (enum DType)
DTYPE_CODES = {
    torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3,
    torch.uint8: 4, torch.int8: 5, torch.int16: 6, torch.int32: 7, torch.int64: 8,
}

_REBUILD_HINT = (
    "Rebuild fastmed on a machine with the CUDA toolkit (nvcc on PATH or CUDACXX set): "
    "FASTMED_CUDA=ON pip install --no-build-isolation --force-reinstall --no-deps ."
)


class MissingBackendError(RuntimeError):
    """A tensor lives on a device for which this build of fastmed has no kernels."""


def _load(name: str):
    try:
        return importlib.import_module(f"fastmed.{name}"), None
    except ImportError as exc:  # pragma: no cover - depends on the build
        return None, f"{type(exc).__name__}: {exc}"


cpu, _cpu_error = _load("_C")
cuda, _cuda_error = _load("_C_cuda")
try:
    from . import _build_config as _cfg  # written by CMake at build time
except ImportError:  # pragma: no cover
    _cfg = None


def build_info() -> dict:
    """What this build of fastmed contains, and why a backend is missing."""
    from . import __version__

    info = {
        "version": __version__,
        "torch": torch.__version__,
        "backends": [],
        "cpu": None,
        "cuda": None,
        "cuda_missing_reason": None,
        "cuda_devices_visible": 0,
    }
    if cpu is not None:
        info["backends"].append("cpu")
        info["cpu"] = dict(cpu.build_info())
    else:
        info["cpu_missing_reason"] = _cpu_error
    if cuda is not None:
        info["backends"].append("cuda")
        info["cuda"] = dict(cuda.build_info())
        info["cuda_devices_visible"] = int(cuda.device_count())
    else:
        status = getattr(_cfg, "CUDA_STATUS", None)
        reason = status if status and not status.startswith("built") else _cuda_error
        info["cuda_missing_reason"] = f"{reason}. {_REBUILD_HINT}"
    return info


def require(device: torch.device, op: str):
    """The kernel module for ``device``, or a clear error saying how to get one."""
    if device.type == "cpu":
        if cpu is None:
            raise MissingBackendError(
                f"fastmed.{op}: the CPU kernels (fastmed._C) failed to load ({_cpu_error}); "
                "reinstall fastmed: pip install --force-reinstall --no-deps ."
            )
        return cpu
    if device.type == "cuda":
        if cuda is None:
            raise MissingBackendError(
                f"fastmed.{op}: got a CUDA tensor, but this build of fastmed has no CUDA kernels "
                f"({build_info()['cuda_missing_reason']})"
            )
        return cuda
    raise MissingBackendError(f"fastmed.{op}: no kernels for device type '{device.type}' (cpu and cuda are supported)")


def num_threads() -> int:
    return max(1, int(torch.get_num_threads()))


def stream_ptr(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.current_stream(device).cuda_stream)
    return 0


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def device_guard(device: torch.device):
    """Make ``device`` current for a launch (CUDA kernels and Triton launch on the current device,
    whatever device their tensors are on); a no-op context off CUDA."""
    import contextlib

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def to_device(t: torch.Tensor, device: torch.device, dtype=None) -> torch.Tensor:
    """``t.to(device, dtype)``; a CPU tensor bound for a GPU (the small index and weight tensors the
    ops pass on every call) goes through pinned memory without blocking: a pageable copy makes the
    host wait for all the GPU work queued so far (the network's forward), so it could not queue the
    next batch meanwhile."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def functorch_active() -> bool:
    """A torch.func transform (grad, vmap, jacrev, ...) is running: fastmed's ops, whose autograd
    torch.library generates without the setup_context functorch requires, give way to PyTorch's."""
    try:
        return torch._C._functorch.maybe_current_level() is not None
    except AttributeError:  # pragma: no cover - a PyTorch without it
        return False
