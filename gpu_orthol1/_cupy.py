"""The GPU device for `_driver.run`: cuBLAS GEMMs through CuPy, the Numba CUDA kernel.

A plan makes one device and keeps it: the cuBLAS handle, the kernel objects and their
launch configurations are looked up once. `bind()` at the start of each call binds the
handle to CuPy's current stream (once per call, not per GEMM) and selects host pointer
mode for the scalars; the kernel launches on the same stream through
`numba.cuda.external_stream`. Arrays reach Numba through `from_cuda_array_interface(...,
sync=False)`: the default conversion synchronizes the stream named in the interface, a
host stall per launch that the stream ordering already makes unnecessary.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np

from . import _gemm
from ._driver import StridedChunk
from ._penalty import DEFAULT

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_F16 = np.dtype(np.float16)
_PTR_CACHE_MAX = 64


def _cuda_enums():
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas

    dtype_enum = {_F32: runtime.CUDA_R_32F, _F64: runtime.CUDA_R_64F, _F16: runtime.CUDA_R_16F}
    return cublas, dtype_enum


class CupyDevice:
    folds_alpha = False  # alpha goes into the second GEMM: exact, and free

    def __init__(self, precision: str = "highest"):
        import cupy
        from numba import cuda

        from .kernels import sign_abs

        self.xp = cupy
        self._cublas, self._dtype_enum = _cuda_enums()
        cb = self._cublas
        self._compute = {"f64": cb.CUBLAS_COMPUTE_64F,
                         "f32": cb.CUBLAS_COMPUTE_32F_FAST_TF32 if precision == "tf32" else cb.CUBLAS_COMPUTE_32F,
                         "f16": cb.CUBLAS_COMPUTE_32F}
        self._cuda = cuda
        self._mod = sign_abs
        self._max_block = sign_abs.BLOCK_SIZES[-1]
        self._handle = 0
        self._stream_ptr = None
        self._nb_stream = None
        self._launch: dict = {}  # (n, grid) -> configured Numba kernel
        self._ptr_cache: dict = {}
        self._alpha = {np.float32: np.zeros((), np.float32), np.float64: np.zeros((), np.float64)}
        self._beta = {np.float32: np.zeros((), np.float32), np.float64: np.zeros((), np.float64)}

    @staticmethod
    def acc_dtype(dtype):
        return _F64 if dtype == _F64 else _F32

    @staticmethod
    def sign_dtype(dtype):
        return dtype  # float16 S lets the gradient GEMM read two float16 operands (tensor cores)

    @staticmethod
    def extra_bytes_per_slice(l, n, dtype, want_grad, accumulate):
        return 0

    def bind(self):
        """Bind cuBLAS and the kernel launches to CuPy's current stream; call once per plan call."""
        cupy = self.xp
        stream = cupy.cuda.get_current_stream()
        self._handle = cupy.cuda.device.get_cublas_handle()
        cb = self._cublas
        cb.setStream(self._handle, stream.ptr)
        if cb.getPointerMode(self._handle) != cb.CUBLAS_POINTER_MODE_HOST:
            cb.setPointerMode(self._handle, cb.CUBLAS_POINTER_MODE_HOST)
        if stream.ptr != self._stream_ptr:
            self._stream_ptr = stream.ptr
            self._nb_stream = self._cuda.external_stream(stream.ptr) if stream.ptr else self._cuda.default_stream()
            self._launch.clear()

    @staticmethod
    def prepare(src, cc):
        return src

    def _scalars(self, C_dtype, alpha, beta):
        scal = np.float64 if C_dtype == _F64 else np.float32
        a, b = self._alpha[scal], self._beta[scal]
        a[()] = alpha
        b[()] = beta
        return a.ctypes.data, b.ctypes.data

    def _compute_type(self, A_dtype, C_dtype):
        if C_dtype == _F64:
            return self._compute["f64"]
        return self._compute["f32"] if A_dtype == _F32 else self._compute["f16"]

    def _strided(self, call: _gemm.Gemm, bufs: dict) -> None:
        A, B, C = bufs[call.a.buf], bufs[call.b.buf], bufs[call.c.buf]
        alpha, beta = self._scalars(C.dtype, call.alpha, call.beta)
        en = self._dtype_enum
        self._cublas.gemmStridedBatchedEx(
            self._handle, call.transa, call.transb, call.m, call.n, call.k, alpha,
            A.data.ptr + call.a.offset * A.itemsize, en[A.dtype], call.a.ld, call.a.stride,
            B.data.ptr + call.b.offset * B.itemsize, en[B.dtype], call.b.ld, call.b.stride,
            beta,
            C.data.ptr + call.c.offset * C.itemsize, en[C.dtype], call.c.ld, call.c.stride,
            call.batch, self._compute_type(A.dtype, C.dtype), -1,
        )

    def _pointers(self, call: _gemm.BatchedGemm, bufs: dict) -> None:
        """One cuBLAS ?gemmBatched over separate matrices. cupy_backends exposes the pointer-array
        GEMM only as sgemmBatched/dgemmBatched (no gemmBatchedEx): float32 or float64 operands."""
        cb = self._cublas
        dt = _dtype(bufs[call.c[0].buf])
        if dt == _F32:
            fn = cb.sgemmBatched
        elif dt == _F64:
            fn = cb.dgemmBatched
        else:
            raise TypeError(f"the pointer-array GEMM takes float32 or float64 operands, not {dt}")
        ptrs = _gemm.pointer_arrays(call, lambda k: _addr(bufs[k]), lambda k: _dtype(bufs[k]).itemsize)
        base = self._upload(ptrs)
        bs = 8 * call.batch
        t = call.template
        alpha, beta = self._scalars(dt, t.alpha, t.beta)
        fn(self._handle, t.transa, t.transb, t.m, t.n, t.k, alpha, base, t.a.ld,
           base + bs, t.b.ld, beta, base + 2 * bs, t.c.ld, call.batch)

    def _upload(self, ptrs: np.ndarray) -> int:
        """Device address of a copy of `ptrs`, cached by content: parameters keep their addresses from
        step to step, so a training loop uploads each address array once. The upload waits for its
        copy once, so the cached array is then safe from any stream, and a CUDA graph captured later
        (on a capture stream of its own) finds it without copying during the capture."""
        cupy = self.xp
        key = (ptrs.shape, ptrs.tobytes())
        hit = self._ptr_cache.get(key)
        if hit is None:
            if len(self._ptr_cache) >= _PTR_CACHE_MAX:
                self._ptr_cache.clear()
            hit = cupy.asarray(ptrs.view(np.int64))
            cupy.cuda.get_current_stream().synchronize()
            self._ptr_cache[key] = hit
        return hit.data.ptr

    def gram(self, src, cc, ws):
        if isinstance(src, StridedChunk):
            m_, l, n = src.arr.shape
            self._strided(_gemm.gram_call(src.lay, src.first, cc, l, n), {"phi": src.arr, "ws": ws})
        else:
            l, n = src.mats[0].shape
            bufs = {("p", k): a for k, a in enumerate(src.mats)}
            bufs["ws"] = ws
            refs = [_gemm.Ref(("p", k), 0) for k in range(cc)]
            self._pointers(_gemm.gram_batched(src.lay, refs, 0, l, n), bufs)

    def grad(self, src, dst, cc, sgn, alpha, beta):
        if isinstance(src, StridedChunk):
            m_, l, n = src.arr.shape
            call = _gemm.grad_call(src.lay, src.first, dst.lay, dst.first, cc, l, n, alpha, beta)
            self._strided(call, {"phi": src.arr, "sgn": sgn, "out": dst.arr})
        else:
            l, n = src.mats[0].shape
            bufs = {("p", k): a for k, a in enumerate(src.mats)}
            bufs.update({("o", k): a for k, a in enumerate(dst.mats)})
            bufs["sgn"] = sgn
            call = _gemm.grad_batched(src.lay, [_gemm.Ref(("p", k), 0) for k in range(cc)], dst.lay,
                                      [_gemm.Ref(("o", k), 0) for k in range(cc)], 0, l, n, alpha, beta)
            self._pointers(call, bufs)

    def fused(self, cfg, V, Vout, losses, alpha, accumulate, write_grad):
        """The one-launch small-slice kernel over (m, l, n) views of any strides: no workspace."""
        from .kernels import fused_small

        m = V.shape[0]
        key = ("fused", cfg, m)
        kern = self._launch.get(key)
        if kern is None:
            kern = self._launch[key] = fused_small.get_fused_kernel(cfg)[m, cfg.threads, self._nb_stream]
        v = self._nb(V)
        o = self._nb(Vout) if write_grad else v  # loss only: out is not touched
        scal = np.float64 if cfg.acc == "float64" else np.float32
        with _quiet_small_grid(m):
            kern(v, o, self._nb(losses), 0, scal(alpha), bool(accumulate), bool(write_grad))

    def _nb(self, arr):
        return self._cuda.from_cuda_array_interface(arr.__cuda_array_interface__, owner=arr, sync=False)

    def sign_parts(self, n, variant):
        return self._mod.split(n, variant.flags()[2], self._max_block)[1]

    def sign_abs(self, ws, sgn, n, losses, offset, scale, write_s, variant=DEFAULT, partials=None):
        grid = ws.shape[0]
        if partials is not None:
            self._sign_abs_split(ws, sgn, n, losses, offset, scale, write_s, variant, partials)
            return
        kern = self._launch.get((n, grid, variant))
        if kern is None:
            l2, offdiag, normalize = variant.flags()
            tpb, ncol = self._mod.launch(n, normalize)
            kern = self._launch[(n, grid, variant)] = self._mod.get_kernel(tpb, l2, offdiag, normalize, ncol)[
                grid, tpb, self._nb_stream]
        g = self._nb(ws)
        s = g if sgn is ws else self._nb(sgn)
        # One block per slice is the design (a fixed-order, atomic-free loss), so a launch for a
        # few slices has a small grid by intent: silence Numba's low-occupancy warning for it.
        with _quiet_small_grid(grid):
            kern(g, s, n, self._nb(losses), offset, scale, bool(write_s))

    def _sign_abs_split(self, ws, sgn, n, losses, offset, scale, write_s, variant, partials):
        """Large slices: `parts` blocks per slice write partial sums, then one block per slice sums
        them in a fixed order and applies the NaN policy (kernels/sign_abs.py, `split`)."""
        grid = ws.shape[0]
        key = ("split", n, grid, variant)
        hit = self._launch.get(key)
        if hit is None:
            l2, offdiag, _ = variant.flags()
            tpb, parts, per = self._mod.split(n, False, self._max_block)
            kp, kf = self._mod.get_split_kernels(tpb, l2, offdiag)
            hit = self._launch[key] = (kp[grid * parts, tpb, self._nb_stream], kf[grid, tpb, self._nb_stream], per)
        kp, kf, per = hit
        g = self._nb(ws)
        s = g if sgn is ws else self._nb(sgn)
        pb = self._nb(partials)
        with _quiet_small_grid(grid):
            kp(g, s, n, pb, per, scale, bool(write_s))
            kf(s, n, pb, self._nb(losses), offset, bool(write_s))


@contextmanager
def _quiet_small_grid(grid):
    """Numba warns of low occupancy when a grid has fewer blocks than twice the SMs (under 1024 on
    any card): silence that warning around our own small launches only; large grids skip the
    warnings context."""
    if grid >= 1024:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grid size .* will likely result in GPU under-utilization")
        yield


def _addr(x) -> int:
    if hasattr(x, "data_ptr"):  # torch tensor
        return int(x.data_ptr())
    if isinstance(x, np.ndarray):  # host memory (pinned, or a test's stand-in for the GPU)
        return int(x.ctypes.data)
    return int(x.data.ptr)  # CuPy


_TORCH_NP: dict[str, np.dtype] = {"torch.float16": _F16, "torch.float32": _F32, "torch.float64": _F64}


def _dtype(x) -> np.dtype:
    d = x.dtype
    if isinstance(d, np.dtype):
        return d
    return _TORCH_NP[str(d)]
