"""Float64 reference and tolerance check for `gpu-orthol1 bench`.

The same formula as tests/reference.py (which the installed package cannot
import), computed with BLAS matmuls instead of einsum so it takes well under a
second on the reference shapes; tests/test_bench.py asserts both agree. Inputs
here are always laid out (l, m, n) with the slices along axis 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Accepted error per precision class, as in tests/reference.py: loss relative to beta*sum|X|;
# gradient relative to its entry bound 2|beta| sum_j |Phi[a,i,j]|; X entries within
# sign_rtol * (|Phi|^T|Phi|) of zero may flip sign, and their gradient columns are not compared.
# "float32" and "float64" are tests/reference.py's figures. "lowp" is for results whose Gram
# passes through float16 storage (the naive float16 expressions) or TF32 inputs (11-bit
# significand): there the rounding of G itself, 2^-11 relative, is the floor.
TOL = {
    "float16": {"loss": 2e-5, "grad": 2e-3, "sign": 1e-5},
    "float32": {"loss": 2e-5, "grad": 2e-5, "sign": 1e-5},
    "float64": {"loss": 1e-12, "grad": 1e-12, "sign": 1e-13},
    "lowp": {"loss": 3e-3, "grad": 4e-3, "sign": 3e-3},
}


@dataclass
class Reference:
    per: np.ndarray  # per-slice losses (m,), float64
    grad: np.ndarray  # (l, m, n) float64, gradient of the summed loss
    X: np.ndarray  # (m, n, n) = G - I
    mag: np.ndarray  # (m, n, n) = |Phi|^T |Phi| + I, the scale of X's rounding error
    bound: np.ndarray  # (l, m, 1) = 2|beta| sum_j |Phi[a, i, j]|

    @property
    def loss(self) -> float:
        return float(self.per.sum())


def reference(phi: np.ndarray, beta: float = 1.0) -> Reference:
    P = np.asarray(phi, dtype=np.float64).transpose(1, 0, 2)  # (m, l, n)
    n = P.shape[2]
    X = np.matmul(P.transpose(0, 2, 1), P) - np.eye(n)
    with np.errstate(invalid="ignore"):
        per = beta * np.abs(X).sum(axis=(1, 2))
        Gamma = 2.0 * beta * np.matmul(P, np.sign(X))
    bad = ~np.isfinite(per)
    per[bad] = np.nan
    Gamma[bad] = np.nan
    A = np.abs(P)
    A32 = A.astype(np.float32)  # only a scale for the sign tolerance: float32 is plenty, and twice as fast
    mag = np.matmul(A32.transpose(0, 2, 1), A32).astype(np.float64) + np.eye(n)
    bound = 2 * abs(beta) * A.sum(axis=2).T[:, :, None]
    return Reference(per, Gamma.transpose(1, 0, 2), X, mag, bound)


@dataclass
class CheckResult:
    ok: bool
    loss_err: float  # |loss - ref| / |ref|
    grad_err: float  # max over compared entries of |grad - ref| / bound
    compared: float  # fraction of gradient entries compared (the rest are sign-ambiguous)
    why: str = ""


def check(ref: Reference, loss, grad, tol_class: str) -> CheckResult:
    tol = TOL[tol_class]
    lref = ref.loss
    loss = float(np.asarray(loss, dtype=np.float64))
    loss_err = abs(loss - lref) / max(abs(lref), 1e-300)
    with np.errstate(invalid="ignore"):
        ambiguous = (np.abs(ref.X) <= tol["sign"] * ref.mag).any(axis=1)  # (m, n): column b of slice i
    mask = ~ambiguous[None, :, :]
    got = np.asarray(grad, dtype=np.float64)
    if got.shape != ref.grad.shape:
        return CheckResult(False, loss_err, np.inf, 0.0, f"gradient shape {got.shape} != {ref.grad.shape}")
    err = np.abs(got - ref.grad) / (ref.bound + 1e-300)
    err = np.where(mask, err, 0.0)
    grad_err = float(err.max()) if err.size else 0.0
    compared = float(np.broadcast_to(mask, got.shape).mean()) if got.size else 1.0
    why = []
    if not np.isfinite(loss) or loss_err > tol["loss"]:
        why.append(f"loss off by {loss_err:.2e} (relative; allowed {tol['loss']:.0e})")
    if not np.isfinite(grad_err) or grad_err > tol["grad"]:
        why.append(f"gradient off by {grad_err:.2e} of its bound (allowed {tol['grad']:.0e})")
    return CheckResult(not why, loss_err, grad_err, compared, "; ".join(why))
