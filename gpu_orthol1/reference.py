"""The float64 reference and its tolerances: the one definition the tests, bench/ and `gpu-orthol1 bench` share.

Written from the seed's index formula, for Phi laid out (l, m, n):

    loss            = beta * sum_i sum_jk |sum_a Phi[a,i,j] Phi[a,i,k] - delta_jk|
    Gamma[a, i, b]  = 2 beta sum_j Phi[a, i, j] sign(sum_k Phi[k, i, j] Phi[k, i, b] - delta_jb)

The inner sums are float64 matmuls (BLAS), so the reference shapes of the
benchmark take well under a second; tests/test_reference.py checks them
against the formula written out as loops. Other axes are moved to (l, m, n)
first. Slices whose loss is not finite get NaN loss and an all-NaN gradient
(the package's policy).

Two front ends over the same computation:

- `reference` / `check`: whole-array, any axis, `check` asserts (the tests).
- `Reference.build` / `Reference.check`: chunked so float64 temporaries stay
  bounded on large inputs, and `check` reports instead of asserting (the bench,
  which marks a failing method `wrong` and goes on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Accepted error per precision class: loss relative to beta*sum|X| (the tests add the rounding
# magnitude beta*sum(|Phi|^T|Phi| + I), see check()); gradient relative to its entry bound
# 2|beta| sum_j |Phi[a,i,j]|; X entries within sign * (|Phi|^T|Phi| + I) of zero may flip sign
# between float32 accumulation and float64, and their gradient columns are not compared.
# float16 keeps the Gram in float32, so only the float16 rounding of the gradient costs accuracy.
# bfloat16 likewise: products of two bfloat16 numbers (8-bit significands) are exact in float32, so the
# loss errs as float32's does (measured: 3e-8), and the gradient is rounded once to bfloat16, 2^-8 of
# the entry bound at most (measured: 3.6e-3): its allowance is twice that (float16's is four times its
# 2^-11).
# "lowp" is for results whose Gram passes through float16 storage (the bench's naive float16
# expressions): the rounding of G itself, 2^-11 relative, is the floor.
# "tf32" is for precision="tf32" (float32 GEMMs on TF32 tensor cores, ours and the bench's peers): each operand rounded to a
# 10-bit mantissa (u = 2^-11 to nearest, 2^-10 if the hardware truncates) with float32 accumulation, so
# |dG| <= 2 * 2^-10 * (|Phi|^T |Phi|): loss and sign bound 2.5e-3, and the gradient GEMM's rounded Phi
# (S = sign is exact in TF32) 2^-10 of the entry bound: 1.5e-3. Bounds for either rounding; the errors
# measured on the reference shapes (bench/results/cpu-precision-error.json, TF32 emulated) are far below.
# "lowp-bf16" is the same for bfloat16 storage (the bench's torch and JAX bfloat16 expressions, whose
# matmuls return bfloat16): G, G - I and the loss itself each rounded by up to 2^-9, and |G| summed is
# up to 2.5x |G - I| summed, so the loss errs by up to 4.5 * 2^-9 = 8.8e-3 (measured: 2.8e-3 on 17x3x5);
# the gradient rounds twice (two bfloat16 GEMM outputs added), 2^-8 of its bound, allowed twice that;
# X's sign is trusted beyond the 2^-8 of G's two roundings.
TOL = {
    "float16": {"loss": 2e-5, "grad": 2e-3, "sign": 1e-5},
    "bfloat16": {"loss": 2e-5, "grad": 8e-3, "sign": 1e-5},
    "float32": {"loss": 2e-5, "grad": 2e-5, "sign": 1e-5},
    "float64": {"loss": 1e-12, "grad": 1e-12, "sign": 1e-13},
    "lowp": {"loss": 3e-3, "grad": 4e-3, "sign": 3e-3},
    "tf32": {"loss": 2.5e-3, "grad": 1.5e-3, "sign": 2.5e-3},
    "lowp-bf16": {"loss": 1e-2, "grad": 8e-3, "sign": 4e-3},
}
_DTYPES = (np.float16, np.float32, np.float64)
LOSS_RTOL = {t: TOL[np.dtype(t).name]["loss"] for t in _DTYPES}
GRAD_RTOL = {t: TOL[np.dtype(t).name]["grad"] for t in _DTYPES}
SIGN_RTOL = {t: TOL[np.dtype(t).name]["sign"] for t in _DTYPES}


def tolerance(dtype: Any, kind: str) -> float:
    """TOL's `kind` ("loss", "grad" or "sign") for inputs of `dtype` (a NumPy dtype or type; bfloat16
    by name, so that ml_dtypes is not needed to ask)."""
    return TOL[np.dtype(dtype).name][kind]


def _tiny(dtype: Any) -> float:
    """The dtype's smallest subnormal (ml_dtypes' finfo for bfloat16, which NumPy's does not know)."""
    if np.dtype(dtype).name == "bfloat16":
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).smallest_subnormal)
    return float(np.finfo(dtype).smallest_subnormal)


def _slices(P: np.ndarray, beta: float, eye: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, per-slice losses, Gamma) for float64 slices P of shape (c, l, n); Gamma is (c, l, n)."""
    X = np.matmul(P.transpose(0, 2, 1), P) - eye
    with np.errstate(invalid="ignore", over="ignore"):
        per = beta * np.abs(X).sum(axis=(1, 2))
        Gamma = 2.0 * beta * np.matmul(P, np.sign(X))
    bad = ~np.isfinite(per)
    per[bad] = np.nan
    Gamma[bad] = np.nan
    return X, per, Gamma


def _magnitude(A: np.ndarray, eye: np.ndarray) -> np.ndarray:
    """|Phi_i|^T |Phi_i| + I for |Phi| slices A (c, l, n): the scale of the rounding in X, entry by entry."""
    return np.matmul(A.transpose(0, 2, 1), A) + eye


# ---------------------------------------------------------------- the tests' front end


def to_lmn(phi: Any, axis: int) -> tuple[np.ndarray, bool]:
    """phi as a float64 (l, m, n) array (a 2-D phi: m = 1), and whether it was 2-D."""
    phi = np.asarray(phi, dtype=np.float64)
    if phi.ndim == 2:
        return phi[:, None, :], True
    return np.moveaxis(phi, axis, 1), False


def reference(phi: Any, beta: float = 1.0, axis: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-slice losses (m,), gradient of their sum with phi's shape, X (m, n, n)), all float64."""
    P, squeeze = to_lmn(phi, axis)
    X, per, Gamma = _slices(P.transpose(1, 0, 2), beta, np.eye(P.shape[2]))
    Gamma = Gamma.transpose(1, 0, 2)  # (l, m, n)
    grad = Gamma[:, 0, :] if squeeze else np.moveaxis(Gamma, 1, axis)
    return per, grad, X


def reduce(per: np.ndarray, reduction: str) -> Any:
    """The per-slice losses reduced as `reduction` ("sum", "mean" or "none") says."""
    if reduction == "none":
        return per
    total = per.sum()
    return total / len(per) if reduction == "mean" and len(per) else total


def check(
    phi: Any,
    loss: Any,
    grad: Any,
    beta: float = 1.0,
    axis: int = 1,
    reduction: str = "sum",
    dtype: Any = None,
    grad_base: Any = None,
    tol_class: str | None = None,
) -> float:
    """Assert loss/grad (NumPy arrays) match the reference; return the fraction of gradient entries compared.

    grad_base: what out held before an accumulate=True call (added to the reference). tol_class: a key
    of TOL in place of the dtype's class (e.g. "tf32")."""
    dtype = np.dtype(dtype or phi.dtype).type
    tol = TOL[tol_class or np.dtype(dtype).name]
    per, gref, X = reference(phi, beta, axis)
    m = per.shape[0]
    scale = 1.0 / m if reduction == "mean" and m else 1.0
    gref = gref * scale
    lref = reduce(per, reduction)
    P, squeeze = to_lmn(phi, axis)
    absP = np.abs(P)
    # rounding in G scales with sum_a |Phi_aj||Phi_ak| (+1 for the identity), not with the loss,
    # which is tiny for near-orthogonal inputs: bound the loss error by that magnitude
    mag = _magnitude(absP.transpose(1, 0, 2), np.eye(X.shape[-1]))
    lmag = abs(beta) * scale * mag.sum(axis=(1, 2))
    lmag = lmag if reduction == "none" else lmag.sum()
    got_loss = np.asarray(loss, np.float64)
    assert np.array_equal(np.isnan(got_loss), np.isnan(lref)), "loss NaN pattern differs"
    with np.errstate(invalid="ignore"):
        lerr = np.abs(got_loss - lref)
        ltol = tol["loss"] * (np.abs(lref) + lmag)
        assert np.all((lerr <= ltol) | np.isnan(lref)), f"loss off: {got_loss} vs {lref}"
    # gradient: mask columns (slice i, column b) whose X column holds a sign-ambiguous entry
    with np.errstate(invalid="ignore"):
        ambiguous = (np.abs(X) <= tol["sign"] * mag).any(axis=1)  # (m, n)
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
    gtol = tol["grad"] * bound + _tiny(dtype)
    gtol = np.broadcast_to(gtol, want.shape)[ok]
    if err.size:
        worst = np.argmax(err - gtol)
        assert np.all(err <= gtol), f"gradient off: {err[worst]} > {gtol[worst]}"
    return mask.mean() if mask.size else 1.0


def slice_rows(shape: tuple[int, ...], axis: int = 1) -> int:
    """l, the row count of each slice, for an input of this shape."""
    if len(shape) == 2:
        return shape[0]
    return [s for i, s in enumerate(shape) if i != axis % 3][0]


def random_phi(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: Any, l: int | None = None
) -> np.ndarray:
    """Random input whose X = G - I has entries of order 1 (never zeros); l sets the scale."""
    l = shape[0] if l is None else l
    x = rng.standard_normal(shape) * (1.3 / np.sqrt(max(l, 1)))
    return x.astype(dtype)


# ---------------------------------------------------------------- the bench's front end


@dataclass
class CheckResult:
    ok: bool
    loss_err: float  # |loss - ref| / |ref|
    grad_err: float  # max over compared entries of |grad - ref| / bound
    compared: float  # fraction of gradient entries compared (the rest are sign-ambiguous)
    why: str = ""


@dataclass
class Reference:
    """The reference of one (l, m, n) input (slices along axis 1), kept compact for large inputs."""

    per: np.ndarray  # per-slice losses (m,), float64
    grad: np.ndarray  # (l, m, n) gradient of the summed loss: float64, float32 for float16/32 inputs
    closeness: (
        np.ndarray
    )  # (m, n, n) float32: |X| / (|Phi|^T |Phi| + I), how near X = G - I is to a sign flip
    bound: np.ndarray  # (l, m, 1) = 2|beta| sum_j |Phi[a, i, j]|

    @property
    def loss(self) -> float:
        return float(self.per.sum())

    @classmethod
    def build(cls, phi: np.ndarray, beta: float = 1.0, chunk_bytes: int = 64 << 20) -> Reference:
        """Computed in float64 over chunks of slices, so the float64 temporaries stay near chunk_bytes
        whatever the input size; the stored gradient is float32 for float16/32 inputs (its rounding,
        6e-8 of the entry bound, is far below every tolerance)."""
        l, m, n = phi.shape
        gdt = np.float64 if phi.dtype == np.float64 else np.float32
        per = np.empty(m)
        grad = np.empty((l, m, n), dtype=gdt)
        close = np.empty((m, n, n), dtype=np.float32)
        bound = np.empty((l, m, 1))
        step = max(1, chunk_bytes // max(1, 8 * (3 * l * n + 3 * n * n)))
        eye = np.eye(n)
        for s0 in range(0, m, step):
            s1 = min(m, s0 + step)
            P = np.asarray(phi[:, s0:s1, :], dtype=np.float64).transpose(1, 0, 2)  # (c, l, n)
            X, per[s0:s1], Gamma = _slices(P, beta, eye)
            grad[:, s0:s1, :] = Gamma.transpose(1, 0, 2)
            A = np.abs(P)
            with np.errstate(invalid="ignore", divide="ignore"):
                close[s0:s1] = np.abs(X) / _magnitude(A, eye)
            bound[:, s0:s1, 0] = 2 * abs(beta) * A.sum(axis=2).T
        return cls(per, grad, close, bound)

    def check(self, loss: Any, grad: Any, tol_class: str) -> CheckResult:
        """Whether (loss, grad) is right within TOL[tol_class]; reports instead of raising."""
        tol = TOL[tol_class]
        lref = self.loss
        loss = float(np.asarray(loss, dtype=np.float64))
        loss_err = abs(loss - lref) / max(abs(lref), 1e-300)
        with np.errstate(invalid="ignore"):
            ambiguous = np.asarray((self.closeness <= tol["sign"]).any(axis=1))  # (m, n): column b of slice i
        got = np.asarray(grad)
        if got.shape != self.grad.shape:
            return CheckResult(
                False, loss_err, np.inf, 0.0, f"gradient shape {got.shape} != {self.grad.shape}"
            )
        l, m, n = got.shape
        grad_err = 0.0
        step = max(1, (16 << 20) // max(1, l * n))  # float64 temporaries of ~128 MiB at most
        for s0 in range(0, m, step):
            s1 = min(m, s0 + step)
            e = np.abs(np.asarray(got[:, s0:s1], dtype=np.float64) - self.grad[:, s0:s1])
            e /= self.bound[:, s0:s1] + 1e-300
            e = np.where(ambiguous[None, s0:s1, :], 0.0, e)  # NaN (a wrong NaN) stays NaN
            if e.size:
                worst = float(e.max())  # NaN if any compared entry is NaN
                grad_err = (
                    worst if not np.isfinite(worst) or not np.isfinite(grad_err) else max(grad_err, worst)
                )
                if not np.isfinite(grad_err):
                    break
        compared = float(1.0 - ambiguous.mean()) if ambiguous.size else 1.0
        why = []
        if not np.isfinite(loss) or loss_err > tol["loss"]:
            why.append(f"loss off by {loss_err:.2e} (relative; allowed {tol['loss']:.0e})")
        if not np.isfinite(grad_err) or grad_err > tol["grad"]:
            why.append(f"gradient off by {grad_err:.2e} of its bound (allowed {tol['grad']:.0e})")
        return CheckResult(not why, loss_err, grad_err, compared, "; ".join(why))
