"""What the bench's parts share: a case, a prepared method, a method, the result row's fields, and
the probes every method uses (peak memory on the CPU and GPU, GPU sync, copy bandwidth).

Each method (methods.py) is a `Method` whose `prepare(case)` returns a `Prepared`: a
`call(k)` that computes loss and gradient of input copy k (held on the method's
device), `result(r)` turning its output into (loss, gradient) on the host for the
correctness check, `sync()` for the timer, and `peak()` that measures the extra
memory of one call.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _dtypes

BETA = 0.5
# the dtypes `--dtypes` takes; bfloat16 is ml_dtypes' (what JAX hands over), made on demand
DTYPES = ("float16", "bfloat16", "float32", "float64")
PEERS = ("numpy-naive", "torch-eager", "torch-compile", "jax-jit", "cupy-naive")
# One row per (method, case): the CSV's columns and the JSON rows' keys, in this order. "slow" is
# set by flags.slow_rows, "flags" by flags.flag_rows.
RESULT_FIELDS = [
    "method",
    "family",
    "device",
    "device_name",
    "backend",
    "precision",
    "sweep",
    "shape",
    "l",
    "m",
    "n",
    "dtype",
    "status",
    "note",
    "runs",
    "p20_ms",
    "p50_ms",
    "p80_ms",
    "limit_blas_ms",
    "limit_mem_ms",
    "ratio_blas",
    "ratio_mem",
    "ratio_limit",
    "ours_speedup",
    "peak_mb",
    "peak_how",
    "loss_err",
    "grad_err",
    "gflops",
    "v_gpu_orthol1",
    "v_numpy",
    "v_cupy",
    "v_torch",
    "v_jax",
    "host",
    "loadavg",
    "timestamp",
    "flags",
    "slow",
]


@dataclass
class Case:
    l: int
    m: int
    n: int
    dtype: np.dtype
    sweep: str  # "ref", "m", "n"
    host: list[np.ndarray]  # input copies (l, m, n), C-contiguous, rotated between runs

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.l, self.m, self.n)

    @property
    def label(self) -> str:
        return f"{self.l}x{self.m}x{self.n}"

    @property
    def nbytes(self) -> int:
        return self.host[0].nbytes


@dataclass
class Prepared:
    call: Callable[[int], Any]
    result: Callable[[Any], tuple[Any, Any]]
    sync: Callable[[], None]
    peak: Callable[[], tuple[float, str]]  # (bytes, how measured)
    keep: list = field(default_factory=list)  # device copies of the inputs, freed with this object


@dataclass
class Method:
    name: str
    family: str  # "ours", "peer", "limit"
    device: str  # "cpu" or "gpu"
    backend: str
    precision: str  # "highest" or "tf32"
    prepare: Callable[[Case], Prepared]
    available: Callable[[], tuple[bool, str]]
    dtypes: tuple = ("float16", "float32", "float64")
    # why the method has no row for a dtype the run measures (a one-line note, once per run)
    no_dtype: dict[str, str] = field(default_factory=dict)

    def tol_class(self, dtype) -> str:
        name = dtype_name(dtype)
        if self.precision == "tf32" and name == "float32":
            return "tf32"
        if name in ("float16", "bfloat16") and self.family != "ours":
            # the peers' float16 and bfloat16 expressions round G itself to their dtype (torch's and
            # XLA's bfloat16 matmuls return bfloat16): G's own rounding is then the floor
            return "lowp" if name == "float16" else "lowp-bf16"
        return name


def dtype_name(dtype) -> str:
    """A dtype's name ("bfloat16" without importing ml_dtypes when given as a name)."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def bench_dtype(name: str) -> np.dtype:
    """The NumPy dtype of one of DTYPES (bfloat16: ml_dtypes', imported here)."""
    return _dtypes.bfloat16() if name == "bfloat16" else np.dtype(name)


def bits(a):
    """A bfloat16 host array as its int16 carrier (how bfloat16 reaches CuPy, which has none), else a."""
    return a.view(_dtypes.BITS) if _dtypes.is_bf16(a.dtype) else a


def from_bits(a, dtype):
    """A host result back in `dtype`: an int16 carrier of bfloat16 viewed as bfloat16, else a."""
    return a.view(dtype) if _dtypes.is_bf16(dtype) and a.dtype == _dtypes.BITS else a


# ---------------------------------------------------------------- memory probes (CPU)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_probe_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


_MMAP_STEADY = 32 << 20  # glibc's dynamic mmap threshold ends here once a program frees large blocks
_MMAP_PROBE = 128 << 10


def _mallopt(mmap_threshold: int) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold)
    )


def malloc_steady() -> bool:
    """Fix glibc's thresholds where a long-running program's dynamic ones settle (mmap 32 MiB, trim
    64 MiB), for every CPU timing: all methods then see the same allocator, and the switch to the
    probe setting and back (cpu_peak) changes nothing for the timings that follow."""
    return _mallopt(_MMAP_STEADY)


def cpu_peak(fn: Callable[[], Any]) -> tuple[float, str]:
    """Peak extra memory of fn(): resident-set high-water mark (reset through /proc/self/clear_refs)
    above the resident set before the call; tracemalloc where /proc can't be used. During the probe
    glibc returns every block over 128 KiB to the OS when freed, so a block reused from the heap
    can't hide in memory that was already resident."""
    gc.collect()
    if rss_probe_works() and _mallopt(_MMAP_PROBE):
        try:
            gc.collect()
            base = _status_kb("VmRSS")
            r = fn()
            peak = _status_kb("VmHWM")
            del r
        finally:
            malloc_steady()
        return max(0, peak - base) * 1024.0, "rss-hwm"
    import tracemalloc

    tracemalloc.start()
    try:
        r = fn()
        _cur, peak = tracemalloc.get_traced_memory()
        del r
    finally:
        tracemalloc.stop()
    return float(peak), "tracemalloc"


# ---------------------------------------------------------------- GPU helpers


def cupy_module():
    import cupy

    return cupy


def gpu_sync():
    cupy_module().cuda.runtime.deviceSynchronize()


def cupy_pool_peak(fn: Callable[[], Any]) -> tuple[float, str]:
    """Bytes a fresh CuPy pool holds after fn(): freed blocks are reused, not returned, so this is
    the high-water mark of the call's live allocations (rounded to the pool's 512 B blocks)."""
    cp = cupy_module()
    pool = cp.cuda.MemoryPool()
    gpu_sync()
    with cp.cuda.using_allocator(pool.malloc):
        r = fn()
        gpu_sync()
        peak = pool.total_bytes()
        del r
    pool.free_all_blocks()
    return float(peak), "cupy-pool"


def cpu_peak_of(call):
    return lambda: cpu_peak(lambda: call(0))


def gpu_peak_of(call):
    return lambda: cupy_pool_peak(lambda: call(0))


def gpu_ok() -> tuple[bool, str]:
    from .. import _backends

    ok, why = _backends.gpu_status()
    return ok, ("" if ok else f"no usable GPU: {why}")


def device_copies(case: Case):
    """The case's inputs on the GPU; bfloat16 as int16 carriers (CuPy has no bfloat16)."""
    cp = cupy_module()
    return [cp.asarray(bits(h)) for h in case.host]


def noop():
    pass


def to_host(x):
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return np.asarray(x)


def d2d_bandwidth(nbytes: int = 256 << 20, runs: int = 7) -> float:
    """Device-to-device copy bandwidth in bytes/s counting read + write (2 * nbytes per copy)."""
    cp = cupy_module()
    a = cp.random.random_sample(nbytes // 8)  # float64, never zeros
    b = cp.empty_like(a)
    ts = []
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    for i in range(runs + 2):
        start.record()
        b.data.copy_from_device_async(a.data, a.nbytes)
        stop.record()
        stop.synchronize()
        if i >= 2:
            ts.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2.0 * a.nbytes / float(np.median(ts))
