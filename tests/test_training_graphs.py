"""OrthoL1's weight in device memory (issue 25: "under CUDA-graph capture beta lives in a device
scalar, so a replay uses the current value without re-capture"). On the CPU: the GPU path's pointer-
array GEMMs, emulated, recorded as a graph would hold them and run again after `advance()` wrote new
weights; on a card (`gpu`): torch.cuda.graph capture, a schedule with every=2, replays against eager."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gpu_orthol1.torch import OrthoL1  # noqa: E402


def _ref_grad(t, w):
    """2 w Phi_i sign(Phi_i^T Phi_i - I) per slice of target t, float64, in the parameter's shape."""
    V = t.view(t.param.detach()).double()
    G = V.transpose(1, 2) @ V - torch.eye(V.shape[2], dtype=torch.float64)
    out = torch.zeros_like(t.param, dtype=torch.float64)
    t.view(out).copy_(2 * w * t.scale * V @ torch.sign(G))
    return out, w * t.scale * G.abs().sum()


def _model(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(
        torch.nn.Linear(7, 9), torch.nn.Linear(9, 9), torch.nn.Linear(9, 5), torch.nn.Conv1d(3, 4, 2)
    )
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.6)
    return m.to(dtype)


def sched(step):
    return 0.4 * 0.5**step


@pytest.mark.cudasim
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_recorded_gemms_replay_the_weight_written_by_advance(dtype, rtol, rng):
    """add_grad_'s gradient GEMMs on the emulated GPU read [alpha, beta] from memory: run again (a
    replay) after advance() wrote the next steps' weights, they add those weights' gradients, a
    skipped step (every=2) adds nothing; the loss factor follows too."""
    from gpu_orthol1.testing import EmulatedGpuDevice

    model = _model(dtype, int(rng.integers(2**31)))
    devs = []

    def factory(precision="highest"):
        devs.append(EmulatedGpuDevice(precision=precision))
        devs[-1].recorded = []
        return devs[-1]

    reg = OrthoL1(model, beta=sched, every=2)
    reg._device_factory = factory
    model.zero_grad(set_to_none=True)
    value = reg.add_grad_()  # step 0, eager: weight 2 * sched(0)
    targets = [t for t in reg.targets]
    for t in targets:
        g, loss = _ref_grad(t, 2 * sched(0))
        torch.testing.assert_close(t.param.grad.double(), g, rtol=rtol, atol=rtol)
    want_loss = sum(_ref_grad(t, 2 * sched(0))[1] for t in targets)
    torch.testing.assert_close(value.double(), want_loss, rtol=rtol, atol=0)
    assert devs and all(d.recorded for d in devs)
    scalar = reg._runner.weights._scalars[torch.device("cpu")]
    for step, want_w in ((1, 0.0), (2, 2 * sched(2)), (3, 0.0), (4, 2 * sched(4))):
        for t in targets:
            t.param.grad.zero_()  # in place: the recorded calls hold these addresses
        assert reg.step == step
        assert reg.advance() == want_w
        for d in devs:
            d.replay()
        assert scalar.item() == want_w  # what the captured loss total multiplies by
        for t in targets:
            g, _ = _ref_grad(t, want_w)
            torch.testing.assert_close(t.param.grad.double(), g, rtol=rtol, atol=rtol * (want_w + 1e-300))
    assert reg.step == 5


def test_advance_checks_before_writing():
    reg = OrthoL1(torch.nn.Linear(4, 3), beta=lambda s: float("nan") if s == 1 else 0.1)
    assert reg.advance() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="step 1"):
        reg.advance()
    assert reg.step == 1
    reg._runner.weights.fixed = 0.1  # a capture ran per-tensor (staged-layout) parameters at 0.1
    reg.beta = 0.2
    with pytest.raises(ValueError, match="cannot read in place"):
        reg.advance()
    assert reg.step == 1 and reg._runner.weights.value == pytest.approx(0.1)


@pytest.mark.gpu
def test_cuda_graph_replays_the_scheduled_beta():
    """Capture add_grad_() in torch.cuda.graph; before each replay advance() writes the next step's
    weight (every=2: 0 on odd steps); the replay's gradient and value equal an eager call at that weight."""
    model = _model(torch.float32, 0).cuda()
    reg = OrthoL1(model, beta=sched, every=2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (step 0), as torch.cuda.graph asks
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        reg.add_grad_()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        value = reg.add_grad_()
    assert reg.step == 1  # the capture counts no step
    for step in range(1, 6):
        for p in model.parameters():
            p.grad.zero_()
        w = reg.advance()
        assert w == (2 * sched(step) if step % 2 == 0 else 0.0)
        graph.replay()
        torch.cuda.synchronize()
        eager = OrthoL1(model, beta=w)
        want = [torch.zeros_like(p) for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        for p, z in zip(model.parameters(), want, strict=True):
            p.grad = z
        want_value = eager.add_grad_()
        for g, p in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
            p.grad = g
        torch.testing.assert_close(value, want_value, rtol=1e-5, atol=1e-7)
    np.testing.assert_equal(reg.step, 6)


@pytest.mark.gpu
def test_capture_refusals():
    """Under capture: metrics=True raises (its dict would hold the capture's values), and a regularizer
    never run eagerly raises before launching its pass (its device scalars do not exist yet)."""
    model = _model(torch.float32, 1).cuda()
    reg, fresh = OrthoL1(model, 0.1), OrthoL1(model, 0.1)
    reg.loss()  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with pytest.raises(ValueError, match="metrics=True is not available under CUDA graph capture"):
            reg.loss(metrics=True)
        with pytest.raises(ValueError, match="run the same call once eagerly before capturing"):
            fresh.add_grad_()
    assert reg.step == 1 and fresh.step == 0
