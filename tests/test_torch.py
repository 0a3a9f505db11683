"""gpu_orthol1.torch: ortho_l1 (autograd) and OrthoL1 (model-wide loss, add_grad_, step_) against
torch autograd of the naive expression, on real torch modules; the GPU's grouped pointer-array path
emulated on the CPU (`cudasim`) and run for real by bench/gpu_check.sh (`gpu`)."""

from __future__ import annotations

import importlib
import sys
import typing
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import ml_dtypes  # noqa: E402

import gpu_orthol1 as ol1  # noqa: E402
from gpu_orthol1 import _driver, _gemm, _numpy_dev, _plan  # noqa: E402
from gpu_orthol1.torch import OrthoL1, ortho_l1  # noqa: E402
from gpu_orthol1.torch._bridge import _host_array  # noqa: E402

from .reference import check, random_phi  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def tseed(rng):
    torch.manual_seed(int(rng.integers(2**31)))
    return rng


def _t(rng, shape, dtype=torch.float64, device="cpu"):
    l = shape[0]
    return torch.from_numpy(random_phi(rng, shape, np.float64, l)).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# naive reference: what users write today, in torch autograd


def naive_slices(w, axis, mode):
    """(m, l, n) slices and whether the Gram is the rows' one, as ortho_l1 defines them."""
    v = w.unsqueeze(0) if w.dim() == 2 else w.movedim(axis, 0)
    l, n = v.shape[1], v.shape[2]
    rows = mode == "rows" or (mode == "auto" and l < n)
    return v, rows


def naive_loss(w, beta, axis=1, reduction="sum", mode=None):
    v, rows = naive_slices(w, axis, mode)
    G = v @ v.transpose(1, 2) if rows else v.transpose(1, 2) @ v
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    per = beta * (G - eye).abs().sum(dim=(1, 2))
    if reduction == "none":
        return per
    return per.sum() / (len(per) if reduction == "mean" else 1)


def naive_matrix(p, conv=False):
    """The matrix OrthoL1 sees for a parameter (before choosing rows/columns)."""
    if p.dim() >= 4 or conv:
        return p.reshape(p.shape[0], -1)
    return p


def naive_model_loss(targets, beta, mode="auto"):
    total = 0
    for p, conv in targets:
        W = naive_matrix(p, conv)
        l, n = W.shape
        rows = mode == "rows" or (mode == "auto" and l < n)
        G = W @ W.T if rows else W.T @ W
        total = total + beta * (G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)).abs().sum()
    return total


# ---------------------------------------------------------------------------------------------
# ortho_l1


CASES = [
    ((7, 5), 1),
    ((3, 9), 1),
    ((1, 1), 1),
    ((6, 6), 1),
    ((5, 4, 3), 1),
    ((4, 6, 7), 0),
    ((6, 3, 5), 2),
    ((3, 5, 4), -1),
]


@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")  # axis=2 slices: the core stages them
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [None, "columns", "rows", "auto"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-ax{c[1]}")
def test_ortho_l1_matches_naive_autograd_float64(device, mode, reduction, case, tseed):
    shape, axis = case
    beta = float(tseed.uniform(0.2, 2.0))
    for layout in ("C", "T"):
        base = _t(tseed, shape[::-1] if layout == "T" else shape, device=device)
        w = (base.permute(*reversed(range(base.dim()))) if layout == "T" else base).requires_grad_(True)
        assert w.shape == shape
        got = ortho_l1(w, beta, axis=axis, reduction=reduction, mode=mode)
        w2 = w.detach().clone().requires_grad_(True)
        want = naive_loss(w2, beta, axis, reduction, mode)
        assert got.shape == want.shape and got.dtype == torch.float64 and got.device == w.device
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        go = torch.rand(want.shape, dtype=torch.float64, device=device) + 0.5  # scaled by grad_output
        (g,) = torch.autograd.grad(got, w, go)
        (g2,) = torch.autograd.grad(want, w2, go)
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")
def test_ortho_l1_gradcheck(tseed):
    for shape, axis, mode in (
        ((5, 4), 1, "columns"),
        ((3, 6), 1, "rows"),
        ((4, 3, 5), 1, "auto"),
        ((3, 2, 4), 2, None),
    ):
        for _ in range(20):  # away from the kink: every |G - I| entry clear of 0 by much more than eps
            w = _t(tseed, shape).requires_grad_(True)
            v, rows = naive_slices(w.detach(), axis if w.dim() == 3 else 1, mode)
            G = v @ v.transpose(1, 2) if rows else v.transpose(1, 2) @ v
            if (G - torch.eye(G.shape[-1], dtype=G.dtype)).abs().min() > 1e-3:
                break
        else:
            pytest.fail("no input away from the kink")
        for reduction in ("sum", "none"):
            assert torch.autograd.gradcheck(
                lambda x, a=axis, r=reduction, md=mode: ortho_l1(x, 0.9, axis=a, reduction=r, mode=md),
                (w,),
                eps=1e-6,
                atol=1e-6,
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_ortho_l1_low_precision_against_reference(device, dtype, tseed):
    np_dt = {torch.float16: np.float16, torch.float32: np.float32}[dtype]
    for shape, axis in (((9, 6, 5), 1), ((11, 7), 1), ((4, 8, 6), 0)):
        w = _t(tseed, shape, dtype, device).requires_grad_(True)
        loss = ortho_l1(w, 1.3, axis=axis)
        assert loss.dtype == torch.float32
        loss.backward()
        assert w.grad.dtype == dtype
        phi = w.detach().cpu().numpy()
        check(phi, loss.detach().cpu().numpy(), w.grad.cpu().numpy(), 1.3, axis, "sum", np_dt)


def test_ortho_l1_bfloat16(tseed):
    w = _t(tseed, (12, 7), torch.bfloat16).requires_grad_(True)
    loss = ortho_l1(w, 0.8)
    assert loss.dtype == torch.float32
    loss.backward()
    assert w.grad.dtype == torch.bfloat16
    w64 = w.detach().double().requires_grad_(True)
    ref = naive_loss(w64, 0.8)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=0)
    bound = 2 * 0.8 * w64.detach().abs().sum(dim=1, keepdim=True)
    assert ((w.grad.double() - w64.grad).abs() <= 1e-2 * bound).all()  # bfloat16 rounding of the result


def test_ortho_l1_cpu_is_zero_copy_and_one_pass(monkeypatch, tseed):
    seen = []
    real = _plan.Plan._execute

    def spy(self, phi, *a, **k):
        seen.append(phi)
        return real(self, phi, *a, **k)

    monkeypatch.setattr(_plan.Plan, "_execute", spy)
    w = _t(tseed, (10, 6), torch.float32).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ol1.CopyWarning)  # rows mode reads the transposed view in place
        for mode in ("rows", "columns"):
            loss = ortho_l1(w, 1.0, mode=mode)
            loss.backward()
    assert len(seen) == 2  # one core call per forward; backward recomputes nothing
    for phi in seen:
        assert np.shares_memory(phi, w.detach().numpy())


def test_ortho_l1_no_grad_skips_gradient(monkeypatch, tseed):
    flags = []
    real = _plan.Plan._execute
    monkeypatch.setattr(_plan.Plan, "_execute", lambda *a, **k: (flags.append(a[5]), real(*a, **k))[1])
    w = _t(tseed, (6, 4), torch.float32).requires_grad_(True)
    with torch.no_grad():
        loss = ortho_l1(w)
    assert flags == [False] and not loss.requires_grad
    torch.testing.assert_close(loss.double(), naive_loss(w.detach().double(), 1.0), rtol=2e-5, atol=0)


def test_ortho_l1_errors():
    with pytest.raises(TypeError, match="complex"):
        ortho_l1(torch.randn(3, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="dense"):
        ortho_l1(torch.eye(3).to_sparse())
    with pytest.raises(TypeError, match="dtype"):
        ortho_l1(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="device meta"):
        ortho_l1(torch.empty(3, 3, device="meta"))
    with pytest.raises(ValueError, match="2-D"):
        ortho_l1(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="mode"):
        ortho_l1(torch.randn(3, 3), mode="diag")
    with pytest.raises(ValueError, match="reduction"):
        ortho_l1(torch.randn(3, 3), reduction="max")
    with pytest.raises(ValueError, match="beta"):
        ortho_l1(torch.randn(3, 3), beta=float("nan"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ortho_l1(np.eye(3))


def test_import_without_torch_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` sees when it is not installed
    monkeypatch.delitem(sys.modules, "gpu_orthol1.torch", raising=False)
    with pytest.raises(ImportError, match="needs PyTorch"):
        importlib.import_module("gpu_orthol1.torch")


# ---------------------------------------------------------------------------------------------
# OrthoL1 on real modules


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, bias=False)
        self.c3 = nn.Conv2d(8, 16, 1)
        self.c1d = nn.Conv1d(4, 6, 3)
        self.fc = nn.Linear(16, 10)


def _models():
    return {
        "linear": lambda: nn.Sequential(
            nn.Linear(9, 13), nn.ReLU(), nn.Linear(13, 13), nn.Linear(13, 13), nn.Linear(13, 5)
        ),
        "conv2d": lambda: nn.Conv2d(3, 5, (3, 2)),
        "cnn": SmallCNN,
        "mha": lambda: nn.MultiheadAttention(12, 3, kdim=7, vdim=5),
        "transformer": lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, batch_first=True),
            2,
            enable_nested_tensor=False,
        ),
    }


def _targets(model):
    """(param, is_conv) for every parameter OrthoL1 should take, by the documented rules."""
    conv = {id(m.weight) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    out, seen = [], set()
    for _, p in model.named_parameters():
        if p.dim() >= 2 and p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((p, id(p) in conv))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["auto", "rows", "columns"])
@pytest.mark.parametrize("name", list(_models()))
def test_orthol1_module_loss_add_grad_step(device, mode, name, tseed):
    model = _models()[name]().double().to(device)
    if name == "cnn":
        model.c2.to(memory_format=torch.channels_last)  # flattened in memory order, still a view
    beta = float(tseed.uniform(0.1, 1.0))
    reg = OrthoL1(model, beta, mode)
    targets = _targets(model)
    assert [id(t.param) for t in reg.targets] == [id(p) for p, _ in targets]
    params = [p for p, _ in targets]

    # loss() + backward against autograd of the per-parameter expression
    with warnings.catch_warnings():
        warnings.simplefilter("error", ol1.CopyWarning)
        loss = reg.loss()
    assert loss.dtype == torch.float64 and loss.requires_grad and loss.device.type == device
    loss.backward(torch.tensor(1.7, dtype=torch.float64, device=device))
    got = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    ref = naive_model_loss(targets, beta, mode)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    (1.7 * ref).backward()
    want = [p.grad.clone() for p in params]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    for p in model.parameters():
        if p.dim() < 2:
            assert p.grad is None  # biases and norms untouched

    # add_grad_: accumulates into existing .grad, creates missing ones
    base = [torch.randn_like(p) for p in params]
    for i, (p, b) in enumerate(zip(params, base, strict=True)):
        p.grad = b.clone() if i % 2 == 0 else None
    val = reg.add_grad_()
    assert not val.requires_grad
    torch.testing.assert_close(val, ref.detach(), rtol=1e-12, atol=1e-12)
    for i, (p, b, w) in enumerate(zip(params, base, want, strict=True)):
        torch.testing.assert_close(p.grad, w / 1.7 + (b if i % 2 == 0 else 0), rtol=1e-10, atol=1e-10)

    # step_: W <- W - lr * dL/dW from the weights before the step; .grad untouched
    before = [p.detach().clone() for p in params]
    grads_before = [p.grad.clone() for p in params]
    val = reg.step_(0.05)
    torch.testing.assert_close(val, ref.detach(), rtol=1e-12, atol=1e-12)
    for p, w0, w, g0 in zip(params, before, want, grads_before, strict=True):
        torch.testing.assert_close(p.detach(), w0 - 0.05 * w / 1.7, rtol=1e-10, atol=1e-12)
        assert torch.equal(p.grad, g0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_orthol1_low_precision_against_reference(device, dtype, tseed):
    model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 30), nn.Linear(30, 30), nn.Conv2d(3, 4, 3))
    model.to(device=device, dtype=dtype)
    np_dt = np.float32 if dtype == torch.float32 else np.float16
    reg = OrthoL1(model, 0.6, "auto")
    loss = reg.loss()
    assert loss.dtype == torch.float32
    loss.backward()
    total = 0.0
    for t in reg.targets:
        p = t.param.detach()
        V = t.view(p).cpu().numpy()  # (m, l, n): slices along axis 0
        per = (
            np.abs(
                np.einsum("mli,mlj->mij", V.astype(np.float64), V.astype(np.float64)) - np.eye(V.shape[2])
            ).sum()
            * 0.6
        )
        total += per
        check(V, np.float64(per), t.view(t.param.grad).cpu().numpy(), 0.6, 0, "sum", np_dt)
    np.testing.assert_allclose(loss.item(), total, rtol=2e-5)


def _spy_batched(monkeypatch):
    sizes = []
    real_gram, real_grad = _numpy_dev.NumpyDevice.gram, _numpy_dev.NumpyDevice.grad

    def gram(src, cc, ws):
        sizes.append(cc) if isinstance(src, _driver.PointerChunk) else None
        real_gram(src, cc, ws)

    def grad(src, dst, cc, *a):
        sizes.append(cc) if isinstance(src, _driver.PointerChunk) else None
        real_grad(src, dst, cc, *a)

    monkeypatch.setattr(_numpy_dev.NumpyDevice, "gram", staticmethod(gram))
    monkeypatch.setattr(_numpy_dev.NumpyDevice, "grad", staticmethod(grad))
    single = []
    real_run = _plan.Plan._execute
    monkeypatch.setattr(_plan.Plan, "_execute", lambda *a, **k: (single.append(1), real_run(*a, **k))[1])
    return sizes, single


def test_grouping_really_batches(monkeypatch, tseed):
    sizes, single = _spy_batched(monkeypatch)
    layers = [nn.Linear(16, 16) for _ in range(6)] + [nn.Linear(16, 32) for _ in range(3)]
    model = nn.Sequential(*layers).double()
    reg = OrthoL1(model, 0.5)  # 16x16 Grams for all 9 (auto: (32, 16) -> columns), two layouts/shapes
    loss = reg.loss()
    # group (l=16, n=16) of 6 and group (l=32, n=16) of 3: a Gram and a gradient call each
    assert sorted(sizes) == [3, 3, 6, 6] and reg.backend_calls == 4 and not single
    loss.backward()
    sizes.clear()
    with torch.no_grad():
        reg.loss()
    assert sorted(sizes) == [3, 6]  # no gradient wanted: Gram calls only
    sizes.clear()
    reg.add_grad_()
    assert sorted(sizes) == [3, 3, 6, 6] and not single
    # the same call count for a deeper model: the batch grows, not the number of calls
    reg2 = OrthoL1(nn.Sequential(*[nn.Linear(16, 16) for _ in range(40)]), 0.5)
    sizes.clear()
    reg2.loss()
    assert sizes == [40, 40]


def test_chunked_group_equals_unchunked(tseed):
    model = nn.Sequential(*[nn.Linear(12, 12) for _ in range(7)]).double()
    ref = OrthoL1(model, 0.4).loss()
    ref.backward()
    want = [p.grad.clone() for p in model.parameters() if p.dim() == 2]
    model.zero_grad()
    per_slice = 12 * 12 * 8
    reg = OrthoL1(model, 0.4, workspace_bytes=2 * per_slice)  # chunks of 2 matrices
    loss = reg.loss()
    assert reg.backend_calls == 8  # 4 chunks x (Gram, gradient)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-14, atol=0)
    for p, w in zip([p for p in model.parameters() if p.dim() == 2], want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-14)
    with pytest.raises(MemoryError, match="workspace"):
        OrthoL1(model, 0.4, workspace_bytes=100).loss()


def test_include_exclude_rules():
    m = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, batch_first=True)
    m.linear2.weight.requires_grad_(False)
    all_names = OrthoL1(m).names
    assert all_names == ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight"]
    assert OrthoL1(m, include="*linear*").names == ["linear1.weight"]
    assert OrthoL1(m, exclude=["self_attn.*"]).names == ["linear1.weight"]
    assert OrthoL1(m, include=lambda n, p: p.shape[0] == 8).names == ["self_attn.out_proj.weight"]
    shared = nn.Linear(5, 5)
    tied = nn.Sequential(shared, nn.ReLU(), shared)
    assert OrthoL1(tied).names == ["0.weight"]
    # an iterable of parameters or of (name, parameter) pairs; 3-D parameters are stacks along axis
    stack = nn.Parameter(torch.randn(4, 3, 6))
    reg = OrthoL1(
        [("a", stack), ("b", nn.Parameter(torch.randn(5)))], axis=0, mode="columns", three_d="stack"
    )
    assert reg.names == ["a"] and reg.targets[0].view(stack).shape == (4, 3, 6)
    reg = OrthoL1([stack], axis=1, mode="columns", three_d="stack")
    assert reg.names == ["0"] and reg.targets[0].view(stack).shape == (3, 4, 6)
    loss = reg.loss()
    torch.testing.assert_close(loss.double(), naive_loss(stack.detach().double(), 1.0, 1), rtol=2e-5, atol=0)


def test_orthol1_errors_and_bfloat16():
    with pytest.raises(TypeError, match="complex"):
        OrthoL1([nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="device meta"):
        OrthoL1(nn.Linear(3, 3, device="meta"))
    with pytest.raises(ValueError, match="mode"):
        OrthoL1(nn.Linear(3, 3), mode="diag")
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        OrthoL1(emb).add_grad_()
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="lr"):
        OrthoL1(lin).step_(float("inf"))
    # bfloat16: grouped like float32, the gradient written in bfloat16
    m = nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 9)).to(torch.bfloat16)
    reg = OrthoL1(m, 0.5)
    loss = reg.loss()
    loss.backward()
    ref = naive_model_loss(
        [(p.detach().double().requires_grad_(True), False) for p in (m[0].weight, m[1].weight)], 0.5
    )
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    assert m[0].weight.grad.dtype == torch.bfloat16


@pytest.mark.cudasim
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_gpu_pointer_array_path_emulated(dtype, tseed):
    """The GPU's grouped path on the CPU: its pointer arrays (written into the workspace by the address
    kernel, then raw addresses resolved back to the buffers), its dtypes (S in phi's dtype, alpha in
    the GEMM; gemmBatchedEx with 16-bit operands for float16 and bfloat16, its argument list checked)
    and the CUDA kernels under the simulator."""
    np_dt = {
        torch.float16: np.float16,
        torch.float32: np.float32,
        torch.float64: np.float64,
        torch.bfloat16: ml_dtypes.bfloat16,
    }[dtype]
    model = nn.Sequential(
        nn.Linear(6, 9), nn.Linear(9, 9), nn.Linear(9, 9), nn.Linear(9, 4), nn.Conv2d(2, 3, 2)
    ).to(dtype)
    calls = []

    def factory(precision="highest"):
        from gpu_orthol1.testing import EmulatedGpuDevice

        dev = EmulatedGpuDevice(precision=precision)
        calls.append(dev)
        return dev

    for mode in ("rows", "columns"):
        reg = OrthoL1(model, 0.7, mode, workspace_bytes=2 * 9 * 9 * 8 + 9 * 9 * 8)  # forces 2 chunks
        reg._device_factory = factory
        model.zero_grad(set_to_none=True)
        loss = reg.loss()
        loss.backward()
        total = 0.0
        for t in reg.targets:
            V = _host_array(t.view(t.param.detach())).astype(np.float64)
            per = np.abs(np.einsum("mli,mlj->mij", V, V) - np.eye(V.shape[2])).sum() * 0.7
            total += per
            check(
                _host_array(t.view(t.param.detach())),
                np.float64(per),
                _host_array(t.view(t.param.grad)),
                0.7,
                0,
                "sum",
                np_dt,
            )
        np.testing.assert_allclose(loss.item(), total, rtol=2e-5)
        before = [t.param.grad.clone() for t in reg.targets]
        reg.add_grad_()
        for t, b in zip(reg.targets, before, strict=True):
            np.testing.assert_allclose(
                t.param.grad.double().numpy(),
                2 * b.double().numpy(),
                rtol=2e-3 if dtype == torch.float16 else 1e-5,
                atol=1e-3,
            )
    assert calls and all(kind == "pointers" for d in calls for kind, _ in d.gemm_calls)
    assert any(len(d.gemm_calls) == 2 * 2 + 2 * 2 for d in calls)  # 2 groups (9x9 and the rest) x 2 chunks


def test_pointer_arrays_are_base_plus_offset():
    bufs = {
        "x": np.zeros(10, np.float32),
        "ws": np.zeros(50, np.float32),
        "out": np.zeros((3, 4), np.float64),
    }
    call = _gemm.BatchedGemm(
        _gemm.gram_call(_gemm.Layout("T", 2, 0), 0, 1, 2, 2),
        (_gemm.Ref("x", 3), _gemm.Ref("x", 5)),
        (_gemm.Ref("x", 3), _gemm.Ref("x", 5)),
        (_gemm.Ref("ws", 0), _gemm.Ref("out", 4)),
    )
    p = _gemm.pointer_arrays(call, lambda k: bufs[k].ctypes.data, lambda k: bufs[k].itemsize)
    x, ws, out = (bufs[k].ctypes.data for k in ("x", "ws", "out"))
    assert p.dtype == np.uint64 and p.shape == (3, 2)
    assert p.tolist() == [[x + 12, x + 20], [x + 12, x + 20], [ws, out + 32]]


# ---------------------------------------------------------------------------------------------
# training: the regularizer makes the matrices more orthogonal while the task loss still drops


def _ortho_error(model):
    errs = []
    for p in model.parameters():
        if p.dim() == 2:
            W = p.detach().double()
            G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
            errs.append((G - torch.eye(G.shape[0], dtype=G.dtype)).abs().mean().item())
    return float(np.mean(errs))


def train(beta, steps=300, how="loss", seed=0):
    """A 4-layer MLP regressing a random teacher on synthetic data (CPU, one thread: the figures do not
    depend on the machine's load). Returns the task loss and the mean |Gram - I| entry (over the four
    matrices, the smaller Gram each) before and after training."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(512, 32, generator=g)
        teacher = torch.randn(32, 8, generator=g) / 32**0.5
        Y = torch.tanh(X @ teacher * 2)
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(32, 64),
            nn.Tanh(),
            nn.Linear(64, 64),
            nn.Tanh(),
            nn.Linear(64, 64),
            nn.Tanh(),
            nn.Linear(64, 8),
        )
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        reg = OrthoL1(model, beta) if beta else None
        task0 = nn.functional.mse_loss(model(X), Y).item()
        ortho0 = _ortho_error(model)
        for _ in range(steps):
            idx = torch.randint(0, 512, (64,), generator=g)
            task = nn.functional.mse_loss(model(X[idx]), Y[idx])
            opt.zero_grad(set_to_none=True)
            if reg is not None and how == "loss":
                (task + reg.loss()).backward()
            else:
                task.backward()
                if reg is not None:
                    reg.add_grad_()
            opt.step()
        with torch.no_grad():
            task1 = nn.functional.mse_loss(model(X), Y).item()
        return {"task0": task0, "task1": task1, "ortho0": ortho0, "ortho1": _ortho_error(model)}
    finally:
        torch.set_num_threads(threads)


def test_training_run_moves_toward_orthogonality(rng):
    seed = int(rng.integers(2**31))
    plain = train(0.0, seed=seed)
    reg = train(5e-3, seed=seed)
    injected = train(5e-3, how="add_grad_", seed=seed)
    print(f"\nplain {plain}\nregularized {reg}\nadd_grad_ {injected}")
    for r in (plain, reg, injected):
        assert r["task1"] < 0.25 * r["task0"]  # the task is still learned
    assert reg["ortho1"] < 0.6 * reg["ortho0"]  # the matrices moved toward orthogonality
    assert reg["ortho1"] < 0.4 * plain["ortho1"]  # ... and it is the regularizer's doing
    # loss().backward() and add_grad_() give the same update
    assert abs(injected["ortho1"] - reg["ortho1"]) < 0.02 * reg["ortho1"]


# ---------------------------------------------------------------------------------------------
# GPU only (bench/gpu_check.sh)


@pytest.mark.gpu
def test_gpu_side_stream_and_float16(tseed):
    model = nn.Sequential(*[nn.Linear(24, 24) for _ in range(5)], nn.Linear(24, 40)).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())  # the parameters were written on the default stream
    with torch.cuda.stream(s):  # everything on a side stream, no sync in between
        reg = OrthoL1(model, 0.3)
        loss = reg.loss()
        loss.backward()
        assert reg.backend_calls == 4  # two groups, pointer-array GEMMs, no per-tensor fallback
        grads = [t.param.grad.clone() for t in reg.targets]
    torch.cuda.synchronize()
    total = 0.0
    for t, g in zip(reg.targets, grads, strict=True):
        V = t.view(t.param.detach()).cpu().numpy()
        V64 = V.astype(np.float64)
        per = np.abs(np.einsum("mli,mlj->mij", V64, V64) - np.eye(V.shape[2])).sum() * 0.3
        total += per
        check(V, np.float64(per), t.view(g).cpu().numpy(), 0.3, 0, "sum", np.float32)
    np.testing.assert_allclose(loss.item(), total, rtol=2e-5)
    # float16 and bfloat16 on CUDA: grouped like float32 (gemmBatchedEx, 16-bit operands)
    for dt, np_dt in ((torch.float16, np.float16), (torch.bfloat16, ml_dtypes.bfloat16)):
        model.to(dt)
        model.zero_grad(set_to_none=True)
        reg = OrthoL1(model, 0.3)
        loss = reg.loss()
        loss.backward()
        assert reg.backend_calls == 4
        total = 0.0
        for t in reg.targets:
            V = _host_array(t.view(t.param.detach()).cpu())
            V64 = V.astype(np.float64)
            per = np.abs(np.einsum("mli,mlj->mij", V64, V64) - np.eye(V.shape[2])).sum() * 0.3
            total += per
            check(V, np.float64(per), _host_array(t.view(t.param.grad).cpu()), 0.3, 0, "sum", np_dt)
        np.testing.assert_allclose(loss.item(), total, rtol=2e-5)


def test_cupy_device_pointer_call_arguments(tseed):
    """CupyDevice's ?gemmBatched calls, argument by argument, without a GPU: a fake cuBLAS reads
    alpha/beta and the three address arrays from the raw pointers it is given, exactly as cuBLAS would
    (host scalars, device arrays of addresses laid out A, B, C), and executes them over the buffers.
    The device's own gram/grad/_pointers/_scalars code runs; only cuBLAS and the address kernel are
    faked (the emulator runs that kernel under numba's simulator)."""
    import ctypes

    from gpu_orthol1._cupy import CupyDevice
    from gpu_orthol1.testing import emulate_pointer_gemm

    views: dict = {}  # key -> NumPy view, for the fake to resolve addresses

    class FakeCublas:
        calls: typing.ClassVar[list] = []

        def _run(self, scal, handle, ta, tb, m, n, k, alpha_p, A, lda, B, ldb, beta_p, C, ldc, batch):
            alpha = scal.from_address(alpha_p).value
            beta = scal.from_address(beta_p).value
            ptrs = np.array(
                [(ctypes.c_uint64 * batch).from_address(a)[:] for a in (A, B, C)], dtype=np.uint64
            )
            op = _gemm.Operand("?", 0, 0, 0)
            t = _gemm.Gemm(
                ta, tb, m, n, k, alpha, replace_ld(op, lda), replace_ld(op, ldb), beta, replace_ld(op, ldc), 1
            )
            call = _gemm.BatchedGemm(t, (None,) * batch, (None,) * batch, (None,) * batch)
            self.calls.append(batch)
            emulate_pointer_gemm(call, ptrs, dict(views))

        def sgemmBatched(self, *a):
            self._run(ctypes.c_float, *a)

        def dgemmBatched(self, *a):
            self._run(ctypes.c_double, *a)

    def replace_ld(op, ld):
        return _gemm.Operand(op.buf, op.offset, ld, 0)

    def fill(addrs, ptrs):  # the kernel's job: the addresses, row by row, into the workspace's buffer
        addrs[: ptrs.size] = ptrs.ravel()

    cpu = _numpy_dev.NumpyDevice()
    dev = object.__new__(CupyDevice)  # no CuPy here: set what __init__ and bind() would
    dev._cublas, dev._handle, dev._stream_ptr = FakeCublas(), 0, 0
    dev._alpha = {np.float32: np.zeros((), np.float32), np.float64: np.zeros((), np.float64)}
    dev._beta = {np.float32: np.zeros((), np.float32), np.float64: np.zeros((), np.float64)}
    dev._fill_addresses = fill
    dev.sign_abs, dev.sign_parts = cpu.sign_abs, cpu.sign_parts

    for dtype in (torch.float32, torch.float64):
        np_dt = _NPD[dtype]
        for rows in (False, True):  # kind "T" and kind "N" operands
            views.clear()
            Ws = [_t(tseed, (7, 5), dtype) for _ in range(3)]
            outs = [torch.randn(7, 5, dtype=dtype) for _ in range(3)]
            base = [o.clone() for o in outs]
            phis = [(W.T if rows else W).numpy() for W in Ws]
            gouts = [(O.T if rows else O).numpy() for O in outs]
            for j, (V, Vo) in enumerate(zip(phis, gouts, strict=True)):
                views[("p", j)], views[("o", j)] = V, Vo
            lay = _gemm.slice_layout(*phis[0].shape, *(s // phis[0].itemsize for s in phis[0].strides))
            batch = _driver.Pointers(phis, gouts, lay, lay, phis[0].shape[0], phis[0].shape[1])
            sz = _driver.sizes(
                dev,
                3,
                *phis[0].shape,
                np.dtype(np_dt),
                want_grad=True,
                accumulate=True,
                stage_phi=False,
                stage_out=False,
                budget=1 << 20,
                pointers=True,
            )
            wsb = _driver.workspace(np.empty, sz, *phis[0].shape, np.dtype(np_dt))
            assert wsb["addrs"].dtype == np.uint64 and wsb["addrs"].size == 3 * sz.chunk
            with pytest.raises(ValueError, match="pointers=True"):  # a workspace without the address buffer
                _driver.run(
                    dev,
                    batch,
                    {k: v for k, v in wsb.items() if k != "addrs"},
                    sz.chunk,
                    np.zeros(3),
                    alpha=1.0,
                    beta_gemm=1.0,
                    want_grad=True,
                )
            views["ws"], views["sgn"] = wsb["ws"], wsb["sgn"]
            losses = np.zeros(3)
            FakeCublas.calls.clear()
            _driver.run(dev, batch, wsb, sz.chunk, losses, alpha=2 * 0.7, beta_gemm=1.0, want_grad=True)
            assert FakeCublas.calls == [3, 3]
            for j in range(len(Ws)):
                added = outs[j] - base[j]
                check(phis[j], losses[j] * 0.7, (added.T if rows else added).numpy(), 0.7, 1, "sum", np_dt)


_NPD = {torch.float32: np.float32, torch.float64: np.float64}


@pytest.mark.gpu
def test_gpu_ortho_l1_zero_copy_on_current_stream(monkeypatch, tseed):
    import cupy

    seen = []
    real = _plan.Plan._execute

    def spy(self, phi, *a, **k):
        seen.append((phi, cupy.cuda.get_current_stream().ptr))
        return real(self, phi, *a, **k)

    monkeypatch.setattr(_plan.Plan, "_execute", spy)
    w = _t(tseed, (12, 7), torch.float32, "cuda").requires_grad_(True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loss = ortho_l1(w, 0.5, mode="rows")
        loss.backward()
    torch.cuda.synchronize()
    ((phi, stream_ptr),) = seen
    assert isinstance(phi, cupy.ndarray) and phi.data.ptr == w.data_ptr()  # DLPack view, no copy
    assert stream_ptr == s.cuda_stream  # CuPy ran on torch's current stream
    check(w.detach().cpu().numpy().T, loss.item(), w.grad.cpu().numpy().T, 0.5, 1, "sum", np.float32)


# ---------------------------------------------------------------------------------------------
# what a new user hit (issue 11) and torch.compile


def test_orthol1_single_tensor_and_empty_selection(tseed):
    lin = nn.Linear(6, 4).double()
    reg = OrthoL1(lin.weight, 0.5, mode="rows")
    assert len(reg.targets) == 1
    W = lin.weight.detach()
    want = 0.5 * (W @ W.T - torch.eye(4, dtype=W.dtype)).abs().sum()
    torch.testing.assert_close(reg.loss(), want, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="no matrices were selected"):
        OrthoL1([nn.Parameter(torch.randn(5))])
    with pytest.raises(ValueError, match="no matrices were selected"):
        OrthoL1(lin, exclude="*")
    empty = OrthoL1(lin, exclude="*", allow_empty=True)
    assert empty.loss().item() == 0.0 and empty.add_grad_().item() == 0.0


def test_orthol1_skips_weights_switched_off_after_building(tseed):
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5)).double()
    reg = OrthoL1(model, 0.3)
    model[0].weight.requires_grad_(False)
    assert model[0].weight.grad is None
    reg.add_grad_()
    assert model[0].weight.grad is None and model[1].weight.grad is not None
    before = model[0].weight.detach().clone()
    reg.step_(0.1)
    torch.testing.assert_close(model[0].weight.detach(), before, rtol=0, atol=0)
    model.zero_grad(set_to_none=True)
    loss = reg.loss()
    loss.backward()
    assert model[0].weight.grad is None
    W = model[1].weight.detach()
    torch.testing.assert_close(
        loss, 0.3 * (W.T @ W - torch.eye(5, dtype=W.dtype)).abs().sum(), rtol=1e-13, atol=0
    )


def test_orthol1_3d_rule_does_not_depend_on_how_params_are_passed(tseed):
    model = nn.Sequential(nn.Conv1d(3, 4, 5), nn.ReLU(), nn.Conv1d(4, 2, 3))
    by_module = OrthoL1(model, 1.0).loss().item()
    with pytest.warns(UserWarning, match=r"3-D parameters \['0\.weight', '2\.weight'\].*three_d='flatten'"):
        reg = OrthoL1(model.named_parameters(), 1.0)
    assert reg.loss().item() != pytest.approx(by_module)  # "auto" without the module: stacks, as warned
    assert OrthoL1(model.named_parameters(), 1.0, three_d="flatten").loss().item() == pytest.approx(by_module)
    assert OrthoL1(model.parameters(), 1.0, three_d="flatten").loss().item() == pytest.approx(by_module)
    with pytest.raises(ValueError, match="three_d must be one of"):
        OrthoL1(model, three_d="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthol1_one_dtype_rule(dtype, tseed):
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)).to(dtype)
    reg = OrthoL1(model, 0.2)
    assert reg.loss().dtype == reg.add_grad_().dtype == reg.step_(0.01).dtype == dtype


@pytest.mark.long
def test_ortho_l1_compiles_without_graph_break(tseed):
    w = _t(tseed, (9, 6), torch.float64).requires_grad_(True)

    def f(x):
        return ortho_l1(x, 0.4, mode="rows") * 2.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(w)
    out.backward()
    g = w.grad.clone()
    w.grad = None
    ref = f(w)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=0)
    torch.testing.assert_close(g, w.grad, rtol=1e-14, atol=0)
    ref_naive = 2.0 * naive_loss(w.detach(), 0.4, mode="rows")
    torch.testing.assert_close(out.detach(), ref_naive, rtol=1e-12, atol=0)
    with torch.no_grad():  # the no-grad variant traces too (no gradient formed)
        torch.testing.assert_close(compiled(w), ref.detach(), rtol=1e-14, atol=0)
    torch.library.opcheck(torch.ops.gpu_orthol1.ortho_l1.default, (w, 0.4, "sum", "matrix", 0, True, True))


@pytest.mark.long
def test_orthol1_loss_compiles_without_graph_break(tseed):
    """OrthoL1.loss() inside torch.compile(fullgraph=True): one custom op, the same loss and gradients
    as eager (float64: to the last bits the same computation gives), no gradient under no_grad, a
    parameter switched off (requires_grad=False) left out after the recompile."""
    from torch import nn

    model = nn.Sequential(nn.Linear(6, 8), nn.Conv2d(2, 3, 2), nn.Linear(8, 5)).double()  # seeded by tseed
    reg = OrthoL1(model, 0.3)
    x = torch.randn(4, 6, dtype=torch.float64)

    def f(x):
        return model[0](x).sum() + reg.loss()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.backward()
    got = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ref = f(x)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=0)
    for g, p in zip(got, model.parameters(), strict=True):
        assert (g is None) == (p.grad is None)
        if g is not None:
            torch.testing.assert_close(g, p.grad, rtol=1e-13, atol=1e-15)
    assert all(t.param.grad is not None for t in reg.targets)
    want = naive_model_loss([(t.param.detach(), t.how == "flatten") for t in reg.targets], 0.3)
    torch.testing.assert_close(out.detach() - model[0](x).sum().detach(), want, rtol=1e-12, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref.detach(), rtol=1e-14, atol=0)
    model[2].weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    out = compiled(x)
    out.backward()
    assert model[2].weight.grad is None and model[0].weight.grad is not None
    want = naive_model_loss(
        [(t.param.detach(), t.how == "flatten") for t in reg.targets if t.param.requires_grad], 0.3
    )
    torch.testing.assert_close(out.detach() - model[0](x).sum().detach(), want, rtol=1e-12, atol=0)
    params = [t.param for t in reg.targets if t.param.requires_grad]
    active = [j for j, t in enumerate(reg.targets) if t.param.requires_grad]
    torch.library.opcheck(torch.ops.gpu_orthol1.orthol1_loss.default, (params, reg._op_key, active, True))
    # a compiled function that changes a weight before loss(): the loss is of the new values
    model[2].weight.requires_grad_(True)

    def g(x):
        with torch.no_grad():
            model[0].weight.mul_(0.5)
        return reg.loss()

    w0 = model[0].weight.detach().clone()
    got = torch.compile(g, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(model[0].weight.detach(), 0.5 * w0, rtol=0, atol=0)
    torch.testing.assert_close(got.detach(), reg.loss().detach(), rtol=1e-13, atol=0)
    # the loss dtype follows every target, active or not: float32 once one of them is float32
    model[2].float()
    reg2 = OrthoL1(model, 0.3)
    model[2].weight.requires_grad_(False)
    c2 = torch.compile(reg2.loss, backend="aot_eager", fullgraph=True)
    assert c2().dtype == reg2.loss().dtype == torch.float32


def test_orthol1_op_finds_its_regularizer_while_it_lives():
    import gc

    from torch import nn

    from gpu_orthol1.torch import _ops

    reg = OrthoL1(nn.Linear(4, 4), 0.1)
    key = reg._op_key
    assert _ops._registry[key]() is reg and OrthoL1(nn.Linear(3, 3))._op_key != key
    del reg
    gc.collect()
    assert key not in _ops._registry
    with pytest.raises(RuntimeError, match="no longer exists"):
        torch.ops.gpu_orthol1.orthol1_loss([torch.zeros(4, 4)], key, [0], False)


def test_orthol1_views_follow_the_parameters_memory(tseed):
    """OrthoL1 keeps each parameter's slice view between calls: in-place updates show through it,
    `param.data = ...` (new memory) and a new layout make a new one, and a .grad whose strides
    differ from the parameter's is added through a temporary in the parameter's layout (its
    flattened columns would come in another order: a wrong gradient before this test); every result
    against the naive loop."""
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Linear(6, 7)).double()
    conv, lin = model[0].weight, model[1].weight
    reg = OrthoL1(model, 0.3)

    def expect():
        return naive_model_loss([(conv.detach(), True), (lin.detach(), False)], 0.3)

    torch.testing.assert_close(reg.loss().detach(), expect())
    first = [t.param_view()[0] for t in reg.targets]
    assert all(a is t.param_view()[0] for a, t in zip(first, reg.targets, strict=True))  # kept, not remade
    with torch.no_grad():
        lin.mul_(1.7)  # in place: the kept view sees it
    torch.testing.assert_close(reg.loss().detach(), expect())
    assert reg.targets[1].param_view()[0] is first[1]
    lin.data = torch.randn(7, 6, dtype=torch.float64)  # new memory: a new view
    torch.testing.assert_close(reg.loss().detach(), expect())
    assert reg.targets[1].param_view()[0] is not first[1]
    conv.data = conv.data.to(memory_format=torch.channels_last)  # new strides: a new view
    torch.testing.assert_close(reg.loss().detach(), expect())
    # a .grad laid out unlike the parameter (contiguous grad, channels_last weight): the general view
    model.zero_grad(set_to_none=True)
    conv.grad = torch.zeros(conv.shape, dtype=torch.float64)
    assert conv.grad.stride() != conv.stride()
    with pytest.warns(ol1.CopyWarning, match="'0.weight' has a .grad laid out unlike the parameter"):
        reg.add_grad_()
    got = [conv.grad.clone(), lin.grad.clone()]
    model.zero_grad(set_to_none=True)
    naive_model_loss([(conv, True), (lin, False)], 0.3).backward()
    torch.testing.assert_close(got[0], conv.grad)
    torch.testing.assert_close(got[1], lin.grad)


@pytest.mark.parametrize("shape", [(5, 4), (3, 5, 4), (6, 2, 3)])
def test_host_slices_are_the_torch_slices(shape):
    """`_host_slices` (NumPy views, the eager CPU path) gives the same (m, l, n) view as `_slices`."""
    from gpu_orthol1.torch._bridge import _host_slices, _slices

    src = torch.randn(*shape[::-1], dtype=torch.float64).permute(*range(len(shape) - 1, -1, -1))  # strided
    a = src.numpy()
    hows = [("matrix", 0)] if len(shape) == 2 else [("stack", ax) for ax in range(3)]
    for how, ax in hows:
        for tr in (False, True):
            want = _slices(src, how, ax, tr).numpy()
            got = _host_slices(a, how, ax, tr)
            assert got.shape == want.shape
            # the same memory layout (a size-1 dim's stride is never used)
            assert [st for st, d in zip(got.strides, got.shape, strict=True) if d > 1] == [
                st for st, d in zip(want.strides, want.shape, strict=True) if d > 1
            ]
            np.testing.assert_array_equal(got, want)


@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")  # some axes' slices: copied, as documented
def test_ortho_l1_keyword_memo_keeps_every_check():
    """ortho_l1 remembers the keyword sets it has checked; a bad value still raises after a good one
    that hashes alike, and "auto" still picks the smaller Gram per shape."""
    from gpu_orthol1.torch import functional

    w = torch.randn(3, 4, 5, dtype=torch.float64)
    ortho_l1(w, 0.1, axis=1, mode="rows", diagonal=True)
    with pytest.raises(ValueError, match="axis must be an integer"):
        ortho_l1(w, 0.1, axis=True, mode="rows", diagonal=True)
    with pytest.raises(ValueError, match="axis must be an integer"):
        ortho_l1(w, 0.1, axis=1.0, mode="rows", diagonal=True)
    with pytest.raises(ValueError, match="diagonal"):
        ortho_l1(w, 0.1, axis=1, mode="rows", diagonal=1)
    with pytest.raises(ValueError, match="mode must be"):
        ortho_l1(w, 0.1, axis=1, mode=["rows"])  # unhashable: checked, not remembered
    for shape in ((4, 7), (7, 4)):  # one keyword set, two shapes: "auto" takes each one's smaller Gram
        x = torch.randn(*shape, dtype=torch.float64)
        small = x @ x.T if shape[0] < shape[1] else x.T @ x
        want = 0.2 * (small - torch.eye(min(shape), dtype=torch.float64)).abs().sum()
        torch.testing.assert_close(ortho_l1(x, 0.2, mode="auto"), want)
    functional._SPECS.clear()
    for ax in range(3):
        for mode in (None, "rows", "columns", "auto"):
            ortho_l1(w, 0.1, axis=ax, mode=mode)
    assert 0 < len(functional._SPECS) <= functional._SPECS_MAX
