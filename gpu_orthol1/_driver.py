"""The chunked loop shared by every backend: Gram GEMM, fused sign pass, gradient GEMM.

A *device* supplies the array module and the two primitives:

- ``gemm(call, buffers)`` runs one `_gemm.Gemm` over named buffers;
- ``sign_abs(ws, sgn, n, losses, offset, scale, write_s)`` runs the fused pass.

Devices: `_cupy.CupyDevice` (cuBLAS + the Numba CUDA kernel), `_numpy_dev.NumpyDevice`
(NumPy matmul + the Numba CPU kernel) and `_numpy_dev.EmulatedGpuDevice` (the
cuBLAS argument sets executed by NumPy + the CUDA kernel under numba's
simulator: the GPU path's logic, testable on a CPU).
"""

from __future__ import annotations

import warnings

import numpy as np

from . import _gemm


class CopyWarning(UserWarning):
    """An operand's memory layout forces gpu_orthol1 to copy data (chunk by chunk)."""


def _layout_of(arr):
    es = _gemm.element_strides(arr.dtype.itemsize, arr.strides)
    return None if es is None else _gemm.layout(arr.shape, es)


class DefaultBudget(int):
    """A workspace budget nobody asked for: it may grow to one slice instead of refusing the call."""


def plan_chunks(m, l, n, itemsize, acc_itemsize, sgn_itemsize, stage_phi, stage_out, extra, budget):
    """Slices per chunk and the bytes one slice needs, or MemoryError naming the sizes.

    A budget the caller set (workspace_bytes=, the environment) is a hard limit; the default
    (`DefaultBudget`) always admits one slice, so default arguments never refuse a call."""
    per_slice = n * n * acc_itemsize + extra
    if sgn_itemsize:
        per_slice += n * n * sgn_itemsize
    if stage_phi:
        per_slice += l * n * itemsize
    if stage_out:
        per_slice += l * n * itemsize
    if isinstance(budget, DefaultBudget):
        budget = max(int(budget), per_slice)
    if m and n and per_slice > budget:
        raise MemoryError(
            f"one slice needs {per_slice} bytes of workspace (Gram {n}x{n}, l={l}), more than the "
            f"workspace budget of {budget} bytes; raise workspace_bytes= or GPU_ORTHOL1_WORKSPACE_BYTES"
        )
    return max(1, min(m, budget // max(per_slice, 1))), per_slice


def run(dev, V, Vout, *, alpha, beta_gemm, want_grad, budget):
    """Losses of every slice of V (m, l, n) as float64 (m,); the gradient into Vout when want_grad.

    V and Vout are (m, l, n) views (slices first) of the caller's arrays; Vout
    may be any writable layout, `beta_gemm` 1 accumulates into it."""
    xp = dev.xp
    m, l, n = V.shape
    dtype = V.dtype
    losses = xp.zeros(m, dtype=np.float64)
    if m == 0 or n == 0:
        return losses

    if l == 0:  # G = 0, nothing to read or write: any layout will do
        lay_phi = lay_out = _gemm.Layout("T", n, 0)
    else:
        lay_phi = _layout_of(V)
        lay_out = _layout_of(Vout) if want_grad else None
    stage_phi = lay_phi is None
    stage_out = want_grad and lay_out is None
    if stage_phi or stage_out:
        which = " and ".join(w for w, f in (("phi", stage_phi), ("out", stage_out)) if f)
        warnings.warn(
            f"gpu_orthol1: the layout of {which} (strides {V.strides if stage_phi else Vout.strides} "
            f"bytes for slices, rows, columns) cannot be read by BLAS in place; copying it chunk by chunk",
            CopyWarning, stacklevel=4,
        )
    acc_dtype = dev.acc_dtype(dtype)
    sgn_dtype = dev.sign_dtype(dtype)
    separate_sgn = want_grad and sgn_dtype != acc_dtype
    extra = dev.extra_bytes_per_slice(l, n, dtype, want_grad, beta_gemm != 0)
    chunk, per_slice = plan_chunks(m, l, n, dtype.itemsize, np.dtype(acc_dtype).itemsize,
                           np.dtype(sgn_dtype).itemsize if separate_sgn else 0,
                           stage_phi, stage_out, extra, budget)

    try:
        ws = xp.empty((chunk, n * n), dtype=acc_dtype)
        sgn = xp.empty((chunk, n * n), dtype=sgn_dtype) if separate_sgn else ws
        if stage_phi:
            phi_stage = xp.empty((chunk, l, n), dtype=dtype)
            lay_phi = _layout_of(phi_stage)
        if stage_out:
            out_stage = xp.empty((chunk, l, n), dtype=dtype)
            lay_out = _layout_of(out_stage)
    except MemoryError as e:  # numpy's and cupy's out-of-memory errors are both MemoryErrors
        raise MemoryError(
            f"could not allocate the workspace: {chunk} slice(s) of {per_slice} bytes (Gram {n}x{n}, "
            f"l={l}, {dtype}); lower workspace_bytes= or free memory ({e})"
        ) from e

    if dev.folds_alpha:  # scale S in the sign pass (CPU: saves a pass over the gradient)
        scale, gemm_alpha = alpha, 1.0
    else:  # scale in the GEMM (GPU: free, and exact for float16 S)
        scale, gemm_alpha = 1.0, alpha

    for s0 in range(0, m, chunk):
        cc = min(chunk, m - s0)
        if stage_phi:
            phi_stage[:cc] = V[s0:s0 + cc]
            phi_buf, phi_first = phi_stage, 0
        else:
            phi_buf, phi_first = V, s0
        if l == 0:
            ws[:cc] = 0
        else:
            dev.gemm(_gemm.gram_call(lay_phi, phi_first, cc, l, n), {"phi": phi_buf, "ws": ws})
        dev.sign_abs(ws[:cc], sgn[:cc], n, losses, s0, scale, want_grad)
        if not want_grad or l == 0:
            continue
        if stage_out:
            call = _gemm.grad_call(lay_phi, phi_first, lay_out, 0, cc, l, n, gemm_alpha, 0.0)
            dev.gemm(call, {"phi": phi_buf, "sgn": sgn, "out": out_stage})
            if beta_gemm:
                Vout[s0:s0 + cc] += out_stage[:cc]
            else:
                Vout[s0:s0 + cc] = out_stage[:cc]
        else:
            call = _gemm.grad_call(lay_phi, phi_first, lay_out, s0, cc, l, n, gemm_alpha, beta_gemm)
            dev.gemm(call, {"phi": phi_buf, "sgn": sgn, "out": Vout})
    return losses
