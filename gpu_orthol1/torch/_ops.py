"""The custom ops and autograd Functions: `ortho_l1`'s op (one tensor) and `OrthoL1.loss()`'s (a whole
model, eager through an autograd Function, compiled through a custom op).

Each op forms the loss and the gradient in one forward pass; the backward only scales the saved
gradient by grad_output. The ops trace under torch.compile (register_fake gives the shapes).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from .. import _penalty
from . import _core
from ._bridge import _TORCH_DTYPE, _on_torch_stream, _slices, _to_array

# ---------------------------------------------------------------------------------------------
# ortho_l1: one tensor, autograd


def _run_core(V: torch.Tensor, Vo: torch.Tensor | None, beta: float, reduction: str, want_grad: bool,
              device: torch.device, accumulate: bool = False, variant: Any = _penalty.DEFAULT) -> torch.Tensor:
    """The core on (m, l, n) slice views of tensors (no copy): the cached plan for their layout.
    Every allocation (workspaces, the per-slice losses) comes from torch's allocator and the loss is
    reduced by torch, so the call can be captured by torch.cuda.graph."""
    losses = torch.empty(V.shape[0], dtype=torch.float64, device=device)
    with _on_torch_stream(device) if device.type == "cuda" else nullcontext():
        a = _to_array(V)
        o = _to_array(Vo) if want_grad and Vo is not None else None
        alloc: Callable[[Any, Any], Any] | None = None
        if device.type == "cuda":
            import cupy

            def alloc(shape, dt):
                return cupy.from_dlpack(torch.empty(tuple(shape), dtype=_TORCH_DTYPE[np.dtype(dt)], device=device))
        p = _core.cached(a, 0, reduction, "highest", "cupy" if device.type == "cuda" else "numpy", None, *variant)
        _core.execute(p, a, o, accumulate, beta, want_grad, alloc=alloc, losses=_to_array(losses))
    ldt = torch.float64 if V.dtype == torch.float64 else torch.float32
    if reduction == "none":
        return (losses * beta).to(ldt)
    total = losses.sum() * beta
    if reduction == "mean" and V.shape[0]:
        total = total / V.shape[0]
    return total.to(ldt)


def _loss_shape(weight: torch.Tensor, how: str, m_axis: int, reduction: str) -> tuple[int, ...]:
    if reduction != "none":
        return ()
    return (weight.shape[m_axis],) if how == "stack" else (1,)


@torch.library.custom_op("gpu_orthol1::ortho_l1", mutates_args=())
def _ortho_l1_op(weight: torch.Tensor, beta: float, reduction: str, how: str, m_axis: int, transpose: bool,
                 want_grad: bool, penalty: str = "l1", diagonal: bool = True,
                 normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, gradient) of one tensor; the gradient is an empty (0,) tensor when not wanted. One op to
    torch.compile and autograd: the forward pass forms the gradient (one pass, no recomputation)."""
    w = weight.detach()
    bf16 = w.dtype == torch.bfloat16
    wc = w.float() if bf16 else w  # bfloat16: float32 copy (documented)
    grad = torch.empty_like(wc) if want_grad else None
    V = _slices(wc, how, m_axis, transpose)
    Vo = _slices(grad, how, m_axis, transpose) if grad is not None else None
    loss = _run_core(V, Vo, beta, reduction, want_grad, w.device,
                     variant=_penalty.Variant(penalty, diagonal, normalize))
    if grad is None:
        return loss, w.new_empty((0,))
    return loss, grad.to(torch.bfloat16) if bf16 else grad


@_ortho_l1_op.register_fake
def _(weight, beta, reduction, how, m_axis, transpose, want_grad, penalty="l1", diagonal=True, normalize=False):
    ldt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    loss = weight.new_empty(_loss_shape(weight, how, m_axis, reduction), dtype=ldt)
    return loss, (torch.empty_like(weight) if want_grad else weight.new_empty((0,)))


def _ortho_l1_setup(ctx, inputs, output):
    weight, beta, reduction, how, m_axis, transpose, want_grad = inputs[:7]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.m_axis, ctx.ndim, ctx.reduction, ctx.ninputs = m_axis, weight.dim(), reduction, len(inputs)


def _ortho_l1_backward(ctx, go, _go_grad):
    (g,) = ctx.saved_tensors
    if ctx.reduction == "none" and ctx.ndim == 3:
        shape = [1, 1, 1]
        shape[ctx.m_axis] = -1
        go = go.reshape(shape)
    # the gradient of the same forward pass, scaled by grad_output (out of place: backward may run twice)
    return (g * go.to(g.dtype),) + (None,) * (ctx.ninputs - 1)


_ortho_l1_op.register_autograd(_ortho_l1_backward, setup_context=_ortho_l1_setup)


# ---------------------------------------------------------------------------------------------
# OrthoL1.loss(): eager


class _OrthoL1ModelFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, reg, grad_mode, *params):
        want = grad_mode and any(ctx.needs_input_grad[2:])
        active = reg._runner.active()
        outs: list | None = None
        if want:
            outs = [None] * len(reg.targets)
            for j, p in zip(active, params):
                outs[j] = torch.empty_like(p)
        totals = reg._runner.execute(outs, beta_gemm=0.0, want_grad=want)
        if want:
            ctx.save_for_backward(*[outs[j] for j in active])  # type: ignore[index]
        ctx.want = want
        ctx.nparams = len(params)
        return reg._runner.result(totals)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        if not ctx.want:
            return (None,) * (2 + ctx.nparams)
        grads = ctx.saved_tensors
        return (None, None) + tuple(g * go.to(g.dtype) for g in grads)


# -- OrthoL1.loss() under torch.compile ---------------------------------------------------------------
#
# Dynamo cannot trace the grouping and the NumPy/CuPy calls, so a compiled `loss()` is one custom op
# (like `ortho_l1`'s): the parameters in, the loss and every gradient out, formed in one forward pass.
# The regularizer itself is not a tensor: the op finds it by a key in a registry of weak references
# (an int argument, which dynamo guards on like any constant).

_registry: dict[int, Any] = {}
_keys = itertools.count()  # next() is one C call: threads building regularizers get distinct keys


def _register(reg: Any) -> int:
    import weakref

    key = next(_keys)

    def forget(_ref, k=key):  # the regularizer is gone: drop its entry
        _registry.pop(k, None)

    _registry[key] = weakref.ref(reg, forget)
    return key


@torch.library.custom_op("gpu_orthol1::orthol1_loss", mutates_args=())
def _orthol1_op(params: list[torch.Tensor], key: int, active: list[int],
                want_grad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(loss, gradients of `params`) of the OrthoL1 registered as `key`, over its targets `active` (whose
    parameters `params` are); no gradients when not `want_grad`."""
    ref = _registry.get(key)
    reg = ref() if ref is not None else None
    if reg is None:
        raise RuntimeError("gpu_orthol1: this compiled graph refers to an OrthoL1 that no longer exists")
    reg._runner.check_devices()
    if reg._sharded(active):
        raise ValueError("OrthoL1.loss() over DTensor (sharded) parameters does not run inside torch.compile: "
                         "call it outside the compiled function")
    outs: list | None = None
    if want_grad:
        outs = [None] * len(reg.targets)
        for j, p in zip(active, params):
            outs[j] = torch.empty_like(p)
    # computed from the tensors the graph hands over (a compiled function may have changed the
    # parameters before calling loss()), through the regularizer's grouping
    loss = reg._runner.result(reg._runner.execute(outs, beta_gemm=0.0, want_grad=want_grad,
                                                  params=dict(zip(active, params))))
    return loss, ([outs[j] for j in active] if outs is not None else [])


@_orthol1_op.register_fake
def _(params, key, active, want_grad):
    ref = _registry.get(key)
    reg = ref() if ref is not None else None
    # the loss dtype follows every target, active or not (as in eager mode)
    ldt = reg._runner.loss_dtype() if reg is not None else torch.float32
    return params[0].new_empty((), dtype=ldt), ([torch.empty_like(p) for p in params] if want_grad else [])


def _orthol1_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1])
    ctx.mark_non_differentiable(*output[1])
    ctx.nparams = len(inputs[0])


def _orthol1_backward(ctx, go, _go_grads):
    grads = ctx.saved_tensors
    if not grads:  # the forward ran without gradients (torch.no_grad)
        return [None] * ctx.nparams, None, None, None
    return [g * go.to(g.dtype) for g in grads], None, None, None


_orthol1_op.register_autograd(_orthol1_backward, setup_context=_orthol1_setup)
