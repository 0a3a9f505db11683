"""gpu_orthol1.optax.add_ortho_l1: the penalty's gradient added to the updates, inside optax.chain under jit."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy
jax.config.update("jax_enable_x64", True)

from gpu_orthol1 import reference as R  # noqa: E402
from gpu_orthol1.jax import ortho_l1_tree  # noqa: E402
from gpu_orthol1.optax import add_ortho_l1  # noqa: E402


def _params(rng):
    return {
        "w1": jnp.asarray(R.random_phi(rng, (16, 8), np.float64)),
        "b1": jnp.asarray(rng.standard_normal(8)),
        "conv": jnp.asarray(R.random_phi(rng, (3, 3, 2, 5), np.float64, l=18)),
        "w2": jnp.asarray(R.random_phi(rng, (8, 4), np.float64)),
    }


def test_chain_under_jit_adds_the_penalty_gradient(rng):
    params = _params(rng)
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
    tx = optax.chain(add_ortho_l1(0.3), optax.sgd(0.1))
    state = tx.init(params)
    upd, state = jax.jit(tx.update)(grads, state, params)
    pen = jax.grad(lambda p: ortho_l1_tree(p, 0.3))(params)
    for k in params:
        np.testing.assert_allclose(
            np.asarray(upd[k]), -0.1 * np.asarray(grads[k] + pen[k]), rtol=1e-12, atol=1e-15
        )
    # the bias is untouched (no matrix), exactly
    np.testing.assert_array_equal(np.asarray(upd["b1"]), -0.1 * np.asarray(grads["b1"]))


def test_schedule_and_mask(rng):
    params = _params(rng)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    sched = optax.linear_schedule(0.5, 0.1, transition_steps=4)
    mask = {"w1": True, "b1": False, "conv": False, "w2": True}
    tx = add_ortho_l1(sched, mask=mask)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for k in range(3):
        upd, state = step(zeros, state, params)
        want = jax.grad(lambda p, k=k: ortho_l1_tree(p, float(sched(k)), mask=mask))(params)
        # Optax schedules compute in float32: the jitted and the eager value may differ in the last bit
        np.testing.assert_allclose(np.asarray(upd["w1"]), np.asarray(want["w1"]), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(upd["w2"]), np.asarray(want["w2"]), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(upd["conv"]), 0.0)
    assert int(state.count) == 3
    # a callable mask, as Optax takes it
    tx = add_ortho_l1(0.2, mask=lambda p: {k: k == "conv" for k in p})
    upd, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(upd["w1"]), 0.0)
    assert float(jnp.abs(upd["conv"]).max()) > 0


def test_errors(rng):
    params = _params(rng)
    tx = add_ortho_l1(0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="mode"):
        add_ortho_l1(0.1, mode="diag")
    with pytest.raises(ValueError, match="beta"):
        add_ortho_l1(float("inf"))
    with pytest.raises(ValueError, match="penalty"):
        add_ortho_l1(0.1, penalty="l0")
