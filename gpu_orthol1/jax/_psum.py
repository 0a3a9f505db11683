"""`ortho_l1_psum`: the penalty of arrays whose Gram's summed dimension is split over a mesh axis.

Inside `shard_map`, where each device holds some rows of every slice (mode "columns": G = Phi^T Phi
sums over the rows), the Gram is the sum of the devices' local Grams. Two callbacks per device:
the first writes the local Grams (the core's chunk loop with a Gram hook that copies them out), XLA
sums them with `psum`, and the second runs the core again with a hook that puts the summed Grams in
place of the local ones before the sign pass: the loss (the same on every device) and the local
gradient 2 beta Phi_local S. Nothing of x is gathered: the traffic is m * n * n Gram entries.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from .. import _cache, _penalty, _plan
from . import _hugepages
from ._ops import (
    _check_array,
    _check_precision,
    _check_reduction,
    _computed,
    _is_gpu_buffer,
    _Leaf,
    _loss_dtype,
    _loss_shape,
    _np_slices,
    _static_beta,
    _varying_like,
)


@contextmanager
def _array_module(ctx, buf):
    """(array module, backend name) for XLA's buffers; on a GPU, inside XLA's device and stream."""
    if not _is_gpu_buffer(buf):
        yield np, "numpy"
        return
    # UNVERIFIED on a card, as gpu_orthol1.jax's GPU path: tests/test_jax_gpu.py is the check
    import cupy

    with cupy.cuda.Device(cupy.asarray(buf).device.id), cupy.cuda.ExternalStream(int(ctx.stream)):
        yield cupy, "cupy"


def _core(ctx, x, cfg, want_grad, hook_of, grad_out=None):
    """The core's call on XLA's buffer x with a Gram hook; returns (loss, plan's n)."""
    (m_axis, transpose, beta), reduction, variant, precision, _name = cfg
    with _array_module(ctx, x) as (xp, backend):
        V = _np_slices(xp.asarray(x), m_axis, transpose)
        Vo = None
        if want_grad:
            o = xp.asarray(grad_out)
            if xp is np:
                _hugepages.advise(o)
            Vo = _np_slices(o, m_axis, transpose)
        p = _cache.cached(V, 0, reduction, precision, backend, None, *variant)
        return _plan.execute(p, V, Vo, False, beta, want_grad, gram_hook=hook_of(xp, p.n))[0]


def _grams_cb(cfg):
    def cb(ctx, out, x):
        def hook_of(xp, n):
            G = xp.asarray(out).reshape(-1, n * n)
            at = [0]

            def hook(ws):  # the chunks come in order (a plan runs a hooked call on one thread)
                c = ws.shape[0]
                G[at[0] : at[0] + c] = ws
                at[0] += c

            return hook

        _core(ctx, x, cfg, False, hook_of)

    return cb


def _apply_cb(cfg, want_grad):
    def cb(ctx, outs, x, g):
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)

        def hook_of(xp, n):
            G = xp.asarray(g).reshape(-1, n * n)
            at = [0]

            def hook(ws):
                c = ws.shape[0]
                ws[...] = G[at[0] : at[0] + c]
                at[0] += c

            return hook

        loss = _core(ctx, x, cfg, want_grad, hook_of, outs[1] if want_grad else None)
        with _array_module(ctx, x) as (xp, _b):
            lo = xp.asarray(outs[0])
            lo[...] = xp.asarray(loss).reshape(lo.shape)

    return cb


def _gram_shape(x, cfg):
    (m_axis, transpose, _b) = cfg[0]
    dims = [s for i, s in enumerate(x.shape) if i != m_axis] if m_axis is not None else list(x.shape)
    n = dims[0] if transpose else dims[1]
    m = 1 if m_axis is None else x.shape[m_axis]
    return (m, n, n)


def _run(x, cfg, want_grad):
    (m_axis, _t, _b), reduction, _v, _p, name = cfg
    gdt = _loss_dtype(x.dtype)
    local = buffer_callback(
        _grams_cb(cfg), jax.ShapeDtypeStruct(_gram_shape(x, cfg), gdt), vmap_method="sequential"
    )(x)
    G = jax.lax.psum(_varying_like([local], [x])[0], name)  # the whole Gram, the same on every device
    shapes = [jax.ShapeDtypeStruct(_loss_shape(x.shape, m_axis, reduction), gdt)]
    if want_grad:
        shapes.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
    outs = buffer_callback(_apply_cb(cfg, want_grad), tuple(shapes), vmap_method="sequential")(x, G)
    # the loss comes from the summed Gram: invariant over the axis as XLA types it; the gradient is local
    return outs[0], (_varying_like([outs[1]], [x])[0] if want_grad else None)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _op(x, cfg):
    return _run(x, cfg, False)[0]


def _op_fwd(x, cfg):
    return _run(x, cfg, True)


def _op_bwd(cfg, g, ct):
    (m_axis, _t, _b), reduction = cfg[0], cfg[1]
    if reduction == "none" and m_axis is not None:
        shape = [1, 1, 1]
        shape[m_axis] = -1
        ct = ct.reshape(shape)
    return ((g * ct.astype(g.dtype)),)


_op.defvjp(_op_fwd, _op_bwd)


def ortho_l1_psum(
    x: Any,
    beta: Any,
    axis_name: str,
    *,
    axis: int = 1,
    reduction: str = "sum",
    mode: str | None = None,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str | None = None,
) -> jax.Array:
    """`ortho_l1` inside `shard_map` on the local block of an array whose Gram's summed dimension is
    split over the mesh axis `axis_name`: local Grams summed with `psum`, no gather of x.

    Args:
        x: this device's block: 2-D (l_local, n) or 3-D (slices along `axis`, each (l_local, n));
            with mode="rows" the columns are the split dimension: (l, n_local).
        beta: as for `ortho_l1`.
        axis_name: the mesh axis (of the enclosing `shard_map`) the split dimension is split over.
        axis: the slice axis of a 3-D x (the slices must not be split over `axis_name`).
        reduction: as for `ortho_l1` ("none": per-slice losses).
        mode: None or "columns": G = x^T x (n x n), x's rows split; "rows": G = x x^T (l x l), x's
            columns split. ("auto" is refused: the split dimension says which Gram.)
        penalty: as for `ortho_l1`.
        diagonal: as for `ortho_l1`.
        normalize: as for `ortho_l1`.
        precision: as for `ortho_l1`.

    Returns:
        The loss of the whole array, the same on every device (invariant over `axis_name`, so
        `out_specs=P()` takes it as it is); its gradient is this device's block of the gradient.

    Raises:
        TypeError: x is not a floating array.
        ValueError: a wrong rank, axis, mode, reduction, penalty keyword, precision or beta.

    Example:
        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from gpu_orthol1.jax import ortho_l1_psum
        >>> mesh = jax.make_mesh((len(jax.devices()),), ("d",))  # rows split over every device
        >>> f = jax.shard_map(lambda w: ortho_l1_psum(w, 1e-3, "d"), mesh=mesh, in_specs=P("d"), out_specs=P())
        >>> w = jax.random.normal(jax.random.key(0), (8 * len(jax.devices()), 4))
        >>> loss, g = jax.jit(jax.value_and_grad(f))(jax.device_put(w, NamedSharding(mesh, P("d"))))
        >>> g.shape == w.shape
        True
    """
    _check_array(x, "x")
    variant = _penalty.check(penalty, diagonal, normalize)
    if mode not in (None, "columns", "rows"):
        raise ValueError(f"mode must be None, 'columns' or 'rows' for ortho_l1_psum, got {mode!r}")
    reduction = _check_reduction(reduction)
    precision = _check_precision(precision)
    if not isinstance(axis_name, str):
        raise TypeError(f"axis_name must be a mesh axis name (str), got {type(axis_name).__name__}")
    if x.ndim == 2:
        m_axis = None
    elif x.ndim == 3:
        if isinstance(axis, bool) or not isinstance(axis, int) or not -3 <= axis < 3:
            raise ValueError(f"axis must be an integer in [-3, 3) for a 3-D x, got {axis!r}")
        m_axis = axis % 3
    else:
        raise ValueError(f"x must be 2-D (l, n) or 3-D (slices along axis), got shape {tuple(x.shape)}")
    b = _static_beta(beta)
    cfg = (_Leaf((m_axis, mode == "rows", 1.0 if b is None else b)), reduction, variant, precision, axis_name)
    xc, _cast = _computed(x)
    loss = _op(xc, cfg)
    return loss if b is not None else loss * jnp.asarray(beta).astype(loss.dtype)
