"""Public entry points: the functional API over cached plans, and `plan` itself."""

from __future__ import annotations

from typing import Any, Literal

from . import _cache, _checks, _plan
from ._plan import Plan

# Public signature types. Arrays are NumPy or CuPy (CuPy is optional, hence Any).
Reduction = Literal["sum", "mean", "none"]
Backend = Literal["auto", "numpy", "cupy"]
Precision = Literal["highest", "tf32"]
Want = Literal["loss", "grad", "loss_and_grad"]
Kernel = Literal["auto", "gemm", "fused"]
Penalty = Literal["l1", "l2"]


def _run(
    phi: Any,
    beta: Any,
    axis: Any,
    reduction: Any,
    out: Any,
    accumulate: Any,
    backend: Any,
    precision: Any,
    workspace_bytes: Any,
    want_grad: bool,
    penalty: Any = "l1",
    diagonal: Any = True,
    normalize: Any = False,
) -> tuple[Any, Any]:
    p = _cache.cached(phi, axis, reduction, precision, backend, workspace_bytes, penalty, diagonal, normalize)
    b = _checks.check_beta(beta)
    if want_grad:
        _plan.check_out(p, out, phi, accumulate)
    return _plan.execute(p, phi, out, accumulate, b, want_grad)


def plan(
    phi: Any,
    beta: float = 1.0,
    *,
    axis: int = 1,
    reduction: Reduction = "sum",
    want: Want = "loss_and_grad",
    precision: Precision = "highest",
    backend: Backend = "auto",
    workspace_bytes: int | None = None,
    kernel: Kernel = "auto",
    penalty: Penalty = "l1",
    diagonal: bool = True,
    normalize: bool = False,
) -> Plan:
    """A reusable `Plan` for arrays like `phi` (same shape, dtype, strides, array kind and device).

    ``plan(phi2, out=None, accumulate=False)`` returns what `want` names ("loss", "grad" or
    "loss_and_grad"), exactly as `loss`, `grad` and `loss_and_grad` return them. Everything that
    does not change from call to call is decided here once: backend and device, layouts, chunking,
    workspace sizes, launch configurations. A plan called with an array that does not match raises
    ValueError naming what differs, before anything is written.

    kernel: the path. On the GPU "gemm" (two cuBLAS GEMMs around the elementwise pass), "fused" (one
    launch per call for slices up to n=96 in float16/float32, 64 in float64: the Gram never leaves
    the chip), "auto" ("fused" by a rule set from H100 measurements: precision "highest";
    float16/float32 with n <= 16 up to l = 1024, n <= 32 up to l = 512, n <= 64 up to l = 256,
    n <= 96 up to l = 128; float64 with n <= 32 up to l = 64; for the default penalty, no workspace
    cap and a layout BLAS reads in place; "gemm" elsewhere; the environment variable
    GPU_ORTHOL1_KERNEL=fused|gemm overrides it). On the CPU backend "fused" is one compiled loop
    per call (float32 and float64, the default penalty), which "auto" takes for calls of at most
    250 kflop with n <= 16, where the GEMM path's per-call overhead outweighs the arithmetic.

    Args:
        phi: a NumPy or CuPy array: 3-D with the slices along `axis`, or 2-D (one slice (l, n)).
            float16, bfloat16 (`ml_dtypes.bfloat16`, NumPy only), float32 or float64.
        beta: the penalty's weight, a finite real number >= 0.
        axis: the axis that indexes the slices (default 1: phi is (l, m, n)); ignored for 2-D phi.
        want: what a call returns: "loss", "grad" or "loss_and_grad".
        reduction: "sum" (the formula), "mean" (sum / m) or "none" (the m per-slice losses).
        backend: "auto" (CuPy input on its GPU; NumPy input on the CPU, or on a usable GPU above the
            crossover), "numpy" or "cupy".
        precision: "highest", or "tf32" (float32 GEMMs on TF32 tensor cores; GPU only).
        workspace_bytes: the Gram workspace budget; None: the default (GPU_ORTHOL1_WORKSPACE_BYTES,
            else 4 MiB on the CPU, a share of free memory on the GPU).
        penalty: "l1" (sum |G - I|) or "l2" (sum (G - I)^2).
        diagonal: False leaves the Gram's diagonal free (only off-diagonal entries count).
        normalize: True uses the Gram of each slice's unit-normalized columns.
        kernel: the path: "auto", "gemm" or "fused" (above).

    Returns:
        A `Plan`; call it as ``p(phi2, out=None, accumulate=False)``.

    Raises:
        TypeError: phi is not a NumPy or CuPy array, or has another dtype.
        ValueError: a bad axis, reduction, beta, workspace or out (docs/errors.md lists every case),
            before anything is written.
        BackendUnavailableError: backend="cupy" without a usable GPU.
        MemoryError: a workspace_bytes smaller than one slice needs.

    Example:
        >>> import numpy as np, gpu_orthol1 as ol1
        >>> phi = np.random.default_rng(0).standard_normal((64, 8, 16), dtype=np.float32) / 8
        >>> p = ol1.plan(phi, beta=1e-3)
        >>> loss, grad = p(phi)
    """
    return Plan(
        phi,
        beta,
        axis=axis,
        reduction=reduction,
        want=want,
        precision=precision,
        backend=backend,
        workspace_bytes=workspace_bytes,
        kernel=kernel,
        penalty=penalty,
        diagonal=diagonal,
        normalize=normalize,
    )


def loss(
    phi: Any,
    beta: float = 1.0,
    *,
    axis: int = 1,
    reduction: Reduction = "sum",
    backend: Backend = "auto",
    precision: Precision = "highest",
    workspace_bytes: int | None = None,
    penalty: Penalty = "l1",
    diagonal: bool = True,
    normalize: bool = False,
) -> Any:
    """L1 orthogonality loss beta * sum_i sum_jk |Phi_i^T Phi_i - I|_jk of the slices of phi along `axis`.

    Returns a 0-d array ("sum", "mean") or the per-slice losses of shape (m,) ("none"), of phi's
    array kind, float64 for float64 input and float32 otherwise. See README.md for the rules.

    The rest of the family (docs/penalties.md): penalty="l2" sums squares, beta * sum (G - I)^2;
    diagonal=False leaves the diagonal free (only off-diagonal entries count); normalize=True
    uses the Gram of the unit-normalized columns of each slice, D^-1/2 G D^-1/2 with D = diag(G)
    (a zero column stays zero and gets a zero gradient).

    Args:
        phi: a NumPy or CuPy array: 3-D with the slices along `axis`, or 2-D (one slice (l, n)).
            float16, bfloat16 (`ml_dtypes.bfloat16`, NumPy only), float32 or float64.
        beta: the penalty's weight, a finite real number >= 0.
        axis: the axis that indexes the slices (default 1: phi is (l, m, n)); ignored for 2-D phi.
        reduction: "sum" (the formula), "mean" (sum / m) or "none" (the m per-slice losses).
        backend: "auto" (CuPy input on its GPU; NumPy input on the CPU, or on a usable GPU above the
            crossover), "numpy" or "cupy".
        precision: "highest", or "tf32" (float32 GEMMs on TF32 tensor cores; GPU only).
        workspace_bytes: the Gram workspace budget; None: the default (GPU_ORTHOL1_WORKSPACE_BYTES,
            else 4 MiB on the CPU, a share of free memory on the GPU).
        penalty: "l1" (sum |G - I|) or "l2" (sum (G - I)^2).
        diagonal: False leaves the Gram's diagonal free (only off-diagonal entries count).
        normalize: True uses the Gram of each slice's unit-normalized columns.

    Returns:
        The loss: a 0-d array ("sum", "mean") or shape (m,) ("none"), of phi's array kind.

    Raises:
        TypeError: phi is not a NumPy or CuPy array, or has another dtype.
        ValueError: a bad axis, reduction, beta, workspace or out (docs/errors.md lists every case),
            before anything is written.
        BackendUnavailableError: backend="cupy" without a usable GPU.
        MemoryError: a workspace_bytes smaller than one slice needs.

    Example:
        >>> import numpy as np, gpu_orthol1 as ol1
        >>> phi = np.random.default_rng(0).standard_normal((64, 8, 16), dtype=np.float32) / 8
        >>> value = float(ol1.loss(phi, 1e-3))
    """
    return _run(
        phi,
        beta,
        axis,
        reduction,
        None,
        False,
        backend,
        precision,
        workspace_bytes,
        False,
        penalty,
        diagonal,
        normalize,
    )[0]


def grad(
    phi: Any,
    beta: float = 1.0,
    *,
    axis: int = 1,
    reduction: Reduction = "sum",
    out: Any = None,
    accumulate: bool = False,
    backend: Backend = "auto",
    precision: Precision = "highest",
    workspace_bytes: int | None = None,
    penalty: Penalty = "l1",
    diagonal: bool = True,
    normalize: bool = False,
) -> Any:
    """Gradient of `loss` with respect to phi (phi's shape, dtype and array kind); into `out` if given,
    added to it when accumulate=True.

    Args:
        phi: a NumPy or CuPy array: 3-D with the slices along `axis`, or 2-D (one slice (l, n)).
            float16, bfloat16 (`ml_dtypes.bfloat16`, NumPy only), float32 or float64.
        beta: the penalty's weight, a finite real number >= 0.
        axis: the axis that indexes the slices (default 1: phi is (l, m, n)); ignored for 2-D phi.
        reduction: "sum" (the formula), "mean" (sum / m) or "none" (the m per-slice losses).
        backend: "auto" (CuPy input on its GPU; NumPy input on the CPU, or on a usable GPU above the
            crossover), "numpy" or "cupy".
        precision: "highest", or "tf32" (float32 GEMMs on TF32 tensor cores; GPU only).
        workspace_bytes: the Gram workspace budget; None: the default (GPU_ORTHOL1_WORKSPACE_BYTES,
            else 4 MiB on the CPU, a share of free memory on the GPU).
        penalty: "l1" (sum |G - I|) or "l2" (sum (G - I)^2).
        diagonal: False leaves the Gram's diagonal free (only off-diagonal entries count).
        normalize: True uses the Gram of each slice's unit-normalized columns.
        out: an array like phi (shape, dtype, kind, device) to write the gradient into; None: a new one.
        accumulate: add the gradient into `out` instead of overwriting it.

    Returns:
        The gradient (`out` when given).

    Raises:
        TypeError: phi is not a NumPy or CuPy array, or has another dtype.
        ValueError: a bad axis, reduction, beta, workspace or out (docs/errors.md lists every case),
            before anything is written.
        BackendUnavailableError: backend="cupy" without a usable GPU.
        MemoryError: a workspace_bytes smaller than one slice needs.

    Example:
        >>> import numpy as np, gpu_orthol1 as ol1
        >>> phi = np.random.default_rng(0).standard_normal((64, 8, 16), dtype=np.float32) / 8
        >>> g = np.zeros_like(phi)
        >>> _ = ol1.grad(phi, 1e-3, out=g, accumulate=True)  # g += dL/dphi
    """
    return _run(
        phi,
        beta,
        axis,
        reduction,
        out,
        accumulate,
        backend,
        precision,
        workspace_bytes,
        True,
        penalty,
        diagonal,
        normalize,
    )[1]


def loss_and_grad(
    phi: Any,
    beta: float = 1.0,
    *,
    axis: int = 1,
    reduction: Reduction = "sum",
    out: Any = None,
    accumulate: bool = False,
    backend: Backend = "auto",
    precision: Precision = "highest",
    workspace_bytes: int | None = None,
    penalty: Penalty = "l1",
    diagonal: bool = True,
    normalize: bool = False,
) -> tuple[Any, Any]:
    """(loss, grad) from one pass: the Gram matrices are formed once for both.

    Args:
        phi: a NumPy or CuPy array: 3-D with the slices along `axis`, or 2-D (one slice (l, n)).
            float16, bfloat16 (`ml_dtypes.bfloat16`, NumPy only), float32 or float64.
        beta: the penalty's weight, a finite real number >= 0.
        axis: the axis that indexes the slices (default 1: phi is (l, m, n)); ignored for 2-D phi.
        reduction: "sum" (the formula), "mean" (sum / m) or "none" (the m per-slice losses).
        backend: "auto" (CuPy input on its GPU; NumPy input on the CPU, or on a usable GPU above the
            crossover), "numpy" or "cupy".
        precision: "highest", or "tf32" (float32 GEMMs on TF32 tensor cores; GPU only).
        workspace_bytes: the Gram workspace budget; None: the default (GPU_ORTHOL1_WORKSPACE_BYTES,
            else 4 MiB on the CPU, a share of free memory on the GPU).
        penalty: "l1" (sum |G - I|) or "l2" (sum (G - I)^2).
        diagonal: False leaves the Gram's diagonal free (only off-diagonal entries count).
        normalize: True uses the Gram of each slice's unit-normalized columns.
        out: an array like phi (shape, dtype, kind, device) to write the gradient into; None: a new one.
        accumulate: add the gradient into `out` instead of overwriting it.

    Returns:
        (loss, gradient), as `loss` and `grad` return them.

    Raises:
        TypeError: phi is not a NumPy or CuPy array, or has another dtype.
        ValueError: a bad axis, reduction, beta, workspace or out (docs/errors.md lists every case),
            before anything is written.
        BackendUnavailableError: backend="cupy" without a usable GPU.
        MemoryError: a workspace_bytes smaller than one slice needs.

    Example:
        >>> import numpy as np, gpu_orthol1 as ol1
        >>> phi = np.random.default_rng(0).standard_normal((64, 8, 16), dtype=np.float32) / 8
        >>> loss, grad = ol1.loss_and_grad(phi, beta=1e-3)
    """
    return _run(
        phi,
        beta,
        axis,
        reduction,
        out,
        accumulate,
        backend,
        precision,
        workspace_bytes,
        True,
        penalty,
        diagonal,
        normalize,
    )
