"""Test scaffolding: the GPU path's logic on a CPU. Nothing at runtime imports this module.

`EmulatedGpuDevice` is `_cupy.CupyDevice` with its two executors swapped: the very cuBLAS
argument sets (strided-batched `Gemm`s and pointer-array `BatchedGemm`s) are executed over
NumPy buffers the way cuBLAS reads memory (column-major through `as_strided`, raw addresses
resolved back to buffers), and the CUDA kernel runs under numba's simulator. A wrong leading
dimension, stride, offset or address gives a wrong result here too, so CI checks the GPU
path's arithmetic on every run. Slow: for tests on small shapes.

    from gpu_orthol1 import testing
    plan = gpu_orthol1.plan(phi, backend="numpy", _device=testing.EmulatedGpuDevice())
"""

from __future__ import annotations

import numbers
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _gemm
from ._cupy import CupyDevice, _addr, address_batches
from ._gemm import OP_N, Gemm, Operand
from ._penalty import DEFAULT

if TYPE_CHECKING:
    from ._device import GpuDevice

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def _colmajor(arr, op: Operand, rows: int, cols: int, batch: int, writeable=False):
    """The batch of rows x cols column-major matrices cuBLAS would see at (op.offset, op.ld, op.stride)."""
    isz = arr.dtype.itemsize
    # as_strided keeps arr's data pointer (its first element); move it by offset elements.
    start = as_strided(arr, shape=(op.offset + 1,), strides=(isz,), writeable=writeable)[op.offset :]
    return as_strided(
        start, shape=(batch, rows, cols), strides=(op.stride * isz, isz, op.ld * isz), writeable=writeable
    )


def _t(x):
    return x.swapaxes(1, 2)


def emulate_gemm(call: Gemm, bufs: dict) -> None:
    """Execute one strided-batched GEMM like cuBLAS: float32 compute for float16/32, float64 for float64."""
    A, B, C = bufs[call.a.buf], bufs[call.b.buf], bufs[call.c.buf]
    ar, ac = (call.m, call.k) if call.transa == OP_N else (call.k, call.m)
    br, bc = (call.k, call.n) if call.transb == OP_N else (call.n, call.k)
    a = _colmajor(A, call.a, ar, ac, call.batch)
    b = _colmajor(B, call.b, br, bc, call.batch)
    c = _colmajor(C, call.c, call.m, call.n, call.batch, writeable=True)
    cdt = _F64 if C.dtype == _F64 else _F32
    opa = (a if call.transa == OP_N else _t(a)).astype(cdt)
    opb = (b if call.transb == OP_N else _t(b)).astype(cdt)
    prod = np.matmul(opa, opb)
    if call.alpha != 1.0:
        prod *= call.alpha
    if call.beta != 0.0:
        prod += call.beta * c
    c[...] = prod


def emulate_pointer_gemm(call: _gemm.BatchedGemm, ptrs: np.ndarray, bufs: dict) -> None:
    """Execute a pointer-array GEMM as cuBLAS would: resolve each raw address in `ptrs` back to a
    (NumPy) buffer and element offset, then run that entry. A wrong address fails or misreads here."""
    resolve = _resolver(bufs)
    t = call.template
    for e in range(call.batch):
        a, b, c = (resolve(int(ptrs[r, e])) for r in range(3))
        emulate_gemm(
            replace(
                t,
                a=Operand(a.buf, a.offset, t.a.ld, 0),
                b=Operand(b.buf, b.offset, t.b.ld, 0),
                c=Operand(c.buf, c.offset, t.c.ld, 0),
                batch=1,
            ),
            bufs,
        )


# cuBLAS's values of the enums the GPU device passes (cudaDataType, cublasComputeType_t)
CUDA_DTYPE = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2}
COMPUTE_32F, COMPUTE_64F = 68, 70
HANDLE = 0x5A5A  # the emulator's stand-in for a cuBLAS handle


def _resolver(bufs: dict):
    """address -> Ref(buffer key, element offset) over NumPy buffers; a stray address fails."""
    spans, seen = [], set()
    for key, arr in bufs.items():
        lo = arr.ctypes.data
        hi = (
            lo
            + max(0, sum((s - 1) * st for s, st in zip(arr.shape, arr.strides, strict=True) if s))
            + arr.itemsize
        )
        if (lo, hi, arr.itemsize) not in seen:  # "sgn" may be "ws" itself (S written in place)
            seen.add((lo, hi, arr.itemsize))
            spans.append((lo, hi, key, arr.itemsize))

    def resolve(p: int) -> _gemm.Ref:
        hits = [(lo, key, isz) for lo, hi, key, isz in spans if lo <= p < hi]
        if len(hits) > 1:  # the slices of one stack overlap in extent: the matrix that starts here
            hits = [h for h in hits if h[0] == p]
        if len(hits) != 1:
            raise AssertionError(f"address {p:#x} lies in {len(hits)} buffers")
        lo, key, isz = hits[0]
        if (p - lo) % isz:
            raise AssertionError(f"address {p:#x} is not element-aligned in buffer {key!r}")
        return _gemm.Ref(key, (p - lo) // isz)

    return resolve


def gemm_from_args(args, bufs: dict) -> Gemm:
    """The `Gemm` a cublasGemmStridedBatchedEx argument list describes, in cuBLAS's order (handle,
    transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB, beta, C, Ctype,
    ldc, strideC, batchCount, computeType, algo), checked against the buffers it points into."""
    import ctypes

    assert len(args) == 23 and args[0] == HANDLE and args[22] == -1
    resolve = _resolver(bufs)
    ops = []
    for pos in (7, 11, 16):
        ref = resolve(int(args[pos]))
        dt = bufs[ref.buf].dtype
        assert args[pos + 1] == CUDA_DTYPE[dt], f"operand at argument {pos} is {dt}, its enum {args[pos + 1]}"
        ops.append(Operand(ref.buf, ref.offset, args[pos + 2], args[pos + 3]))
    c_dt = bufs[ops[2].buf].dtype
    want = COMPUTE_64F if c_dt == _F64 else COMPUTE_32F
    assert args[21] == want, f"compute type {args[21]} for a {c_dt} output"
    scal = ctypes.c_double if c_dt == _F64 else ctypes.c_float
    alpha, beta = scal.from_address(args[6]).value, scal.from_address(args[15]).value
    return Gemm(args[1], args[2], args[3], args[4], args[5], alpha, ops[0], ops[1], beta, ops[2], args[20])


class EmulatedGpuDevice(CupyDevice):
    """The GPU device's logic on the CPU: its GEMM argument sets, its dtypes, its pointer arrays,
    and the CUDA kernel itself run by numba's simulator (NUMBA_ENABLE_CUDASIM=1 must be set
    before numba.cuda is first imported)."""

    xp = np
    emulates_gpu = True  # plans treat it as the GPU backend (kernel choice, no CPU thread split)
    fused_threads = 16  # the simulator runs every thread as an OS thread: small blocks
    # kernel="auto" keeps the two-GEMM path here, so that tests of that path on small shapes run it;
    # tests of the rule set this to True (and the fused kernel is tested with kernel="fused")
    auto_fused = False

    def __init__(self, max_block=8):
        from numba import config

        if not config.ENABLE_CUDASIM:
            raise RuntimeError(
                "EmulatedGpuDevice needs NUMBA_ENABLE_CUDASIM=1 set before numba.cuda is imported"
            )
        from .kernels import sign_abs

        self._mod = sign_abs
        self._max_block = max_block
        self.gemm_calls: list[tuple[str, int]] = []  # ("strided" | "pointers", batch) per GEMM
        self.blas_workspace_bytes = 64  # small: the workspace is allocated and handed over all the same
        self.blas_workspaces: list = []  # what set_blas_workspace received, in order (None: released)
        self._dtype_enum = dict(CUDA_DTYPE)
        self._compute = {"f64": COMPUTE_64F, "f32": COMPUTE_32F, "f16": COMPUTE_32F}
        self._prepared: dict = {}
        self._handle = HANDLE
        self.recorded: list | None = None  # a list: GEMMs and sign passes are recorded for `replay`

    def set_blas_workspace(self, buf):
        assert buf is None or (buf.dtype == np.uint8 and buf.shape == (self.blas_workspace_bytes,))
        self.blas_workspaces.append(buf)

    def bind(self, cublas=True):
        pass

    def _run_prepared(self, prep, bufs: dict) -> None:
        """Fill the prepared argument list as the GPU device does, then read it back the way
        cuBLAS would (addresses resolved to buffers, coefficients read from their host memory)."""
        template, slots, _coef = prep
        args = list(template)
        args[0] = self._handle
        for pos, key, off in slots:
            args[pos] = bufs[key].ctypes.data + off
        call = gemm_from_args(args, bufs)
        self.gemm_calls.append(("strided", call.batch))
        emulate_gemm(call, bufs)

    def _fill_addresses(self, addrs, ptrs: np.ndarray) -> None:
        from .kernels import addresses

        slots = 8  # several launches even for small batches
        for first, count, vals in address_batches(ptrs, slots):
            addresses.get_fill_kernel(slots)[1, slots](addrs, first, count, vals)

    def _pointer_gemm(self, call: _gemm.BatchedGemm, dt, addrs, bufs) -> None:
        """Read the three address arrays back from the workspace buffer the kernel wrote, the way
        cuBLAS reads them (A, B, C, `batch` entries each), and execute them."""
        self.gemm_calls.append(("pointers", call.batch))
        ptrs = np.asarray(addrs[: 3 * call.batch]).reshape(3, call.batch).copy()
        run = (self._run_pointer_gemm, (call, dt, ptrs, dict(bufs)))
        if self.recorded is not None:  # what a CUDA graph would hold: the argument set, addresses included
            self.recorded.append(run)
        run[0](*run[1])

    def _run_pointer_gemm(self, call: _gemm.BatchedGemm, dt, ptrs: np.ndarray, bufs: dict) -> None:
        t = call.template
        if not isinstance(
            t.alpha, numbers.Real
        ):  # device pointer mode: read [alpha, beta] at its address now
            coef = host_view(_addr(t.alpha), (2,), (dt.itemsize,), dt)
            call = replace(call, template=replace(t, alpha=float(coef[0]), beta=float(coef[1])))
        emulate_pointer_gemm(call, ptrs, bufs)

    def replay(self) -> None:
        """Run the pointer-array GEMMs and sign passes recorded since `recorded` was set to a list
        again, in order, as a CUDA graph's replay runs its captured calls: the same argument sets,
        coefficients in device memory read anew."""
        for fn, args in self.recorded or ():
            fn(*args)

    def sign_abs(self, ws, sgn, n, losses, offset, scale, write_s, variant=DEFAULT, partials=None):
        args = (ws, sgn, n, losses, offset, scale, write_s, variant, partials)
        if self.recorded is not None:
            self.recorded.append((self._sign_abs, args))
        self._sign_abs(*args)

    def _sign_abs(self, ws, sgn, n, losses, offset, scale, write_s, variant, partials):
        l2, offdiag, normalize = variant.flags()
        if partials is not None:
            tpb, parts, per = self._mod.split(n, normalize, self._max_block)
            kp, kf = self._mod.get_split_kernels(tpb, l2, offdiag)
            kp[ws.shape[0] * parts, tpb](ws, sgn, n, partials, per, scale, write_s)
            kf[ws.shape[0], tpb](sgn, n, partials, losses, offset, write_s)
            return
        tpb, ncol = self._mod.launch(n, normalize, self._max_block)
        self._mod.get_kernel(tpb, l2, offdiag, normalize, ncol)[ws.shape[0], tpb](
            ws, sgn, n, losses, offset, scale, write_s
        )

    def loss_total(self, losses, count, scale, out, each):
        tpb = self._max_block
        grid = -(-count // tpb) if each else 1
        if grid:
            self._mod.get_total_kernel(tpb, each)[grid, tpb](losses, count, scale, out)

    def fused_launcher(self, cfg, V, Vout, losses, write_grad):
        """CupyDevice.fused_launcher's contract on host memory: go() gets addresses, and finds the
        arrays at them from the shapes, strides and dtypes given here (as the kernel would)."""
        specs = [(a.shape, a.strides, a.dtype) for a in (V, Vout if write_grad else V, losses)]

        def go(phi_addr, out_addr, losses_addr, alpha, accumulate):
            v, o, ls = (
                host_view(addr, *spec)
                for addr, spec in zip((phi_addr, out_addr, losses_addr), specs, strict=True)
            )
            self._fused(cfg, v, o, ls, alpha, accumulate, write_grad)

        return go

    def _fused(self, cfg, V, Vout, losses, alpha, accumulate, write_grad):
        from .kernels import fused_small

        self.gemm_calls.append(("fused", V.shape[0]))
        cfg = cfg._replace(tile_rows=min(cfg.tile_rows, 4))  # several tiles even for small l
        scal = np.float64 if cfg.acc == "float64" else np.float32
        # the simulator moves only contiguous host arrays to its "device": hand it contiguous copies
        # (tests/test_fused.py covers the kernel's own strided reads on device views)
        v = np.ascontiguousarray(V)
        o = np.ascontiguousarray(Vout) if write_grad else v
        fused_small.get_fused_kernel(cfg)[V.shape[0], cfg.threads](
            v, o, losses, 0, scal(alpha), bool(accumulate), bool(write_grad)
        )
        if write_grad and o is not Vout:
            Vout[...] = o


if TYPE_CHECKING:
    _check: GpuDevice = EmulatedGpuDevice()  # mypy checks the device interface here


def host_view(addr: int, shape, strides, dtype) -> np.ndarray:
    """The NumPy array at host address `addr` (its first element) with these shape, byte strides and
    dtype: how a kernel sees an array it gets as (address, shape, strides)."""
    import ctypes

    from ._checks import byte_span

    dtype = np.dtype(dtype)
    if not all(shape):
        return np.empty(shape, dtype)
    lo, hi = byte_span(addr, shape, strides, dtype.itemsize)
    buf = (ctypes.c_char * (hi - lo)).from_address(lo)
    return np.ndarray(shape, dtype, buffer=memoryview(buf), offset=addr - lo, strides=strides)
