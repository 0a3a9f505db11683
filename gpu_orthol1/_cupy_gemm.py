"""The GPU device's cuBLAS calls: the argument lists of its GEMMs, prepared and run.

`_GemmCalls` is a mixin of `_cupy.CupyDevice`: the strided GEMMs' argument lists prepared once per
shape (only the three addresses are filled per call), the pointer-array GEMMs' address arrays
written by a kernel in stream order and their argument lists, and the host scalars. It runs nothing
of its own choosing: `gpu_orthol1.testing.EmulatedGpuDevice` replaces its executors
(`_run_prepared`, `_fill_addresses`, `_pointer_gemm`) and runs the same argument sets on the CPU.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from . import _dtypes, _gemm, _ptx

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_F16 = np.dtype(np.float16)
_PREPARED_MAX = 256  # prepared GEMM argument sets kept per device (one plan: two per chunk position)


class _GemmCalls:
    """The cuBLAS GEMMs of `CupyDevice`. Its `__init__` sets what they read: `_cublas` (the ctypes
    calls), `_cb` (CuPy's constants), `_handle` and `_stream_ptr` (bound per call), `_dtype_enum`,
    `_compute` and `_tf32` (the compute types), `_alpha`/`_beta` (host scalars), `_prepared` (the
    kept argument lists), `_launch` (the kept kernels) and `_i64` (a Numba type)."""

    _cublas: Any
    _cb: Any
    _handle: int
    _stream_ptr: int
    _dtype_enum: dict
    _compute: dict
    _tf32: bool
    _alpha: dict
    _beta: dict
    _prepared: dict
    _launch: dict
    _i64: Any

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

    def _prepare(self, call: _gemm.Gemm, bufs: dict):
        """The argument list of one gemmStridedBatchedEx with the handle and the three operand
        addresses left to fill: (args, [(position, buffer key, byte offset)], coefficients). The
        coefficients live in host memory of their own, read by cuBLAS at each call (or recorded
        once by a graph capture), so a prepared call never changes under another."""
        A, B, C = bufs[call.a.buf], bufs[call.b.buf], bufs[call.c.buf]
        scal = np.float64 if C.dtype == _F64 else np.float32
        coef = np.array([call.alpha, call.beta], dtype=scal)
        en = self._dtype_enum
        args = [
            0,
            call.transa,
            call.transb,
            call.m,
            call.n,
            call.k,
            coef.ctypes.data,
            0,
            en[A.dtype.name],
            call.a.ld,
            call.a.stride,
            0,
            en[B.dtype.name],
            call.b.ld,
            call.b.stride,
            coef.ctypes.data + coef.itemsize,
            0,
            en[C.dtype.name],
            call.c.ld,
            call.c.stride,
            call.batch,
            self._compute_type(A.dtype, C.dtype),
            -1,
        ]
        slots = [
            (7, call.a.buf, call.a.offset * A.itemsize),
            (11, call.b.buf, call.b.offset * B.itemsize),
            (16, call.c.buf, call.c.offset * C.itemsize),
        ]
        return args, slots, coef

    def _run_prepared(self, prep, bufs: dict) -> None:
        template, slots, _coef = prep
        args = list(template)
        args[0] = self._handle
        for pos, key, off in slots:
            args[pos] = bufs[key].data.ptr + off
        self._cublas.gemmStridedBatchedEx(*args)

    def _strided_cached(self, key, make_call, bufs: dict) -> None:
        """A strided GEMM whose arguments (all but the addresses) are prepared once per `key`: a plan
        calls the same few GEMMs again and again, and building their argument sets cost more host
        time than handing them to cuBLAS (bench/results/gpu-h100-profile.txt)."""
        prep = self._prepared.get(key)
        if prep is None:
            if len(self._prepared) >= _PREPARED_MAX:
                self._prepared.clear()
            prep = self._prepared[key] = self._prepare(make_call(), bufs)
        self._run_prepared(prep, bufs)

    def _pointers(self, call: _gemm.BatchedGemm, bufs: dict, addrs) -> None:
        """One cuBLAS pointer-array GEMM over separate matrices, its A, B and C address arrays written
        into `addrs` (a uint64 buffer of the call's workspace) by a kernel, in stream order: no upload,
        no synchronization, nothing allocated, so `torch.cuda.graph` can capture it (the replay
        writes the same addresses again). float32/float64: ?gemmBatched; float16/bfloat16 operands
        (the Gram's C in float32): cublasGemmBatchedEx with a float32 compute type."""
        ptrs = _gemm.pointer_arrays(call, lambda k: _addr(bufs[k]), lambda k: _dtype(bufs[k]).itemsize)
        self._fill_addresses(addrs, ptrs)
        self._pointer_gemm(call, addrs, bufs)

    def _fill_addresses(self, addrs, ptrs: np.ndarray) -> None:
        """addrs[:ptrs.size] = ptrs (row by row), by `kernels.addresses` launches of SLOTS each."""
        from .kernels import addresses

        kern = self._launch.get("addresses")
        if kern is None:
            from numba import types

            sig = (
                _ptx.array_type(np.uint64, 1),
                self._i64,
                self._i64,
                types.UniTuple(types.uint64, addresses.SLOTS),
            )
            kern = self._launch["addresses"] = _ptx.kernel(addresses.get_fill_kernel(), sig)
        for first, count, vals in address_batches(ptrs, addresses.SLOTS):
            kern.launch(self._stream_ptr, 1, addresses.SLOTS, addrs, first, count, vals)

    def _pointer_args(self, call: _gemm.BatchedGemm, addrs, bufs) -> tuple[str, list]:
        """(cuBLAS function, its arguments) of a pointer-array GEMM whose address arrays are in
        `addrs` (A, B, C, `batch` entries each): ?gemmBatched for float32/float64 operands,
        gemmBatchedEx (16-bit A and B, float32 compute) for float16 and bfloat16, and for float32 under
        precision="tf32" (sgemmBatched has no compute type: it follows the handle's math mode, CuPy's
        shared handle's, not ours to set; the Ex call asks for TF32 on this call alone)."""
        t = call.template
        a_dt, c_dt = _dtype(bufs[call.a[0].buf]), _dtype(bufs[call.c[0].buf])
        base = _addr(addrs)
        bs = 8 * call.batch
        if isinstance(t.alpha, numbers.Real):
            alpha, beta = self._scalars(c_dt, t.alpha, t.beta)
        else:  # [alpha, beta] in device memory, in the scalar type of the compute type (`_pointer_gemm`)
            alpha = _addr(t.alpha)
            beta = alpha + (8 if c_dt == _F64 else 4)
        if a_dt == c_dt and (a_dt == _F64 or (a_dt == _F32 and not self._tf32)):
            name = "sgemmBatched" if a_dt == _F32 else "dgemmBatched"
            return name, [
                self._handle,
                t.transa,
                t.transb,
                t.m,
                t.n,
                t.k,
                alpha,
                base,
                t.a.ld,
                base + bs,
                t.b.ld,
                beta,
                base + 2 * bs,
                t.c.ld,
                call.batch,
            ]
        en = self._dtype_enum
        return "gemmBatchedEx", [
            self._handle,
            t.transa,
            t.transb,
            t.m,
            t.n,
            t.k,
            alpha,
            base,
            en[a_dt.name],
            t.a.ld,
            base + bs,
            en[_dtype(bufs[call.b[0].buf]).name],
            t.b.ld,
            beta,
            base + 2 * bs,
            en[c_dt.name],
            t.c.ld,
            call.batch,
            self._compute_type(a_dt, c_dt),
            -1,
        ]

    def _pointer_gemm(self, call: _gemm.BatchedGemm, addrs, bufs) -> None:
        name, args = self._pointer_args(call, addrs, bufs)
        fn = getattr(self._cublas, name)
        if isinstance(call.template.alpha, numbers.Real):
            fn(*args)
            return
        # [alpha, beta] in device memory (OrthoL1's weight), read when the GEMM runs: a graph's replay
        # applies the values written last. Device pointer mode for this call only (others pass host ones)
        cb, h = self._cublas, self._handle
        cb.setPointerMode(h, self._cb.CUBLAS_POINTER_MODE_DEVICE)
        try:
            fn(*args)
        finally:
            cb.setPointerMode(h, self._cb.CUBLAS_POINTER_MODE_HOST)


def address_batches(ptrs: np.ndarray, slots: int):
    """(first, count, `slots` values zero-padded) for each launch that stores `ptrs` (row by row)."""
    flat = ptrs.ravel().tolist()
    for first in range(0, len(flat), slots):
        vals = flat[first : first + slots]
        count = len(vals)
        yield first, count, tuple(vals + [0] * (slots - count))


def _addr(x) -> int:
    if hasattr(x, "data_ptr"):  # torch tensor
        return int(x.data_ptr())
    if isinstance(x, np.ndarray):  # host memory (pinned, or a test's stand-in for the GPU)
        return int(x.ctypes.data)
    return int(x.data.ptr)  # CuPy


_TORCH_NP: dict[str, np.dtype] = {
    "torch.float16": _F16,
    "torch.float32": _F32,
    "torch.float64": _F64,
    "torch.int16": _dtypes.BITS,
}


def _dtype(x) -> np.dtype:
    """x's dtype as NumPy's: a torch bfloat16 tensor is bfloat16 (ml_dtypes); CuPy's int16 carrier
    and a NumPy bfloat16 array keep their own (both read as CUDA_R_16BF)."""
    d = x.dtype
    if isinstance(d, np.dtype):
        return d
    if _dtypes.is_bf16(d):
        return _dtypes.bfloat16()
    return _TORCH_NP[str(d)]
