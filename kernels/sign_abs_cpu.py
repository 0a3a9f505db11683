"""CPU twin of ``sign_abs.py``: the same fused pass over the Gram workspace, for the NumPy backend.

NumPy needs three passes and a temporary for it (subtract identity, |.|-sum,
sign), about a third of the GEMM time at n=64; this loop reads G once and
writes S once while the chunk is still in cache. Semantics are those of the
CUDA kernel (tests hold both to the same reference): S = scale * sign(G - I),
sign(0) = 0, NaN stays NaN, and a slice whose sum is not finite gets an all-NaN
S and a NaN loss.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def sign_abs_sum(g, s, n, losses, loss_offset, scale, write_s):  # pragma: no cover - compiled
    slices = g.shape[0]
    nn = n * n
    for b in numba.prange(slices):
        acc = 0.0
        for k in range(nn):
            x = np.float64(g[b, k])
            if k % (n + 1) == 0:
                x -= 1.0
            acc += abs(x)
            if write_s:
                if x > 0.0:
                    s[b, k] = scale
                elif x < 0.0:
                    s[b, k] = -scale
                elif x == 0.0:
                    s[b, k] = 0.0
                else:
                    s[b, k] = x
        if not math.isfinite(acc):
            acc = math.nan
            if write_s:
                for k in range(nn):
                    s[b, k] = math.nan
        losses[loss_offset + b] = acc
