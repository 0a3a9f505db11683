"""Argument checks shared by the plans and the framework layers: one-line errors for user mistakes,
raised before anything is planned or written."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np

from . import _driver, _dtypes

REDUCTIONS = ("sum", "mean", "none")
PRECISIONS = ("highest", "tf32")
WANTS = ("loss", "grad", "loss_and_grad")
KERNELS = ("auto", "gemm", "fused")
ENV_KERNEL = "GPU_ORTHOL1_KERNEL"
DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
ENV_WORKSPACE = "GPU_ORTHOL1_WORKSPACE_BYTES"
CPU_DEFAULT_WORKSPACE = 4 << 20  # chunks that stay in cache between the Gram GEMM and the sign pass
GPU_MAX_DEFAULT_WORKSPACE = 1 << 30


def is_cupy(x: Any) -> bool:
    """Whether `x` comes from CuPy (decided without importing CuPy)."""
    return type(x).__module__.split(".")[0] == "cupy"


def check_array(phi: Any, what: str = "phi") -> bool:
    """True for a CuPy array, False for a NumPy one; TypeError for anything else."""
    if is_cupy(phi):
        import cupy

        if not isinstance(phi, cupy.ndarray):
            raise TypeError(f"{what} must be a NumPy or CuPy array, got {type(phi).__name__}")
        return True
    if not isinstance(phi, np.ndarray) or isinstance(phi, (np.ma.MaskedArray, np.matrix)):
        raise TypeError(
            f"{what} must be a NumPy or CuPy array (not a masked array or matrix), got {type(phi).__name__}"
        )
    return False


def check_phi(phi: Any) -> bool:
    """check_array, then the dtype and number of dims a plan takes; whether phi is a CuPy array."""
    cupy = check_array(phi)
    if phi.dtype not in DTYPES and not (not cupy and _dtypes.is_bf16(phi.dtype)):
        raise TypeError(
            f"phi must be float16, bfloat16, float32 or float64, got {phi.dtype}; convert it first "
            "(integer, bool and complex inputs have no orthogonality loss here)"
        )
    if phi.ndim not in (2, 3):
        raise ValueError(f"phi must have 2 dims (l, n) or 3 dims, got shape {phi.shape}")
    return cupy


def check_bits(phi: Any) -> bool:
    """check_phi for the int16 carrier of bfloat16 data (the framework layers' internal hand-over)."""
    cupy = check_array(phi)
    if phi.dtype != _dtypes.BITS or phi.ndim not in (2, 3):
        raise ValueError(f"a bfloat16 carrier must be a 2-D or 3-D int16 array, got {phi.dtype} {phi.shape}")
    return cupy


def check_axis(axis: Any, ndim: int) -> int:
    """The slice axis of a 3-D phi in 0..2 (a 2-D phi is one slice: 1, whatever `axis` says)."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise ValueError(f"axis must be an integer, got {axis!r}")
    axis = int(axis)
    if ndim != 3:
        return 1
    if not -3 <= axis < 3:
        raise ValueError(f"axis {axis} is out of range for a 3-D phi")
    return axis % 3


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`, else ValueError naming them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_beta(beta: Any, what: str = "beta") -> float:
    """beta (or a preset's factor or strength, named by `what`) as a float; ValueError unless finite and >= 0."""
    if (
        type(beta) is float and math.isfinite(beta) and beta >= 0.0
    ):  # the common case, without the checks below
        return beta
    if isinstance(beta, (bool, np.bool_)) or not isinstance(beta, (numbers.Real, np.ndarray)):
        raise ValueError(f"{what} must be a finite real number, got {beta!r}")
    if isinstance(beta, np.ndarray):
        if beta.ndim != 0 or beta.dtype.kind not in "fiu":
            raise ValueError(f"{what} must be a finite real number, got an array of shape {beta.shape}")
        beta = beta.item()
    try:
        b = float(beta)
    except OverflowError:  # an int or Fraction beyond float range: not finite as a float
        b = math.inf
    if not math.isfinite(b):
        raise ValueError(f"{what} must be a finite real number, got {beta!r}")
    if b < 0:  # the penalty's weight: a negative one would reward the matrices for leaving orthogonality
        raise ValueError(
            f"{what} must be >= 0, got {beta!r} (a negative weight rewards non-orthogonal matrices)"
        )
    return b


def check_workspace_bytes(workspace_bytes: Any) -> int | None:
    """None, or a positive int; ValueError for anything else."""
    if workspace_bytes is None:
        return None
    if (
        isinstance(workspace_bytes, bool)
        or not isinstance(workspace_bytes, numbers.Integral)
        or workspace_bytes <= 0
    ):
        raise ValueError(f"workspace_bytes must be a positive integer, got {workspace_bytes!r}")
    return int(workspace_bytes)


def workspace_budget(workspace_bytes: int | None, resolved: str, xp: Any) -> int:
    """The caller's budget, else the environment's, else the default (fixed when a plan is made)."""
    if workspace_bytes is not None:
        return workspace_bytes
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


def byte_span(addr: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """[lo, hi): the bytes an array with its first element at `addr` reaches (strides in bytes, any
    sign; the array has at least one element)."""
    lo = hi = addr
    for s, st in zip(shape, strides, strict=True):
        if s > 1:
            if st < 0:
                lo += (s - 1) * st
            else:
                hi += (s - 1) * st
    return lo, hi + itemsize


def _extent(a: Any) -> tuple[int, int]:
    return byte_span(a.data.ptr, a.shape, a.strides, a.itemsize)


def self_overlapping(a: Any) -> bool:
    """Whether two elements of `a` may share memory (conservative: an exotic layout that does not
    overlap may be refused)."""
    dims = sorted((abs(st), s) for s, st in zip(a.shape, a.strides, strict=True) if s > 1)
    if a.size == 0:
        return False
    need = a.itemsize
    for st, s in dims:
        if st < need:
            return True
        need = st * s
    return False


def check_out(out: Any, phi: Any, accumulate: Any, phi_is_cupy: bool) -> None:
    """ValueError unless `out` (or None) can take the gradient of `phi` (accumulate: add into it)."""
    if not isinstance(accumulate, (bool, np.bool_)):
        raise ValueError(f"accumulate must be True or False, got {accumulate!r}")
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out= (the array to add the gradient into)")
        return
    try:
        out_cupy = check_array(out, "out")
    except TypeError as e:
        raise ValueError(str(e)) from None
    if out_cupy != phi_is_cupy:
        kind = "CuPy" if phi_is_cupy else "NumPy"
        raise ValueError(
            f"out must be a {kind} array like phi, got {type(out).__module__}.{type(out).__name__}"
        )
    if out.shape != phi.shape:
        raise ValueError(f"out has shape {out.shape}, phi has shape {phi.shape}")
    if out.dtype != phi.dtype:
        raise ValueError(f"out has dtype {out.dtype}, phi has dtype {phi.dtype}")
    if phi_is_cupy:
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
    if self_overlapping(out):
        raise ValueError(
            f"out has overlapping elements (strides {out.strides}); pass a writable array of its own"
        )
