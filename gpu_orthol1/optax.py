"""Optax: the orthogonality penalty as a gradient transformation.

    import optax
    from gpu_orthol1.optax import add_ortho_l1

    tx = optax.chain(add_ortho_l1(1e-3), optax.adam(1e-3))

`add_ortho_l1` adds the penalty's gradient of the current params to the updates, as
`optax.add_decayed_weights` adds weight decay: put it before the optimizer to regularize through it
(as above), or after the learning-rate scaling for a decoupled step. The gradient comes from the core
in one call per group of equal-shaped leaves (`gpu_orthol1.jax.tree_grads`), no autodiff.
"""

from __future__ import annotations

from typing import Any, NamedTuple

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError as _e:  # optax is an optional extra
    raise ImportError(
        "gpu_orthol1.optax needs JAX and Optax, which are not installed: pip install 'gpu_orthol1[jax]', "
        f"then import gpu_orthol1.optax again ({_e})"
    ) from _e

from . import _checks, _penalty
from . import jax as _ojax
from .jax import _ops as _jops

__all__ = ["add_ortho_l1", "AddOrthoL1State"]


class AddOrthoL1State(NamedTuple):
    """add_ortho_l1's state: the step count that a beta schedule reads (0-d int32).

    Attributes:
        count: the number of updates made so far.

    Example:
        >>> import jax.numpy as jnp
        >>> from gpu_orthol1.optax import AddOrthoL1State
        >>> int(AddOrthoL1State(count=jnp.zeros((), jnp.int32)).count)
        0
    """

    count: jax.Array  # type: ignore[assignment]  # Optax's name for it (tuple.count is shadowed, as in optax's own states)


def add_ortho_l1(
    beta: Any,
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
) -> optax.GradientTransformation:
    """A GradientTransformation that adds d(ortho_l1_tree(params, beta))/d(params) to the updates.

    Args:
        beta: a real number, or an Optax schedule (step count -> value), evaluated at the count of
            updates made so far (0 at the first).
        mask: None, a pytree of bools with params' structure, or a callable params -> such a pytree
            (as Optax's masks): only leaves marked True are regularized.
        mode: as for `gpu_orthol1.jax.ortho_l1_tree`.
        axis: as for `gpu_orthol1.jax.ortho_l1_tree`.
        three_d: as for `gpu_orthol1.jax.ortho_l1_tree`.
        out_axis: as for `gpu_orthol1.jax.ortho_l1_tree` (conv kernels flattened to (-1, out) by default).
        penalty: as for `gpu_orthol1.jax.ortho_l1_tree`.
        diagonal: as for `gpu_orthol1.jax.ortho_l1_tree`.
        normalize: as for `gpu_orthol1.jax.ortho_l1_tree`.
        precision: as for `gpu_orthol1.jax.ortho_l1_tree`.

    Returns:
        An optax.GradientTransformation whose update needs params; leaves that are not taken (biases,
        masked-out leaves) pass through unchanged. Usable inside optax.chain and under jit.

    Raises:
        ValueError: a wrong keyword (at construction) or update called without params.

    Example:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> from gpu_orthol1.optax import add_ortho_l1
        >>> params = {"w": 2 * jnp.eye(8, 4), "b": jnp.zeros(4)}
        >>> grads = {"w": jnp.zeros((8, 4)), "b": jnp.ones(4)}
        >>> tx = optax.chain(add_ortho_l1(optax.linear_schedule(1e-3, 0.0, 1000)), optax.sgd(1.0))
        >>> state = tx.init(params)
        >>> updates, state = tx.update(grads, state, params)
        >>> bool(jnp.allclose(updates["w"], -2e-3 * params["w"])), bool(jnp.all(updates["b"] == -1))
        (True, True)
    """
    schedule = callable(beta)
    if not schedule:
        beta = _checks.check_beta(beta)
    if mode not in _ojax.MODES:
        raise ValueError(f"mode must be one of {_ojax.MODES}, got {mode!r}")
    kw = dict(
        mask=mask,
        mode=mode,
        axis=axis,
        three_d=three_d,
        out_axis=out_axis,
        penalty=penalty,
        diagonal=diagonal,
        normalize=normalize,
        precision=precision,
    )
    _jops._check_precision(precision)
    _penalty.check(penalty, diagonal, normalize)

    def init_fn(params):
        del params
        return AddOrthoL1State(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_ortho_l1 needs the params: call update(updates, state, params)")
        b = beta(state.count) if schedule else beta
        _loss, g = _ojax.tree_grads(params, b, **kw)
        new = jax.tree_util.tree_map(
            lambda u, gi: u if gi is None else u + gi.astype(u.dtype), updates, g, is_leaf=lambda x: x is None
        )
        return new, AddOrthoL1State(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
