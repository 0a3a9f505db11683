"""The CPU's side of a plan call: the thread pool that shares a call's slices, and the small
workspace a plan keeps between calls."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import _driver, _gemm

CPU_KEEP_WORKSPACE = 1 << 20  # a plan keeps a workspace this small between calls (small shapes' hot path)
# The CPU splits the slice range over a thread pool, one part per core, and runs BLAS single-threaded
# meanwhile (`run_split`): NumPy's batched matmul runs the slices one after another, and BLAS's own
# threads pay a synchronization per GEMM that the slices' independence makes needless. Measured on
# the AMD EPYC (2 CPUs, loaded by other jobs), float32, against OpenBLAS threading each slice GEMM:
# (1024, 16, 128) 103 vs 500 ms, (512, 64, 512) 2.0 vs 8.1 s, (1024, 16, 32) 10.8 vs 140 ms.
# Below CPU_PARALLEL_MIN_FLOPS a call is too short to pay for handing work to threads. Measured on the
# AMD EPYC (2 CPUs, quiet; bench_cpu_threads.py): at 34 Mflop ((64, 32, 64): PointNet's 32 feature
# transforms of 64 x 64) the pool took 1.09 ms against 0.91 for BLAS's own threads, at 67 Mflop
# ((64, 64, 64)) 1.41 against 1.67 (bench/results/cpu-threads-epyc.json); on the Intel Xeon the pool
# won at 67 Mflop too.
CPU_PARALLEL_MIN_FLOPS = 5e7
CPU_PARALLEL_MAX_IMBALANCE = 1.25  # the largest part at most this many times the mean one (else BLAS threads)
# Between small slices and large calls BLAS's own threads win: measured on the Intel Xeon (2 CPUs,
# quiet; bench/results/cpu-threads.json, bench/bench_cpu_threads.py), OpenBLAS threading each GEMM
# took 0.96 ms against 1.15 on the pool at (1024, 16, 32), 11.2 against 15.2 at (512, 128, 64), 6.2
# against 9.9 at (1024, 16, 128), 8.2 against 14.0 at (2048, 4, 256); the pool won where a slice's
# GEMMs are too small for BLAS to split (0.73 against 0.99 ms at (64, 64, 64)) and on large calls
# (96 against 160 ms at (512, 1024, 64), 58 against 66 at (4096, 32, 128), 59 against 76 at
# (1024, 16, 512)).
# Those per-shape comparisons ran the two in one process, the pool after BLAS-threaded methods, whose
# idle OpenBLAS worker spins for about 0.1 s on a core the pool then shares. One method per process
# (bench/bench_cpu_threads_spin.py, AMD EPYC, 2 CPUs, bench/results/cpu-threads-spin.json), the pool
# took 0.83-0.96x BLAS's threads' time at four mid-sized shapes (three of these and (512, 16, 64)),
# but 1.48-1.68x when each call
# followed a threaded NumPy matmul of the user's: BLAS's threads are the choice that holds up in both.
CPU_POOL_MAX_SLICE_FLOPS = 3e6  # a slice's two GEMMs (4 l n^2 flops) below this: the pool
CPU_POOL_MIN_CALL_FLOPS = 4e9  # a call at least this large: the pool

# A chunk's slices of phi at most this many bytes (a core's L2 on the 2-CPU AMD EPYC), so that the
# gradient GEMM reads phi from cache where the Gram GEMM left it: the workspace budget alone bounds
# only the Grams (16 KB a slice at n = 64), which let a chunk span all 16 MiB of phi at (512, 128, 64)
# float32. Measured on the AMD EPYC (2 CPUs, quiet; bench/bench_cpu_chunk_cap.py,
# bench/results/cpu-chunk-cap.json), capped against uncapped with its workspace kept alike, paired
# over 21 rounds: 0.91 at (512, 128, 64), 0.96 at (1024, 16, 128), 0.98-0.99 at three more sweep
# points, 1.00-1.02 at the other four.
CPU_CHUNK_PHI_BYTES = 1 << 20

# The CPU's BLAS writes each slice's gradient rows where they lie in the output. When the rows are
# short and far apart (the slices of a C-contiguous (l, m, n) array: rows m*n elements apart), those
# scattered writes cost more than writing a chunk buffer and copying it out: on (64, 4096, 64)
# float32 (Intel Xeon, 2 CPUs, quiet) the call took 44.6 ms in place against 39.4 ms through the
# buffer, with the bench's BLAS limit at 38.6 ms (the phase alone: 22 ms against 13 + 3 ms of copy).
CPU_STAGE_ROW_STRIDE = 1 << 16  # bytes between a slice's rows, at least
CPU_STAGE_ROW_BYTES = 512  # bytes of one slice row, at most

_pool: ThreadPoolExecutor | None = None
_fused_l1: Any = None
_pool_lock = threading.Lock()


def far_rows(lay: _gemm.Layout, n: int, itemsize: int) -> bool:
    """Whether gradient slices of this layout have short rows far apart (see CPU_STAGE_ROW_STRIDE)."""
    return (
        lay.kind == "T" and lay.ld * itemsize >= CPU_STAGE_ROW_STRIDE and n * itemsize <= CPU_STAGE_ROW_BYTES
    )


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="gpu_orthol1")
        return _pool


def cpu_threads(m: int, l: int, n: int) -> int:
    """Threads that share the slices of a CPU call (the bench's BLAS limit splits its GEMMs alike)."""
    cores = os.cpu_count() or 1
    threads = min(cores, m)
    per_slice = 4.0 * l * n * n
    if threads <= 1 or per_slice * m < CPU_PARALLEL_MIN_FLOPS:
        return 1
    if -(-m // threads) * threads > CPU_PARALLEL_MAX_IMBALANCE * m:  # a few large slices: BLAS splits each
        return 1
    if per_slice >= CPU_POOL_MAX_SLICE_FLOPS and per_slice * m < CPU_POOL_MIN_CALL_FLOPS:
        return 1  # mid-sized calls of BLAS-sized slices: BLAS's threads (see above)
    return threads


_blas_ctl: Any = None
_blas_ctl_lock = threading.Lock()


def _blas_controller_locked() -> Any:
    """threadpoolctl's controller of the loaded BLAS libraries, found once; the caller holds
    _blas_ctl_lock. (Finding them walks the process's shared objects: about 1.4 ms a call; NumPy's
    BLAS is loaded with NumPy, before any plan.)"""
    global _blas_ctl
    if _blas_ctl is None:
        from threadpoolctl import ThreadpoolController

        _blas_ctl = ThreadpoolController().select(user_api="blas")
    return _blas_ctl


_one_thread_depth = 0  # run_split calls (from any user thread) inside the one-thread BLAS limit
_one_thread_limiter: Any = None


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS on one thread while any run_split call runs: the first call in sets the limit, the last
    one out restores BLAS's own setting. (Each call setting and restoring its own limit would let two
    user threads' overlapping calls restore each other's 1, leaving BLAS on one thread for good.)"""
    global _one_thread_depth, _one_thread_limiter
    with _blas_ctl_lock:
        if _one_thread_depth == 0:
            _one_thread_limiter = _blas_controller_locked().limit(limits=1)
        _one_thread_depth += 1
    try:
        yield
    finally:
        with _blas_ctl_lock:
            _one_thread_depth -= 1
            if _one_thread_depth == 0:
                _one_thread_limiter.restore_original_limits()
                _one_thread_limiter = None


def run_split(fn: Callable[[int, int], object], m: int, threads: int) -> None:
    """fn(first, last) over `threads` contiguous parts of range(m): the first part on the calling
    thread, the others on the shared pool.

    The caller works rather than waits: each part handed to a pool thread costs a wake-up of that
    thread and, when it finishes last, one of the caller (tens of microseconds each on a virtual
    machine's idle cores), which small calls feel. While the parts run, BLAS runs one thread per
    call: each part is already a core's worth of work, and BLAS's own threads on top of it
    oversubscribe the cores (on (512, 1024, 64) float32, AMD EPYC, 2 CPUs: 213 ms with OpenBLAS's
    default two threads, 91 ms with one; issue 26). The limit is process-wide while it lasts
    (threadpoolctl's), shared by overlapping calls from several user threads (`_one_blas_thread`);
    it costs speed, never correctness, where it does not apply."""
    if threads <= 1:
        fn(0, m)
        return
    bounds = [m * k // threads for k in range(threads + 1)]
    with _one_blas_thread():
        futs = [
            _thread_pool().submit(fn, a, b) for a, b in zip(bounds[1:-1], bounds[2:], strict=True) if b > a
        ]
        try:
            fn(bounds[0], bounds[1])
        finally:
            wait(futs)  # every part done before BLAS gets its threads back, even when one part failed
    for f in futs:
        f.result()


class CpuRunner:
    """A plan's CPU calls: the chunk loop over parts of the slices on the pool, each part in the
    plan's small kept workspace when it fits and no other thread holds it, else in its own."""

    def __init__(self, dev: Any, m: int, l: int, n: int, dtype: np.dtype):
        self._dev, self._m, self._l, self._n, self._dtype = dev, m, l, n, dtype
        self._lock = threading.Lock()
        self._kept: dict | None = None

    def fused(
        self,
        view: Callable[[Any], Any],
        p: Any,
        grad: Any,
        losses: Any,
        alpha: float,
        accumulate: bool,
        want_grad: bool,
    ) -> None:
        """The call's losses (and gradient) in the fused loop (kernels/fused_small_cpu.py), on the
        slices where they lie; view(a): the plan's (m, l, n) slice view of p or grad."""
        global _fused_l1
        if _fused_l1 is None:  # numba's compiled loop, imported with the first fused call
            from .kernels.fused_small_cpu import fused_l1

            _fused_l1 = fused_l1
        V = view(p)
        # without a gradient the loop writes nothing, but numba types `out` as written to: never
        # hand it phi, which may be read-only
        out = view(grad) if want_grad else np.empty((0, 0, 0), V.dtype)
        _fused_l1(V, out, losses, 0, alpha, accumulate, want_grad)

    def run(self, batch: _driver.Strided, sz: _driver.Sizes, losses: Any, kw: dict, threads: int) -> None:
        """The call's losses (and gradient, per `kw`) over `threads` parts of the slices."""
        run_split(lambda a, b: self._run_part(batch, sz, losses, kw, a, b), self._m, threads)

    def _run_part(
        self, batch: _driver.Strided, sz: _driver.Sizes, losses: Any, kw: dict, first: int, last: int
    ) -> None:
        nbytes = sz.chunk * sz.per_slice
        if nbytes <= CPU_KEEP_WORKSPACE and self._lock.acquire(blocking=False):
            try:
                if self._kept is None or (self._kept["_sizes"] is not sz and self._kept["_sizes"] != sz):
                    self._kept = _driver.workspace(np.empty, sz, self._l, self._n, self._dtype)
                    self._kept["_sizes"] = sz
                _driver.run(
                    self._dev,
                    batch,
                    self._kept,
                    sz.chunk,
                    losses,
                    first=first,
                    count=last - first,
                    loss_offset=first,
                    **kw,
                )
            finally:
                self._lock.release()
            return
        wsb = _driver.workspace(np.empty, sz, self._l, self._n, self._dtype)
        _driver.run(
            self._dev, batch, wsb, sz.chunk, losses, first=first, count=last - first, loss_offset=first, **kw
        )
