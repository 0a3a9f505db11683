"""The orthogonality metrics of a chunk of Grams (CPU; see gpu_orthol1/_metrics.py).

NumPy takes about ten passes and two temporaries for them (|G|, its sums, the diagonal, the
normalized copy, its max): on the 72 matrices of a 12-layer d_model 512 transformer that added
about 10 % to `OrthoL1.loss()`. `gram_metrics` reads each slice of G once; `sign_abs_metrics` goes
further and computes them inside the loss pass's own per-slice loop (`sign_abs_cpu.sign_abs_sum`),
while the slice is in cache: mean_abs is the slice's loss over n^2 (the L1 pass already sums
|G - I|), max_cos and ||G - I||_F^2 come from two vectorized reads of the slice in cache.
Serial, like sign_abs_cpu.py, for the same reason.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .sign_abs_cpu import sign_abs_sum


@numba.njit(cache=True, nogil=True)
def gram_metrics(g, n, max_cos, fro, mean_abs):  # pragma: no cover - compiled
    """g: (count, n*n) Grams; per slice into max_cos, fro, mean_abs (float64)."""
    inv = np.empty(n, dtype=np.float64)
    for k in range(g.shape[0]):
        for i in range(n):
            d = np.float64(g[k, i * n + i])
            inv[i] = 1.0 / math.sqrt(d) if d > 0 else 0.0
        a = 0.0
        q = 0.0
        c = 0.0
        for i in range(n):
            row = i * n
            ii = inv[i]
            for j in range(n):
                x = np.float64(g[k, row + j])
                e = x - 1.0 if i == j else x
                a += abs(e)
                q += e * e
                if i != j:
                    v = abs(x) * ii * inv[j]
                    if v > c:
                        c = v
        max_cos[k] = c
        fro[k] = math.sqrt(q / n)
        mean_abs[k] = a / (n * n)


# Flat and fixed-length loops, as in sign_abs_cpu.py, are what LLVM vectorizes: the squares over the
# whole slice, then per row the products |G_ij| inv_j into a scratch row whose maximum is taken on
# the bits (for floats >= 0 the int64 order is the float order, and an integer max reduction
# vectorizes where numba's float max does not): 2x faster than a row loop over the upper triangle.
# The diagonal is set to 0 for both loops and restored after, so that neither sees it: its squares
# (G_jj - 1)^2 are summed apart, in float64 (subtracting G_jj^2 from the flat sum instead loses
# ||G - I||_F to cancellation when G is near I). A slice holding NaN/Inf gets NaN metrics from its
# loss (the sign pass makes that NaN), whatever these loops return for it.
@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _slice_metrics(gb, n, inv, t, ti, dg):  # pragma: no cover - compiled
    """(max over i != j of |G_ij| inv_i inv_j, sum of (G - I)^2) of one slice; t/ti: (n,) scratch
    float64 and its int64 view, dg: (n,) scratch of gb's dtype for the diagonal."""
    zero = gb.dtype.type(0.0)
    dq = 0.0
    for i in range(n):
        dg[i] = gb[i * (n + 1)]
        x = np.float64(dg[i]) - 1.0
        dq += x * x
        gb[i * (n + 1)] = zero
    q = 0.0
    for k in range(n * n):
        x = np.float64(gb[k])
        q += x * x
    c = 0.0
    for i in range(n):
        row = i * n
        for j in range(n):
            t[j] = abs(np.float64(gb[row + j])) * inv[j]
        ci = 0
        for j in range(n):
            v = ti[j]
            ci = v if v > ci else ci
        ti[0] = ci
        c = max(c, t[0] * inv[i])
    for i in range(n):
        gb[i * (n + 1)] = dg[i]
    return c, q + dq


@numba.njit(cache=True, nogil=True)
def sign_abs_metrics(
    g, s, n, losses, loss_offset, scale, write_s, max_cos, fro, mean_abs
):  # pragma: no cover - compiled
    """`sign_abs_sum` (the default L1 pass, the same compiled loop: the same losses and S bit for
    bit) and, per slice before its signs overwrite it, the metrics into max_cos, fro, mean_abs."""
    inv = np.empty(n, dtype=np.float64)
    t = np.empty(n, dtype=np.float64)
    ti = t.view(np.int64)
    dg = np.empty(n, dtype=g.dtype)
    for b in range(g.shape[0]):
        gb = g[b]
        for i in range(n):
            d = np.float64(gb[i * (n + 1)])
            inv[i] = 1.0 / math.sqrt(d) if d > 0 else 0.0
        c, q = _slice_metrics(gb, n, inv, t, ti, dg)
        sign_abs_sum(g[b : b + 1], s[b : b + 1], n, losses, loss_offset + b, scale, write_s)
        loss = losses[loss_offset + b]
        if math.isfinite(loss):
            max_cos[b] = c
            fro[b] = math.sqrt(max(q, 0.0) / n)
        else:
            max_cos[b] = math.nan
            fro[b] = math.nan
        mean_abs[b] = loss / (n * n)
