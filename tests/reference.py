"""Float64 reference, written from the seed's index formula, shared by the tests and bench/.

    loss            = beta * sum_i sum_jk |sum_a Phi[a,i,j] Phi[a,i,k] - delta_jk|
    Gamma[a, i, b]  = 2 beta sum_j Phi[a, i, j] sign(sum_k Phi[k, i, j] Phi[k, i, b] - delta_jb)

for Phi laid out (l, m, n); other axes are moved there first. Slices whose
loss is not finite get NaN loss and an all-NaN gradient (the package's policy).
"""

from __future__ import annotations

import numpy as np

# Per-dtype tolerances: loss relative to sum |X|; gradient relative to its entry bound
# 2|beta| sum_j |Phi[a,i,j]|. float16 keeps the Gram in float32, so only the
# float16 rounding of the gradient costs accuracy there.
LOSS_RTOL = {np.float16: 2e-5, np.float32: 2e-5, np.float64: 1e-12}
GRAD_RTOL = {np.float16: 2e-3, np.float32: 2e-5, np.float64: 1e-12}
# Entries of X = G - I closer to 0 than this (relative to sum_a |Phi_aj||Phi_ak|) may
# flip sign between float32 accumulation and float64: their gradient columns are not compared.
SIGN_RTOL = {np.float16: 1e-5, np.float32: 1e-5, np.float64: 1e-13}


def to_lmn(phi, axis):
    phi = np.asarray(phi, dtype=np.float64)
    if phi.ndim == 2:
        return phi[:, None, :], True
    return np.moveaxis(phi, axis, 1), False


def reference(phi, beta=1.0, axis=1):
    """(per-slice losses (m,), gradient of their sum with phi's shape, X (m, n, n)), all float64."""
    P, squeeze = to_lmn(phi, axis)
    l, m, n = P.shape
    X = np.einsum("kij,kib->ijb", P, P, optimize=True) - np.eye(n)
    with np.errstate(invalid="ignore"):
        per = beta * np.abs(X).sum(axis=(1, 2))
        S = np.sign(X)
        Gamma = 2.0 * beta * np.einsum("aij,ijb->aib", P, S, optimize=True)
    bad = ~np.isfinite(per)
    per[bad] = np.nan
    Gamma[:, bad, :] = np.nan
    grad = Gamma[:, 0, :] if squeeze else np.moveaxis(Gamma, 1, axis)
    return per, grad, X


def reduce(per, reduction):
    if reduction == "none":
        return per
    total = per.sum()
    return total / len(per) if reduction == "mean" and len(per) else total


def check(phi, loss, grad, beta=1.0, axis=1, reduction="sum", dtype=None, grad_base=None):
    """Assert loss/grad (NumPy arrays) match the reference; return the fraction of gradient entries compared.

    grad_base: what out held before an accumulate=True call (added to the reference)."""
    dtype = np.dtype(dtype or phi.dtype).type
    per, gref, X = reference(phi, beta, axis)
    m = per.shape[0]
    scale = 1.0 / m if reduction == "mean" and m else 1.0
    gref = gref * scale
    lref = reduce(per, reduction)
    P, squeeze = to_lmn(phi, axis)
    absP = np.abs(P)
    # rounding in G scales with sum_a |Phi_aj||Phi_ak| (+1 for the identity), not with the loss,
    # which is tiny for near-orthogonal inputs: bound the loss error by that magnitude
    mag = np.einsum("kij,kib->ijb", absP, absP, optimize=True) + np.eye(X.shape[-1])
    lmag = abs(beta) * scale * mag.sum(axis=(1, 2))
    lmag = lmag if reduction == "none" else lmag.sum()
    got_loss = np.asarray(loss, np.float64)
    assert np.array_equal(np.isnan(got_loss), np.isnan(lref)), "loss NaN pattern differs"
    with np.errstate(invalid="ignore"):
        lerr = np.abs(got_loss - lref)
        ltol = LOSS_RTOL[dtype] * (np.abs(lref) + lmag)
        assert np.all((lerr <= ltol) | np.isnan(lref)), f"loss off: {got_loss} vs {lref}"
    # gradient: mask columns (slice i, column b) whose X column holds a sign-ambiguous entry
    with np.errstate(invalid="ignore"):
        ambiguous = (np.abs(X) <= SIGN_RTOL[dtype] * mag).any(axis=1)  # (m, n)
    bound = 2 * abs(beta) * scale * absP.sum(axis=2, keepdims=True)  # (l, m, 1)
    got = np.asarray(grad, np.float64)
    got_lmn = got[:, None, :] if squeeze else np.moveaxis(got, axis, 1)
    want = gref[:, None, :] if squeeze else np.moveaxis(gref, axis, 1)
    if grad_base is not None:
        base = np.asarray(grad_base, np.float64)
        base_lmn = base[:, None, :] if squeeze else np.moveaxis(base, axis, 1)
        want = want + base_lmn
        bound = bound + np.abs(base_lmn)
    mask = np.broadcast_to(~ambiguous[None, :, :], want.shape)
    nan_want = np.isnan(want)
    assert np.array_equal(np.isnan(got_lmn) & mask, nan_want & mask), "NaN pattern differs"
    ok = mask & ~nan_want
    err = np.abs(got_lmn - want)[ok]
    tol = GRAD_RTOL[dtype] * bound + np.finfo(dtype).smallest_subnormal
    tol = np.broadcast_to(tol, want.shape)[ok]
    if err.size:
        worst = np.argmax(err - tol)
        assert np.all(err <= tol), f"gradient off: {err[worst]} > {tol[worst]}"
    return mask.mean() if mask.size else 1.0


def slice_rows(shape, axis=1):
    """l, the row count of each slice, for an input of this shape."""
    if len(shape) == 2:
        return shape[0]
    return [s for i, s in enumerate(shape) if i != axis % 3][0]


def random_phi(rng, shape, dtype, l=None):
    """Random input whose X = G - I has entries of order 1 (never zeros); l sets the scale."""
    l = shape[0] if l is None else l
    x = rng.standard_normal(shape) * (1.3 / np.sqrt(max(l, 1)))
    return x.astype(dtype)
