"""The sign pass split over several blocks per slice (kernels/sign_abs.py, `split`): the GPU path for
slices too large for one block. Under numba's simulator, blocks of 4 or 8 threads make small slices
split, so the part and finish kernels run on every CI run; the `gpu` test runs them on a card."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpu_orthol1 import _penalty
from gpu_orthol1._plan import Plan

from .helpers import host, make
from .reference import check, random_phi

# the members the split pass serves (the normalized pass reads whole columns and is never split)
ELEMENTWISE = [dict(penalty=p, diagonal=d) for p in ("l1", "l2") for d in (True, False)]


def _vid(v):
    return f"{v['penalty']}-{'diag' if v['diagonal'] else 'offdiag'}"


def test_split_rule():
    """A slice splits when one block would need more than 8 entries per thread; the cut depends on n
    (and the block size limit) only, never on how many slices a launch holds."""
    from gpu_orthol1.kernels import sign_abs

    assert sign_abs.split(90) == (1024, 1, 8100)  # 1024 threads x 8 entries still cover it
    assert sign_abs.split(91) == (256, 5, 2048)
    assert sign_abs.split(128) == (256, 8, 2048)  # (4096, 32, 128): 256 blocks instead of 32
    assert sign_abs.split(512) == (256, 128, 2048)
    assert sign_abs.split(512, normalize=True)[1] == 1
    assert sign_abs.split(9, max_block=4) == (4, 3, 32)  # the last part is short: 81 = 32 + 32 + 17
    with pytest.raises(ValueError, match="threads per block"):
        sign_abs.get_split_kernels(3)


def _grams(rng, m, n):
    P = random_phi(rng, (m, 6, n), np.float64)
    return np.matmul(P.transpose(0, 2, 1), P).astype(np.float32).reshape(m, n * n)


@pytest.mark.cudasim
@pytest.mark.parametrize("variant", ELEMENTWISE, ids=_vid)
@pytest.mark.parametrize("n", [7, 9])
def test_split_pass_matches_one_block_pass(variant, n, rng):
    """Parts + finish against the one-block pass on the same Grams: the same S bit for bit (NaN
    pattern included: a NaN in one part of a slice reaches every entry of that slice), the same
    loss up to the order of the float64 sum, partial sums that add up, nothing written by a
    loss-only launch, and a separate float16 S."""
    from gpu_orthol1.kernels import sign_abs

    l2, offdiag, _ = _penalty.check(**variant).flags()
    m = 4
    G = _grams(rng, m, n)
    G[2, 3] = np.nan  # in part 0 of slice 2: parts 1 and 2 of that slice must turn NaN too
    tpb1, _ = sign_abs.launch(n, False)
    one = sign_abs.get_kernel(tpb1, l2, offdiag)
    g1, l1 = G.copy(), np.zeros(m)
    one[m, tpb1](g1, g1, n, l1, 0, 0.5, True)

    tpb, parts, per = sign_abs.split(n, False, 4)
    assert parts > 1 and parts * per >= n * n > (parts - 1) * per
    kp, kf = sign_abs.get_split_kernels(tpb, l2, offdiag)

    def run(s, losses, offset, write_s):
        g = G.copy()
        partials = np.full((m, parts), -7.0)  # every entry must be overwritten
        kp[m * parts, tpb](g, g if s is None else s, n, partials, per, 0.5, write_s)
        kf[m, tpb](g if s is None else s, n, partials, losses, offset, write_s)
        return g, partials

    l2s = np.zeros(m + 2)
    g2, partials = run(None, l2s, 2, True)
    np.testing.assert_array_equal(g2, g1)
    assert np.isnan(g2[2]).all() and not np.isnan(g2[[0, 1, 3]]).any()
    assert np.isnan(l2s[4]) and np.isnan(l1[2])
    fin = [0, 1, 3]
    np.testing.assert_allclose(l2s[2:][fin], l1[fin], rtol=1e-13)
    np.testing.assert_allclose(partials[fin].sum(axis=1), l1[fin], rtol=1e-13)
    assert (partials != -7.0).all()

    lo = np.zeros(m)
    g_lo, _ = run(None, lo, 0, False)
    np.testing.assert_array_equal(g_lo, G)  # loss only: S (here the Gram itself) untouched
    np.testing.assert_array_equal(lo, l2s[2:])

    s16, l16 = np.full(G.shape, 7, np.float16), np.zeros(m)
    g3, _ = run(s16, l16, 0, True)
    np.testing.assert_array_equal(g3, G)  # a separate S leaves the Gram alone
    np.testing.assert_array_equal(s16, g1.astype(np.float16))
    np.testing.assert_array_equal(l16, l2s[2:])


@pytest.mark.cudasim
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_emulated_plan_splits_chunk_invariant(dtype, rng):
    """Through a plan on the GPU path's logic (blocks of 8 threads: n = 12 splits into 3 parts): right
    against the reference, with `accumulate`, and the same bits whether one chunk holds every slice
    or each chunk holds two (the cut never depends on the chunk)."""
    from gpu_orthol1.testing import EmulatedGpuDevice

    shape = (5, 7, 12)
    phi = make(np, rng, shape, dtype, "F", 1)
    res, budget = [], None
    for chunk in (7, 2):
        p = Plan(phi, 0.4, backend="numpy", workspace_bytes=budget, _device=EmulatedGpuDevice())
        sz = p._chunks.sizes_for(True, False, False, False, 1, hooked=False)[0]
        assert sz.parts == 3 and sz.chunk == chunk
        budget = 2 * sz.per_slice
        res.append(p(phi))
    (loss, grad), (loss2, grad2) = res
    check(phi, loss, grad, 0.4, dtype=dtype)
    np.testing.assert_array_equal(loss2, loss)
    np.testing.assert_array_equal(grad2, grad)
    out = make(np, rng, shape, dtype, "C", 1)
    base = out.astype(np.float64)
    p = Plan(phi, 0.4, backend="numpy", _device=EmulatedGpuDevice())
    loss3, g3 = p(phi, out=out, accumulate=True)
    assert g3 is out
    check(phi, loss3, host(out), 0.4, dtype=dtype, grad_base=base)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [91, 128, 200])
def test_gpu_split_pass_matches_one_block_pass(n, rng):
    """On a card: the split pass (plans cut slices of n > 90) against the one-block kernel launched on
    the same Grams, including a NaN slice, and the loss bit-identical from call to call."""
    import cupy

    import gpu_orthol1 as ol1
    from gpu_orthol1.kernels import sign_abs

    tpb, parts, _ = sign_abs.split(n)
    assert parts > 1
    phi = cupy.asarray(random_phi(rng, (33, 6, n), np.float32))
    phi[:, 4, 5] = cupy.nan
    p = ol1.plan(phi, 0.3)
    loss, grad = p(phi)
    loss_b, grad_b = p(phi)
    assert cupy.asnumpy(loss).tobytes() == cupy.asnumpy(loss_b).tobytes()
    cupy.testing.assert_array_equal(grad_b, grad)
    per = ol1.loss(phi, 0.3, reduction="none")
    assert np.isnan(cupy.asnumpy(per)[4]) and np.isnan(cupy.asnumpy(grad)[:, 4]).all()
    fin = np.r_[0:4, 5:6]
    check(
        cupy.asnumpy(phi)[:, fin], cupy.asnumpy(per)[fin], cupy.asnumpy(grad)[:, fin], 0.3, reduction="none"
    )
    G = cupy.matmul(phi.transpose(1, 2, 0), phi.transpose(1, 0, 2)).reshape(6, n * n)
    one = sign_abs.get_kernel(1024)
    g1, l1 = G.copy(), cupy.zeros(6)
    one[6, 1024](g1, g1, n, l1, 0, 1.0, True)
    kp, kf = sign_abs.get_split_kernels(tpb)
    g2, l2, partials = G.copy(), cupy.zeros(6), cupy.empty((6, parts))
    kp[6 * parts, tpb](g2, g2, n, partials, sign_abs.split(n)[2], 1.0, True)
    kf[6, tpb](g2, n, partials, l2, 0, True)
    cupy.testing.assert_array_equal(g2, g1)
    cupy.testing.assert_allclose(l2, l1, rtol=1e-12)


@pytest.mark.cudasim
@pytest.mark.parametrize("count", [0, 1, 7, 37])
def test_loss_total_is_one_launch_in_a_fixed_order(count, rng):
    """The GPU's loss reduction (kernels/sign_abs.py, `get_total_kernel`): the sum of the per-slice
    losses times the scale, rounded once to the output dtype; entries past `count` are not read;
    a NaN slice makes the loss NaN; reduction="none" scales each slice's loss."""
    from gpu_orthol1.kernels import sign_abs

    losses = rng.random(count + 3) * 10
    losses[count:] = np.nan  # past count: must not be read
    for dt in (np.float32, np.float64):
        out = np.full(1, -1.0, dt)
        sign_abs.get_total_kernel(4)[1, 4](losses, count, 0.25, out)
        ref = 0.25 * math.fsum(losses[:count])
        assert out[0] == pytest.approx(ref, rel=1e-15 if dt == np.float64 else 6e-8, abs=0)
        again = np.full(1, -1.0, dt)
        sign_abs.get_total_kernel(4)[1, 4](losses, count, 0.25, again)
        assert again.tobytes() == out.tobytes()
        each = np.full(count + 3, -1.0, dt)
        if count:
            sign_abs.get_total_kernel(4, each=True)[-(-count // 4), 4](losses, count, 0.5, each)
        assert np.array_equal(each[:count], (losses[:count] * 0.5).astype(dt))
        assert (each[count:] == -1.0).all()
    if count:
        losses[count // 2] = np.nan
        out = np.zeros(1, np.float32)
        sign_abs.get_total_kernel(4)[1, 4](losses, count, 1.0, out)
        assert np.isnan(out[0])
