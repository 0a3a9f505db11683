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
`gemmStridedBatchedEx` call. The real backend hands them to cuBLAS; the
emulator (`_emulate.py`) executes them over NumPy buffers, which is how CI
checks them without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def grad_call(phi: Layout, phi_first: int, out: Layout, out_first: int, count: int, l: int, n: int,
              alpha: float, beta: float) -> Gemm:
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
