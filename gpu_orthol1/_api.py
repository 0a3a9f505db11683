"""Public entry points: argument checks, backend choice, result assembly."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import _backends, _driver

REDUCTIONS = ("sum", "mean", "none")
PRECISIONS = ("highest", "tf32")
DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
ENV_WORKSPACE = "GPU_ORTHOL1_WORKSPACE_BYTES"
CPU_DEFAULT_WORKSPACE = 4 << 20  # chunks that stay in cache between the Gram GEMM and the sign pass
GPU_MAX_DEFAULT_WORKSPACE = 1 << 30

# Public signature types. Arrays are NumPy or CuPy (CuPy is optional, hence Any).
Reduction = Literal["sum", "mean", "none"]
Backend = Literal["auto", "numpy", "cupy"]
Precision = Literal["highest", "tf32"]


def _is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


@dataclass
class _Call:
    phi: Any  # 3-D view of the input
    axis: int
    squeeze: bool
    beta: float
    reduction: str
    precision: str
    is_cupy: bool
    workspace_bytes: int | None


def _check_array(phi, what="phi"):
    if _is_cupy(phi):
        import cupy

        if not isinstance(phi, cupy.ndarray):
            raise TypeError(f"{what} must be a NumPy or CuPy array, got {type(phi).__name__}")
        return True
    if not isinstance(phi, np.ndarray) or isinstance(phi, (np.ma.MaskedArray, np.matrix)):
        raise TypeError(
            f"{what} must be a NumPy or CuPy array (not a masked array or matrix), got {type(phi).__name__}"
        )
    return False


def _check_beta(beta) -> float:
    if isinstance(beta, (bool, np.bool_)) or not isinstance(beta, (numbers.Real, np.ndarray)):
        raise ValueError(f"beta must be a finite real number, got {beta!r}")
    if isinstance(beta, np.ndarray):
        if beta.ndim != 0 or beta.dtype.kind not in "fiu":
            raise ValueError(f"beta must be a finite real number, got an array of shape {beta.shape}")
        beta = beta.item()
    try:
        b = float(beta)
    except OverflowError:  # an int or Fraction beyond float range: not finite as a float
        b = math.inf
    if not math.isfinite(b):
        raise ValueError(f"beta must be a finite real number, got {beta!r}")
    return b


def _prepare(phi, beta, axis, reduction, backend, precision, workspace_bytes):
    is_cupy = _check_array(phi)
    if phi.dtype not in DTYPES:
        raise TypeError(
            f"phi must be float16, float32 or float64, got {phi.dtype}; convert it first "
            "(integer, bool and complex inputs have no orthogonality loss here)"
        )
    if phi.ndim not in (2, 3):
        raise ValueError(f"phi must have 2 dims (l, n) or 3 dims, got shape {phi.shape}")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (numbers.Integral,)):
        raise ValueError(f"axis must be an integer, got {axis!r}")
    axis = int(axis)
    if phi.ndim == 3:
        if not -3 <= axis < 3:
            raise ValueError(f"axis {axis} is out of range for a 3-D phi")
        axis %= 3
        phi3, squeeze = phi, False
    else:  # one slice; axis has nothing to index
        phi3, squeeze, axis = phi[:, None, :], True, 1
    b = _check_beta(beta)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if workspace_bytes is not None:
        if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, numbers.Integral) \
                or workspace_bytes <= 0:
            raise ValueError(f"workspace_bytes must be a positive integer, got {workspace_bytes!r}")
        workspace_bytes = int(workspace_bytes)
    name = _backends.check_name(backend)
    call = _Call(phi3, axis, squeeze, b, reduction, precision, is_cupy, workspace_bytes)
    m = phi3.shape[axis]
    l, n = (s for i, s in enumerate(phi3.shape) if i != axis)
    resolved = _backends.resolve(name, is_cupy, 4.0 * l * m * n * n)
    return call, resolved


def _check_out(out, phi, call, accumulate):
    if not isinstance(accumulate, (bool, np.bool_)):
        raise ValueError(f"accumulate must be True or False, got {accumulate!r}")
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out= (the array to add the gradient into)")
        return
    try:
        out_cupy = _check_array(out, "out")
    except TypeError as e:
        raise ValueError(str(e)) from None
    if out_cupy != call.is_cupy:
        kind = "CuPy" if call.is_cupy else "NumPy"
        raise ValueError(f"out must be a {kind} array like phi, got {type(out).__module__}.{type(out).__name__}")
    if out.shape != phi.shape:
        raise ValueError(f"out has shape {out.shape}, phi has shape {phi.shape}")
    if out.dtype != phi.dtype:
        raise ValueError(f"out has dtype {out.dtype}, phi has dtype {phi.dtype}")
    if call.is_cupy:
        # compare ids: formatting a Device queries the driver, which fails for an absent ordinal
        if out.device.id != phi.device.id:
            raise ValueError(f"out is on GPU {out.device.id}, phi on GPU {phi.device.id}")
        lo_o, hi_o = _extent(out)
        lo_p, hi_p = _extent(phi)
        if out.size and phi.size and lo_o < hi_p and lo_p < hi_o:
            raise ValueError("out overlaps phi's memory; pass a separate array")
    else:
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        if out.size and phi.size and np.shares_memory(out, phi):
            raise ValueError("out overlaps phi's memory; pass a separate array")
    if _self_overlapping(out):
        raise ValueError(f"out has overlapping elements (strides {out.strides}); pass a writable array of its own")


def _extent(a):
    lo = hi = a.data.ptr
    for s, st in zip(a.shape, a.strides):
        if s > 1:
            if st < 0:
                lo += (s - 1) * st
            else:
                hi += (s - 1) * st
    return lo, hi + a.itemsize


def _self_overlapping(a) -> bool:
    dims = sorted((abs(st), s) for s, st in zip(a.shape, a.strides) if s > 1)
    if a.size == 0:
        return False
    need = a.itemsize
    for st, s in dims:
        if st < need:
            return True
        need = st * s
    return False


def _workspace_budget(call, resolved, xp) -> int:
    if call.workspace_bytes is not None:
        return call.workspace_bytes
    env = os.environ.get(ENV_WORKSPACE, "").strip()
    if env:
        try:
            v = int(env)
        except ValueError:
            v = 0
        if v <= 0:
            raise ValueError(f"environment variable {ENV_WORKSPACE}={env!r} must be a positive integer")
        return v
    if resolved == "numpy":
        return _driver.DefaultBudget(CPU_DEFAULT_WORKSPACE)
    free, _total = xp.cuda.runtime.memGetInfo()
    free += xp.get_default_memory_pool().free_bytes()
    return _driver.DefaultBudget(max(1 << 20, min(GPU_MAX_DEFAULT_WORKSPACE, free // 4)))


def _device(resolved, precision):
    if resolved == "numpy":
        from ._numpy_dev import NumpyDevice

        return NumpyDevice()
    from ._cupy import CupyDevice

    return CupyDevice(precision)


def _run(phi, beta, axis, reduction, out, accumulate, backend, precision, workspace_bytes,
         want_grad, device=None):
    call, resolved = _prepare(phi, beta, axis, reduction, backend, precision, workspace_bytes)
    if want_grad:
        _check_out(out, phi, call, accumulate)
    dev = device if device is not None else _device(resolved, precision)
    xp = dev.xp
    p3 = call.phi
    host_in = not call.is_cupy and xp is not np  # a NumPy input computed on the GPU
    if host_in:
        p3 = xp.asarray(p3)
    m = p3.shape[call.axis]
    alpha = 2.0 * call.beta / (m if call.reduction == "mean" and m else 1)
    V = xp.moveaxis(p3, call.axis, 0)

    grad3 = None
    if want_grad:
        if out is not None and not host_in:
            grad3 = out[:, None, :] if call.squeeze else out
        elif out is not None and accumulate:
            grad3 = xp.asarray(out[:, None, :] if call.squeeze else out)
        else:
            grad3 = xp.empty_like(p3)
    Vout = xp.moveaxis(grad3, call.axis, 0) if want_grad else None
    budget = _workspace_budget(call, "numpy" if xp is np else "cupy", xp)

    # Out of memory surfaces as MemoryError: CuPy's OutOfMemoryError is one and names the bytes,
    # and the driver names the sizes when its workspace cannot be allocated.
    losses = _driver.run(dev, V, Vout, alpha=alpha, beta_gemm=1.0 if accumulate else 0.0,
                         want_grad=want_grad, budget=budget)

    ldt = np.float64 if phi.dtype == np.float64 else np.float32
    if call.reduction == "none":
        loss = (losses * call.beta).astype(ldt)
    else:
        total = losses.sum() * call.beta
        if call.reduction == "mean" and m:
            total = total / m
        loss = total.astype(ldt)
    if host_in:
        loss = xp.asnumpy(loss)
    elif xp is np:
        loss = np.asarray(loss)

    if not want_grad:
        return loss, None
    if host_in:
        if out is not None:
            out[...] = xp.asnumpy(grad3[:, 0, :] if call.squeeze else grad3)
            grad = out
        else:
            grad = xp.asnumpy(grad3[:, 0, :] if call.squeeze else grad3)
    elif out is not None:
        grad = out
    else:
        grad = grad3[:, 0, :] if call.squeeze else grad3
    return loss, grad


def loss(phi: Any, beta: float = 1.0, *, axis: int = 1, reduction: Reduction = "sum",
         backend: Backend = "auto", precision: Precision = "highest",
         workspace_bytes: int | None = None) -> Any:
    """L1 orthogonality loss beta * sum_i sum_jk |Phi_i^T Phi_i - I|_jk of the slices of phi along `axis`.

    Returns a 0-d array ("sum", "mean") or the per-slice losses of shape (m,) ("none"), of phi's
    array kind, float64 for float64 input and float32 otherwise. See README.md for the rules.
    """
    return _run(phi, beta, axis, reduction, None, False, backend, precision, workspace_bytes,
                want_grad=False)[0]


def grad(phi: Any, beta: float = 1.0, *, axis: int = 1, reduction: Reduction = "sum", out: Any = None,
         accumulate: bool = False, backend: Backend = "auto", precision: Precision = "highest",
         workspace_bytes: int | None = None) -> Any:
    """Gradient of `loss` with respect to phi (phi's shape, dtype and array kind); into `out` if given,
    added to it when accumulate=True."""
    return _run(phi, beta, axis, reduction, out, accumulate, backend, precision, workspace_bytes,
                want_grad=True)[1]


def loss_and_grad(phi: Any, beta: float = 1.0, *, axis: int = 1, reduction: Reduction = "sum",
                  out: Any = None, accumulate: bool = False, backend: Backend = "auto",
                  precision: Precision = "highest", workspace_bytes: int | None = None) -> tuple[Any, Any]:
    """(loss, grad) from one pass: the Gram matrices are formed once for both."""
    return _run(phi, beta, axis, reduction, out, accumulate, backend, precision, workspace_bytes,
                want_grad=True)
