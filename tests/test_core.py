"""Loss and gradient of every backend against the float64 reference (tests/reference.py).

Backends: "numpy" (the CPU path), "emulated" (the GPU path's cuBLAS argument
sets executed over NumPy buffers + the CUDA kernel under numba's simulator) and
"cupy" (the real GPU, `gpu` marker, run by bench/gpu_check.sh).
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

import gpu_orthol1 as ol1

from .helpers import LAYOUTS_2D, LAYOUTS_3D, host, make, run
from .reference import check

DTYPES = (np.float16, np.float32, np.float64)
BACKENDS = [
    "numpy",
    pytest.param("emulated", marks=pytest.mark.cudasim),
    pytest.param("cupy", marks=pytest.mark.gpu),
]
# (shape, axis): sizes 1, odd and prime, tall and wide slices, each axis, 2-D
SHAPES = [
    ((1, 1, 1), 1),
    ((7, 5, 3), 1),
    ((3, 4, 13), 1),  # wide: l < n
    ((13, 2, 5), 0),  # a prime count of wide 2 x 5 slices (was 31: 2.4x the simulated blocks, one chunk too)
    ((6, 11, 7), 0),
    ((5, 9, 6), 2),
    ((13, 3, 2), -1),
    ((17, 7), None),  # 2-D: one slice
    ((2, 9), None),
]


def _xp(kind):
    if kind == "cupy":
        import cupy

        return cupy
    return np


def _case_id(c):
    shape, axis = c
    return "x".join(map(str, shape)) + ("" if axis is None else f"-ax{axis}")


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", SHAPES, ids=_case_id)
def test_matches_reference_all_layouts(kind, dtype, case, rng):
    shape, axis = case
    ax = 1 if axis is None else axis
    layouts = LAYOUTS_2D if len(shape) == 2 else LAYOUTS_3D
    xp = _xp(kind)
    compared = []
    for layout in layouts:
        phi = make(xp, rng, shape, dtype, layout, ax)
        before = host(phi).copy()
        beta = float(rng.uniform(0.1, 2.0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ol1.CopyWarning)
            loss, grad = run(kind, phi, beta, axis=ax)
        assert (
            type(loss) is type(phi)
            and loss.shape == ()
            and loss.dtype == (np.float64 if dtype == np.float64 else np.float32)
        )
        assert type(grad) is type(phi) and grad.shape == phi.shape and grad.dtype == phi.dtype
        compared.append(check(before, host(loss), host(grad), beta, ax, "sum", dtype))
        np.testing.assert_array_equal(host(phi), before)  # input untouched
    assert np.mean(compared) > 0.5, "too few gradient entries were away from the sign kink"


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_reductions(kind, reduction, dtype, rng):
    xp = _xp(kind)
    phi = make(xp, rng, (9, 6, 5), dtype, "C", 1)
    loss, grad = run(kind, phi, 0.7, reduction=reduction)
    assert loss.shape == ((6,) if reduction == "none" else ())
    check(host(phi), host(loss), host(grad), 0.7, 1, reduction, dtype)
    loss_only, _ = run(kind, phi, 0.7, reduction=reduction, want_grad=False)
    np.testing.assert_array_equal(host(loss_only), host(loss))


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("out_layout", ["C", "F", "every2"])
@pytest.mark.parametrize("phi_layout", ["C", "F"])
def test_out_and_accumulate(kind, dtype, out_layout, phi_layout, rng):
    # phi and out in different layouts exercise all four (phi, out) cuBLAS layout pairs
    xp = _xp(kind)
    shape = (8, 5, 6)
    phi = make(xp, rng, shape, dtype, phi_layout, 1)
    out = make(xp, rng, shape, dtype, out_layout, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ol1.CopyWarning)
        _, g = run(kind, phi, 1.3, out=out)
        assert g is out
        check(host(phi), run(kind, phi, 1.3)[0].item(), host(out), 1.3, 1, "sum", dtype)
        base = host(out).copy()
        loss, g = run(kind, phi, 1.3, out=out, accumulate=True, reduction="mean")
    assert g is out
    check(host(phi), host(loss), host(out), 1.3, 1, "mean", dtype, grad_base=base)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_chunked_equals_unchunked(kind, dtype, rng):
    xp = _xp(kind)
    phi = make(xp, rng, (10, 7, 6), dtype, "C", 1)
    with pytest.raises(MemoryError, match=r"one slice needs (\d+) bytes") as e:
        run(kind, phi, 0.9, workspace_bytes=1)
    per_slice = int(__import__("re").search(r"needs (\d+) bytes", str(e.value)).group(1))
    # the unchunked call gets a budget too: on a GPU a call without one may take the fused kernel,
    # whose per-slice sums run in another order than the GEMM path's
    ref = run(kind, phi, 0.9, reduction="none", workspace_bytes=phi.shape[1] * per_slice)
    for slices in (1, 2, 3):
        budget = slices * per_slice
        got = run(kind, phi, 0.9, reduction="none", workspace_bytes=budget)
        # each slice is reduced on its own, so chunking cannot change a per-slice loss
        np.testing.assert_array_equal(host(got[0]), host(ref[0]))
        np.testing.assert_allclose(
            host(got[1]).astype(np.float64),
            host(ref[1]).astype(np.float64),
            rtol=1e-3 if dtype == np.float16 else 1e-6,
            atol=1e-6,
        )
        check(host(phi), host(got[0]), host(got[1]), 0.9, 1, "none", dtype)


@pytest.mark.parametrize("kind", BACKENDS)
def test_repeated_calls_bit_identical(kind, rng):
    xp = _xp(kind)
    phi = make(xp, rng, (33, 9, 17), np.float32, "C", 1)
    a = run(kind, phi, 0.3)
    for _ in range(3):
        b = run(kind, phi, 0.3)
        assert host(a[0]).tobytes() == host(b[0]).tobytes()
        assert host(a[1]).tobytes() == host(b[1]).tobytes()


@pytest.mark.filterwarnings(
    "ignore:invalid value encountered in matmul:RuntimeWarning"
)  # NumPy's, on NaN input
@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nonfinite_gives_nan_in_that_slice_only(kind, dtype, rng):
    xp = _xp(kind)
    phi = make(xp, rng, (6, 5, 4), dtype, "C", 1)
    h = host(phi).copy()
    h[2, 1, 3] = np.nan
    h[0, 3, 0] = np.inf
    h[4, 4, 2] = -np.inf
    phi = xp.asarray(h)
    loss, grad = run(kind, phi, 1.0, reduction="none")
    loss, grad = host(loss), host(grad)
    bad = [1, 3, 4]
    assert np.isnan(loss[bad]).all() and np.isfinite(np.delete(loss, bad)).all()
    assert np.isnan(grad[:, bad, :]).all()
    assert np.isfinite(np.delete(grad, bad, axis=1)).all()
    total, _ = run(kind, phi, 1.0)
    assert np.isnan(host(total))
    good = np.delete(h, bad, axis=1)
    check(good, np.delete(loss, bad), np.delete(grad, bad, axis=1), 1.0, 1, "none", dtype)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize(
    "shape,axis",
    [((4, 0, 3), 1), ((0, 3, 4), 1), ((4, 3, 0), 1), ((0, 5), None), ((5, 0), None), ((3, 4, 0), 0)],
)
def test_empty_dims(kind, shape, axis, rng):
    xp = _xp(kind)
    phi = xp.asarray(rng.standard_normal(shape).astype(np.float32))
    ax = 1 if axis is None else axis
    for reduction in ("sum", "mean", "none"):
        loss, grad = run(kind, phi, 2.0, axis=ax, reduction=reduction)
        assert grad.shape == phi.shape
        check(host(phi), host(loss), host(grad), 2.0, ax, reduction, np.float32)


def test_finite_difference_float64(rng):
    phi = make(np, rng, (6, 3, 4), np.float64, "C", 1)
    beta = 0.8
    loss, grad = ol1.loss_and_grad(phi, beta, backend="numpy")
    _, _, X = __import__("tests.reference", fromlist=["reference"]).reference(phi, beta)
    assert np.abs(X).min() > 1e-4  # no kink within the step
    h = 1e-7
    fd = np.empty_like(phi)
    for idx in np.ndindex(phi.shape):
        p, q = phi.copy(), phi.copy()
        p[idx] += h
        q[idx] -= h
        fd[idx] = (ol1.loss(p, beta, backend="numpy") - ol1.loss(q, beta, backend="numpy")) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6)
    assert float(loss) > 0


@pytest.mark.parametrize("kind", BACKENDS)
def test_copy_warning_only_for_unreadable_layouts(kind, rng):
    xp = _xp(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ol1.CopyWarning)
        for layout, axis in (("C", 0), ("C", 1), ("F", 1), ("F", 2), ("rowstrided", 1)):
            run(kind, make(xp, rng, (5, 4, 3), np.float32, layout, axis), axis=axis)
    with pytest.warns(ol1.CopyWarning, match="chunk by chunk"):
        run(kind, make(xp, rng, (5, 4, 3), np.float32, "C", 2), axis=2)


@pytest.mark.parametrize("kind", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_copy_warning_points_at_the_callers_line(kind, rng):
    """CopyWarning is attributed to the line that called gpu_orthol1, from the functional API and from
    a plan call alike (they reach the staging code at different call depths)."""
    phi = make(_xp(kind), rng, (5, 4, 3), np.float32, "C", 2)  # axis=2 of a C array: staged
    p = ol1.plan(phi, axis=2, backend=kind)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        ol1.loss_and_grad(phi, axis=2, backend=kind)
        lines = [sys._getframe().f_lineno - 1]
        p(phi)
        lines.append(sys._getframe().f_lineno - 1)
    where = [(w.filename, w.lineno) for w in got if issubclass(w.category, ol1.CopyWarning)]
    assert where == [(__file__, line) for line in lines]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_input_on_gpu_returns_numpy(dtype, rng):
    phi = make(np, rng, (9, 5, 6), dtype, "F", 1)
    out = make(np, rng, (9, 5, 6), dtype, "C", 1)
    base = out.copy()
    loss, g = ol1.loss_and_grad(phi, 0.4, backend="cupy", out=out, accumulate=True)
    assert isinstance(loss, np.ndarray) and g is out
    check(phi, loss, out, 0.4, 1, "sum", dtype, grad_base=base)
    loss, g = ol1.loss_and_grad(phi, 0.4, backend="cupy", reduction="none")
    assert isinstance(loss, np.ndarray) and isinstance(g, np.ndarray)
    check(phi, loss, g, 0.4, 1, "none", dtype)


@pytest.mark.gpu
def test_tf32_close_to_reference(rng):
    import cupy

    phi = make(cupy, rng, (64, 8, 32), np.float32, "C", 1)
    loss, g = ol1.loss_and_grad(phi, 1.0, backend="cupy", precision="tf32")
    from .reference import reference

    per, gref, _ = reference(phi.get())
    assert abs(float(loss) - per.sum()) <= 3e-3 * per.sum()
    rel = np.linalg.norm(g.get() - gref) / np.linalg.norm(gref)
    assert rel < 0.05  # sign flips near the kink dominate; tf32 alone is ~1e-3


@pytest.mark.gpu
def test_gpu_chunked_big_gram(rng):
    import cupy

    phi = make(cupy, rng, (40, 24, 48), np.float32, "C", 1)
    # a budget for every slice at once keeps the reference on the GEMM path, as the chunked call
    ref = ol1.loss_and_grad(phi, 0.5, backend="cupy", reduction="none", workspace_bytes=1 << 30)
    got = ol1.loss_and_grad(phi, 0.5, backend="cupy", reduction="none", workspace_bytes=5 * 48 * 48 * 4)
    np.testing.assert_array_equal(got[0].get(), ref[0].get())
    np.testing.assert_allclose(got[1].get(), ref[1].get(), rtol=1e-5, atol=1e-6)
    check(phi.get(), got[0].get(), got[1].get(), 0.5, 1, "none", np.float32)
