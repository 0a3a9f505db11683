"""Core benchmark: gpu_orthol1.loss_and_grad against the BLAS limit and a naive expression.

    python bench/bench_core.py [--device cpu|gpu] [--repeat 7] [--json FILE]

BLAS limit: the two batched matmuls the computation cannot avoid, on contiguous
copies made outside the timing: G = A^T A and A @ G (NumPy on the CPU, CuPy on
the GPU). On the CPU, shapes whose slices gpu_orthol1 splits over threads (many small
slices) have their limit split the same way, so both use the same cores. On the GPU this is NOT the raw cuBLAS bound: cupy.matmul copies the
transposed operand A^T before its GEMM, so the limit here is inflated by a copy
(e.g. 0.48 ms against the 0.30 ms `gpu-orthol1 bench` measured as `limit-cublas`
for 4096x32x128 on an H200); quote GPU ratios from `gpu-orthol1 bench` instead. Naive: the expression a user would write (loss and closed-form
gradient with matmul/abs/sign). float32, median of --repeat runs after a warm-up,
inputs rotated between two tensors, each method checked once against the float64
reference before it is timed. On the CPU the limit and the methods are timed in turns (one call
of each per round) and a ratio is the median over rounds of that round's time over the limit's,
so that drift on a shared machine hits both sides alike. Peak extra memory (CPU) by tracemalloc, beyond the input.
Rows are flagged as gpu_orthol1.bench flags them (wide p80/p20 spread; on the CPU also
a ratio below the 0.75 floor and a load average above the CPU count at the start);
the JSON records the load and the CPU so that a run can be judged later.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc

import numpy as np

import gpu_orthol1 as ol1
from gpu_orthol1 import _cpu_pool
from gpu_orthol1.bench.env import cpu_name, loadavg
from gpu_orthol1.bench.flags import FLOOR_RATIO, SPREAD_MAX
from gpu_orthol1.reference import check, random_phi, reference

SHAPES = [(4096, 32, 128), (64, 4096, 64), (512, 64, 512)]
BETA = 1e-3


def _median_ms(fn, inputs, repeat, sync=lambda: None):
    fn(inputs[0])
    sync()
    ts = []
    for r in range(repeat):
        x = inputs[r % len(inputs)]
        sync()
        t0 = time.perf_counter()
        fn(x)
        sync()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3), float(np.percentile(ts, 20) * 1e3), float(np.percentile(ts, 80) * 1e3)


def _in_turns_ms(fns: dict, repeat):
    """{name: (per-round seconds)} of fns {name: (fn, inputs)} timed in turns: each round calls every
    fn once, in order, after one warm-up call each; drift on a shared machine then hits all alike."""
    for fn, inputs in fns.values():
        fn(inputs[0])
    ts: dict = {name: [] for name in fns}
    for r in range(repeat):
        for name, (fn, inputs) in fns.items():
            x = inputs[r % len(inputs)]
            t0 = time.perf_counter()
            fn(x)
            ts[name].append(time.perf_counter() - t0)
    return {name: np.array(v) for name, v in ts.items()}


def cpu_methods():
    def ours(phi):
        return ol1.loss_and_grad(phi, BETA, backend="numpy")

    def naive(phi):
        A = phi.transpose(1, 0, 2)
        X = A.transpose(0, 2, 1) @ A - np.eye(phi.shape[2], dtype=phi.dtype)
        return BETA * np.abs(X).sum(), (2 * BETA * (A @ np.sign(X))).transpose(1, 0, 2)

    return {"gpu_orthol1": ours, "naive_numpy": naive}


def cpu_limit(A):  # A: contiguous (m, l, n); the slices split over threads as gpu_orthol1 splits them
    out = np.empty_like(A)

    def part(a, b):
        G = np.matmul(A[a:b].transpose(0, 2, 1), A[a:b])
        np.matmul(A[a:b], G, out=out[a:b])

    _cpu_pool.run_split(part, A.shape[0], _cpu_pool.cpu_threads(*A.shape))
    return out


def bench_cpu(repeat):
    rows = []
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        inputs = [random_phi(rng, shape, np.float32) for _ in range(2)]
        contig = [np.ascontiguousarray(x.transpose(1, 0, 2)) for x in inputs]
        methods = cpu_methods()
        for fn in methods.values():
            loss, grad = fn(inputs[0])
            check(inputs[0], loss, grad, BETA, 1, "sum", np.float32)
        ts = _in_turns_ms(
            {"limit": (cpu_limit, contig), **{k: (f, inputs) for k, f in methods.items()}}, repeat
        )
        limit_ms = float(np.median(ts["limit"]) * 1e3)
        for name, fn in methods.items():
            t = ts[name]
            med, p20, p80 = (float(np.percentile(t, q) * 1e3) for q in (50, 20, 80))
            tracemalloc.start()
            fn(inputs[0])
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            rows.append(
                dict(
                    method=name,
                    shape=list(shape),
                    dtype="float32",
                    device="cpu",
                    p20_ms=p20,
                    p50_ms=med,
                    p80_ms=p80,
                    limit_ms=limit_ms,
                    ratio_to_limit=float(np.median(t / ts["limit"])),
                    peak_extra_mb=peak / 2**20,
                    grad_mb=inputs[0].nbytes / 2**20,
                )
            )
    return rows


def bench_gpu(repeat):
    import cupy

    from gpu_orthol1.bench.env import gpu_name

    sync = cupy.cuda.get_current_stream().synchronize
    rows = []
    # the small shape shows the per-call host overhead (launches, Numba dispatch) next to the GEMMs
    for shape in SHAPES + [(64, 8, 32)]:
        rng = np.random.default_rng(0)
        host = [random_phi(rng, shape, np.float32) for _ in range(2)]
        inputs = [cupy.asarray(x) for x in host]
        contig = [cupy.ascontiguousarray(x.transpose(1, 0, 2)) for x in inputs]
        limit = _median_ms(
            lambda A: cupy.matmul(A, cupy.matmul(A.transpose(0, 2, 1), A)), contig, repeat, sync
        )
        methods = {
            "gpu_orthol1": lambda p: ol1.loss_and_grad(p, BETA, backend="cupy"),
            "gpu_orthol1_tf32": lambda p: ol1.loss_and_grad(p, BETA, backend="cupy", precision="tf32"),
            "gpu_orthol1_loss_only": lambda p: (ol1.loss(p, BETA, backend="cupy"), None),
            "naive_cupy": lambda p: _naive_cupy(cupy, p),
        }
        for name, fn in methods.items():
            loss, grad = fn(inputs[0])
            if name.endswith("loss_only"):
                np.testing.assert_allclose(float(loss), check_loss(host[0]), rtol=2e-5)
            elif name.endswith("tf32"):
                dev = float(abs(loss.get() - check_loss(host[0])) / check_loss(host[0]))
                assert dev < 1e-2, dev
            else:
                check(host[0], loss.get(), grad.get(), BETA, 1, "sum", np.float32)
            med, p20, p80 = _median_ms(fn, inputs, repeat, sync)
            pool = cupy.get_default_memory_pool()
            sync()
            pool.free_all_blocks()
            before = pool.used_bytes()
            fn(inputs[0])
            sync()
            rows.append(
                dict(
                    method=name,
                    shape=list(shape),
                    dtype="float32",
                    device=gpu_name(with_device=True),
                    p20_ms=p20,
                    p50_ms=med,
                    p80_ms=p80,
                    limit_ms=limit[0],
                    ratio_to_limit=med / limit[0],
                    pool_total_mb=pool.total_bytes() / 2**20,
                    pool_before_mb=before / 2**20,
                )
            )
    return rows


def check_loss(phi):
    return BETA * reference(phi, 1.0)[0].sum()


def _naive_cupy(cupy, phi):
    A = phi.transpose(1, 0, 2)
    X = cupy.matmul(A.transpose(0, 2, 1), A) - cupy.eye(phi.shape[2], dtype=phi.dtype)
    return BETA * cupy.abs(X).sum(), (2 * BETA * cupy.matmul(A, cupy.sign(X))).transpose(1, 0, 2)


def flags(row, device, start_load):
    """Why a row is not a figure to publish (see gpu_orthol1.bench.flags.flag_rows for the reasons)."""
    out = []
    if row["p20_ms"] > 0 and row["p80_ms"] / row["p20_ms"] > SPREAD_MAX:
        out.append(f"spread p80/p20 {row['p80_ms'] / row['p20_ms']:.2f} > {SPREAD_MAX}")
    # the GPU limit here carries cupy.matmul's copy, so a real ratio can sit below the floor
    if device == "cpu" and row["ratio_to_limit"] < FLOOR_RATIO:
        out.append(f"{row['ratio_to_limit']:.2f}x the BLAS limit < {FLOOR_RATIO}")
    load = float(start_load.split()[0]) if start_load else 0.0
    if load > (os.cpu_count() or 1):
        out.append(f"run started at load {load:.2f} > {os.cpu_count()} CPUs")
    return "; ".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: its directory does not exist")
    start = loadavg()
    rows = bench_cpu(args.repeat) if args.device == "cpu" else bench_gpu(args.repeat)
    print(f"{'method':18s} {'shape':>16s} {'p50 ms':>9s} {'limit ms':>9s} {'ratio':>6s}  extra")
    for r in rows:
        r["flags"] = flags(r, args.device, start)
        extra = (
            f"peak +{r['peak_extra_mb']:.1f} MB (grad {r['grad_mb']:.1f} MB)"
            if "peak_extra_mb" in r
            else f"pool {r['pool_total_mb']:.0f} MB"
        )
        print(
            f"{r['method']:18s} {str(tuple(r['shape'])):>16s} {r['p50_ms']:9.2f} {r['limit_ms']:9.2f} "
            f"{r['ratio_to_limit']:6.2f}  {extra}" + (f"  FLAGGED: {r['flags']}" if r["flags"] else "")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    rows=rows,
                    numpy=np.__version__,
                    gpu_orthol1=ol1.__version__,
                    date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    cpu=cpu_name(),
                    cpu_count=os.cpu_count(),
                    loadavg_start=start,
                    loadavg_end=loadavg(),
                    limit=(
                        "numpy matmul on contiguous copies"
                        if args.device == "cpu"
                        else "cupy.matmul on contiguous copies (copies A^T again: not the raw cuBLAS bound)"
                    ),
                ),
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
