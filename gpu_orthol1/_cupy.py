"""The GPU device for `_driver.run`: cuBLAS GEMMs on CuPy's handle, our Numba CUDA kernels.

A plan makes one device and keeps it. `bind()` at the start of each call binds CuPy's cuBLAS
handle to CuPy's current stream (once per call, not per GEMM) and selects host pointer mode for
the scalars; `set_blas_workspace` then gives cuBLAS a workspace of the call's own, so that a
CUDA graph capture of the call never makes cuBLAS allocate. cuBLAS is called through ctypes
(`_cublas`: CuPy's wrappers refuse calls during a capture) with argument lists prepared once per
GEMM shape (only the three addresses are filled per call; `_cupy_gemm`), and the kernels are launched from PTX
compiled once per signature with a parameter block packed in one step (`_ptx`: Numba's dispatcher
cost about 0.2 ms per launch), both on CuPy's current stream. The loss is reduced by one kernel
launch (`loss_total`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import _dtypes, _gemm, _ptx
from ._cupy_gemm import _F32, _F64, _addr, _dtype, _GemmCalls
from ._driver import StridedChunk
from ._penalty import DEFAULT
from ._triangle import TriangleGram

if TYPE_CHECKING:
    from ._device import GpuDevice


def _cuda_enums():
    from cupy_backends.cuda.libs import cublas

    return cublas, dict(_dtypes.CUDA_ENUM)  # by dtype name: bfloat16 (or its int16 carrier) is 14


# cuBLAS's recommended workspace: 32 MiB on Hopper and later, 4 MiB before (cuBLAS docs, cublasSetWorkspace)
BLAS_WORKSPACE_BYTES = {True: 32 << 20, False: 4 << 20}


class _ElementwiseLaunches:
    """The launches of the elementwise pass (kernels/sign_abs.py) and of the loss reduction, kept per
    (kernel, n, variant, dtypes). CupyDevice's `__init__` sets what they read: `_mod` (the kernel
    module), `_max_block`, `_launch` (the kept launchers), `_i64`/`_f64`/`_bool` (Numba types) and
    `_stream_ptr` (the bound stream)."""

    _mod: Any
    _max_block: int
    _launch: dict
    _i64: Any
    _f64: Any
    _bool: Any
    _stream_ptr: int

    def sign_parts(self, n, variant):
        return self._mod.split(n, variant.flags()[2], self._max_block)[1]

    def _sign_sig(self, ws, sgn):
        A = _ptx.array_type
        return A(_dtype(ws), 2), A(_kernel_dtype(sgn), 2)

    def sign_abs(self, ws, sgn, n, losses, offset, scale, write_s, variant=DEFAULT, partials=None, tri=0):
        """tri > 0: the Gram holds only its upper blocks of tri x tri entries (`_triangle`)."""
        grid = ws.shape[0]
        sgn = bits_view(sgn)
        if partials is not None:
            self._sign_abs_split(ws, sgn, n, losses, offset, scale, write_s, variant, partials, tri)
            return
        key = ("sign", n, variant, _dtype(ws), _dtype(sgn), tri)
        hit = self._launch.get(key)
        if hit is None:
            l2, offdiag, normalize = variant.flags()
            tpb, ncol = self._mod.launch(n, normalize)
            g, s = self._sign_sig(ws, sgn)
            sig = (g, s, self._i64, _ptx.array_type(np.float64, 1), self._i64, self._f64, self._bool)
            bits = _dtype(sgn) == _dtypes.BITS
            kern = _ptx.kernel(self._mod.get_kernel(tpb, l2, offdiag, normalize, ncol, bits, tri), sig)
            hit = self._launch[key] = (kern, tpb)
        kern, tpb = hit
        # One block per slice (a fixed-order, atomic-free loss): a launch for a few slices has a
        # small grid by intent.
        kern.launch(self._stream_ptr, grid, tpb, ws, sgn, n, losses, offset, scale, write_s)

    def _sign_abs_split(self, ws, sgn, n, losses, offset, scale, write_s, variant, partials, tri=0):
        """Large slices: `parts` blocks per slice write partial sums, then one block per slice sums
        them in a fixed order and applies the NaN policy (kernels/sign_abs.py, `split`)."""
        grid = ws.shape[0]
        key = ("split", n, variant, _dtype(ws), _dtype(sgn), tri)
        hit = self._launch.get(key)
        if hit is None:
            l2, offdiag, _ = variant.flags()
            tpb, parts, per = self._mod.split(n, False, self._max_block)
            kp, kf = self._mod.get_split_kernels(tpb, l2, offdiag, _dtype(sgn) == _dtypes.BITS, tri)
            g, s = self._sign_sig(ws, sgn)
            f64_2d, f64_1d = _ptx.array_type(np.float64, 2), _ptx.array_type(np.float64, 1)
            i64, f64, b = self._i64, self._f64, self._bool
            part = _ptx.kernel(kp, (g, s, i64, f64_2d, i64, f64, b))
            fin = _ptx.kernel(kf, (s, i64, f64_2d, f64_1d, i64, b))
            hit = self._launch[key] = (part, fin, tpb, parts, per)
        part, fin, tpb, parts, per = hit
        part.launch(self._stream_ptr, grid * parts, tpb, ws, sgn, n, partials, per, scale, write_s)
        fin.launch(self._stream_ptr, grid, tpb, sgn, n, partials, losses, offset, write_s)

    def loss_total(self, losses, count, scale, out, each):
        """out[0] = scale * sum(losses[:count]) summed in a fixed order, or out[i] = scale * losses[i]
        when `each`; out is float32 or float64, rounded once. One launch on CuPy's current stream
        (it replaced a CuPy sum, a multiply and a cast: three launches, two of them cub's)."""
        key = ("total", bool(each), _dtype(out))
        kern = self._launch.get(key)
        if kern is None:
            sig = (_ptx.array_type(np.float64, 1), self._i64, self._f64, _ptx.array_type(_dtype(out), 1))
            kern = self._launch[key] = _ptx.kernel(
                self._mod.get_total_kernel(self._mod.TOTAL_THREADS, each), sig
            )
        tpb = self._mod.TOTAL_THREADS
        grid = -(-count // tpb) if each else 1
        if grid:
            kern(grid, tpb, losses, count, scale, out)


class CupyDevice(_ElementwiseLaunches, _GemmCalls, TriangleGram):
    folds_alpha = False  # alpha goes into the second GEMM: exact, and free
    fills_addresses = True  # pointer-array GEMMs read address arrays from the workspace ("addrs")
    blas_workspace_bytes = 0  # set per card in __init__
    _tf32 = False  # precision="tf32": float32 GEMMs on TF32 tensor cores (set in __init__)

    def __init__(self, precision: str = "highest"):
        import cupy

        from . import _cublas
        from .kernels import sign_abs

        self.xp = cupy
        cb, self._dtype_enum = _cuda_enums()
        self._cb = cb  # CuPy's constants; the calls go through ctypes
        self._cublas = _cublas.library()
        self._tf32 = precision == "tf32"  # float32 GEMMs on TF32 tensor cores
        self._compute = {
            "f64": cb.CUBLAS_COMPUTE_64F,
            "f32": cb.CUBLAS_COMPUTE_32F_FAST_TF32 if precision == "tf32" else cb.CUBLAS_COMPUTE_32F,
            "f16": cb.CUBLAS_COMPUTE_32F,
        }
        self._mod = sign_abs
        self._max_block = sign_abs.BLOCK_SIZES[-1]
        self._i64, self._f64, self._bool = _numba_types()
        self._handle = 0
        self._stream_ptr = 0
        self.blas_workspace_bytes = BLAS_WORKSPACE_BYTES[int(cupy.cuda.Device().compute_capability) >= 90]
        self._launch: dict = {}  # (kernel, n, variant, dtypes) -> (PtxKernel(s), threads, ...)
        self._prepared: dict = {}  # (which GEMM, layouts, chunk, sizes, coefficients) -> prepared arguments
        self._tri_prepared: dict = {}  # the triangle Gram's GemmBatchedEx arguments (`_triangle`)
        self._alpha = {np.float32: np.zeros((), np.float32), np.float64: np.zeros((), np.float64)}
        self._beta = {np.float32: np.zeros((), np.float32), np.float64: np.zeros((), np.float64)}

    @staticmethod
    def acc_dtype(dtype):
        return _F64 if dtype == _F64 else _F32

    @staticmethod
    def _addr_of(x) -> int:
        return _addr(x)

    @staticmethod
    def _dtype_of(x) -> np.dtype:
        return _dtype(x)

    @staticmethod
    def sign_dtype(dtype):
        # float16 S lets the gradient GEMM read two float16 operands (tensor cores); bfloat16 S the
        # same (cuBLAS takes A and B of one type): the signs are exact in both
        return dtype

    @staticmethod
    def extra_bytes_per_slice(l, n, dtype, want_grad, accumulate):
        return 0

    def bind(self, cublas=True):
        """Bind cuBLAS to CuPy's current stream (the kernels launch there too); once per plan call.
        cublas=False: only pick up the stream, for a call that makes no cuBLAS call (the fused kernel).
        Returns that stream."""
        cupy = self.xp
        stream = cupy.cuda.get_current_stream()
        self._stream_ptr = stream.ptr
        if not cublas:
            return stream
        self._handle = cupy.cuda.device.get_cublas_handle()
        cb = self._cublas
        cb.setStream(self._handle, stream.ptr)
        if cb.getPointerMode(self._handle) != self._cb.CUBLAS_POINTER_MODE_HOST:
            cb.setPointerMode(self._handle, self._cb.CUBLAS_POINTER_MODE_HOST)
        return stream

    def set_blas_workspace(self, buf):
        """cuBLAS works in `buf` (a buffer of this call's workspace; its default pool may allocate
        while a graph is being captured); None hands the handle back to that default pool
        (setStream resets it), since `buf` goes back to its allocator after the call."""
        if buf is None:
            self._cublas.setStream(self._handle, self._stream_ptr)
        else:
            self._cublas.setWorkspace(self._handle, _addr(buf), int(buf.shape[0]))

    @staticmethod
    def prepare(src, cc):
        return src

    def gram(self, src, cc, ws):
        if isinstance(src, StridedChunk):
            m_, l, n = src.arr.shape
            key = ("gram", src.lay, src.first, cc, l, n, _dtype(src.arr), _dtype(ws))
            self._strided_cached(
                key, lambda: _gemm.gram_call(src.lay, src.first, cc, l, n), {"phi": src.arr, "ws": ws}
            )
        else:
            l, n = src.mats[0].shape
            bufs = {("p", k): a for k, a in enumerate(src.mats)}
            bufs["ws"] = ws
            refs = [_gemm.Ref(("p", k), 0) for k in range(cc)]
            self._pointers(_gemm.gram_batched(src.lay, refs, 0, l, n), bufs, src.addrs)

    def grad(self, src, dst, cc, sgn, alpha, beta):
        if isinstance(src, StridedChunk):
            m_, l, n = src.arr.shape
            key = (
                "grad",
                src.lay,
                src.first,
                dst.lay,
                dst.first,
                cc,
                l,
                n,
                alpha,
                beta,
                _dtype(src.arr),
                _dtype(sgn),
                _dtype(dst.arr),
            )
            self._strided_cached(
                key,
                lambda: _gemm.grad_call(src.lay, src.first, dst.lay, dst.first, cc, l, n, alpha, beta),
                {"phi": src.arr, "sgn": sgn, "out": dst.arr},
            )
        else:
            l, n = src.mats[0].shape
            bufs = {("p", k): a for k, a in enumerate(src.mats)}
            bufs.update({("o", k): a for k, a in enumerate(dst.mats)})
            bufs["sgn"] = sgn
            call = _gemm.grad_batched(
                src.lay,
                [_gemm.Ref(("p", k), 0) for k in range(cc)],
                dst.lay,
                [_gemm.Ref(("o", k), 0) for k in range(cc)],
                0,
                l,
                n,
                alpha,
                beta,
            )
            self._pointers(call, bufs, src.addrs)

    def fused_launcher(self, cfg, V, Vout, losses, write_grad):
        """The one-launch small-slice kernel (no workspace) for (m, l, n) views of any strides shaped,
        strided and typed like V and Vout, and per-slice `losses` like these: a function
        go(phi_addr, out_addr, losses_addr, alpha, accumulate) that launches it on the stream bound
        last, packing only the addresses and the two scalars (`_ptx.BoundLaunch`). Vout is not
        touched when write_grad is false (pass phi's address as out_addr)."""
        from .kernels import fused_small

        m = V.shape[0]
        out = Vout if write_grad else V
        key = ("fused", cfg, _dtype(V), _dtype(out))
        kern = self._launch.get(key)
        if kern is None:
            A = _ptx.array_type
            sig = (
                A(_dtype(V), 3, "A"),
                A(_dtype(out), 3, "A"),
                A(np.float64, 1),
                self._i64,
                _ptx_float(cfg.acc),
                self._bool,
                self._bool,
            )
            kern = self._launch[key] = _ptx.kernel(fused_small.get_fused_kernel(cfg), sig)
        bound = _ptx.BoundLaunch(
            kern, m, cfg.threads, (V, out, losses, 0, 0.0, False, bool(write_grad)), variable=(0, 1, 2, 4, 5)
        )

        def go(phi_addr, out_addr, losses_addr, alpha, accumulate):
            bound.launch(self._stream_ptr, phi_addr, out_addr, losses_addr, alpha, accumulate)

        return go


if TYPE_CHECKING:
    _check: GpuDevice = CupyDevice()  # mypy checks the device interface here


def _numba_types():
    from numba import types

    return types.int64, types.float64, types.boolean


def _ptx_float(name):
    from numba import types

    return getattr(types, name)


def _kernel_dtype(x) -> np.dtype:
    """The dtype a Numba kernel is compiled for: bfloat16 as its int16 carrier."""
    d = _dtype(x)
    return _dtypes.BITS if _dtypes.is_bf16(d) else d


def bits_view(x):
    """x itself, or for bfloat16 the int16 view of its memory that the sign kernel writes (Numba has no
    bfloat16): `.view` of a NumPy array (the emulator) or a torch tensor, the same memory."""
    if not _dtypes.is_bf16(x.dtype):
        return x
    if isinstance(x, np.ndarray):
        return x.view(_dtypes.BITS)
    import torch  # only a torch tensor or an ml_dtypes array is bfloat16 here

    return x.view(torch.int16)
