"""JAX integration: the orthogonality penalty on `jax.Array`s, inside `jit`, `grad`, `vmap` and `checkpoint`.

    from gpu_orthol1.jax import ortho_l1, ortho_l1_tree

    loss = task_loss + ortho_l1(w, beta=1e-3, mode="columns")          # one array (2-D or 3-D)
    loss = task_loss + ortho_l1_tree(params, 1e-3)                     # every matrix leaf of a pytree

The core runs inside XLA through `jax.experimental.buffer_callback`: the callback gets XLA's own
buffers, so on the CPU the core's NumPy backend reads the input and writes the gradient in place
(zero copy). A `jax.custom_vjp` computes the loss AND the gradient in one core call in its forward
pass and saves the gradient; the backward only multiplies it by the cotangent. Without
differentiation the primal computes the loss alone.

GPU (UNVERIFIED: written for XLA's CUDA buffers, never run on a card yet): the buffers carry
`__cuda_array_interface__`, are wrapped as CuPy arrays without a copy, and the core's cuBLAS path runs
on XLA's stream (`ctx.stream`), with no host synchronization.

dtypes: float32, float16 (Gram and loss in float32) and float64 (with `jax_enable_x64`) in place;
bfloat16 has no NumPy/CuPy dtype the core computes, so a bfloat16 array is cast to float32 by XLA
before the call and its gradient cast back (one float32 copy of the array, as the torch layer does).
The loss is float64 for float64 input and float32 otherwise.

Conventions are the torch layer's (`gpu_orthol1.torch`): a 2-D x (l, n) is one matrix, "columns"
(the default) penalizes |x^T x - I| (n x n), "rows" |x x^T - I| (l x l), "auto" the smaller Gram; a 3-D
x holds slices along `axis`. For pytrees, Flax / Keras / Haiku layouts put the output features LAST:
Dense kernels (in, out), Conv kernels (kh, kw, in, out); `ortho_l1_tree` flattens a kernel of 3 or
more dims to (prod(other dims), out) by a reshape (free in XLA), `out_axis=0` for Equinox / PyTorch
layouts (out, in, kh, kw). With mode="columns" the Gram is then out x out: the output units'.
"""

from __future__ import annotations

import numbers
import warnings
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

from . import _cache, _checks, _penalty, _plan

__all__ = ["ortho_l1", "ortho_l1_tree", "tree_grads"]

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
        Vo = _np_slices(np.asarray(outs[len(ins) + j]), m_axis, transpose) if want_grad else None
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


def _computed(x):
    """(the array the core computes, whether it was cast): bfloat16 through a float32 copy."""
    if np.dtype(x.dtype) in _CORE_DTYPES:
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
            float16, bfloat16 (computed through a float32 copy), float32, float64.
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
        >>> import jax, jax.numpy as jnp
        >>> from gpu_orthol1.jax import ortho_l1
        >>> w = jax.random.normal(jax.random.key(0), (64, 16)) / 8
        >>> loss, g = jax.jit(jax.value_and_grad(lambda w: ortho_l1(w, 1e-3)))(w)
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


def _mask_tree(mask, params):
    if mask is None:
        return None
    return mask(params) if callable(mask) else mask


def _targets(params, mask, mode, axis, three_d, out_axis, keras_scale):
    """(flat leaves, treedef, [(leaf index, array to compute, leaf descriptor)]) for the selected leaves."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if three_d not in THREE_D:
        raise ValueError(f"three_d must be one of {THREE_D}, got {three_d!r}")
    if out_axis not in (0, -1):
        raise ValueError(
            f"out_axis must be -1 (Flax/Keras/Haiku kernels, out last) or 0 (Equinox/PyTorch), "
            f"got {out_axis!r}"
        )
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral) or not -3 <= axis < 3:
        raise ValueError(f"axis must be an integer in [-3, 3), got {axis!r}")
    flat, treedef = jax.tree_util.tree_flatten(params)
    m = _mask_tree(mask, params)
    if m is not None:
        try:
            mflat = treedef.flatten_up_to(m)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"mask must have the structure of params (or be a callable returning one): {e}"
            ) from None
    else:
        mflat = [True] * len(flat)
    out, ambiguous = [], []
    for i, (p, keep) in enumerate(zip(flat, mflat, strict=True)):
        if not keep or not hasattr(p, "ndim") or p.ndim < 2 or not jnp.issubdtype(p.dtype, jnp.floating):
            continue
        if p.ndim == 3 and three_d == "auto":
            ambiguous.append(i)
        if p.ndim == 2:
            x, m_axis = p, None
        elif p.ndim >= 4 or three_d == "flatten":
            x = p.reshape(-1, p.shape[-1]) if out_axis == -1 else p.reshape(p.shape[0], -1)
            m_axis = None
        else:
            x, m_axis = p, int(axis) % 3
        l, n = x.shape if m_axis is None else (s for k, s in enumerate(x.shape) if k != m_axis)
        t = _pick_transpose(mode, l, n)
        scale = 1.0
        if keras_scale:
            size = l if t else n
            scale = 1.0 / (size * (size - 1)) if size > 1 else 0.0
        out.append((i, x, (m_axis, t, scale)))
    if ambiguous:
        warnings.warn(
            f"ortho_l1_tree: 3-D leaves {ambiguous} (flat indices) are treated as stacks of matrices along "
            f"axis={int(axis) % 3} (three_d='auto'); if they are Conv1D kernels pass three_d='flatten' "
            "(three_d='stack' silences this warning)",
            UserWarning,
            stacklevel=3,
        )
    return flat, treedef, out


def _group_losses(targets, beta, penalty, diagonal, normalize, precision):
    """Loss per target: one callback per (shape, dtype, layout) group."""
    variant = _penalty.check(penalty, diagonal, normalize)
    precision = _check_precision(precision)
    b = _static_beta(beta)
    groups: dict = {}
    for k, (_i, x, (m_axis, t, _scale)) in enumerate(targets):
        groups.setdefault((x.shape, np.dtype(x.dtype).name, m_axis, t), []).append(k)
    losses: list = [None] * len(targets)
    for ks in groups.values():
        xs = tuple(targets[k][1] for k in ks)
        leaves = tuple(
            _Leaf((targets[k][2][0], targets[k][2][1], targets[k][2][2] * (1.0 if b is None else b)))
            for k in ks
        )
        got = _apply(xs, leaves, "sum", variant, precision, None if b is not None else jnp.asarray(beta))
        for k, v in zip(ks, got, strict=True):
            losses[k] = v
    return losses


def ortho_l1_tree(
    params: Any,
    beta: Any = 1.0,
    *,
    mask: Any = None,
    mode: str = "auto",
    axis: int = 1,
    three_d: str = "auto",
    out_axis: int = -1,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str | None = None,
    keras_scale: bool = False,
) -> jax.Array:
    """The penalty summed over every matrix leaf of a pytree (a model's parameters), differentiable.

    Args:
        params: a pytree of arrays. Taken: floating leaves of 2 or more dims; 2-D as they are, 4-D and
            more (conv kernels) flattened by a reshape to (-1, out) (out_axis=-1: Flax, Keras, Haiku
            lay kernels out (kh, kw, in, out)) or (out, -1) (out_axis=0: Equinox, PyTorch); 3-D by
            `three_d`: "flatten" (Conv1D kernels), "stack" (slices along `axis`), "auto": stacks, with
            a warning naming them (a pytree does not say which leaves are Conv1D kernels).
        beta: a real number, or a scalar jax.Array / traced value (scaled in JAX).
        mask: None, a pytree of bools with params' structure, or a callable params -> such a pytree
            (as Optax's `mask`): only leaves marked True are taken.
        mode: "auto" (default, the smaller Gram), "columns" (x^T x of the 2-D view: for out_axis=-1
            the out x out Gram of the output units), "rows".
        penalty: as for `ortho_l1`.
        diagonal: as for `ortho_l1`.
        normalize: as for `ortho_l1`.
        precision: as for `ortho_l1`.
        keras_scale: multiply each matrix's beta by 1 / (size * (size - 1)) (Keras's mean over the
            off-diagonal entries; used by `gpu_orthol1.keras.orthogonal`).

    Returns:
        The total loss, float64 when every taken leaf is float64, else float32 (0.0 when none is taken).
        Leaves of one (shape, dtype, layout) go to the core in one callback.

    Raises:
        TypeError, ValueError: as for `ortho_l1`; a mask whose structure does not match params.

    Example:
        >>> params = {"dense": {"kernel": jnp.ones((8, 4)) / 3, "bias": jnp.zeros(4)}}
        >>> loss = ortho_l1_tree(params, 1e-3)
    """
    flat, _treedef, targets = _targets(params, mask, mode, axis, three_d, out_axis, keras_scale)
    if not targets:
        return jnp.zeros((), jnp.float32)
    losses = _group_losses(targets, beta, penalty, diagonal, normalize, precision)
    dt = jnp.float64 if all(v.dtype == jnp.float64 for v in losses) else jnp.float32
    return sum((v.astype(dt) for v in losses[1:]), losses[0].astype(dt))


def tree_grads(
    params: Any,
    beta: Any = 1.0,
    *,
    mask: Any = None,
    mode: str = "auto",
    axis: int = 1,
    three_d: str = "auto",
    out_axis: int = -1,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str | None = None,
    keras_scale: bool = False,
) -> tuple[jax.Array, Any]:
    """(loss, gradient pytree) of `ortho_l1_tree` from one core call per group, without autodiff.

    Args: as for `ortho_l1_tree`. Returns: the total loss and a pytree like params whose untaken
    leaves are None. Raises: as `ortho_l1_tree`. Example:
        >>> loss, g = tree_grads({"k": jnp.ones((8, 4)) / 3}, 1e-3)
    """
    flat, treedef, targets = _targets(params, mask, mode, axis, three_d, out_axis, keras_scale)
    variant = _penalty.check(penalty, diagonal, normalize)
    precision = _check_precision(precision)
    b = _static_beta(beta)
    bt = None if b is not None else jnp.asarray(beta)
    groups: dict = {}
    for k, (_i, x, (m_axis, t, _scale)) in enumerate(targets):
        groups.setdefault((x.shape, np.dtype(x.dtype).name, m_axis, t), []).append(k)
    grads: list = [None] * len(flat)
    total = []
    for ks in groups.values():
        comp = [_computed(targets[k][1]) for k in ks]
        leaves = tuple(
            _Leaf((targets[k][2][0], targets[k][2][1], targets[k][2][2] * (1.0 if b is None else b)))
            for k in ks
        )
        losses, gs = _call(tuple(c for c, _ in comp), (leaves, "sum", variant, precision), True)
        for k, v, g in zip(ks, losses, gs, strict=True):
            i = targets[k][0]
            p = flat[i]
            if bt is not None:
                v, g = v * bt.astype(v.dtype), g * bt.astype(g.dtype)
            grads[i] = g.astype(p.dtype).reshape(p.shape)
            total.append(v)
    if not total:
        return jnp.zeros((), jnp.float32), jax.tree_util.tree_unflatten(treedef, grads)
    dt = jnp.float64 if all(v.dtype == jnp.float64 for v in total) else jnp.float32
    return sum((v.astype(dt) for v in total[1:]), total[0].astype(dt)), jax.tree_util.tree_unflatten(
        treedef, grads
    )
