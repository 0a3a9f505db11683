"""gpu_orthol1.keras on the Keras backends jax and torch, each in its own process (the backend is fixed
at import): OrthoL1Regularizer against ortho_l1, orthogonal() against keras.regularizers.OrthogonalRegularizer
itself (float64 on the JAX backend; Keras computes in float32 on torch), conv kernels, training, serialization.
One process per backend for the whole file (starting Keras costs seconds); the bad-argument checks run in
the JAX one."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# not importorskip: importing keras here, without KERAS_BACKEND, would look for TensorFlow
pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")

_SCRIPT = textwrap.dedent("""
    import json, os, sys, traceback
    backend = os.environ["KERAS_BACKEND"]
    import numpy as np
    if backend == "jax":
        import jax
        jax.config.update("jax_enable_x64", True)
    import keras
    from gpu_orthol1.keras import OrthoL1Regularizer, orthogonal
    rng = np.random.default_rng(int(os.environ["SEED"]))

    def errors():
        for f, err in ((lambda: OrthoL1Regularizer(0.1, mode="diag"), ValueError),
                       (lambda: OrthoL1Regularizer(-1.0), ValueError),
                       (lambda: orthogonal(0.1, "auto"), ValueError),
                       (lambda: OrthoL1Regularizer(0.1)(keras.ops.ones((3,))), ValueError)):
            try:
                f()
            except err:
                continue
            raise AssertionError("no error")

    def backend_checks():
        t = keras.ops.convert_to_tensor
        dt = "float64" if backend == "jax" else "float32"
        rtol = 1e-12 if backend == "jax" else 2e-5
        # orthogonal() is Keras's OrthogonalRegularizer on rank-2 kernels
        for shape in ((12, 7), (5, 9)):
            w = rng.standard_normal(shape).astype(dt)
            for mode in ("rows", "columns"):
                ref = float(keras.regularizers.OrthogonalRegularizer(0.05, mode)(t(w)))
                got = float(orthogonal(0.05, mode)(t(w)))
                assert abs(got - ref) <= rtol * abs(ref), (shape, mode, got, ref)
        # conv kernels (kh, kw, in, out): the flattened (kh*kw*in, out) matrix; "columns" = the out x out Gram
        k = (rng.standard_normal((3, 3, 4, 6)) / 6).astype(dt)
        flat = k.reshape(36, 6)
        want = np.abs(flat.T.astype(np.float64) @ flat - np.eye(6)).sum() * 0.1
        got = float(OrthoL1Regularizer(0.1, mode="columns")(t(k)))
        assert abs(got - want) <= 1e-5 * want, (got, want)
        kn = flat / np.linalg.norm(flat, axis=0)
        P = kn.T.astype(np.float64) @ kn
        want = 0.05 * np.abs(P - np.diag(np.diag(P))).sum() / 30
        got = float(orthogonal(0.05, "columns")(t(k)))
        assert abs(got - want) <= 1e-5 * want, (got, want)
        # a model trains with the regularizers on Dense and Conv2D kernels; the penalty lowers
        reg = OrthoL1Regularizer(0.05, mode="columns")
        model = keras.Sequential([keras.Input((6, 6, 2)),
                                  keras.layers.Conv2D(4, 3, kernel_regularizer=orthogonal(0.01, "columns")),
                                  keras.layers.Flatten(), keras.layers.Dense(3, kernel_regularizer=reg)])
        model.compile(keras.optimizers.SGD(0.05), "mse")
        x = rng.standard_normal((16, 6, 6, 2)).astype("float32")
        y = np.zeros((16, 3), "float32")
        before = float(reg(model.layers[-1].kernel))
        model.fit(x, y, epochs=3, batch_size=16, verbose=0)
        after = float(reg(model.layers[-1].kernel))
        assert after < before, (before, after)
        # serialization
        for r in (reg, orthogonal(0.02, "rows")):
            back = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(r))
            assert type(back) is OrthoL1Regularizer and back.get_config() == r.get_config()

    result = {}
    parts = (("errors", errors),) if backend == "jax" else ()  # the bad arguments: on one backend
    for name, part in (*parts, ("backend", backend_checks)):
        try:
            part()
            result[name] = "ok"
        except Exception:
            result[name] = traceback.format_exc()
    print(json.dumps(result))
""")


_RUNS: dict[str, dict] = {}


def _run(backend):
    """The script above in a fresh interpreter with KERAS_BACKEND=backend, once per backend for this
    file: {"errors": ..., "backend": ...}, each "ok" or the traceback of that part."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    if backend not in _RUNS:
        seed = int(np.random.SeedSequence().entropy) % (1 << 30)
        print(f"keras {backend} subprocess seed = {seed}")
        env = dict(os.environ, KERAS_BACKEND=backend, SEED=str(seed), JAX_PLATFORMS="cpu")
        r = subprocess.run(
            [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=240
        )
        assert r.returncode == 0, r.stderr[-3000:]
        _RUNS[backend] = dict(json.loads(r.stdout.strip().splitlines()[-1]), seed=seed)
    return _RUNS[backend]


@pytest.mark.long
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backend_in_a_subprocess(backend):
    res = _run(backend)
    assert res["backend"] == "ok", f"seed {res['seed']}:\n{res['backend'][-3000:]}"


@pytest.mark.long
def test_errors_in_a_subprocess():
    """The bad arguments, checked in the JAX backend's subprocess (one Keras start for both tests)."""
    res = _run("jax")
    assert res["errors"] == "ok", res["errors"][-3000:]
