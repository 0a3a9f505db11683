"""CPU twin of ``fused_small.py``: loss and gradient of small slices in one compiled loop.

For each slice Phi_i (l x n) of the (m, l, n) view: G = Phi_i^T Phi_i, accumulated in float64 and
rounded once to phi's dtype (the Gram the GEMM path holds, in its precision: an entry past float32's
range is Inf here too), the loss sum |G - I| in float64 and S = sign(G - I) (sign(0) = 0), then
alpha * Phi_i S (float64 sums) written (or added) where the gradient's slice lies. Same NaN policy as
``sign_abs_cpu.py``: a slice whose sum is not finite gets a NaN loss and an all-NaN gradient.

Not bit-identical to the GEMM path: BLAS accumulates a float32 Gram in float32, this loop in float64,
so an entry within float32 rounding of 0 may take the other sign here (the more accurate one: the
float64 reference's, which the tests compare both against).

What it replaces on small slices is not arithmetic but overhead: the GEMM path makes two NumPy
matmul calls, a sign-pass call and a chunk loop per call, tens of microseconds on PointNet's
(32, 3, 3) transforms against about a microsecond of arithmetic here. Scalar loops lose to BLAS as
soon as the slices grow, so a plan takes this path only for calls of a few hundred kflop
(`gpu_orthol1._device.CPU_FUSED_MAX_FLOPS`).

Serial, like the sign pass: the calls it serves are far too short to hand to threads.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def fused_l1(V, out, losses, loss_offset, alpha, accumulate, want_grad):  # pragma: no cover - compiled
    # Row-outer loops (a row of Phi_i at a time: rank-1 updates of G, then each gradient row from
    # it), so that the innermost loop runs along rows, where LLVM vectorizes. Both triangles of G
    # get the same products in the same order, so G, and S, come out exactly symmetric.
    m, l, n = V.shape
    G = np.empty((n, n), dtype=np.float64)
    Gr = np.empty((n, n), dtype=V.dtype)  # G rounded to phi's dtype, as the GEMM path holds it
    S = np.empty((n, n), dtype=np.float64)
    row = np.empty(n, dtype=np.float64)
    acc = np.empty(n, dtype=np.float64)
    for b in range(m):
        G[:, :] = 0.0
        for r in range(l):
            for j in range(n):
                row[j] = V[b, r, j]
            for j in range(n):
                x = row[j]
                for k in range(n):
                    G[j, k] += x * row[k]
        Gr[:, :] = G
        total = 0.0
        for j in range(n):
            for k in range(n):
                g = np.float64(Gr[j, k])
                d = g - 1.0 if j == k else g
                total += abs(d)
                S[j, k] = 1.0 if d > 0 else (-1.0 if d < 0 else 0.0)
        if not math.isfinite(total):  # NaN/Inf anywhere in the slice: NaN loss, all-NaN gradient
            total = math.nan
            S[:, :] = math.nan
        losses[loss_offset + b] = total
        if not want_grad:
            continue
        for r in range(l):
            acc[:] = 0.0
            for j in range(n):
                x = np.float64(V[b, r, j])
                for k in range(n):
                    acc[k] += x * S[j, k]
            if accumulate:
                for k in range(n):
                    out[b, r, k] += alpha * acc[k]
            else:
                for k in range(n):
                    out[b, r, k] = alpha * acc[k]
