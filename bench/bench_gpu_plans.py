"""The per-call cost on the GPU and the fused kernel's sweep: the figures issues 8 and 9 ask for.

    python3 bench/bench_gpu_plans.py --json $OUT/gpu_plans.json [--quick]     (on the GPU machine)
    python bench/bench_gpu_plans.py --dry                                      (CPU: parses, builds, exits)
    python bench/bench_gpu_plans.py --sweep-from RESULTS.json --plot SWEEP.png (any machine: the sweep's table)

All in one run on one card, each ratio against a baseline timed in the same run:

1. host: host (CPU) and device time per call, `cupyx.profiler.benchmark`, CuPy (64, 8, 32) float32:
   `ol1.loss_and_grad` (warm plan cache), a reused plan, a replayed CUDA graph (`plan.graph`); and
   host_breakdown: the host time of each step of a fused plan call at (64, 4096, 64) float32;
   host_gemm: the same for a two-GEMM plan call at (4096, 32, 128) float32 / tf32 / float16.
2. shapes: the reference shapes in float32 / tf32 / float16 through the two-GEMM path and (where
   n fits) the fused kernel, against `limit-cublas` (the raw two-GEMM bound: the bench's own method).
3. sweep: l*m*n fixed (2^24 elements) over n in {8, 16, 32, 64, 96, 128} and l in {64, 512}: fused vs
   two-GEMM vs the memory roofline (read phi + write the gradient at the measured copy bandwidth).
4. phases: host and device time of the Gram GEMM, the sign pass, the gradient GEMM and the loss
   reduction apart, against the whole call.
5. fused_resources: the fused kernel's registers, shared memory and blocks per SM per config.
6. rule_gaps: both paths per call where the `auto` rule has no measurement yet (mid l at n > 32,
   l > 512, float64, accumulate=True).
7. fused_kernel (`--kernel-only`, its own JSON): the fused kernel's launch alone, device time, at the
   issue's shape and at 2^26 elements (where the kernel, not the per-call host cost, decides: the
   moonshot's fraction of the memory roofline), for its default config, vec = 1 (the column layout
   the first H200 run measured) and half the tile rows (more blocks per SM): the A/B that decides
   the defaults.
8. profile: a torch.profiler kernel table (every kernel, cuBLAS's and Numba's) for one call of each
   path, written as text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _bench(fn, n_repeat):
    from cupyx.profiler import benchmark

    r = benchmark(fn, n_repeat=n_repeat, n_warmup=5)
    cpu = float(sorted(r.cpu_times)[len(r.cpu_times) // 2] * 1e3)
    gpu = float(sorted(r.gpu_times[0])[len(r.gpu_times[0]) // 2] * 1e3)
    return {"host_ms": cpu, "device_ms": gpu}


def host_costs(quick):
    """Per-call cost at (64, 8, 32) float32, where `auto` takes the fused kernel: the functional API
    as users call it, and each path forced (functional API, reused plan, graph replay)."""
    import cupy

    import gpu_orthol1 as ol1
    from gpu_orthol1 import _checks

    phi = cupy.random.standard_normal((64, 8, 32), dtype=cupy.float32) / 8
    n = 50 if quick else 200
    out = {"loss_and_grad": _bench(lambda: ol1.loss_and_grad(phi, 1e-3), n)}
    for kernel in ("fused", "gemm"):
        before = os.environ.get(_checks.ENV_KERNEL)
        os.environ[_checks.ENV_KERNEL] = kernel  # the functional API on this path, whatever the rule says
        try:
            out[f"loss_and_grad_{kernel}"] = _bench(lambda: ol1.loss_and_grad(phi, 1e-3), n)
        finally:
            if before is None:
                del os.environ[_checks.ENV_KERNEL]
            else:
                os.environ[_checks.ENV_KERNEL] = before
        p = ol1.plan(phi, 1e-3, kernel=kernel)
        out[f"plan_{kernel}"] = _bench(lambda p=p: p(phi), n)
        out[f"graph_replay_{kernel}"] = _bench(p.graph(phi).replay, n)
    return out


def host_breakdown(quick):
    """Host time of each step before and after the fused kernel's launch in a plan call at
    (64, 4096, 64) float32 (median microseconds, time.perf_counter, no device wait inside): where the
    per-call cost above the kernel goes when the device waits for the host."""
    import time

    import cupy
    import numpy as np

    import gpu_orthol1 as ol1

    phi = cupy.random.standard_normal((64, 4096, 64), dtype=cupy.float32) / 8
    pl = ol1.plan(phi, 1e-3, kernel="fused")
    pl(phi)
    go = next(iter(pl._gpu.launchers.values()))
    grad, losses = cupy.empty_like(phi), cupy.empty(pl.m, dtype=np.float64)
    addrs = (phi.data.ptr, grad.data.ptr, losses.data.ptr)
    steps = {
        "plan_call": lambda: pl(phi),
        "check_phi": lambda: pl._mismatch(phi),
        "empty_grad": lambda: cupy.empty(phi.shape, phi.dtype),
        "empty_losses": lambda: cupy.empty(
            pl.m, dtype=np.float64
        ),  # what a call allocated before it kept them
        "kept_losses": lambda: pl._gpu.losses.get(cupy.cuda.get_current_stream()),
        "bind": lambda: pl._gpu.dev.bind(cublas=False),
        "fused_call": lambda: pl._gpu.fused(pl._view, phi, grad, losses, 2e-3, False, True),
        "bound_launch": lambda: go(*addrs, 2e-3, False),
        "reduce": lambda: pl._reduce(losses, 1e-3),
    }
    n = 100 if quick else 400
    out = {}
    for name, fn in steps.items():
        times = []
        for k in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if k % 50 == 49:  # keep the launch queue short
                cupy.cuda.Device().synchronize()
        cupy.cuda.Device().synchronize()
        out[name + "_us"] = float(np.median(times) * 1e6)
    return out


def host_gemm(quick):
    """Host time of a two-GEMM plan call and of each of its steps (issue 22 item 4: 137 us per call on
    an H100 against 33 us on the fused path), median microseconds by time.perf_counter with no device
    wait inside, at (4096, 32, 128) float32 / tf32 / float16 and (64, 4096, 64) float32: the figure
    that says whether a plan call's host time is <= 60 us (the issue's target), and what of it goes
    where. bench/host_gemm_cpu.py gives the same call's Python alone on a CPU."""
    rows = []
    for shape, dt, precision in (
        ((4096, 32, 128), "float32", "highest"),
        ((4096, 32, 128), "float32", "tf32"),
        ((4096, 32, 128), "float16", "highest"),
        ((64, 4096, 64), "float32", "highest"),
    ):
        rows.append(_host_gemm_row(shape, dt, precision, quick))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _host_gemm_row(shape, dt, precision, quick):
    import time

    import cupy
    import numpy as np

    import gpu_orthol1 as ol1
    from gpu_orthol1 import _driver

    l, m, n = shape
    phi = (cupy.random.standard_normal(shape, dtype=cupy.float32) / l**0.5).astype(dt)
    p = ol1.plan(phi, 1e-3, kernel="gemm", precision=precision)
    p(phi)
    sz = p._chunks.sizes_for(True, False, False, False, 1, hooked=False)[0]
    wsb = _driver.workspace(p._alloc, sz, l, n, phi.dtype)
    grad = cupy.empty_like(phi)
    V, Vo = p._view(phi), p._view(grad)
    src = _driver.StridedChunk(V, _driver.layout_of(V), 0)
    dst = _driver.StridedChunk(Vo, _driver.layout_of(Vo), 0)
    losses = cupy.empty(m, cupy.float64)
    dev = p._gpu.dev
    part = wsb.get("partials")
    cc = min(m, sz.chunk)
    ws, sgn = wsb["ws"][:cc], wsb["sgn"][:cc]
    part = None if part is None else part[:cc]
    steps = {
        "plan_call": lambda: p(phi),
        "check_call": lambda: p._check_call(phi, None, False),
        "empty_grad": lambda: cupy.empty(phi.shape, phi.dtype),
        "bind": lambda: dev.bind(),
        "workspace_new": lambda: _driver.workspace(p._alloc, sz, l, n, phi.dtype),
        "set_blas_workspace_x2": lambda: (dev.set_blas_workspace(wsb["blas"]), dev.set_blas_workspace(None)),
        "gram": lambda: dev.gram(src, cc, wsb["ws"]),
        "sign": lambda: dev.sign_abs(ws, sgn, n, losses, 0, 1.0, True, partials=part),
        "grad": lambda: dev.grad(src, dst, cc, wsb["sgn"], 2e-3, 0.0),
        "reduce": lambda: p._reduce(losses, 1e-3),
    }
    k = 100 if quick else 400
    row = {"shape": shape, "dtype": dt, "precision": precision, "chunks": -(-m // sz.chunk)}
    for name, fn in steps.items():
        times = []
        for i in range(k):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if i % 20 == 19:  # keep the launch queue short: host time, not back-pressure
                cupy.cuda.Device().synchronize()
        cupy.cuda.Device().synchronize()
        row[name + "_us"] = float(np.median(times) * 1e6)
    return row


def _synced(fn, n_repeat):
    """Wall time of fn() plus a wait for the whole device (median, ms): what a peer on its own stream
    (JAX, torch) costs per call, and ours measured the same way for the ratio."""
    from cupyx.profiler import benchmark

    from gpu_orthol1.bench.base import gpu_sync

    def call():
        fn()
        gpu_sync()

    r = benchmark(call, n_repeat=n_repeat, n_warmup=3)
    return float(sorted(r.cpu_times)[len(r.cpu_times) // 2] * 1e3)


# rounds of the paired fused / limit-cublas ratio in `shapes`
ROUNDS = 7


def shapes(quick):
    import cupy
    import numpy as np

    import gpu_orthol1 as ol1
    from gpu_orthol1.bench import base as bench_base
    from gpu_orthol1.bench import methods as bm
    from gpu_orthol1.kernels import fused_small

    rows = []
    cases = [
        ((4096, 32, 128), "float32", "highest"),
        ((64, 4096, 64), "float32", "highest"),
        ((512, 64, 512), "float32", "highest"),
        ((4096, 32, 128), "float32", "tf32"),
        ((4096, 32, 128), "float16", "highest"),
        ((64, 4096, 64), "float16", "highest"),
    ]
    for shape, dt, prec in cases:
        host = (np.random.default_rng(0).standard_normal(shape) / np.sqrt(shape[0])).astype(dt)
        phi = cupy.asarray(host)
        case = bench_base.Case(shape[0], shape[1], shape[2], np.dtype(dt), "ref", [host, host.copy()])
        lim = bm._limit("gpu", prec).prepare(case)
        row = {
            "shape": shape,
            "dtype": dt,
            "precision": prec,
            "limit_cublas_ms": _bench(lambda lim=lim: lim.call(0), 20 if quick else 50)["device_ms"],
        }
        for kernel in ("gemm", "fused"):
            if kernel == "fused" and (prec != "highest" or not fused_small.fits(shape[2], dt)):
                continue
            pl = ol1.plan(phi, 1e-3, precision=prec, kernel=kernel)
            t = _bench(lambda pl=pl, phi=phi: pl(phi), 20 if quick else 50)
            row[f"{kernel}_ms"] = max(t["device_ms"], t["host_ms"])
            row[f"{kernel}_x_limit"] = row[f"{kernel}_ms"] / row["limit_cublas_ms"]
            if prec == "highest":  # the same call replayed from a CUDA graph (`plan.graph`): no host work
                g = pl.graph(phi)
                row[f"{kernel}_graph_ms"] = _bench(g.replay, 20 if quick else 50)["device_ms"]
                del g
            if prec == "highest":
                row[f"{kernel}_synced_ms"] = _synced(lambda pl=pl, phi=phi: pl(phi), 20 if quick else 50)
            if kernel == "fused":
                # the ratio again in alternating rounds (the limit, then the call, each a median of
                # its own), so that a drift of the card or the host over the run falls on both
                ratios = []
                for _ in range(ROUNDS):
                    base = _bench(lambda lim=lim: lim.call(0), 20)["device_ms"]
                    t = _bench(lambda pl=pl, phi=phi: pl(phi), 20)
                    ratios.append(max(t["device_ms"], t["host_ms"]) / base)
                row["fused_x_limit_rounds"] = ratios
                row["fused_x_limit_median"] = float(np.median(ratios))
        if prec == "highest":  # peers, timed with a device-wide wait like ours' _synced_ms
            for meth in (bm._jax("gpu"), bm._torch("gpu", False)):
                try:
                    ok, why = meth.available()
                    if not ok:
                        row[f"{meth.name}_ms"] = f"unavailable: {why}"
                        continue
                    prep = meth.prepare(case)
                    row[f"{meth.name}_synced_ms"] = _synced(
                        lambda prep=prep: prep.call(0), 20 if quick else 50
                    )
                    del prep
                except Exception as e:
                    row[f"{meth.name}_ms"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def sweep(quick):
    import cupy

    import gpu_orthol1 as ol1
    from gpu_orthol1.bench import base as bench_base
    from gpu_orthol1.kernels import fused_small

    bw = bench_base.d2d_bandwidth()
    total = 1 << (22 if quick else 24)
    rows = []
    for l in (64, 512):
        for n in (8, 16, 32, 64, 96, 128):
            m = max(1, total // (l * n))
            phi = cupy.random.standard_normal((l, m, n), dtype=cupy.float32) / l**0.5
            row = {"l": l, "m": m, "n": n, "roofline_ms": 2 * phi.nbytes / bw * 1e3}
            for kernel in ("gemm", "fused"):
                if kernel == "fused" and not fused_small.fits(n, "float32"):
                    continue
                pl = ol1.plan(phi, 1e-3, kernel=kernel)
                t = _bench(lambda pl=pl, phi=phi: pl(phi), 10 if quick else 30)
                row[f"{kernel}_ms"] = max(t["device_ms"], t["host_ms"])
                row[f"{kernel}_host_ms"] = t["host_ms"]  # at small sizes the host cost decides: keep both
                row[f"{kernel}_device_ms"] = t["device_ms"]
                row[f"{kernel}_x_roofline"] = row[f"{kernel}_ms"] / row["roofline_ms"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return {"copy_bandwidth_GBps": bw / 1e9, "rows": rows}


def rule_gaps(quick):
    """Per-call time of both paths at the shapes that set `fused_wins`'s bounds besides the sweep
    (the comment above FUSED_RULE in gpu_orthol1/_device.py quotes them): l = 128 and 256 at n = 64,
    l = 128 at n = 96, l = 1024 and 2048 at n <= 32, float64, and accumulate=True (the fused kernel
    then reads each gradient element before writing it)."""
    import cupy

    import gpu_orthol1 as ol1

    cases = [
        (128, 1024, 64, "float32", False),
        (256, 512, 64, "float32", False),
        (128, 682, 96, "float32", False),
        (1024, 256, 16, "float32", False),
        (1024, 128, 32, "float32", False),
        (2048, 256, 8, "float32", False),
        (2048, 128, 16, "float32", False),
        (64, 2048, 32, "float64", False),
        (64, 1024, 64, "float64", False),
        (64, 4096, 64, "float32", True),
        (64, 2048, 32, "float32", True),
        (64, 4096, 64, "float16", True),
    ]
    rows = []
    for l, m, n, dt, acc in cases:
        phi = (cupy.random.standard_normal((l, m, n), dtype=cupy.float64) / l**0.5).astype(dt)
        out = cupy.random.standard_normal(phi.shape, dtype=cupy.float64).astype(dt)
        row = {"l": l, "m": m, "n": n, "dtype": dt, "accumulate": acc}
        for kernel in ("gemm", "fused"):
            try:
                pl = ol1.plan(phi, 1e-3, kernel=kernel)
                fn = (
                    (lambda pl=pl, phi=phi, out=out: pl(phi, out=out, accumulate=True))
                    if acc
                    else (lambda pl=pl, phi=phi: pl(phi))
                )
                t = _bench(fn, 10 if quick else 30)
                row[f"{kernel}_ms"] = max(t["device_ms"], t["host_ms"])
                row[f"{kernel}_host_ms"], row[f"{kernel}_device_ms"] = t["host_ms"], t["device_ms"]
            except Exception as e:
                row[f"{kernel}_error"] = f"{type(e).__name__}: {e}"
        if "fused_ms" in row and "gemm_ms" in row:
            row["fused_over_gemm"] = row["fused_ms"] / row["gemm_ms"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def fused_resources(quick):
    """Registers, shared and local memory per block of the fused kernel's default configs (Numba reads
    them from the cubin) and the blocks per SM they allow (the driver's occupancy calculator)."""
    from numba import cuda

    from gpu_orthol1.kernels import fused_small as fs

    ctx = cuda.current_context()
    rows = []
    for n, dt, vec in (
        (8, "float32", None),
        (16, "float32", None),
        (32, "float32", None),
        (64, "float32", None),
        (64, "float32", 1),
        (96, "float32", None),
        (64, "float16", None),
        (32, "float64", None),
        (64, "float64", None),
    ):
        cfg = fs.fused_config(64, n, dt, vec=vec)
        kern = fs.get_fused_kernel(cfg)
        sig = f"void({dt}[:, :, :], {dt}[:, :, :], float64[:], int64, {cfg.acc}, boolean, boolean)"
        row = {
            "n": n,
            "dtype": dt,
            "l": 64,
            "config": cfg._asdict(),
            "shared_bytes_formula": fs.shared_bytes(cfg),
        }
        try:
            row.update(fs.resource_usage(kern, sig))
            cufunc = kern.compile(sig)._codelibrary.get_cufunc()
            blocks = ctx.get_active_blocks_per_multiprocessor(cufunc, cfg.threads, 0)
            row["blocks_per_sm"] = blocks
            row["warps_per_sm"] = blocks * cfg.threads // 32
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def fused_kernel(quick):
    """Device time of the fused kernel's launch alone (`CupyDevice.fused_launcher`, the plan's own;
    no allocation, no loss reduction) per config variant, against the memory roofline (read phi +
    write the gradient at the measured copy bandwidth) and as an FMA rate (two n x n products over
    l rows per slice: 4 l n^2 flops)."""
    import cupy
    import numpy as np

    from gpu_orthol1._cupy import CupyDevice
    from gpu_orthol1.bench import base as bench_base
    from gpu_orthol1.kernels import fused_small as fs

    bw = bench_base.d2d_bandwidth()
    dev = CupyDevice()  # what a plan with kernel="fused" launches through
    dev.bind(cublas=False)
    big = 1 << (24 if quick else 26)
    cases = [(64, 4096, 64, "float32"), (64, 4096, 64, "float16")]
    cases += [(64, big // (64 * n), n, "float32") for n in (8, 16, 32, 64, 96)]
    rows = []
    for l, m, n, dt in cases:
        phi = (cupy.random.standard_normal((l, m, n), dtype=cupy.float32) / l**0.5).astype(dt)
        out = cupy.empty_like(phi)
        losses = cupy.empty(m, dtype=cupy.float64)
        V, Vo = phi.transpose(1, 0, 2), out.transpose(1, 0, 2)
        base = fs.fused_config(l, n, np.dtype(dt))
        roof = 2 * phi.nbytes / bw * 1e3
        side = fs.grid_side(base.threads)
        # the default against S swizzled (conflict-free writes at n = 64, 4-way unswizzled), a
        # gradient phase one S row at a time (jrun = 1) and every other run length, and at n = 64
        # (where the register budget decides) twice and half the gradient rows and the 16 x 16 grid
        # (on an H100, gpu-h100-unroll-kernel.json: 0.176 and 0.178 ms against the default's 0.170 at
        # (64, 4096, 64) float32)
        variants = [base, base._replace(jrun=1), base._replace(swizzle=True)]
        for v in fs.VECS:
            try:
                variants.append(fs.fused_config(l, n, np.dtype(dt), vec=v))
            except ValueError:  # no such run for this micro-tile
                pass
        if n == 64:
            for tile in (base.tile_rows * 2, base.tile_rows // 2):
                cfg = base._replace(tile_rows=tile)
                if side <= tile <= fs.TMAX[base.acc] * side and fs.shared_bytes(cfg) <= fs.SHARED_LIMIT:
                    variants.append(cfg)
            for v in (None, 4):  # the 16 x 16 grid: micro-tile side 4, interleaved or in one run
                variants.append(fs.fused_config(l, n, np.dtype(dt), threads=256, vec=v))
            # S as the H100 runs before 2026-11-27 02:10 UTC had it (a thread's 8 columns in one
            # block: 8-way conflicts on its writes, 2-way on its reads); registers capped at 112
            # (for 9 blocks per SM; the card kept 8, see FusedConfig.maxreg)
            variants += [base._replace(srun=base.nmax // side), base._replace(maxreg=112)]
        addrs = (phi.data.ptr, out.data.ptr, losses.data.ptr)
        for cfg in dict.fromkeys(variants):
            row = {"l": l, "m": m, "n": n, "dtype": dt, "config": cfg._asdict(), "roofline_ms": roof}
            try:
                go = dev.fused_launcher(cfg, V, Vo, losses, True)
                t = _bench(lambda go=go, addrs=addrs: go(*addrs, 2e-3, False), 10 if quick else 30)
                row.update(
                    kernel_ms=t["device_ms"],
                    host_ms=t["host_ms"],
                    x_roofline=t["device_ms"] / roof,
                    roofline_fraction=roof / t["device_ms"],
                    tflops=4 * l * m * n * n / t["device_ms"] / 1e9,
                )
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        del phi, out
    return {"copy_bandwidth_GBps": bw / 1e9, "rows": rows}


def phases(quick):
    """Host and device time of each phase of one two-GEMM call (Gram GEMM, sign pass, gradient GEMM)
    against the whole call, through the plan's own device and workspace: where the time goes."""
    import cupy

    import gpu_orthol1 as ol1
    from gpu_orthol1 import _driver

    rows = []
    for shape, dt in (
        ((64, 8, 32), "float32"),
        ((64, 4096, 64), "float32"),
        ((4096, 32, 128), "float32"),
        ((4096, 32, 128), "float16"),
        ((512, 64, 512), "float32"),
    ):
        try:
            rows.append(_phase_row(cupy, ol1, _driver, shape, dt, quick))
        except Exception as e:  # keep the other shapes
            rows.append({"shape": shape, "dtype": dt, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _phase_row(cupy, ol1, _driver, shape, dt, quick):
    """One row of `phases`: the phases apart (the plan's own device, workspace and layouts)."""
    l, m, n = shape
    phi = (cupy.random.standard_normal(shape, dtype=cupy.float32) / l**0.5).astype(dt)
    p = ol1.plan(phi, 1e-3, kernel="gemm")
    sz = p._chunks.sizes_for(True, False, False, False, 1, hooked=False)[0]
    if sz.chunk < m:
        return {"shape": shape, "dtype": dt, "skipped": f"{m} slices need {sz.chunk}-slice chunks"}
    wsb = _driver.workspace(p._alloc, sz, l, n, phi.dtype)
    grad = cupy.empty_like(phi)
    V, Vo = p._view(phi), p._view(grad)
    src = _driver.StridedChunk(V, _driver.layout_of(V), 0)
    dst = _driver.StridedChunk(Vo, _driver.layout_of(Vo), 0)
    losses = cupy.empty(m, cupy.float64)
    dev = p._gpu.dev
    dev.bind()
    part = wsb.get("partials")
    tot = cupy.empty(1, dtype=p._ldt)
    k = 10 if quick else 30
    row = {
        "shape": shape,
        "dtype": dt,
        "sign_parts": sz.parts,
        "gram": _bench(lambda: dev.gram(src, m, wsb["ws"]), k),
        "sign": _bench(
            lambda: dev.sign_abs(wsb["ws"], wsb["sgn"], n, losses, 0, 1.0, True, partials=part), k
        ),
        "grad": _bench(lambda: dev.grad(src, dst, m, wsb["sgn"], 2e-3, 0.0), k),
        "reduce": _bench(lambda: dev.loss_total(losses, m, 1e-3, tot, False), k),
        "call": _bench(lambda: p(phi), k),
    }
    return row


def host_profile(n_calls=300):
    """cProfile of `ol1.loss_and_grad` on (64, 8, 32) float32 CuPy, warm: where the host time goes."""
    import cProfile
    import io
    import pstats

    import cupy

    import gpu_orthol1 as ol1

    phi = cupy.random.standard_normal((64, 8, 32), dtype=cupy.float32) / 8
    for _ in range(20):
        ol1.loss_and_grad(phi, 1e-3)
    cupy.cuda.Device().synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n_calls):
        ol1.loss_and_grad(phi, 1e-3)
    prof.disable()
    cupy.cuda.Device().synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    return (
        f"== cProfile, {n_calls} warm calls of loss_and_grad on (64, 8, 32) float32, by tottime\n"
        + buf.getvalue()
    )


def profile_table():
    import cupy
    import torch
    from torch.profiler import ProfilerActivity, profile

    import gpu_orthol1 as ol1

    out = []
    for shape, dt, kernel in (
        ((64, 4096, 64), "float32", "gemm"),
        ((64, 4096, 64), "float32", "fused"),
        ((4096, 32, 128), "float32", "gemm"),
        ((4096, 32, 128), "float16", "gemm"),
        ((512, 64, 512), "float32", "gemm"),
    ):
        phi = (cupy.random.standard_normal(shape, dtype=cupy.float32) / shape[0] ** 0.5).astype(dt)
        pl = ol1.plan(phi, 1e-3, kernel=kernel)
        pl(phi)
        cupy.cuda.Device().synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                pl(phi)
            torch.cuda.synchronize()
            cupy.cuda.Device().synchronize()
        out.append(
            f"== kernel={kernel}, {shape} {dt}, 5 calls\n"
            + prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
        )
    return "\n".join(out)


def sweep_table_and_plot(doc: dict, png: str | None) -> str:
    """The n sweep of a results file as a Markdown table (fused / two-GEMM / roofline), and the plot."""
    sw = doc["sweep"]
    lines = [
        f"copy bandwidth {sw['copy_bandwidth_GBps']:.0f} GB/s (read + write); times in ms, l*m*n fixed",
        "",
        "| l | m | n | roofline ms | two-GEMM ms | fused ms | fused / two-GEMM |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sw["rows"]:
        f = r.get("fused_ms")
        lines.append(
            f"| {r['l']} | {r['m']} | {r['n']} | {r['roofline_ms']:.4f} | {r['gemm_ms']:.3f} | "
            + (f"{f:.3f} | {f / r['gemm_ms']:.2f} |" if f is not None else "- | - |")
        )
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for l, mark in ((64, "o"), (512, "s")):
            rows = [r for r in sw["rows"] if r["l"] == l]
            ns = [r["n"] for r in rows]
            ax.plot(ns, [r["gemm_ms"] for r in rows], "-" + mark, color="C0", label=f"two-GEMM, l={l}")
            fr = [r for r in rows if "fused_ms" in r]
            ax.plot(
                [r["n"] for r in fr],
                [r["fused_ms"] for r in fr],
                "--" + mark,
                color="C1",
                label=f"fused, l={l}",
            )
            ax.plot(
                ns,
                [r["roofline_ms"] for r in rows],
                ":",
                color="k",
                label="memory roofline" if l == 64 else None,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (l*m*n fixed)")
        ax.set_ylabel("ms per call")
        ax.set_title(f"{doc.get('gpu', '?')}, float32, {doc.get('date', '')[:10]}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
    return "\n".join(lines)


# the sections of a run without --kernel-only, in order: name -> the function that measures it
SECTIONS = {
    "host": "host_costs",
    "host_breakdown": "host_breakdown",
    "host_gemm": "host_gemm",
    "phases": "phases",
    "shapes": "shapes",
    "sweep": "sweep",
    "fused_resources": "fused_resources",
    "rule_gaps": "rule_gaps",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--profile-txt")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dry", action="store_true", help="CPU machine: check the script imports, then exit")
    ap.add_argument(
        "--sweep-from", metavar="JSON", help="print the n-sweep table of a results file (any machine)"
    )
    ap.add_argument("--plot", metavar="PNG", help="with --sweep-from: also plot the sweep")
    ap.add_argument(
        "--only",
        metavar="NAMES",
        help=f"comma-separated sections to run ({', '.join(SECTIONS)}); default all",
    )
    ap.add_argument(
        "--kernel-only",
        action="store_true",
        help="only the fused kernel's launch per config variant (section 7), into --json",
    )
    ap.add_argument(
        "--one-call",
        metavar="KERNEL",
        choices=("gemm", "fused"),
        help="one warm call on (64, 4096, 64) float32 and exit: the target for an ncu profile",
    )
    ap.add_argument(
        "--ncu-variants",
        action="store_true",
        help="one launch each of the fused kernel's default config at (64, 4096, 64) float32, "
        "that config at 112 registers, and the 16 x 16 grid, and exit: for ncu",
    )
    a = ap.parse_args(argv)
    if a.only:
        unknown = sorted(set(a.only.split(",")) - set(SECTIONS))
        if unknown:
            ap.error(f"--only: no section {', '.join(unknown)}; the sections: {', '.join(SECTIONS)}")
    if a.ncu_variants:
        import cupy
        import numpy as np

        from gpu_orthol1._cupy import CupyDevice
        from gpu_orthol1.kernels import fused_small as fs

        phi = cupy.random.standard_normal((64, 4096, 64), dtype=cupy.float32) / 8
        out, losses = cupy.empty_like(phi), cupy.empty(4096, dtype=cupy.float64)
        dev = CupyDevice()
        dev.bind(cublas=False)
        base = fs.fused_config(64, 64, np.float32)
        for cfg in (base, base._replace(maxreg=112), fs.fused_config(64, 64, np.float32, threads=256)):
            print(cfg, flush=True)
            dev.fused_launcher(cfg, phi.transpose(1, 0, 2), out.transpose(1, 0, 2), losses, True)(
                phi.data.ptr, out.data.ptr, losses.data.ptr, 2e-3, False
            )
            cupy.cuda.Device().synchronize()
        return 0
    if a.one_call:
        import cupy

        import gpu_orthol1 as ol1

        phi = cupy.random.standard_normal((64, 4096, 64), dtype=cupy.float32) / 8
        pl = ol1.plan(phi, 1e-3, kernel=a.one_call)
        pl(phi)
        cupy.cuda.Device().synchronize()
        pl(phi)
        cupy.cuda.Device().synchronize()
        return 0
    if a.sweep_from:
        with open(a.sweep_from) as f:
            print(sweep_table_and_plot(json.load(f), a.plot))
        return 0
    if a.dry:
        import gpu_orthol1  # noqa: F401

        print("bench_gpu_plans: dry run, nothing measured")
        return 0
    import cupy

    from gpu_orthol1.bench.env import gpu_name, versions

    doc = {
        "command": "python3 bench/bench_gpu_plans.py " + " ".join(argv or sys.argv[1:]),
        "gpu": gpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": versions(),
        "cupy": cupy.__version__,
    }
    sections = (
        (("fused_kernel", fused_kernel),)
        if a.kernel_only
        else tuple((name, globals()[fn]) for name, fn in SECTIONS.items())
    )
    if a.only:
        sections = tuple(x for x in sections if x[0] in a.only.split(","))
    for name, fn in sections:
        try:
            doc[name] = fn(a.quick)
        except Exception as e:  # keep what the other parts measured
            doc[name] = {"error": f"{type(e).__name__}: {e}"}
        if a.json:
            with open(a.json, "w") as f:
                json.dump(doc, f, indent=1)
    if a.profile_txt:
        parts = []
        for fn in (host_profile, profile_table):
            try:
                parts.append(fn())
            except Exception as e:
                parts.append(f"{fn.__name__} failed: {type(e).__name__}: {e}")
        text = "\n".join(parts)
        with open(a.profile_txt, "w") as f:
            f.write(text + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
