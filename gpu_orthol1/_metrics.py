"""How orthogonal each slice is, read off the Gram matrices a pass already forms.

Per slice with Gram G = Phi^T Phi (n x n) and E = G - I:

- ``max_cos``: max over i != j of |G_ij| / sqrt(G_ii G_jj), the cosine of the worst pair of
  columns (0 for a zero column, and for n = 1);
- ``fro``: ||E||_F / sqrt(n) (0 for an orthonormal slice, 1 for a zero one);
- ``mean_abs``: the mean |E_jk| over the n^2 entries;
- ``penalty``: the slice's share of the loss, beta times its unscaled loss (which the pass's own
  sign pass computes, so every member of the penalty family reports its own value).

`Collector` is a `gram_hook` for `_driver.run` / `_plan.execute` (a `_driver.MetricsHook`): it sees
each chunk of Grams before the sign pass overwrites them, so the metrics cost no GEMM of their own.
On the CPU the device computes them inside its sign pass (`kernels/metrics_cpu.sign_abs_metrics`,
one read of each slice); on the GPU the hook runs CuPy's elementwise passes over the chunk. Everything stays in the array module `xp` (NumPy or CuPy): no host sync.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _driver

KEYS = ("penalty", "max_cos", "fro", "mean_abs")


def chunk_metrics(xp: Any, ws: Any, n: int, max_cos: Any, fro: Any, mean_abs: Any) -> None:
    """Write the metrics of a chunk of Grams `ws` ((count, n*n), any float dtype) into the (count,)
    float64 arrays `max_cos`, `fro` and `mean_abs` (views of the caller's buffers)."""
    if xp is np and ws.shape[0] and n and ws.flags.c_contiguous:
        from .kernels import metrics_cpu  # one pass over the Grams (Numba, compiled on first use)

        metrics_cpu.gram_metrics(ws, n, max_cos, fro, mean_abs)
        return
    chunk_metrics_xp(xp, ws, n, max_cos, fro, mean_abs)


def chunk_metrics_xp(xp: Any, ws: Any, n: int, max_cos: Any, fro: Any, mean_abs: Any) -> None:
    """`chunk_metrics` with the array module's own operations (CuPy; NumPy in the tests)."""
    count = ws.shape[0]
    if count == 0:
        return
    if n == 0:
        max_cos[...] = 0
        fro[...] = 0
        mean_abs[...] = 0
        return
    G = ws.reshape(count, n, n)
    d = xp.diagonal(G, axis1=1, axis2=2).astype(np.float64)  # (count, n), a copy
    A = xp.abs(G)
    # the sums of |E| and E^2 from those of G: only the diagonal differs, so no G - I is formed
    abs_sum = A.sum(axis=(1, 2), dtype=np.float64) - xp.abs(d).sum(axis=1) + xp.abs(d - 1.0).sum(axis=1)
    sq = xp.einsum("kij,kij->k", G, G).astype(np.float64)
    sq = sq - (d * d).sum(axis=1) + ((d - 1.0) ** 2).sum(axis=1)
    fro[...] = xp.sqrt(xp.maximum(sq, 0.0) / n)
    mean_abs[...] = abs_sum / (n * n)
    if n == 1:
        max_cos[...] = 0
        return
    # a zero column has no direction: its cosines count as 0 (as normalize=True treats it)
    pos = d > 0
    inv = xp.where(pos, 1.0 / xp.sqrt(xp.where(pos, d, 1.0)), 0.0).astype(A.dtype)
    A *= inv[:, :, None]
    A *= inv[:, None, :]
    idx = xp.arange(n)
    A[:, idx, idx] = 0
    max_cos[...] = A.reshape(count, n * n).max(axis=1).astype(np.float64)


class Collector(_driver.MetricsHook):
    """Per-slice metric buffers of `m` slices and the `gram_hook` that fills them, chunk after chunk
    in order (a hook sees the chunks of a call one after another, from slice `first`). Pass the
    collector itself as the hook: the CPU device then fills the buffers inside its sign pass."""

    def __init__(self, xp: Any, m: int, n: int, first: int = 0, bufs: dict | None = None):
        self.xp, self.n, self.pos = xp, n, first
        if bufs is None:
            bufs = {k: xp.zeros(m, dtype=np.float64) for k in KEYS[1:]}
        self.bufs = bufs

    def take(self, count: int) -> tuple:
        s = slice(self.pos, self.pos + count)
        self.pos += count
        b = self.bufs
        return b["max_cos"][s], b["fro"][s], b["mean_abs"][s]

    def hook(self, ws: Any) -> None:
        chunk_metrics(self.xp, ws, self.n, *self.take(ws.shape[0]))

    __call__ = hook


def metrics(
    phi: Any,
    beta: float = 1.0,
    *,
    axis: int = 1,
    precision: str = "highest",
    backend: str = "auto",
    workspace_bytes: int | None = None,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
) -> dict:
    """Per-slice orthogonality metrics of phi's slices along `axis`, from one Gram-only pass.

    Args:
        phi: a NumPy or CuPy array, 2-D (one slice) or 3-D, float16/32/64 (as for `loss`).
        beta: the penalty's weight (finite, >= 0): "penalty" is beta times each slice's loss.
        axis: which axis of a 3-D phi indexes the slices (as for `loss`).
        precision: "highest" or "tf32" (the Gram GEMM's, GPU only).
        backend: "auto", "numpy" or "cupy".
        workspace_bytes: the Gram workspace's budget (as for `loss`).
        penalty: which penalty "penalty" reports ("l1" or "l2"; the other metrics do not depend on it).
        diagonal: as for `loss`: False leaves the diagonal out of the penalty.
        normalize: as for `loss`: True takes the penalty of the unit-normalized columns' Gram.

    Returns:
        {"penalty", "max_cos", "fro", "mean_abs"}: float64 arrays of phi's array kind, shape (m,)
        for a 3-D phi (one entry per slice), 0-d for a 2-D phi. max_cos is the largest
        |cosine| between two different columns of a slice (the Gram of its unit-normalized
        columns, off the diagonal), fro is ||G - I||_F / sqrt(n), mean_abs the mean |G - I| entry.
        No gradient GEMM runs and nothing is copied to the host.

    Raises:
        TypeError: phi is not a NumPy/CuPy float16/32/64 array.
        ValueError: a bad beta, axis, precision, backend or penalty argument (as for `loss`).

    Example:
        >>> import numpy as np, gpu_orthol1 as ol1
        >>> q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((16, 16)))
        >>> float(ol1.metrics(q[:, :8])["max_cos"]) < 1e-12
        True
    """
    from . import _cache, _checks, _plan

    p = _cache.cached(phi, axis, "none", precision, backend, workspace_bytes, penalty, diagonal, normalize)
    b = _checks.check_beta(beta)
    xp, host_in, squeeze = _plan.io(p)
    col = Collector(xp, p.m, p.n)
    losses = xp.empty(p.m, dtype=np.float64)  # the unscaled per-slice losses, float64 for every dtype
    _plan.execute(p, phi, None, False, b, False, gram_hook=col, losses=losses)
    out = {"penalty": losses * b, **col.bufs}
    if host_in:  # a NumPy input computed on the GPU: hand back NumPy arrays, like `loss`
        out = {k: xp.asnumpy(v) for k, v in out.items()}
    if squeeze:
        out = {k: v.reshape(()) for k, v in out.items()}
    return out
