"""DTensor dispatch: `dtensor_ortho_l1`, what gpu_orthol1.torch.ortho_l1 calls for a DTensor (Shard on
any dim, or Replicate), and the placement reading that OrthoL1's targets (`_targets`) share.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .. import _penalty
from ..torch import _core
from ..torch._bridge import _check_precision, _resolve_precision
from ._meta import _DTYPES, MODES, REDUCTIONS, _compute_view, _from_slice_view, _slice_view
from ._splits import _run, _run_core


def _dtensor_split(w):
    """(tensor dim the shards split or None for replicated, the process group of that mesh dim)."""
    from torch.distributed.tensor import Replicate, Shard

    shard = []
    for mdim, p in enumerate(w.placements):
        if isinstance(p, Shard):
            shard.append((mdim, p.dim))
        elif not isinstance(p, Replicate):
            raise ValueError(
                f"gpu_orthol1: DTensor placement {p} is not supported (only Shard(d) and "
                "Replicate(); redistribute the tensor first, e.g. w.redistribute(placements="
                "[Replicate()]))"
            )
    if not shard:
        return None, None
    if len(shard) > 1:
        raise ValueError(
            f"gpu_orthol1: a DTensor sharded over several mesh dims {w.placements} is not "
            "supported; redistribute it so that one mesh dim shards it"
        )
    mdim, d = shard[0]
    return d, w.device_mesh.get_group(mdim)


def _transpose_for(mode, ndim, shape, axis):
    if mode not in (None,) + MODES:
        raise ValueError(f"mode must be None, 'rows', 'columns' or 'auto', got {mode!r}")
    if mode in (None, "columns"):
        return False
    if mode == "rows":
        return True
    if ndim == 2:
        l, n = shape
    else:
        l, n = (s for i, s in enumerate(shape) if i != axis % 3)
    return l < n  # "auto": the smaller Gram


SECOND_ORDER_REFUSED = (
    "gpu_orthol1: a second derivative (double backward, create_graph=True) of the penalty over DTensor "
    "(sharded) parameters is not supported: the sharded path returns the first-order gradient only. "
    "Differentiate the penalty of the gathered weight (w.full_tensor()) where second derivatives are needed"
)


class _SecondOrderRefused(torch.autograd.Function):
    """The identity on a first-order gradient, tied to the parameter it came from: differentiating it
    again raises SECOND_ORDER_REFUSED instead of silently dropping the penalty's second-order term."""

    @staticmethod
    def forward(ctx, grad, param):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _gg):
        raise RuntimeError(SECOND_ORDER_REFUSED)


def _first_order(grad: Any, param: Any) -> Any:
    """grad as the backward returns it: under create_graph=True, marked so a second backward raises."""
    if torch.is_grad_enabled() and param is not None and param.requires_grad:
        return _SecondOrderRefused.apply(grad, param)
    return grad


class _DTensorOrthoL1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, beta, axis, reduction, transpose, want_grad, variant, precision):
        shard_dim, group = _dtensor_split(w)
        local = w.to_local()
        own = None
        if shard_dim is None:  # replicated: every rank holds the whole tensor, no collective
            loss_t, g = _local_run(local, beta, axis, reduction, want_grad, transpose, variant, precision)
        else:
            loss_t, g, own = _run(
                local,
                beta,
                axis,
                shard_dim,
                reduction,
                group,
                want_grad,
                transpose,
                variant=variant,
                precision=precision,
            )
        ctx.want, ctx.own = want_grad, own
        if want_grad:
            ctx.save_for_backward(g, w)
            ctx.mesh, ctx.placements = w.device_mesh, tuple(w.placements)
            ctx.gshape, ctx.gstride = w.shape, w.stride()
            ctx.ndim, ctx.axis, ctx.reduction = w.dim(), axis % 3 if w.dim() == 3 else 0, reduction
        return loss_t

    @staticmethod
    def backward(ctx, go):
        from torch.distributed.tensor import DTensor

        if not ctx.want:
            return (None,) * 8
        g, w = ctx.saved_tensors
        if ctx.reduction == "none" and ctx.ndim == 3:
            if ctx.own is not None:  # the shards split the slices: this rank's part of grad_output
                go = go.narrow(0, *ctx.own)
            shape = [1, 1, 1]
            shape[ctx.axis] = -1
            go = go.reshape(shape)
        gl = g * go.to(g.dtype)
        gd = DTensor.from_local(
            gl, ctx.mesh, ctx.placements, run_check=False, shape=ctx.gshape, stride=ctx.gstride
        )
        return _first_order(gd, w), None, None, None, None, None, None, None


def _local_run(t, beta, axis, reduction, want_grad, transpose, variant=_penalty.DEFAULT, precision=None):
    """One process, whole tensor (a Replicate DTensor's local copy): the core, no collective."""
    nd = t.dim()
    if nd not in (2, 3):
        raise ValueError(f"gpu_orthol1: the DTensor must be 2-D or 3-D, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(
            f"gpu_orthol1: the DTensor's dtype {t.dtype} is not float16, bfloat16, float32 or float64"
        )
    ax = int(axis) % 3 if nd == 3 else 0
    V = _compute_view(_slice_view(t.detach(), nd, ax, transpose))
    lt, G = _run_core(
        V,
        _core.check_beta(beta),
        reduction,
        want_grad,
        t.device,
        variant=_penalty.check(*variant),
        precision=_resolve_precision(_check_precision(precision)),
    )
    lt = lt.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    if not want_grad:
        return lt, None
    grad = _from_slice_view(G, nd, ax, transpose)
    return lt, grad.to(t.dtype) if grad.dtype != t.dtype else grad


def dtensor_ortho_l1(
    w: Any,
    beta: float = 1.0,
    axis: int = 1,
    reduction: str = "sum",
    mode: str | None = None,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str | None = None,
) -> Any:
    """`gpu_orthol1.torch.ortho_l1` for a DTensor w (Shard(d) on one mesh dim, Replicate on the
    others, or replicated everywhere): a plain tensor loss (0-d, (m,) for "none"; (1,) for a 2-D w),
    the same on every rank, whose backward gives w a DTensor gradient with w's placements.

    2-D w (l, n): mode None/"columns" penalizes sum |W^T W - I|, "rows" sum |W W^T - I| (computed on
    W^T, so Shard(0) becomes a split of the columns), "auto" the smaller Gram (by the GLOBAL shape).
    3-D w: slices along axis, the mode per slice. Collective: every rank of the sharding mesh dim
    calls it. Which split moves what: see the module docstring (Shard of the penalized Gram's row dim
    sums n x n Grams; of its column dim reshards w to that and back). penalty, diagonal, normalize: the
    member of the penalty family, and precision, as in ortho_l1.

    Args:
        w: the DTensor (2-D or 3-D, float16, bfloat16, float32 or float64).
        beta: the loss's factor, finite and >= 0.
        axis: the slice axis of a 3-D w.
        reduction: "sum", "mean" or "none".
        mode: None, "rows", "columns" or "auto".
        penalty: "l1" or "l2".
        diagonal: False leaves the Gram's diagonal free.
        normalize: True takes the Gram of the unit-normalized rows or columns.
        precision: None (torch's float32 matmul setting), "highest" or "tf32".

    Returns:
        The loss (a plain tensor, the same on every rank) with autograd.

    Raises:
        ValueError: w is not a DTensor, its placements are not supported, or an argument is out of
            range (on every rank alike).

    Example:
        >>> w = distribute_tensor(torch.randn(64, 16), mesh, [Shard(0)])  # collective: every rank
        >>> loss = dtensor_ortho_l1(w, 1e-3, mode="columns")
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(w, DTensor):
        raise ValueError(f"dtensor_ortho_l1 takes a DTensor, got {type(w).__name__}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if w.dim() == 3 and (
        isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -3 <= axis < 3
    ):
        raise ValueError(f"axis must be an integer in [-3, 3) for a 3-D weight, got {axis!r}")
    transpose = _transpose_for(mode, w.dim(), tuple(w.shape), axis if w.dim() == 3 else 0)
    want_grad = torch.is_grad_enabled() and w.requires_grad
    variant = _penalty.check(penalty, diagonal, normalize)
    return _DTensorOrthoL1.apply(
        w, _core.check_beta(beta), int(axis), reduction, transpose, want_grad, variant, precision
    )
