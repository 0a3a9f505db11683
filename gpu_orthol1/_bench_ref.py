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
    grad: np.ndarray  # (l, m, n) gradient of the summed loss: float64, float32 for float16/32 inputs
    closeness: np.ndarray  # (m, n, n) float32: |X| / (|Phi|^T |Phi| + I), how near X = G - I is to a sign flip
    bound: np.ndarray  # (l, m, 1) = 2|beta| sum_j |Phi[a, i, j]|

    @property
    def loss(self) -> float:
        return float(self.per.sum())


def reference(phi: np.ndarray, beta: float = 1.0, chunk_bytes: int = 64 << 20) -> Reference:
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
        X = np.matmul(P.transpose(0, 2, 1), P) - eye
        with np.errstate(invalid="ignore", over="ignore"):
            p = beta * np.abs(X).sum(axis=(1, 2))
            Gamma = 2.0 * beta * np.matmul(P, np.sign(X))
        bad = ~np.isfinite(p)
        p[bad] = np.nan
        Gamma[bad] = np.nan
        per[s0:s1] = p
        grad[:, s0:s1, :] = Gamma.transpose(1, 0, 2)
        A = np.abs(P)
        with np.errstate(invalid="ignore", divide="ignore"):
            close[s0:s1] = np.abs(X) / (np.matmul(A.transpose(0, 2, 1), A) + eye)
        bound[:, s0:s1, 0] = 2 * abs(beta) * A.sum(axis=2).T
    return Reference(per, grad, close, bound)


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
        ambiguous = np.asarray((ref.closeness <= tol["sign"]).any(axis=1))  # (m, n): column b of slice i
    got = np.asarray(grad)
    if got.shape != ref.grad.shape:
        return CheckResult(False, loss_err, np.inf, 0.0, f"gradient shape {got.shape} != {ref.grad.shape}")
    l, m, n = got.shape
    grad_err = 0.0
    step = max(1, (16 << 20) // max(1, l * n))  # float64 temporaries of ~128 MiB at most
    for s0 in range(0, m, step):
        s1 = min(m, s0 + step)
        e = np.abs(np.asarray(got[:, s0:s1], dtype=np.float64) - ref.grad[:, s0:s1])
        e /= ref.bound[:, s0:s1] + 1e-300
        e = np.where(ambiguous[None, s0:s1, :], 0.0, e)  # NaN (a wrong NaN) stays NaN
        if e.size:
            worst = float(e.max())  # NaN if any compared entry is NaN
            grad_err = worst if not np.isfinite(worst) or not np.isfinite(grad_err) else max(grad_err, worst)
            if not np.isfinite(grad_err):
                break
    compared = float(1.0 - ambiguous.mean()) if ambiguous.size else 1.0
    why = []
    if not np.isfinite(loss) or loss_err > tol["loss"]:
        why.append(f"loss off by {loss_err:.2e} (relative; allowed {tol['loss']:.0e})")
    if not np.isfinite(grad_err) or grad_err > tol["grad"]:
        why.append(f"gradient off by {grad_err:.2e} of its bound (allowed {tol['grad']:.0e})")
    return CheckResult(not why, loss_err, grad_err, compared, "; ".join(why))
