"""gpu_orthol1.jax: the core inside XLA (buffer_callback + custom_vjp), against the float64 reference
and against jax.grad of the naive expression; jit, vmap, checkpoint, traced beta, dtypes, pytrees,
sharded arrays (in a subprocess with 4 host devices)."""

import itertools
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
jax.config.update("jax_enable_x64", True)  # the float64 comparisons; float32 inputs stay float32

import gpu_orthol1 as ol1  # noqa: E402
from gpu_orthol1 import reference as R  # noqa: E402
from gpu_orthol1.jax import ortho_l1, ortho_l1_tree, tree_grads  # noqa: E402

VARIANTS = [
    dict(penalty=p, diagonal=d, normalize=z)
    for p, d, z in itertools.product(("l1", "l2"), (True, False), (False, True))
]


def naive(x, beta, *, axis=1, reduction="sum", mode=None, penalty="l1", diagonal=True, normalize=False):
    """The expression users write, in jnp (autodiff gives its gradient)."""
    V = x[None] if x.ndim == 2 else jnp.moveaxis(x, axis, 0)
    l, n = V.shape[1:]
    if mode == "rows" or (mode == "auto" and l < n):
        V = jnp.swapaxes(V, 1, 2)
    G = jnp.matmul(jnp.swapaxes(V, 1, 2), V, precision=jax.lax.Precision.HIGHEST)
    if normalize:
        d = jnp.sqrt(jnp.diagonal(G, axis1=1, axis2=2))
        G = G / d[:, :, None] / d[:, None, :]
    E = G - jnp.eye(G.shape[-1])
    if not diagonal:
        E = E * (1 - jnp.eye(G.shape[-1]))
    per = beta * (jnp.abs(E) if penalty == "l1" else E * E).sum(axis=(1, 2))
    return per if reduction == "none" else per.mean() if reduction == "mean" else per.sum()


def vjp_sum(f, x):
    """(value, gradient of its sum): works for every reduction."""
    val, back = jax.vjp(f, x)
    return val, back(jnp.ones_like(val))[0]


@pytest.mark.parametrize(
    "shape,axis", [((37, 5, 11), 1), ((9, 23, 6), 0), ((7, 4, 19), 2), ((29, 13), 1), ((13, 29), 1)]
)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")  # axis=2: a layout the core copies chunk-wise
def test_float64_matches_reference(shape, axis, reduction, rng):
    x = R.random_phi(rng, shape, np.float64, l=R.slice_rows(shape, axis))
    f = jax.jit(lambda x: ortho_l1(x, 0.7, axis=axis, reduction=reduction))
    loss, g = vjp_sum(f, jnp.asarray(x))
    want = np.float64
    assert loss.dtype == want and g.dtype == want
    R.check(x, np.asarray(loss), np.asarray(g), 0.7, axis, reduction)
    # the same numbers as the core's own NumPy call
    rl, rg = ol1.loss_and_grad(x, 0.7, axis=axis, reduction=reduction)
    np.testing.assert_array_equal(np.asarray(loss).reshape(np.shape(rl)), rl)
    np.testing.assert_array_equal(np.asarray(g), rg)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
@pytest.mark.parametrize("shape,axis,mode", [((10, 4, 27), 0, "rows"), ((17, 26), 1, "auto")])
def test_every_variant_matches_jax_grad_of_naive(variant, shape, axis, mode, rng):
    x = jnp.asarray(R.random_phi(rng, shape, np.float64))
    for reduction in ("sum", "mean", "none"):
        kw = dict(axis=axis, reduction=reduction, mode=mode, **variant)
        loss, g = vjp_sum(jax.jit(lambda x, kw=kw: ortho_l1(x, 0.3, **kw)), x)
        nloss, ng = vjp_sum(jax.jit(lambda x, kw=kw: naive(x, 0.3, **kw)), x)
        np.testing.assert_allclose(np.asarray(loss).ravel(), np.asarray(nloss).ravel(), rtol=1e-12)
        scale = float(jnp.abs(ng).max())
        np.testing.assert_allclose(np.asarray(g), np.asarray(ng), rtol=0, atol=1e-11 * scale)


def test_value_and_grad_vmap_checkpoint_and_primal(rng):
    x = jnp.asarray(R.random_phi(rng, (5, 24, 10), np.float64, l=24))
    per = ortho_l1(x, 0.2, axis=0, reduction="none")
    # vmap over the slices: one core call per batch element, the same per-slice losses
    np.testing.assert_allclose(
        np.asarray(jax.vmap(lambda w: ortho_l1(w, 0.2))(x)), np.asarray(per), rtol=1e-13
    )
    gv = jax.vmap(jax.grad(lambda w: ortho_l1(w, 0.2)))(x)
    _, g = jax.value_and_grad(lambda x: ortho_l1(x, 0.2, axis=0))(x)
    np.testing.assert_allclose(np.asarray(gv), np.asarray(g), rtol=1e-13)
    # checkpoint: the forward is recomputed in the backward pass; same gradient
    gc = jax.jit(jax.grad(jax.checkpoint(lambda x: ortho_l1(x, 0.2, axis=0) * 3.0)))(x)
    np.testing.assert_allclose(np.asarray(gc), 3.0 * np.asarray(g), rtol=1e-13)
    # cotangent scaling inside a larger expression
    gs = jax.grad(lambda x: jnp.sin(ortho_l1(x, 0.2, axis=0)))(x)
    np.testing.assert_allclose(np.asarray(gs), np.cos(float(per.sum())) * np.asarray(g), rtol=1e-12)


def test_traced_beta_is_differentiable(rng):
    x = jnp.asarray(R.random_phi(rng, (30, 12), np.float64))
    f = jax.jit(lambda b, x: ortho_l1(x, b))
    (gb, gx) = jax.grad(f, argnums=(0, 1))(jnp.float64(0.25), x)
    np.testing.assert_allclose(float(gb), float(ortho_l1(x, 1.0)), rtol=1e-13)
    np.testing.assert_allclose(
        np.asarray(gx), np.asarray(jax.grad(lambda x: ortho_l1(x, 0.25))(x)), rtol=1e-13
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_matches_reference(dtype, rng):
    x = R.random_phi(rng, (45, 7, 20), dtype, l=45)
    loss, g = jax.jit(jax.value_and_grad(lambda x: ortho_l1(x, 0.5)))(jnp.asarray(x))
    assert loss.dtype == np.float32 and g.dtype == dtype
    R.check(x, np.asarray(loss), np.asarray(g), 0.5, 1, "sum")


def test_bfloat16_without_float32_copy(rng, monkeypatch):
    """On the CPU the callback hands the core XLA's bfloat16 buffers themselves (ml_dtypes arrays)."""
    from gpu_orthol1 import _plan

    seen = []
    real = _plan.execute
    monkeypatch.setattr(
        _plan, "execute", lambda p, V, *a, **k: (seen.append(V.dtype), real(p, V, *a, **k))[1]
    )
    x32 = R.random_phi(rng, (40, 3, 16), np.float32, l=40)
    xb = jnp.asarray(x32, jnp.bfloat16)
    for f in (
        jax.value_and_grad(lambda x: ortho_l1(x, 0.5)),
        jax.jit(jax.value_and_grad(lambda x: ortho_l1(x, 0.5))),
    ):
        seen.clear()
        loss, g = f(xb)
        assert loss.dtype == np.float32 and g.dtype == jnp.bfloat16
        assert seen and all(d.name == "bfloat16" for d in seen)
        phi = np.asarray(xb)
        R.check(phi, np.asarray(loss), np.asarray(g), 0.5, 1, "sum", phi.dtype)
        rl, rg = ol1.loss_and_grad(phi, 0.5)
        assert float(loss) == float(rl)
        np.testing.assert_array_equal(np.asarray(g).view(np.int16), rg.view(np.int16))


def test_errors():
    with pytest.raises(ValueError, match="2-D"):
        ortho_l1(jnp.ones(4))
    with pytest.raises(ValueError, match="mode"):
        ortho_l1(jnp.ones((3, 4)), mode="diag")
    with pytest.raises(ValueError, match="axis"):
        ortho_l1(jnp.ones((3, 4, 5)), axis=3)
    with pytest.raises(ValueError, match="reduction"):
        ortho_l1(jnp.ones((3, 4)), reduction="max")
    with pytest.raises(ValueError, match="penalty"):
        ortho_l1(jnp.ones((3, 4)), penalty="l3")
    with pytest.raises(ValueError, match="beta"):
        ortho_l1(jnp.ones((3, 4)), float("nan"))
    with pytest.raises(TypeError, match="float"):
        ortho_l1(jnp.ones((3, 4), jnp.int32))
    with pytest.raises(TypeError, match="jax.Array"):
        ortho_l1([[1.0, 2.0]])
    with pytest.raises(ValueError, match="mask"):
        ortho_l1_tree({"a": jnp.ones((3, 4))}, mask={"b": True})


def _model(rng):
    f = np.float64
    return {
        "dense1": {
            "kernel": jnp.asarray(R.random_phi(rng, (12, 8), f)),
            "bias": jnp.asarray(rng.standard_normal(8)),
        },
        "dense2": {
            "kernel": jnp.asarray(R.random_phi(rng, (12, 8), f)),
            "bias": jnp.asarray(rng.standard_normal(8)),
        },
        "conv": {"kernel": jnp.asarray(R.random_phi(rng, (3, 3, 4, 6), f, l=36))},
        "stack": jnp.asarray(R.random_phi(rng, (10, 3, 5), f)),
        "head": jnp.asarray(R.random_phi(rng, (8, 30), f)),
    }


@pytest.mark.long
@pytest.mark.parametrize("mode", ["auto", "rows"])
def test_tree_is_the_sum_over_matrices(mode, rng):
    params = _model(rng)
    kw = dict(penalty="l2", diagonal=False) if mode == "rows" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, g = jax.jit(
            jax.value_and_grad(lambda p: ortho_l1_tree(p, 0.3, mode=mode, three_d="stack", **kw))
        )(params)
    mats = [
        params["dense1"]["kernel"],
        params["dense2"]["kernel"],
        params["conv"]["kernel"].reshape(36, 6),
        params["head"],
    ]

    def by_hand(p):
        mats = [p["dense1"]["kernel"], p["dense2"]["kernel"], p["conv"]["kernel"].reshape(36, 6), p["head"]]
        tot = sum(naive(w, 0.3, mode=mode, **kw) for w in mats)
        return tot + naive(p["stack"], 0.3, axis=1, mode=mode, **kw)

    want, gw = jax.value_and_grad(by_hand)(params)
    assert len(mats) == 4
    np.testing.assert_allclose(float(got), float(want), rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(gw), strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=0, atol=1e-11 * (1 + float(jnp.abs(b).max()))
        )
    # tree_grads: the same numbers without autodiff, None for the leaves not taken
    tl, tg = tree_grads(params, 0.3, mode=mode, three_d="stack", **kw)
    assert tg["dense1"]["bias"] is None
    np.testing.assert_allclose(float(tl), float(got), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(tg["conv"]["kernel"]), np.asarray(g["conv"]["kernel"]), rtol=1e-13)


def test_tree_mask_layouts_and_three_d(rng):
    params = _model(rng)
    only_dense = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: "dense" in str(path[0]), p)  # noqa: E731
    got = ortho_l1_tree(params, 0.5, mask=only_dense)
    want = sum(float(naive(params[k]["kernel"], 0.5, mode="auto")) for k in ("dense1", "dense2"))
    np.testing.assert_allclose(float(got), want, rtol=1e-12)
    # Equinox / PyTorch layout (out, in, kh, kw): flattened to (out, -1)
    k = jnp.asarray(R.random_phi(rng, (6, 4, 3, 3), np.float64, l=36))
    np.testing.assert_allclose(
        float(ortho_l1_tree({"w": k}, 0.5, out_axis=0, mode="rows")),
        float(naive(k.reshape(6, 36), 0.5, mode="rows")),
        rtol=1e-12,
    )
    # 3-D leaves: a warning names them under "auto"; "flatten" treats them as Conv1D kernels
    with pytest.warns(UserWarning, match="three_d"):
        ortho_l1_tree({"s": params["stack"]}, 0.5)
    np.testing.assert_allclose(
        float(ortho_l1_tree({"s": params["stack"]}, 0.5, three_d="flatten", mode="columns")),
        float(naive(params["stack"].reshape(30, 5), 0.5)),
        rtol=1e-12,
    )
    assert float(ortho_l1_tree({"b": jnp.ones(3)}, 0.5)) == 0.0


_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import NamedSharding, PartitionSpec as P
    import gpu_orthol1 as ol1
    from gpu_orthol1.jax import ortho_l1
    assert len(jax.devices()) == 4
    mesh = jax.make_mesh((4,), ("d",))
    x = np.random.default_rng(int(os.environ["SEED"])).standard_normal((48, 8, 12)) / 7
    rl, rg = ol1.loss_and_grad(x, 0.5)
    f = jax.jit(jax.value_and_grad(lambda x: ortho_l1(x, 0.5)))
    for spec in (P("d"), P(None, "d"), P(None, None, "d")):  # rows, slices, columns split
        l, g = f(jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec)))
        np.testing.assert_allclose(float(l), rl, rtol=1e-13)
        np.testing.assert_allclose(np.asarray(g), rg, rtol=1e-12, atol=1e-14)
    # the documented recipe for slice-split arrays: each device its own slices, psum of the loss
    from jax.sharding import PartitionSpec
    def local(x):
        return jax.lax.psum(ortho_l1(x, 0.5), "d")
    sm = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec(None, "d"), out_specs=PartitionSpec()))
    xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(None, "d")))
    with jax.set_mesh(mesh):
        l, g = jax.value_and_grad(sm)(xs)
    np.testing.assert_allclose(float(l), rl, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(g), rg, rtol=1e-12, atol=1e-14)
    print("ok", g.sharding.spec)
""")


@pytest.mark.long
def test_sharded_arrays_in_a_subprocess(rng):
    env = dict(os.environ, SEED=str(int(rng.integers(1 << 30))), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")
