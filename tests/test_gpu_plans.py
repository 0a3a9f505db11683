"""Plans on a real card (run by bench/gpu_check.sh): the fused kernel against the two-GEMM path, CUDA
graph capture and replay (CuPy and torch), streams. Skipped without GPU_ORTHOL1_TEST_GPU=1."""

from __future__ import annotations

import numpy as np
import pytest

import gpu_orthol1 as ol1

from .helpers import make
from .reference import check

pytestmark = pytest.mark.gpu


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(64, 200, 64), (7, 33, 5), (300, 20, 32), (16, 9, "widest")])
@pytest.mark.parametrize("layout", ["C", "F", "perm"])
def test_fused_equals_gemm_on_card(cp, rng, dtype, shape, layout):
    from gpu_orthol1.kernels import fused_small

    if shape[2] == "widest":  # the largest n of this dtype: 96 (a 16 x 16 grid) or 64 (float64)
        shape = shape[:2] + (fused_small.N_MAX[np.dtype(dtype)],)
    phi = make(cp, rng, shape, dtype, layout, 1)
    fused = ol1.plan(phi, 0.3, kernel="fused")
    gemm = ol1.plan(phi, 0.3, kernel="gemm")
    assert fused.kernel == "fused" and gemm.kernel == "gemm"
    lf, gf = fused(phi)
    lg, gg = gemm(phi)
    check(phi.get(), lf.get(), gf.get(), 0.3, 1, "sum", dtype)
    check(phi.get(), lg.get(), gg.get(), 0.3, 1, "sum", dtype)
    out = cp.asarray(rng.standard_normal(shape).astype(dtype))
    base = out.get().astype(np.float64)
    fused(phi, out=out, accumulate=True)
    check(phi.get(), lf.get(), out.get(), 0.3, 1, "sum", dtype, grad_base=base)


def test_auto_rule_on_card(cp, rng):
    """kernel="auto" takes the fused kernel for (64, 8, 32) float32 (one launch, no cuBLAS call) and
    the two-GEMM path past the rule; both agree with the reference."""
    for shape, want in (((64, 8, 32), "fused"), ((600, 4, 40), "gemm")):
        phi = make(cp, rng, shape, np.float32, "C", 1)
        p = ol1.plan(phi, 0.3)
        assert p.kernel == want
        loss, grad = ol1.loss_and_grad(phi, 0.3)
        check(phi.get(), loss.get(), grad.get(), 0.3, 1, "sum", np.float32)


@pytest.mark.parametrize("kernel", ["gemm", "fused"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_graph_replay_follows_the_input(cp, rng, kernel, reduction):
    shape = (64, 8, 32)
    phi = make(cp, rng, shape, np.float32, "C", 1)
    out = cp.asarray(rng.standard_normal(shape).astype(np.float32))
    p = ol1.plan(phi, 0.5, reduction=reduction, kernel=kernel)
    g = p.graph(phi)
    for _ in range(3):
        phi[...] = make(cp, rng, shape, np.float32, "C", 1)  # new values, same address
        loss, grad = g.replay()
        want_l, want_g = ol1.loss_and_grad(phi, 0.5, reduction=reduction)
        cp.testing.assert_allclose(loss, want_l, rtol=1e-6)
        cp.testing.assert_allclose(grad, want_g, rtol=1e-6, atol=1e-7)
    base = out.copy()
    ga = p.graph(phi, out=out, accumulate=True)
    cp.testing.assert_array_equal(out, base)  # capturing runs nothing into the user's out
    ga.replay()
    ga.replay()
    cp.testing.assert_allclose(out - base, 2 * ol1.grad(phi, 0.5, reduction=reduction), rtol=1e-5, atol=1e-6)


def test_graph_refuses_host_input_and_staged_layouts(cp, rng):
    phi = make(np, rng, (9, 4, 5), np.float32, "C", 1)
    with pytest.raises(ValueError, match="GPU backend and a CuPy phi"):
        ol1.plan(phi, backend="numpy").graph(phi)
    bad = make(cp, rng, (9, 4, 5), np.float32, "every2", 1)
    p = ol1.plan(bad)  # a plan copies such a layout chunk by chunk (warning when it runs)
    with pytest.raises(ValueError, match="reads in place"):
        p.graph(bad)


def test_torch_ortho_l1_and_orthol1_in_torch_cuda_graph(rng):
    torch = pytest.importorskip("torch")
    from torch import nn

    from gpu_orthol1.torch import OrthoL1, ortho_l1

    w = torch.randn(48, 32, device="cuda", requires_grad=True)
    static_out = torch.empty((), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture: compiles, uploads, makes the plan
        for _ in range(2):
            ortho_l1(w, 0.1, mode="rows").backward()
    torch.cuda.current_stream().wait_stream(s)
    w.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss = ortho_l1(w, 0.1, mode="rows")
        loss.backward()
        static_out.copy_(loss)
    for _ in range(2):
        with torch.no_grad():
            w.copy_(torch.randn_like(w))
        w.grad.zero_()
        g.replay()
        torch.cuda.synchronize()
        W = w.detach().double()
        want = 0.1 * (W @ W.T - torch.eye(48, dtype=W.dtype, device="cuda")).abs().sum()
        torch.testing.assert_close(static_out.double(), want, rtol=1e-5, atol=0)

    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)]).cuda()
    reg = OrthoL1(model, 0.2)
    with torch.cuda.stream(s):
        for _ in range(2):
            reg.add_grad_()
    torch.cuda.current_stream().wait_stream(s)
    model.zero_grad(set_to_none=False)
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        reg.add_grad_()
    model.zero_grad(set_to_none=False)
    g2.replay()
    torch.cuda.synchronize()
    for lin in model:
        W = lin.weight.detach().double()
        want = 2 * 0.2 * W @ torch.sign(W.T @ W - torch.eye(64, dtype=W.dtype, device="cuda"))
        torch.testing.assert_close(lin.weight.grad.double(), want, rtol=1e-4, atol=1e-4)


def test_orthol1_loss_backward_in_torch_cuda_graph(rng):
    """OrthoL1.loss().backward() captured whole: the gradients come from the graph's pool, so the
    pointer-array GEMMs see new addresses inside the capture (written by the address kernel, no
    upload); each replay recomputes loss and gradients for the weights' new values."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from gpu_orthol1.torch import OrthoL1

    model = nn.Sequential(*[nn.Linear(48, 48) for _ in range(5)], nn.Linear(48, 32)).cuda()
    reg = OrthoL1(model, 0.3)
    for lin in model:
        lin.weight.grad = torch.zeros_like(lin.weight)
    static_loss = torch.empty((), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            reg.loss().backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss = reg.loss()
        loss.backward()
        static_loss.copy_(loss)
    for _ in range(2):
        with torch.no_grad():
            for lin in model:
                lin.weight.copy_(torch.randn_like(lin.weight) / 7)
                lin.weight.grad.zero_()
        g.replay()
        torch.cuda.synchronize()
        want_loss = 0.0
        for lin in model:
            W = lin.weight.detach().double()
            A = W if W.shape[0] >= W.shape[1] else W.T  # mode "auto": the smaller Gram, A^T A
            X = A.T @ A - torch.eye(A.shape[1], dtype=A.dtype, device="cuda")
            want_loss += 0.3 * X.abs().sum().item()
            gA = 2 * 0.3 * A @ torch.sign(X)
            want = gA if A is W else gA.T
            torch.testing.assert_close(lin.weight.grad.double(), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(static_loss.double().item(), want_loss, rtol=1e-5, atol=0)


def test_orthol1_loss_compiled_on_cuda(rng):
    """OrthoL1.loss() in torch.compile(fullgraph=True) on CUDA parameters: the custom op runs the
    grouped cuBLAS path; loss and gradients as in eager mode."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from gpu_orthol1.torch import OrthoL1

    model = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 40), nn.Linear(40, 24)).cuda().double()
    reg = OrthoL1(model, 0.25)
    compiled = torch.compile(reg.loss, backend="aot_eager", fullgraph=True)
    out = compiled()
    out.backward()
    got = [lin.weight.grad.clone() for lin in model]
    model.zero_grad(set_to_none=True)
    ref = reg.loss()
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=0)
    for g, lin in zip(got, model, strict=True):
        torch.testing.assert_close(g, lin.weight.grad, rtol=1e-12, atol=1e-14)
