"""NumPy devices for `_driver.run`: the CPU backend, and the emulated GPU used by the tests.

Both execute the very `Gemm` argument sets that the GPU backend hands to
cuBLAS, by reading the buffers column-major through `as_strided`, exactly as
cuBLAS would: a wrong leading dimension, stride or offset gives a wrong
result on the CPU too, so CI checks the GPU path's arithmetic on every run.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._gemm import OP_N, Gemm, Operand

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def _colmajor(arr, op: Operand, rows: int, cols: int, batch: int, writeable=False):
    """The batch of rows x cols column-major matrices cuBLAS would see at (op.offset, op.ld, op.stride)."""
    isz = arr.dtype.itemsize
    # as_strided keeps arr's data pointer (its first element); move it by offset elements.
    start = as_strided(arr, shape=(op.offset + 1,), strides=(isz,), writeable=writeable)[op.offset:]
    return as_strided(start, shape=(batch, rows, cols), strides=(op.stride * isz, isz, op.ld * isz),
                      writeable=writeable)


def _t(x):
    return x.swapaxes(1, 2)


def numpy_gemm(call: Gemm, bufs: dict) -> None:
    """Execute one strided-batched GEMM like cuBLAS: float32 compute for float16/32, float64 for float64."""
    A, B, C = bufs[call.a.buf], bufs[call.b.buf], bufs[call.c.buf]
    ar, ac = (call.m, call.k) if call.transa == OP_N else (call.k, call.m)
    br, bc = (call.k, call.n) if call.transb == OP_N else (call.n, call.k)
    a = _colmajor(A, call.a, ar, ac, call.batch)
    b = a if call.b == call.a and B is A and (br, bc) == (ar, ac) else _colmajor(B, call.b, br, bc, call.batch)
    c = _colmajor(C, call.c, call.m, call.n, call.batch, writeable=True)
    cdt = _F64 if C.dtype == _F64 else _F32
    if a.dtype != cdt:
        a32 = a.astype(cdt)
        b = a32 if b is a else b.astype(cdt, copy=False)  # no copy when S is already float32
        a = a32
    elif b.dtype != cdt:
        b = b.astype(cdt)
    opa = a if call.transa == OP_N else _t(a)
    opb = b if call.transb == OP_N else _t(b)
    # C is column-major, so C^T is row-major: hand NumPy C^T = op(B)^T op(A)^T, the order its BLAS path likes.
    ct = _t(c)
    if call.alpha == 1.0 and call.beta == 0.0 and c.dtype == cdt:
        np.matmul(_t(opb), _t(opa), out=ct)
        return
    prod = np.matmul(_t(opb), _t(opa))
    if call.alpha != 1.0:
        prod *= call.alpha
    if call.beta != 0.0:
        prod += call.beta * ct if call.beta != 1.0 else ct
    ct[...] = prod


class NumpyDevice:
    """The CPU backend: NumPy (BLAS) batched matmul on strided views and the Numba CPU fused pass."""

    xp = np
    folds_alpha = True

    def __init__(self):
        from .kernels import sign_abs_cpu

        self._kernel = sign_abs_cpu.sign_abs_sum

    @staticmethod
    def acc_dtype(dtype):
        return _F64 if dtype == _F64 else _F32

    sign_dtype = acc_dtype  # S in the Gram buffer, in place: NumPy computes float16 in float32 anyway

    @staticmethod
    def extra_bytes_per_slice(l, n, dtype, want_grad, accumulate):
        extra = 0
        if dtype.itemsize == 2:  # float32 copies of the phi chunk and of the gradient chunk
            extra += 2 * l * n * 4
        elif want_grad and accumulate:  # matmul has no beta: product, then add
            extra += l * n * dtype.itemsize
        return extra

    gemm = staticmethod(numpy_gemm)

    def sign_abs(self, ws, sgn, n, losses, offset, scale, write_s):
        self._kernel(ws, sgn, n, losses, offset, scale, write_s)


class EmulatedGpuDevice(NumpyDevice):
    """The GPU backend's logic on the CPU: its GEMM argument sets, its dtypes, and the CUDA
    kernel itself run by numba's simulator (NUMBA_ENABLE_CUDASIM=1 must be set before
    numba.cuda is first imported). Slow; for tests on small shapes."""

    folds_alpha = False

    def __init__(self, max_block=8):
        from numba import config

        if not config.ENABLE_CUDASIM:
            raise RuntimeError("EmulatedGpuDevice needs NUMBA_ENABLE_CUDASIM=1 set before numba.cuda is imported")
        from .kernels import sign_abs

        self._mod = sign_abs
        self._max_block = max_block

    @staticmethod
    def sign_dtype(dtype):
        return dtype  # as on the GPU: S in phi's dtype, so the second GEMM reads matching types

    @staticmethod
    def extra_bytes_per_slice(l, n, dtype, want_grad, accumulate):
        return 0  # the GPU's own figures: cuBLAS needs no temporaries

    def sign_abs(self, ws, sgn, n, losses, offset, scale, write_s):
        tpb = min(self._mod.pick_block_size(n), self._max_block)
        self._mod.get_kernel(tpb)[ws.shape[0], tpb](ws, sgn, n, losses, offset, scale, write_s)
