"""gpu_orthol1.jax on a CUDA device (`gpu`-marked: skipped without GPU_ORTHOL1_TEST_GPU=1; run by
bench/gpu_check.sh's jax_gpu step, which sets XLA_PYTHON_CLIENT_PREALLOCATE=false so that XLA leaves
CuPy room on the card): results against the float64 reference, zero copy (the CuPy views the
callback makes alias XLA's buffers), XLA's stream, and a jitted training step that moves nothing
between host and device (jax.transfer_guard)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from gpu_orthol1 import reference as R  # noqa: E402
from gpu_orthol1.jax import _ops, ortho_l1, ortho_l1_psum, ortho_l1_tree  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu():
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        pytest.skip(f"jax {jax.__version__} has no GPU device here (backends: {jax.devices()})")
    pytest.importorskip("cupy")
    return gpus[0]


@pytest.mark.parametrize(
    "shape,axis,dtype",
    [((64, 16, 48), 1, np.float32), ((9, 37, 21), 0, np.float32), ((96, 32), 1, np.float16)],
)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gpu_matches_reference(gpu, shape, axis, dtype, reduction, rng):
    x = R.random_phi(rng, shape, dtype, l=R.slice_rows(shape, axis))
    f = jax.jit(lambda x: ortho_l1(x, 0.5, axis=axis, reduction=reduction))
    val, back = jax.vjp(f, jax.device_put(jnp.asarray(x), gpu))
    g = back(jnp.ones_like(val))[0]
    assert g.devices() == {gpu}
    R.check(x, np.asarray(val), np.asarray(g), 0.5, axis, reduction, dtype=dtype)


def test_gpu_zero_copy_on_xlas_stream(gpu, monkeypatch, rng):
    import cupy

    seen = {}
    run = _ops._run_gpu

    def spy(ctx, outs, ins, *a):
        seen["ins"] = [cupy.asarray(b).data.ptr for b in ins]
        seen["outs"] = [cupy.asarray(b).data.ptr for b in outs]
        run(ctx, outs, ins, *a)
        seen["xla_stream"] = int(ctx.stream)

    def stream_check(*a, **kw):  # the core's current stream while it runs: XLA's
        seen.setdefault("core_streams", set()).add(cupy.cuda.get_current_stream().ptr)
        return execute(*a, **kw)

    execute = _ops._plan.execute
    monkeypatch.setattr(_ops, "_run_gpu", spy)
    monkeypatch.setattr(_ops._plan, "execute", stream_check)
    x = jax.device_put(jnp.asarray(R.random_phi(rng, (128, 8, 64), np.float32)), gpu)
    loss, g = jax.block_until_ready(jax.jit(jax.value_and_grad(lambda x: ortho_l1(x, 1e-3)))(x))
    assert seen["ins"] == [x.unsafe_buffer_pointer()]
    assert seen["outs"] == [loss.unsafe_buffer_pointer(), g.unsafe_buffer_pointer()]
    assert seen["core_streams"] == {seen["xla_stream"]}


def test_gpu_training_step_moves_nothing_to_the_host(gpu, rng):
    """A jitted step (penalty + SGD, three steps in a fori_loop) under transfer_guard("disallow"):
    an implicit host<->device transfer anywhere in it raises."""
    params = {
        "dense": jax.device_put(jnp.asarray(R.random_phi(rng, (64, 32), np.float32)), gpu),
        "conv": jax.device_put(jnp.asarray(R.random_phi(rng, (3, 3, 8, 16), np.float32, l=72)), gpu),
    }

    @jax.jit
    def steps(p):
        def body(_i, p):
            g = jax.grad(lambda p: ortho_l1_tree(p, 1e-2))(p)
            return jax.tree_util.tree_map(lambda w, d: w - 0.1 * d, p, g)

        return jax.lax.fori_loop(0, 3, body, p)

    steps(params)  # compiled (compilation may move constants)
    with jax.transfer_guard("disallow"):
        out = jax.block_until_ready(steps(params))
    before = float(ortho_l1_tree(params, 1.0))
    assert float(ortho_l1_tree(out, 1.0)) < before


def test_gpu_psum_on_one_device_mesh(gpu, rng):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.Mesh(np.array([gpu]), ("d",))
    x = R.random_phi(rng, (96, 6, 20), np.float32)
    f = jax.shard_map(lambda w: ortho_l1_psum(w, 0.5, "d"), mesh=mesh, in_specs=P("d"), out_specs=P())
    loss, g = jax.jit(jax.value_and_grad(f))(jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("d"))))
    R.check(x, np.asarray(loss), np.asarray(g), 0.5, 1, "sum", dtype=np.float32)
