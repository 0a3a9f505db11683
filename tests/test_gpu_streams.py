"""GPU reliability: concurrent CuPy streams, chunking under a tiny budget, inputs that cannot fit,
the NaN policy against the CPU backend, and a small sanitizer workload.

Every test here is `gpu`-marked: bench/gpu_check.sh runs them on the lent GPU
(GPU_ORTHOL1_TEST_GPU=1), and bench/gpu_sanitize.sh runs `test_sanitizer_smoke` under
compute-sanitizer. On a CPU-only machine they are skipped, which is not a pass.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

import gpu_orthol1 as ol1

from .helpers import make
from .reference import check

pytestmark = pytest.mark.gpu

DTYPES = (np.float16, np.float32, np.float64)


@pytest.fixture
def cp():
    import cupy

    return cupy


def _inputs(cp, rng, count, shape=(48, 96, 24)):
    dtypes = [DTYPES[i % 3] for i in range(count)]
    return [make(cp, rng, shape, dt, ("C", "F")[i % 2], 1) for i, dt in enumerate(dtypes)]


def _check_against(cp, phi, loss, grad, beta, reduction="none"):
    check(cp.asnumpy(phi), cp.asnumpy(loss), cp.asnumpy(grad), beta, 1, reduction, phi.dtype)


def test_streams_in_one_thread_do_not_race(cp, rng):
    """Calls issued back to back on four non-blocking streams, no synchronization in between."""
    phis = _inputs(cp, rng, 4)
    serial = [ol1.loss_and_grad(p, 0.7, reduction="none") for p in phis]
    cp.cuda.Device().synchronize()
    streams = [cp.cuda.Stream(non_blocking=True) for _ in phis]
    outs = [cp.full(p.shape, 3.0, p.dtype) for p in phis]
    cp.cuda.Device().synchronize()
    results = []
    for _ in range(3):  # several rounds keep the streams' queues overlapping
        results = []
        for s, p, o in zip(streams, phis, outs, strict=True):
            with s:
                results.append(ol1.loss_and_grad(p, 0.7, reduction="none", out=o, workspace_bytes=20000))
    for s in streams:
        s.synchronize()
    for p, (l0, _g0), (l1, g1), o in zip(phis, serial, results, outs, strict=True):
        assert g1 is o
        _check_against(cp, p, l1, g1, 0.7)
        tol = 2e-3 if p.dtype == np.float16 else 1e-5
        np.testing.assert_allclose(cp.asnumpy(l1), cp.asnumpy(l0), rtol=tol)


def _at_once(count, body):
    """Run body(i) for i < count, each in its own thread, released together by a barrier; the
    exceptions raised, with their thread's index."""
    start = threading.Barrier(count)
    errors: list = []

    def run(i):
        try:
            start.wait()
            body(i)
        except Exception as e:  # returned with the thread's index
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_streams_in_threads_do_not_race(cp, rng):
    """Four threads, each on its own stream (CuPy keeps a cuBLAS handle per thread), at once."""
    phis = _inputs(cp, rng, 4, shape=(40, 120, 20))
    cp.cuda.Device().synchronize()
    results: list = [None] * len(phis)

    def worker(i):
        with cp.cuda.Stream(non_blocking=True) as s:
            for _ in range(4):
                out = ol1.loss_and_grad(phis[i], 1.1, reduction="none", workspace_bytes=(None, 30000)[i % 2])
            s.synchronize()
            results[i] = (cp.asnumpy(out[0]), cp.asnumpy(out[1]))

    errors = _at_once(len(phis), worker)
    assert not errors, errors
    for p, (loss, grad) in zip(phis, results, strict=True):
        check(cp.asnumpy(p), loss, grad, 1.1, 1, "none", p.dtype)


@pytest.mark.parametrize("kernel", ["fused", "gemm"])
def test_one_plan_on_streams_and_threads_keeps_each_calls_losses(cp, rng, kernel):
    """One plan shared by calls on four streams back to back (no synchronization in between) and by
    four threads at once on one stream: each call returns its own loss, bit for bit its serial one.
    A plan keeps its per-slice losses per stream (`_gpu_calls.StreamLosses`) and launches the loss
    reduction under its lock: a race would hand one call another's loss."""
    phis = [make(cp, rng, (64, 300, 32), np.float32, "C", 1) for _ in range(4)]
    p = ol1.plan(phis[0], 0.7, kernel=kernel)
    serial = [tuple(cp.asnumpy(a) for a in p(x)) for x in phis]
    check(cp.asnumpy(phis[0]), serial[0][0], serial[0][1], 0.7, 1, "sum", np.float32)
    assert len({s[0].tobytes() for s in serial}) == 4  # distinct losses: a swap would show
    streams = [cp.cuda.Stream(non_blocking=True) for _ in phis]
    for _ in range(3):
        results = []
        for s, x in zip(streams, phis, strict=True):
            with s:
                results.append(p(x))
    for s in streams:
        s.synchronize()
    for (l0, g0), (l1, g1) in zip(serial, results, strict=True):
        assert cp.asnumpy(l1).tobytes() == l0.tobytes()
        assert np.array_equal(cp.asnumpy(g1), g0)
    assert len(p._gpu.losses) == 5  # the default stream's and one per stream

    got: list = [[] for _ in phis]

    def worker(i):  # every thread on the default stream
        for _ in range(10):
            got[i].append(p(phis[i])[0])

    errors = _at_once(len(phis), worker)
    cp.cuda.Device().synchronize()
    assert not errors, errors
    for (l0, _), losses in zip(serial, got, strict=True):
        assert all(cp.asnumpy(x).tobytes() == l0.tobytes() for x in losses)
    assert len(p._gpu.losses) == 5


def test_fused_call_in_a_thread_without_a_context(cp, rng):
    """A fresh thread whose first CUDA work is a fused plan's call (out= given, the loss's buffer
    from CuPy's pool: no CUDA runtime call before the launch) has no current context; the launch,
    straight to the driver, sets one up instead of failing with CUDA_ERROR_INVALID_CONTEXT."""
    phi = make(cp, rng, (64, 300, 32), np.float32, "C", 1)
    p = ol1.plan(phi, 0.7, kernel="fused")
    want = tuple(cp.asnumpy(a) for a in p(phi))
    out = cp.empty_like(phi)
    cp.cuda.Device().synchronize()
    seen: dict = {}

    def worker():
        try:
            seen["context_before"] = cp.cuda.driver.ctxGetCurrent()
            loss, grad = p(phi, out=out)
            cp.cuda.get_current_stream().synchronize()
            seen["got"] = (cp.asnumpy(loss), cp.asnumpy(grad))
        except Exception as e:  # surfaced below
            seen["error"] = e

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert "error" not in seen, seen["error"]
    assert seen["context_before"] == 0  # the case this test is for
    assert seen["got"][0].tobytes() == want[0].tobytes() and np.array_equal(seen["got"][1], want[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_tiny_budget_chunks_equal_unchunked(cp, rng, dtype):
    phi = make(cp, rng, (64, 300, 24), dtype, "C", 1)
    ref_loss, ref_grad = ol1.loss_and_grad(phi, 0.9, reduction="none")
    with pytest.raises(MemoryError, match=r"one slice needs (\d+) bytes") as e:
        ol1.loss_and_grad(phi, 0.9, workspace_bytes=1)
    per = int(re.search(r"needs (\d+) bytes", str(e.value)).group(1))
    for slices in (1, 7, 64):
        loss, grad = ol1.loss_and_grad(phi, 0.9, reduction="none", workspace_bytes=slices * per)
        _check_against(cp, phi, loss, grad, 0.9)
        # per-slice losses agree to rounding (cuBLAS may pick another kernel for another batch count)
        np.testing.assert_allclose(
            cp.asnumpy(loss), cp.asnumpy(ref_loss), rtol=1e-5 if dtype != np.float64 else 1e-12
        )
    _check_against(cp, phi, ref_loss, ref_grad, 0.9)


def test_input_that_cannot_fit_raises_memoryerror(cp):
    # 4 PiB as a view; one slice's Gram alone is 256 GiB, more than any card has
    phi = cp.broadcast_to(cp.ones(1, np.float32), (1 << 16, 1 << 16, 1 << 18))
    with pytest.raises(MemoryError, match=r"one slice needs \d+ bytes of workspace \(Gram 262144x262144"):
        ol1.loss(phi, workspace_bytes=1 << 30)
    # the default budget admits one slice, whose allocation then fails with the sizes named
    with pytest.raises(MemoryError, match=r"could not allocate the workspace: 1 slice\(s\) of \d+ bytes"):
        ol1.loss(phi)
    with pytest.raises(MemoryError) as e:  # cupy's OutOfMemoryError is a MemoryError
        ol1.grad(phi)
    # CuPy: "Out of memory allocating 281,474,976,710,656 bytes ..."
    assert re.search(r"\d[\d,.]* ?(bytes|TiB)", str(e.value)), f"the message names no size: {e.value}"
    # the device is still usable afterwards
    small = cp.asarray(np.random.default_rng(0).standard_normal((9, 4, 5)).astype(np.float32))
    _check_against(cp, small, *ol1.loss_and_grad(small, 1.0, reduction="none"), 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nonfinite_same_slices_as_cpu(cp, rng, dtype):
    h = make(np, rng, (20, 30, 12), dtype, "C", 1)
    flat = rng.choice(h.size, 6, replace=False)
    for k, idx in enumerate(flat):
        h[np.unravel_index(idx, h.shape)] = (np.nan, np.inf, -np.inf)[k % 3]
    with np.errstate(invalid="ignore"):
        cpu = ol1.loss_and_grad(h, 1.0, reduction="none", backend="numpy")
    gpu = ol1.loss_and_grad(cp.asarray(h), 1.0, reduction="none")
    bad = ~np.isfinite(h.astype(np.float64)).all(axis=(0, 2))
    assert bad.any()
    np.testing.assert_array_equal(np.isnan(cp.asnumpy(gpu[0])), bad)
    np.testing.assert_array_equal(np.isnan(cp.asnumpy(gpu[0])), np.isnan(cpu[0]))
    np.testing.assert_array_equal(np.isnan(cp.asnumpy(gpu[1])), np.isnan(cpu[1]))
    assert np.isnan(cp.asnumpy(gpu[1])[:, bad, :]).all()


def test_repeated_calls_bit_identical_gpu(cp, rng):
    for dtype in DTYPES:
        phi = make(cp, rng, (33, 70, 17), dtype, "C", 1)
        a = ol1.loss_and_grad(phi, 0.3, reduction="none", workspace_bytes=50000)
        for _ in range(3):
            b = ol1.loss_and_grad(phi, 0.3, reduction="none", workspace_bytes=50000)
            assert cp.asnumpy(a[0]).tobytes() == cp.asnumpy(b[0]).tobytes()
            assert cp.asnumpy(a[1]).tobytes() == cp.asnumpy(b[1]).tobytes()


@pytest.fixture
def no_memory_pool(cp):
    """Real cudaMalloc per array, so memcheck sees the bounds of each buffer (a pool hides overruns
    inside its larger blocks)."""
    cp.get_default_memory_pool().free_all_blocks()
    cp.cuda.set_allocator(None)
    yield
    cp.cuda.set_allocator(cp.get_default_memory_pool().malloc)


def test_sanitizer_smoke(cp, rng, no_memory_pool):
    """Small calls that reach every kernel variant: the sign pass's four block sizes (n = 3, 24, 64,
    100) and the fused kernel's 8 x 8 and 16 x 16 grids (n = 3, 24, 64; 100 is past its bound), each
    dtype, in-place and separate S, loss-only, chunked, accumulate into a Fortran out=, staged
    layouts, and a NaN slice. Run alone by bench/gpu_sanitize.sh under compute-sanitizer."""
    from gpu_orthol1.kernels import fused_small

    for n, l, m in ((3, 5, 4), (24, 9, 3), (64, 7, 2), (100, 6, 2)):
        for dtype in DTYPES:
            phi = make(cp, rng, (l, m, n), dtype, "C", 1)
            kernels = ("gemm", "fused") if fused_small.fits(n, dtype) else ("gemm",)
            for kernel in kernels:  # both paths, whichever kernel="auto" would pick
                loss, grad = ol1.plan(phi, 0.6, reduction="none", kernel=kernel)(phi)
                _check_against(cp, phi, loss, grad, 0.6)
                loss_only = ol1.plan(phi, 0.6, reduction="none", want="loss", kernel=kernel)(phi)
                np.testing.assert_array_equal(cp.asnumpy(loss_only), cp.asnumpy(loss))
    phi = make(cp, rng, (7, 9, 5), np.float32, "every2", 1)
    out = make(cp, rng, (7, 9, 5), np.float32, "F", 1)
    base = cp.asnumpy(out).copy()
    with pytest.warns(ol1.CopyWarning):
        with pytest.raises(MemoryError, match=r"one slice needs (\d+) bytes") as e:
            ol1.loss_and_grad(phi, 1.3, out=out, accumulate=True, workspace_bytes=1)
        per = int(re.search(r"needs (\d+) bytes", str(e.value)).group(1))
        loss, _ = ol1.loss_and_grad(phi, 1.3, out=out, accumulate=True, workspace_bytes=2 * per)  # 5 chunks
    check(cp.asnumpy(phi), cp.asnumpy(loss), cp.asnumpy(out), 1.3, 1, "sum", np.float32, grad_base=base)
    h = make(np, rng, (6, 5, 4), np.float16, "C", 1)
    h[2, 1, 3] = np.nan
    loss, grad = ol1.loss_and_grad(cp.asarray(h), 1.0, reduction="none")
    assert np.isnan(cp.asnumpy(loss)[1]) and np.isnan(cp.asnumpy(grad)[:, 1, :]).all()
    cp.cuda.Device().synchronize()
