"""The penalty family (penalty="l1"|"l2", diagonal=, normalize=; docs/penalties.md) on every path.

Each variant is checked against torch autograd of the naive float64 expression (the Gram of the
slices, or of their unit-normalized columns, minus I, masked, |.| or squared, summed) on the CPU
backend and on the emulated GPU backend (the CUDA pass under numba's simulator, cuBLAS argument
sets over NumPy buffers), through the core API and through gpu_orthol1.torch; the Keras and BigGAN
presets against the formulas those projects use.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings

import numpy as np
import pytest

import gpu_orthol1 as ol1
from gpu_orthol1 import _penalty, _plan

from .helpers import make
from .reference import random_phi

torch = pytest.importorskip("torch")

VARIANTS = [
    dict(penalty=p, diagonal=d, normalize=z)
    for p, d, z in itertools.product(("l1", "l2"), (True, False), (False, True))
]
NON_DEFAULT = [v for v in VARIANTS if _penalty.check(**v) != _penalty.DEFAULT]
KINDS = [
    "numpy",
    pytest.param("emulated", marks=pytest.mark.cudasim),
    pytest.param("cupy", marks=pytest.mark.gpu),
]
DTYPES = (np.float16, np.float32, np.float64)
# error per precision class, relative to the bounds built in `expected` (see there)
RTOL = {np.float16: 2e-3, np.float32: 5e-5, np.float64: 1e-12}
SIGN_RTOL = {np.float16: 1e-5, np.float32: 1e-5, np.float64: 1e-13}


def _vid(v):
    return f"{v['penalty']}-{'diag' if v['diagonal'] else 'offdiag'}{'-norm' if v['normalize'] else ''}"


@pytest.fixture
def tseed(rng):
    torch.manual_seed(int(rng.integers(2**31)))
    return rng


# ---------------------------------------------------------------------------------------------
# the naive expression (torch autograd, float64) and the error bounds of a float computation of it


def naive_slices(v, beta, penalty, diagonal, normalize):
    """Per-slice losses of (m, l, n) slices v (a float64 tensor), the Gram of their columns."""
    if normalize:
        # a zero column stays zero (clamp) and, through clamp_min, gets a zero gradient
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-300)
    G = v.transpose(1, 2) @ v
    eye = torch.eye(G.shape[-1], dtype=G.dtype)
    E = G - eye
    if not diagonal:
        E = E * (1 - eye)
    return beta * (E.abs() if penalty == "l1" else E * E).sum(dim=(1, 2))


def to_slices(x, axis):
    """(m, l, n) view of a torch tensor laid out like the core's phi."""
    return x[:, None, :].movedim(1, 0) if x.dim() == 2 else x.movedim(axis, 0)


def expected(phi, beta, axis, variant, scale=1.0):
    """Autograd's per-slice losses and gradient (of their sum, times scale) for phi (any float
    array, read as float64), plus what `check` needs: the bounds the rounding of a float
    computation stays within and the gradient columns whose sign is ambiguous (l1)."""
    penalty, diagonal, normalize = variant["penalty"], variant["diagonal"], variant["normalize"]
    x = torch.tensor(np.asarray(phi, dtype=np.float64), requires_grad=True)
    per = naive_slices(to_slices(x, axis), beta, penalty, diagonal, normalize)
    (per.sum() * scale).backward()
    grad = x.grad.numpy()
    P = to_slices(torch.tensor(np.asarray(phi, dtype=np.float64)), axis).numpy()  # (m, l, n)
    m, l, n = P.shape
    eye = np.eye(n)
    G = np.matmul(P.transpose(0, 2, 1), P)
    A = np.abs(P)
    mag = np.matmul(A.transpose(0, 2, 1), A)  # the scale of the rounding in G, entry by entry
    d = np.einsum("mjj->mj", G)
    if normalize:
        r = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0.0)
    else:
        r = np.ones_like(d)
    rr = r[:, :, None] * r[:, None, :]
    Gh, maghat = G * rr, mag * rr + eye
    if normalize:
        E = Gh * (1 - eye) - eye * (r == 0)[:, None, :]  # diagonal exactly 0, -1 for a zero column
    else:
        E = G - eye
    if not diagonal:
        E = E * (1 - eye)
    if penalty == "l1":
        F, K = np.sign(E), 0.0
        lmag = maghat
    else:
        F, K = 2 * E, 2 * maghat
        lmag = maghat * (2 * np.abs(E) + maghat)
    # bound B >= |M| plus the first-order effect of rounding G (relative units), entry by entry
    B = rr * (np.abs(F) + K) * (1 - eye)
    if normalize:
        cbound = (maghat * np.abs(F) + np.abs(Gh) * K).sum(axis=2) + np.abs((Gh * F).sum(axis=2))
        B = B + eye * (r * r * cbound)[:, :, None]
    else:
        B = B + eye * (np.abs(F) + K)
    bound = 2 * abs(beta) * scale * np.matmul(A, B)  # (m, l, n)
    with np.errstate(invalid="ignore"):
        amb = (
            (np.abs(E) <= SIGN_RTOL[np.float64] * maghat) & (E != 0)
            if penalty == "l1"
            else np.zeros_like(E, bool)
        )
    return dict(
        per=per.detach().numpy(),
        grad=grad,
        bound=bound,
        lmag=abs(beta) * lmag.sum(axis=(1, 2)),
        E=E,
        maghat=maghat,
        penalty=penalty,
        axis=axis,
        squeeze=np.ndim(phi) == 2,
        amb=amb,
    )


def from_slices(a, ref):
    """(m, l, n) array back to phi's layout."""
    if ref["squeeze"]:
        return a[0]
    return np.moveaxis(a, 0, ref["axis"])


def check(ref, loss, grad, dtype, reduction="sum", min_compared=0.5):
    dtype = np.dtype(dtype).type
    per = ref["per"]
    m = len(per)
    sc = 1.0 / m if reduction == "mean" and m else 1.0
    want = per if reduction == "none" else np.array(per.sum() * sc)
    lmag = ref["lmag"] if reduction == "none" else np.array(ref["lmag"].sum() * sc)
    loss = np.asarray(loss, dtype=np.float64)
    assert loss.shape == want.shape
    assert np.all(np.abs(loss - want) <= RTOL[dtype] * (np.abs(want) + lmag)), f"loss {loss} vs {want}"
    # l1: columns with an entry within rounding of the kink are not compared (sign ambiguity)
    amb = ref["amb"]
    if ref["penalty"] == "l1":
        amb = (np.abs(ref["E"]) <= SIGN_RTOL[dtype] * ref["maghat"]) & (ref["E"] != 0)
    skip = from_slices(np.broadcast_to(amb.any(axis=1)[:, None, :], ref["bound"].shape), ref)
    got = np.asarray(grad, dtype=np.float64)
    tol = RTOL[dtype] * sc * from_slices(ref["bound"], ref) + np.finfo(dtype).tiny
    err = np.abs(got - ref["grad"] * sc)
    ok = (err <= tol) | skip
    assert ok.all(), f"gradient off by {np.max(np.where(skip, 0, err - tol))} beyond tolerance"
    compared = 1 - skip.mean() if skip.size else 1.0
    assert compared >= min_compared, "too few gradient entries away from the sign kink"


def run(kind, phi, beta, **kw):
    """(loss, grad) as NumPy arrays from the CPU backend, the emulated GPU backend or the real GPU
    ("cupy", on a CuPy copy of phi), with the family keywords."""
    if kind == "cupy":
        import cupy

        loss, grad = ol1.loss_and_grad(cupy.asarray(phi), beta, backend="cupy", **kw)
        return loss.get(), grad.get()
    if kind == "emulated":
        from gpu_orthol1.testing import EmulatedGpuDevice

        kw.setdefault("axis", 1)
        p = _plan.Plan(phi, beta, backend="numpy", _device=EmulatedGpuDevice(), **kw)
        return p(phi)
    return ol1.loss_and_grad(phi, beta, backend="numpy", **kw)


# ---------------------------------------------------------------------------------------------
# the core API


@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")  # axis=2 of a C-contiguous array is staged
@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
@pytest.mark.parametrize(
    "shape,axis",
    [((7, 5, 3), 1), ((3, 4, 9), 1), ((11, 6, 5), 0), ((4, 5, 7), 2), ((9, 4), None), ((2, 5), None)],
    ids=lambda c: str(c),
)
def test_float64_matches_autograd(variant, shape, axis, rng):
    """Every combination, l < n and l > n, odd n, every axis, 2-D: tight float64 agreement."""
    ax = 1 if axis is None else axis
    phi = make(np, rng, shape, np.float64, "C", ax)
    beta = float(rng.uniform(0.2, 2.0))
    ref = expected(phi, beta, ax, variant)
    for reduction in ("sum", "mean", "none"):
        loss, grad = ol1.loss_and_grad(phi, beta, axis=ax, reduction=reduction, **variant)
        check(ref, loss, grad, np.float64, reduction)
    np.testing.assert_array_equal(
        ol1.loss(phi, beta, axis=ax, **variant), ol1.loss_and_grad(phi, beta, axis=ax, **variant)[0]
    )  # loss-only pass gives the same bits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("variant", NON_DEFAULT, ids=_vid)
def test_dtypes_layouts_backends(kind, dtype, variant, rng):
    """Each dtype on each backend, a readable and a staged layout, n above the emulator's 8 threads
    (so a thread owns several columns of the normalized pass)."""
    for shape, axis, layout in (((6, 3, 11), 1, "C"), ((5, 4, 3), 0, "every2")):
        phi = make(np, rng, shape, dtype, layout, axis)
        beta = float(rng.uniform(0.2, 2.0))
        reduction = str(rng.choice(["sum", "mean", "none"]))
        ref = expected(phi, beta, axis, variant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ol1.CopyWarning)
            loss, grad = run(kind, phi, beta, axis=axis, reduction=reduction, **variant)
        assert grad.dtype == phi.dtype and grad.shape == phi.shape
        assert loss.dtype == (np.float64 if dtype == np.float64 else np.float32)
        check(ref, loss, grad, dtype, reduction, min_compared=0.3)


@pytest.mark.parametrize("variant", NON_DEFAULT, ids=_vid)
def test_out_accumulate_chunks_threads(variant, rng):
    """accumulate=True adds the same gradient; a 1-slice workspace gives the result of one chunk;
    the CPU's thread split gives the bits of one thread; repeated calls give the same bits."""
    phi = random_phi(rng, (16, 40, 8), np.float32)
    loss, grad = ol1.loss_and_grad(phi, 0.3, **variant)
    out = random_phi(rng, phi.shape, np.float32)
    base = out.copy()
    ol1.grad(phi, 0.3, out=out, accumulate=True, **variant)
    np.testing.assert_allclose(out, base + grad, rtol=1e-6, atol=1e-6)
    l1, g1 = ol1.loss_and_grad(phi, 0.3, workspace_bytes=8 * 8 * 4, **variant)
    np.testing.assert_allclose(l1, loss, rtol=1e-6)
    np.testing.assert_allclose(g1, grad, rtol=1e-5, atol=1e-7)
    big = random_phi(rng, (16, 4096, 8), np.float32)  # enough flops for the thread split
    p = ol1.plan(big, 0.3, **variant)
    one = ol1.plan(big, 0.3, **variant)
    one._threads = 1
    a, b = p(big), one(big)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(p(big)[1], a[1])


def test_cache_keeps_variants_apart(rng):
    phi = random_phi(rng, (6, 3, 4), np.float64)
    vals = {_vid(v): float(ol1.loss(phi, **v)) for v in VARIANTS}
    assert len(set(vals.values())) >= 6  # normalize makes the diagonal flag moot, except zero columns
    for v in VARIANTS:
        assert float(ol1.loss(phi, **v)) == vals[_vid(v)]
    p = ol1.plan(phi, penalty="l2", diagonal=False)
    assert p.variant == _penalty.Variant("l2", False, False)
    np.testing.assert_array_equal(p(phi)[0], ol1.loss(phi, penalty="l2", diagonal=False))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy and the simulator meet the NaN/Inf too
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", NON_DEFAULT, ids=_vid)
def test_nonfinite_gives_nan_in_that_slice_only(kind, variant, rng):
    phi = random_phi(rng, (6, 5, 4), np.float64)
    h = phi.copy()
    h[2, 1, 3] = np.nan
    h[0, 3, 0] = np.inf  # on the diagonal of slice 3 (and, with it, its column 0)
    loss, grad = run(kind, h, 0.7, reduction="none", **variant)
    bad = [1, 3]
    assert np.isnan(loss[bad]).all() and np.isfinite(np.delete(loss, bad)).all()
    assert np.isnan(grad[:, bad, :]).all()
    good = np.delete(h, bad, axis=1)
    lg, gg = run(kind, good, 0.7, reduction="none", **variant)
    # the other slices: exactly as without the bad ones (cuBLAS may pick another algorithm for
    # another batch count, so on a card: to rounding)
    same = (
        np.testing.assert_array_equal
        if kind != "cupy"
        else lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    )
    same(np.delete(loss, bad), lg)
    same(np.delete(grad, bad, axis=1), gg)
    assert np.isnan(run(kind, h, 0.7, **variant)[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v["normalize"]], ids=_vid)
def test_zero_columns_when_normalizing(kind, dtype, variant, rng):
    """A zero column: its normalized entries are 0, its gradient is 0, nothing NaN; the loss counts
    its diagonal |0 - 1| = 1 unless the diagonal is free; the other columns are as without it."""
    phi = random_phi(rng, (7, 4, 5), dtype)
    phi[:, 1, 2] = 0
    phi[:, 3, [0, 4]] = 0
    phi[:, 0, :] = 0  # a whole slice of zeros
    loss, grad = run(kind, phi, 0.6, reduction="none", **variant)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    assert (grad[:, 1, 2] == 0).all() and (grad[:, 3, [0, 4]] == 0).all() and (grad[:, 0, :] == 0).all()
    np.testing.assert_allclose(loss[0], 0.6 * 5 if variant["diagonal"] else 0.0, rtol=1e-7)
    ref = expected(phi, 0.6, 1, variant)
    assert np.isfinite(ref["grad"]).all()
    check(ref, loss, grad, dtype, "none", min_compared=0.3)
    # the other columns of slice 1 are those of the slice without its zero column (plus 1 in the loss)
    sub = np.delete(phi[:, 1:2, :], 2, axis=2)
    l_sub, g_sub = run(kind, sub, 0.6, reduction="none", **variant)
    np.testing.assert_allclose(loss[1], l_sub[0] + (0.6 if variant["diagonal"] else 0.0), rtol=1e-6)
    np.testing.assert_allclose(np.delete(grad[:, 1:2, :], 2, axis=2), g_sub, rtol=1e-5, atol=1e-7)


@pytest.mark.cudasim
@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
def test_cuda_pass_matches_cpu_pass(variant, rng):
    """The CUDA kernel itself (simulator) against the CPU pass: in place and into a separate float16
    S (the GPU's float16 path), several columns per thread, loss-only launches write nothing."""
    from gpu_orthol1.kernels import sign_abs, sign_abs_cpu

    l2, offdiag, normalize = _penalty.check(**variant).flags()
    n, m = 9, 3
    P = random_phi(rng, (m, 6, n), np.float64)
    P[1, :, 4] = 0
    G = np.matmul(P.transpose(0, 2, 1), P).astype(np.float32).reshape(m, n * n)
    want, lw = G.copy(), np.zeros(m)
    if variant == VARIANTS[0]:
        sign_abs_cpu.sign_abs_sum(want, want, n, lw, 0, np.float32(0.5), True)
    else:
        sign_abs_cpu.sign_abs_variant(want, want, n, lw, 0, 0.5, True, l2, offdiag, normalize)
    tpb, ncol = sign_abs.launch(n, normalize, 4)
    assert ncol == (3 if normalize else 1)
    kern = sign_abs.get_kernel(tpb, l2, offdiag, normalize, ncol)
    g, lg = G.copy(), np.zeros(m + 2)
    kern[m, tpb](g, g, n, lg, 2, 0.5, True)
    np.testing.assert_allclose(lg[2:], lw, rtol=1e-6)  # the CPU's normalized rows sum in float32
    np.testing.assert_allclose(g, want, rtol=2e-6, atol=1e-6)
    s16, g2, l16 = np.full(G.shape, 7, np.float16), G.copy(), np.zeros(m)
    kern[m, tpb](g2, s16, n, l16, 0, 0.5, True)
    np.testing.assert_array_equal(g2, G)  # a separate S leaves the Gram alone
    np.testing.assert_allclose(s16, want, rtol=1e-3, atol=1e-3)
    s_lo, l_lo = np.full(G.shape, 7, np.float32), np.zeros(m)
    kern[m, tpb](G.copy(), s_lo, n, l_lo, 0, 0.5, False)
    assert (s_lo == 7).all()
    np.testing.assert_array_equal(l_lo, lg[2:])


# ---------------------------------------------------------------------------------------------
# keywords


@pytest.mark.parametrize("entry", ["loss", "grad", "loss_and_grad", "plan"])
def test_unknown_keyword_values(entry, rng):
    phi = random_phi(rng, (5, 3, 4), np.float32)
    f = getattr(ol1, entry)
    for kw, msg in (
        (dict(penalty="l3"), "penalty must be one of ('l1', 'l2'), got 'l3'"),
        (dict(penalty=None), "penalty must be one of"),
        (dict(penalty="L1"), "penalty must be one of"),
        (dict(diagonal=1), "diagonal must be True or False, got 1"),
        (dict(diagonal="no"), "diagonal must be True or False"),
        (dict(normalize=0), "normalize must be True or False, got 0"),
        (dict(normalize=None), "normalize must be True or False"),
    ):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            f(phi, **kw)
    # accepted: numpy bools, like accumulate=
    np.testing.assert_array_equal(ol1.loss(phi, diagonal=np.bool_(False)), ol1.loss(phi, diagonal=False))


def test_torch_unknown_keyword_values(tseed):
    from gpu_orthol1.torch import OrthoL1, keras_orthogonal, ortho_l1

    w = torch.randn(5, 3)
    with pytest.raises(ValueError, match="penalty must be one of"):
        ortho_l1(w, penalty="l0")
    with pytest.raises(ValueError, match="normalize must be True or False"):
        ortho_l1(w, normalize="yes")
    with pytest.raises(ValueError, match="diagonal must be True or False"):
        OrthoL1(torch.nn.Linear(3, 5), diagonal=None)
    with pytest.raises(ValueError, match="mode must be 'rows' or 'columns'"):
        keras_orthogonal(w, mode="auto")
    with pytest.raises(ValueError, match="2-D"):
        keras_orthogonal(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="mode must be 'rows' or 'columns'"):
        OrthoL1.keras(torch.nn.Linear(3, 5), mode="auto")


# ---------------------------------------------------------------------------------------------
# torch


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
def test_ortho_l1_modes_match_autograd(variant, device, tseed):
    from gpu_orthol1.torch import ortho_l1

    beta = float(tseed.uniform(0.2, 2.0))
    for shape, mode, axis in (
        ((7, 4), "rows", 1),
        ((7, 4), "columns", 1),
        ((3, 8), "auto", 1),
        ((5, 3, 6), "rows", 1),
        ((4, 6, 3), None, 0),
    ):
        w = torch.from_numpy(random_phi(tseed, shape, np.float64)).to(device).requires_grad_(True)
        for reduction in ("sum", "none"):
            w.grad = None
            loss = ortho_l1(w, beta, axis=axis, reduction=reduction, mode=mode, **variant)
            loss.sum().backward()
            w2 = w.detach().cpu().clone().requires_grad_(True)
            v = w2.unsqueeze(0) if w2.dim() == 2 else w2.movedim(axis, 0)
            rows = mode == "rows" or (mode == "auto" and v.shape[1] < v.shape[2])
            per = naive_slices(v.transpose(1, 2) if rows else v, beta, **variant)
            per.sum().backward()
            want = per if reduction == "none" else per.sum()
            torch.testing.assert_close(loss.cpu().reshape(want.shape), want.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(w.grad.cpu(), w2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", NON_DEFAULT, ids=_vid)
def test_orthol1_variants_loss_add_grad_step(variant, tseed):
    from gpu_orthol1.torch import OrthoL1

    model = torch.nn.Sequential(
        torch.nn.Linear(6, 9), torch.nn.Linear(9, 9), torch.nn.Linear(9, 4), torch.nn.Conv2d(2, 3, 2)
    ).double()
    beta = 0.3
    reg = OrthoL1(model, beta, "rows", **variant)
    mats = [t.param for t in reg.targets]

    def naive():
        return sum(
            naive_slices(p.reshape(p.shape[0], -1).T.unsqueeze(0), beta, **variant).sum() for p in mats
        )

    model.zero_grad(set_to_none=True)
    loss = reg.loss()
    loss.backward()
    got = [p.grad.clone() for p in mats]
    model.zero_grad(set_to_none=True)
    ref = naive()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
    for g, p in zip(got, mats, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-13)
    before = [p.detach().clone() for p in mats]
    reg.add_grad_()  # adds the same gradient again
    for g, p in zip(got, mats, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-10, atol=1e-13)
    reg.step_(0.1)
    for g, b, p in zip(got, before, mats, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * g, rtol=1e-10, atol=1e-13)


@pytest.mark.cudasim
@pytest.mark.parametrize(
    "variant",
    [dict(penalty="l2", diagonal=False, normalize=False), dict(penalty="l1", diagonal=False, normalize=True)],
    ids=_vid,
)
def test_orthol1_variants_emulated_gpu(variant, tseed):
    """OrthoL1's grouped GPU path (pointer arrays, float32 S, alpha in the GEMM) with a variant."""
    from gpu_orthol1.testing import EmulatedGpuDevice
    from gpu_orthol1.torch import OrthoL1

    model = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Linear(9, 9), torch.nn.Linear(9, 3))
    reg = OrthoL1.keras(model, 0.5) if variant["normalize"] else OrthoL1.biggan(model, 0.5)
    reg._device_factory = EmulatedGpuDevice
    model.zero_grad(set_to_none=True)
    loss = reg.loss()
    loss.backward()
    got = [t.param.grad.clone() for t in reg.targets]
    cpu = OrthoL1.keras(model, 0.5) if variant["normalize"] else OrthoL1.biggan(model, 0.5)
    model.zero_grad(set_to_none=True)
    ref = cpu.loss()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-7)
    for g, t in zip(got, cpu.targets, strict=True):
        torch.testing.assert_close(g, t.param.grad, rtol=1e-4, atol=1e-6)


def _keras_formula(w, factor, mode):
    """Keras 3's OrthogonalRegularizer.__call__ written in torch (keras/src/regularizers): rows or
    columns scaled by min(rsqrt(sum of squares), 1 / epsilon), epsilon 1e-7, then
    factor * 0.5 * sum |P * (1 - I)| / (size * (size - 1) / 2)."""
    axis = 1 if mode == "rows" else 0
    inv = torch.rsqrt((w * w).sum(dim=axis, keepdim=True)).clamp(max=1e7)
    x = w * inv
    P = x @ x.T if mode == "rows" else x.T @ x
    size = P.shape[0]
    off = P * (1.0 - torch.eye(size, dtype=w.dtype))
    return factor * 0.5 * off.abs().sum() / (size * (size - 1.0) / 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keras_orthogonal_matches_keras_formula(dtype, tseed):
    """keras_orthogonal(w, factor, mode): Keras's rule on w as given, value and gradient."""
    from gpu_orthol1.torch import keras_orthogonal

    for shape, mode in (((6, 4), "rows"), ((6, 4), "columns"), ((3, 8), "rows"), ((2, 9), "columns")):
        w = torch.randn(*shape, dtype=dtype, requires_grad=True)
        got = keras_orthogonal(w, 0.03, mode)
        got.backward()
        w2 = w.detach().clone().requires_grad_(True)
        want = _keras_formula(w2, 0.03, mode)
        want.backward()
        tol = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(got, want.detach(), **tol)
        torch.testing.assert_close(w.grad, w2.grad, **tol)


def _keras_kernel(w, embedding=False):
    """The kernel Keras keeps for the layer a torch weight belongs to: Dense (in, out) = the Linear
    weight (out, in) transposed; Conv{1,2,3}D (*k, in, out) = the torch (out, in, *k) permuted, and
    Conv2DTranspose (*k, out, in) = the torch (in, out, *k) permuted the same way, reshaped to
    (prod(k) * in, out) (Keras's regularizer takes 2-D only: the preset's documented extension);
    Embedding (input_dim, output_dim) as torch stores it."""
    if embedding:
        return w
    if w.dim() == 2:
        return w.T
    return w.permute(*range(2, w.dim()), 1, 0).reshape(-1, w.shape[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_keras_model_preset_mode_is_keras_layout(mode, dtype, tseed):
    """OrthoL1.keras(model, factor, mode) on a torch model = the sum of Keras's regularizer with the
    same mode on each layer's Keras-layout kernel, value and gradient (not the torch weight as stored:
    that is the other mode for a Linear)."""
    from gpu_orthol1.torch import OrthoL1, keras_orthogonal

    nn = torch.nn
    model = nn.Sequential(
        nn.Linear(5, 7),
        nn.Linear(7, 3),
        nn.Conv2d(2, 3, (2, 3)),
        nn.ConvTranspose2d(3, 4, 2),
        nn.Conv1d(3, 5, 2),
        nn.Embedding(6, 4),
    ).to(dtype)
    emb = model[5].weight
    weights = [m.weight for m in model]
    factor = float(tseed.uniform(0.01, 0.5))
    reg = OrthoL1.keras(model, factor, mode)
    assert [t.param for t in reg.targets] == weights
    model.zero_grad(set_to_none=True)
    loss = reg.loss()
    loss.backward()
    got = [p.grad.clone() for p in weights]
    model.zero_grad(set_to_none=True)
    want = sum(_keras_formula(_keras_kernel(p.double(), p is emb), factor, mode) for p in weights)
    want.backward()
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(loss, want.detach().to(dtype), **tol)
    for g, p in zip(got, weights, strict=True):
        # float32: normalizing a row divides its rounding error by its norm, so an entry's error
        # scales with the largest gradient entry, not with its own size
        gtol = tol if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5 * p.grad.abs().max().item())
        torch.testing.assert_close(g, p.grad, **gtol)
    assert f"mode='keras {mode}'" in repr(reg) and "normalize=True" in repr(reg)
    # add_grad_ and the per-tensor function agree with it; keras_orthogonal takes the tensor as given
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(reg.add_grad_(), loss.detach(), **tol)
    for g, p in zip(got, weights, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)  # the same computation, the same bits
    one = OrthoL1.keras(model[0].weight, factor, mode)  # a tensor without its module: an (out, in) weight
    torch.testing.assert_close(one.loss(), keras_orthogonal(model[0].weight.T, factor, mode), **tol)


def test_keras_preset_against_keras_itself(tseed, monkeypatch):
    if "keras" not in sys.modules:  # Keras reads its backend once, at import
        monkeypatch.setenv("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "torch"))
    keras = pytest.importorskip("keras")
    from gpu_orthol1.torch import OrthoL1, keras_orthogonal

    for mode in ("rows", "columns"):
        w = np.random.default_rng(int(tseed.integers(2**31))).standard_normal((6, 4)).astype(np.float32)
        want = float(keras.regularizers.OrthogonalRegularizer(0.05, mode)(keras.ops.convert_to_tensor(w)))
        got = float(keras_orthogonal(torch.from_numpy(w), 0.05, mode))
        np.testing.assert_allclose(got, want, rtol=1e-5)
    # the model preset on a torch model against Keras on the ported one (Dense kernel = W^T): the
    # same mode name, the same penalty
    nn = torch.nn
    tm = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 9), nn.Linear(9, 3))
    for mode in ("rows", "columns"):
        km = keras.Sequential(
            [keras.Input((5,))]
            + [
                keras.layers.Dense(
                    t.out_features, kernel_regularizer=keras.regularizers.OrthogonalRegularizer(0.05, mode)
                )
                for t in tm
            ]
        )
        for kl, tl in zip(km.layers, tm, strict=True):
            kl.set_weights([tl.weight.detach().numpy().T, tl.bias.detach().numpy()])
        km(np.zeros((1, 5), np.float32))
        want = sum(float(keras.ops.stop_gradient(v)) for v in km.losses)
        np.testing.assert_allclose(OrthoL1.keras(tm, 0.05, mode).loss().item(), want, rtol=1e-5)


def _biggan_ortho_update(model, strength):
    """BigGAN-PyTorch utils.ortho: for each parameter of 2+ dims, w = param viewed as (out, -1),
    param.grad += strength * 2 * ((w w^T) * (1 - I)) w."""
    with torch.no_grad():
        for param in model.parameters():
            if len(param.shape) < 2:
                continue
            w = param.view(param.shape[0], -1)
            grad = 2 * torch.mm(torch.mm(w, w.t()) * (1.0 - torch.eye(w.shape[0], dtype=w.dtype)), w)
            param.grad.data += strength * grad.view(param.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_biggan_preset_matches_its_update_rule(dtype, tseed):
    from gpu_orthol1.torch import OrthoL1, biggan_ortho

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Conv1d(8, 4, 2), torch.nn.Linear(6, 5), torch.nn.Linear(5, 9)
    ).to(dtype)
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-7)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    base = [p.grad.clone() for p in model.parameters()]
    _biggan_ortho_update(model, 1e-3)
    want = [p.grad.clone() for p in model.parameters()]
    for p, b in zip(model.parameters(), base, strict=True):
        p.grad = b.clone()
    reg = OrthoL1.biggan(model, 1e-3)
    reg.add_grad_()
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, **tol)
    # the one-weight function: the value whose gradient that is, with autograd
    for p in (model[0].weight, model[3].weight):
        x = p.detach().clone().requires_grad_(True)
        val = biggan_ortho(x, 1e-3)
        val.backward()
        W = x.detach().reshape(x.shape[0], -1)
        off = (W @ W.T) * (1 - torch.eye(W.shape[0], dtype=dtype))
        torch.testing.assert_close(val, (1e-3 / 2 * (off * off).sum()), **tol)
        torch.testing.assert_close(x.grad.reshape(W.shape), 2 * 1e-3 * off @ W, **tol)


def test_bench_penalties_runs(tmp_path):
    """bench/bench_penalties.py end to end on a tiny shape: every method checked, JSON and table written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_penalties.py"
    spec = importlib.util.spec_from_file_location("bench_penalties", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "p.json"
    assert (
        mod.main(["--shapes", "9,6,5", "--repeat", "1", "--pause", "0", "--quiet", "--json", str(out)]) == 0
    )
    doc = json.loads(out.read_text())
    ours = [r for r in doc["rows"] if r["method"] == "gpu_orthol1"]
    assert len(ours) == 8 and all(r["x_l1"] > 0 for r in ours)
    assert {"cpu", "date", "versions", "loadavg_start", "command", "flagged_load"} <= set(doc)
    assert "| 9 x 6 x 5 | l2-offdiag |" in (tmp_path / "p.md").read_text()


def _pointnet_fxia22(trans):
    """fxia22/pointnet.pytorch, models/pointnet.py feature_transform_regularizer (dtype added):
    the batch mean of the Frobenius norms (not squared) of T T^T - I."""
    d = trans.size()[1]
    I = torch.eye(d, dtype=trans.dtype)[None, :, :]
    loss = torch.mean(torch.norm(torch.bmm(trans, trans.transpose(2, 1)) - I, dim=(1, 2)))
    return loss


def _pointnet_tf(transform, reg_weight):
    """charlesq34/pointnet (the official TensorFlow code), models/pointnet_cls.py get_loss:
    mat_diff = T T^T - I, reg_weight * tf.nn.l2_loss(mat_diff), tf.nn.l2_loss(t) = sum(t ** 2) / 2."""
    K = transform.shape[1]
    mat_diff = torch.matmul(transform, transform.transpose(1, 2))
    mat_diff = mat_diff - torch.eye(K, dtype=transform.dtype)
    return reg_weight * (mat_diff**2).sum() / 2


def _value_and_grad(f, x):
    x = x.detach().clone().requires_grad_(True)
    v = f(x)
    (g,) = torch.autograd.grad(v, x)
    return v.detach(), g


def test_pointnet_recipes_match_upstream(tseed):
    """README/docs/penalties.md's PointNet lines, value and gradient in float64: the official
    TensorFlow regularizer reg_weight * l2_loss(T T^T - I) is ortho_l1(x, reg_weight / 2, axis=0,
    mode="rows", penalty="l2"); fxia22's batch mean of the unsquared norms is the per-slice
    reduction="none" losses at beta 1, square-rooted and averaged."""
    from gpu_orthol1.torch import ortho_l1

    def tf_ours(x, reg_weight):
        return ortho_l1(x, reg_weight / 2, axis=0, mode="rows", penalty="l2")

    def fxia22_ours(x):
        return ortho_l1(x, 1.0, axis=0, mode="rows", penalty="l2", reduction="none").sqrt().mean()

    # 1.1 I and 0.9 I: T T^T - I = 0.21 I and -0.19 I, Frobenius norms 0.21 sqrt(3) and 0.19 sqrt(3)
    eye = torch.eye(3, dtype=torch.float64)
    trans = torch.stack([1.1 * eye, 0.9 * eye])
    np.testing.assert_allclose(_pointnet_fxia22(trans).item(), 0.2 * 3**0.5, rtol=1e-15)
    np.testing.assert_allclose(fxia22_ours(trans).item(), 0.2 * 3**0.5, rtol=1e-15)
    np.testing.assert_allclose(
        _pointnet_tf(trans, 1e-3).item(), 1e-3 * 3 * (0.21**2 + 0.19**2) / 2, rtol=1e-14
    )
    base = torch.randn(4, 9, 9, dtype=torch.float64)
    cases = [
        torch.randn(2, 3, 3, dtype=torch.float64),  # PointNet's input transform size
        torch.eye(16, dtype=torch.float64) + 0.1 * torch.randn(5, 16, 16, dtype=torch.float64),
        torch.randn(3, 7, 7, dtype=torch.float64),
        base.transpose(1, 2),
    ]  # a non-contiguous batch
    reg_weight = float(tseed.uniform(1e-4, 1e-2))
    for x in cases:
        v, g = _value_and_grad(lambda t: _pointnet_tf(t, reg_weight), x)
        w, h = _value_and_grad(lambda t: tf_ours(t, reg_weight), x)
        torch.testing.assert_close(w, v, rtol=1e-12, atol=0)
        torch.testing.assert_close(h, g, rtol=1e-10, atol=1e-14)
        v, g = _value_and_grad(_pointnet_fxia22, x)
        w, h = _value_and_grad(fxia22_ours, x)
        torch.testing.assert_close(w, v, rtol=1e-12, atol=0)
        torch.testing.assert_close(h, g, rtol=1e-10, atol=1e-14)
        # the core on arrays: for square x the column Gram's sum (x^T x - I)^2 is the same value
        loss, grad = ol1.loss_and_grad(x.numpy(), reg_weight / 2, axis=0, penalty="l2")
        v, g = _value_and_grad(lambda t: _pointnet_tf(t, reg_weight), x)
        np.testing.assert_allclose(loss, v.item(), rtol=1e-12)
        np.testing.assert_allclose(grad, g.numpy(), rtol=1e-10, atol=1e-14)
    # a slice with x x^T = I exactly (a permutation): torch.norm's gradient there is 0, the square
    # root's 0 * inf = NaN; the documented clamp gives 0 and leaves the other slices' gradient alone
    x = torch.stack(
        [torch.eye(5, dtype=torch.float64)[[2, 0, 4, 1, 3]], 1.1 + torch.randn(5, 5, dtype=torch.float64)]
    )
    v, g = _value_and_grad(_pointnet_fxia22, x)
    assert torch.isnan(_value_and_grad(fxia22_ours, x)[1][0]).all()
    w, h = _value_and_grad(
        lambda t: (
            ortho_l1(t, 1.0, axis=0, mode="rows", penalty="l2", reduction="none")
            .clamp_min(1e-37)
            .sqrt()
            .mean()
        ),
        x,
    )
    torch.testing.assert_close(w, v, rtol=1e-12, atol=1e-18)
    assert (g[0] == 0).all()
    torch.testing.assert_close(h, g, rtol=1e-10, atol=1e-14)
