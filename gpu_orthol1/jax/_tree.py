"""gpu_orthol1.jax over pytrees: `ortho_l1_tree` and `tree_grads`, grouped by (shape, dtype, layout)."""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _penalty
from ._ops import (
    MODES,
    THREE_D,
    _apply,
    _call,
    _check_precision,
    _computed,
    _Leaf,
    _pick_transpose,
    _static_beta,
)


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
            f"out_axis must be -1 (Flax/Keras/Haiku kernels, out last) or 0 (Equinox/PyTorch), got {out_axis!r}"
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
        >>> import jax.numpy as jnp
        >>> from gpu_orthol1.jax import ortho_l1_tree
        >>> params = {"dense": {"kernel": 2 * jnp.eye(8, 4), "bias": jnp.zeros(4)}}  # the bias is left out
        >>> round(float(ortho_l1_tree(params, 1e-3)), 6)  # G = 4 I (4 x 4): sum |G - I| = 12, times beta
        0.012
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

    Args:
        params: as for `ortho_l1_tree`.
        beta: as for `ortho_l1_tree`.
        mask: as for `ortho_l1_tree`.
        mode: as for `ortho_l1_tree`.
        axis: as for `ortho_l1_tree`.
        three_d: as for `ortho_l1_tree`.
        out_axis: as for `ortho_l1_tree`.
        penalty: as for `ortho_l1_tree`.
        diagonal: as for `ortho_l1_tree`.
        normalize: as for `ortho_l1_tree`.
        precision: as for `ortho_l1_tree`.
        keras_scale: as for `ortho_l1_tree`.

    Returns:
        The total loss and a pytree like params whose untaken leaves are None.

    Raises:
        TypeError, ValueError: as for `ortho_l1_tree`.

    Example:
        >>> import jax.numpy as jnp
        >>> from gpu_orthol1.jax import tree_grads
        >>> params = {"k": 2 * jnp.eye(8, 4), "b": jnp.zeros(4)}
        >>> loss, g = tree_grads(params, 1e-3)
        >>> g["b"] is None, bool(jnp.allclose(g["k"], 2e-3 * params["k"]))  # 2 beta k sign(G - I), G = 4 I
        (True, True)
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
