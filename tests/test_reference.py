"""gpu_orthol1.reference, the float64 reference everything is checked against, checked itself against the
seed's index formula written out as loops, and its chunked form (the bench's) against the whole-array one."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_orthol1.reference import Reference, check, random_phi, reference


def index_formula(P, beta):
    """loss and Gamma for P laid out (l, m, n), one scalar at a time, as the seed's answer writes them."""
    l, m, n = P.shape
    per = np.zeros(m)
    Gamma = np.zeros_like(P)
    for i in range(m):
        X = np.zeros((n, n))
        for j in range(n):
            for b in range(n):
                X[j, b] = sum(P[k, i, j] * P[k, i, b] for k in range(l)) - (j == b)
        per[i] = beta * np.abs(X).sum()
        for a in range(l):
            for b in range(n):
                Gamma[a, i, b] = 2 * beta * sum(P[a, i, j] * np.sign(X[j, b]) for j in range(n))
    return per, Gamma


@pytest.mark.parametrize(
    "shape", [(7, 5, 3), (3, 4, 6), (1, 1, 1), (5, 2, 1)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_reference_is_the_index_formula(shape, axis, rng):
    phi = random_phi(rng, shape, np.float64)
    beta = float(rng.uniform(0.1, 3.0))
    per, grad, X = reference(phi, beta, axis)
    P = np.moveaxis(phi, axis, 1)
    want_per, want_gamma = index_formula(P, beta)
    np.testing.assert_allclose(per, want_per, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(grad, np.moveaxis(want_gamma, 1, axis), rtol=1e-13, atol=1e-13)
    assert X.shape == (P.shape[1], P.shape[2], P.shape[2])


def test_reference_2d_is_one_slice(rng):
    phi = random_phi(rng, (6, 4), np.float64)
    per, grad, _ = reference(phi, 0.5)
    want_per, want_gamma = index_formula(phi[:, None, :], 0.5)
    np.testing.assert_allclose(per, want_per, rtol=1e-13)
    np.testing.assert_allclose(grad, want_gamma[:, 0, :], rtol=1e-13, atol=1e-13)


def test_nonfinite_slice_is_nan_and_alone(rng):
    phi = random_phi(rng, (5, 3, 4), np.float64)
    phi[2, 1, 0] = np.inf
    per, grad, _ = reference(phi, 1.0)
    assert np.isnan(per[1]) and np.isnan(grad[:, 1]).all()
    assert np.isfinite(per[[0, 2]]).all() and np.isfinite(grad[:, [0, 2]]).all()


@pytest.mark.parametrize(
    "shape", [(7, 5, 3), (3, 4, 13), (33, 2, 9), (1, 1, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_chunked_build_equals_the_whole_array_reference(shape, rng):
    phi = random_phi(rng, shape, np.float64)
    beta = float(rng.uniform(0.1, 3.0))
    per, grad, X = reference(phi, beta)
    P = np.abs(phi.transpose(1, 0, 2))
    mag = P.transpose(0, 2, 1) @ P + np.eye(shape[2])
    for chunk in (1 << 20, 1):  # one chunk, and one slice per chunk
        r = Reference.build(phi, beta, chunk_bytes=chunk)
        np.testing.assert_array_equal(r.per, per)
        np.testing.assert_array_equal(r.grad, grad)
        np.testing.assert_allclose(r.closeness, np.abs(X) / mag, rtol=1e-6, atol=1e-30)
        np.testing.assert_allclose(r.bound[..., 0], 2 * beta * np.abs(phi).sum(axis=2), rtol=1e-14)
        assert r.loss == pytest.approx(per.sum(), rel=1e-15)


def test_check_asserts_on_a_wrong_result(rng):
    phi = random_phi(rng, (9, 3, 4), np.float32)
    per, grad, _ = reference(phi, 1.0)
    assert check(phi, per.sum(), grad.astype(np.float32)) > 0.5
    with pytest.raises(AssertionError, match="loss off"):
        check(phi, per.sum() * (1 + 1e-3), grad)
    wrong = grad.copy()
    wrong[0, 1, :] *= -1
    with pytest.raises(AssertionError, match="gradient off"):
        check(phi, per.sum(), wrong)
