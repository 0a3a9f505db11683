"""The fused small-slice kernel (kernels/fused_small.py) under numba's CUDA simulator.

Every launch goes through device arrays laid out as the case asks (the simulator,
like numba, only moves contiguous host buffers), viewed slices-first (m, l, n) as
the kernel takes them. Blocks are small (2 x 2 and 4 x 4 thread grids: the simulator
runs each thread as an OS thread) and tiles are cut small on purpose, so that l spans
several tiles with a partial last one, and n is rarely a multiple of the grid side.
"""

from __future__ import annotations

import numpy as np
import pytest

try:
    from .reference import check, random_phi, reference
except ImportError:  # the reference may have moved into the package
    from gpu_orthol1.reference import check, random_phi, reference

from gpu_orthol1.kernels import fused_small as fs

# isort: split
from numba import config as _numba_config  # noqa: E402
from numba import cuda  # after fused_small: it checks NumPy for numba-cuda first

SIM = bool(_numba_config.ENABLE_CUDASIM)


def _cupy():
    import cupy

    return cupy


def _to_dev(a):
    """A device copy of a host array (the simulator's device array there; CuPy on a card, whose 3-D
    arrays transpose, unlike numba-cuda's)."""
    return cuda.to_device(a) if SIM else _cupy().asarray(a)


def _to_host(d):
    return d.copy_to_host() if SIM else _cupy().asnumpy(d)


def _launch(cfg, grid, block, phi_v, out_v, losses, loss_offset, alpha, accumulate, write_grad):
    """One launch of the fused kernel: by the simulator here; on a card by the package's own
    launcher (gpu_orthol1/_ptx.py: PTX launched by CuPy, any strides), `losses` copied back."""
    kern = fs.get_fused_kernel(cfg)
    if SIM:
        kern[grid, block](phi_v, out_v, losses, loss_offset, alpha, accumulate, write_grad)
        return
    from numba import types

    from gpu_orthol1 import _ptx

    A = _ptx.array_type
    sig = (
        A(phi_v.dtype, 3, "A"),
        A(out_v.dtype, 3, "A"),
        A(np.float64, 1),
        types.int64,
        getattr(types, cfg.acc),
        types.boolean,
        types.boolean,
    )
    dl = _cupy().asarray(losses)
    _ptx.kernel(kern, sig)(grid, block, phi_v, out_v, dl, loss_offset, alpha, accumulate, write_grad)
    losses[...] = _cupy().asnumpy(dl)


# (make(phi_lmn, fill) -> contiguous host buffer, view(buffer) -> its (l, m, n) view).
# `fill` goes where the buffer has gaps: NaN in phi proves gaps are never read, a
# sentinel in out that they are never written.
LAYOUTS = {
    "lmn": (lambda p, fill: p.copy(), lambda x: x),  # the package's own layout
    "mln": (lambda p, fill: p.transpose(1, 0, 2).copy(), lambda x: x.transpose((1, 0, 2))),
    "fortran": (lambda p, fill: np.asfortranarray(p), lambda x: x),
    "nlm": (lambda p, fill: p.transpose(2, 0, 1).copy(), lambda x: x.transpose((1, 2, 0))),
    "neg": (lambda p, fill: p[::-1, :, ::-1].copy(), lambda x: x[::-1, :, ::-1]),
    "gaps": (lambda p, fill: _embed(p, fill), lambda x: x[::2, 1:, 1::3]),
}
SENTINEL = 7.0


# The same tests run under the simulator here and on a real card from bench/gpu_check.sh.
@pytest.fixture(
    params=[pytest.param("sim", marks=pytest.mark.cudasim), pytest.param("gpu", marks=pytest.mark.gpu)]
)
def target(request):
    return request.param


def _embed(p, fill):
    l, m, n = p.shape
    buf = np.full((2 * l, m + 1, 3 * n), fill, p.dtype)
    buf[::2, 1:, 1::3] = p
    return buf


def _cfg(target, l, n, dtype, threads=16, rows=None):
    """Small blocks under the simulator, the default block on a GPU; tiles of `rows` rows per
    thread row of the grid (tile_rows = rows * grid side), when asked."""
    cfg = fs.fused_config(l, n, dtype, threads=threads if target == "sim" else None)
    assert cfg is not None
    return cfg if rows is None else cfg._replace(tile_rows=rows * fs.grid_side(cfg.threads))


def _run(
    phi,
    cfg,
    *,
    phi_layout="lmn",
    out_layout="lmn",
    out_dtype=None,
    out_init=None,
    alpha=2.0,
    accumulate=False,
    write_grad=True,
    losses=None,
    loss_offset=0,
):
    """Launch once; returns (losses, out as an (l, m, n) host array, out's whole host buffer)."""
    l, m, n = phi.shape
    make, view = LAYOUTS[phi_layout]
    dphi = _to_dev(make(phi, np.nan))
    omake, oview = LAYOUTS[out_layout]
    init = np.full(phi.shape, SENTINEL, out_dtype or phi.dtype) if out_init is None else out_init
    dout = _to_dev(omake(init, SENTINEL))
    losses = np.full(m, -1.0) if losses is None else losses
    _launch(
        cfg,
        m,
        cfg.threads,
        view(dphi).transpose((1, 0, 2)),
        oview(dout).transpose((1, 0, 2)),
        losses,
        loss_offset,
        alpha,
        accumulate,
        write_grad,
    )
    buf = _to_host(dout)
    return losses, np.asarray(oview(buf)), buf


def _gap_mask(shape):
    l, m, n = shape
    mask = np.ones((2 * l, m + 1, 3 * n), bool)
    mask[::2, 1:, 1::3] = False
    return mask


# (l, m, n, rows per thread row of a tile, threads, phi layout, out layout): l below one tile,
# several tiles with a partial last one, n from 1 to past a warp of entries per row and mostly not a
# multiple of the grid side (padded columns), more threads than work and fewer
CASES = [
    (1, 2, 3, None, 16, "lmn", "lmn"),
    (7, 3, 5, 1, 4, "mln", "neg"),
    (40, 2, 17, 1, 16, "lmn", "gaps"),
    (7, 2, 1, 1, 4, "neg", "fortran"),
    (40, 3, 8, 3, 4, "gaps", "nlm"),
    (5, 4, 9, 1, 16, "nlm", "mln"),
    (3, 2, 17, 2, 16, "fortran", "lmn"),
    (9, 2, 11, 1, 4, "gaps", "lmn"),  # micro-tile side 6 here: the Gram loop's two rows per trip, odd tail
]


def _case_id(c):
    l, m, n, rows, tpb, pl, ol = c
    return f"l{l}m{m}n{n}-rows{rows}-t{tpb}-{pl}-{ol}"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(target, rng, dtype, case):
    l, m, n, rows, threads, phi_layout, out_layout = case
    phi = random_phi(rng, (l, m, n), dtype)
    cfg = _cfg(target, l, n, dtype, threads, rows)
    losses, grad, buf = _run(phi, cfg, phi_layout=phi_layout, out_layout=out_layout)
    check(phi, losses, grad, reduction="none")
    if out_layout == "gaps":
        assert np.all(buf[_gap_mask(phi.shape)] == SENTINEL), "wrote outside the view"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    "l, m, n, n_card, threads, rows",
    [(11, 3, 7, 29, 4, 2), (13, 2, 14, 61, 16, 1), (3, 2, 16, 32, 16, 2), (7, 2, 16, 64, 4, 1)],
)
def test_column_runs(target, rng, dtype, l, m, n, n_card, threads, rows):
    """Every run length a micro-tile of side 4 or 8 takes (1, 2, and 4 for float32 accumulators;
    side 8 also runs the Gram loop two rows per trip, with an odd last row at l = 7),
    with every gradient step over S's rows (jrun) that divides it, S in runs of any length, swizzled
    or not: the same Gram entries, summed in
    the same order, so the same S and bit-identical gradients; the loss's per-thread partial sums
    group entries differently, so it may differ in the last bits. (l, rows): one tile, or several.
    (n_card: on a card's 8 x 8 grid, an n whose micro-tile side is 4 or 8 in float32.)"""
    n = n if target == "sim" else min(n_card, fs.N_MAX[np.dtype(dtype)])
    phi = random_phi(rng, (l, m, n), dtype)
    base = _cfg(target, l, n, dtype, threads, rows)
    assert (base.nmax // fs.grid_side(base.threads)) in (4, 8)
    acc_bytes = 8 if base.acc == "float64" else 4
    runs = [v for v in fs.VECS if v * acc_bytes <= 16 and (base.nmax // fs.grid_side(base.threads)) % v == 0]
    assert len(runs) >= 2
    first = None
    # S in its default runs, unswizzled, for every pair; then S's other run lengths (the whole
    # micro-tile side, one column) and swizzled
    side = base.nmax // fs.grid_side(base.threads)
    combos = [(v, j, base.srun, False) for v in runs for j in runs if v % j == 0]
    combos += [
        (runs[-1], runs[-1], side, False),
        (runs[-1], runs[-1], 1, True),
        (1, 1, side, True),
        (runs[-1], runs[-1], base.srun, True),
    ]
    for vec, jrun, srun, swizzle in combos:
        cfg = base._replace(vec=vec, jrun=jrun, srun=srun, swizzle=swizzle)
        losses, grad, buf = _run(phi, cfg, phi_layout="gaps", out_layout="gaps")
        check(phi, losses, grad, reduction="none")
        assert np.all(buf[_gap_mask(phi.shape)] == SENTINEL), "wrote outside the view"
        if first is None:
            first = (losses, grad)
        else:
            assert np.array_equal(grad, first[1]), f"{cfg} changed the gradient's bits"
            np.testing.assert_allclose(losses, first[0], rtol=1e-12 if base.acc == "float64" else 1e-6)


@pytest.mark.gpu
def test_gpu_register_cap(rng):
    """maxreg caps the registers of the kernel the package launches (the PTX's .maxnreg) and changes
    no bit of the results."""
    from numba import types

    from gpu_orthol1 import _ptx

    phi = random_phi(rng, (70, 5, 64), np.float32)
    base = fs.fused_config(70, 64, np.float32)
    capped = base._replace(maxreg=112)
    first, again = _run(phi, base), _run(phi, capped)
    check(phi, again[0], again[1], reduction="none")
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    A = _ptx.array_type
    sig = (
        A(np.float32, 3, "A"),
        A(np.float32, 3, "A"),
        A(np.float64, 1),
        types.int64,
        types.float32,
        types.boolean,
        types.boolean,
    )
    regs = [_ptx.kernel(fs.get_fused_kernel(c), sig)._fn.num_regs for c in (base, capped)]
    assert regs[1] <= 112 < regs[0], regs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_slices_without_rows(target, dtype):
    """l = 0: every Gram is zero, so a slice's loss is |0 - I| summed, n; the gradient has no rows
    and the launch reaches no row of out (the gradient phase's first tile would start at row
    -tile_rows)."""
    m, n = 3, 5
    losses, grad, _ = _run(np.empty((0, m, n), dtype), _cfg(target, 0, n, dtype))
    np.testing.assert_array_equal(losses, np.full(m, float(n)))
    assert grad.shape == (0, m, n)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_accumulate_mean_scale(target, rng, dtype):
    """alpha = 2 beta / m (reduction="mean"), added to what out held."""
    l, m, n, beta = 9, 3, 6, 0.37
    phi = random_phi(rng, (l, m, n), dtype)
    old = rng.standard_normal(phi.shape).astype(dtype)
    cfg = _cfg(target, l, n, dtype, 16, 1)
    losses, grad, _ = _run(
        phi, cfg, phi_layout="mln", out_layout="neg", out_init=old, alpha=2 * beta / m, accumulate=True
    )
    check(phi, beta * losses.sum() / m, grad, beta=beta, reduction="mean", grad_base=old)


def test_out_dtype_differs(target, rng):
    """float16 phi, float32 out: the gradient is rounded once, to out's dtype."""
    phi = random_phi(rng, (6, 2, 5), np.float16)
    losses, grad, _ = _run(phi, _cfg(target, 6, 5, np.float16, 4, 1), out_dtype=np.float32)
    assert grad.dtype == np.float32
    check(phi, losses, grad, reduction="none", dtype=np.float32)


def test_loss_only_leaves_out_alone(target, rng):
    l, m, n = 11, 3, 7
    phi = random_phi(rng, (l, m, n), np.float32)
    old = rng.standard_normal(phi.shape).astype(np.float32)
    losses = np.full(m + 3, -1.0)
    losses, out, _ = _run(
        phi,
        _cfg(target, l, n, np.float32, 16, 1),
        out_init=old,
        write_grad=False,
        losses=losses,
        loss_offset=2,
    )
    assert np.array_equal(out, old)
    assert np.all(losses[[0, 1, m + 2]] == -1.0), "wrote outside losses[offset:offset + m]"
    full, grad, _ = _run(phi, _cfg(target, l, n, np.float32, 16, 1))
    assert np.array_equal(losses[2 : 2 + m], full), "loss-only and full calls disagree"
    check(phi, full, grad, reduction="none")


# the simulator runs the kernel on NumPy scalars, which warn on Inf * 0 (a padded column)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("accumulate", [False, True])
def test_nan_inf_slices(target, rng, accumulate):
    """A non-finite slice gets a NaN loss and an all-NaN gradient; the others are untouched by it."""
    l, m, n = 8, 4, 5
    phi = random_phi(rng, (l, m, n), np.float32)
    phi[3, 1, 2] = np.nan
    phi[0, 2, 4] = np.inf
    old = rng.standard_normal(phi.shape).astype(np.float32)
    cfg = _cfg(target, l, n, np.float32, 4, 1)
    losses, grad, _ = _run(phi, cfg, out_init=old, accumulate=accumulate)
    assert np.isnan(losses[[1, 2]]).all()
    assert np.isnan(grad[:, [1, 2], :]).all()
    good = [0, 3]
    clean_l, clean_g, _ = _run(
        np.ascontiguousarray(phi[:, good, :]), cfg, out_init=old[:, good, :].copy(), accumulate=accumulate
    )
    assert np.array_equal(losses[good], clean_l)
    assert np.array_equal(grad[:, good, :], clean_g)
    check(phi, losses, grad, reduction="none", grad_base=old if accumulate else None)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_sign_of_exact_zero(target, rng, dtype):
    """sign(0) = 0 at the kink: columns on distinct rows make G exactly diagonal (all off-diagonal
    X exactly 0), and a column of norm 1 makes a diagonal X entry exactly 0; every value is exact."""
    l, m, n = 6, 2, 4
    phi = np.zeros((l, m, n))
    for i in range(m):
        rows = rng.permutation(l)[:n]
        norms = rng.permutation([2.0, 0.5, 1.0, 1.0])  # X diagonal 3, -0.75, 0, 0
        phi[rows, i, np.arange(n)] = norms * rng.choice([-1.0, 1.0], n)
    phi = phi.astype(dtype)
    losses, grad, _ = _run(phi, _cfg(target, l, n, dtype, 4, 1))
    per, gref, _ = reference(phi)
    assert np.array_equal(losses, per)
    assert np.array_equal(grad.astype(np.float64), gref)


def test_bit_identical_repeat_and_layouts(target, rng):
    """Fixed-order reduction: the same values give the same bits, whatever the strides."""
    l, m, n = 13, 2, 11
    phi = random_phi(rng, (l, m, n), np.float32)
    cfg = _cfg(target, l, n, np.float32, 16, 1)
    first = _run(phi, cfg)
    again = _run(phi, cfg, phi_layout="gaps", out_layout="neg")
    assert np.array_equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])


def test_out_may_alias_phi(target, rng):
    l, m, n = 10, 2, 4
    phi = random_phi(rng, (l, m, n), np.float64)
    cfg = _cfg(target, l, n, np.float64, 4, 1)
    d = _to_dev(phi.copy())
    view = d.transpose((1, 0, 2))
    losses = np.zeros(m)
    _launch(cfg, m, cfg.threads, view, view, losses, 0, 2.0, False, True)
    check(phi, losses, _to_host(d), reduction="none")


def test_host_bugs_give_nan_not_corruption(target, rng):
    phi = random_phi(rng, (4, 2, 9), np.float32)
    cfg = fs.FusedConfig(nmax=8, tile_rows=2, threads=4, acc="float32")
    old = rng.standard_normal(phi.shape).astype(np.float32)
    losses, out, _ = _run(phi, cfg, out_init=old)
    assert np.isnan(losses).all()
    assert np.array_equal(out, old)
    # a block of another size than the config's (its strides assume config.threads)
    d = _to_dev(old.copy())
    cfg = fs.FusedConfig(nmax=16, tile_rows=2, threads=4, acc="float32")
    _launch(
        cfg, 2, 16, _to_dev(phi).transpose((1, 0, 2)), d.transpose((1, 0, 2)), losses, 0, 2.0, False, True
    )
    assert np.isnan(losses).all()
    assert np.array_equal(_to_host(d), old)


# ---------------------------------------------------------------- the config, no launch


def test_bounds_and_configs():
    assert fs.N_MAX[np.dtype(np.float32)] == fs.N_MAX[np.dtype(np.float16)] == 96
    assert fs.N_MAX[np.dtype(np.float64)] == 64
    for dtype in (np.float16, np.float32, np.float64):
        top = fs.N_MAX[np.dtype(dtype)]
        assert fs.fits(1, dtype) and fs.fits(64, dtype) and fs.fits(top, dtype)
        assert not fs.fits(top + 1, dtype) and not fs.fits(0, dtype)
        assert fs.fused_config(100, top + 1, dtype) is None
        acc = "float64" if dtype is np.float64 else "float32"
        for n in (1, 2, 7, 8, 9, 33, 64, top):
            for l in (1, 50, 4096):
                cfg = fs.fused_config(l, n, dtype)
                side = fs.grid_side(cfg.threads)
                assert cfg.threads == (64 if n <= 8 * fs.TMAX[acc] else 256)
                assert cfg.nmax >= n and cfg.nmax % side == 0 and cfg.nmax // side <= fs.TMAX[acc]
                assert cfg.tile_rows % side == 0 and side <= cfg.tile_rows <= fs.TMAX[acc] * side
                assert cfg.tile_rows == side or cfg.tile_rows < l + side, "no rows reserved past l"
                assert cfg.acc == acc and fs.shared_bytes(cfg) <= fs.SHARED_LIMIT
    # a full float32 micro-tile (side 8) takes half the gradient rows: two tiles for 64 rows
    assert fs.fused_config(64, 64, np.float32) == fs.FusedConfig(64, 32, 64, "float32", 4, 4, 4)
    assert (
        fs.fused_config(64, 57, np.float16).tile_rows == 32
        and fs.fused_config(64, 56, np.float32).tile_rows == 64
    )
    assert fs.fused_config(64, 32, np.float64).tile_rows == 32  # float64's full tile (side 4) keeps its rows
    # the longest run of columns one 16-byte load reads that divides the micro-tile side, where the
    # side is above 4; shorter sides keep interleaved columns
    assert fs.fused_config(64, 96, np.float32).vec == 2 and fs.fused_config(64, 64, np.float32).vec == 4
    assert fs.fused_config(64, 48, np.float32).vec == 2 and fs.fused_config(64, 40, np.float32).vec == 1
    for n, dtype in ((8, np.float32), (16, np.float32), (32, np.float32), (32, np.float64), (64, np.float64)):
        assert fs.fused_config(64, n, dtype).vec == 1, (n, dtype)
    assert (
        fs.fused_config(64, 16, np.float32, vec=2).vec == 2
        and fs.fused_config(64, 64, np.float32, vec=1).vec == 1
    )
    # the gradient phase's step over S's rows: vec unless forced to a divisor of it
    assert (
        fs.fused_config(64, 64, np.float32, jrun=2).jrun == 2
        and fs.fused_config(64, 16, np.float32).jrun == 1
    )
    for vec, bad in ((4, 3), (2, 4), (1, 2)):
        with pytest.raises(ValueError, match="jrun must be one of"):
            fs.fused_config(64, 64, np.float32, vec=vec, jrun=bad)
    for dtype, n, bad in ((np.float32, 64, 3), (np.float64, 32, 4), (np.float32, 40, 2), (np.float32, 64, 8)):
        with pytest.raises(ValueError, match="vec must be one of"):
            fs.fused_config(64, n, dtype, vec=bad)
    # S's runs: the longest one 16-byte load reads that divides the micro-tile side, whatever vec
    assert (
        fs.fused_config(64, 64, np.float32, vec=1).srun == 4 and fs.fused_config(64, 96, np.float32).srun == 2
    )
    assert fs.fused_config(64, 16, np.float32).srun == 2 and fs.fused_config(64, 64, np.float64).srun == 2
    assert fs.fused_config(64, 20, np.float32).srun == 1  # side 3
    assert fs.fused_config(64, 64, np.float32, srun=8).srun == 8
    assert fs.fused_config(64, 64, np.float32, srun=np.int64(2)).srun == 2
    for bad in (3, 0, 16, True, 2.0):
        with pytest.raises(ValueError, match="srun must divide"):
            fs.fused_config(64, 64, np.float32, srun=bad)
    assert not fs.fits(8, np.int32) and not fs.fits(8, np.complex64)
    # a forced grid keeps the rows per thread and pads n to its side
    assert fs.fused_config(40, 17, np.float32, threads=16) == fs.FusedConfig(20, 32, 16, "float32")
    for bad in (8, 32, 48, 1024):
        with pytest.raises(ValueError, match="threads per block"):
            fs.fused_config(8, 8, np.float32, threads=bad)
    with pytest.raises(ValueError, match="multiples of the grid side"):
        fs.get_fused_kernel(fs.FusedConfig(18, 8, 16, "float32"))
    with pytest.raises(ValueError, match="shared memory"):
        fs.get_fused_kernel(fs.FusedConfig(112, 16, 256, "float32"))
    for bad in (_vec_cfg(3), _vec_cfg(4, acc="float64"), _vec_cfg(8)):
        with pytest.raises(ValueError, match="vec one of"):
            fs.get_fused_kernel(bad)
    with pytest.raises(ValueError, match="vec one of"):  # 3 = nmax / side: no run of 2 divides it
        fs.get_fused_kernel(fs.FusedConfig(12, 4, 16, "float32", 2))
    for bad in (dict(srun=3), dict(srun=0), dict(maxreg=-1)):
        with pytest.raises(ValueError, match="srun >= 1 dividing nmax / side, maxreg >= 0"):
            fs.get_fused_kernel(_vec_cfg(1)._replace(**bad))


def _vec_cfg(vec, acc="float32"):
    return fs.FusedConfig(32, 8, 16, acc, vec)  # micro-tile side 8


def test_shared_bytes_formula():
    # tile (rows nmax + vec apart) and S in the accumulator dtype, 8-byte aligned, then the float64
    # reduction buffer; the numbers ptxas reports for sm_90 (checked offline on the PTX numba emits)
    assert fs.shared_bytes(fs.FusedConfig(8, 64, 64, "float32")) == 3072
    assert fs.shared_bytes(fs.FusedConfig(64, 64, 64, "float32")) == 33536
    assert fs.shared_bytes(fs.FusedConfig(80, 64, 256, "float32")) == 48384
    assert fs.shared_bytes(fs.FusedConfig(96, 16, 256, "float32")) == 45120
    assert fs.shared_bytes(fs.FusedConfig(32, 32, 64, "float64")) == 17152
    assert fs.shared_bytes(fs.FusedConfig(64, 16, 256, "float64")) == 43136
    # runs of vec columns: rows nmax + vec apart
    assert fs.shared_bytes(fs.FusedConfig(64, 64, 64, "float32", 4)) == 34304
    assert fs.shared_bytes(fs.FusedConfig(32, 64, 64, "float32", 4)) == 13824
    assert fs.shared_bytes(fs.FusedConfig(96, 16, 256, "float32", 2)) == 45184
    assert fs.shared_bytes(fs.FusedConfig(32, 32, 64, "float64", 2)) == 17408
    assert fs.shared_bytes(fs.FusedConfig(64, 16, 256, "float64", 2)) == 43264


@pytest.mark.cudasim
@pytest.mark.parametrize("l, m, n", [(9, 2, 20), (3, 1, 66)])
def test_default_grids_under_the_simulator(rng, l, m, n):
    """The configs a card gets (an 8 x 8 grid; 16 x 16 past n = 64), not only the small test grids."""
    phi = random_phi(rng, (l, m, n), np.float32)
    cfg = fs.fused_config(l, n, np.float32)
    assert cfg.threads == (64 if n <= 64 else 256)
    losses, grad, _ = _run(phi, cfg, phi_layout="mln", out_layout="neg")
    check(phi, losses, grad, reduction="none")


def test_kernels_cached_per_config():
    cfg = fs.FusedConfig(16, 4, 16, "float32")
    assert fs.get_fused_kernel(cfg) is fs.get_fused_kernel(cfg)
    assert fs.get_fused_kernel(cfg) is not fs.get_fused_kernel(cfg._replace(acc="float64"))


@pytest.mark.cudasim
def test_resource_usage_is_none_on_the_simulator():
    cfg = fs.FusedConfig(16, 4, 16, "float32")
    sig = "void(float32[:, :, :], float32[:, :, :], float64[:], int64, float64, boolean, boolean)"
    assert fs.resource_usage(fs.get_fused_kernel(cfg), sig) is None


# ---------------------------------------------------------------- real card only (bench/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_gpu_widest_slices_and_resources(rng, dtype):
    """The largest n per dtype at the default config, several tiles; shared memory as documented."""
    n = fs.N_MAX[np.dtype(dtype)]
    l, m = 300, 3
    phi = random_phi(rng, (l, m, n), dtype)
    cfg = fs.fused_config(l, n, dtype)
    losses, grad, _ = _run(phi, cfg, phi_layout="nlm", out_layout="neg")
    check(phi, losses, grad, reduction="none")
    name = np.dtype(dtype).name
    use = fs.resource_usage(
        fs.get_fused_kernel(cfg),
        f"void({name}[:, :, :], {name}[:, :, :], float64[:], int64, float64, boolean, boolean)",
    )
    print(cfg, use)
    assert use is not None
    assert use["shared_mem_per_block"] == fs.shared_bytes(cfg)
    assert use["local_mem_per_thread"] == 0


@pytest.mark.gpu
def test_gpu_cupy_views(rng):
    """CuPy views as the host code passes them (through the package's launcher: numba-cuda 0.30.4's
    own raised OverflowError in cuda.core's layout code for such views on an H100): the package's
    (l, m, n) layout transposed, and an output with negative strides, accumulated into."""
    cp = pytest.importorskip("cupy")
    l, m, n = 33, 4, 20
    phi = random_phi(rng, (l, m, n), np.float32)
    old = rng.standard_normal(phi.shape).astype(np.float32)
    dout = cp.asarray(old[::-1].copy())[::-1]
    losses = np.full(m, -1.0)
    cfg = fs.fused_config(l, n, np.float32)
    _launch(
        cfg,
        m,
        cfg.threads,
        cp.asarray(phi).transpose(1, 0, 2),
        dout.transpose(1, 0, 2),
        losses,
        0,
        2.0,
        True,
        True,
    )
    check(phi, losses, cp.asnumpy(dout), reduction="none", grad_base=old)
