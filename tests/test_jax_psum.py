"""gpu_orthol1.jax.ortho_l1_psum: arrays whose Gram's summed dimension is split over a mesh axis, inside
shard_map on 4 host devices (a subprocess: XLA_FLAGS must be set before jax is imported), against the
float64 reference; no all-gather in the compiled step; argument errors."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from gpu_orthol1.jax import ortho_l1_psum  # noqa: E402

_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import NamedSharding, PartitionSpec as P
    import gpu_orthol1 as ol1
    from gpu_orthol1 import reference as R
    from gpu_orthol1.jax import ortho_l1_psum
    assert len(jax.devices()) == 4
    mesh = jax.make_mesh((4,), ("d",))
    rng = np.random.default_rng(int(os.environ["SEED"]))

    def run(x, spec, beta, **kw):
        f = jax.shard_map(lambda x: ortho_l1_psum(x, beta, "d", **kw), mesh=mesh, in_specs=spec, out_specs=P())
        xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))
        hlo = jax.jit(jax.value_and_grad(lambda x: f(x).sum())).lower(xs).compile().as_text()
        assert "all-gather" not in hlo, "x was gathered"
        assert "all-reduce" in hlo, "no psum of the Grams"
        val, back = jax.vjp(jax.jit(f), xs)
        g = back(jnp.ones_like(val))[0]
        assert g.sharding.is_equivalent_to(xs.sharding, x.ndim), g.sharding  # the gradient stays where x is
        assert np.array_equal(np.asarray(jax.jit(f)(xs)), np.asarray(val))  # the primal: the same loss
        return np.asarray(val), np.asarray(g)

    cases = [
        # shape, slice axis, split spec, mode (the split is the Gram's summed dimension)
        ((48, 7, 12), 1, P("d"), None),  # slices along 1, rows split
        ((5, 36, 9), 0, P(None, "d"), "columns"),  # slices along 0, rows split
        ((40, 11), 1, P("d"), None),  # one matrix, rows split
        ((6, 3, 44), 1, P(None, None, "d"), "rows"),  # G = x x^T: the columns are split
    ]
    reds = ["sum", "mean", "none", "sum", "none", "sum", "mean", "none"]
    for (shape, axis, spec, mode), red, dt in zip(cases * 2, reds, [np.float64] * 4 + [np.float32] * 4):
        rows = R.slice_rows(shape, axis) if mode != "rows" else shape[-1]
        x = R.random_phi(rng, shape, dt, l=rows)
        loss, g = run(x, spec, 0.7, axis=axis, reduction=red, mode=mode)
        if mode == "rows":  # the columns Gram of the transposed slices
            t = (lambda a: np.swapaxes(a, 0, 2)) if x.ndim == 3 else (lambda a: a.T)
            R.check(t(x), loss, t(g), 0.7, axis, red, dtype=dt)
        else:
            R.check(x, loss, g, 0.7, axis, red, dtype=dt)
    # the penalty family (against the core's own NumPy call, float64) and a traced beta
    x = R.random_phi(rng, (32, 5, 10), np.float64)
    for kw in (dict(penalty="l2"), dict(diagonal=False, normalize=True), dict(penalty="l2", normalize=True)):
        loss, g = run(x, P("d"), 0.3, **kw)
        rl, rg = ol1.loss_and_grad(x, 0.3, **kw)
        np.testing.assert_allclose(loss, rl, rtol=1e-12)
        np.testing.assert_allclose(g, rg, rtol=1e-11, atol=1e-13)
    f = jax.shard_map(lambda x, b: ortho_l1_psum(x, b, "d"), mesh=mesh, in_specs=(P("d"), P()), out_specs=P())
    xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("d")))
    db = jax.jit(jax.grad(f, argnums=1))(xs, jnp.asarray(0.3))
    np.testing.assert_allclose(float(db), ol1.loss(x, 1.0), rtol=1e-12)
    print("ok")
""")


def test_psum_matches_reference_on_4_devices(rng):
    env = dict(os.environ, SEED=str(int(rng.integers(1 << 30))), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().endswith("ok")


@pytest.mark.parametrize(
    "kw,exc,msg",
    [
        (dict(mode="auto"), ValueError, "mode must be None, 'columns' or 'rows'"),
        (dict(axis_name=3), TypeError, "axis_name must be a mesh axis name"),
        (dict(reduction="max"), ValueError, "reduction must be one of"),
        (dict(axis=5), ValueError, "axis must be an integer"),
        (dict(penalty="l3"), ValueError, "penalty"),
    ],
)
def test_errors(kw, exc, msg):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 3, 4)))
    args = dict(axis_name="d")
    args.update(kw)
    with pytest.raises(exc, match=msg):
        ortho_l1_psum(x, 0.5, args.pop("axis_name"), **args)
    with pytest.raises(TypeError, match="x must be float16"):
        ortho_l1_psum(jnp.ones((4, 4), jnp.int32), 0.5, "d")
