"""Arguments of the two strided-batched GEMMs, as plain integers (no CuPy needed).

The slices of a 3-D view V of shape (m, l, n) with element strides (sm, sl, sn)
are read in place by cuBLAS (column-major) in one of two ways:

- kind "T" (sn == 1): slice i, read column-major with leading dimension sl from
  element i*sm, is Phi_i^T (n x l). This is a C-contiguous (l, m, n) array with
  axis=1 (ld = m*n, batch stride n) or (m, l, n) with axis=0.
- kind "N" (sl == 1): the same read gives Phi_i (l x n), leading dimension sn:
  Fortran-ordered inputs.

Any other layout (a transposed axis=2, negative or byte-misaligned strides) is
not readable by cuBLAS; the driver then stages each chunk through a
C-contiguous buffer, whose layout is kind "T".

`gram_call` and `grad_call` return the full argument set of one
`gemmStridedBatchedEx` call. The GPU device hands them to cuBLAS; the
emulator (`gpu_orthol1.testing`) executes them over NumPy buffers, which is how
CI checks them without a GPU.

Separate matrices of one shape (a model's parameters) are not at a fixed stride
from each other: `BatchedGemm` is the pointer-array form (``?gemmBatched``),
one address per matrix and one leading dimension for all, built from the
single-matrix `gram_call` / `grad_call` (the same layout algebra).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

OP_N, OP_T = 0, 1


@dataclass(frozen=True)
class Layout:
    kind: str  # "T": memory holds Phi_i^T column-major; "N": memory holds Phi_i column-major
    ld: int
    batch_stride: int


@dataclass(frozen=True)
class Operand:
    buf: str  # which buffer: "phi", "ws" (Gram / sign workspace), "sgn", "out"
    offset: int  # elements from the buffer's first element
    ld: int
    stride: int


@dataclass(frozen=True)
class Gemm:
    """C_b = alpha * op(A_b) @ op(B_b) + beta * C_b for b < batch, all column-major."""

    transa: int
    transb: int
    m: int
    n: int
    k: int
    alpha: float
    a: Operand
    b: Operand
    beta: float
    c: Operand
    batch: int


def layout(shape, strides_elems) -> Layout | None:
    """Layout of a (m, l, n) view with the given element strides, or None when cuBLAS can't read it."""
    m, l, n = shape
    sm, sl, sn = strides_elems
    if m > 1 and sm < 0:
        return None
    bs = sm if m > 1 else 0
    # kind "T": unit stride along n, rows of length n at least ld apart.
    if (n <= 1 or sn == 1) and (l <= 1 or sl >= max(n, 1)):
        return Layout("T", sl if l > 1 else max(n, 1), bs)
    if (l <= 1 or sl == 1) and (n <= 1 or sn >= max(l, 1)):
        return Layout("N", sn if n > 1 else max(l, 1), bs)
    return None


def element_strides(itemsize: int, strides_bytes) -> tuple[int, ...] | None:
    if any(s % itemsize for s in strides_bytes):
        return None
    return tuple(s // itemsize for s in strides_bytes)


def gram_call(phi: Layout, first: int, count: int, l: int, n: int) -> Gemm:
    """G_b = Phi_b^T Phi_b for slices first .. first+count-1 into ws rows 0 .. count-1 (n x n each)."""
    src = Operand("phi", first * phi.batch_stride, phi.ld, phi.batch_stride)
    ws = Operand("ws", 0, max(n, 1), n * n)
    if phi.kind == "T":  # memory is Phi^T (n x l): G = Phi^T (Phi^T)^T
        ta, tb = OP_N, OP_T
    else:  # memory is Phi (l x n): G = Phi^T Phi
        ta, tb = OP_T, OP_N
    return Gemm(ta, tb, n, n, l, 1.0, src, src, 0.0, ws, count)


def grad_call(
    phi: Layout,
    phi_first: int,
    out: Layout,
    out_first: int,
    count: int,
    l: int,
    n: int,
    alpha: float,
    beta: float,
) -> Gemm:
    """Out_b = alpha * Phi_b @ S_b + beta * Out_b, S_b symmetric (n x n) in the sgn buffer.

    phi_first / out_first differ when one side is staged through a chunk buffer."""
    src = Operand("phi", phi_first * phi.batch_stride, phi.ld, phi.batch_stride)
    dst = Operand("out", out_first * out.batch_stride, out.ld, out.batch_stride)
    sgn = Operand("sgn", 0, max(n, 1), n * n)
    if out.kind == "T":
        # memory of out holds Out^T (n x l) = S^T Phi^T = S Phi^T
        tb = OP_N if phi.kind == "T" else OP_T
        return Gemm(OP_N, tb, n, l, n, alpha, sgn, src, beta, dst, count)
    # memory of out holds Out (l x n) = Phi S
    ta = OP_N if phi.kind == "N" else OP_T
    return Gemm(ta, OP_N, l, n, n, alpha, src, sgn, beta, dst, count)


# -- pointer-array batches: separate matrices of one (l, n), dtype and layout in one call ----------


@dataclass(frozen=True)
class Ref:
    buf: Any  # key of the buffer in the `bufs` dict (hashable)
    offset: int  # elements from the buffer's first element


@dataclass(frozen=True)
class BatchedGemm:
    """C_e = alpha * op(A_e) @ op(B_e) + beta * C_e for every entry e; column-major, one ld per operand."""

    template: Gemm  # the single-matrix call (batch=1): ops, sizes, alpha, beta, leading dims
    a: tuple[Ref, ...]
    b: tuple[Ref, ...]
    c: tuple[Ref, ...]

    @property
    def batch(self) -> int:
        return len(self.c)

    def entry(self, e: int) -> Gemm:
        """Entry e as a one-matrix strided call (what the emulators execute)."""
        t = self.template
        return replace(
            t,
            a=Operand(self.a[e].buf, self.a[e].offset, t.a.ld, 0),
            b=Operand(self.b[e].buf, self.b[e].offset, t.b.ld, 0),
            c=Operand(self.c[e].buf, self.c[e].offset, t.c.ld, 0),
            batch=1,
        )


def slice_layout(l: int, n: int, sl: int, sn: int) -> Layout | None:
    """(kind, ld) of one (l, n) matrix with element strides (sl, sn), or None when BLAS can't read it."""
    return layout((1, l, n), (0, sl, sn))


def gram_batched(lay: Layout, phi: Sequence[Ref], ws_first: int, l: int, n: int) -> BatchedGemm:
    """G_e = Phi_e^T Phi_e into ws rows ws_first + e (n x n each)."""
    t = gram_call(Layout(lay.kind, lay.ld, 0), 0, 1, l, n)
    ws = tuple(Ref("ws", (ws_first + e) * n * n) for e in range(len(phi)))
    return BatchedGemm(t, tuple(phi), tuple(phi), ws)


def grad_batched(
    lay: Layout,
    phi: Sequence[Ref],
    lay_out: Layout,
    out: Sequence[Ref],
    sgn_first: int,
    l: int,
    n: int,
    alpha: float,
    beta: float,
) -> BatchedGemm:
    """Out_e = alpha * Phi_e @ S_e + beta * Out_e, S_e in sgn row sgn_first + e."""
    t = grad_call(
        Layout(lay.kind, lay.ld, 0), 0, Layout(lay_out.kind, lay_out.ld, 0), 0, 1, l, n, alpha, beta
    )
    sgn = tuple(Ref("sgn", (sgn_first + e) * n * n) for e in range(len(phi)))
    if t.a.buf == "sgn":  # out kind "T": Out^T = S Phi^T, S is operand A
        return BatchedGemm(t, sgn, tuple(phi), tuple(out))
    return BatchedGemm(t, tuple(phi), sgn, tuple(out))


def pointer_arrays(
    call: BatchedGemm, addr: Callable[[Any], int], itemsize: Callable[[Any], int]
) -> np.ndarray:
    """(3, batch) uint64: the A, B and C address arrays cuBLAS's pointer-array GEMM reads.

    addr(key) is the address of buffer key's first element, itemsize(key) its element size."""
    out = np.empty((3, call.batch), dtype=np.uint64)
    for row, refs in enumerate((call.a, call.b, call.c)):
        out[row] = [addr(r.buf) + r.offset * itemsize(r.buf) for r in refs]
    return out
