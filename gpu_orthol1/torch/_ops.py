"""The custom ops and autograd Functions: `ortho_l1`'s op (one tensor; eagerly a plain autograd.Function
over the same function) and `OrthoL1.loss()`'s (a whole model, eager through an autograd Function,
compiled through a custom op), with the double backward's torch expression of the loss.

Each op forms the loss and the gradient in one forward pass; the first-order backward only scales the
saved gradient by grad_output. The ops trace under torch.compile (register_fake gives the shapes).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import _penalty
from . import _core
from ._bridge import _TORCH_DTYPE, _host_array, _host_slices, _on_torch_stream, _slices, _to_array

# ---------------------------------------------------------------------------------------------
# ortho_l1: one tensor, autograd


def _run_core(
    V: torch.Tensor,
    Vo: torch.Tensor | None,
    beta: float,
    reduction: str,
    want_grad: bool,
    device: torch.device,
    accumulate: bool = False,
    variant: Any = _penalty.DEFAULT,
    precision: str = "highest",
) -> torch.Tensor:
    """The core on (m, l, n) slice views of tensors (no copy): the cached plan for their layout.
    CUDA: every allocation (workspaces, the per-slice losses) comes from torch's allocator and the
    loss is reduced by torch, so the call can be captured by torch.cuda.graph. CPU: `_run_host` on the
    NumPy arrays over the same memory.
    precision: resolved ("highest" or "tf32"), part of the cached plan's key (the NumPy backend computes
    full float32 under either)."""
    if device.type != "cuda":
        o = _to_array(Vo) if want_grad and Vo is not None else None
        return _run_host(_to_array(V), o, beta, reduction, want_grad, accumulate, variant, precision)
    with _on_torch_stream(device):
        a = _to_array(V)
        o = _to_array(Vo) if want_grad and Vo is not None else None
        p = _core.cached(
            a,
            0,
            reduction,
            precision,
            "cupy",
            None,
            variant.penalty,
            variant.diagonal,
            variant.normalize,
            bf16_bits=V.dtype == torch.bfloat16,
        )
        import cupy

        def alloc(shape, dt):
            return cupy.from_dlpack(
                torch.empty(tuple(shape), dtype=_TORCH_DTYPE[np.dtype(dt)], device=device)
            )

        losses = torch.empty(V.shape[0], dtype=torch.float64, device=device)
        _core.execute(p, a, o, accumulate, beta, want_grad, alloc=alloc, losses=_to_array(losses))
    ldt = torch.float64 if V.dtype == torch.float64 else torch.float32
    if reduction == "none":
        return (losses * beta).to(ldt)
    total = losses.sum() * beta
    if reduction == "mean" and V.shape[0]:
        total = total / V.shape[0]
    return total.to(ldt)


def _run_host(
    a: np.ndarray,
    o: np.ndarray | None,
    beta: float,
    reduction: str,
    want_grad: bool,
    accumulate: bool = False,
    variant: Any = _penalty.DEFAULT,
    precision: str = "highest",
) -> torch.Tensor:
    """The NumPy backend on (m, l, n) arrays over CPU tensors' memory (o: the gradient's, or None): the
    plan forms and reduces the losses itself, which costs less per call than torch ops on small inputs."""
    p = _core.cached(
        a, 0, reduction, precision, "numpy", None, variant.penalty, variant.diagonal, variant.normalize
    )
    if o is not None and o.strides == a.strides:
        # handed over as the plan's own allocation: given as out=, the plan works out both layouts
        # again on every call; its own allocation with phi's strides reuses its plan's
        loss, _ = _core.execute(p, a, None, accumulate, beta, want_grad, alloc=lambda _shape, _dt: o)
    else:
        loss, _ = _core.execute(p, a, o, accumulate, beta, want_grad)
    return torch.from_numpy(np.asarray(loss))


def _loss_shape(weight: torch.Tensor, how: str, m_axis: int, reduction: str) -> tuple[int, ...]:
    if reduction != "none":
        return ()
    return (weight.shape[m_axis],) if how == "stack" else (1,)


# -- double backward ------------------------------------------------------------------------------
#
# The first-order backward hands out the gradient formed in the forward pass, a constant to autograd.
# When the backward itself runs with grad mode on (create_graph=True: gradient penalties, MAML), the
# gradient is instead formed again from the saved weight by this torch expression of the same loss,
# differentiated by autograd with create_graph=True, so that its own derivative (the Hessian-vector
# product) is right: for penalty="l1" that is 2 beta dW sign(E), the sign held constant, as autograd
# holds it for |x|; l2 and normalize follow from their expressions.


def _penalty_expr(V: torch.Tensor, variant: Any) -> torch.Tensor:
    """Per-slice losses sum f(E) (beta not included) of (m, l, n) slices V, as differentiable torch ops:
    the core's formula (docs/penalties.md), including its zero-column rule when normalizing."""
    eye = torch.eye(V.shape[2], dtype=V.dtype, device=V.device)
    if variant.normalize:
        d = (V * V).sum(dim=1)
        nz = d > 0
        # a zero column stays zero with a zero gradient (the inner where keeps rsqrt(0) out of autograd)
        r = torch.where(nz, torch.where(nz, d, 1.0).rsqrt(), 0.0)
        U = V * r.unsqueeze(1)
        # the diagonal of the normalized Gram is 1 exactly (-1 in E for a zero column), not 1 + rounding
        E = (U.transpose(1, 2) @ U) * (1 - eye) - eye * (~nz).unsqueeze(1).to(V.dtype)
    else:
        E = V.transpose(1, 2) @ V - eye
    if not variant.diagonal:
        E = E * (1 - eye)
    return (E.abs() if variant.penalty == "l1" else E * E).sum(dim=(1, 2))


def _expr_dtype(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # the core's precision


def _grad_with_graph(loss_fn: Callable[..., torch.Tensor], inputs: tuple, go: torch.Tensor) -> tuple:
    """d(loss_fn(*inputs))/d(inputs) . go as tensors with an autograd graph (for create_graph=True)."""
    with torch.enable_grad():
        loss = loss_fn(*inputs)
        return torch.autograd.grad(loss.to(go.dtype), inputs, go, create_graph=True, allow_unused=True)


# -- ortho_l1: one computation, two entries (the custom op for tracing, an autograd.Function eagerly)


def _ortho_l1_impl(
    weight: torch.Tensor,
    beta: float,
    reduction: str,
    how: str,
    m_axis: int,
    transpose: bool,
    want_grad: bool,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str = "highest",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, gradient) of one tensor; the gradient is an empty (0,) tensor when not wanted. The
    forward pass forms the gradient (one pass, no recomputation). precision: resolved by the caller
    (an argument, so that a compiled graph records the setting it was traced under)."""
    w = weight.detach()
    grad = torch.empty_like(w) if want_grad else None
    variant = _penalty.Variant(penalty, diagonal, normalize)
    if w.device.type == "cpu" and how != "flatten":  # NumPy views: no torch dispatch per view
        a = _host_slices(_host_array(w), how, m_axis, transpose)
        o = _host_slices(_host_array(grad), how, m_axis, transpose) if grad is not None else None
        loss = _run_host(a, o, beta, reduction, want_grad, False, variant, precision)
        return loss, (w.new_empty((0,)) if grad is None else grad)
    V = _slices(w, how, m_axis, transpose)
    Vo = _slices(grad, how, m_axis, transpose) if grad is not None else None
    loss = _run_core(
        V,
        Vo,
        beta,
        reduction,
        want_grad,
        w.device,
        variant=variant,
        precision=precision,
    )
    if grad is None:
        return loss, w.new_empty((0,))
    return loss, grad


# torch.compile, dispatch modes (fake tensors, functionalization), functorch transforms and CUDA graph
# capture see this op; eager calls take `_OrthoL1Fn`, which runs the same function without the op's
# dispatch (about 0.2 ms a call on the CPU, more than the computation itself on PointNet-sized input)
_ortho_l1_op = torch.library.custom_op("gpu_orthol1::ortho_l1", mutates_args=())(_ortho_l1_impl)


@_ortho_l1_op.register_fake
def _(
    weight,
    beta,
    reduction,
    how,
    m_axis,
    transpose,
    want_grad,
    penalty="l1",
    diagonal=True,
    normalize=False,
    precision="highest",
):
    ldt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    loss = weight.new_empty(_loss_shape(weight, how, m_axis, reduction), dtype=ldt)
    return loss, (torch.empty_like(weight) if want_grad else weight.new_empty((0,)))


def _ortho_l1_setup(ctx, inputs, output):
    # the weight is kept for a double backward only (no copy: it is the input itself)
    ctx.save_for_backward(inputs[0], output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.args = inputs[1:]
    ctx.ndim = inputs[0].dim()


def _weight_grad(ctx, w: torch.Tensor, g: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    """The weight's gradient from the saved weight w and the forward's gradient g (ctx.args: the
    call's arguments after the weight, ctx.ndim: the weight's dims)."""
    beta, reduction, how, m_axis, transpose, _want = ctx.args[:6]
    if torch.is_grad_enabled():  # create_graph=True: a gradient autograd can differentiate again
        # after the variant: the precision, which the torch expression below does not take
        variant = _penalty.Variant(*ctx.args[6:9])

        def loss_fn(x):
            per = _penalty_expr(_slices(_expr_dtype(x), how, m_axis, transpose), variant) * beta
            if reduction == "none":
                return per
            return per.sum() / (per.shape[0] if reduction == "mean" and per.shape[0] else 1)

        return _grad_with_graph(loss_fn, (w,), go)[0]
    if reduction == "none" and ctx.ndim == 3:
        shape = [1, 1, 1]
        shape[m_axis] = -1
        go = go.reshape(shape)
    # the gradient of the same forward pass, scaled by grad_output (out of place: backward may run twice)
    return g * go.to(g.dtype)


def _ortho_l1_backward(ctx, go, _go_grad):
    w, g = ctx.saved_tensors
    return (_weight_grad(ctx, w, g, go),) + (None,) * len(ctx.args)


_ortho_l1_op.register_autograd(_ortho_l1_backward, setup_context=_ortho_l1_setup)


class _OrthoL1Fn(torch.autograd.Function):
    """`_ortho_l1_op` for eager calls: the same function and backward, with less per call on small
    inputs: the arguments after the weight come as one tuple (apply() handles each argument it is
    given in Python and C++), and the loss is the only output (the gradient is saved, not returned).
    (A forward with ctx: with a separate setup_context, apply() binds the arguments through
    inspect.signature, ~40 us a call.)"""

    @staticmethod
    def forward(ctx, weight, args):
        loss, g = _ortho_l1_impl(weight, *args)
        # the weight is kept for a double backward only (no copy: it is the input itself)
        ctx.save_for_backward(weight, g)
        ctx.args = args
        ctx.ndim = weight.dim()
        return loss

    @staticmethod
    def backward(ctx, go):
        w, g = ctx.saved_tensors
        return _weight_grad(ctx, w, g, go), None


def _traced(t: torch.Tensor) -> bool:
    """Whether a call on t must go through the custom op: something traces or transforms it
    (torch.compile, a dispatch or torch-function mode, functorch, a tensor subclass) or a CUDA
    graph is being captured. Each test is one attribute or C call."""
    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or (type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter)
        or (t.is_cuda and torch.cuda.is_current_stream_capturing())
    )


def _ortho_l1_call(weight: torch.Tensor, *args: Any) -> torch.Tensor:
    if _traced(weight):
        return _ortho_l1_op(weight, *args)[0]
    return _OrthoL1Fn.apply(weight, args)


# -- OrthoL1.loss() refusing DTensor parameters under torch.compile

_DTENSOR_COMPILED = (
    "OrthoL1.loss() under torch.compile takes plain tensors, and some parameters are DTensors "
    "(a sharded model, e.g. after fully_shard): call reg.loss() outside the compiled function "
    "(the sharded loss runs eagerly)"
)


# Why an op, not a `raise` in loss(): under fullgraph=True dynamo turns an exception raised in traced
# code into its own Unsupported("Observed exception"), and letting it reach the loss op with DTensor
# inputs fails in DTensor's dispatch ("no sharding strategy"). This op traces like any other (a plain
# tensor in, no DTensor) and raises our ValueError when the compiled code first runs.
@torch.library.custom_op("gpu_orthol1::dtensor_compile_refused", mutates_args=())
def _dtensor_compile_refused(like: torch.Tensor) -> torch.Tensor:
    raise ValueError(_DTENSOR_COMPILED)


@_dtensor_compile_refused.register_fake
def _(like):
    return torch.empty_like(like)


def _dtensor_class() -> Any:
    """torch's DTensor class when torch.distributed.tensor is loaded (else no parameter can be one).
    Dynamo traces this and the isinstance test on it, unlike `_is_dtensor`'s module-name test. (An
    attribute of the loaded package, not a sys.modules lookup: dynamo iterates sys.modules for that,
    which fails when another thread imports a module meanwhile.)"""
    mod = getattr(getattr(torch, "distributed", None), "tensor", None)
    return None if mod is None else getattr(mod, "DTensor", None)


# -- OrthoL1.loss(): eager


class _OrthoL1ModelFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, reg, grad_mode, *params):
        want = grad_mode and any(ctx.needs_input_grad[2:])
        active = reg._runner.active()
        outs: list | None = None
        if want:
            outs = [None] * len(reg.targets)
            for j, p in zip(active, params, strict=True):
                outs[j] = torch.empty_like(p)
        totals = reg._runner.execute(outs, beta_gemm=0.0, want_grad=want)
        if want:
            # the parameters are kept for a double backward only (no copy: they are the inputs)
            ctx.save_for_backward(*params, *[outs[j] for j in active])  # type: ignore[index]
            ctx.reg, ctx.active = reg, active
        ctx.want = want
        ctx.nparams = len(params)
        return reg._runner.result(totals)

    @staticmethod
    def backward(ctx, go):
        if not ctx.want:
            return (None,) * (2 + ctx.nparams)
        saved = ctx.saved_tensors
        params, grads = saved[: ctx.nparams], saved[ctx.nparams :]
        if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
            return (None, None) + _grad_with_graph(
                lambda *ps: ctx.reg._runner.loss_expr(ctx.active, ps), params, go
            )
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
def _orthol1_op(
    params: list[torch.Tensor], key: int, active: list[int], want_grad: bool, precision: str = "highest"
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(loss, gradients of `params`) of the OrthoL1 registered as `key`, over its targets `active` (whose
    parameters `params` are); no gradients when not `want_grad`. precision: resolved when traced."""
    ref = _registry.get(key)
    reg = ref() if ref is not None else None
    if reg is None:
        raise RuntimeError("gpu_orthol1: this compiled graph refers to an OrthoL1 that no longer exists")
    reg._runner.check_devices()
    if reg._sharded(active):
        raise ValueError(
            "OrthoL1.loss() over DTensor (sharded) parameters does not run inside torch.compile: "
            "call it outside the compiled function"
        )
    outs: list | None = None
    if want_grad:
        outs = [None] * len(reg.targets)
        for j, p in zip(active, params, strict=True):
            outs[j] = torch.empty_like(p)
    # computed from the tensors the graph hands over (a compiled function may have changed the
    # parameters before calling loss()), through the regularizer's grouping
    loss = reg._runner.result(
        reg._runner.execute(
            outs,
            beta_gemm=0.0,
            want_grad=want_grad,
            params=dict(zip(active, params, strict=True)),
            precision=precision,
        )
    )
    return loss, ([outs[j] for j in active] if outs is not None else [])


@_orthol1_op.register_fake
def _(params, key, active, want_grad, precision="highest"):
    ref = _registry.get(key)
    reg = ref() if ref is not None else None
    # the loss dtype follows every target, active or not (as in eager mode)
    ldt = reg._runner.loss_dtype() if reg is not None else torch.float32
    return params[0].new_empty((), dtype=ldt), ([torch.empty_like(p) for p in params] if want_grad else [])


def _orthol1_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0], *output[1])  # the parameters: for a double backward only
    ctx.mark_non_differentiable(*output[1])
    ctx.nparams = len(inputs[0])
    ctx.key, ctx.active = inputs[1], inputs[2]


def _orthol1_backward(ctx, go, _go_grads):
    # key, active, want_grad[, precision]: no gradients. Counted from the call, not from setup's inputs
    # (which hold every default): a traced call leaves out a precision equal to its default
    nones = (None,) * (len(ctx.needs_input_grad) - 1)
    saved = ctx.saved_tensors
    params, grads = saved[: ctx.nparams], saved[ctx.nparams :]
    if not grads:  # the forward ran without gradients (torch.no_grad)
        return ([None] * ctx.nparams, *nones)
    if torch.is_grad_enabled():  # create_graph=True (eager; compiled graphs refuse a double backward)
        ref = _registry.get(ctx.key)
        reg = ref() if ref is not None else None
        if reg is None:
            raise RuntimeError(
                "gpu_orthol1: a double backward through OrthoL1.loss() needs the OrthoL1 "
                "that made the loss, and it no longer exists"
            )
        grads_gg = _grad_with_graph(lambda *ps: reg._runner.loss_expr(ctx.active, ps), params, go)
        return (list(grads_gg), *nones)
    return ([g * go.to(g.dtype) for g in grads], *nones)


_orthol1_op.register_autograd(_orthol1_backward, setup_context=_orthol1_setup)
