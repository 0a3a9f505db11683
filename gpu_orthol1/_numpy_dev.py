"""The CPU device for `_driver.run`: NumPy (BLAS) matmul on the slice views, the Numba CPU fused pass.

The GEMMs run on the (count, l, n) views of the caller's memory directly: NumPy hands
BLAS-readable strides to BLAS without copying. (The column-major argument sets of the GPU
path are checked by `gpu_orthol1.testing`'s emulator, off the hot path.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ._driver import PointerChunk, StridedChunk
from ._penalty import DEFAULT

if TYPE_CHECKING:
    from ._device import Device

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


class NumpyDevice:
    xp = np
    folds_alpha = True  # S carries alpha: no extra pass over the gradient
    blas_workspace_bytes = 0  # NumPy's BLAS manages its own

    def __init__(self):
        from .kernels import sign_abs_cpu

        self._kernel = sign_abs_cpu.sign_abs_sum
        self._variant_kernel = sign_abs_cpu.sign_abs_variant

    @staticmethod
    def sign_abs_metrics(ws, sgn, n, losses, offset, scale, write_s, max_cos, fro, mean_abs):
        """The default pass (`sign_abs`) with the orthogonality metrics of each slice computed in the
        same loop (`_driver.MetricsHook`); the losses and S are those of `sign_abs`, bit for bit."""
        from .kernels import metrics_cpu

        metrics_cpu.sign_abs_metrics(ws, sgn, n, losses, offset, scale, write_s, max_cos, fro, mean_abs)

    @staticmethod
    def acc_dtype(dtype):
        return _F64 if dtype == _F64 else _F32

    sign_dtype = acc_dtype  # S in the Gram buffer, in place: NumPy computes float16 in float32 anyway

    @staticmethod
    def extra_bytes_per_slice(l, n, dtype, want_grad, accumulate):
        if dtype.itemsize == 2:  # float32 copies of the phi chunk and of the gradient chunk
            return 2 * l * n * 4
        if want_grad and accumulate:  # matmul has no beta: product, then add
            return l * n * dtype.itemsize
        return 0

    @staticmethod
    def prepare(src, cc):
        """float16 and bfloat16 chunks as float32 (NumPy's float16 matmul does not use BLAS; bfloat16
        has no matmul), read by both GEMMs: one chunk at a time, never the whole input."""
        if isinstance(src, StridedChunk):
            if src.arr.dtype.itemsize != 2:
                return src
            return StridedChunk(src.arr[src.first : src.first + cc].astype(_F32), src.lay, 0)
        if src.mats[0].dtype.itemsize != 2:
            return src
        return replace(src, mats=tuple(a.astype(_F32) for a in src.mats))

    @staticmethod
    def gram(src, cc, ws):
        if isinstance(src, StridedChunk):
            n = src.arr.shape[2]
            G = ws[:cc].reshape(cc, n, n)
            V = src.arr[src.first : src.first + cc]
            np.matmul(V.transpose(0, 2, 1), V, out=G)
        else:
            n = src.mats[0].shape[1]
            G = ws[:cc].reshape(cc, n, n)
            for k, a in enumerate(src.mats):
                np.matmul(a.T, a, out=G[k])

    @staticmethod
    def grad(src, dst, cc, sgn, alpha, beta):
        # alpha is 1 here (folds_alpha: S already holds 2 beta sign(G - I))
        n = dst.mats[0].shape[1] if isinstance(dst, PointerChunk) else dst.arr.shape[2]
        S = sgn[:cc].reshape(cc, n, n)
        if isinstance(src, StridedChunk):
            _matmul_into(src.arr[src.first : src.first + cc], S, dst.arr[dst.first : dst.first + cc], beta)
        else:
            for k, (a, o) in enumerate(zip(src.mats, dst.mats, strict=True)):
                _matmul_into(a, S[k], o, beta)

    @staticmethod
    def set_blas_workspace(buf):
        pass  # never asked: blas_workspace_bytes is 0

    @staticmethod
    def sign_parts(n, variant):
        return 1  # one slice, one call of the CPU pass

    def sign_abs(self, ws, sgn, n, losses, offset, scale, write_s, variant=DEFAULT, partials=None):
        if variant.is_default:
            self._kernel(ws, sgn, n, losses, offset, scale, write_s)
        else:
            self._variant_kernel(ws, sgn, n, losses, offset, scale, write_s, *variant.flags())


if TYPE_CHECKING:
    _check: Device = NumpyDevice()  # mypy checks the device interface here


def _matmul_into(a, s, o, beta):
    if beta == 0.0 and o.dtype == a.dtype:
        np.matmul(a, s, out=o)
        return
    prod = np.matmul(a, s)
    if beta == 0.0:
        o[...] = prod
    elif o.dtype != prod.dtype:  # a 16-bit gradient: add in float32, round once (bfloat16 += float32
        prod += o if beta == 1.0 else beta * o.astype(prod.dtype)  # is no NumPy same_kind cast)
        o[...] = prod
    elif beta == 1.0:
        o += prod
    else:
        o *= beta
        o += prod
