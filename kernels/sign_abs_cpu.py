"""CPU twin of ``sign_abs.py``: the same fused pass over the Gram workspace, for the NumPy backend.

NumPy needs three passes and a temporary for it (subtract identity, |.|-sum,
sign), about a third of the GEMM time at n=64; this loop reads G once and
writes S once while the chunk is still in cache. Semantics are those of the
CUDA kernel (tests hold both to the same reference): S = scale * sign(G - I),
sign(0) = 0, and a slice whose sum is not finite gets an all-NaN S and a NaN loss.

Serial on purpose: a parallel loop here competes with OpenBLAS's spinning
threads between the GEMMs (measured 2x slower on 2 cores), and callers that
run several threads get their parallelism from BLAS and from their own threads.
Row loops without a per-element diagonal test let LLVM vectorize.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def sign_abs_sum(g, s, n, losses, loss_offset, scale, write_s):  # pragma: no cover - compiled
    # reassoc lets LLVM vectorize the row sums (4x faster than the strict serial sum); the
    # order is still fixed by the compiled code, so results are repeatable call to call.
    sc = s.dtype.type(scale)
    zero = s.dtype.type(0.0)
    one_s = s.dtype.type(1.0)
    for b in range(g.shape[0]):
        gb = g[b]
        sb = s[b]
        acc = 0.0
        for j in range(n):
            d = np.float64(gb[j * n + j])  # read before the row loop: s may be g itself
            row = gb[j * n:(j + 1) * n]
            racc = row.dtype.type(0.0)
            for k in range(n):  # one summation loop for both modes: loss() == loss_and_grad()[0] bitwise
                racc += abs(row[k])
            if write_s:  # the row is in L1 now; arithmetic, not branches (random signs mispredict: 5x slower)
                srow = sb[j * n:(j + 1) * n]
                for k in range(n):
                    x = row[k]
                    srow[k] = sc * (one_s * (x > 0) - one_s * (x < 0))
            # the row loop skipped the identity: swap the diagonal's |g_jj| for |g_jj - 1|
            x = d - 1.0
            acc += np.float64(racc) - abs(d) + abs(x)
            if write_s:
                sb[j * n + j] = sc if x > 0 else (-sc if x < 0 else zero)
        if not math.isfinite(acc):  # NaN/Inf anywhere in the slice: NaN loss, all-NaN S
            acc = math.nan
            if write_s:
                sb[:] = math.nan
        losses[loss_offset + b] = acc
