"""CPU: the three ways a call can use the cores, per shape, to set `_cpu_pool.cpu_threads`'s rule (issue 26).

    python bench/bench_cpu_threads.py --out bench/results/cpu-threads.json [--shapes 512x16x64,...]

For each (l, m, n) shape (m slices of (l, n) along axis 1, float32, loss and gradient), a plan's call
timed three ways, interleaved round by round (median of 7 rounds, each round the mean of enough calls
to last ~0.1 s of work):

- ``pool2``: the slices split over the thread pool (one part per core), BLAS on one thread meanwhile;
- ``serial1``: one part, BLAS on one thread (what the pool's parts each do);
- ``blas``: one part, BLAS's own threads splitting each GEMM.

The JSON records the CPU, load average before and after, and the date. Only a quiet machine's figures
set the rule (the pool and BLAS's threads both suffer from other jobs, differently).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

import gpu_orthol1 as ol1
from gpu_orthol1 import _cpu_pool
from gpu_orthol1.bench.env import run_record, write_record

SHAPES = "64x32x64,64x64x64,128x32x64,256x32x64,512x32x64,1024x16x32,1024x64x32,512x16x64,512x128x64,512x256x64,512x512x64,1024x16x128,512x1024x64,4096x32x128,64x4096x64,1024x16x512,512x64x512,256x8x256,2048x4x256"


def time_shape(l: int, m: int, n: int, rng: np.random.Generator) -> dict:
    x = (rng.standard_normal((l, m, n)) / np.sqrt(l)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CopyWarning, GpuFallbackWarning: the CPU path is the point
        p2 = ol1.plan(x, 1e-3, axis=1, backend="numpy")
        p1 = ol1.plan(x, 1e-3, axis=1, backend="numpy")
    p2._threads, p1._threads = 2, 1  # private: the plan's split, forced per variant

    def serial1() -> None:
        with _cpu_pool._one_blas_thread():
            p1(x)

    fns = {"pool2": lambda: p2(x), "serial1": serial1, "blas": lambda: p1(x)}
    flops = 4.0 * l * m * n * n
    reps = min(50, max(1, int(1e8 / flops)))
    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(7):
        for k in keys if r % 2 == 0 else keys[::-1]:
            t0 = time.perf_counter()
            for _ in range(reps):
                fns[k]()
            ts[k].append((time.perf_counter() - t0) / reps * 1e3)
    med = {k: float(np.median(v)) for k, v in ts.items()}
    return {"shape": [l, m, n], "flops": flops, "ms": med, "rule": _cpu_pool.cpu_threads(m, l, n)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help="LxMxN,... (default: %(default)s)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    doc = run_record()
    for s in a.shapes.split(","):
        l, m, n = (int(v) for v in s.split("x"))
        res = time_shape(l, m, n, rng)
        doc["results"].append(res)
        ms = res["ms"]
        print(
            f"{s:>12} {res['flops'] / 1e6:8.0f} Mflop  "
            + "  ".join(f"{k} {v:8.3f}" for k, v in ms.items())
            + f"  best {min(ms, key=ms.__getitem__)}  rule {res['rule']}",
            flush=True,
        )
    write_record(doc, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
