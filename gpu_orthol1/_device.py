"""The device interface: what `_driver.run` and a `Plan` may ask of a device, as a Protocol that
`_numpy_dev.NumpyDevice`, `_cupy.CupyDevice` and `testing.EmulatedGpuDevice` satisfy (mypy checks
each against it in its own module), and `make_device`, which picks one for a resolved backend, and
`pick_kernel`, which picks a plan's path (the fused kernel, or the CPU's fused loop, or two GEMMs).

Optional flags read with getattr (absent means False / None): ``fills_addresses`` (pointer-array
GEMMs read their address arrays from the workspace), ``emulates_gpu`` (a CPU device that plans
treat as the GPU backend), ``auto_fused`` (kernel="auto" may pick the fused kernel; default True),
``fused_threads`` (threads per block of the fused kernel).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from . import _checks, _penalty

if TYPE_CHECKING:
    from ._driver import PointerChunk, StridedChunk
    from ._penalty import Variant


class Device(Protocol):
    """The primitives of the chunk loop over a chunk of a `Strided` or `Pointers` batch."""

    @property
    def xp(self) -> Any:
        """The array module of the device's buffers (numpy or cupy)."""
        ...

    @property
    def folds_alpha(self) -> bool:
        """Whether the sign pass scales S by alpha (else the gradient GEMM does)."""
        ...

    @property
    def blas_workspace_bytes(self) -> int:
        """The BLAS's workspace per call (0: it manages its own)."""
        ...

    def acc_dtype(self, dtype: np.dtype) -> np.dtype:
        """The dtype the Grams accumulate in for inputs of `dtype`."""
        ...

    def sign_dtype(self, dtype: np.dtype) -> np.dtype:
        """The dtype of the matrix S the gradient GEMM multiplies."""
        ...

    def extra_bytes_per_slice(
        self, l: int, n: int, dtype: np.dtype, want_grad: bool, accumulate: bool
    ) -> int:
        """Workspace bytes per slice beyond the Gram and S (conversions, products)."""
        ...

    def sign_parts(self, n: int, variant: Variant) -> int:
        """Into how many parts the sign pass cuts one slice."""
        ...

    def set_blas_workspace(self, buf: Any) -> None:
        """Hand the BLAS `buf` to work in (None: take it back)."""
        ...

    def prepare(self, src: StridedChunk | PointerChunk, cc: int) -> StridedChunk | PointerChunk:
        """What the GEMMs read for this chunk."""
        ...

    def gram(self, src: Any, cc: int, ws: Any) -> None:
        """The chunk's Grams Phi^T Phi into ws[:cc]."""
        ...

    def grad(self, src: Any, dst: Any, cc: int, sgn: Any, alpha: float, beta: float) -> None:
        """alpha * Phi S (+ beta * dst) into the chunk's gradient."""
        ...

    def sign_abs(
        self,
        ws: Any,
        sgn: Any,
        n: int,
        losses: Any,
        offset: int,
        scale: float,
        write_s: bool,
        variant: Variant = ...,
        partials: Any = None,
    ) -> None:
        """The fused elementwise pass: the slices' losses, and S when write_s."""
        ...


class GpuDevice(Device, Protocol):
    """A device that enqueues on a stream: what a plan asks of it beyond the chunk loop."""

    def bind(self, cublas: bool = True) -> Any:
        """Pick up the current stream (and bind the BLAS to it); returns that stream."""
        ...

    def loss_total(self, losses: Any, count: int, scale: float, out: Any, each: bool) -> None:
        """The scaled total (or each scaled loss) of `count` per-slice losses into `out`."""
        ...

    def fused_launcher(self, cfg: Any, V: Any, Vout: Any, losses: Any, write_grad: bool) -> Any:
        """A launcher of the fused kernel for these layouts: go(phi, out, losses addresses, alpha,
        accumulate)."""
        ...


# Where kernel="auto" takes the fused kernel on a GPU: (largest n, largest l) pairs per input dtype.
# Set on an H100 (bench/results/gpu-h100-jrun-plans.json, the kernel of commit 79001ba) and checked
# on the kernel as it is now (bench/results/gpu-h100-kept-plans.json, 2026-11-27 03:51 UTC,
# `bench/bench_gpu_plans.py --quick`; cupyx benchmark, the larger of host and device time per call).
# Fused / two-GEMM time per call, float32, 2^22 elements (sweep) unless a shape is given (rule_gaps),
# now (then):
#   l = 64:   0.31, 0.28, 0.43, 0.50, 0.79 at n = 8, 16, 32, 64, 96 (0.35, 0.42, 0.37, 0.47, 0.61)
#   l = 128:  0.65 at n = 64 (128, 1024, 64) (0.74), 0.90 at n = 96 (128, 682, 96) (0.95)
#   l = 256:  0.83 at n = 64 (256, 512, 64) (0.94)
#   l = 512:  0.43, 0.52, 0.62 at n = 8, 16, 32, but 1.06 at n = 64 and 1.18 at n = 96
#             (0.43, 0.53, 0.79; 1.47, 1.02)
#   l = 1024: 0.81 at n = 16 (1024, 256, 16) (0.89), 1.19 at n = 32 (1024, 128, 32) (1.25)
#   l = 2048: 0.96 at n = 8 (2048, 256, 8) (1.06; the rule stops at l = 1024 all the same: a 4 %
#             margin is within run-to-run spread), 1.18 at n = 16 (2048, 128, 16) (1.20)
# float64 at l = 64: 0.56 at n = 32 (64, 2048, 32) (0.84), 0.84 at n = 64 (64, 1024, 64) (1.09: the
# float64 bound could now go to n = 64; left at 32 until the gpu tests have run on that path). The
# plan decides before it sees `accumulate`; with accumulate=True (a read of the gradient before each
# write) the fused kernel measured 0.98 at (64, 4096, 64) float32 (1.04), 0.83 in float16 (0.91),
# 0.88 at (64, 2048, 32) (0.70). Not measured, left to the GEMMs: l between 256 and 512 at n > 32,
# l between 128 and 512 at n > 64, float64 past l = 64. Taken without a measurement of their own,
# between measured points that won: n = 33 to 63 past l = 64, n = 65 to 95 at l = 128, n <= 8 at
# l = 513 to 1024, float64 below n = 32, float16 except at (64, 4096, 64).
# precision="tf32" keeps the GEMMs: it asks for tensor cores, which the fused kernel does not use.
FUSED_RULE = ((16, 1024), (32, 512), (64, 256), (96, 128))
FUSED_RULE_FLOAT64 = ((32, 64),)


def fused_wins(l: int, n: int, dtype: Any, precision: str) -> bool:
    """Whether kernel="auto" picks the fused kernel for (l, n) slices of `dtype` on a GPU."""
    dt = np.dtype(dtype)
    if precision != "highest" or dt not in (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)):
        return False
    rule = FUSED_RULE_FLOAT64 if dt == np.dtype(np.float64) else FUSED_RULE
    return any(1 <= n <= n_top and l <= l_top for n_top, l_top in rule)


# The CPU's fused loop (kernels/fused_small_cpu.py) against the two-GEMM path, plan calls, float32,
# measured on the AMD EPYC (2 CPUs, quiet; bench/bench_cpu_fused.py, bench/results/cpu-fused.json):
# 32 slices of 3 x 3 13 us against 52, 1024 of them 179 against 430, 32 of 8 x 8 33 against 59;
# at 524 kflop the GEMM path won by 1.3-1.9x ((16, 32, 16), (8, 64, 16), (64, 32, 8)), at 2 Mflop
# by 1.6-2.6x. The loop's scalar arithmetic loses to BLAS once a call has real work; below a few
# hundred kflop the GEMM path's per-call overhead is what costs.
CPU_FUSED_MAX_N = 16
CPU_FUSED_MAX_FLOPS = 2.5e5  # 4 l m n^2
CPU_FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def cpu_fused_wins(m: int, l: int, n: int, dtype: Any) -> bool:
    """Whether kernel="auto" picks the CPU's fused loop for m slices (l, n) of `dtype`."""
    return (
        np.dtype(dtype) in CPU_FUSED_DTYPES
        and 1 <= n <= CPU_FUSED_MAX_N
        and 4.0 * l * m * n * n <= CPU_FUSED_MAX_FLOPS
    )


def pick_kernel(
    kernel: Any,
    dev: Device,
    variant: _penalty.Variant,
    default_budget: bool,
    in_place: bool,
    l: int,
    n: int,
    dtype: np.dtype,
    precision: str,
    m: int,
) -> tuple[str, Any]:
    """("gemm", None) or ("fused", its config; None on the CPU): the path, decided once.

    "auto" takes the fused kernel on a GPU where `fused_wins` says so, on the CPU where
    `cpu_fused_wins` does (m slices), for the default penalty, when no workspace cap is set
    (workspace_bytes= or GPU_ORTHOL1_WORKSPACE_BYTES: a setting of the chunked GEMM path, whose
    errors and chunking a caller then expects) and when BLAS reads phi in place (`in_place`: a
    layout the GEMM path would copy keeps that path and its CopyWarning, and `graph()` its refusal).
    Those conditions keep every behaviour the GEMM path documents unchanged. kernel= forces one
    path; GPU_ORTHOL1_KERNEL=fused|gemm forces one on the GPU backend (the CPU validates it and
    otherwise ignores it, as it always has: a setting made for a card must not send CPU plans of
    other dtypes or penalties into errors, nor large ones into the scalar loop)."""
    kernel = _checks.check_choice("kernel", kernel, _checks.KERNELS)
    gpu = dev.xp is not np or getattr(dev, "emulates_gpu", False)
    if kernel == "auto":
        env = os.environ.get(_checks.ENV_KERNEL, "").strip()
        if env and env not in _checks.KERNELS:
            raise ValueError(
                f"environment variable {_checks.ENV_KERNEL}={env!r} is not one of {_checks.KERNELS}"
            )
        if not gpu:
            env = ""
        if not env:
            rule = getattr(dev, "auto_fused", True) and variant.is_default and default_budget and in_place
            wins = fused_wins(l, n, dtype, precision) if gpu else cpu_fused_wins(m, l, n, dtype)
            if not (rule and wins):
                return "gemm", None
        kernel = env or "fused"
    if kernel != "fused":
        return "gemm", None
    if not variant.is_default:
        raise ValueError(
            f"kernel='fused' computes the default penalty (l1, diagonal=True, normalize=False) "
            f"only, not {variant}; use kernel='gemm'"
        )
    if not gpu:
        if np.dtype(dtype) not in CPU_FUSED_DTYPES:
            raise ValueError(
                f"kernel='fused' on the CPU takes float32 or float64, not {np.dtype(dtype).name}; "
                "use kernel='gemm'"
            )
        return "fused", None
    from .kernels import fused_small

    if np.dtype(dtype) not in fused_small.N_MAX:  # bfloat16 (or its int16 carrier): the GEMMs only
        raise ValueError(f"kernel='fused' takes float16, float32 or float64, not {dtype}; use kernel='gemm'")
    cfg = fused_small.fused_config(l, n, dtype, threads=getattr(dev, "fused_threads", None))
    if cfg is None:
        raise ValueError(
            f"kernel='fused' takes slices up to n={fused_small.N_MAX[dtype]} for "
            f"{dtype}, got n={n}; use kernel='gemm'"
        )
    return "fused", cfg


_cpu_device: Device | None = None
_cpu_lock = threading.Lock()


def make_device(resolved: str, precision: str) -> Device:
    """The device for a resolved backend ("numpy": one shared, stateless CPU device; "cupy": a new
    GPU device for `precision`)."""
    global _cpu_device
    if resolved == "numpy":
        with _cpu_lock:
            dev = _cpu_device
            if dev is None:
                from ._numpy_dev import NumpyDevice

                dev = _cpu_device = NumpyDevice()
            return dev
    from ._cupy import CupyDevice

    return CupyDevice(precision)
