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

from . import _dtypes, _gemm
from ._cupy import CupyDevice, bits_view
from ._cupy_gemm import _addr, address_batches
from ._emulated_blas import (  # noqa: F401 - re-exported: the tests reach them as testing.<name>
    _F32,
    _F64,
    COMPUTE_32F,
    COMPUTE_32F_FAST_TF32,
    COMPUTE_64F,
    CUDA_DTYPE,
    HANDLE,
    _colmajor,
    _resolver,
    _values,
    check_pointer_args,
    emulate_batched_ex,
    emulate_gemm,
    emulate_pointer_gemm,
    gemm_from_args,
    to_tf32,
)
from ._penalty import DEFAULT

if TYPE_CHECKING:
    from ._device import GpuDevice


class EmulatedGpuDevice(CupyDevice):
    """The GPU device's logic on the CPU: its GEMM argument sets, its dtypes, its pointer arrays,
    and the CUDA kernel itself run by numba's simulator (NUMBA_ENABLE_CUDASIM=1 must be set
    before numba.cuda is first imported). precision: "highest" or "tf32" (float32 GEMMs with
    CUBLAS_COMPUTE_32F_FAST_TF32, their operands rounded to TF32 by `to_tf32`); `compute_types`
    lists each GEMM's compute type, as passed to cuBLAS."""

    xp = np
    emulates_gpu = True  # plans treat it as the GPU backend (kernel choice, no CPU thread split)
    fused_threads = 16  # the simulator runs every thread as an OS thread: small blocks
    # kernel="auto" keeps the two-GEMM path here, so that tests of that path on small shapes run it;
    # tests of the rule set this to True (and the fused kernel is tested with kernel="fused")
    auto_fused = False
    # the triangle Gram on small test shapes (GPU_ORTHOL1_GRAM=triangle): blocks of 3 columns and up
    tri_block_min = 3
    tri_align = 1

    def __init__(self, max_block=8, precision="highest"):
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
        self._tf32 = precision == "tf32"
        self._compute = {
            "f64": COMPUTE_64F,
            "f32": COMPUTE_32F_FAST_TF32 if self._tf32 else COMPUTE_32F,
            "f16": COMPUTE_32F,
        }
        self.compute_types: list[int] = []  # each GEMM's, as handed to cuBLAS
        self._prepared: dict = {}
        self._alpha = {np.float32: np.zeros((), np.float32), np.float64: np.zeros((), np.float64)}
        self._beta = {np.float32: np.zeros((), np.float32), np.float64: np.zeros((), np.float64)}
        self._tri_prepared: dict = {}
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
        self.compute_types.append(args[21])
        emulate_gemm(call, bufs, args[21] == COMPUTE_32F_FAST_TF32)

    def _fill_addresses(self, addrs, ptrs: np.ndarray) -> None:
        from .kernels import addresses

        slots = 8  # several launches even for small batches
        for first, count, vals in address_batches(ptrs, slots):
            addresses.get_fill_kernel(slots)[1, slots](addrs, first, count, vals)

    def _pointer_gemm(self, call: _gemm.BatchedGemm, addrs, bufs) -> None:
        """Check the argument list the GPU device would hand cuBLAS (function, dtype enums, compute
        type, sizes, coefficients), read the three address arrays back from the workspace buffer the
        kernel wrote, the way cuBLAS reads them (A, B, C, `batch` entries each), and execute them."""
        name, args = self._pointer_args(call, addrs, bufs)
        check_pointer_args(name, args, call, addrs, bufs)
        self.gemm_calls.append(("pointers", call.batch))
        # ?gemmBatched has no compute type: the handle's default math mode, plain float32 / float64
        compute = {"sgemmBatched": COMPUTE_32F, "dgemmBatched": COMPUTE_64F}.get(name) or args[18]
        self.compute_types.append(compute)
        ptrs = np.asarray(addrs[: 3 * call.batch]).reshape(3, call.batch).copy()
        run = (self._run_pointer_gemm, (call, ptrs, dict(bufs), compute == COMPUTE_32F_FAST_TF32))
        if self.recorded is not None:  # what a CUDA graph would hold: the argument set, addresses included
            self.recorded.append(run)
        run[0](*run[1])

    def _run_pointer_gemm(self, call: _gemm.BatchedGemm, ptrs: np.ndarray, bufs: dict, tf32: bool) -> None:
        t = call.template
        if not isinstance(
            t.alpha, numbers.Real
        ):  # device pointer mode: read [alpha, beta] at its address now
            sdt = np.dtype(np.float64 if bufs[call.c[0].buf].dtype == _F64 else np.float32)
            coef = host_view(_addr(t.alpha), (2,), (sdt.itemsize,), sdt)
            call = replace(call, template=replace(t, alpha=float(coef[0]), beta=float(coef[1])))
        emulate_pointer_gemm(call, ptrs, bufs, tf32)

    def replay(self) -> None:
        """Run the pointer-array GEMMs and sign passes recorded since `recorded` was set to a list
        again, in order, as a CUDA graph's replay runs its captured calls: the same argument sets,
        coefficients in device memory read anew."""
        for fn, args in self.recorded or ():
            fn(*args)

    def _tri_fill(
        self,
        addrs,
        bases,
        strided,
        phi0,
        phi_step,
        count,
        blocks,
        col_bytes,
        ws0,
        ws_step,
        row_bytes,
        blk_bytes,
        total,
    ):
        """The address kernel itself, under the simulator, on host addresses (a few blocks)."""
        from .kernels import addresses

        tpb = 8
        u = np.uint64
        # a copy: the simulator copies each argument back after the launch, so an argument that
        # aliases `addrs` would overwrite what the kernel wrote there
        addresses.get_triangle_kernel()[-(-total // tpb), tpb](
            addrs,
            np.array(bases),
            bool(strided),
            u(phi0),
            u(phi_step),
            u(count),
            u(blocks),
            u(col_bytes),
            u(ws0),
            u(ws_step),
            u(row_bytes),
            u(blk_bytes),
        )

    def _tri_gemm(self, args, bufs):
        """Read a cublasGemmBatchedEx argument list the way cuBLAS would: its three address arrays
        from the (host) memory they point at, each address resolved to a buffer; then run each entry."""
        self.gemm_calls.append(("triangle", args[17]))
        self.compute_types.append(args[18])
        emulate_batched_ex(args, bufs)

    def sign_abs(self, ws, sgn, n, losses, offset, scale, write_s, variant=DEFAULT, partials=None, tri=0):
        args = (ws, sgn, n, losses, offset, scale, write_s, variant, partials, tri)
        if self.recorded is not None:
            self.recorded.append((self._sign_abs, args))
        self._sign_abs(*args)

    def _sign_abs(self, ws, sgn, n, losses, offset, scale, write_s, variant, partials, tri):
        l2, offdiag, normalize = variant.flags()
        sgn = bits_view(sgn)
        bits = sgn.dtype == _dtypes.BITS
        assert not bits or scale == 1.0, "a bfloat16 S holds the signs; alpha goes into the GEMM"
        if partials is not None:
            tpb, parts, per = self._mod.split(n, normalize, self._max_block)
            kp, kf = self._mod.get_split_kernels(tpb, l2, offdiag, bits, tri)
            kp[ws.shape[0] * parts, tpb](ws, sgn, n, partials, per, scale, write_s)
            kf[ws.shape[0], tpb](sgn, n, partials, losses, offset, write_s)
            return
        tpb, ncol = self._mod.launch(n, normalize, self._max_block)
        self._mod.get_kernel(tpb, l2, offdiag, normalize, ncol, bits, tri)[ws.shape[0], tpb](
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


# -- the GPU path's host side alone ---------------------------------------------------------------


class _NullKernel:
    """A launch that does nothing (a `_ptx.PtxKernel`'s interface)."""

    def launch(self, *args):
        pass

    def launch_params(self, *args):
        pass

    def __call__(self, *args):
        pass


class _NullLaunches(dict):
    """`_ElementwiseLaunches._launch` whose every lookup finds a kept launcher that does nothing."""

    def get(self, key, default=None):
        k = _NullKernel()
        kind = key[0] if isinstance(key, tuple) else key
        if kind == "sign":
            return (k, 32)
        if kind == "split":
            return (k, k, 256, 1, 1)
        return k


class HostStream:
    """CuPy's current stream as a plan call sees it (`ptr`, `is_capturing()`)."""

    def __init__(self, ptr: int = 1, capturing: bool = False):
        self.ptr, self.capturing = ptr, capturing

    def is_capturing(self) -> bool:
        return self.capturing


class HostOnlyGpuDevice(CupyDevice):
    """`CupyDevice`'s host code over NumPy buffers with nothing executed: the prepared cuBLAS argument
    lists are filled and handed to a cuBLAS that returns at once, the sign pass's and the loss's
    launchers are looked up and called and do nothing. A plan made with it takes the GPU backend's
    call path (`host_only_plan`): for the host time of our own code (bench/host_gemm_cpu.py) and
    tests of that path's bookkeeping. `stream` is what `bind()` returns."""

    emulates_gpu = True
    auto_fused = False

    def __init__(self, precision: str = "highest"):
        import types

        from numba import types as nt

        self.xp = _host_xp()
        self._cb = types.SimpleNamespace(CUBLAS_POINTER_MODE_HOST=0)
        self._cublas = _NullCublas()  # type: ignore[assignment]  # no library: calls return at once
        self._dtype_enum = dict(CUDA_DTYPE)
        self._compute = {
            "f64": COMPUTE_64F,
            "f32": 77 if precision == "tf32" else COMPUTE_32F,
            "f16": COMPUTE_32F,
        }
        from .kernels import sign_abs

        self._mod = sign_abs
        self._max_block = sign_abs.BLOCK_SIZES[-1]
        self._i64, self._f64, self._bool = nt.int64, nt.float64, nt.boolean
        self._handle = HANDLE
        self._stream_ptr = 0
        self.blas_workspace_bytes = 64
        self._launch = _NullLaunches()
        self._prepared: dict = {}
        self._tri_prepared: dict = {}
        self._alpha = {np.float32: np.zeros((), np.float32), np.float64: np.zeros((), np.float64)}
        self._beta = {np.float32: np.zeros((), np.float32), np.float64: np.zeros((), np.float64)}
        self.stream = HostStream()

    def bind(self, cublas=True):
        self._stream_ptr = self.stream.ptr
        return self.stream

    def _run_prepared(self, prep, bufs: dict) -> None:
        template, slots, _coef = prep
        args = list(template)
        args[0] = self._handle
        for pos, key, off in slots:
            args[pos] = bufs[key].ctypes.data + off
        self._cublas.gemmStridedBatchedEx(*args)


class _NullCublas:
    def __getattr__(self, name):
        return lambda *args: 0


def _host_xp():
    """numpy as a plan sees a GPU array module (`xp is not np`), with what a plan reads once of the
    card's memory for its default workspace budget (8 GiB free)."""
    import types

    cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(memGetInfo=lambda: (8 << 30, 80 << 30)))
    pool = types.SimpleNamespace(free_bytes=lambda: 0)
    return types.SimpleNamespace(
        empty=np.empty, zeros=np.zeros, asarray=np.asarray, cuda=cuda, get_default_memory_pool=lambda: pool
    )


def host_only_plan(phi: np.ndarray, beta: float = 1.0, **kw):
    """A plan on a `HostOnlyGpuDevice` that treats the NumPy `phi` as the device's own array (read in
    place, as a CuPy phi is), not as a host input to upload: the GPU backend's call path."""
    from ._plan import Plan

    dev = kw.pop("_device", None) or HostOnlyGpuDevice(kw.get("precision", "highest"))
    p = Plan(phi, beta, backend="numpy", _device=dev, **kw)
    p._host_in = False
    p._slices.fix_layout(phi, False, False)
    return p
