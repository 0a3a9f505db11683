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
