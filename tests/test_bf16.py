"""bfloat16 (ml_dtypes NumPy arrays, torch tensors) through the core and the framework layers: against the
float64 reference with the "bfloat16" tolerance class, on the CPU path and on the GPU path's argument sets
(the emulator: CUDA_R_16BF operands, the sign kernel's bfloat16 bit patterns), without a float32 copy of
the input."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import gpu_orthol1 as ol1
from gpu_orthol1 import _driver, _dtypes
from gpu_orthol1._plan import Plan

from .reference import check, random_phi

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


def _phi(rng, shape, axis=1, layout="C"):
    """Random bfloat16 input; layout "F" (Fortran order) or "sliced" (every other column of a wider array)."""
    if layout == "sliced":
        wide = list(shape)
        wide[-1] = 2 * shape[-1]
        return random_phi(
            rng, tuple(wide), BF16, l=shape[0] if len(shape) == 2 else shape[axis - 1 if axis else 1]
        )[..., ::2]
    phi = random_phi(rng, shape, BF16)
    return np.asfortranarray(phi) if layout == "F" else phi


# -- the CPU path --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")
@pytest.mark.parametrize(
    "shape, axis, layout",
    [
        ((17, 5, 7), 1, "C"),
        ((9, 3, 12), 0, "C"),
        ((6, 11, 4), 2, "F"),
        ((13, 11), 1, "C"),
        ((15, 4, 6), 1, "sliced"),
    ],
)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_cpu_matches_reference(rng, shape, axis, layout, reduction):
    phi = _phi(rng, shape, axis, layout)
    loss, g = ol1.loss_and_grad(phi, 0.7, axis=axis, reduction=reduction)
    assert g.dtype == BF16 and g.shape == phi.shape
    assert np.asarray(loss).dtype == np.float32
    check(phi, loss, g, 0.7, axis, reduction)
    np.testing.assert_array_equal(ol1.loss(phi, 0.7, axis=axis, reduction=reduction), loss)
    np.testing.assert_array_equal(
        ol1.grad(phi, 0.7, axis=axis, reduction=reduction).view(np.int16), g.view(np.int16)
    )
    base = random_phi(rng, shape, BF16) if layout != "sliced" else random_phi(rng, phi.shape, BF16)
    out = base.copy()
    p = ol1.plan(phi, 0.7, axis=axis, reduction=reduction, want="grad")
    assert p(phi, out=out, accumulate=True) is out
    check(phi, loss, out, 0.7, axis, reduction, grad_base=base)


def test_cpu_metrics_and_nan(rng):
    phi = _phi(rng, (12, 3, 5))
    m16 = ol1.metrics(phi)
    m32 = ol1.metrics(phi.astype(np.float32))  # the same numbers: bfloat16 converts exactly
    for k in m16:
        np.testing.assert_allclose(m16[k], m32[k], rtol=1e-6)
    phi[2, 1, 3] = np.nan
    loss, g = ol1.loss_and_grad(phi, 1.0, reduction="none")
    assert np.isnan(loss[1]) and np.isnan(g.astype(np.float32)[:, 1]).all()
    assert np.isfinite(loss[[0, 2]]).all() and np.isfinite(g.astype(np.float32)[:, [0, 2]]).all()


def test_cpu_has_no_whole_float32_copy(rng):
    """The CPU converts chunk by chunk: the peak of a call stays far below a float32 copy of phi."""
    phi = _phi(rng, (256, 64, 32))
    out = np.empty_like(phi)
    ws = 1 << 17  # one slice (its Gram and the float32 copies of its phi and gradient) per chunk
    ol1.grad(phi, 1.0, out=out, workspace_bytes=ws)  # compiles and warms up outside the measurement
    tracemalloc.start()
    try:
        ol1.grad(phi, 1.0, out=out, workspace_bytes=ws)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    copy = phi.size * 4
    assert peak < copy / 4, f"peak {peak} bytes against a float32 copy's {copy}"


def test_dtype_detected_without_ml_dtypes_import():
    import subprocess
    import sys

    code = "import sys, gpu_orthol1; assert 'ml_dtypes' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert _dtypes.is_bf16(BF16) and not _dtypes.is_bf16(np.dtype(np.float16))


def test_refusals(rng):
    phi = _phi(rng, (8, 2, 4))
    with pytest.raises(TypeError, match="phi must be float16, bfloat16, float32 or float64, got int16"):
        ol1.loss(phi.view(np.int16))
    with pytest.raises(ValueError, match="out has dtype float32"):
        ol1.grad(phi, out=np.empty(phi.shape, np.float32))


# -- the GPU path's argument sets, emulated -------------------------------------------------------


def _emulated(phi, beta=1.0, **kw):
    from gpu_orthol1.testing import EmulatedGpuDevice

    dev = EmulatedGpuDevice()
    return Plan(phi, beta, backend="numpy", _device=dev, **kw), dev


@pytest.mark.cudasim
@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")
@pytest.mark.parametrize(
    "shape, axis, layout",
    [((16, 5, 7), 1, "C"), ((9, 3, 12), 0, "C"), ((7, 4, 5), 2, "F"), ((10, 9), 1, "C")],
)
def test_emulated_gpu_matches_reference(rng, shape, axis, layout):
    """cuBLAS's CUDA_R_16BF operands (Gram C in float32, gradient C in bfloat16, S bfloat16 from the
    kernel's bit patterns) as the emulator executes them; n = 12 takes the split sign pass."""
    phi = _phi(rng, shape, axis, layout)
    p, dev = _emulated(phi, 0.6, axis=axis)
    loss, g = p(phi)
    assert g.dtype == BF16
    check(phi, loss, g, 0.6, axis)
    assert [k for k, _ in dev.gemm_calls] == ["strided", "strided"] * (len(dev.gemm_calls) // 2)
    base = random_phi(rng, shape, BF16)
    out = base.copy()
    p(phi, out=out, accumulate=True)
    check(phi, loss, out, 0.6, axis, grad_base=base)


@pytest.mark.cudasim
def test_emulated_carrier_and_nan(rng):
    """The int16 carrier (how CUDA bfloat16 tensors reach a plan): the same results, bit for bit, and
    the NaN policy through the kernel's bfloat16 NaN pattern."""
    phi = _phi(rng, (12, 3, 6))
    phi[4, 2, 1] = np.nan
    p, _ = _emulated(phi, 0.5, reduction="none")
    loss, g = p(phi)
    pb, dev = _emulated(phi.view(np.int16), 0.5, reduction="none", _bf16_bits=True)
    loss_b, g_b = pb(phi.view(np.int16))
    assert g_b.dtype == np.int16 and dev.gemm_calls
    np.testing.assert_array_equal(loss_b, loss)
    np.testing.assert_array_equal(g_b, g.view(np.int16))
    assert np.isnan(loss[2]) and np.isnan(g.astype(np.float32)[:, 2]).all()
    ok = phi.copy()
    ok[:, 2] = 0.25
    check(ok[:, :2], loss[:2], g[:, :2], 0.5, 1, "none")


@pytest.mark.cudasim
def test_emulated_sign_kernel_writes_bfloat16_bits(rng):
    from gpu_orthol1.kernels import sign_abs

    n = 5
    g = rng.standard_normal((2, n * n)).astype(np.float32)
    g[0, 3] = 0.0
    g[1, 0] = 1.0  # a diagonal entry of exactly 1: sign 0
    s = np.full((2, n * n), 7, np.int16)
    losses = np.zeros(2)
    sign_abs.get_kernel(8, bits=True)[2, 8](g, s, n, losses, 0, 1.0, True)
    x = g.astype(np.float64) - np.eye(n).ravel()
    np.testing.assert_array_equal(s.view(BF16).astype(np.float64), np.sign(x))
    np.testing.assert_allclose(losses, np.abs(x).sum(axis=1), rtol=1e-12)
    with pytest.raises(ValueError, match="L1 signs only"):
        sign_abs.get_kernel(8, l2=True, bits=True)


@pytest.mark.cudasim
def test_emulated_gpu_refusals(rng):
    phi = _phi(rng, (8, 2, 4))
    with pytest.raises(ValueError, match="kernel='fused' takes float16, float32 or float64, not bfloat16"):
        _emulated(phi, kernel="fused")
    p, _ = _emulated(phi, penalty="l2")
    with pytest.raises(ValueError, match="bfloat16 sign pass writes the L1 signs only"):
        p(phi)
    lp, _ = _emulated(phi, penalty="l2", want="loss")  # no S: the loss alone runs
    np.testing.assert_allclose(lp(phi), ol1.loss(phi, penalty="l2"), rtol=1e-6)


@pytest.mark.cudasim
@pytest.mark.parametrize("dtype", [np.float16, BF16])
def test_emulated_pointer_path_16bit(rng, dtype):
    """Separate matrices of a 16-bit dtype: one gemmBatchedEx per GEMM (its argument list checked by
    the emulator) over the matrices themselves, chunked."""
    from gpu_orthol1.testing import EmulatedGpuDevice

    dev = EmulatedGpuDevice()
    l, n = 11, 6
    phis = [random_phi(rng, (l, n), dtype) for _ in range(5)]
    outs = [np.empty_like(a) for a in phis]
    lay = _driver.layout_of(phis[0][None])
    batch = _driver.Pointers(phis, outs, lay, lay, l, n)
    sz = _driver.sizes(
        dev,
        5,
        l,
        n,
        np.dtype(dtype),
        want_grad=True,
        accumulate=False,
        stage_phi=False,
        stage_out=False,
        budget=2 * (n * n * 6 + 24),
        pointers=True,
    )
    assert sz.chunk == 2
    wsb = _driver.workspace(np.empty, sz, l, n, np.dtype(dtype))
    losses = np.zeros(5)
    _driver.run(dev, batch, wsb, sz.chunk, losses, alpha=2 * 0.4, beta_gemm=0.0, want_grad=True)
    assert [k for k, _ in dev.gemm_calls] == ["pointers"] * 6
    for a, o, ls in zip(phis, outs, losses, strict=True):
        check(a, 0.4 * ls, o, 0.4, 1, "sum", dtype)


# -- torch: bfloat16 and float16 tensors reach the core as they are ---------------------------------


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_torch_ortho_l1_no_copy(monkeypatch, rng, dtype_name, mode):
    torch = _torch()
    from gpu_orthol1.torch import ortho_l1
    from gpu_orthol1.torch._bridge import _host_array

    seen = []
    real = Plan._execute

    def spy(self, phi, *a, **k):
        seen.append(phi)
        return real(self, phi, *a, **k)

    monkeypatch.setattr(Plan, "_execute", spy)
    dtype = getattr(torch, dtype_name)
    w = torch.from_numpy(random_phi(rng, (13, 6), np.float64)).to(dtype).requires_grad_(True)
    loss = ortho_l1(w, 0.9, mode=mode)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == dtype
    phi = _host_array(w.detach())
    assert len(seen) == 1 and np.shares_memory(seen[0], phi) and seen[0].dtype == phi.dtype
    g = _host_array(w.grad)
    if mode == "rows":
        check(phi.T, loss.detach().numpy(), g.T, 0.9, 1, "sum", phi.dtype)
    else:
        check(phi, loss.detach().numpy(), g, 0.9, 1, "sum", phi.dtype)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_torch_orthol1_grouped_no_copy(monkeypatch, rng, dtype_name):
    """OrthoL1 over 16-bit parameters: one group per (shape, dtype), its matrices handed to the chunk
    loop as views of the parameters (no float32 copy), loss() and add_grad_() against the reference."""
    torch = _torch()
    from torch import nn

    from gpu_orthol1.torch import OrthoL1
    from gpu_orthol1.torch._bridge import _host_array

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 9), nn.Linear(9, 9), nn.Linear(9, 5)).to(dtype)
    handed: list = []
    real = _driver.run

    def spy(dev, batch, *a, **k):
        handed.extend(batch.phis)
        return real(dev, batch, *a, **k)

    monkeypatch.setattr(_driver, "run", spy)
    reg = OrthoL1(model, 0.4)
    loss = reg.loss()
    loss.backward()
    assert reg.backend_calls == 2 * 3  # three groups (6->9, 9->9 twice, 9->5), two GEMMs each
    params = [_host_array(t.param.detach()) for t in reg.targets]
    assert all(a.dtype == params[0].dtype and a.dtype != np.float32 for a in handed)
    assert all(any(np.shares_memory(a, p) for p in params) for a in handed)
    total = 0.0
    for t in reg.targets:
        V = _host_array(t.view(t.param.detach()))
        V64 = V.astype(np.float64)
        per = np.abs(np.einsum("mli,mlj->mij", V64, V64) - np.eye(V.shape[2])).sum() * 0.4
        total += per
        check(V, np.float64(per), _host_array(t.view(t.param.grad)), 0.4, 0, "sum", V.dtype)
    np.testing.assert_allclose(loss.item(), total, rtol=2e-5)
    before = [t.param.grad.clone() for t in reg.targets]
    reg.add_grad_()
    for t, b in zip(reg.targets, before, strict=True):
        np.testing.assert_array_equal(t.param.grad.float().numpy(), 2 * b.float().numpy())


@pytest.mark.gpu
def test_gpu_ortho_l1_bfloat16_cuda(rng):
    """CUDA bfloat16 tensors: the plan takes their int16 carrier (CuPy has no bfloat16)."""
    torch = _torch()
    from gpu_orthol1.torch import ortho_l1
    from gpu_orthol1.torch._bridge import _host_array

    w = torch.from_numpy(random_phi(rng, (300, 4, 40), np.float64)).to("cuda", torch.bfloat16)
    w.requires_grad_(True)
    loss = ortho_l1(w, 0.3, axis=1)
    loss.backward()
    assert w.grad.dtype == torch.bfloat16
    phi = _host_array(w.detach().cpu())
    check(phi, loss.detach().cpu().numpy(), _host_array(w.grad.cpu()), 0.3, 1, "sum", phi.dtype)
