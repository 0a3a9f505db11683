"""Full Gram GEMM vs its blocked triangle on a GPU (issue 22 item 3): where the triangle pays.

    python3 bench/bench_triangle.py --json $OUT/gpu_triangle.json [--quick]   (on the GPU machine)
    python bench/bench_triangle.py --dry                                       (CPU: parses, exits)

For each shape (l, m, n), n in 256, 512, 768, 1024, 2048, l = n and 4n, m = 1, 12, 36, and each
precision, two plans of the two-GEMM path are made: one with GPU_ORTHOL1_GRAM=full, one with
GPU_ORTHOL1_GRAM=triangle (the setting is read when a plan is made), and a loss_and_grad call of
each is timed with `cupyx.profiler.benchmark` (median device and host time), interleaved. The
rows give triangle / full per shape, the figure that sets `_triangle.TRIANGLE_MIN_N` (and whether
BLOCK_MIN = 128 is right); the losses of both forms are compared (relative difference).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

NS = (256, 512, 768, 1024, 2048)
MS = (1, 12, 36)


def _bench(fn, n_repeat):
    from cupyx.profiler import benchmark

    r = benchmark(fn, n_repeat=n_repeat, n_warmup=2)
    cpu = float(sorted(r.cpu_times)[len(r.cpu_times) // 2] * 1e3)
    gpu = float(sorted(r.gpu_times[0])[len(r.gpu_times[0]) // 2] * 1e3)
    return {"host_ms": cpu, "device_ms": gpu}


def _plan(phi, form, precision):
    import gpu_orthol1 as ol1
    from gpu_orthol1 import _triangle

    before = os.environ.get(_triangle.ENV_GRAM)
    os.environ[_triangle.ENV_GRAM] = form
    try:
        return ol1.plan(phi, 1e-3, precision=precision, kernel="gemm")
    finally:
        if before is None:
            os.environ.pop(_triangle.ENV_GRAM, None)
        else:
            os.environ[_triangle.ENV_GRAM] = before


def row(l, m, n, precision, repeat):
    import cupy

    phi = cupy.random.standard_normal((l, m, n), dtype=cupy.float32) / (l**0.5)
    full, tri = _plan(phi, "full", precision), _plan(phi, "triangle", precision)
    out = {"l": l, "m": m, "n": n, "precision": precision, "gram": tri.gram, "block": tri._tri}
    if tri.gram != "triangle":
        out["note"] = "no block split for this n: both plans take the full GEMM"
    lf, lt = float(full(phi)[0]), float(tri(phi)[0])
    out["loss_rel_diff"] = abs(lt - lf) / max(abs(lf), 1e-30)
    runs = {"full": [], "triangle": []}
    for _ in range(2):  # interleaved: the card's clocks drift between runs
        for form, p in (("full", full), ("triangle", tri)):
            runs[form].append(_bench(lambda p=p, x=phi: p(x), repeat))
    for form, rs in runs.items():
        out[form] = min(rs, key=lambda r: r["device_ms"])
    out["triangle_over_full"] = out["triangle"]["device_ms"] / out["full"]["device_ms"]
    flops = 2.0 * 2 * l * n * n * m  # the two full GEMMs
    out["full_tflops"] = flops / out["full"]["device_ms"] * 1e-9
    del phi, full, tri
    cupy.get_default_memory_pool().free_all_blocks()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, m = 12 only for n >= 1024")
    ap.add_argument("--precision", default="highest,tf32", help="comma-separated precisions")
    ap.add_argument("--ns", default=",".join(map(str, NS)))
    ap.add_argument("--dry", action="store_true", help="parse and exit (CPU)")
    a = ap.parse_args(argv)
    if a.dry:
        print("bench_triangle: dry run, nothing timed")
        return 0
    from gpu_orthol1 import _triangle

    rows = []
    t0 = time.time()
    precisions = a.precision.split(",")
    for n, mult, m, precision in itertools.product(map(int, a.ns.split(",")), (1, 4), MS, precisions):
        if a.quick and n >= 1024 and m != 12:
            continue
        r = row(mult * n, m, n, precision, 5 if a.quick else 10)
        rows.append(r)
        print(
            f"l={r['l']:5d} m={m:2d} n={n:4d} {precision:7s} block {r['block']:4d}: full "
            f"{r['full']['device_ms']:8.3f} ms ({r['full_tflops']:6.1f} TFLOP/s), triangle "
            f"{r['triangle']['device_ms']:8.3f} ms, ratio {r['triangle_over_full']:.3f}, "
            f"host {r['full']['host_ms']:.3f} / {r['triangle']['host_ms']:.3f} ms",
            flush=True,
        )
    doc = {
        "what": "full Gram GEMM vs blocked triangle, two-GEMM plan calls (loss_and_grad)",
        "triangle_min_n_now": _triangle.TRIANGLE_MIN_N,
        "block_min_now": _triangle.BLOCK_MIN,
        "seconds": time.time() - t0,
        "rows": rows,
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
