"""CPU twin of ``sign_abs.py``: the same fused pass over the Gram workspace, for the NumPy backend.

NumPy needs three passes and a temporary for it (subtract identity, |.|-sum,
sign), about a third of the GEMM time at n=64; this pass reads each slice of
G twice (the |.|-sum, then the signs) while it is still in cache, and writes S
once, in place. Semantics are those of the
CUDA kernel (tests hold both to the same reference): S = scale * sign(G - I),
sign(0) = 0, and a slice whose sum is not finite gets an all-NaN S and a NaN loss.

Serial on purpose: a parallel loop here competes with OpenBLAS's spinning
threads between the GEMMs (measured 2x slower on 2 cores), and callers that
run several threads get their parallelism from BLAS and from their own threads.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _signs_inplace(f, sc):  # pragma: no cover - compiled
    one = f.dtype.type(1.0)
    for k in range(f.size):
        x = f[k]
        f[k] = sc * (one * (x > 0) - one * (x < 0))


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _signs_to(f, out, sc):  # pragma: no cover - compiled
    one = out.dtype.type(1.0)
    for k in range(f.size):
        x = f[k]
        out[k] = sc * (one * (x > 0) - one * (x < 0))


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def sign_abs_sum(g, s, n, losses, loss_offset, scale, write_s):  # pragma: no cover - compiled
    # Flat loops over each slice (the identity handled on the n diagonal entries alone) are what
    # LLVM vectorizes best: 5x faster than row loops with a diagonal test. reassoc lets it split
    # the float64 sum into lanes; the order is still fixed by the compiled code, so results
    # repeat call to call. When S is G itself the sign loop must read and write through ONE
    # array: two arguments that alias fail LLVM's runtime alias check and run scalar.
    sc = s.dtype.type(scale)
    zero = s.dtype.type(0.0)
    diag_s = np.empty(n, dtype=s.dtype)
    inplace = g.ctypes.data == s.ctypes.data
    for b in range(g.shape[0]):
        gb = g[b]
        corr = 0.0
        for j in range(n):  # before any sign is written: swap |g_jj| for |g_jj - 1|
            d = np.float64(gb[j * (n + 1)])
            x = d - 1.0
            corr += abs(x) - abs(d)
            diag_s[j] = sc if x > 0 else (-sc if x < 0 else zero)
        acc = 0.0
        for k in range(n * n):
            acc += abs(np.float64(gb[k]))
        acc += corr
        if write_s:
            if inplace:
                _signs_inplace(gb, sc)
            else:
                _signs_to(gb, s[b], sc)
            sb = s[b]
            for j in range(n):
                sb[j * (n + 1)] = diag_s[j]
        if not math.isfinite(acc):  # NaN/Inf anywhere in the slice: NaN loss, all-NaN S
            acc = math.nan
            if write_s:
                s[b, :] = math.nan
        losses[loss_offset + b] = acc


# -- the other members of the penalty family (docs/penalties.md) ---------------------------------
#
# Separate functions, not flags inside `sign_abs_sum`: the default L1 pass above stays exactly as
# fast as it was, and each variant's loops carry no per-entry test of a flag. All of them work on
# the slice in place (the CPU device writes M over the Gram, one array, for LLVM's vectorizer); a
# caller with a separate output gets the slice copied through a float64 scratch first.


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _l1_sum_signs(f, sc, write_s):  # pragma: no cover - compiled
    acc = 0.0
    for k in range(f.size):
        acc += abs(np.float64(f[k]))
    if write_s:
        _signs_inplace(f, sc)
    return acc


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _l2_sum_scale(f, sc, write_s):  # pragma: no cover - compiled
    acc = 0.0
    for k in range(f.size):
        x = np.float64(f[k])
        acc += x * x
    if write_s:
        two = f.dtype.type(2.0) * sc
        for k in range(f.size):
            f[k] = two * f[k]
    return acc


@numba.njit(cache=True, nogil=True)
def _plain_slice(f, n, sc, write_s, l2, offdiag):  # pragma: no cover - compiled
    """E = G - I (or G off the diagonal) in place, then its loss and F (times sc) in place."""
    bad = 0.0
    for j in range(n):
        d = f[j * (n + 1)]
        if offdiag:
            bad += np.float64(d) * 0.0  # a free diagonal still carries NaN/Inf into the loss
            f[j * (n + 1)] = 0.0
        else:
            f[j * (n + 1)] = d - f.dtype.type(1.0)  # exact for d in [0.5, 2] (Sterbenz)
    if l2:
        acc = _l2_sum_scale(f, sc, write_s)
    else:
        acc = _l1_sum_signs(f, sc, write_s)
    return acc + bad


@numba.njit(cache=True, nogil=True)
def _inv_norms(f, n, r, l2):  # pragma: no cover - compiled
    """r_j = G_jj^-1/2 (l2: r_j^2 = 1 / G_jj, all it needs), 0 for a zero column; the diagonal of f
    set to 0 so that the row loops skip it for free. Returns (NaN/Inf seen on the diagonal as a
    non-finite number, count of zero columns)."""
    bad = 0.0
    zero_cols = 0
    zero = f.dtype.type(0.0)
    for j in range(n):
        d = np.float64(f[j * (n + 1)])
        bad += d * 0.0
        if d > 0.0:
            r[j] = 1.0 / d if l2 else 1.0 / math.sqrt(d)
        else:
            r[j] = zero
            zero_cols += 1
        f[j * (n + 1)] = zero
    return bad, zero_cols


# The two normalized passes below compute, for slice f (n x n, in place) and r from `_inv_norms`,
# the loss of Ghat - I (masked) and M = D^-1/2 (F - diag(Ghat F)) D^-1/2 (times sc). A zero column
# (G_jj = 0) has r_j = 0: its normalized entries, its M row and column are 0; its diagonal
# Ghat_jj - 1 = -1 counts in the loss unless the diagonal is free. Every other diagonal entry of
# Ghat - I is 0 by construction (set exactly, not left to rounding): it adds nothing to the loss
# and F_jj = 0, so c_j = (Ghat F)_jj is a sum over k != j, a multiple of row j's loss, and
# M_jj = -r_j^2 c_j. The scaled Gram is never stored: row j's loss is r_j sum_k |G_jk| r_k (l1) or
# r_j^2 sum_k G_jk^2 r_k^2 (l2). Row sums run in the slice's dtype, rows are summed in float64:
# one fused loop per row, as fast as the default pass (float64 row sums cost 1.5-2x at n = 64).
# They write M even for a loss-only call (into the workspace, which is scratch then): the one loop
# keeps loss() bit-identical to loss_and_grad()[0].


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _normalized_l1(f, n, sc, offdiag, r):  # pragma: no cover - compiled
    bad, zero_cols = _inv_norms(f, n, r, False)
    one = f.dtype.type(1.0)
    F = f.reshape(n, n)
    acc = 0.0
    for j in range(n):
        rj = r[j]
        rs = f.dtype.type(sc * rj)
        a = f.dtype.type(0.0)
        for k in range(n):
            x = F[j, k]
            a += abs(x) * r[k]
            # sign(Ghat_jk) = sign(G_jk): r >= 0, and r_k = 0 zeroes the entry either way
            F[j, k] = (rs * r[k]) * (one * (x > 0) - one * (x < 0))
        row = np.float64(a) * np.float64(rj)
        acc += row
        F[j, j] = -(sc * rj * rj) * row  # c_j = row j's loss
    if not offdiag:
        acc += zero_cols  # |0 - 1| = 1 per zero column
    return acc + bad


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _normalized_l2(f, n, sc, offdiag, r):  # pragma: no cover - compiled
    bad, zero_cols = _inv_norms(f, n, r, True)  # r holds r_k^2
    F = f.reshape(n, n)
    acc = 0.0
    for j in range(n):
        r2j = r[j]
        rs = f.dtype.type(2.0 * sc * r2j)
        a = f.dtype.type(0.0)
        for k in range(n):
            x = F[j, k]
            a += (x * r[k]) * x  # G_jk^2 / G_kk <= G_jj (Cauchy-Schwarz): no float32 overflow
            F[j, k] = rs * (r[k] * x)  # 2 sc r_j r_k Ghat_jk
        row = np.float64(a) * np.float64(r2j)
        acc += row
        F[j, j] = -(sc * r2j) * (2.0 * row)  # c_j = 2 * row j's loss
    if not offdiag:
        acc += zero_cols  # (0 - 1)^2 = 1 per zero column
    return acc + bad


@numba.njit(cache=True, nogil=True)
def _variant_slice(f, n, sc, write_s, l2, offdiag, normalize, r):  # pragma: no cover - compiled
    if normalize and l2:
        return _normalized_l2(f, n, sc, offdiag, r)
    if normalize:
        return _normalized_l1(f, n, sc, offdiag, r)
    return _plain_slice(f, n, sc, write_s, l2, offdiag)


@numba.njit(cache=True, nogil=True)
def sign_abs_variant(
    g, s, n, losses, loss_offset, scale, write_s, l2, offdiag, normalize
):  # pragma: no cover
    """`sign_abs_sum` for every other member of the family (same arguments, same NaN policy)."""
    sc = s.dtype.type(scale)
    inplace = g.ctypes.data == s.ctypes.data
    r = np.empty(n, dtype=g.dtype)
    r64 = np.empty(n, dtype=np.float64)
    tmp = np.empty(0 if inplace else n * n, dtype=np.float64)
    sc64 = np.float64(scale)
    for b in range(g.shape[0]):
        if inplace:
            acc = _variant_slice(g[b], n, sc, write_s, l2, offdiag, normalize, r)
        else:
            tmp[:] = g[b]
            acc = _variant_slice(tmp, n, sc64, write_s, l2, offdiag, normalize, r64)
            if write_s:
                s[b, :] = tmp
        if not math.isfinite(acc):  # NaN/Inf anywhere in the slice: NaN loss, all-NaN M
            acc = math.nan
            if write_s:
                s[b, :] = math.nan
        losses[loss_offset + b] = acc
