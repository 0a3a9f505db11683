"""Plans: everything decided once for arrays of one shape, dtype, strides, kind and device.

A `Plan` holds the backend and its device object (cuBLAS handle, kernel launch
configurations), the slice view (which axis indexes the slices), the layouts BLAS reads,
the chunk size and workspace sizes for each kind of call, and the CPU's small workspace.
A call checks that its array matches, binds the addresses and runs the one chunk loop
(`_driver.run`). The functional API (`loss`, `grad`, `loss_and_grad`) keeps a small LRU
cache of plans keyed by what changes them, so a repeated call pays a lookup, not a re-plan.

Threads: a plan may be shared. On the CPU the device is stateless and a call that finds
the plan's workspace in use by another thread allocates its own; on the GPU a call holds
the plan's lock while it enqueues its work (binding the cuBLAS handle to the calling
thread's current stream), so calls from several threads and streams serialize their
enqueueing, not the GPU work, and workspaces come from CuPy's stream-ordered pool.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from . import _backends, _driver, _gemm, _penalty

REDUCTIONS = ("sum", "mean", "none")
PRECISIONS = ("highest", "tf32")
WANTS = ("loss", "grad", "loss_and_grad")
KERNELS = ("auto", "gemm", "fused")
ENV_KERNEL = "GPU_ORTHOL1_KERNEL"
DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
ENV_WORKSPACE = "GPU_ORTHOL1_WORKSPACE_BYTES"
CPU_DEFAULT_WORKSPACE = 4 << 20  # chunks that stay in cache between the Gram GEMM and the sign pass
GPU_MAX_DEFAULT_WORKSPACE = 1 << 30
CPU_KEEP_WORKSPACE = 1 << 20  # a plan keeps a workspace this small between calls (small shapes' hot path)
# The CPU splits the slice range over a thread pool, one part per core, and runs BLAS single-threaded
# meanwhile (`run_split`): NumPy's batched matmul runs the slices one after another, and BLAS's own
# threads pay a synchronization per GEMM that the slices' independence makes needless. Measured on
# the AMD EPYC (2 CPUs, loaded by other jobs), float32, against OpenBLAS threading each slice GEMM:
# (1024, 16, 128) 103 vs 500 ms, (512, 64, 512) 2.0 vs 8.1 s, (1024, 16, 32) 10.8 vs 140 ms.
CPU_PARALLEL_MIN_FLOPS = 1 << 24  # below this a call is too short to pay for handing work to threads
CPU_PARALLEL_MAX_IMBALANCE = 1.25  # the largest part at most this many times the mean one (else BLAS threads)


# The CPU's BLAS writes each slice's gradient rows where they lie in the output. When the rows are
# short and far apart (the slices of a C-contiguous (l, m, n) array: rows m*n elements apart), those
# scattered writes cost more than writing a chunk buffer and copying it out: on (64, 4096, 64)
# float32 (Intel Xeon, 2 CPUs, quiet) the call took 44.6 ms in place against 39.4 ms through the
# buffer, with the bench's BLAS limit at 38.6 ms (the phase alone: 22 ms against 13 + 3 ms of copy).
CPU_STAGE_ROW_STRIDE = 1 << 16  # bytes between a slice's rows, at least
CPU_STAGE_ROW_BYTES = 512  # bytes of one slice row, at most


def _far_rows(lay, n, itemsize) -> bool:
    """Whether gradient slices of this layout have short rows far apart (see CPU_STAGE_ROW_STRIDE)."""
    return lay.kind == "T" and lay.ld * itemsize >= CPU_STAGE_ROW_STRIDE and n * itemsize <= CPU_STAGE_ROW_BYTES


def is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def check_array(phi, what="phi") -> bool:
    """True for a CuPy array, False for a NumPy one; TypeError for anything else."""
    if is_cupy(phi):
        import cupy

        if not isinstance(phi, cupy.ndarray):
            raise TypeError(f"{what} must be a NumPy or CuPy array, got {type(phi).__name__}")
        return True
    if not isinstance(phi, np.ndarray) or isinstance(phi, (np.ma.MaskedArray, np.matrix)):
        raise TypeError(
            f"{what} must be a NumPy or CuPy array (not a masked array or matrix), got {type(phi).__name__}"
        )
    return False


def check_beta(beta, what: str = "beta") -> float:
    """beta (or a preset's factor or strength, named by `what`) as a float; ValueError unless finite and >= 0."""
    if type(beta) is float and math.isfinite(beta) and beta >= 0.0:  # the common case, without the checks below
        return beta
    if isinstance(beta, (bool, np.bool_)) or not isinstance(beta, (numbers.Real, np.ndarray)):
        raise ValueError(f"{what} must be a finite real number, got {beta!r}")
    if isinstance(beta, np.ndarray):
        if beta.ndim != 0 or beta.dtype.kind not in "fiu":
            raise ValueError(f"{what} must be a finite real number, got an array of shape {beta.shape}")
        beta = beta.item()
    try:
        b = float(beta)
    except OverflowError:  # an int or Fraction beyond float range: not finite as a float
        b = math.inf
    if not math.isfinite(b):
        raise ValueError(f"{what} must be a finite real number, got {beta!r}")
    if b < 0:  # the penalty's weight: a negative one would reward the matrices for leaving orthogonality
        raise ValueError(f"{what} must be >= 0, got {beta!r} (a negative weight rewards non-orthogonal matrices)")
    return b


def check_workspace_bytes(workspace_bytes):
    if workspace_bytes is None:
        return None
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, numbers.Integral) \
            or workspace_bytes <= 0:
        raise ValueError(f"workspace_bytes must be a positive integer, got {workspace_bytes!r}")
    return int(workspace_bytes)


def workspace_budget(workspace_bytes, resolved, xp) -> int:
    """The caller's budget, else the environment's, else the default (fixed when a plan is made)."""
    if workspace_bytes is not None:
        return workspace_bytes
    env = os.environ.get(ENV_WORKSPACE, "").strip()
    if env:
        try:
            v = int(env)
        except ValueError:
            v = 0
        if v <= 0:
            raise ValueError(f"environment variable {ENV_WORKSPACE}={env!r} must be a positive integer")
        return v
    if resolved == "numpy":
        return _driver.DefaultBudget(CPU_DEFAULT_WORKSPACE)
    free, _total = xp.cuda.runtime.memGetInfo()
    free += xp.get_default_memory_pool().free_bytes()
    return _driver.DefaultBudget(max(1 << 20, min(GPU_MAX_DEFAULT_WORKSPACE, free // 4)))


_cpu_device = None
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _numpy_device():
    global _cpu_device
    if _cpu_device is None:
        from ._numpy_dev import NumpyDevice

        _cpu_device = NumpyDevice()
    return _cpu_device


def _thread_pool():
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="gpu_orthol1")
        return _pool


def cpu_threads(m, l, n) -> int:
    """Threads that share the slices of a CPU call (the bench's BLAS limit splits its GEMMs alike)."""
    cores = os.cpu_count() or 1
    threads = min(cores, m)
    if threads <= 1 or 4.0 * l * n * n * m < CPU_PARALLEL_MIN_FLOPS:
        return 1
    if -(-m // threads) * threads > CPU_PARALLEL_MAX_IMBALANCE * m:  # a few large slices: BLAS splits each
        return 1
    return threads


_blas_ctl = None
_blas_ctl_lock = threading.Lock()


def _blas_controller():
    """threadpoolctl's controller of the loaded BLAS libraries, found once (finding them walks the
    process's shared objects: about 1.4 ms a call; NumPy's BLAS is loaded with NumPy, before any plan)."""
    global _blas_ctl
    with _blas_ctl_lock:
        if _blas_ctl is None:
            from threadpoolctl import ThreadpoolController

            _blas_ctl = ThreadpoolController().select(user_api="blas")
        return _blas_ctl


def run_split(fn, m, threads):
    """fn(first, last) over `threads` contiguous parts of range(m), on the shared pool.

    While the parts run, BLAS runs one thread per call: each pool thread is already a core's worth
    of work, and BLAS's own threads on top of it oversubscribe the cores (on (512, 1024, 64) float32,
    AMD EPYC, 2 CPUs: 213 ms with OpenBLAS's default two threads, 91 ms with one; issue 26). The
    limit is process-wide while it lasts (threadpoolctl's; from a thread other than the one that
    holds threadpoolctl's OpenBLAS control it does nothing, which costs speed, never correctness)."""
    if threads <= 1:
        fn(0, m)
        return
    parts = np.linspace(0, m, threads + 1).astype(int)
    with _blas_controller().limit(limits=1):
        futs = [_thread_pool().submit(fn, int(a), int(b)) for a, b in zip(parts[:-1], parts[1:]) if b > a]
        wait(futs)  # every part done before BLAS gets its threads back, even when one part failed
    for f in futs:
        f.result()


def make_device(resolved, precision):
    if resolved == "numpy":
        return _numpy_device()
    from ._cupy import CupyDevice

    return CupyDevice(precision)


def byte_span(addr: int, shape, strides, itemsize: int) -> tuple[int, int]:
    """[lo, hi): the bytes an array with its first element at `addr` reaches (strides in bytes, any
    sign; the array has at least one element)."""
    lo = hi = addr
    for s, st in zip(shape, strides):
        if s > 1:
            if st < 0:
                lo += (s - 1) * st
            else:
                hi += (s - 1) * st
    return lo, hi + itemsize


def _extent(a):
    return byte_span(a.data.ptr, a.shape, a.strides, a.itemsize)


def self_overlapping(a) -> bool:
    dims = sorted((abs(st), s) for s, st in zip(a.shape, a.strides) if s > 1)
    if a.size == 0:
        return False
    need = a.itemsize
    for st, s in dims:
        if st < need:
            return True
        need = st * s
    return False


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


def fused_wins(l: int, n: int, dtype, precision: str) -> bool:
    """Whether kernel="auto" picks the fused kernel for (l, n) slices of `dtype` on a GPU."""
    dt = np.dtype(dtype)
    if precision != "highest" or dt not in (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)):
        return False
    rule = FUSED_RULE_FLOAT64 if dt == np.dtype(np.float64) else FUSED_RULE
    return any(1 <= n <= n_top and l <= l_top for n_top, l_top in rule)


class Plan:
    """The loss and gradient for arrays like the one the plan was made for (see `plan`).

    ``plan(phi, out=None, accumulate=False)`` returns what `want` names, as the functional
    API returns it. A plan may be shared between threads (see the module docstring)."""

    def __init__(self, phi, beta=1.0, *, axis=1, reduction="sum", want="loss_and_grad", precision="highest",
                 backend="auto", workspace_bytes=None, kernel="auto", penalty="l1", diagonal=True,
                 normalize=False, _device=None):
        self.is_cupy = check_array(phi)
        if phi.dtype not in DTYPES:
            raise TypeError(
                f"phi must be float16, float32 or float64, got {phi.dtype}; convert it first "
                "(integer, bool and complex inputs have no orthogonality loss here)"
            )
        if phi.ndim not in (2, 3):
            raise ValueError(f"phi must have 2 dims (l, n) or 3 dims, got shape {phi.shape}")
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
            raise ValueError(f"axis must be an integer, got {axis!r}")
        axis = int(axis)
        if phi.ndim == 3:
            if not -3 <= axis < 3:
                raise ValueError(f"axis {axis} is out of range for a 3-D phi")
            axis %= 3
            self.squeeze = False
        else:  # one slice; axis has nothing to index
            axis, self.squeeze = 1, True
        self.beta = check_beta(beta)
        if not isinstance(reduction, str) or reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if not isinstance(want, str) or want not in WANTS:
            raise ValueError(f"want must be one of {WANTS}, got {want!r}")
        workspace_bytes = check_workspace_bytes(workspace_bytes)
        self.variant = _penalty.check(penalty, diagonal, normalize)  # the family member, fixed here
        name = _backends.check_name(backend)
        shape3 = phi.shape if not self.squeeze else (phi.shape[0], 1, phi.shape[1])
        self.perm = {0: (0, 1, 2), 1: (1, 0, 2), 2: (2, 0, 1)}[axis]
        self.m, self.l, self.n = (shape3[i] for i in self.perm)
        self.axis, self.reduction, self.want, self.precision = axis, reduction, want, precision
        self.shape, self.dtype, self.strides = phi.shape, phi.dtype, phi.strides
        self.device_id = phi.device.id if self.is_cupy else None
        self.array_type = type(phi)
        self.resolved = _backends.resolve(name, self.is_cupy, 4.0 * self.l * self.m * self.n * self.n)
        self.dev = _device if _device is not None else make_device(self.resolved, precision)
        self.xp = self.dev.xp
        self.host_in = not self.is_cupy and self.xp is not np  # a NumPy input computed on the GPU
        self.budget = workspace_budget(workspace_bytes, "numpy" if self.xp is np else "cupy", self.xp)
        # the layout of phi's slice view is fixed by its strides; when the GPU computes a NumPy input
        # it reads a C-contiguous device copy
        self._lay_phi = None if self.host_in else _driver.layout_of(self._view(phi))
        self.kernel, self.fused_cfg = self._pick_kernel(kernel)
        self.ldt = np.float64 if phi.dtype == np.float64 else np.float32
        self._sizes: dict = {}
        self._fused_go: dict = {}  # (phi and gradient layouts, losses strides, want_grad) -> fused launcher
        self._losses: dict = {}  # stream address -> (per-slice losses kept there, the stream)
        # a call's arrays are the device's own kind (torch tensors come as CuPy views): their address
        # without _addr's checks for other kinds
        self._addr = (lambda a: a.ctypes.data) if self.xp is np else (lambda a: a.data.ptr)
        self._lock = threading.Lock()
        self._kept: dict | None = None  # the CPU's small workspace, kept between calls
        cpu = self.xp is np and not getattr(self.dev, "emulates_gpu", False)
        self._threads = cpu_threads(self.m, self.l, self.n) if cpu else 1
        self._stage_far_rows = cpu

    def _pick_kernel(self, kernel):
        """("gemm", None) or ("fused", its config): the GPU path, decided once.

        "auto" takes the fused kernel on a GPU where `fused_wins` says so, for the default penalty,
        when no workspace cap is set (workspace_bytes= or GPU_ORTHOL1_WORKSPACE_BYTES: a setting of
        the chunked GEMM path, whose errors and chunking a caller then expects) and when BLAS reads
        phi in place (a layout the GEMM path would copy keeps that path and its CopyWarning, and
        `graph()` its refusal). Those conditions keep every behaviour the GEMM path documents
        unchanged. GPU_ORTHOL1_KERNEL=fused|gemm or kernel= forces one path on the GPU backend."""
        if not isinstance(kernel, str) or kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        gpu = self.xp is not np or getattr(self.dev, "emulates_gpu", False)
        if kernel == "auto":
            env = os.environ.get(ENV_KERNEL, "").strip()
            if env and env not in KERNELS:
                raise ValueError(f"environment variable {ENV_KERNEL}={env!r} is not one of {KERNELS}")
            if not gpu:
                return "gemm", None
            if not env:
                rule = (getattr(self.dev, "auto_fused", True) and self.variant.is_default
                        and isinstance(self.budget, _driver.DefaultBudget)
                        and (self.host_in or self._lay_phi is not None))
                if not (rule and fused_wins(self.l, self.n, self.dtype, self.precision)):
                    return "gemm", None
            kernel = env or "fused"
        if kernel != "fused":
            return "gemm", None
        if not gpu:
            raise ValueError("kernel='fused' runs on the GPU backend only; the CPU backend has one path")
        if not self.variant.is_default:
            raise ValueError(f"kernel='fused' computes the default penalty (l1, diagonal=True, normalize=False) "
                             f"only, not {self.variant}; use kernel='gemm'")
        from .kernels import fused_small

        cfg = fused_small.fused_config(self.l, self.n, self.dtype, threads=getattr(self.dev, "fused_threads", None))
        if cfg is None:
            raise ValueError(f"kernel='fused' takes slices up to n={fused_small.N_MAX[self.dtype]} for "
                             f"{self.dtype}, got n={self.n}; use kernel='gemm'")
        return "fused", cfg

    # -- checks ----------------------------------------------------------------------------------

    def _view(self, a):
        """The (m, l, n) slices-first view of an array shaped like phi."""
        if self.squeeze:
            a = a[:, None, :]
        return a.transpose(self.perm)

    def _mismatch(self, phi) -> str | None:
        if type(phi) is not self.array_type:
            check_array(phi)  # not an array at all: the TypeError the functional API raises (docs/errors.md)
            return f"phi is a {type(phi).__module__}.{type(phi).__name__}, the plan's a " \
                   f"{self.array_type.__module__}.{self.array_type.__name__}"
        if phi.shape != self.shape:
            return f"phi has shape {phi.shape}, the plan's {self.shape}"
        if phi.dtype != self.dtype:
            return f"phi has dtype {phi.dtype}, the plan's {self.dtype}"
        if phi.strides != self.strides:
            return f"phi has strides {phi.strides}, the plan's {self.strides} (make a plan for this layout)"
        if self.is_cupy and phi.device.id != self.device_id:
            return f"phi is on GPU {phi.device.id}, the plan's on GPU {self.device_id}"
        return None

    def check_out(self, out, phi, accumulate):
        if not isinstance(accumulate, (bool, np.bool_)):
            raise ValueError(f"accumulate must be True or False, got {accumulate!r}")
        if out is None:
            if accumulate:
                raise ValueError("accumulate=True needs out= (the array to add the gradient into)")
            return
        try:
            out_cupy = check_array(out, "out")
        except TypeError as e:
            raise ValueError(str(e)) from None
        if out_cupy != self.is_cupy:
            kind = "CuPy" if self.is_cupy else "NumPy"
            raise ValueError(f"out must be a {kind} array like phi, got {type(out).__module__}.{type(out).__name__}")
        if out.shape != phi.shape:
            raise ValueError(f"out has shape {out.shape}, phi has shape {phi.shape}")
        if out.dtype != phi.dtype:
            raise ValueError(f"out has dtype {out.dtype}, phi has dtype {phi.dtype}")
        if self.is_cupy:
            # compare ids: formatting a Device queries the driver, which fails for an absent ordinal
            if out.device.id != phi.device.id:
                raise ValueError(f"out is on GPU {out.device.id}, phi on GPU {phi.device.id}")
            lo_o, hi_o = _extent(out)
            lo_p, hi_p = _extent(phi)
            if out.size and phi.size and lo_o < hi_p and lo_p < hi_o:
                raise ValueError("out overlaps phi's memory; pass a separate array")
        else:
            if not out.flags.writeable:
                raise ValueError("out is read-only")
            if out.size and phi.size and np.shares_memory(out, phi):
                raise ValueError("out overlaps phi's memory; pass a separate array")
        if self_overlapping(out):
            raise ValueError(f"out has overlapping elements (strides {out.strides}); "
                             "pass a writable array of its own")

    # -- running ---------------------------------------------------------------------------------

    def __call__(self, phi, out=None, accumulate=False):
        why = self._mismatch(phi)
        if why is not None:
            raise ValueError(f"this plan does not fit phi: {why}")
        want_grad = self.want != "loss"
        if not want_grad and (out is not None or accumulate):
            raise ValueError("a plan made with want='loss' takes no out= or accumulate=")
        if want_grad:
            self.check_out(out, phi, accumulate)
        loss, grad = self.execute(phi, out, accumulate, self.beta, want_grad)
        if self.want == "loss":
            return loss
        if self.want == "grad":
            return grad
        return loss, grad

    def _sizes_for(self, want_grad, accumulate, stage_phi, stage_out, threads):
        """(sizes, threads): the chunking of a call, and how many threads share the slices."""
        key = (want_grad, accumulate, stage_phi, stage_out, threads)
        hit = self._sizes.get(key)
        if hit is None:
            def sizes(budget):
                return _driver.sizes(self.dev, self.m, self.l, self.n, self.dtype, want_grad=want_grad,
                                     accumulate=accumulate, stage_phi=stage_phi, stage_out=stage_out,
                                     budget=budget, variant=self.variant)

            hit = None
            if threads > 1:  # the budget bounds the call: each thread's chunk gets its share
                try:
                    hit = (sizes(type(self.budget)(max(1, self.budget // threads))), threads)
                except MemoryError:  # a share holds no slice: the whole budget, one thread
                    pass
            if hit is None:
                hit = (sizes(self.budget), 1)
            self._sizes[key] = hit
        return hit

    def chunk_for(self, want_grad, accumulate=False):
        """Slices per chunk of a call (readable layouts, no thread split): what `execute(chunk=)` may cap."""
        return self._sizes_for(want_grad, bool(accumulate), False, False, 1)[0].chunk

    def execute(self, phi, out, accumulate, beta, want_grad, gram_hook=None, chunk=None, alloc=None, losses=None):
        """(loss, grad) for an array that matches the plan, arguments already checked.

        gram_hook(ws) sees each chunk's Grams (a (count, n*n) array of the plan's array module)
        before the sign pass and may change them in place; chunk caps the slices per chunk (ranks
        that sum partial Grams must cut the same chunks). alloc(shape, dtype) makes the gradient
        (when out is None) and the workspaces, and `losses`, an (m,) float64 array, receives the
        unscaled per-slice losses (the returned loss is then None): how the torch integration keeps
        every allocation in torch's allocator, as a CUDA graph capture needs."""
        xp = self.xp
        p = xp.asarray(phi) if self.host_in else phi
        grad = None
        if want_grad:
            if out is not None and not self.host_in:
                grad = out
            elif out is not None and accumulate:
                grad = xp.asarray(out)
            elif alloc is not None:
                grad = alloc(p.shape, p.dtype)
            elif p.flags.c_contiguous:
                # the common case without empty_like: CuPy's works out the layout in Python, about 7 us
                # per call under cProfile on the H100 machine's host (bench/results/gpu-h100-vec-profile.txt)
                grad = xp.empty(p.shape, p.dtype)
            else:
                grad = xp.empty_like(p)
        m, l, n = self.m, self.l, self.n
        raw = losses is not None
        # a GPU call with something to launch keeps its per-slice losses per stream (`_kept_losses`)
        # and then launches its loss reduction under the plan's lock, so that no other thread's call
        # of this plan writes them in between on the same stream
        keep = not raw and m and n and alloc is None and xp is not np
        if not raw and not keep:
            losses = xp.zeros(m, dtype=np.float64) if n == 0 else xp.empty(m, dtype=np.float64)
        elif n == 0:
            losses[...] = 0
        if self.kernel == "fused" and gram_hook is None:
            if not (m and n):
                return self._finish(losses, beta, raw, want_grad, grad, out)
            alpha = 2.0 * beta / (m if self.reduction == "mean" else 1)
            with self._lock:
                stream = self.dev.bind(cublas=False)
                if keep:
                    losses = self._kept_losses(stream)
                self._fused_call(p, grad, losses, alpha, bool(accumulate), want_grad)
                return self._finish(losses, beta, raw, want_grad, grad, out)
        V = self._view(p)
        if m == 0 or n == 0 or l == 0:  # nothing for BLAS to read: any layout will do
            Vout = self._view(grad) if want_grad else None
            lay_phi = lay_out = _gemm.Layout("T", n, 0)
        elif want_grad:
            Vout = self._view(grad)
            if out is None and self._lay_phi is not None:
                lay_out = self._lay_phi if grad.strides == p.strides else _driver.layout_of(Vout)
                lay_phi = self._lay_phi
            else:
                lay_phi, lay_out = _driver.staging(V, Vout, True)
            if lay_out is not None and self._stage_far_rows and _far_rows(lay_out, self.n, grad.dtype.itemsize):
                lay_out = None  # written through the chunk buffer: faster here, and no CopyWarning
        else:
            Vout = None
            lay_phi = self._lay_phi
            if lay_phi is None:
                lay_phi, _ = _driver.staging(V, None, False)
            lay_out = None
        batch = _driver.Strided(V, Vout, lay_phi, lay_out)
        threads = self._threads if gram_hook is None else 1  # a hook sees the chunks in order
        sz, threads = self._sizes_for(want_grad, bool(accumulate), lay_phi is None, want_grad and lay_out is None,
                                      threads)
        if chunk is not None and chunk < sz.chunk:
            sz = dataclasses.replace(sz, chunk=max(1, int(chunk)))
        alpha = 2.0 * beta / (m if self.reduction == "mean" and m else 1)
        kw = dict(alpha=alpha, beta_gemm=1.0 if accumulate else 0.0, want_grad=want_grad, gram_hook=gram_hook,
                  variant=self.variant)
        if m and n:
            if xp is np:
                self._run_cpu(batch, sz, losses, kw, threads)
            else:
                with self._lock:
                    stream = self.dev.bind()
                    if keep:
                        losses = self._kept_losses(stream)
                    wsb = _driver.workspace(alloc or self._alloc, sz, l, n, self.dtype)
                    _driver.run(self.dev, batch, wsb, sz.chunk, losses, **kw)
                    return self._finish(losses, beta, raw, want_grad, grad, out)
        return self._finish(losses, beta, raw, want_grad, grad, out)

    def _kept_losses(self, stream):
        """The per-slice losses of a GPU call on `stream` (CuPy's current one, as the device bound
        it): an array kept per stream (calls on one stream run in order, so they may share it; the
        plan's lock keeps a call's launches together), made on the first call there. While the
        stream captures a graph, a fresh one: a graph replayed on another stream would share the
        kept one with calls there."""
        xp = self.xp
        key = stream.ptr
        # the legacy default stream (0) cannot capture (and asking fails while another stream does)
        if key and stream.is_capturing():
            return xp.empty(self.m, dtype=np.float64)
        hit = self._losses.get(key)
        if hit is None:
            if len(self._losses) >= 8:  # a caller cycling through streams: keep the newest
                self._losses.clear()
            # kept with its stream: while that lives, no other stream has its address
            hit = self._losses[key] = (xp.empty(self.m, dtype=np.float64), stream)
        return hit[0]

    def _fused_call(self, p, grad, losses, alpha, accumulate, want_grad):
        """Launch the fused kernel through a launcher kept per layout of phi, the gradient and the
        losses: per call only the addresses and scalars are packed."""
        # phi's layout is the plan's, but execute() is also called directly (torch, ranks): key on it too
        key = (p.strides, grad.dtype if want_grad else None, grad.strides if want_grad else None, losses.strides,
               want_grad)
        go = self._fused_go.get(key)
        if go is None:
            if len(self._fused_go) >= 8:  # a caller cycling through out= layouts: keep the newest
                self._fused_go.clear()
            go = self._fused_go[key] = self.dev.fused_launcher(
                self.fused_cfg, self._view(p), self._view(grad) if want_grad else None, losses, want_grad)
        addr = self._addr
        pa = addr(p)
        go(pa, addr(grad) if want_grad else pa, addr(losses), alpha, accumulate)

    def _finish(self, losses, beta, raw, want_grad, grad, out):
        xp = self.xp
        loss = None if raw else self._reduce(losses, beta)
        if not want_grad:
            return loss, None
        if self.host_in:
            if out is not None:
                out[...] = xp.asnumpy(grad)
                return loss, out
            return loss, xp.asnumpy(grad)
        return loss, grad

    def _alloc(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def _run_cpu(self, batch, sz, losses, kw, threads):
        run_split(lambda a, b: self._run_part(batch, sz, losses, kw, a, b), self.m, threads)

    def _run_part(self, batch, sz, losses, kw, first, last):
        nbytes = sz.chunk * sz.per_slice
        if nbytes <= CPU_KEEP_WORKSPACE and self._lock.acquire(blocking=False):
            try:
                if self._kept is None or self._kept.get("_sizes") != sz:
                    self._kept = _driver.workspace(np.empty, sz, self.l, self.n, self.dtype)
                    self._kept["_sizes"] = sz
                _driver.run(self.dev, batch, self._kept, sz.chunk, losses, first=first, count=last - first,
                            loss_offset=first, **kw)
            finally:
                self._lock.release()
            return
        wsb = _driver.workspace(np.empty, sz, self.l, self.n, self.dtype)
        _driver.run(self.dev, batch, wsb, sz.chunk, losses, first=first, count=last - first,
                    loss_offset=first, **kw)

    def _reduce(self, losses, beta):
        xp = self.xp
        if hasattr(self.dev, "loss_total"):  # the GPU device (or its emulator): one launch
            each = self.reduction == "none"
            buf = xp.empty(self.m if each else 1, dtype=self.ldt)
            self.reduce_into(losses, beta, buf)
            loss = buf if each else buf.reshape(())
        elif self.reduction == "none":
            loss = (losses * beta).astype(self.ldt)
        else:
            total = losses.sum() * beta
            if self.reduction == "mean" and self.m:
                total = total / self.m
            loss = total.astype(self.ldt)
        if self.host_in:
            return xp.asnumpy(loss)
        if xp is np:
            return np.asarray(loss)
        return loss

    def reduce_into(self, losses, beta, buf):
        """The GPU's loss from the per-slice losses into `buf` (1 entry, or m for reduction="none")."""
        scale = beta / (self.m if self.reduction == "mean" and self.m else 1)
        self.dev.loss_total(losses, self.m, scale, buf, self.reduction == "none")

    def graph(self, phi, out=None, accumulate=False):
        """Capture one call for these arrays into a CUDA graph: a `GraphedCall` whose `replay()`
        re-runs both GEMMs (or the fused kernel), the elementwise pass and the loss reduction with
        one launch, for the same `phi` and `out` addresses (their contents may change between
        replays). GPU backend and CuPy arrays only; phi and out must be layouts BLAS reads in place
        (no staging copies). Workspaces and results are allocated once, here; each replay
        overwrites the returned loss and gradient arrays."""
        why = self._mismatch(phi)
        if why is not None:
            raise ValueError(f"this plan does not fit phi: {why}")
        if not self.is_cupy or self.xp is np:
            raise ValueError("graph() needs the GPU backend and a CuPy phi")
        want_grad = self.want != "loss"
        if not want_grad and (out is not None or accumulate):
            raise ValueError("a plan made with want='loss' takes no out= or accumulate=")
        if want_grad:
            self.check_out(out, phi, accumulate)
        return GraphedCall(self, phi, out, bool(accumulate), want_grad)

    def __repr__(self):
        kind = "cupy" if self.is_cupy else "numpy"
        return (f"Plan({kind} {self.shape} {self.dtype}, axis={self.axis}, m={self.m} slices of "
                f"{self.l}x{self.n}, reduction={self.reduction!r}, want={self.want!r}, backend={self.resolved!r})")


class GraphedCall:
    """A plan's call captured in a CUDA graph (see `Plan.graph`); `replay()` returns what the plan's
    `want` names, as arrays that the next replay overwrites."""

    def __init__(self, plan: Plan, phi, out, accumulate: bool, want_grad: bool):
        import cupy

        self.plan, self.phi, self.out = plan, phi, out
        V = plan._view(phi)
        if plan.kernel == "gemm" and plan.m and plan.n and plan.l and _driver.layout_of(V) is None:
            raise ValueError("graph() needs a phi whose layout BLAS reads in place (this one is staged)")
        if out is not None and plan.kernel == "gemm" and plan.l and _driver.layout_of(plan._view(out)) is None:
            raise ValueError("graph() needs an out whose layout BLAS reads in place (this one is staged)")
        target = out if out is not None else (cupy.empty_like(phi) if want_grad else None)
        self.grad = target
        self.losses = cupy.empty(plan.m, dtype=np.float64)
        self._loss_buf = cupy.empty(plan.m if plan.reduction == "none" else 1, dtype=plan.ldt)
        self.loss = self._loss_buf if plan.reduction == "none" else self._loss_buf.reshape(())
        bufs: list = []

        def record(shape, dtype):
            bufs.append(cupy.empty(shape, dtype=dtype))
            return bufs[-1]

        # a first, uncaptured run compiles the kernels and makes the workspaces; it writes only
        # buffers of its own (the user's out is not touched before the first replay)
        scratch = cupy.empty_like(target) if (target is not None and target is out) else target
        plan.execute(phi, scratch, False, plan.beta, want_grad, alloc=record, losses=self.losses)
        plan.reduce_into(self.losses, plan.beta, self._loss_buf)  # compiles and loads its kernel now
        it = iter(bufs)

        def again(shape, dtype):
            buf = next(it)
            assert buf.shape == tuple(shape) and buf.dtype == dtype, "capture allocates like the first run"
            return buf

        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                plan.execute(phi, target, accumulate, plan.beta, want_grad, alloc=again, losses=self.losses)
                plan.reduce_into(self.losses, plan.beta, self._loss_buf)
            finally:
                self.graph = stream.end_capture()
        self._stream = stream
        self._keep = bufs  # the graph reads and writes these addresses

    def replay(self):
        import cupy

        self.graph.launch(stream=cupy.cuda.get_current_stream())
        if self.plan.want == "loss":
            return self.loss
        if self.plan.want == "grad":
            return self.grad
        return self.loss, self.grad


# -- the functional API's cache ------------------------------------------------------------------

CACHE_SIZE = 32
_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


def cached(phi, axis, reduction, precision, backend, workspace_bytes, penalty="l1", diagonal=True,
           normalize=False) -> Plan:
    """The plan for this call from the LRU cache, made on a miss (argument errors are raised then)."""
    # checked before the lookup: diagonal=1 would otherwise hash like True and find its plan
    variant = _penalty.check(penalty, diagonal, normalize)
    try:
        tp = type(phi)
        key = (tp, phi.shape, phi.strides, phi.dtype, phi.device.id if tp is not np.ndarray else None,
               axis, reduction, precision, backend, workspace_bytes, variant,
               os.environ.get(_backends.ENV_BACKEND), os.environ.get(ENV_WORKSPACE), os.environ.get(ENV_KERNEL))
        with _cache_lock:
            p = _cache.get(key)
            if p is not None:
                _cache.move_to_end(key)
                return p
    except (AttributeError, TypeError):  # not an array, or an unhashable argument: Plan() says which
        key = None
    p = Plan(phi, 1.0, axis=axis, reduction=reduction, precision=precision, backend=backend,
             workspace_bytes=workspace_bytes, penalty=variant.penalty, diagonal=variant.diagonal,
             normalize=variant.normalize)
    if key is not None:
        with _cache_lock:
            _cache[key] = p
            if len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return p


def clear_cache():
    with _cache_lock:
        _cache.clear()
