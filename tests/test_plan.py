"""Plans: reuse, the mismatch contract, the functional API's cache, threads, the Gram hook."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import gpu_orthol1 as ol1
from gpu_orthol1 import _cache, _cpu_pool, _device, _dtypes, _gpu_calls, _plan

from .helpers import make
from .reference import check, random_phi


@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")  # every2 and negative strides are staged
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["C", "F", "perm", "every2", "negative"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_plan_matches_reference_and_functional_api(dtype, layout, axis, rng):
    shape = (9, 7, 5)
    phi = make(np, rng, shape, dtype, layout, axis)
    p = ol1.plan(phi, 0.3, axis=axis)
    for _ in range(2):  # a plan is reusable
        phi2 = make(np, rng, shape, dtype, layout, axis)
        assert phi2.strides == phi.strides
        loss, grad = p(phi2)
        check(phi2, loss, grad, 0.3, axis, "sum", dtype)
        want = ol1.loss_and_grad(phi2, 0.3, axis=axis)
        np.testing.assert_array_equal(loss, want[0])
        np.testing.assert_array_equal(grad, want[1])


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_plan_wants_and_out(reduction, rng):
    phi = random_phi(rng, (8, 6, 4), np.float64)
    L = ol1.plan(phi, 0.5, reduction=reduction, want="loss")(phi)
    G = ol1.plan(phi, 0.5, reduction=reduction, want="grad")(phi)
    L2, G2 = ol1.plan(phi, 0.5, reduction=reduction)(phi)
    check(phi, L, G, 0.5, 1, reduction, np.float64)
    np.testing.assert_array_equal(L, L2)
    np.testing.assert_array_equal(G, G2)
    out = rng.standard_normal(phi.shape)
    base = out.copy()
    p = ol1.plan(phi, 0.5, reduction=reduction, want="grad")
    assert p(phi, out=out, accumulate=True) is out
    np.testing.assert_allclose(out - base, G, rtol=1e-12, atol=1e-13)


def test_plan_mismatch_names_what_differs_and_writes_nothing(rng):
    phi = random_phi(rng, (8, 6, 4), np.float32)
    p = ol1.plan(phi)
    out = np.full(phi.shape, 7.0, np.float32)
    cases = {
        "shape": random_phi(rng, (8, 5, 4), np.float32),
        "dtype": phi.astype(np.float64),
        "strides": np.asfortranarray(phi),
    }
    for what, other in cases.items():
        with pytest.raises(ValueError, match="this plan does not fit phi") as e:
            p(other, out=out if what != "shape" else None)
        assert what in str(e.value)
        assert (out == 7.0).all()
    with pytest.raises(ValueError, match="want='loss' takes no out="):
        ol1.plan(phi, want="loss")(phi, out=out)
    # an array of another kind does not fit; a non-array is the errors table's TypeError
    with pytest.raises(ValueError, match="this plan does not fit phi: phi is a numpy.memmap"):
        p(phi.view(np.memmap), out=out)
    assert (out == 7.0).all()


@pytest.mark.parametrize(
    "bad", [[[1.0, 2.0]], 1.0, np.ma.ones((8, 6, 4), np.float32)], ids=["list", "float", "masked"]
)
def test_plan_and_functional_api_refuse_a_non_array_alike(rng, bad):
    """One rule for a non-array phi: the TypeError of docs/errors.md's phi rows, from a plan call as
    from `loss`, with the same message."""
    phi = random_phi(rng, (8, 6, 4), np.float32)
    out = np.full(phi.shape, 7.0, np.float32)
    with pytest.raises(TypeError, match="phi must be a NumPy or CuPy array") as from_loss:
        ol1.loss(bad)
    for want in ("loss", "grad", "loss_and_grad"):
        p = ol1.plan(phi, want=want)
        with pytest.raises(TypeError) as from_plan:
            p(bad) if want == "loss" else p(bad, out=out)
        assert str(from_plan.value) == str(from_loss.value)
    assert (out == 7.0).all()
    with pytest.raises(ValueError, match="out has dtype"):
        p(phi, out=out.astype(np.float64))
    for bad in (
        dict(want="both"),
        dict(reduction="max"),
        dict(precision="low"),
        dict(axis=3),
        dict(backend="tpu"),
        dict(workspace_bytes=0),
    ):
        with pytest.raises(ValueError):
            ol1.plan(phi, **bad)
    with pytest.raises(TypeError):
        ol1.plan(phi.astype(np.int32))


def test_functional_api_reuses_plans(rng, monkeypatch):
    _cache.clear_cache()
    made = []
    real = _plan.Plan.__init__

    def spy(self, *a, **k):
        made.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(_plan.Plan, "__init__", spy)
    phi = random_phi(rng, (8, 6, 4), np.float32)
    for beta in (0.1, 0.2, 0.3):  # beta is a call argument, not part of the plan
        L, G = ol1.loss_and_grad(phi, beta)
        check(phi, L, G, beta, 1, "sum", np.float32)
        np.testing.assert_array_equal(ol1.loss(phi, beta), L)
    assert len(made) == 1
    ol1.loss_and_grad(phi, axis=0)
    ol1.loss_and_grad(np.asfortranarray(phi))
    assert len(made) == 3
    monkeypatch.setenv("GPU_ORTHOL1_WORKSPACE_BYTES", str(1 << 16))  # the environment is part of the key
    ol1.loss_and_grad(phi)
    assert len(made) == 4
    monkeypatch.setenv("GPU_ORTHOL1_GRAM", "full")
    ol1.loss_and_grad(phi)
    assert len(made) == 5
    monkeypatch.delenv("GPU_ORTHOL1_WORKSPACE_BYTES")
    monkeypatch.delenv("GPU_ORTHOL1_GRAM")
    L, G = ol1.loss_and_grad(phi)  # the first key again: its plan, still cached
    assert len(made) == 5
    check(phi, L, G, 1.0, 1, "sum", np.float32)
    for i in range(_cache.CACHE_SIZE + 4):  # bounded
        ol1.loss(random_phi(rng, (3, 2, i + 1), np.float32))
    assert len(_cache._cache) <= _cache.CACHE_SIZE


def test_cache_key_reads_the_environment_as_os_environ_does(monkeypatch):
    names = _cache._ENV_NAMES
    for n in names:
        monkeypatch.delenv(n, raising=False)
    assert _cache._env_key() == (None,) * len(names)
    for i, n in enumerate(names):
        monkeypatch.setenv(n, f"v{i}")
    seen = _cache._env_key()
    assert len(set(seen)) == len(names) and None not in seen
    monkeypatch.setenv(names[1], "other")
    assert _cache._env_key()[1] != seen[1] and _cache._env_key()[0] == seen[0]
    monkeypatch.delenv(names[2])
    assert _cache._env_key()[2] is None
    # a mapping put in os.environ's place (mock.patch.object(os, "environ", ...)) is read as it is
    monkeypatch.setattr(os, "environ", {names[3]: "full"})
    assert _cache._env_key() == (None, None, None, "full")


def test_a_cached_plan_does_not_let_equal_hashing_arguments_past_the_checks(rng):
    phi = random_phi(rng, (5, 3, 2), np.float32)
    ol1.loss(phi, axis=1)
    with pytest.raises(ValueError, match="axis must be an integer"):
        ol1.loss(phi, axis=1.0)
    with pytest.raises(ValueError, match="axis must be an integer"):
        ol1.loss(phi, axis=True)
    ol1.loss(phi, workspace_bytes=1 << 12)
    with pytest.raises(ValueError, match="workspace_bytes"):
        ol1.loss(phi, workspace_bytes=float(1 << 12))


def test_unhashable_arguments_give_the_usual_errors(rng):
    phi = random_phi(rng, (5, 3, 2), np.float32)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ol1.loss(phi, reduction=["sum"])
    with pytest.raises(TypeError, match="must be a NumPy or CuPy array"):
        ol1.loss([[1.0, 2.0]])


def test_one_plan_shared_by_threads(rng):
    phi = random_phi(rng, (16, 64, 8), np.float64)  # small slices: the plan's kept workspace is contended
    p = ol1.plan(phi, 0.7)
    inputs = [random_phi(rng, phi.shape, np.float64) for _ in range(8)]
    want = [ol1.loss_and_grad(x, 0.7) for x in inputs]
    got: list = [None] * 8
    errors = []

    def work(i):
        try:
            for _ in range(20):
                got[i] = p(inputs[i])
        except Exception as e:  # surfaced below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for (L, G), (wl, wg) in zip(got, want, strict=True):
        np.testing.assert_array_equal(L, wl)  # bit-identical: the slices' order is fixed
        np.testing.assert_array_equal(G, wg)


class _Streams:
    """Stand-in for CuPy as `_gpu_calls.StreamLosses` uses it: streams with an address and a capture
    state, and `empty`. Asking the default stream (address 0) whether it captures fails,
    as the driver's query may while another stream captures."""

    class Stream:
        def __init__(self, ptr, capturing=False):
            self.ptr, self.capturing = ptr, capturing

        def is_capturing(self):
            if self.ptr == 0:
                raise AssertionError("the default stream was asked whether it captures")
            return self.capturing

    def __init__(self):
        self.current = self.Stream(0)
        self.empty = np.empty


def test_kept_losses_one_array_per_stream_fresh_while_capturing(rng):
    """The per-slice losses a GPU call keeps: one array per stream, the same on every call there; a
    fresh one on each call while the stream captures a graph (kept arrays would then be shared with
    the graph's replays on other streams); at most 8 streams' arrays kept."""
    xp = _Streams()
    kept = _gpu_calls.StreamLosses(xp, 5)
    first = kept.get(xp.current)
    assert first.shape == (5,) and first.dtype == np.float64
    assert kept.get(xp.current) is first
    xp.current = xp.Stream(0x100)
    other = kept.get(xp.current)
    assert other is not first and kept.get(xp.current) is other
    xp.current = xp.Stream(0x100, capturing=True)
    fresh = kept.get(xp.current)
    assert fresh is not other and kept.get(xp.current) is not fresh and len(kept) == 2
    for k in range(2, 8):  # six more streams: eight in all
        xp.current = xp.Stream(0x100 * k)
        kept.get(xp.current)
    assert len(kept) == 8
    xp.current = xp.Stream(0x1000)  # a ninth stream: the kept ones are let go, this one kept
    ninth = kept.get(xp.current)
    assert len(kept) == 1 and kept.get(xp.current) is ninth
    assert kept.stream_of(0x1000) is xp.current  # its stream kept alive with it


def test_cpu_thread_split_equals_one_thread(rng, monkeypatch):
    phi = random_phi(rng, (64, 1200, 16), np.float32)  # many small slices: the thread split applies
    p = ol1.plan(phi, 0.2)
    if (__import__("os").cpu_count() or 1) > 1:
        assert p._threads > 1
    L, G = p(phi)
    monkeypatch.setattr(p, "_threads", 1)
    p._chunks.sizes.clear()
    L1, G1 = p(phi)
    np.testing.assert_array_equal(G, G1)
    np.testing.assert_allclose(L, L1, rtol=1e-6)  # per-chunk float64 sums: the same slices, other chunks
    check(phi, L, G, 0.2, 1, "sum", np.float32)


def test_gram_hook_and_chunk(rng):
    phi = random_phi(rng, (10, 9, 4), np.float64)
    p = ol1.plan(phi, 0.4)
    seen = []

    def hook(ws):
        seen.append(ws.shape[0])
        ws *= 2.0  # the pass then works on 2 G: what a sum of two equal partial Grams gives

    loss, grad = _plan.execute(p, phi, None, False, 0.4, True, gram_hook=hook, chunk=4)
    assert seen == [4, 4, 1]
    phi2 = phi * np.sqrt(2.0)  # G(phi2) = 2 G(phi)
    ref_loss = ol1.loss(phi2, 0.4)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-13)
    # the gradient is 2 beta Phi sign(2G - I): phi's rows with phi2's signs
    np.testing.assert_allclose(grad * np.sqrt(2.0), ol1.grad(phi2, 0.4), rtol=1e-12, atol=1e-14)
    assert _plan.chunk_for(p, True) >= 9


@pytest.mark.cudasim
@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")  # the CPU reference stages negative strides
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["C", "F", "negative"])
@pytest.mark.parametrize("mode", ["new", "accumulate", "loss"])
def test_fused_path_through_the_plan_emulated(dtype, layout, mode, rng):
    """kernel="fused" on the GPU path's logic: the plan hands the slice views to the fused kernel
    (under the simulator), no workspace; same results as the two-GEMM path and the reference."""
    from gpu_orthol1.testing import EmulatedGpuDevice

    shape = (11, 3, 5)  # l spans several of the emulator's 4-row tiles
    phi = make(np, rng, shape, dtype, layout, 1)
    dev = EmulatedGpuDevice()
    p = _plan.Plan(
        phi,
        0.6,
        backend="numpy",
        kernel="fused",
        reduction="mean",
        _device=dev,
        want="loss" if mode == "loss" else "loss_and_grad",
    )
    assert p.kernel == "fused"
    if mode == "loss":
        loss = p(phi)
        ref = ol1.loss(phi, 0.6, reduction="mean")
        np.testing.assert_allclose(loss, ref, rtol=1e-3 if dtype == np.float16 else 1e-5)
        assert dev.gemm_calls == [("fused", 3)]
        return
    out = None
    if mode == "accumulate":
        out = make(np, rng, shape, dtype, "C", 1)
        base = out.astype(np.float64)
    res = p(phi, out=out, accumulate=mode == "accumulate")
    loss, grad = res
    assert dev.gemm_calls == [("fused", 3)]  # one launch, no GEMM
    if mode == "accumulate":
        check(phi, loss, grad, 0.6, 1, "mean", dtype, grad_base=base)
    else:
        check(phi, loss, grad, 0.6, 1, "mean", dtype)


def test_kernel_choice_errors(rng, monkeypatch):
    phi = random_phi(rng, (5, 3, 4), np.float32)
    with pytest.raises(ValueError, match="kernel must be one of"):
        ol1.plan(phi, kernel="fast")
    with pytest.raises(ValueError, match="kernel='fused' on the CPU takes float32 or float64, not float16"):
        ol1.plan(phi.astype(np.float16), backend="numpy", kernel="fused")
    with pytest.raises(ValueError, match="kernel='fused' on the CPU takes float32 or float64, not bfloat16"):
        ol1.plan(phi.astype(_dtypes.bfloat16()), backend="numpy", kernel="fused")
    with pytest.raises(ValueError, match="default penalty"):
        ol1.plan(phi, backend="numpy", kernel="fused", penalty="l2")

    assert ol1.plan(phi).kernel == "fused"  # 4 l m n^2 = 960 flops: the CPU's fused loop
    assert ol1.plan(phi, kernel="gemm").kernel == "gemm"
    assert ol1.plan(phi, penalty="l2").kernel == "gemm"  # the loop computes the default penalty only
    assert ol1.plan(phi, workspace_bytes=1 << 20).kernel == "gemm"  # a cap: the chunked path it sets
    assert ol1.plan(phi.astype(np.float16)).kernel == "gemm"
    big = random_phi(rng, (64, 32, 16), np.float32)  # 2.1 Mflop: BLAS's GEMMs win
    assert ol1.plan(big).kernel == "gemm"
    # the GPU path's switch: validated, and otherwise left to GPU plans (a setting made for a card
    # must not send CPU plans of float16 or other penalties into errors, nor large ones into the loop)
    monkeypatch.setenv("GPU_ORTHOL1_KERNEL", "fused")
    assert ol1.plan(big, backend="numpy").kernel == "gemm"
    assert ol1.plan(phi.astype(np.float16), backend="numpy").kernel == "gemm"
    assert ol1.plan(phi, backend="numpy", penalty="l2").kernel == "gemm"
    monkeypatch.setenv("GPU_ORTHOL1_KERNEL", "gemm")
    assert ol1.plan(phi, backend="numpy").kernel == "fused"
    assert ol1.plan(big, backend="numpy", kernel="fused").kernel == "fused"  # kernel= forces it
    monkeypatch.setenv("GPU_ORTHOL1_KERNEL", "bogus")
    with pytest.raises(ValueError, match="GPU_ORTHOL1_KERNEL"):
        ol1.plan(phi, backend="numpy")


@pytest.mark.cudasim
def test_auto_takes_the_fused_kernel_where_it_measured_faster(rng, monkeypatch):
    """kernel="auto" on a GPU device follows `fused_wins` (float16/float32: n <= 16 up to l = 1024,
    32 up to 512, 64 up to 256, 96 up to 128; float64: n <= 32 up to l = 64; precision="highest"),
    for the default penalty, no workspace cap and a layout BLAS reads in place; everything else
    keeps the two-GEMM path."""
    from gpu_orthol1.testing import EmulatedGpuDevice

    class RuleDevice(EmulatedGpuDevice):
        auto_fused = True  # the plain emulator opts out so its GEMM-path tests stay GEMM-path tests

    def pick(shape, dtype=np.float32, layout="C", axis=1, **kw):
        phi = make(np, rng, shape, dtype, layout, axis)
        return _plan.Plan(phi, backend="numpy", axis=axis, _device=RuleDevice(), **kw).kernel

    assert (
        pick((64, 8, 32)) == pick((512, 3, 32), np.float16) == pick((64, 3, 96)) == pick((1, 2, 1)) == "fused"
    )
    assert (
        pick((1024, 2, 16))
        == pick((256, 3, 64))
        == pick((128, 3, 96))
        == pick((64, 3, 32), np.float64)
        == "fused"
    )
    assert pick((64, 3, 32), layout="F") == "fused"  # any layout BLAS reads in place
    assert (
        pick((257, 3, 33)) == pick((1025, 3, 8)) == pick((129, 3, 65)) == pick((64, 3, 97)) == "gemm"
    )  # past the wins
    assert pick((64, 8, 33), np.float64) == pick((65, 8, 32), np.float64) == "gemm"
    assert pick((64, 8, 32), precision="tf32") == "gemm"  # asks for tensor cores
    assert pick((64, 8, 32), penalty="l2") == pick((64, 8, 32), normalize=True) == "gemm"
    assert pick((64, 8, 32), workspace_bytes=1 << 20) == "gemm"  # a cap of the GEMM path's workspace
    assert pick((5, 4, 3), layout="C", axis=2) == "gemm"  # a layout the GEMM path copies (and warns about)
    monkeypatch.setenv("GPU_ORTHOL1_WORKSPACE_BYTES", str(1 << 20))
    assert pick((64, 8, 32)) == "gemm"
    monkeypatch.delenv("GPU_ORTHOL1_WORKSPACE_BYTES")
    monkeypatch.setenv("GPU_ORTHOL1_KERNEL", "gemm")
    assert pick((64, 8, 32)) == "gemm"
    monkeypatch.setenv("GPU_ORTHOL1_KERNEL", "fused")
    assert pick((257, 3, 33)) == "fused"
    monkeypatch.delenv("GPU_ORTHOL1_KERNEL")
    assert (
        _plan.Plan(
            make(np, rng, (64, 8, 32), np.float32, "C", 1), backend="numpy", _device=EmulatedGpuDevice()
        ).kernel
        == "gemm"
    )
    assert ol1.plan(make(np, rng, (64, 8, 32), np.float32, "C", 1), backend="numpy").kernel == "gemm"  # CPU
    # and an auto-picked fused plan computes what the reference does
    phi = make(np, rng, (9, 3, 5), np.float32, "F", 1)
    dev = RuleDevice()
    p = _plan.Plan(phi, 0.4, backend="numpy", _device=dev)
    assert p.kernel == "fused"
    loss, grad = p(phi)
    assert dev.gemm_calls == [("fused", 3)]
    check(phi, loss, grad, 0.4, 1, "sum", np.float32)


def test_fused_rule_function():
    fw = _device.fused_wins
    assert (
        fw(64, 32, np.float32, "highest")
        and fw(512, 1, np.float16, "highest")
        and fw(64, 96, "float32", "highest")
    )
    assert (
        fw(1024, 16, np.float32, "highest")
        and fw(256, 64, np.float32, "highest")
        and fw(128, 96, np.float16, "highest")
    )
    assert not fw(1025, 16, np.float32, "highest") and not fw(513, 32, np.float32, "highest")
    assert not fw(257, 33, np.float32, "highest") and not fw(129, 65, np.float32, "highest")
    assert not fw(64, 97, np.float32, "highest") and not fw(64, 0, np.float32, "highest")
    assert fw(64, 32, np.float64, "highest") and fw(1, 1, "float64", "highest")
    assert not fw(65, 32, np.float64, "highest") and not fw(64, 33, np.float64, "highest")
    assert not fw(64, 32, np.float32, "tf32") and not fw(64, 32, np.int32, "highest")


@pytest.mark.cudasim
def test_fused_refuses_slices_too_wide(rng):
    from gpu_orthol1.kernels import fused_small
    from gpu_orthol1.testing import EmulatedGpuDevice

    n = fused_small.N_MAX[np.dtype(np.float64)] + 1
    phi = random_phi(rng, (2, 1, n), np.float64)
    with pytest.raises(ValueError, match=f"up to n={n - 1}"):
        _plan.Plan(phi, backend="numpy", kernel="fused", _device=EmulatedGpuDevice())
    with pytest.raises(ValueError, match="default penalty .* only"):  # no silent L1 for another variant
        _plan.Plan(phi[:, :, :4], backend="numpy", kernel="fused", penalty="l2", _device=EmulatedGpuDevice())


def test_cpu_writes_far_apart_gradient_rows_through_a_buffer(rng, monkeypatch):
    """CPU slices whose gradient rows are short and far apart (a C-contiguous (l, m, n) array with
    m*n*itemsize >= 64 KiB) are written through the chunk buffer: the same results as writing in
    place, into a fresh gradient, out= and accumulate=True, without a CopyWarning; rows closer
    together, or a Fortran layout, are written in place."""
    import warnings

    phi = make(np, rng, (5, 1024, 16), np.float32, "C", 1)  # rows 64 KiB apart, 64 bytes long
    p = _plan.Plan(phi, 0.3, backend="numpy", workspace_bytes=40 * 1024)  # several chunks per thread
    base = random_phi(rng, phi.shape, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, grad = p(phi)
        out = base.copy()
        p(phi, out=out, accumulate=True)
    assert any(sz.stage_out for sz, _ in p._chunks.sizes.values())
    check(phi, loss, grad, 0.3, 1, "sum", np.float32)
    check(phi, loss, out, 0.3, 1, "sum", np.float32, grad_base=base)
    inplace = _plan.Plan(phi, 0.3, backend="numpy", workspace_bytes=40 * 1024)
    monkeypatch.setattr(inplace._slices, "_stage_far_rows", False)
    l2, g2 = inplace(phi)
    assert not any(sz.stage_out for sz, _ in inplace._chunks.sizes.values())
    np.testing.assert_array_equal(g2, grad)
    assert l2 == loss
    near = make(np, rng, (5, 64, 16), np.float32, "C", 1)  # rows 4 KiB apart
    pn = _plan.Plan(near, 0.3, backend="numpy")
    pn(near)
    assert not any(sz.stage_out for sz, _ in pn._chunks.sizes.values())
    fort = make(np, rng, (5, 1024, 16), np.float32, "F", 1)  # columns contiguous: BLAS kind "N"
    pf = _plan.Plan(fort, 0.3, backend="numpy")
    check(fort, *pf(fort), 0.3, 1, "sum", np.float32)
    assert not any(sz.stage_out for sz, _ in pf._chunks.sizes.values())


def test_cpu_pool_runs_blas_single_threaded(rng):
    # BLAS's threads on top of the slice pool's oversubscribe the cores (issue 26): one BLAS thread
    # while the parts run, the caller's setting back after
    from threadpoolctl import threadpool_info, threadpool_limits

    with _cpu_pool._blas_ctl_lock:  # the libraries the pool's limit controls (found at its first use)
        ours = {c.filepath for c in _cpu_pool._blas_controller_locked().lib_controllers}

    def blas_threads():  # a BLAS loaded later in this process (another test's import) is not ours
        return [
            i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and i["filepath"] in ours
        ]

    seen = []
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        _cpu_pool.run_split(lambda a, b: seen.append(blas_threads()), 10, 2)
        assert blas_threads() == before
    assert len(seen) == 2 and all(t == [1] * len(before) for t in seen)
    assert before and max(before) == 2  # the check above would pass trivially with one thread


def test_cpu_pool_float64_equals_serial_to_the_bit(rng):
    from threadpoolctl import threadpool_limits

    phi = random_phi(rng, (257, 24, 48), np.float64)  # 24 slices of 257 x 48: over the pool's threshold
    p = ol1.plan(phi, 0.3)
    if (__import__("os").cpu_count() or 1) > 1:
        assert p._threads > 1
    p._threads = 2  # the pooled path even on one core
    p._chunks.sizes.clear()
    L, G = p(phi)
    p._threads = 1
    p._chunks.sizes.clear()
    with threadpool_limits(limits=1, user_api="blas"):  # what each part runs (BLAS's threads round otherwise)
        L1, G1 = p(phi)
    np.testing.assert_array_equal(G, G1)
    assert L == L1  # per-slice float64 losses, summed in slice order either way
    check(phi, L, G, 0.3, 1, "sum", np.float64)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a pool of two threads")
def test_overlapping_pool_calls_give_blas_its_threads_back():
    # two user threads' run_split calls overlap and the first one in leaves first: the one-thread
    # limit must last while the second runs, and BLAS's own setting come back after both (each call
    # restoring its own limit would restore 2 under the second call and then the second's saved 1,
    # leaving BLAS on one thread for good)
    from threadpoolctl import threadpool_info

    with _cpu_pool._blas_ctl_lock:  # the libraries the pool's limit controls (found at its first use)
        ours = {c.filepath for c in _cpu_pool._blas_controller_locked().lib_controllers}

    def blas_threads():  # a BLAS loaded later in this process (another test's import) is not ours
        return [
            i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and i["filepath"] in ours
        ]

    entered = [threading.Event(), threading.Event()]
    release = [threading.Event(), threading.Event()]
    seen = []

    def part(a, b, k):
        if a == 0:  # one part of each call holds it open until the test lets it go
            entered[k].set()
            assert release[k].wait(timeout=60)
        seen.append(blas_threads())

    def call(k):
        _cpu_pool.run_split(lambda a, b: part(a, b, k), 10, 2)

    before = blas_threads()  # BLAS's own default: one thread per core (threadpool_limits would pin it)
    if not before or max(before) < 2:
        pytest.skip("BLAS runs one thread here already")
    ts = [threading.Thread(target=call, args=(k,)) for k in (0, 1)]
    try:
        ts[0].start()
        assert entered[0].wait(timeout=60)
        ts[1].start()
        assert entered[1].wait(timeout=60)
        release[0].set()
        ts[0].join(timeout=60)
        assert blas_threads() == [1] * len(before)  # the second call still runs: the limit holds
    finally:  # never leave a pool thread waiting
        for r in release:
            r.set()
        for t in ts:
            if t.is_alive():
                t.join(timeout=60)
    assert blas_threads() == before
    assert len(seen) == 4 and all(t == [1] * len(before) for t in seen)
