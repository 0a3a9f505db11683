"""Double backward (create_graph=True) through ortho_l1, the presets and OrthoL1.loss() (issue 26, item 1).

The first-order backward hands out the gradient formed in the forward pass; with create_graph=True
the gradient must itself be differentiable, with the right derivative: gradgradcheck in float64 on
inputs whose E = G - I entries are far from 0 (the L1 sign does not flip under the finite
differences), every penalty variant, reduction, 2-D mode and 3-D stacking axis; and the issue's own
example against autograd of the naive expression. Compiled graphs refuse a double backward (torch's
own error), never returning a wrong number.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gpu_orthol1.torch import OrthoL1, biggan_ortho, keras_orthogonal, ortho_l1  # noqa: E402

from .test_penalties import VARIANTS, _vid, naive_slices  # noqa: E402

REDUCTIONS = ("sum", "mean", "none")
# (shape, axis, mode): 2-D in every mode, 3-D stacked along each axis
LAYOUTS = [
    ((3, 4), 1, None),
    ((3, 4), 1, "rows"),
    ((4, 3), 1, "auto"),
    ((2, 3, 4), 0, "rows"),
    ((3, 2, 4), 1, "columns"),
    ((4, 3, 2), 2, "auto"),
]
# some of these layouts are staged through a copy (the core says so); not what is tested here
pytestmark = pytest.mark.filterwarnings("ignore::gpu_orthol1._driver.CopyWarning")


@pytest.fixture
def tseed(rng):
    torch.manual_seed(int(rng.integers(2**31)))
    return rng


def _slices(x, axis, mode):
    v = x.unsqueeze(0) if x.dim() == 2 else x.movedim(axis, 0)
    rows = mode == "rows" or (mode == "auto" and v.shape[1] < v.shape[2])
    return v.transpose(1, 2) if rows else v


def _e_far_from_zero(v, variant, margin):
    """Whether every entry of E that the penalty reads is at least `margin` away from 0."""
    v = v.detach()
    n = v.shape[2]
    eye = torch.eye(n, dtype=v.dtype)
    if variant["normalize"]:
        u = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
        e = (u.transpose(1, 2) @ u)[:, ~eye.bool()]  # the diagonal is exactly 0 in E
    else:
        e = v.transpose(1, 2) @ v - eye
        if not variant["diagonal"]:
            e = e[:, ~eye.bool()]
    return bool((e.abs() > margin).all()) if e.numel() else True


def stable_input(rng, shape, variant, axis=1, mode=None, margin=0.05):
    """A fresh float64 weight whose E entries sit at least `margin` from 0, so that sign(E) is the
    same at every point the finite differences visit."""
    for _ in range(1000):
        w = torch.from_numpy(rng.standard_normal(shape) * 0.9).requires_grad_(True)
        if _e_far_from_zero(_slices(w, axis, mode), variant, margin):
            return w
    raise AssertionError("no input with E away from 0 drawn")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
def test_ortho_l1_gradgradcheck(variant, reduction, tseed):
    for shape, axis, mode in LAYOUTS:
        w = stable_input(tseed, shape, variant, axis, mode)

        def f(x, axis=axis, mode=mode):
            return ortho_l1(x, 0.7, axis=axis, reduction=reduction, mode=mode, **variant)

        assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-7)
        assert torch.autograd.gradgradcheck(f, (w,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
def test_second_order_matches_naive_autograd(variant, tseed):
    """The issue's example, for every variant and 2-D/3-D: g = d(loss + sum w^3)/dw with create_graph,
    then d(sum g^2)/dw, against plain autograd of the naive expression."""
    beta = 0.1
    for shape, axis, mode in LAYOUTS:
        w0 = stable_input(tseed, shape, variant, axis, mode).detach()

        def second(loss_fn, w0=w0):
            w = w0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_fn(w) + (w**3).sum(), w, create_graph=True)
            (g**2).sum().backward()
            return g.detach(), w.grad

        g_got, got = second(
            lambda x, axis=axis, mode=mode: ortho_l1(x, beta, axis=axis, mode=mode, **variant)
        )
        g_want, want = second(
            lambda x, axis=axis, mode=mode: naive_slices(_slices(x, axis, mode), beta, **variant).sum()
        )
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_issue_example_exact():
    """The issue's numbers' setting: w float64 (2, 2), beta 0.1; ortho_l1 and OrthoL1.loss()."""
    rng = np.random.default_rng(26)
    while True:  # E = W^T W - I away from 0
        w0 = torch.from_numpy(rng.standard_normal((2, 2)))
        if ((w0.T @ w0 - torch.eye(2, dtype=torch.float64)).abs() > 0.05).all():
            break

    def second(loss_fn, w):
        (g,) = torch.autograd.grad(loss_fn(w) + (w**3).sum(), w, create_graph=True)
        (g**2).sum().backward()
        return w.grad

    want = second(
        lambda x: 0.1 * (x.T @ x - torch.eye(2, dtype=x.dtype)).abs().sum(), w0.clone().requires_grad_(True)
    )
    got = second(lambda x: ortho_l1(x, 0.1), w0.clone().requires_grad_(True))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    p = torch.nn.Parameter(w0.clone())
    reg = OrthoL1([("w", p)], 0.1, "columns")
    torch.testing.assert_close(second(lambda x: reg.loss(), p), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
def test_orthol1_loss_gradgradcheck(variant, tseed):
    """OrthoL1.loss() over a Linear, a Conv2d (flattened) and a 3-D stack; the eager path and the
    custom op that torch.compile uses (called eagerly here)."""
    shapes = [((3, 5), "matrix"), ((3, 2, 2, 1), "conv"), ((2, 3, 4), "stack")]
    for _ in range(1000):
        ps = [torch.nn.Parameter(torch.from_numpy(tseed.standard_normal(s) * 0.9)) for s, _ in shapes]
        views = [ps[0].T.unsqueeze(0), ps[1].reshape(3, -1).T.unsqueeze(0), _slices(ps[2], 1, "rows")]
        if all(_e_far_from_zero(v, variant, 0.05) for v in views):  # mode "rows" below
            break
    reg = OrthoL1([("a", ps[0]), ("b", ps[1]), ("c", ps[2])], 0.3, "rows", three_d="stack", **variant)
    assert [t.how for t in reg.targets] == ["matrix", "flatten", "stack"]

    def eager(*_):  # the parameters are the inputs: gradcheck perturbs them in place
        return reg.loss()

    def op(*params):
        return torch.ops.gpu_orthol1.orthol1_loss(list(params), reg._op_key, [0, 1, 2], True)[0]

    naive = sum(naive_slices(v, 0.3, **variant).sum() for v in views)
    torch.testing.assert_close(reg.loss(), naive.detach(), rtol=1e-12, atol=0)
    for f in (eager, op):
        assert torch.autograd.gradcheck(f, tuple(ps), eps=1e-6, atol=1e-7)
        assert torch.autograd.gradgradcheck(f, tuple(ps), eps=1e-6, atol=1e-7)


def test_presets_gradgradcheck(tseed):
    """keras_orthogonal, biggan_ortho, OrthoL1.keras and OrthoL1.biggan: differentiable backward."""
    keras_v = dict(penalty="l1", diagonal=False, normalize=True)
    for mode in ("rows", "columns"):
        w = stable_input(tseed, (4, 3), keras_v, 1, mode)
        assert torch.autograd.gradgradcheck(
            lambda x, mode=mode: keras_orthogonal(x, 0.5, mode), (w,), eps=1e-6, atol=1e-7
        )
    for shape in ((3, 5), (3, 2, 2)):
        w = torch.from_numpy(tseed.standard_normal(shape)).requires_grad_(True)
        assert torch.autograd.gradgradcheck(lambda x: biggan_ortho(x, 0.3), (w,), eps=1e-6, atol=1e-7)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 4)).double()
    for _ in range(1000):
        for p in model.parameters():
            p.data.copy_(torch.from_numpy(tseed.standard_normal(p.shape)))
        if all(_e_far_from_zero(m.weight.T.unsqueeze(0), keras_v, 0.05) for m in model):
            break
    params = tuple(m.weight for m in model)
    for reg in (OrthoL1.keras(model, 0.5, "rows"), OrthoL1.biggan(model, 0.3)):
        assert torch.autograd.gradgradcheck(lambda *_, reg=reg: reg.loss(), params, eps=1e-6, atol=1e-7)


@pytest.mark.long
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_create_graph_gradient_equals_first_order(dtype, tseed):
    """The gradient formed by the double-backward path equals the forward pass's (16/32-bit weights
    are computed in float32 on both)."""
    w = torch.from_numpy(tseed.standard_normal((6, 5, 4))).to(dtype).requires_grad_(True)
    for kw in (dict(), dict(penalty="l2", normalize=True, mode="rows")):
        (g1,) = torch.autograd.grad(ortho_l1(w, 0.2, axis=1, **kw), w)
        (g2,) = torch.autograd.grad(ortho_l1(w, 0.2, axis=1, **kw), w, create_graph=True)
        assert g2.requires_grad and g2.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(g2.detach(), g1, rtol=tol, atol=tol * float(g1.abs().max()))


@pytest.mark.long
def test_compiled_double_backward_raises(tseed):
    """torch.compile (aot_eager) refuses a double backward with its own error: no wrong number."""
    w = torch.from_numpy(tseed.standard_normal((4, 3))).requires_grad_(True)
    model = torch.nn.Linear(3, 4).double()
    reg = OrthoL1(model, 0.1)
    for f, x in (
        (torch.compile(lambda x: ortho_l1(x, 0.1), backend="aot_eager", fullgraph=True), w),
        (torch.compile(lambda x: reg.loss(), backend="aot_eager", fullgraph=True), model.weight),
    ):
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            (g**2).sum().backward()


def test_first_order_unchanged_and_no_graph_kept(tseed):
    """Without create_graph the gradient is the forward pass's, a constant (no graph), as before."""
    w = torch.from_numpy(tseed.standard_normal((5, 3, 4))).requires_grad_(True)
    for reduction, axis in itertools.product(REDUCTIONS, (0, 1, 2)):
        loss = ortho_l1(w, 0.4, axis=axis, reduction=reduction)
        go = torch.rand_like(loss)
        (g,) = torch.autograd.grad(loss, w, go)
        assert not g.requires_grad
        v = _slices(w, axis, None)
        per = naive_slices(v, 0.4, "l1", True, False)
        ref = per if reduction == "none" else per.sum() / (per.shape[0] if reduction == "mean" else 1)
        (gref,) = torch.autograd.grad(ref, w, go)
        torch.testing.assert_close(g, gref, rtol=1e-10, atol=1e-12)
