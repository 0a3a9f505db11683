"""The orthogonality metrics of a chunk of Grams in one pass (CPU; see gpu_orthol1/_metrics.py).

NumPy takes about ten passes and two temporaries for them (|G|, its sums, the diagonal, the
normalized copy, its max): on the 72 matrices of a 12-layer d_model 512 transformer that added
about 10 % to `OrthoL1.loss()`. Here each slice of G is read once, while the loss pass's chunk is
still in cache. Serial, like sign_abs_cpu.py, for the same reason.
"""

from __future__ import annotations

import math

import numba
import numpy as np


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
