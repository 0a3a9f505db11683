"""The GPU device for `_driver.run`: cuBLAS strided-batched GEMMs through CuPy, the Numba CUDA kernel.

Everything runs on CuPy's current stream: cuBLAS is bound to it before each
call, and the kernel is launched on it through `numba.cuda.external_stream`.
Arrays reach Numba through `from_cuda_array_interface(..., sync=False)`: the
default conversion synchronizes the stream named in the interface, a host
stall per launch that the stream ordering already makes unnecessary.
"""

from __future__ import annotations

import warnings

import numpy as np

from ._gemm import Gemm

# One block per slice is the design (a fixed-order, atomic-free loss), so a launch for a
# few slices has a small grid by intent; Numba's low-occupancy warning would fire on it
# at every call.
warnings.filterwarnings("ignore", message="Grid size .* will likely result in GPU under-utilization")

_CUDA_TYPE = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2}
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_POINTER_MODE_HOST = 0
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


class CupyDevice:
    folds_alpha = False  # alpha goes into the second GEMM: exact, and free

    def __init__(self, precision: str = "highest"):
        import cupy
        from cupy_backends.cuda.libs import cublas
        from numba import cuda

        from .kernels import sign_abs

        self.xp = cupy
        self._cublas = cublas
        self._cuda = cuda
        self._mod = sign_abs
        self._tf32 = precision == "tf32"
        stream = cupy.cuda.get_current_stream()
        self._handle = cupy.cuda.device.get_cublas_handle()
        cublas.setStream(self._handle, stream.ptr)
        self._nb_stream = cuda.external_stream(stream.ptr) if stream.ptr else cuda.default_stream()

    @staticmethod
    def acc_dtype(dtype):
        return _F64 if dtype == _F64 else _F32

    @staticmethod
    def sign_dtype(dtype):
        return dtype  # float16 S lets the gradient GEMM read two float16 operands (tensor cores)

    @staticmethod
    def extra_bytes_per_slice(l, n, dtype, want_grad, accumulate):
        return 0

    def gemm(self, call: Gemm, bufs: dict) -> None:
        A, B, C = bufs[call.a.buf], bufs[call.b.buf], bufs[call.c.buf]
        scal: type[np.floating]
        if C.dtype == _F64:
            compute, scal = _COMPUTE_64F, np.float64
        else:
            compute = _COMPUTE_32F_FAST_TF32 if (self._tf32 and A.dtype == _F32) else _COMPUTE_32F
            scal = np.float32
        alpha = np.array(call.alpha, dtype=scal)
        beta = np.array(call.beta, dtype=scal)
        cb = self._cublas
        mode = cb.getPointerMode(self._handle)
        if mode != _POINTER_MODE_HOST:
            cb.setPointerMode(self._handle, _POINTER_MODE_HOST)
        try:
            cb.gemmStridedBatchedEx(
                self._handle, call.transa, call.transb, call.m, call.n, call.k,
                alpha.ctypes.data,
                A.data.ptr + call.a.offset * A.itemsize, _CUDA_TYPE[A.dtype], call.a.ld, call.a.stride,
                B.data.ptr + call.b.offset * B.itemsize, _CUDA_TYPE[B.dtype], call.b.ld, call.b.stride,
                beta.ctypes.data,
                C.data.ptr + call.c.offset * C.itemsize, _CUDA_TYPE[C.dtype], call.c.ld, call.c.stride,
                call.batch, compute, -1,
            )
        finally:
            if mode != _POINTER_MODE_HOST:
                cb.setPointerMode(self._handle, mode)

    def _nb(self, arr):
        return self._cuda.from_cuda_array_interface(arr.__cuda_array_interface__, owner=arr, sync=False)

    def sign_abs(self, ws, sgn, n, losses, offset, scale, write_s):
        tpb = self._mod.pick_block_size(n)
        kern = self._mod.get_kernel(tpb)
        g = self._nb(ws)
        s = g if sgn is ws else self._nb(sgn)
        kern[ws.shape[0], tpb, self._nb_stream](g, s, n, self._nb(losses), offset, scale, bool(write_s))
