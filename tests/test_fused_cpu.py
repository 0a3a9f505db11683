"""The CPU's fused loop (kernels/fused_small_cpu.py, kernel="fused" on the NumPy backend): against the
float64 reference and the two-GEMM path, on every layout, reduction and call form a plan has."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpu_orthol1 as ol1
from gpu_orthol1 import _device

from .helpers import make
from .reference import check, random_phi

LAYOUTS = ("C", "F", "perm", "rowstrided", "every2", "negative")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fused_loop_matches_the_reference(rng, dtype, layout, reduction):
    shape = (7, 5, 3)  # l = 7 rows, m = 5 slices, n = 3 (odd sizes)
    phi = make(np, rng, shape, dtype, layout, 1)
    p = ol1.plan(phi, 0.7, reduction=reduction, kernel="fused")
    assert p.kernel == "fused"
    loss, grad = p(phi)
    check(phi, loss, grad, 0.7, 1, reduction, dtype)
    with warnings.catch_warnings():  # the GEMM path copies the layouts BLAS cannot read; the loop does not
        warnings.simplefilter("ignore", ol1.CopyWarning)
        gl, _ = ol1.plan(phi, 0.7, reduction=reduction, kernel="gemm")(phi)
    np.testing.assert_allclose(loss, gl, rtol=1e-6 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_fused_loop_out_accumulate_and_wants(rng, dtype, axis):
    shape = [6, 6, 6]
    shape[axis] = 4  # the slices
    phi = make(np, rng, tuple(shape), dtype, "C", axis)
    out = make(np, rng, tuple(shape), dtype, "F", axis)  # other strides than phi's
    base = out.astype(np.float64)
    p = ol1.plan(phi, 0.3, axis=axis, kernel="fused")
    loss, grad = p(phi, out=out, accumulate=True)
    assert grad is out
    check(phi, loss, grad, 0.3, axis, "sum", dtype, grad_base=base)
    loss2, grad2 = p(phi, out=out)  # overwrite
    check(phi, loss2, grad2, 0.3, axis, "sum", dtype)
    lo = ol1.plan(phi, 0.3, axis=axis, want="loss", kernel="fused")
    ro = phi.copy()
    ro.flags.writeable = False  # a loss-only call writes nothing: read-only input is fine
    np.testing.assert_allclose(lo(ro), loss, rtol=1e-12)
    g = ol1.plan(phi, 0.3, axis=axis, want="grad", kernel="fused")(phi)
    np.testing.assert_array_equal(g, grad2)


def test_fused_loop_2d_and_empty(rng):
    w = random_phi(rng, (9, 4), np.float64)
    loss, grad = ol1.plan(w, 1.5, kernel="fused")(w)
    check(w, loss, grad, 1.5, 1, "sum", np.float64)
    z = np.ones((0, 3, 2))  # no rows: G = 0, |0 - I| sums to n per slice, zero gradient
    loss, grad = ol1.plan(z, 1.0, kernel="fused")(z)
    assert float(loss) == 6.0 and grad.shape == z.shape


@pytest.mark.parametrize("bad", [np.nan, np.inf])
# the GEMM path's reference: NumPy flags inf * 0 in matmul on some CPUs' BLAS kernels (OpenBLAS's
# SkylakeX ones here), not on others (docs/reliability.md)
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_fused_loop_non_finite_slice(rng, bad):
    phi = random_phi(rng, (5, 3, 4), np.float32)
    phi[2, 1, 0] = bad  # slice 1 only
    per, grad = ol1.plan(phi, 1.0, reduction="none", kernel="fused")(phi)
    want_per, want_grad = ol1.plan(phi, 1.0, reduction="none", kernel="gemm")(phi)
    assert np.isnan(per[1]) and np.isfinite(np.delete(per, 1)).all()
    assert np.isnan(grad[:, 1]).all() and np.isfinite(np.delete(grad, 1, axis=1)).all()
    np.testing.assert_allclose(np.delete(per, 1), np.delete(want_per, 1), rtol=1e-6)
    np.testing.assert_allclose(
        np.delete(grad, 1, axis=1), np.delete(want_grad, 1, axis=1), rtol=1e-5, atol=1e-6
    )


def test_auto_takes_the_fused_loop_on_small_calls_only(rng):
    """kernel="auto" on the CPU: the fused loop for calls of at most CPU_FUSED_MAX_FLOPS with n <= 16,
    float32 or float64, the default penalty, no workspace cap, a layout BLAS reads in place."""
    small = random_phi(rng, (3, 32, 3), np.float32)  # PointNet's (32, 3, 3) transforms
    assert ol1.plan(small).kernel == "fused"
    assert ol1.plan(small.astype(np.float64)).kernel == "fused"
    for kw in ({"penalty": "l2"}, {"diagonal": False}, {"normalize": True}, {"workspace_bytes": 1 << 20}):
        assert ol1.plan(small, **kw).kernel == "gemm", kw
    assert ol1.plan(make(np, rng, (3, 32, 3), np.float32, "every2", 1)).kernel == "gemm"  # staged layout
    m = int(_device.CPU_FUSED_MAX_FLOPS // (4 * 8 * 8 * 8))  # (8, m, 8) at the bound, then past it
    assert ol1.plan(random_phi(rng, (8, m, 8), np.float32)).kernel == "fused"
    assert ol1.plan(random_phi(rng, (8, m + 1, 8), np.float32)).kernel == "gemm"
    assert ol1.plan(random_phi(rng, (1, 1, 17), np.float32)).kernel == "gemm"  # n past CPU_FUSED_MAX_N
    # the functional API takes the same plans
    loss, grad = ol1.loss_and_grad(small, 0.2)
    check(small, loss, grad, 0.2, 1, "sum", np.float32)


def test_bench_cpu_fused_runs(tmp_path):
    """bench/bench_cpu_fused.py end to end on two tiny shapes (its results check included)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "f.json"
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "bench_cpu_fused.py"), "--shapes", "3x4x3,5x3x17"]
        + ["--rounds", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["auto_takes_fused"] for r in rows] == [True, False]
    assert all(r["us"]["fused"] > 0 and r["us"]["gemm"] > 0 for r in rows)


def test_fused_loop_float32_gram_overflow_is_nan():
    """A float32 Gram entry past float32's range is Inf on the GEMM path; the loop rounds its float64
    Gram to float32 too, so the slice's loss and gradient are NaN on both (docs/guide.md)."""
    phi = np.ones((2, 3, 2), np.float32)
    phi[:, 1] = 1e20  # slice 1: G entries 2e40
    for kernel in ("fused", "gemm"):
        with np.errstate(over="ignore"):
            per, grad = ol1.plan(phi, 1.0, reduction="none", kernel=kernel)(phi)
        assert np.isnan(per[1]) and np.isfinite(per[[0, 2]]).all(), kernel
        assert np.isnan(grad[:, 1]).all() and np.isfinite(grad[:, [0, 2]]).all(), kernel
