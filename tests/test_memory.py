"""Memory bounds on the CPU: the peak of a call, chunking under a tiny budget, MemoryError for sizes
that cannot fit.

tracemalloc sees NumPy's array allocations (NumPy reports them to it), so the peak measured around
one call is what that call allocated on top of its input. The contract (docs/reliability.md): at
most the gradient (unless out= is given) + the workspace budget + a fixed overhead. The overhead is
NumPy's ufunc buffers (np.getbufsize() elements per operand and thread, used by matmul on strided batches)
plus the (m,) float64 loss vector; it does not grow with the input.
"""

from __future__ import annotations

import os
import re
import tracemalloc
import warnings

import numpy as np
import pytest

import gpu_orthol1 as ol1
from gpu_orthol1 import _numpy_dev

from .helpers import make
from .reference import check

SHAPE = (64, 512, 32)  # l, m, n: 4 MiB of float32; all m Gram matrices would take 2 MiB
BUDGET = 64 << 10  # a tiny workspace: 16 float32 slices of 32x32 per chunk


def _overhead(m):
    # NumPy's ufunc buffers are per thread: small-slice calls split the slices over a pool of cpu_count threads
    return 3 * np.getbufsize() * 8 * (os.cpu_count() or 1) + 4 * 8 * m + (16 << 10)


def _peak(fn):
    """Bytes allocated at the peak of fn(), over what was allocated when it started."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, result


@pytest.mark.parametrize("budget", [BUDGET, None], ids=["64KiB", "default"])
@pytest.mark.parametrize("mode", ["loss", "new", "out", "accumulate"])
@pytest.mark.parametrize("layout", ["C", "F", "every2"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_peak_within_gradient_plus_one_chunk(dtype, layout, mode, budget, rng):
    phi = make(np, rng, SHAPE, dtype, layout, 1)
    out = None if mode in ("loss", "new") else make(np, rng, SHAPE, dtype, "C", 1)
    kw = dict(workspace_bytes=budget)
    if out is not None:
        kw.update(out=out, accumulate=mode == "accumulate")

    def call():
        if mode == "loss":
            return ol1.loss(phi, **kw), None
        return ol1.loss_and_grad(phi, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ol1.CopyWarning)
        call()  # compile and warm up first: numba's compiler allocates through Python
        peak, (_, g) = _peak(call)
    grad_bytes = g.nbytes if mode == "new" else 0
    limit = grad_bytes + (budget or ol1._checks.CPU_DEFAULT_WORKSPACE) + _overhead(SHAPE[1])
    assert peak <= limit, (
        f"peak {peak} bytes > gradient {grad_bytes} + workspace {budget} + overhead "
        f"{_overhead(SHAPE[1])} (input {phi.nbytes} bytes)"
    )
    if budget is not None:
        # what a call without chunking would hold: every Gram matrix at once (float32 or float64)
        all_grams = SHAPE[1] * SHAPE[2] ** 2 * (8 if dtype == np.float64 else 4)
        assert peak < grad_bytes + all_grams, "the tiny budget did not bound the workspace"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["C", "F", "every2"])
def test_tiny_budget_runs_in_chunks(dtype, layout, rng, monkeypatch):
    shape = (9, 11, 5)
    phi = make(np, rng, shape, dtype, layout, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ol1.CopyWarning)
        with pytest.raises(MemoryError, match=r"one slice needs (\d+) bytes") as e:
            ol1.loss_and_grad(phi, workspace_bytes=1)
        per_slice = int(re.search(r"needs (\d+) bytes", str(e.value)).group(1))
        grams = []
        real = _numpy_dev.NumpyDevice.gram

        def spy(src, cc, ws):
            grams.append(cc)
            return real(src, cc, ws)

        monkeypatch.setattr(_numpy_dev.NumpyDevice, "gram", staticmethod(spy))
        for per_chunk in (1, 2, 4):
            grams.clear()
            loss, grad = ol1.loss_and_grad(phi, 0.7, workspace_bytes=per_chunk * per_slice + per_slice - 1)
            want = [per_chunk] * (shape[1] // per_chunk) + (
                [shape[1] % per_chunk] if shape[1] % per_chunk else []
            )
            assert grams == want, f"Gram GEMM batches {grams}, expected chunks of {per_chunk}"
            check(phi, loss, grad, 0.7, 1, "sum", dtype)


def test_workspace_smaller_than_a_slice_names_the_sizes(rng, monkeypatch):
    phi = rng.standard_normal((7, 3, 10)).astype(np.float32)
    need = 10 * 10 * 4  # one float32 Gram, the CPU backend's whole per-slice need
    for kw in ({"workspace_bytes": need - 1}, {}):
        if not kw:
            monkeypatch.setenv("GPU_ORTHOL1_WORKSPACE_BYTES", str(need - 1))
        for fn in (ol1.loss, ol1.grad, ol1.loss_and_grad):
            with pytest.raises(MemoryError) as e:
                fn(phi, **kw)
            msg = str(e.value)
            assert f"one slice needs {need} bytes" in msg and "Gram 10x10, l=7" in msg
            assert f"workspace budget of {need - 1} bytes" in msg
    monkeypatch.setenv("GPU_ORTHOL1_WORKSPACE_BYTES", str(need))
    check(phi, *ol1.loss_and_grad(phi), 1.0, 1, "sum", np.float32)  # exactly one slice fits


@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")  # a zero-stride view is staged
def test_input_that_cannot_fit_fails_cleanly():
    # a 2 PiB broadcast view: one slice's Gram alone needs 64 GiB (more than this machine has),
    # the gradient 2 PiB
    phi = np.lib.stride_tricks.as_strided(np.ones(1, np.float32), (1 << 16, 1 << 16, 1 << 17), (0, 0, 0))
    with pytest.raises(
        MemoryError, match=r"one slice needs \d+ bytes of workspace \(Gram 131072x131072, l=65536\)"
    ):
        ol1.loss(phi, backend="numpy", workspace_bytes=1 << 30)
    # the default budget admits one slice; allocating it then fails with the sizes named
    with pytest.raises(
        MemoryError,
        match=r"could not allocate the workspace: 1 slice\(s\) of \d+ bytes "
        r"\(Gram 131072x131072, l=65536",
    ):
        ol1.loss(phi, backend="numpy")
    with pytest.raises(MemoryError, match=r"Unable to allocate 2\.00 PiB"):
        ol1.grad(phi, backend="numpy")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["C", "F", "every2"])
@pytest.mark.parametrize("threads", [1, 2])
def test_phi_chunk_cap_bounds_chunks(dtype, layout, threads, rng, monkeypatch):
    """A CPU call takes at most CPU_CHUNK_PHI_BYTES of phi per chunk (computed in its GEMM dtype,
    float32 for float16), on one thread or split over two, with the losses and gradient unchanged;
    a call with a Gram hook (the metrics) and `chunk_for` (what the distributed ranks agree on)
    keep the budget's chunks."""
    from gpu_orthol1 import _cache, _cpu_pool, _plan

    shape = (9, 11, 5)  # l, m, n
    per_slice = 9 * 5 * max(np.dtype(dtype).itemsize, 4)
    monkeypatch.setattr(_cpu_pool, "CPU_CHUNK_PHI_BYTES", 3 * per_slice + per_slice - 1)  # 3 slices
    if threads == 2:  # as on a 2-CPU machine, whatever this one has
        monkeypatch.setattr(_cpu_pool, "CPU_PARALLEL_MIN_FLOPS", 0)
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
    phi = make(np, rng, shape, dtype, layout, 1)
    grams = []
    real = _numpy_dev.NumpyDevice.gram

    def spy(src, cc, ws):
        grams.append(cc)
        return real(src, cc, ws)

    monkeypatch.setattr(_numpy_dev.NumpyDevice, "gram", staticmethod(spy))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ol1.CopyWarning)
        p = ol1.plan(phi, 0.7, backend="numpy", kernel="gemm")  # not the fused loop of small calls
        assert p._threads == threads
        loss, grad = p(phi)
        # each part cuts its own range into chunks of 3: 11 slices on one part, 5 + 6 on two
        want = [3, 3, 3, 2] if threads == 1 else [2, 3, 3, 3]
        assert sorted(grams) == sorted(want), f"Gram GEMM batches {grams}, expected {want}"
        check(phi, loss, grad, 0.7, 1, "sum", dtype)
        assert _plan.chunk_for(p, True) == shape[1]  # the budget holds every slice's Gram
        grams.clear()
        try:
            ol1.metrics(phi, backend="numpy")
        finally:  # its cached plan was made under the patched cap
            _cache.clear_cache()
        assert grams == [shape[1]]


def test_bench_cpu_chunk_cap_and_midsize_run(tmp_path):
    """bench/bench_cpu_chunk_cap.py (its capped/uncapped results check included) and
    bench_cpu_midsize.py's paired ratios, end to end on shapes whose chunks the cap changes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shapes = "256x40x64,64x5x32"  # 64 KiB of phi a slice: 16 slices a chunk against all 40
    for script, extra in (
        ("bench_cpu_chunk_cap.py", ["--rounds", "2"]),
        ("bench_cpu_midsize.py", ["--runs", "2"]),
    ):
        out = tmp_path / f"{script}.json"
        proc = subprocess.run(
            [sys.executable, str(root / "bench" / script), "--shapes", shapes, "--out", str(out), *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = json.loads(out.read_text())["results"]
        assert [r["shape"] for r in rows] == [[256, 40, 64], [64, 5, 32]]
        if script == "bench_cpu_chunk_cap.py":
            assert rows[0]["chunk"] == {"capped": 16, "uncapped": 40}
            assert rows[1]["chunk"]["capped"] == rows[1]["chunk"]["uncapped"] == 5
            for r in rows:
                for k in ("paired", "paired_kept"):
                    assert r[k] > 0 and r[k + "_p25_p75"][0] <= r[k + "_p25_p75"][1]
        else:
            for r in rows:
                assert r["paired"]["ours_over_limit"] > 0 and r["paired"]["ours_over_naive"] > 0
                assert r["above_1_10"] == (r["paired"]["ours_over_limit"] > 1.10)
                # the in-layout limit over the contiguous one, each round's own (the slice-order layout)
                a = {k: np.asarray(v) for k, v in r["ms_all"].items()}
                lay = np.minimum(a["layout_split"], a["layout_blas_threads"])
                lim = np.minimum(a["limit_split"], a["limit_blas_threads"])
                assert r["paired"]["layout_limit_over_limit"] == pytest.approx(np.median(lay / lim), rel=0.02)


def test_bench_cpu_threads_spin_runs(tmp_path):
    """bench/bench_cpu_threads_spin.py end to end: one process per method, each preceding call."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "spin.json"
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "bench_cpu_threads_spin.py"), "--shapes", "64x5x32"]
        + ["--pairs", "2", "--calls", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["before"] for r in rows] == ["none", "small", "numpy"]
    for r in rows:  # (the script itself checks that the pool ran exactly in the split processes)
        assert len(r["bt_ms"]) == len(r["split_ms"]) == 2 and min(r["bt_ms"] + r["split_ms"]) > 0
        ratios = sorted(s / b for b, s in zip(r["bt_ms"], r["split_ms"], strict=True))
        assert r["split_over_bt"] == pytest.approx(sum(ratios) / 2)
    bad = subprocess.run(
        [sys.executable, str(root / "bench" / "bench_cpu_threads_spin.py"), "--before", "smal"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--before takes none, small, numpy (got smal)" in bad.stderr


def _layout_floor_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_cpu_layout_floor.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_layout_floor", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_layout_floor_methods_compute_phi_s(chunk, rng):
    """bench_cpu_layout_floor's GEMM methods each write Phi_i S_i where phi's slices lie (axis 1), and
    its Gram methods Phi_i^T Phi_i, on chunks that do and do not divide m: the float64 products, not
    each other, are the reference."""
    from threadpoolctl import ThreadpoolController

    lf = _layout_floor_module()
    x = rng.standard_normal((37, 5, 6)).astype(np.float32)
    fns, S = lf.methods(x, chunk, ThreadpoolController().select(user_api="blas"))
    x64 = x.astype(np.float64)
    want = np.einsum("lmk,mkn->lmn", x64, S.astype(np.float64))
    assert set(np.unique(S)) <= {-1.0, 1.0}
    assert set(fns) == {*lf.GEMMS, "gram", "gram_1t"}
    for k in lf.GEMMS:
        got = fns[k]()
        assert got.shape == x.shape, k
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=k)
    want_g = np.einsum("lmj,lmk->mjk", x64, x64)
    for k in ("gram", "gram_1t"):
        np.testing.assert_allclose(fns[k](), want_g, rtol=1e-5, atol=1e-5, err_msg=k)


def test_layout_floor_refuses_a_pool_point(monkeypatch, rng):
    """A shape whose plan splits the slices over the pool is refused (the methods run on BLAS's
    threads, one part): (64, 64, 64) float32 takes the pool on two CPUs."""
    lf = _layout_floor_module()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(SystemExit, match="splits its slices over 2 pool threads"):
        lf.time_shape((64, 64, 64), 1, rng)


def test_bench_cpu_layout_floor_runs(tmp_path):
    """bench/bench_cpu_layout_floor.py end to end: the plan's chunk, every method's paired ratio, the
    CPU's details and the seed in the record; --rounds 0 and an empty --shapes refused."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = str(root / "bench" / "bench_cpu_layout_floor.py")
    out = tmp_path / "floor.json"
    proc = subprocess.run(
        [sys.executable, script, "--shapes", "256x40x64,64x5x32", "--rounds", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc["cpu_detail"]) == {"family", "model", "stepping", "isa", "l2_bytes", "blas"}
    rows = doc["results"]
    assert [r["shape"] for r in rows] == [[256, 40, 64], [64, 5, 32]]
    assert [r["chunk"] for r in rows] == [16, 5]  # 64 KiB of phi a slice: 16 a chunk under the 1 MiB cap
    names = {"limit_1t", "gram", "gram_1t", "layout_whole", "layout", "stage_in", "stage_out", "ours"}
    names |= {"ours_axis0", "copy_axis0"}
    for r in rows:
        assert r["threads"] == 1
        assert set(r["paired"]) == names and min(r["paired"].values()) > 0
        assert set(r["ms"]) == names | {"limit"} and min(r["ms"].values()) > 0
        assert r["gram_threads"] > 0 and r["ours_over_layout"] > 0 and r["ours_over_axis0"] > 0
        assert r["copy_axis0_over_ours"] > 0
    assert doc["seed"] == 0 and doc["rounds"] == 2
    for args, msg in (
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--shapes", "none"], "names no shape"),
    ):
        bad = subprocess.run(
            [sys.executable, script, *args, "--out", str(tmp_path / "x.json")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2 and msg in bad.stderr, bad.stderr
        assert not (tmp_path / "x.json").exists()


def test_call_chunk_reads_the_chunk_a_call_took(rng):
    """gpu_orthol1.bench.runner.call_chunk: the chunk of a plan's hook-free calls under the 1 MiB cap
    (64 KiB of phi a slice: 16 of 40 slices), and a clear error before any call."""
    from gpu_orthol1.bench.runner import call_chunk

    x = rng.standard_normal((256, 40, 64)).astype(np.float32)
    p = ol1.plan(x, 1e-3, backend="numpy", kernel="gemm")
    with pytest.raises(ValueError, match="expected one chunk size"):
        call_chunk(p)
    p(x)
    assert call_chunk(p) == 16
