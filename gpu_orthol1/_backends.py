"""Which backends can run here, and which one a call uses."""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Iterable
from typing import Any

BACKENDS = ("auto", "numpy", "cupy")
ENV_BACKEND = "GPU_ORTHOL1_BACKEND"

# "auto" sends a NumPy input to the GPU from this many GEMM flops (4*l*m*n^2) on.
# Below it the host<->device copies and launch latency cost more than the CPU
# needs. Measured by `gpu-orthol1 bench --device gpu` on an H200 machine (16-core
# host, 2026-11-26): the GPU, copies included, won from 2.68e8 flops on (256x16x64:
# CPU 0.95 ms, GPU 1.28 ms; 256x64x64: CPU 3.39 ms, GPU 1.72 ms). bench/results/.
# The host CPU moves it as much as the card: later H100/H200 runs with the current kernels measured
# 1.7e7 (README, "CPU/GPU crossover"). Kept at the conservative value until re-measured.
GPU_CROSSOVER_FLOPS = 2.7e8


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run on this machine."""


class GpuFallbackWarning(UserWarning):
    """backend="auto" wanted the GPU, but CuPy is installed and the GPU is not usable."""


_PKG_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_caller(message: str, category: type[Warning]) -> None:
    """warnings.warn attributed to the first frame outside gpu_orthol1 (and torch's dispatch between
    our frames): the user's line, whichever entry point and call depth led here. A fixed stacklevel
    cannot be right for all of them (the functional API, a plan call, the torch layer)."""
    skip = [_PKG_DIR]
    # torch's frames too: a custom op's implementation runs below torch's dispatch
    torch_file = getattr(sys.modules.get("torch"), "__file__", None)
    if torch_file:
        skip.append(os.path.dirname(os.path.abspath(torch_file)) + os.sep)
    prefixes = tuple(skip)
    level, f = 2, sys._getframe(1)  # stacklevel 2 is our caller's frame
    while f.f_back is not None and f.f_code.co_filename.startswith(prefixes):
        f, level = f.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class BackendList(list):
    """The usable backends, best first; `.reasons` says why each missing one is missing."""

    def __init__(self, names: Iterable[str], reasons: Any):
        super().__init__(names)
        self.reasons = dict(reasons)

    def __repr__(self) -> str:
        return f"BackendList({list(self)!r}, reasons={self.reasons!r})"


_lock = threading.Lock()
_gpu_probe: tuple[bool, str] | None = None
_warned = False


def _probe_gpu() -> tuple[bool, str]:
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return False, "NUMBA_ENABLE_CUDASIM is set: numba.cuda is the CPU simulator, not a GPU"
    try:
        import cupy
    except ImportError as e:
        return False, (
            f"cupy is not installed ({e}); from the repository root: pip install -e '.[gpu]' "
            "(or pip install 'cupy-cuda12x[ctk]' 'numba-cuda[cu12]' 'numpy<2.5')"
        )
    except Exception as e:  # a broken CUDA install can raise anything at import
        return False, f"cupy failed to import: {type(e).__name__}: {e}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return False, f"cupy is installed but finds no usable CUDA driver or device: {e}"
    if count < 1:
        return False, "cupy is installed but there is no CUDA device"
    try:
        from cupy_backends.cuda.libs import cublas  # noqa: F401
    except Exception as e:
        return (
            False,
            f"the cuBLAS libraries are missing ({e}); pip install 'cupy-cuda12x[ctk]' or a CUDA toolkit",
        )
    try:
        from numba import cuda

        if not cuda.is_available():
            return False, "numba.cuda cannot use the device (install numba-cuda[cu12] or numba-cuda[cu13])"
    except Exception as e:
        return False, f"numba.cuda failed: {type(e).__name__}: {e}"
    return True, ""


def gpu_status(refresh: bool = False) -> tuple[bool, str]:
    """(usable, reason-if-not), probed once per process."""
    global _gpu_probe
    with _lock:
        if _gpu_probe is None or refresh:
            _gpu_probe = _probe_gpu()
        return _gpu_probe


def available_backends() -> BackendList:
    """The backends usable here, best first, with why each missing one is not.

    Returns:
        A list of names ("cupy", "numpy") whose `.reasons` maps each unusable backend to why.

    Example:
        >>> import gpu_orthol1 as ol1
        >>> names = ol1.available_backends()  # e.g. ['numpy'], reasons={'cupy': 'no CUDA device'}
    """
    ok, why = gpu_status()
    return BackendList(["cupy", "numpy"] if ok else ["numpy"], {} if ok else {"cupy": why})


def check_name(backend: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"environment variable {ENV_BACKEND}={env!r} is not one of {BACKENDS}")
            return env
    return backend


def resolve(name: str, is_cupy_input: bool, flops: float) -> str:
    """'numpy' or 'cupy' for a call whose backend argument resolved to `name` (after the env override)."""
    if is_cupy_input:
        if name == "numpy":
            raise ValueError(
                "phi is a CuPy array but the NumPy backend was asked for (backend= or "
                f"{ENV_BACKEND}); pass cupy.asnumpy(phi) to compute on the CPU"
            )
        return "cupy"
    if name == "numpy":
        return "numpy"
    if name == "cupy":
        ok, why = gpu_status()
        if not ok:
            raise BackendUnavailableError(f"backend='cupy' is unavailable: {why}")
        return "cupy"
    if flops < GPU_CROSSOVER_FLOPS:
        return "numpy"
    ok, why = gpu_status()
    if ok:
        return "cupy"
    global _warned
    if not _warned and not why.startswith("cupy is not installed"):
        _warned = True
        warn_caller(f"gpu_orthol1: running on the CPU: {why}", GpuFallbackWarning)
    return "numpy"
