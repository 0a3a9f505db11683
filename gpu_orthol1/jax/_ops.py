"""gpu_orthol1.jax's one-array entry point: the buffer callback, the custom_vjp and `ortho_l1`."""

from __future__ import annotations

import numbers
from functools import partial
from typing import Any

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    from jax.experimental.buffer_callback import buffer_callback
except ImportError as _e:  # jax is an optional extra
    raise ImportError(
        "gpu_orthol1.jax needs JAX 0.10 or newer (jax.experimental.buffer_callback), which is not installed: "
        f"pip install 'gpu_orthol1[jax]' (or 'jax[cpu]', 'jax[cuda12]'), then import gpu_orthol1.jax again ({_e})"
    ) from _e

from .. import _cache, _checks, _penalty, _plan
from . import _hugepages

MODES = ("rows", "columns", "auto")
THREE_D = ("auto", "flatten", "stack")
_CORE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------------------------
# the callback: the core on XLA's buffers


class _Leaf(tuple):
    """(m_axis, transpose, beta) of one input: slices along m_axis (None: a 2-D matrix), transposed
    when the rows' Gram is wanted, beta already scaled for this leaf."""


def _np_slices(a, m_axis, transpose):
    """The (m, l, n) slice view of a NumPy or CuPy array (no copy)."""
    v = a[None] if m_axis is None else a.transpose((m_axis,) + tuple(i for i in range(3) if i != m_axis))
    return v.swapaxes(1, 2) if transpose else v


def _loss_shape(shape, m_axis, reduction):
    if reduction != "none":
        return ()
    return (1,) if m_axis is None else (shape[m_axis],)


def _loss_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _is_gpu_buffer(buf) -> bool:
    try:
        return hasattr(buf, "__cuda_array_interface__")
    except Exception:  # noqa: BLE001 - a CPU buffer may raise on the attribute instead of lacking it
        return False


def _run_cpu(outs, ins, leaves, reduction, variant, precision, want_grad):
    for j, (x, (m_axis, transpose, beta)) in enumerate(zip(ins, leaves, strict=True)):
        a = np.asarray(x)
        V = _np_slices(a, m_axis, transpose)
        Vo = None
        if want_grad:
            o = np.asarray(outs[len(ins) + j])
            _hugepages.advise(o)  # before the first write: 4 KiB page faults cost 12-18% (_hugepages)
            Vo = _np_slices(o, m_axis, transpose)
        p = _cache.cached(V, 0, reduction, precision, "numpy", None, *variant)
        loss, _ = _plan.execute(p, V, Vo, False, beta, want_grad)
        np.asarray(outs[j])[...] = loss


def _run_gpu(ctx, outs, ins, leaves, reduction, variant, precision, want_grad):
    # UNVERIFIED on a card: XLA's buffers as CuPy views, the core's cuBLAS path on XLA's stream
    import cupy

    first = cupy.asarray(ins[0])  # the device the buffers live on, from the pointer's attributes
    with cupy.cuda.Device(first.device.id):
        # CuPy 14 deprecates ExternalStream for objects with __cuda_stream__; XLA hands a raw pointer
        stream = cupy.cuda.ExternalStream(int(ctx.stream))
        with stream:
            for j, (x, (m_axis, transpose, beta)) in enumerate(zip(ins, leaves, strict=True)):
                a = first if j == 0 else cupy.asarray(x)
                V = _np_slices(a, m_axis, transpose)
                Vo = _np_slices(cupy.asarray(outs[len(ins) + j]), m_axis, transpose) if want_grad else None
                p = _cache.cached(V, 0, reduction, precision, "cupy", None, *variant)
                loss, _ = _plan.execute(p, V, Vo, False, beta, want_grad)
                lo = cupy.asarray(outs[j])
                lo[...] = loss.reshape(lo.shape)  # a device-to-device write on the stream, no host sync


def _callback(leaves, reduction, variant, precision, want_grad):
    def cb(ctx, outs, *ins):
        if not isinstance(outs, (tuple, list)):
            outs = (outs,)
        if ins and _is_gpu_buffer(ins[0]):
            _run_gpu(ctx, outs, ins, leaves, reduction, variant, precision, want_grad)
        else:
            _run_cpu(outs, ins, leaves, reduction, variant, precision, want_grad)

    return cb


def _call(xs, cfg, want_grad):
    """(losses per leaf, grads per leaf or None) of the arrays xs, in one callback."""
    leaves, reduction, variant, precision = cfg
    shapes = [
        jax.ShapeDtypeStruct(_loss_shape(x.shape, lf[0], reduction), _loss_dtype(x.dtype))
        for x, lf in zip(xs, leaves, strict=True)
    ]
    if want_grad:
        shapes += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]
    f = buffer_callback(
        _callback(leaves, reduction, variant, precision, want_grad), tuple(shapes), vmap_method="sequential"
    )
    out = _varying_like(f(*xs), xs)
    n = len(xs)
    return tuple(out[:n]), (tuple(out[n:]) if want_grad else None)


def _varying(x) -> frozenset:
    """The manual mesh axes x varies over (its type's `.vma` in JAX 0.7-0.9, `.mat.varying` in 0.10)."""
    aval = jax.typeof(x)
    v = getattr(aval, "vma", None)
    if v is None:
        v = getattr(getattr(aval, "mat", None), "varying", None)
    return frozenset(v or ())


def _varying_like(outs, xs):
    """Inside shard_map, the callback's results vary over the mesh axes its inputs vary over (XLA
    types them as invariant), so that psum of a loss and the custom_vjp's cotangents type-check."""
    vma = frozenset().union(*(_varying(x) for x in xs))
    if not vma:
        return outs
    res = []
    for o in outs:
        missing = tuple(sorted(vma - _varying(o), key=str))
        res.append(jax.lax.pcast(o, missing, to="varying") if missing else o)
    return res


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _op(xs, cfg):
    return _call(xs, cfg, False)[0]


def _op_fwd(xs, cfg):
    losses, grads = _call(xs, cfg, True)
    return losses, grads


def _op_bwd(cfg, grads, cts):
    leaves, reduction = cfg[0], cfg[1]
    out = []
    for g, ct, (m_axis, _t, _b) in zip(grads, cts, leaves, strict=True):
        if reduction == "none" and m_axis is not None:
            shape = [1, 1, 1]
            shape[m_axis] = -1
            ct = ct.reshape(shape)
        # the gradient of the same forward pass, scaled by the cotangent
        out.append(g * ct.astype(g.dtype))
    return (tuple(out),)


_op.defvjp(_op_fwd, _op_bwd)


# ---------------------------------------------------------------------------------------------
# argument checks shared by the entry points


def _check_array(x, what):
    if not isinstance(x, (jax.Array, np.ndarray)):
        raise TypeError(f"{what} must be a jax.Array (or NumPy array), got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{what} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _static_beta(beta):
    """A Python float for a concrete real beta (folded into the core call), None for a traced one."""
    if isinstance(beta, jax.core.Tracer):
        return None
    if isinstance(beta, jax.Array):
        if beta.ndim != 0:
            raise ValueError(f"beta must be a scalar, got an array of shape {beta.shape}")
        return None
    return _checks.check_beta(beta)


def _check_precision(precision):
    p = "highest" if precision is None else precision
    if not isinstance(p, str) or p not in _checks.PRECISIONS:
        raise ValueError(f"precision must be None or one of {_checks.PRECISIONS}, got {precision!r}")
    return p


def _check_reduction(reduction):
    if not isinstance(reduction, str) or reduction not in _checks.REDUCTIONS:
        raise ValueError(f"reduction must be one of {_checks.REDUCTIONS}, got {reduction!r}")
    return reduction


def _pick_transpose(mode, l, n):
    if mode in (None, "columns"):
        return False
    if mode == "rows":
        return True
    return l < n  # "auto": the smaller Gram


def _on_cpu(x) -> bool:
    """Whether x lives on the CPU (a traced x: whether jit compiles for the CPU by default)."""
    try:
        return all(d.platform == "cpu" for d in x.devices())
    except Exception:  # noqa: BLE001 - a tracer has no devices (or raises asking for them)
        return jax.default_backend() == "cpu"


def _computed(x):
    """(the array the core computes, whether it was cast): bfloat16 as it is on the CPU (the core takes
    ml_dtypes arrays, which is what XLA's CPU buffers are), through a float32 copy on a GPU (the
    callback hands CuPy the buffers, and CuPy has no bfloat16)."""
    if np.dtype(x.dtype) in _CORE_DTYPES or (np.dtype(x.dtype).name == "bfloat16" and _on_cpu(x)):
        return x, False
    return jnp.asarray(x, jnp.float32), True


def _apply(xs, leaves, reduction, variant, precision, beta_traced):
    """Losses per leaf with autodiff; casts bfloat16 and scales by a traced beta in JAX."""
    comp = [_computed(x) for x in xs]
    losses = _op(tuple(c for c, _ in comp), (tuple(leaves), reduction, variant, precision))
    if beta_traced is not None:
        losses = tuple(v * beta_traced.astype(v.dtype) for v in losses)
    return losses


# ---------------------------------------------------------------------------------------------
# public API


def ortho_l1(
    x: Any,
    beta: Any = 1.0,
    *,
    axis: int = 1,
    reduction: str = "sum",
    mode: str | None = None,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str | None = None,
) -> jax.Array:
    """L1 orthogonality loss of a 2-D array or of the slices of a 3-D one, differentiable in JAX.

    Args:
        x: a jax.Array (or NumPy array), 2-D (l, n): one matrix; 3-D: slices along `axis`, each (l, n).
            float16, bfloat16 (on a GPU through a float32 copy), float32, float64.
        beta: the weight: a real number (folded into the core call) or a scalar jax.Array / traced
            value (an Optax schedule's; the loss is then scaled in JAX and is differentiable in beta).
        axis: the slice axis of a 3-D x.
        reduction: "sum", "mean" (over slices) or "none" (per-slice losses, shape (m,); (1,) for 2-D).
        mode: None or "columns": sum |x^T x - I| (n x n); "rows": sum |x x^T - I| (l x l); "auto": the
            smaller Gram. Per slice for a 3-D x.
        penalty: "l1" (sum of |G - I|) or "l2" (sum of squares); docs/penalties.md.
        diagonal: False leaves the Gram's diagonal free (only off-diagonal entries count).
        normalize: True uses the Gram of the unit-normalized rows or columns.
        precision: None or "highest"; "tf32" lets the GPU path use TF32 for float32 (no effect on the CPU).

    Returns:
        The loss: float64 for float64 x, float32 otherwise; a scalar, or (m,) for reduction="none".
        Under `jax.grad` the forward pass forms the gradient too (one core call) and the backward
        scales it; usable under `jit`, `vmap` (one core call per batch element) and `jax.checkpoint`.

    Raises:
        TypeError: x is not a floating array.
        ValueError: a wrong rank, axis, mode, reduction, penalty keyword, precision or beta.

    Example:
        >>> import jax
        >>> from gpu_orthol1.jax import ortho_l1
        >>> w = jax.random.normal(jax.random.key(0), (64, 16)) / 8
        >>> loss, g = jax.jit(jax.value_and_grad(lambda w: ortho_l1(w, 1e-3)))(w)
        >>> loss.shape, g.shape
        ((), (64, 16))
    """
    _check_array(x, "x")
    variant = _penalty.check(penalty, diagonal, normalize)
    if mode not in (None,) + MODES:
        raise ValueError(f"mode must be None, 'rows', 'columns' or 'auto', got {mode!r}")
    reduction = _check_reduction(reduction)
    precision = _check_precision(precision)
    if x.ndim == 2:
        m_axis = None
        l, n = x.shape
    elif x.ndim == 3:
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral) or not -3 <= axis < 3:
            raise ValueError(f"axis must be an integer in [-3, 3) for a 3-D x, got {axis!r}")
        m_axis = int(axis) % 3
        l, n = (s for i, s in enumerate(x.shape) if i != m_axis)
    else:
        raise ValueError(
            f"x must be 2-D (l, n) or 3-D (slices along axis), got shape {tuple(x.shape)}; "
            "use ortho_l1_tree for conv kernels (flattened to (-1, out))"
        )
    b = _static_beta(beta)
    leaf = _Leaf((m_axis, _pick_transpose(mode, l, n), 1.0 if b is None else b))
    return _apply((x,), (leaf,), reduction, variant, precision, None if b is not None else jnp.asarray(beta))[
        0
    ]
