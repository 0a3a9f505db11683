"""PyTorch integration: an autograd loss, a model-wide regularizer with gradient injection and an update rule.

    from gpu_orthol1.torch import ortho_l1, OrthoL1

    loss = task_loss + ortho_l1(layer.weight, beta=1e-3, mode="rows")     # one tensor
    reg = OrthoL1(model, beta=1e-3)                                       # every matrix of a model
    (task_loss + reg.loss()).backward()        # or: task_loss.backward(); reg.add_grad_()
    reg.step_(lr)                              # or decoupled: W <- W - lr * d(reg.loss())/dW

Everything runs on the tensors' own memory: CPU tensors through zero-copy `.numpy()` views and the
core's NumPy backend, CUDA tensors through the core's cuBLAS + Numba CUDA device on torch's current
stream (no extra sync; workspaces come from torch's caching allocator or CuPy's stream-ordered pool).

Precision: float16, float32 and float64 are computed in place (Gram and loss in float32 for float16).
bfloat16 has no NumPy/CuPy dtype: such a parameter is computed from a float32 copy (Gram, loss and
gradient in float32, the gradient rounded to bfloat16 when written back), one tensor at a time.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import numbers
import re
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import torch
except ImportError as _e:  # torch is an optional extra
    raise ImportError(
        "gpu_orthol1.torch needs PyTorch, which is not installed: install it first "
        "(pip install 'torch==2.*' for your platform, see https://pytorch.org/get-started/), "
        f"then import gpu_orthol1.torch again ({_e})"
    ) from _e

# torch.library.custom_op, the op behind ortho_l1 and OrthoL1.loss (eager, torch.compile, CUDA graphs),
# came in torch 2.4; an older torch would fail at the decorator below with an AttributeError
TORCH_MIN = (2, 4)


def _check_torch_version(version: str) -> None:
    """ImportError naming `version` (a torch.__version__) when it is older than TORCH_MIN."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is not None and (int(m[1]), int(m[2])) < TORCH_MIN:
        raise ImportError(f"gpu_orthol1.torch needs torch >= {TORCH_MIN[0]}.{TORCH_MIN[1]} (for torch.library."
                          f"custom_op), found torch {version}; upgrade it: pip install 'torch>=2.4'")


_check_torch_version(str(torch.__version__))

from . import _driver, _gemm, _penalty, _plan  # noqa: E402 - after the torch checks above
from . import torch_training as _tt  # noqa: E402

__all__ = ["OrthoL1", "ortho_l1", "keras_orthogonal", "biggan_ortho"]

MODES = ("rows", "columns", "auto")
_NP_DTYPE = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
# what the core may ask torch's allocator for: the operand dtypes, and bytes (the cuBLAS workspace)
_TORCH_DTYPE = {np.dtype(v): k for k, v in _NP_DTYPE.items()} | {np.dtype(np.uint8): torch.uint8}
_OK_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# checks and zero-copy conversion


def _is_dtensor(t) -> bool:
    return isinstance(t, torch.Tensor) and type(t).__module__.startswith("torch.distributed")


def _check_tensor(t, what: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{what} is a {t.layout} tensor; gpu_orthol1 needs a dense (strided) tensor "
                        "(call .to_dense() first if that is what you mean)")
    if t.is_complex():
        raise TypeError(f"{what} is complex ({t.dtype}); the L1 orthogonality loss here is for real matrices")
    if t.dtype not in _OK_DTYPES:
        raise TypeError(f"{what} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} is on device {t.device}; gpu_orthol1 runs on CPU and CUDA tensors only")


@contextmanager
def _on_torch_stream(device):
    """CuPy (and the core's cuBLAS handle and Numba launches) on torch's current stream of `device`."""
    import cupy

    with cupy.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()):
        # Stream.from_external reads torch's __cuda_stream__ (CuPy 14 deprecates ExternalStream)
        with cupy.cuda.Stream.from_external(torch.cuda.current_stream(device)):
            yield


_devices: dict = {}


def _core_device(device):
    """The core device for tensors on `device`, made once per device (call inside `_on_torch_stream`
    for CUDA: `bind()` picks up the current stream at each call)."""
    dev = _devices.get(device)
    if dev is None:
        dev = _devices[device] = _plan.make_device("numpy" if device.type == "cpu" else "cupy", "highest")
    return dev


def _to_array(t):
    """The NumPy (CPU) or CuPy (CUDA) array on t's memory: no copy. t must be detached."""
    if t.device.type == "cpu":
        return t.numpy()
    import cupy

    return cupy.from_dlpack(t)


def _from_array(a, device):
    if device.type == "cpu":
        return torch.from_numpy(np.asarray(a))
    return torch.from_dlpack(a)


# ---------------------------------------------------------------------------------------------
# the (m, l, n) slice view of a parameter (core convention: the Gram is Phi_i^T Phi_i, n x n)


def _flat_order(x):
    """Dims 1.. of x in memory order (outermost first): the column order of its (out, -1) flattening."""
    return sorted(range(1, x.dim()), key=lambda d: -x.stride(d))


def _slices(x, how: str, axis: int, transpose: bool):
    """(m, l, n) view of x without copying: how is "matrix" (2-D), "flatten" (Conv: (out, -1)) or
    "stack" (3-D, slices along axis); transpose puts the rows' Gram (l x l) in the core's place."""
    if how == "matrix":
        v = x.unsqueeze(0)
    elif how == "flatten":
        # flatten dims 1.. in memory order: the loss and the row Gram do not depend on the order of the
        # flattened columns, and this keeps channels_last weights a view
        xp = x.permute(0, *_flat_order(x))
        try:
            v = xp.view(x.shape[0], -1).unsqueeze(0)
        except RuntimeError:
            raise ValueError(f"a {tuple(x.shape)} parameter with strides {x.stride()} cannot be flattened "
                             "to (out, -1) without a copy") from None
    else:
        v = x if axis == 0 else x.movedim(axis, 0)  # movedim costs a dispatch even as a no-op
    return v.transpose(1, 2) if transpose else v


def _pick_transpose(mode, l, n):
    if mode in (None, "columns"):
        return False
    if mode == "rows":
        return True
    return l < n  # "auto": the smaller Gram


# ---------------------------------------------------------------------------------------------
# ortho_l1: one tensor, autograd


def _run_core(V, Vo, beta, reduction, want_grad, device, accumulate=False, variant=_penalty.DEFAULT):
    """The core on (m, l, n) slice views of tensors (no copy): the cached plan for their layout.
    CUDA: every allocation (workspaces, the per-slice losses) comes from torch's allocator and the
    loss is reduced by torch, so the call can be captured by torch.cuda.graph. CPU: the plan forms
    and reduces the losses itself (NumPy), which costs less per call than torch ops on small inputs."""
    cuda = device.type == "cuda"
    with _on_torch_stream(device) if cuda else nullcontext():
        a = _to_array(V)
        o = _to_array(Vo) if want_grad else None
        p = _plan.cached(a, 0, reduction, "highest", "cupy" if cuda else "numpy", None, *variant)
        if not cuda:
            if o is not None and o.strides == a.strides:
                # handed over as the plan's own allocation: given as out=, the plan works out both
                # layouts again on every call; its own allocation with phi's strides reuses its plan's
                loss, _ = p.execute(a, None, accumulate, beta, want_grad, alloc=lambda _shape, _dt: o)
            else:
                loss, _ = p.execute(a, o, accumulate, beta, want_grad)
            return torch.from_numpy(np.asarray(loss))
        import cupy

        def alloc(shape, dt):
            return cupy.from_dlpack(torch.empty(tuple(shape), dtype=_TORCH_DTYPE[np.dtype(dt)], device=device))

        losses = torch.empty(V.shape[0], dtype=torch.float64, device=device)
        p.execute(a, o, accumulate, beta, want_grad, alloc=alloc, losses=_to_array(losses))
    ldt = torch.float64 if V.dtype == torch.float64 else torch.float32
    if reduction == "none":
        return (losses * beta).to(ldt)
    total = losses.sum() * beta
    if reduction == "mean" and V.shape[0]:
        total = total / V.shape[0]
    return total.to(ldt)


def _loss_shape(weight, how, m_axis, reduction):
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


def _penalty_expr(V, variant):
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


def _expr_dtype(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # the core's precision


def _grad_with_graph(loss_fn, inputs, go):
    """d(loss_fn(*inputs))/d(inputs) . go as tensors with an autograd graph (for create_graph=True)."""
    with torch.enable_grad():
        loss = loss_fn(*inputs)
        return torch.autograd.grad(loss.to(go.dtype), inputs, go, create_graph=True, allow_unused=True)


# -- ortho_l1: one computation, two entries (the custom op for tracing, an autograd.Function eagerly)


def _ortho_l1_impl(weight: torch.Tensor, beta: float, reduction: str, how: str, m_axis: int, transpose: bool,
                   want_grad: bool, penalty: str = "l1", diagonal: bool = True,
                   normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, gradient) of one tensor; the gradient is an empty (0,) tensor when not wanted. The
    forward pass forms the gradient (one pass, no recomputation)."""
    w = weight.detach()
    bf16 = w.dtype == torch.bfloat16
    wc = w.float() if bf16 else w  # bfloat16: float32 copy (documented)
    grad = torch.empty_like(wc) if want_grad else None
    V = _slices(wc, how, m_axis, transpose)
    Vo = _slices(grad, how, m_axis, transpose) if want_grad else None
    loss = _run_core(V, Vo, beta, reduction, want_grad, w.device,
                     variant=_penalty.Variant(penalty, diagonal, normalize))
    if grad is None:
        return loss, w.new_empty((0,))
    return loss, grad.to(torch.bfloat16) if bf16 else grad


# torch.compile, dispatch modes (fake tensors, functionalization), functorch transforms and CUDA graph
# capture see this op; eager calls take `_OrthoL1Fn`, which runs the same function without the op's
# dispatch (about 0.2 ms a call on the CPU, more than the computation itself on PointNet-sized input)
_ortho_l1_op = torch.library.custom_op("gpu_orthol1::ortho_l1", mutates_args=())(_ortho_l1_impl)


@_ortho_l1_op.register_fake
def _(weight, beta, reduction, how, m_axis, transpose, want_grad, penalty="l1", diagonal=True, normalize=False):
    ldt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    loss = weight.new_empty(_loss_shape(weight, how, m_axis, reduction), dtype=ldt)
    return loss, (torch.empty_like(weight) if want_grad else weight.new_empty((0,)))


def _ortho_l1_setup(ctx, inputs, output):
    # the weight is kept for a double backward only (no copy: it is the input itself)
    ctx.save_for_backward(inputs[0], output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.args = inputs[1:]
    ctx.ndim = inputs[0].dim()


def _ortho_l1_backward(ctx, go, _go_grad):
    w, g = ctx.saved_tensors
    beta, reduction, how, m_axis, transpose, _want, *variant = ctx.args
    nones = (None,) * len(ctx.args)
    if torch.is_grad_enabled():  # create_graph=True: a gradient autograd can differentiate again
        variant = _penalty.Variant(*variant)

        def loss_fn(x):
            per = _penalty_expr(_slices(_expr_dtype(x), how, m_axis, transpose), variant) * beta
            if reduction == "none":
                return per
            return per.sum() / (per.shape[0] if reduction == "mean" and per.shape[0] else 1)

        return _grad_with_graph(loss_fn, (w,), go) + nones
    if reduction == "none" and ctx.ndim == 3:
        shape = [1, 1, 1]
        shape[m_axis] = -1
        go = go.reshape(shape)
    # the gradient of the same forward pass, scaled by grad_output (out of place: backward may run twice)
    return (g * go.to(g.dtype),) + nones


_ortho_l1_op.register_autograd(_ortho_l1_backward, setup_context=_ortho_l1_setup)


class _OrthoL1Fn(torch.autograd.Function):
    """`_ortho_l1_op` for eager calls: the same function, setup and backward. (A forward with ctx: with
    a separate setup_context, apply() binds the arguments through inspect.signature, ~40 us a call.)"""

    @staticmethod
    def forward(ctx, *args):
        out = _ortho_l1_impl(*args)
        _ortho_l1_setup(ctx, args, out)
        return out

    backward = staticmethod(_ortho_l1_backward)


def _traced(t) -> bool:
    """Whether a call on t must go through the custom op: something traces or transforms it
    (torch.compile, a dispatch or torch-function mode, functorch, a tensor subclass) or a CUDA
    graph is being captured. Each test is one attribute or C call."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()
            or (type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter)
            or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def _ortho_l1_call(weight, *args):
    fn = _ortho_l1_op if _traced(weight) else _OrthoL1Fn.apply
    return fn(weight, *args)[0]


def ortho_l1(weight, beta=1.0, *, axis=1, reduction="sum", mode=None, penalty="l1", diagonal=True,
             normalize=False):
    """L1 orthogonality loss of a 2-D weight or of the slices of a 3-D one, as a torch scalar with autograd.

    2-D weight W (l, n): mode None or "columns" penalizes sum |W^T W - I| (n x n), "rows" sum |W W^T - I|
    (l x l), "auto" the smaller of the two. 3-D weight: slices along `axis` (the core's convention,
    each slice (l, n)), with the same modes per slice. reduction "sum" | "mean" (over slices) | "none"
    (per-slice losses, shape (m,); (1,) for 2-D). The loss is float64 for float64 weights, float32
    otherwise. The backward returns the gradient formed in the forward pass (one pass, no recomputation)
    times grad_output. CPU tensors use the NumPy backend on zero-copy views; CUDA tensors the cuBLAS
    backend on torch's current stream.

    Double backward (torch.autograd.grad(..., create_graph=True), gradient penalties, MAML): when the
    backward runs with grad mode on, it forms the gradient again from the saved weight as torch ops
    (the same loss written out: Gram, mask, |.| or square, normalization), which autograd then
    differentiates, so second derivatives are exact (for penalty="l1", 2 beta dW sign(E) with the sign
    held constant, as autograd holds it for |x|). Only that backward pays for it; the first-order one
    is unchanged. Under torch.compile a double backward raises torch's own error ("aot_autograd does
    not currently support double backward"). In-place changes to the weight between the forward and
    the backward raise autograd's usual error (the weight is saved, without a copy, for this).

    Eager calls run through a plain autograd.Function; torch.compile, dispatch modes, functorch
    transforms and CUDA graph capture see the custom op `gpu_orthol1::ortho_l1` (the same function).

    penalty ("l1" | "l2"), diagonal (False: the diagonal is free) and normalize (True: the Gram of
    the unit-normalized rows or columns that `mode` picks) choose the member of the penalty family,
    as in the core API (docs/penalties.md).
    """
    if _is_dtensor(weight):  # sharded (FSDP2, DTensor): partial Grams summed over ranks, no gather
        from . import distributed

        return distributed.dtensor_ortho_l1(weight, beta, axis, reduction, mode, penalty, diagonal, normalize)
    _check_tensor(weight, "weight")
    variant = _penalty.check(penalty, diagonal, normalize)
    if mode not in (None,) + MODES:
        raise ValueError(f"mode must be None, 'rows', 'columns' or 'auto', got {mode!r}")
    if weight.dim() == 2:
        how, m_axis = "matrix", 0
        l, n = weight.shape
    elif weight.dim() == 3:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -3 <= axis < 3:
            raise ValueError(f"axis must be an integer in [-3, 3) for a 3-D weight, got {axis!r}")
        how, m_axis = "stack", int(axis) % 3
        l, n = (s for i, s in enumerate(weight.shape) if i != m_axis)
    else:
        raise ValueError("weight must be 2-D (l, n) or 3-D (slices along axis), got shape "
                         f"{tuple(weight.shape)}; "
                         "use OrthoL1 for Conv weights (flattened to (out, -1))")
    if not isinstance(reduction, str) or reduction not in _plan.REDUCTIONS:
        raise ValueError(f"reduction must be one of {_plan.REDUCTIONS}, got {reduction!r}")
    transpose = _pick_transpose(mode, l, n)
    want_grad = torch.is_grad_enabled() and weight.requires_grad
    return _ortho_l1_call(weight, _plan.check_beta(beta), reduction, how, m_axis, transpose, want_grad, *variant)


def keras_orthogonal(w: torch.Tensor, factor: float = 0.01, mode: str = "rows") -> torch.Tensor:
    """Keras 3's `OrthogonalRegularizer(factor, mode)(w)` on the 2-D tensor w as given, with autograd.

    Keras normalizes the rows (mode="rows") or columns ("columns") of w to unit L2 norm, forms their
    Gram P (size x size) and returns factor * 0.5 * sum |P * (1 - I)| / (size * (size - 1) / 2), i.e.
    factor * sum |P * (1 - I)| / (size * (size - 1)): factor times the mean |off-diagonal entry|.
    Here that is `ortho_l1(w, factor / (size * (size - 1)), mode=mode, penalty="l1", diagonal=False,
    normalize=True)`.

    The mode applies to w as given, as Keras applies it to the kernel it is handed. A Keras Dense
    kernel is (in, out) and a torch Linear weight (out, in), its transpose: for the penalty Keras
    puts on the matching Dense layer pass `layer.weight.T`, or use `OrthoL1.keras(model, ...)`, whose
    mode is in Keras's layout. Differences, both outside the usual range: Keras scales a row of norm
    below its epsilon 1e-7 by 1e7 instead of normalizing it (here every non-zero row is normalized,
    a zero row stays zero), and for size 1 Keras returns NaN (0 / 0) where this returns 0.

    Args:
        w: a 2-D float tensor (CPU or CUDA).
        factor: Keras's `factor`, finite and >= 0.
        mode: "rows" (Keras's default) or "columns" of w.

    Returns:
        A 0-D tensor (float64 for float64 w, float32 otherwise) with autograd.

    Raises:
        TypeError: w is not a dense real float tensor.
        ValueError: w is not 2-D, mode is not "rows" or "columns", or factor is negative or not finite.

    Example:
        >>> lin = torch.nn.Linear(8, 4)
        >>> loss = keras_orthogonal(lin.weight.T, 0.01, "rows")  # Keras's Dense(4) kernel regularizer
    """
    _check_tensor(w, "w")
    if w.dim() != 2:
        raise ValueError(f"keras_orthogonal takes a 2-D weight, as Keras does, got shape {tuple(w.shape)}")
    if mode not in ("rows", "columns"):
        raise ValueError(f"mode must be 'rows' or 'columns' (Keras's modes), got {mode!r}")
    factor = _plan.check_beta(factor, "factor")
    size = w.shape[0] if mode == "rows" else w.shape[1]
    beta = factor / (size * (size - 1)) if size > 1 else 0.0
    return ortho_l1(w, beta, mode=mode, penalty="l1", diagonal=False, normalize=True)


def biggan_ortho(w, strength=1e-4):
    """BigGAN's orthogonal regularization of one weight, with autograd: W = w viewed as (out, -1),
    loss (strength / 2) * sum of squared off-diagonal entries of W W^T. Its gradient is the term
    BigGAN-PyTorch's `utils.ortho(model, strength)` adds to w.grad, 2 * strength * ((W W^T) * (1 - I)) W.
    (`OrthoL1.biggan(model, strength).add_grad_()` does that for every weight of a model at once.)"""
    _check_tensor(w, "w")
    if w.dim() < 2:
        raise ValueError(f"biggan_ortho takes a weight of 2 or more dims (viewed as (out, -1)), got shape "
                         f"{tuple(w.shape)}")
    beta = _plan.check_beta(strength, "strength") / 2
    how = "matrix" if w.dim() == 2 else "flatten"
    want_grad = torch.is_grad_enabled() and w.requires_grad
    return _ortho_l1_call(w, beta, "sum", how, 0, True, want_grad, "l2", False, False)


# ---------------------------------------------------------------------------------------------
# OrthoL1: every matrix of a model, grouped by slice shape

_DTENSOR_COMPILED = ("OrthoL1.loss() under torch.compile takes plain tensors, and some parameters are DTensors "
                     "(a sharded model, e.g. after fully_shard): call reg.loss() outside the compiled function "
                     "(the sharded loss runs eagerly)")


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


def _dtensor_class():
    """torch's DTensor class when torch.distributed.tensor is loaded (else no parameter can be one).
    Dynamo traces this and the isinstance test on it, unlike `_is_dtensor`'s module-name test."""
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else getattr(mod, "DTensor", None)



@dataclass
class _Target:
    name: str
    param: torch.Tensor
    how: str  # "matrix" | "flatten" | "stack"
    axis: int
    transpose: bool
    scale: float = 1.0  # multiplies beta for this matrix (the Keras preset's mean over entries)
    _cached: tuple | None = field(default=None, repr=False, compare=False)

    def view(self, x):
        return _slices(x, self.how, self.axis, self.transpose)

    def param_view(self, p=None):
        """(slices view, BLAS layout) of the parameter (or of `p`, the tensor a compiled graph hands
        over in its place), made once and kept while it keeps its memory, shape and strides (an
        optimizer's in-place steps do; `param.data = ...` or `.to()` give a new key): OrthoL1 asks
        every training step, and remaking them cost ~0.1 ms a step on a 3-layer CNN."""
        if p is None:
            p = self.param
        key = (p.data_ptr(), p.shape, p.stride(), p.dtype, p.device)
        hit = self._cached
        if hit is None or hit[0] != key:
            V = self.view(p.detach())
            hit = self._cached = (key, V, _gemm.slice_layout(V.shape[1], V.shape[2], V.stride(1), V.stride(2)))
        return hit[1], hit[2]

    def out_view(self, out, V, lay, p=None):
        """(slices view, layout) of `out`, a tensor shaped like the parameter `p` (default: the
        parameter) whose slices are `V`: one as_strided with V's geometry when out has p's strides,
        the general view otherwise."""
        if p is None:
            p = self.param
        if out.shape == p.shape and out.stride() == p.stride():
            off = out.storage_offset() + V.storage_offset() - p.storage_offset()
            return out.as_strided(V.shape, V.stride(), off), lay
        Vo = self.view(out)
        return Vo, _gemm.slice_layout(Vo.shape[1], Vo.shape[2], Vo.stride(1), Vo.stride(2))


def _matches(rule, name, p) -> bool:
    if callable(rule):
        return bool(rule(name, p))
    if isinstance(rule, str):
        rule = (rule,)
    return any(fnmatch.fnmatchcase(name, pat) for pat in rule)


THREE_D = ("auto", "flatten", "stack")


class OrthoL1:
    """The L1 orthogonality regularizer over every matrix-shaped parameter of a model.

    params_or_module: an nn.Module, one tensor, or an iterable of parameters or of (name, parameter)
    pairs. Taken: 2-D parameters (Linear (out, in) and the like), Conv weights of any dimension,
    flattened to (out, in*k...), and 3-D parameters by `three_d`: "flatten" (as Conv1d weights),
    "stack" (stacks of matrices along `axis`), or "auto" (default): flattened when they belong to a
    Conv module of the module passed, stacks otherwise; when parameters are passed without their
    module, "auto" cannot tell a Conv1d weight from a stack, so it warns once, naming them. Left out:
    0-D/1-D parameters (biases, norms), parameters with requires_grad=False (also those switched off
    after the regularizer was built: every call skips them), and what include/exclude rule out: each
    is a glob pattern on the parameter's name (or a list of them) or a callable (name, param) -> bool;
    a parameter is taken when it matches include (if given) and not exclude. Shared parameters count
    once. A selection of no matrices raises ValueError unless allow_empty=True.

    mode: "rows" penalizes sum |W W^T - I|, "columns" sum |W^T W - I|, "auto" (default) the smaller
    Gram (the one that can reach zero). The loss is beta times the sum over all matrices; `loss()`,
    `add_grad_()` and `step_()` return it as float64 when every parameter is float64, else float32.

    penalty ("l1" | "l2"), diagonal and normalize choose the member of the penalty family as in the
    core API (docs/penalties.md); `OrthoL1.keras(...)` and `OrthoL1.biggan(...)` are the Keras 3
    OrthogonalRegularizer and BigGAN presets.

    Parameters with one (slice shape, dtype, memory layout) are evaluated together: one batched Gram
    GEMM, one fused sign pass and one batched gradient GEMM per group and workspace chunk (on CUDA
    a cuBLAS pointer-array call over the separate tensors, no stacking copy), through the same chunk
    loop as the core API. float16 on CUDA, bfloat16 and layouts BLAS cannot read go through the core
    one tensor at a time. The workspace budget (workspace_bytes=, else GPU_ORTHOL1_WORKSPACE_BYTES,
    else a share of the free GPU memory) is fixed at the first call on each device.
    """

    def __init__(self, params_or_module, beta=1.0, mode="auto", *, axis=1, include=None, exclude=None,
                 workspace_bytes=None, three_d="auto", allow_empty=False, penalty="l1", diagonal=True,
                 normalize=False, every=1, split=None):
        self._train = _tt.State(1.0, every)
        self._collect: _tt.MetricsRun | None = None  # set by loss/add_grad_(metrics=True) and metrics()
        self.variant = _penalty.check(penalty, diagonal, normalize)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if three_d not in THREE_D:
            raise ValueError(f"three_d must be one of {THREE_D}, got {three_d!r}")
        self.beta = beta  # a float or a schedule step -> float (checked by the setter)
        self.workspace_bytes = _plan.check_workspace_bytes(workspace_bytes)
        self.mode = mode
        self._device_factory: Callable | None = None  # tests: a core device for CPU tensors
        conv = set()
        module_given = isinstance(params_or_module, torch.nn.Module)
        if module_given:
            named = list(params_or_module.named_parameters())
            for mod in params_or_module.modules():
                if isinstance(mod, torch.nn.modules.conv._ConvNd):
                    conv.add(id(mod.weight))
        elif isinstance(params_or_module, torch.Tensor):
            named = [("param", params_or_module)]
        else:
            named = []
            for i, x in enumerate(params_or_module):
                named.append(tuple(x) if isinstance(x, (tuple, list)) else (str(i), x))
        self.targets: list[_Target] = []
        seen = set()
        ambiguous = []
        for name, p in named:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
            if id(p) in seen or p.dim() < 2 or not p.requires_grad:
                continue
            if include is not None and not _matches(include, name, p):
                continue
            if exclude is not None and _matches(exclude, name, p):
                continue
            _check_tensor(p, f"parameter {name!r}")
            seen.add(id(p))
            if p.dim() == 3 and three_d == "auto" and not module_given:
                ambiguous.append(name)
            flatten_3d = three_d == "flatten" or (three_d == "auto" and id(p) in conv)
            if p.dim() == 2:
                how, l, n = "matrix", p.shape[0], p.shape[1]
            elif p.dim() >= 4 or flatten_3d:
                how, l, n = "flatten", p.shape[0], math.prod(p.shape[1:])
            else:
                ax = axis % 3
                how = "stack"
                l, n = (s for i, s in enumerate(p.shape) if i != ax)
            self.targets.append(_Target(name, p, how, axis % 3, _pick_transpose(mode, l, n)))
        if not self.targets and not allow_empty:
            raise ValueError("OrthoL1: no matrices were selected (no parameter of 2 or more dims with "
                             "requires_grad=True passed include/exclude); pass allow_empty=True if that is fine")
        if ambiguous:
            warnings.warn(
                f"OrthoL1: 3-D parameters {ambiguous} were passed without their module, so three_d='auto' "
                f"treats them as stacks of matrices along axis={axis % 3}; if they are Conv1d weights pass "
                "the module or three_d='flatten' (three_d='stack' silences this warning)",
                UserWarning, stacklevel=2)
        self.backend_calls = 0  # batched GEMM calls + per-tensor core calls of the last method call
        self._budgets: dict = {}  # device -> workspace budget, fixed at the first call there
        self._op_key = _register(self)  # how the torch.compile op finds this regularizer
        self._split = _tt.resolve_split(split, params_or_module, self.targets)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def __repr__(self):
        fam = "" if self.variant.is_default else (f", penalty={self.variant.penalty!r}, diagonal="
                                                  f"{self.variant.diagonal}, normalize={self.variant.normalize}")
        return f"OrthoL1({len(self.targets)} matrices, beta={self._train.describe()}, mode={self.mode!r}{fam})"

    # -- presets ---------------------------------------------------------------------------------

    @classmethod
    def keras(cls, params_or_module: Any, factor: float = 0.01, mode: str = "rows", **kw: Any) -> OrthoL1:
        """Keras 3's `OrthogonalRegularizer(factor, mode)` on the Keras kernel of every selected weight,
        so that a model ported from Keras gets the penalty Keras gives it under the same mode name.

        Per matrix: factor * mean |off-diagonal entry| of the Gram of the L2-normalized rows
        (mode="rows") or columns ("columns") of the Keras kernel; the loss is the sum over matrices
        (Keras adds each layer's penalty to the model's loss). The Keras kernel of a torch weight:
        a Linear weight (out, in) is read as the Dense kernel W^T (in, out), so Keras's rows are the
        weight's columns; a Conv (and ConvTranspose) weight (out, in, *k) as Keras's conv kernel
        (*k, in, out) reshaped to (prod(k) * in, out), i.e. W viewed as (out, -1) and transposed
        (Keras's regularizer itself takes 2-D kernels only; the order of the flattened rows changes
        nothing); each slice of a 3-D stack likewise as an (out, in) weight; an Embedding weight
        (num, dim), when the module is passed, as stored, Keras's Embedding layout. Parameters
        passed without their module are read as (out, in) weights. A 1-row Gram (size 1) adds 0.
        `keras_orthogonal(w, ...)` applies Keras's rule to one tensor as given instead.

        Args:
            params_or_module: as for OrthoL1.
            factor: Keras's `factor`, finite and >= 0.
            mode: "rows" (Keras's default) or "columns", of the Keras kernel.
            **kw: other OrthoL1 keywords (not mode, penalty, diagonal, normalize).

        Returns:
            An OrthoL1 whose `loss()` is that sum; `add_grad_()` and `step_()` as for OrthoL1.

        Raises:
            ValueError: mode is not "rows" or "columns", factor is negative or not finite, or
                OrthoL1 refuses the selection.
            TypeError: as for OrthoL1.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
            >>> # as Dense layers with kernel_regularizer=OrthogonalRegularizer(0.01, "rows")
            >>> reg = OrthoL1.keras(model, 0.01, "rows")
            >>> penalty = reg.loss()  # add to the task loss
        """
        if mode not in ("rows", "columns"):
            raise ValueError(f"mode must be 'rows' or 'columns' (Keras's modes), got {mode!r}")
        reg = cls(params_or_module, _plan.check_beta(factor, "factor"), "rows", penalty="l1", diagonal=False, normalize=True, **kw)
        as_stored = set()  # Keras's Embedding table is (input_dim, output_dim), torch's layout
        if isinstance(params_or_module, torch.nn.Module):
            for mod in params_or_module.modules():
                if isinstance(mod, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                    as_stored.add(id(mod.weight))
        for t in reg.targets:
            # transpose=True makes the core's Gram the torch matrix's row Gram; Keras's kernel is the
            # transpose of torch's (out, in) weight, so Keras's rows are its columns
            t.transpose = (mode == "rows") == (id(t.param) in as_stored)
            t._cached = None
            size = t.view(t.param.detach()).shape[2]
            t.scale = 1.0 / (size * (size - 1)) if size > 1 else 0.0
        reg.mode = f"keras {mode}"  # the repr's mode; not one of OrthoL1's (torch-layout) modes
        return reg

    @classmethod
    def biggan(cls, params_or_module, strength=1e-4, **kw):
        """BigGAN-PyTorch's `utils.ortho(model, strength)`: every parameter of 2 or more dims viewed as
        W = (out, -1), loss (strength / 2) * sum of squared off-diagonal entries of W W^T, whose
        gradient 2 * strength * ((W W^T) * (1 - I)) W is what BigGAN adds to .grad: call
        `add_grad_()` where BigGAN calls `utils.ortho`. 3-D parameters are flattened like Conv1d
        weights unless three_d= says otherwise; other keywords as for OrthoL1."""
        kw.setdefault("three_d", "flatten")
        return cls(params_or_module, _plan.check_beta(strength, "strength") / 2, "rows", penalty="l2",
                   diagonal=False, **kw)

    # -- planning --------------------------------------------------------------------------------

    def _active(self):
        """Indices of the targets that take part in this call: requires_grad may have been switched off."""
        share = None if self._split is None else self._split.share  # under split=: this rank's matrices
        return [j for j, t in enumerate(self.targets) if t.param.requires_grad and (share is None or j in share)]

    def _groups(self, active, outs, params=None):
        """{key: [(target index, V, Vo)]} for the batched path, and the list of per-tensor fallbacks.
        params: {target index: tensor} in place of the parameters (the torch.compile op's inputs)."""
        groups: dict = {}
        single = []
        for j in active:
            t = self.targets[j]
            p = t.param if params is None else params[j]
            V, lay = t.param_view(p)
            if outs is None:
                Vo, lay_o = None, None
            elif isinstance(outs, _LazyOuts):  # empty_like(param) later: the param's own layout
                Vo, lay_o = None, lay
            else:
                Vo, lay_o = t.out_view(outs[j], V, lay, p)
            # the GPU's pointer-array GEMM takes float32 and float64 (the emulated GPU device of the
            # tests, `_device_factory`, follows the same rule on CPU tensors)
            gpu = p.device.type != "cpu" or self._device_factory is not None
            ok = (lay is not None and (outs is None or lay_o is not None) and p.dtype != torch.bfloat16
                  and (not gpu or p.dtype in (torch.float32, torch.float64)))
            if not ok:
                single.append((j, V, Vo))
                continue
            key = (p.device, p.dtype, V.shape[1], V.shape[2], lay, lay_o, t.scale)
            groups.setdefault(key, []).append((j, V, Vo))
        return groups, single

    def _budget(self, device):
        """The workspace budget, decided at the first call on this device (as a plan decides it when
        made): no memGetInfo per call, which a CUDA graph capture would also refuse. Call on the
        device's stream (`_on_torch_stream`), so that CuPy asks the right GPU."""
        b = self._budgets.get(device)
        if b is None:
            if device.type == "cpu":
                b = _plan.workspace_budget(self.workspace_bytes, "numpy", np)
            else:
                import cupy

                b = _plan.workspace_budget(self.workspace_bytes, "cupy", cupy)
            self._budgets[device] = b
        return b

    def _execute(self, outs, *, beta_gemm: float, want_grad: bool, after_group=None, params=None):
        """Run every active target; gradients (dL/dW, plus beta_gemm * out) into outs.
        Returns {device: loss tensor (float64, beta included)}. params: see `_groups`."""
        self.backend_calls = 0
        active = self._active() if params is None else list(params)
        groups, single = self._groups(active, outs if want_grad else None, params)
        by_dev: dict = {}
        for key, members in groups.items():
            by_dev.setdefault(key[0], []).append((key, members))
        single_by_dev: dict = {}
        for s in single:
            by_dev.setdefault(s[1].device, [])
            single_by_dev.setdefault(s[1].device, []).append(s)
        totals = {}
        scaled = any(self.targets[j].scale != 1.0 for j in active)
        for device, glist in by_dev.items():
            cuda = device.type == "cuda"
            with _on_torch_stream(device) if cuda else nullcontext():
                dev = self._device_factory() if self._device_factory and not cuda else _core_device(device)
                if cuda:
                    dev.bind()

                    def alloc(shape, dt, _d=device):
                        return torch.empty(shape, dtype=getattr(torch, np.dtype(dt).name), device=_d)

                    def buf(x):
                        return x

                    def slices(x):  # one C++ call for all of a stack's matrix views
                        return x.unbind(0)
                else:
                    alloc = np.empty

                    def buf(x):
                        return x.numpy()

                    slices = list

                nslices = sum(V.shape[0] for _, members in glist for _, V, _ in members)
                losses = torch.zeros(nslices, dtype=torch.float64, device=device)
                if self._collect is not None:
                    self._collect.device(device, nslices, losses)
                losses_a = buf(losses)
                weights = torch.ones(nslices, dtype=torch.float64, device=device) if scaled else None
                budget = None
                off = 0
                for key, members in glist:
                    _, dtype, l, n, lay, lay_o, scale = key
                    alpha = 2.0 * self._applied * scale
                    phis: list = []
                    gouts: list = []
                    for j, V, Vo in members:
                        if want_grad and Vo is None:
                            Vo = self.targets[j].view(outs[j])
                        Va = buf(V)
                        phis.extend(slices(Va))
                        if want_grad:
                            Voa = buf(Vo)
                            gouts.extend(slices(Voa))
                    if budget is None:
                        budget = self._budget(device)
                    batch = _driver.Pointers(phis, gouts if want_grad else None, lay, lay_o, l, n)
                    npdt = np.dtype(_NP_DTYPE[dtype])
                    sz = _driver.sizes(dev, len(phis), l, n, npdt, want_grad=want_grad, accumulate=bool(beta_gemm),
                                       stage_phi=False, stage_out=False, budget=budget, variant=self.variant,
                                       pointers=True)
                    wsb = _driver.workspace(alloc, sz, l, n, npdt)
                    counter = _CallCounter(dev)
                    _driver.run(counter, batch, wsb, sz.chunk, losses_a, loss_offset=off, alpha=alpha,
                                beta_gemm=beta_gemm, want_grad=want_grad, variant=self.variant,
                                gram_hook=None if self._collect is None else self._collect.hook(device, off, n, members))
                    self.backend_calls += counter.calls
                    if weights is not None:
                        weights[off:off + len(phis)] = scale
                    off += len(phis)
                    if after_group is not None:
                        after_group([j for j, _, _ in members])
                total = (losses if weights is None else losses * weights).sum() * self._applied
                for j, V, Vo in single_by_dev.get(device, []):
                    if want_grad and Vo is None:
                        Vo = self.targets[j].view(outs[j])
                    one = self._single(V, Vo, device, beta_gemm, want_grad, self.targets[j].scale)
                    if self._collect is not None:
                        self._collect.add_single(j, V, one)
                    total = total + one
                    if after_group is not None:
                        after_group([j])
                totals[device] = total
        return totals

    def _single(self, V, Vo, device, beta_gemm, want_grad, scale=1.0):
        """One tensor through the core (float16 on CUDA, bfloat16, layouts BLAS cannot read)."""
        self.backend_calls += 1
        bf16 = V.dtype == torch.bfloat16
        Vc = V.float() if bf16 else V
        tmp = torch.empty_like(Vc) if want_grad and bf16 else None  # written in float32, rounded below
        o = tmp if tmp is not None else Vo
        loss = _run_core(Vc, o, self._applied * scale, "sum", want_grad, device,
                         accumulate=bool(beta_gemm) and tmp is None, variant=self.variant)
        if tmp is not None:
            if beta_gemm:
                Vo.add_(tmp)
            else:
                Vo.copy_(tmp)
        return loss.to(torch.float64)

    def _check_devices(self):
        devs = {t.param.device for t in self.targets}
        if len(devs) > 1:
            raise ValueError("OrthoL1.loss(): the parameters are on several devices "
                             f"{sorted(map(str, devs))}; "
                             "one loss tensor cannot live on all of them (use add_grad_() or step_(), which "
                             "work per device, or one OrthoL1 per device)")
        for t in self.targets:
            _check_tensor(t.param, f"parameter {t.name!r}")

    def _loss_dtype(self):
        return torch.float64 if all(t.param.dtype == torch.float64 for t in self.targets) else torch.float32

    def _result(self, totals):
        dt = self._loss_dtype()
        if not totals:
            return torch.zeros((), dtype=dt)
        if len(totals) == 1:
            return next(iter(totals.values())).to(dt)
        return {d: v.to(dt) for d, v in totals.items()}

    def _loss_expr(self, active, params):
        """The loss of targets `active` with parameters `params` as differentiable torch ops (what a
        double backward differentiates; see `_penalty_expr`)."""
        total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
        for j, p in zip(active, params):
            t = self.targets[j]
            per = _penalty_expr(_slices(_expr_dtype(p), t.how, t.axis, t.transpose), self.variant)
            total = total + (self._applied * t.scale) * per.sum()
        return total

    # -- public methods --------------------------------------------------------------------------

    # -- training-loop state: schedules, lazy application, checkpoints, metrics, the DDP split ----------
    # (the logic lives in gpu_orthol1.torch_training; these wrap the passes above)

    @property
    def beta(self) -> float:
        """beta at the current `step`: the float given, or the schedule's value there (checked)."""
        return self._train.beta_at(self._train.step)

    @beta.setter
    def beta(self, value: float | Callable[[int], float]) -> None:
        self._train.set_beta(value)
        # the weight a call applies; loss(), add_grad_() and step_() set it per call
        self._applied = self._train.const if self._train.const is not None else 0.0

    @property
    def step(self) -> int:
        """Calls of loss(), add_grad_() and step_() so far (the schedule's argument); settable."""
        return self._train.step

    @step.setter
    def step(self, value: int) -> None:
        self._train.set_step(value)

    @property
    def every(self) -> int:
        """The penalty applies on steps with step % every == 0, with every * beta."""
        return self._train.every

    def _begin(self, metrics) -> float | None:
        """The weight of this call (None: a step the lazy rule skips), checked before anything runs."""
        if not isinstance(metrics, (bool, np.bool_)):
            raise ValueError(f"metrics must be True or False, got {metrics!r}")
        if metrics and self._sharded(self._active()):
            raise ValueError("metrics=True is not available over DTensor (sharded) parameters")
        w = self._train.begin()
        if w is not None:
            self._applied = w * (self._split.world if self._split is not None else 1)
            self._collect = _tt.MetricsRun(1.0 / self._split.world if self._split is not None else 1.0) \
                if metrics else None
        return w

    def _skipped(self, metrics):
        z = torch.zeros((), dtype=self._loss_dtype(), device=self.targets[0].param.device if self.targets else None)
        return (z, {}) if metrics else z

    def _finish(self, out, metrics, detached):
        """The full penalty's value under the split (one all-reduce; off the gradient path), and the
        metrics of this call's pass."""
        try:
            m = self._collect.result(self.targets, self._applied) if self._collect is not None else None
        finally:
            self._collect = None
        if self._split is not None:
            if isinstance(out, dict):
                raise ValueError("OrthoL1(split=...) needs the parameters on one device per rank")
            full = _tt.full_value(out, self._split)
            out = full if detached else out + (full - out.detach())
        return (out, m) if metrics else out

    def loss(self, metrics: bool = False):
        """beta * sum over all matrices of sum |Gram - I|, a torch scalar with autograd (float64 when every
        parameter is float64, float32 otherwise). Add it to the task loss; its backward hands each
        parameter the gradient formed in this same forward pass. A double backward (create_graph=True)
        is exact, as for `ortho_l1`. Over DTensor (sharded) parameters the backward is first-order only.

        Each call counts one `step`; with `every=k` the steps where step % k != 0 return a zero tensor
        without computing anything, the others apply k * beta(step). Under `split=` this rank's
        share of the matrices is evaluated with world-size times the weight (DDP's gradient averaging
        then yields the full penalty's gradient); the value returned is the full penalty (one scalar
        all-reduce, detached from the gradient path). Inside torch.compile, a float beta with every=1,
        no split and no metrics is one custom op (the step is not counted there); the others break
        the graph at this call (it runs eagerly and counts the step), and fullgraph=True refuses them.

        Args:
            metrics: also return `metrics()`'s dict for this pass's matrices (the rank's share under
                split=; {} on a skipped step), a by-product of the same Grams.

        Returns:
            The loss tensor, or (loss, metrics dict) when metrics=True.

        Raises:
            ValueError: a schedule value that is not finite or negative (before anything is computed),
                parameters on several devices, metrics over DTensor parameters.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4), beta=lambda step: 1e-3 * 0.99 ** step, every=2)
            >>> penalty, m = reg.loss(metrics=True)
        """
        if torch.compiler.is_compiling():  # one custom op to dynamo: no graph break
            if metrics or self._train.schedule is not None or self._train.every != 1 or self._split is not None:
                return self._loss_eager(metrics)
            return self._loss()
        if self._begin(metrics) is None:
            return self._skipped(metrics)
        try:
            out = self._loss()
        except BaseException:
            self._collect = None
            raise
        return self._finish(out, metrics, detached=False)

    @torch.compiler.disable
    def _loss_eager(self, metrics):
        """loss() run eagerly from a compiled function (a graph break; dynamo compiles none of its frames,
        which would otherwise pin this regularizer's registry key into their guards)."""
        return self.loss(metrics)

    def add_grad_(self, metrics: bool = False):
        """Add d(loss())/dW into each parameter's .grad (created as zeros when None), without an autograd
        graph, before optimizer.step(). Parameters whose requires_grad is False are skipped. The
        gradient GEMM accumulates straight into .grad; the only extra memory is the Gram workspace
        chunk (on CPU also one matrix-sized temporary). Counts one `step` (see `loss` for `every`).

        When to call it: without split=, anywhere between zero_grad() and optimizer.step() (under
        DDP after backward() too: every rank adds the same full gradient). Under split= call it
        BEFORE backward(): each rank adds world-size times its share's gradient to .grad, and DDP's
        all-reduce in backward() averages .grad (what it held before included) over the ranks.

        Args:
            metrics: also return the metrics dict of this pass (see `loss`).

        Returns:
            The loss value (detached; the full penalty under split=; {device: loss} when the
            parameters span several devices), or (loss, metrics dict) when metrics=True.

        Raises:
            ValueError: a bad schedule value, a .grad that does not match its parameter.
            TypeError: a sparse .grad.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4), 1e-3)
            >>> value = reg.add_grad_()
        """
        if self._begin(metrics) is None:
            return self._skipped(metrics)
        try:
            out = self._add_grad_()
        except BaseException:
            self._collect = None
            raise
        return self._finish(out, metrics, detached=True)

    def step_(self, lr: float):
        """The update rule W <- W - lr * d(loss())/dW in place, decoupled from the optimizer (like AdamW's
        weight decay), from the weights before the update; parameters whose requires_grad is False are
        left alone. Counts one `step` (see `loss` for `every`). Not available under split=.

        Args:
            lr: the step size, a finite real number.

        Returns:
            The loss value before the step (detached, the dtype rule of `loss()`).

        Raises:
            ValueError: a bad lr or schedule value, or a regularizer built with split=.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4), 1e-3)
            >>> value = reg.step_(0.1)
        """
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(float(lr)):
            raise ValueError(f"lr must be a finite real number, got {lr!r}")
        if self._split is not None:
            raise ValueError("step_() does not take split= (the ranks would update different matrices); "
                             "use add_grad_() before backward() or loss()")
        if self._begin(False) is None:
            return self._skipped(False)
        return self._step_(lr)

    @torch.no_grad()
    def metrics(self, flat: bool = False, prefix: str = ""):
        """How orthogonal each matrix is, from one Gram-only pass per group (no gradient GEMM).

        Per matrix (by name): "penalty" (beta(step) times its loss, without the every factor),
        "max_cos" (the largest |cosine| between two different rows/columns of the penalized Gram:
        the worst pair), "fro" (||G - I||_F / sqrt(n)) and "mean_abs" (the mean |G - I| entry); the
        slices of a stack combine as: penalty summed, max_cos max, fro root mean square, mean_abs
        mean. Every selected matrix is evaluated, under split= too. Does not count a step.

        Args:
            flat: return {prefix + name + "/" + key: float} (reads the values: one host sync)
                instead of {name: {key: 0-d float64 tensor}} (no host sync until read).
            prefix: put in front of each flat key, e.g. "ortho/".

        Returns:
            The nested or flat dict described above.

        Raises:
            ValueError: DTensor (sharded) parameters, a bad schedule value or prefix.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4))
            >>> logs = reg.metrics(flat=True, prefix="ortho/")  # {"ortho/weight/max_cos": ..., ...}
        """
        active = [j for j, t in enumerate(self.targets) if t.param.requires_grad]
        if self._sharded(active):
            raise ValueError("metrics() is not available over DTensor (sharded) parameters")
        beta = self.beta
        saved, self._applied = self._applied, beta
        self._collect = run = _tt.MetricsRun()
        try:
            self._execute(None, beta_gemm=0.0, want_grad=False, params={j: self.targets[j].param for j in active})
            m = run.result(self.targets, beta)
        finally:
            self._collect, self._applied = None, saved
        return _tt.flatten(m, prefix) if flat else m

    def state_dict(self) -> dict:
        """The regularizer's training state: the step (the schedule's position and the lazy counter),
        every, a float beta (a schedule object's own state_dict() when it has one).

        Returns:
            A dict of plain Python values, for torch.save next to the model's and optimizer's.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4), beta=lambda s: 1e-3, every=3)
            >>> ckpt = {"ortho": reg.state_dict()}
        """
        return self._train.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s state: the run continues as the saved one would have.

        Args:
            state: a dict from `state_dict()`.

        Raises:
            ValueError: not such a dict, or saved with another `every`.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4), every=3)
            >>> reg.load_state_dict({"step": 7, "every": 3, "beta": 1.0})
        """
        self._train.load_state_dict(state)
        if self._train.const is not None:
            self._applied = self._train.const

    def _loss(self):
        """beta * sum over all matrices of sum |Gram - I|, a torch scalar with autograd (float64 when every
        parameter is float64, float32 otherwise). Add it to the task loss; its backward hands each
        parameter the gradient formed in this same forward pass. A double backward (create_graph=True)
        is exact, as for `ortho_l1` (the backward then forms the gradients from the saved parameters
        as torch ops, for autograd to differentiate); under torch.compile torch refuses it with its
        own error. Over DTensor (sharded) parameters the backward is first-order only: a double
        backward there lacks the second-order term (not yet refused)."""
        if torch.compiler.is_compiling():  # one custom op to dynamo: no graph break
            active = self._active()
            if not active:
                return torch.zeros((), dtype=self._loss_dtype())
            params = [self.targets[j].param for j in active]
            dt = _dtensor_class()
            if dt is not None and any(isinstance(p, dt) for p in params):  # before the loss op sees a DTensor
                return _dtensor_compile_refused(torch.zeros((), dtype=self._loss_dtype()))
            return _orthol1_op(params, self._op_key, active, torch.is_grad_enabled())[0]
        self._check_devices()
        active = self._active()
        if not active:
            return torch.zeros((), dtype=self._loss_dtype())
        if self._sharded(active):
            from . import distributed

            return distributed.orthol1_dtensor_loss(self._dtensor_targets(active), self._applied,
                                                    **self._family_kw()).to(self._loss_dtype())
        return _OrthoL1ModelFn.apply(self, torch.is_grad_enabled(), *[self.targets[j].param for j in active])

    def _sharded(self, active) -> bool:
        """Any DTensor parameter (a model after fully_shard): the whole call goes through
        gpu_orthol1.distributed, one collective per shape group per chunk."""
        return any(_is_dtensor(self.targets[j].param) for j in active)

    def _dtensor_targets(self, active):
        return [(t.param, t.how, t.axis, t.transpose, t.scale) for t in (self.targets[j] for j in active)]

    def _family_kw(self):
        return dict(workspace_bytes=self.workspace_bytes, penalty=self.variant.penalty,
                    diagonal=self.variant.diagonal, normalize=self.variant.normalize)

    @torch.no_grad()
    def _add_grad_(self):
        """Add d(loss())/dW into each parameter's .grad (created as zeros when None), without an autograd
        graph: call after the task loss's backward, before optimizer.step(). Parameters whose
        requires_grad is False are skipped. The gradient GEMM accumulates straight into .grad; the only
        extra memory is the Gram workspace chunk (on CPU also one matrix-sized temporary: NumPy's matmul
        cannot add). Returns the loss value (detached, the dtype rule of `loss()`): {device: loss} when
        the parameters span several devices."""
        active = self._active()
        if self._sharded(active):
            from . import distributed

            return distributed.orthol1_dtensor_add_grad_(self._dtensor_targets(active), self._applied,
                                                         **self._family_kw()).to(self._loss_dtype())
        outs: list = [None] * len(self.targets)
        staged: list = []  # (.grad, temporary in the weight's layout)
        for j in active:
            t = self.targets[j]
            p = t.param
            _check_tensor(p, f"parameter {t.name!r}")
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            g = p.grad
            if g.layout != torch.strided:
                raise TypeError(f"parameter {t.name!r} has a {g.layout} .grad (e.g. a sparse Embedding); "
                                "add_grad_ needs a dense gradient")
            if g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
                raise ValueError(f"parameter {t.name!r}: .grad is {g.dtype} {tuple(g.shape)} on {g.device}, "
                                 f"the parameter {p.dtype} {tuple(p.shape)} on {p.device}")
            if t.how == "flatten" and _flat_order(g) != _flat_order(p):
                # .grad laid out unlike the weight (a contiguous .grad of a channels_last weight): its
                # (out, -1) view would order the columns differently, so go through the weight's layout
                warnings.warn(f"gpu_orthol1: parameter {t.name!r} has a .grad laid out unlike the parameter "
                              f"(strides {g.stride()} against {p.stride()}); adding through a temporary",
                              _driver.CopyWarning, stacklevel=2)
                staged.append((g, torch.zeros_like(p)))
                g = staged[-1][1]
            outs[j] = g
        res = self._result(self._execute(outs, beta_gemm=1.0, want_grad=True))
        for g, tmp in staged:
            g.add_(tmp)
        return res

    @torch.no_grad()
    def _step_(self, lr):
        """The update rule W <- W - lr * d(loss())/dW in place, decoupled from the optimizer (like AdamW's
        weight decay), from the weights before the update; parameters whose requires_grad is False are
        left alone. A gradient buffer lives per group only. Returns the loss value before the step
        (detached, the dtype rule of `loss()`)."""
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(float(lr)):
            raise ValueError(f"lr must be a finite real number, got {lr!r}")
        active = self._active()
        if self._sharded(active):
            from . import distributed

            return distributed.orthol1_dtensor_step_(self._dtensor_targets(active), self._applied, lr,
                                                     **self._family_kw()).to(self._loss_dtype())
        for t in self.targets:
            _check_tensor(t.param, f"parameter {t.name!r}")
        tmps = _LazyOuts(self.targets)

        def apply(js):
            for j in js:
                self.targets[j].param.sub_(tmps[j], alpha=float(lr))
                tmps[j] = None

        return self._result(self._execute(tmps, beta_gemm=0.0, want_grad=True, after_group=apply))


class _LazyOuts:
    """step_'s gradient buffers: made (empty_like the parameter) when their group runs, freed after."""

    def __init__(self, targets):
        self._targets = targets
        self._bufs: dict = {}

    def __getitem__(self, j):
        b = self._bufs.get(j)
        if b is None:
            b = self._bufs[j] = torch.empty_like(self._targets[j].param)
        return b

    def __setitem__(self, j, value):
        if value is None:
            self._bufs.pop(j, None)
        else:
            self._bufs[j] = value


class _CallCounter:
    """Counts the device's GEMM calls (what `OrthoL1.backend_calls` reports)."""

    def __init__(self, dev):
        self._dev = dev
        self.calls = 0

    def gram(self, *a):
        self.calls += 1
        self._dev.gram(*a)

    def grad(self, *a):
        self.calls += 1
        self._dev.grad(*a)

    def __getattr__(self, name):
        return getattr(self._dev, name)


class _OrthoL1ModelFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, reg, grad_mode, *params):
        want = grad_mode and any(ctx.needs_input_grad[2:])
        active = reg._active()
        outs: list | None = None
        if want:
            outs = [None] * len(reg.targets)
            for j, p in zip(active, params):
                outs[j] = torch.empty_like(p)
        totals = reg._execute(outs, beta_gemm=0.0, want_grad=want)
        if want:
            # the parameters are kept for a double backward only (no copy: they are the inputs)
            ctx.save_for_backward(*params, *[outs[j] for j in active])  # type: ignore[index]
            ctx.reg, ctx.active = reg, active
        ctx.want = want
        ctx.nparams = len(params)
        return reg._result(totals)

    @staticmethod
    def backward(ctx, go):
        if not ctx.want:
            return (None,) * (2 + ctx.nparams)
        saved = ctx.saved_tensors
        params, grads = saved[:ctx.nparams], saved[ctx.nparams:]
        if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
            return (None, None) + _grad_with_graph(lambda *ps: ctx.reg._loss_expr(ctx.active, ps), params, go)
        return (None, None) + tuple(g * go.to(g.dtype) for g in grads)


# -- OrthoL1.loss() under torch.compile ---------------------------------------------------------------
#
# Dynamo cannot trace the grouping and the NumPy/CuPy calls, so a compiled `loss()` is one custom op
# (like `ortho_l1`'s): the parameters in, the loss and every gradient out, formed in one forward pass.
# The regularizer itself is not a tensor: the op finds it by a key in a registry of weak references
# (an int argument, which dynamo guards on like any constant).

_registry: dict = {}
_keys = itertools.count()  # next() is one C call: threads building regularizers get distinct keys


def _register(reg) -> int:
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
    reg._check_devices()
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
    loss = reg._result(reg._execute(outs, beta_gemm=0.0, want_grad=want_grad, params=dict(zip(active, params))))
    return loss, ([outs[j] for j in active] if outs is not None else [])


@_orthol1_op.register_fake
def _(params, key, active, want_grad):
    ref = _registry.get(key)
    reg = ref() if ref is not None else None
    # the loss dtype follows every target, active or not (as in eager mode)
    ldt = reg._loss_dtype() if reg is not None else torch.float32
    return params[0].new_empty((), dtype=ldt), ([torch.empty_like(p) for p in params] if want_grad else [])


def _orthol1_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0], *output[1])  # the parameters: for a double backward only
    ctx.mark_non_differentiable(*output[1])
    ctx.nparams = len(inputs[0])
    ctx.key, ctx.active = inputs[1], inputs[2]


def _orthol1_backward(ctx, go, _go_grads):
    saved = ctx.saved_tensors
    params, grads = saved[:ctx.nparams], saved[ctx.nparams:]
    if not grads:  # the forward ran without gradients (torch.no_grad)
        return [None] * ctx.nparams, None, None, None
    if torch.is_grad_enabled():  # create_graph=True (eager; compiled graphs refuse a double backward)
        ref = _registry.get(ctx.key)
        reg = ref() if ref is not None else None
        if reg is None:
            raise RuntimeError("gpu_orthol1: a double backward through OrthoL1.loss() needs the OrthoL1 "
                               "that made the loss, and it no longer exists")
        return list(_grad_with_graph(lambda *ps: reg._loss_expr(ctx.active, ps), params, go)), None, None, None
    return [g * go.to(g.dtype) for g in grads], None, None, None


_orthol1_op.register_autograd(_orthol1_backward, setup_context=_orthol1_setup)
