"""One triangle of the Gram on the GPU: the blocked-triangle GEMM and the rule that picks it.

G_i = Phi_i^T Phi_i is symmetric, so half of the Gram GEMM's work is redundant. cuBLAS has no
batched syrk, and one syrk per slice costs a host call per slice. Instead the n columns of each
slice are cut into b blocks of nb = n / b columns, and the b (b + 1) / 2 block pairs (I, J), I <= J,
of EVERY slice go into ONE pointer-array GEMM (``cublasGemmBatchedEx``): entry (slice s, pair
(I, J)) computes Phi_J^T Phi_I (nb x nb, k = l) into the Gram's block at row I, column J of the
row-major view the sign pass reads. The work is (b + 1) / (2 b) of the full GEMM (7/12 for
n = 768 in blocks of 128). Its three address arrays are written on the device by one kernel
launch (`kernels.addresses.triangle_addresses`) into the call's "addrs" workspace, in stream order,
as the grouped path's are, so a CUDA graph can capture the call. The sign pass then reads only
those blocks, counts the off-diagonal blocks' entries twice and writes the full symmetric S
(`kernels.sign_abs`, tri=nb), which the gradient GEMM multiplies as before.

Where it runs: the two-GEMM path (never the fused kernel's shapes), the elementwise members of the
penalty family (the normalized pass reads whole columns), calls without a Gram hook (the metrics
and distributed hooks read whole Grams), n with a block split (`block_size`). Where it pays is a
property of the card: `TRIANGLE_MIN_N` is to be measured on one (bench/bench_triangle.py, run by
bench/gpu_check.sh); GPU_ORTHOL1_GRAM=full|triangle forces one form for a plan made while it is set.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._driver import StridedChunk

ENV_GRAM = "GPU_ORTHOL1_GRAM"
GRAMS = ("auto", "full", "triangle")
TRI_PREPARED_MAX = 256  # prepared triangle argument lists kept per device (keyed by chunk and shape)

# kernel="auto"'s threshold: the triangle for n >= TRIANGLE_MIN_N. NOT MEASURED: to be measured on a
# card (bench/bench_triangle.py, full vs triangle at n = 256 .. 2048, l = n and 4n, m = 1, 12, 36);
# 512 is a guess from the work fraction alone (5/8 of the Gram GEMM at n = 512 in blocks of 128).
TRIANGLE_MIN_N = 512
# The smallest block: below 128 columns a block's GEMM tiles run short of the k = l streaming that
# keeps tensor cores busy (a guess, to be measured with the threshold).
BLOCK_MIN = 128
# Block addresses 16-byte aligned (tensor cores' operand alignment): nb * itemsize % 16 == 0.
ALIGN_BYTES = 16


def pairs(blocks: int) -> int:
    """Block pairs (I, J), I <= J, of a Gram cut into `blocks` x `blocks` blocks."""
    return blocks * (blocks + 1) // 2


def block_size(n: int, itemsize: int, block_min: int = BLOCK_MIN, align: int = ALIGN_BYTES) -> int:
    """The columns per block of an n x n Gram's triangle (0: none fits): the smallest divisor nb of n
    with nb >= block_min, at least two blocks, and nb * itemsize a multiple of `align` (for the
    operands) -- the finest cut, which leaves the least redundant work."""
    for nb in range(max(1, block_min), n // 2 + 1):
        if n % nb == 0 and (nb * itemsize) % align == 0:
            return nb
    return 0


def setting() -> str:
    """GPU_ORTHOL1_GRAM's value ("auto" when unset), or ValueError."""
    env = os.environ.get(ENV_GRAM, "").strip() or "auto"
    if env not in GRAMS:
        raise ValueError(f"environment variable {ENV_GRAM}={env!r} is not one of {GRAMS}")
    return env


def pick(dev: Any, kernel: str, variant: Any, n: int, dtype: Any) -> int:
    """The block size of a plan's triangle Gram, or 0 for the full GEMM (decided once per plan)."""
    form = setting()
    if form == "full" or kernel != "gemm" or variant.normalize or not hasattr(dev, "gram_triangle"):
        return 0
    if form == "auto" and n < TRIANGLE_MIN_N:
        return 0
    block_min = getattr(dev, "tri_block_min", BLOCK_MIN)
    align = getattr(dev, "tri_align", ALIGN_BYTES)
    return block_size(n, np.dtype(dtype).itemsize, block_min, align)


def address_slots(n: int, nb: int, pointers: bool) -> int:
    """uint64 entries of the "addrs" workspace per slice: 3 per block pair, plus each matrix's own
    address for a batch of separate matrices (where its gradient GEMM's 3 fit as well)."""
    return 3 * pairs(n // nb) + (1 if pointers else 0)


class TriangleGram:
    """The GPU device's triangle Gram (a mixin of `_cupy.CupyDevice`, which supplies `_handle`,
    `_cublas`, `_dtype_enum`, `_compute_type`, `_fill_addresses`, `_addr_of` and `_dtype_of`).
    `gpu_orthol1.testing.EmulatedGpuDevice` replaces `_tri_fill` and `_tri_gemm`, the two
    executors, and runs the same argument sets on the CPU."""

    tri_block_min = BLOCK_MIN
    tri_align = ALIGN_BYTES
    _tri_prepared: dict

    def gram_triangle(self, src: Any, cc: int, ws: Any, nb: int, addrs: Any) -> None:
        """The blocks (I, J), I <= J, of the chunk's Grams into ws[:cc] (`gpu_orthol1._triangle`)."""
        this: Any = self
        strided = isinstance(src, StridedChunk)
        first = src.arr if strided else src.mats[0]
        n = first.shape[-1]
        l = first.shape[-2]
        dt = this._dtype_of(first)
        isz = dt.itemsize
        lay = src.lay
        b = n // nb
        total = cc * pairs(b)
        if strided:
            phi_step = lay.batch_stride * isz
            phi0 = this._addr_of(src.arr) + src.first * phi_step
            bases = addrs
        else:
            phi_step = phi0 = 0
            bases = addrs[3 * total : 3 * total + cc]
            this._fill_addresses(bases, np.array([[this._addr_of(a) for a in src.mats]], dtype=np.uint64))
        col_bytes = (1 if lay.kind == "T" else lay.ld) * nb * isz
        wsz = ws.dtype.itemsize
        self._tri_fill(
            addrs,
            bases,
            strided,
            phi0,
            phi_step,
            cc,
            b,
            col_bytes,
            this._addr_of(ws),
            n * n * wsz,
            nb * n * wsz,
            nb * wsz,
            total,
        )
        key = (lay.kind, lay.ld, l, n, nb, total, dt, ws.dtype)
        args = self._tri_prepared.get(key)
        if args is None:
            # op(A) = Phi_J^T (nb x l), op(B) = Phi_I (l x nb), as in _gemm.gram_call for one slice
            ta, tb = (0, 1) if lay.kind == "T" else (1, 0)
            scal = np.float64 if ws.dtype == np.float64 else np.float32
            coef = np.array([1.0, 0.0], dtype=scal)  # kept with the arguments: cuBLAS reads them per call
            en = this._dtype_enum
            args = [
                0,
                ta,
                tb,
                nb,
                nb,
                l,
                coef.ctypes.data,
                0,
                en[dt.name],
                lay.ld,
                0,
                en[dt.name],
                lay.ld,
                coef.ctypes.data + coef.itemsize,
                0,
                en[np.dtype(ws.dtype).name],
                n,
                total,
                this._compute_type(dt, np.dtype(ws.dtype)),
                -1,
                coef,
            ]
            if len(self._tri_prepared) >= TRI_PREPARED_MAX:  # a bound, as for the strided GEMMs' sets
                self._tri_prepared.clear()
            self._tri_prepared[key] = args
        call = list(args[:-1])
        base = this._addr_of(addrs)
        call[0] = this._handle
        call[7], call[10], call[14] = base, base + 8 * total, base + 16 * total
        bufs = {"ws": ws, "addrs": addrs}
        if strided:
            bufs["phi"] = src.arr
        else:
            bufs.update({("p", k): a for k, a in enumerate(src.mats)})
        self._tri_gemm(call, bufs)

    def _tri_fill(
        self,
        addrs: Any,
        bases: Any,
        strided: bool,
        phi0: int,
        phi_step: int,
        count: int,
        blocks: int,
        col_bytes: int,
        ws0: int,
        ws_step: int,
        row_bytes: int,
        blk_bytes: int,
        total: int,
    ) -> None:
        """One launch of `kernels.addresses.triangle_addresses` on the bound stream."""
        from .kernels import addresses

        this: Any = self
        hit = this._launch.get("triangle")
        if hit is None:
            from numba import types

            from . import _ptx

            u64 = types.uint64
            sig = (_ptx.array_type(np.uint64, 1), _ptx.array_type(np.uint64, 1), types.boolean) + (u64,) * 9
            hit = this._launch["triangle"] = _ptx.kernel(addresses.get_triangle_kernel(), sig)
        tpb = addresses.TRIANGLE_THREADS
        hit.launch(
            this._stream_ptr,
            -(-total // tpb),
            tpb,
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
        )

    def _tri_gemm(self, args: list, bufs: dict) -> None:
        """cublasGemmBatchedEx with this argument list (bufs: for the emulator, which resolves them)."""
        this: Any = self
        this._cublas.gemmBatchedEx(*args)
