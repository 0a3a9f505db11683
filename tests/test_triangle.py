"""One triangle of the Gram (gpu_orthol1._triangle): the blocked-triangle pointer-array GEMM and the
sign pass that reads its blocks and writes the full S.

The emulator executes the very cublasGemmBatchedEx argument list (address arrays written by the
address kernel under the simulator, each address resolved back to a buffer) over NumPy buffers,
and the sign pass runs under the simulator. Workspaces start as NaN, so an entry of a block the
GEMM did not compute that anything read would show as a NaN loss or gradient."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpu_orthol1 as ol1
from gpu_orthol1 import _driver, _gemm, _penalty, _plan, _triangle

from .helpers import make
from .reference import check, random_phi
from .test_penalties import check as variant_check
from .test_penalties import expected

cudasim = pytest.mark.cudasim


def _nan_alloc(shape, dtype):
    dt = np.dtype(dtype)
    return np.full(shape, np.nan, dt) if dt.kind == "f" else np.zeros(shape, dt)


def _emulated(phi, beta=1.0, *, gram="triangle", monkeypatch, **kw):
    from gpu_orthol1.testing import EmulatedGpuDevice

    monkeypatch.setenv(_triangle.ENV_GRAM, gram)
    workspace = _driver.workspace  # workspaces of NaN: no uncomputed Gram entry may be read
    monkeypatch.setattr(_driver, "workspace", lambda alloc, *a: workspace(_nan_alloc, *a))
    dev = EmulatedGpuDevice()
    return _plan.Plan(phi, beta, backend="numpy", _device=dev, **kw), dev


# -- the rule ------------------------------------------------------------------------------------


def test_block_size():
    assert _triangle.block_size(768, 4) == 128  # 6 blocks: 7/12 of the Gram GEMM
    assert _triangle.block_size(1024, 4) == 128
    assert _triangle.block_size(256, 4) == 128
    assert _triangle.block_size(200, 4) == 0  # no divisor of 200 in [128, 100]
    assert _triangle.block_size(131, 4, block_min=2, align=1) == 0  # prime
    assert _triangle.block_size(9, 8, block_min=3, align=1) == 3
    assert _triangle.block_size(8, 4, block_min=3, align=1) == 4
    assert _triangle.block_size(12, 2, block_min=3, align=8) == 4  # 3 * 2 bytes is not 8-aligned
    assert _triangle.pairs(6) == 21


class _GpuLike:
    """What `pick` reads of a device."""

    tri_block_min = _triangle.BLOCK_MIN
    tri_align = _triangle.ALIGN_BYTES

    def gram_triangle(self, *a):  # pragma: no cover - never called
        raise AssertionError


@pytest.mark.parametrize("n", [256, 512, 768, 2048])
def test_pick_auto(n, monkeypatch):
    monkeypatch.delenv(_triangle.ENV_GRAM, raising=False)
    d = _penalty.DEFAULT
    got = _triangle.pick(_GpuLike(), "gemm", d, n, np.float32)
    assert got == (128 if n >= _triangle.TRIANGLE_MIN_N else 0)
    assert _triangle.pick(_GpuLike(), "fused", d, n, np.float32) == 0  # the fused kernel's shapes
    assert _triangle.pick(_GpuLike(), "gemm", _penalty.check("l1", True, True), n, np.float32) == 0
    assert _triangle.pick(object(), "gemm", d, n, np.float32) == 0  # a device without one (the CPU)
    monkeypatch.setenv(_triangle.ENV_GRAM, "full")
    assert _triangle.pick(_GpuLike(), "gemm", d, n, np.float32) == 0
    monkeypatch.setenv(_triangle.ENV_GRAM, "triangle")
    assert _triangle.pick(_GpuLike(), "gemm", d, n, np.float32) == 128


def test_cpu_keeps_full_gemm(rng, monkeypatch):
    monkeypatch.setenv(_triangle.ENV_GRAM, "triangle")
    phi = random_phi(rng, (7, 3, 9), np.float32, 7)
    p = ol1.plan(phi, 0.5, backend="numpy")
    assert p.gram == "full"
    loss, grad = p(phi)
    check(phi, loss, grad, 0.5)


def test_env_value_checked(rng, monkeypatch):
    monkeypatch.setenv(_triangle.ENV_GRAM, "half")
    with pytest.raises(ValueError, match="GPU_ORTHOL1_GRAM='half'"):
        ol1.plan(random_phi(rng, (4, 2, 3), np.float32, 4), backend="numpy")


# -- the emulated GPU path -----------------------------------------------------------------------


@cudasim
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((7, 3, 9), "C"),  # odd n, split sign pass (81 entries > the emulator's 8 x 8)
        ((10, 2, 8), "F"),  # one-block sign pass, 2 blocks of 4
        ((5, 4, 12), "perm"),  # l < n
        ((6, 3, 15), "rowstrided"),  # 5 blocks of 3, a larger ld
        ((5, 3, 9), "every2"),  # staged through the chunk buffer
        ((6, 2, 9), "negative"),  # staged
    ],
    ids=str,
)
def test_matches_reference(shape, layout, dtype, rng, monkeypatch):
    phi = make(np, rng, shape, dtype, layout)
    beta = float(rng.uniform(0.2, 2.0))
    for reduction in ("sum", "mean", "none"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ol1.CopyWarning)
            p, dev = _emulated(phi, beta, reduction=reduction, monkeypatch=monkeypatch)
            assert p.gram == "triangle"
            loss, grad = p(phi)
        check(phi, loss, grad, beta, reduction=reduction)
        assert [c for c, _ in dev.gemm_calls] == ["triangle", "strided"]
        n = shape[2]
        nb = p._tri
        assert dev.gemm_calls[0][1] == shape[1] * _triangle.pairs(n // nb)
    # a loss-only call writes no S: the same bits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ol1.CopyWarning)
        pl, _ = _emulated(phi, beta, want="loss", monkeypatch=monkeypatch)
        both, _ = _emulated(phi, beta, monkeypatch=monkeypatch)
        np.testing.assert_array_equal(pl(phi), both(phi)[0])


@cudasim
def test_accumulate_and_chunks(rng, monkeypatch):
    """out= with accumulate=True, and a workspace cap that cuts the slices into several chunks (the
    address arrays then start at a later slice)."""
    phi = random_phi(rng, (6, 7, 9), np.float32, 6)
    base = rng.standard_normal(phi.shape).astype(np.float32)
    out = base.copy()
    p, dev = _emulated(phi, 0.8, workspace_bytes=3 * 9 * 9 * 4 + 3 * 8 * 19, monkeypatch=monkeypatch)
    loss, grad = p(phi, out=out, accumulate=True)
    assert grad is out
    check(phi, loss, grad, 0.8, grad_base=base)
    assert [c for c, _ in dev.gemm_calls].count("triangle") > 1


@cudasim
@pytest.mark.parametrize(
    "variant",
    [
        dict(penalty="l2", diagonal=True),
        dict(penalty="l1", diagonal=False),
        dict(penalty="l2", diagonal=False),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_variants(variant, dtype, rng, monkeypatch):
    """The elementwise members of the family take the triangle too (against autograd in float64)."""
    for shape in ((7, 3, 9), (10, 2, 8)):
        phi = make(np, rng, shape, dtype, "C")
        beta = float(rng.uniform(0.2, 2.0))
        v = dict(variant, normalize=False)
        ref = expected(phi, beta, 1, v)
        p, _ = _emulated(phi, beta, monkeypatch=monkeypatch, **variant)
        assert p.gram == "triangle"
        loss, grad = p(phi)
        variant_check(ref, loss, grad, dtype)


@cudasim
def test_normalized_and_fused_keep_full_gemm(rng, monkeypatch):
    phi = random_phi(rng, (7, 3, 9), np.float64, 7)
    p, dev = _emulated(phi, 0.5, normalize=True, monkeypatch=monkeypatch)
    assert p.gram == "full"
    p(phi)
    assert "triangle" not in [c for c, _ in dev.gemm_calls]
    p, dev = _emulated(phi, 0.5, kernel="fused", monkeypatch=monkeypatch)
    assert p.gram == "full"
    p, _ = _emulated(phi, 0.5, gram="full", monkeypatch=monkeypatch)
    assert p.gram == "full"


@cudasim
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # inf * 0, the point
def test_nan_policy(rng, monkeypatch):
    """A non-finite entry in an off-diagonal block: that slice's loss and gradient are NaN, the others
    are untouched."""
    phi = random_phi(rng, (7, 3, 9), np.float32, 7)
    phi[2, 1, 7] = np.inf  # slice 1, column 7: block 2 of 3
    p, _ = _emulated(phi, 0.5, reduction="none", monkeypatch=monkeypatch)
    loss, grad = p(phi)
    check(phi, loss, grad, 0.5, reduction="none")
    assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2]]).all()
    assert np.isnan(grad[:, 1]).all() and np.isfinite(grad[:, [0, 2]]).all()


@cudasim
@pytest.mark.parametrize("stack", [False, True], ids=["separate", "views-of-one-stack"])
def test_pointer_batch(stack, rng):
    """Separate matrices (a model's parameters, the grouped path): the address kernel reads each
    matrix's address from the workspace, then the same triangle GEMM and sign pass."""
    from gpu_orthol1.testing import EmulatedGpuDevice

    m, l, n = 5, 7, 12
    if stack:  # (l, m, n) C-contiguous: matrix i is phi[:, i, :], extents overlap
        whole = random_phi(rng, (l, m, n), np.float32, l)
        mats = [whole[:, i, :] for i in range(m)]
    else:
        mats = [random_phi(rng, (l, n), np.float32, l) for _ in range(m)]
    outs = [np.full((l, n), np.nan, np.float32) for _ in range(m)]
    lay = _gemm.slice_layout(l, n, mats[0].strides[0] // 4, 1)
    lay_o = _gemm.slice_layout(l, n, n, 1)
    dev = EmulatedGpuDevice()
    nb = 3
    batch = _driver.Pointers(mats, outs, lay, lay_o, l, n)
    sz = _driver.sizes(
        dev,
        m,
        l,
        n,
        np.dtype(np.float32),
        want_grad=True,
        accumulate=False,
        stage_phi=False,
        stage_out=False,
        budget=_driver.DefaultBudget(2 * (n * n * 4 + 8 * 40)),
        pointers=True,
        tri=nb,
    )
    assert sz.chunk < m  # several chunks
    wsb = _driver.workspace(_nan_alloc, sz, l, n, np.float32)
    losses = np.full(m, np.nan)
    _driver.run(dev, batch, wsb, sz.chunk, losses, alpha=2 * 0.6, beta_gemm=0.0, want_grad=True, tri=nb)
    phi = np.stack(mats, axis=1)
    check(phi, losses.sum() * 0.6, np.stack(outs, axis=1), 0.6)
    assert "triangle" in [c for c, _ in dev.gemm_calls]


def test_hook_refused():
    with pytest.raises(ValueError, match="no gram_hook"):
        _driver.run(
            None,
            None,
            {},
            1,
            None,
            alpha=1.0,
            beta_gemm=0.0,
            want_grad=False,
            gram_hook=lambda ws: None,
            tri=3,
        )


# -- the real card -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(300, 5, 256), (129, 3, 768), (64, 2, 512)], ids=str)
def test_gpu_triangle(shape, dtype, rng, monkeypatch):
    import cupy

    monkeypatch.setenv(_triangle.ENV_GRAM, "triangle")
    phi = random_phi(rng, shape, dtype, shape[0])
    d = cupy.asarray(phi)
    p = ol1.plan(d, 0.7)
    assert p.gram == "triangle"
    loss, grad = p(d)
    check(phi, loss.get(), grad.get(), 0.7)
    full = ol1.plan(d, 0.7, workspace_bytes=1 << 30)  # a new plan: read the setting again
    monkeypatch.setenv(_triangle.ENV_GRAM, "full")
    pf = ol1.plan(d, 0.7)
    assert pf.gram == "full" and full.gram == "triangle"
    lf, gf = pf(d)
    check(phi, lf.get(), gf.get(), 0.7)


@pytest.mark.gpu
def test_gpu_triangle_graph(rng, monkeypatch):
    """A CUDA graph captures the address kernel and the pointer-array GEMM of the triangle."""
    import cupy

    monkeypatch.setenv(_triangle.ENV_GRAM, "triangle")
    phi = random_phi(rng, (256, 4, 512), np.float32, 256)
    d = cupy.asarray(phi)
    p = ol1.plan(d, 0.3)
    g = p.graph(d)
    loss, grad = g.replay()
    check(phi, loss.get(), grad.get(), 0.3)
    d[...] = cupy.asarray(random_phi(rng, phi.shape, np.float32, 256))
    loss, grad = g.replay()
    check(d.get(), loss.get(), grad.get(), 0.3)


@pytest.mark.gpu
def test_gpu_auto_rule(rng, monkeypatch):
    import cupy

    monkeypatch.delenv(_triangle.ENV_GRAM, raising=False)
    big = cupy.asarray(random_phi(rng, (64, 2, 768), np.float32, 64))
    small = cupy.asarray(random_phi(rng, (64, 2, 256), np.float32, 64))
    assert ol1.plan(big).gram == "triangle"
    assert ol1.plan(small).gram == "full"


@cudasim
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_orthol1_groups_take_the_triangle(dtype, monkeypatch):
    """OrthoL1's grouped pointer-array path (a model's matrices: the case the triangle is for) forms
    the triangle too, per group, with the workspace of NaN: loss and gradients against the float64
    reference; and a metrics pass (which reads whole Grams) keeps the full GEMM."""
    torch = pytest.importorskip("torch")
    from gpu_orthol1.testing import EmulatedGpuDevice
    from gpu_orthol1.torch import OrthoL1

    monkeypatch.setenv(_triangle.ENV_GRAM, "triangle")
    workspace = _driver.workspace
    monkeypatch.setattr(_driver, "workspace", lambda alloc, *a: workspace(_nan_alloc, *a))
    tdt = getattr(torch, dtype)
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    model = torch.nn.Sequential(torch.nn.Linear(9, 9), torch.nn.Linear(9, 9), torch.nn.Linear(9, 6)).to(tdt)
    devs: list = []

    def factory(precision="highest"):
        devs.append(EmulatedGpuDevice(precision=precision))
        return devs[-1]

    reg = OrthoL1(model, 0.3, "columns")
    reg._device_factory = factory
    loss = reg.loss()
    loss.backward()
    assert any(kind == "triangle" for d in devs for kind, _ in d.gemm_calls)
    want = 0.0
    for lin in model:
        w = lin.weight.detach().double()
        e = w.T @ w - torch.eye(w.shape[1], dtype=torch.float64)
        want += 0.3 * float(e.abs().sum())
        g = 2 * 0.3 * w @ torch.sign(e)
        tol = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 1e-2}[dtype]
        torch.testing.assert_close(lin.weight.grad.double(), g, rtol=tol, atol=tol * float(g.abs().max()))
    assert (
        abs(float(loss.detach()) - want)
        <= {"float32": 1e-5, "float64": 1e-12, "bfloat16": 1e-4}[dtype] * want
    )
    devs.clear()
    reg.loss(metrics=True)
    assert devs and not any(kind == "triangle" for d in devs for kind, _ in d.gemm_calls)
