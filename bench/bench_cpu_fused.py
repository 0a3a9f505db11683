"""CPU: the fused loop (kernel="fused") against the two-GEMM path (kernel="gemm"), plan calls, per shape.

    python bench/bench_cpu_fused.py --out bench/results/cpu-fused.json [--shapes 3x32x3,...]

For each (l, m, n) shape (m slices of (l, n) along axis 1, float32 unless --dtype, loss and gradient),
both plans' calls are timed interleaved round by round (median of --rounds rounds, each round the mean
of enough calls to last about 20 ms). The rule `gpu_orthol1._device.cpu_fused_wins` (what
kernel="auto" takes) is printed beside each shape, so that a run shows where the rule and the
measurement disagree. Both results are checked against each other before timing. The JSON records
the CPU, the load average before and after, and the date.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import gpu_orthol1 as ol1
from gpu_orthol1 import _device
from gpu_orthol1.bench.env import run_record, write_record

SHAPES = "3x32x3,8x32x8,3x256x3,3x1024x3,16x32x16,8x64x16,64x32x8,16x128x16,8x1000x8,32x32x32"


def _shapes(text):
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]


def time_shape(shape, dtype, rounds, rng):
    l, m, n = shape
    phi = (rng.standard_normal(shape) / np.sqrt(l)).astype(dtype)
    plans = {k: ol1.plan(phi, 1e-3, kernel=k) for k in ("fused", "gemm")}
    (lf, gf), (lg, gg) = plans["fused"](phi), plans["gemm"](phi)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert abs(float(lf) - float(lg)) <= tol * abs(float(lg)), (lf, lg)
    np.testing.assert_allclose(gf, gg, rtol=10 * tol, atol=10 * tol * float(np.abs(gg).max()))
    t0 = time.perf_counter()
    plans["gemm"](phi)
    calls = max(3, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
    per = {k: [] for k in plans}
    for _ in range(rounds):
        for k, p in plans.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                p(phi)
            per[k].append((time.perf_counter() - t0) / calls)
    us = {k: statistics.median(v) * 1e6 for k, v in per.items()}
    return {
        "shape": list(shape),
        "dtype": np.dtype(dtype).name,
        "kflop": 4.0 * l * m * n * n / 1e3,
        "calls_per_round": calls,
        "us": us,
        "fused_over_gemm": us["fused"] / us["gemm"],
        "auto_takes_fused": _device.cpu_fused_wins(m, l, n, dtype),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="LxMxN,... (default: %(default)s)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    doc = run_record(rounds=a.rounds)
    for shape in _shapes(a.shapes):
        r = time_shape(shape, np.dtype(a.dtype).type, a.rounds, rng)
        doc["results"].append(r)
        print(
            f"{'x'.join(map(str, shape)):>12} {r['kflop']:8.0f} kflop  fused {r['us']['fused']:9.1f} us  "
            f"gemm {r['us']['gemm']:9.1f} us  fused/gemm {r['fused_over_gemm']:5.2f}  "
            f"auto: {'fused' if r['auto_takes_fused'] else 'gemm'}",
            flush=True,
        )
    write_record(doc, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
