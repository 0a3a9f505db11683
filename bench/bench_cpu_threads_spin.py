"""CPU: the slice pool against BLAS's own threads, one method per process, after what a loop runs before.

    python bench/bench_cpu_threads_spin.py --out bench/results/cpu-threads-spin.json [--shapes ...]

OpenBLAS's idle worker spins for about 2^28 cycles (0.1 s here) after a threaded call, on a core the
slice pool then shares with it. In one process, timing the pool right after a method that threads
BLAS (as interleaved benches do) therefore measures it against a spinning worker. Here each
measurement is a fresh process that times one plan's calls (--calls, after 5 untimed ones) with
`_threads` forced to 1 (BLAS's threads) or 2 (the pool's two parts, BLAS on one thread: the 2-CPU
machines this compares on), processes alternating
(--pairs pairs, the order flipped every pair), each call preceded by:

- ``none``: nothing (a loop of gpu_orthol1 calls on this shape alone);
- ``small``: a gpu_orthol1 call on (64, 32, 64) (34 Mflop: BLAS threads by `cpu_threads`'s rule);
- ``numpy``: a threaded NumPy matmul of two 512 x 512 float32 matrices (user code).

"split/bt" is the median over pairs of each pair's pool/BLAS-threads ratio. The JSON records the
CPU, the load average before and after, and the date. Internal: ``--child`` runs one process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np

SHAPES = "512x128x64,1024x16x128,1024x16x32,512x16x64"
BEFORE = ("none", "small", "numpy")


def child(shape, threads, calls, before) -> tuple[float, bool]:
    import gpu_orthol1 as ol1
    from gpu_orthol1.bench import runner

    rng = np.random.default_rng(0)
    x = runner.random_phi(rng, shape, np.float32)
    xs = runner.random_phi(rng, (64, 32, 64), np.float32)
    a = rng.standard_normal((512, 512)).astype(np.float32)
    p = ol1.plan(x, 1e-3, backend="numpy")
    p._threads = threads
    ps = ol1.plan(xs, 1e-3, backend="numpy")

    def one():
        if before == "small":
            ps(xs)
        elif before == "numpy":
            a @ a
        elif before != "none":
            raise ValueError(f"unknown --before {before!r}")
        t0 = time.perf_counter()
        p(x)
        return time.perf_counter() - t0

    for _ in range(5):
        one()
    ms = float(np.median([one() for _ in range(calls)])) * 1e3
    from gpu_orthol1 import _cpu_pool

    return ms, _cpu_pool._pool is not None  # whether the slice pool ran (it starts on first use)


def run_child(shape, threads, calls, before) -> float:
    cmd = [sys.executable, __file__, "--child", "x".join(map(str, shape)), str(threads), str(calls), before]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    ms, pool = proc.stdout.split()[-2:]
    if (pool == "True") != (threads > 1):
        raise SystemExit(
            f"{cmd}: the slice pool {'ran' if pool == 'True' else 'did not run'} with {threads} thread(s)"
        )
    return float(ms)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--before", default=",".join(BEFORE), help="what precedes each call: " + ", ".join(BEFORE))
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--calls", type=int, default=21)
    p.add_argument("--out")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        s, t, c, b = a.child
        ms, pool = child(tuple(int(v) for v in s.split("x")), int(t), int(c), b)
        print(ms, pool)
        return 0
    unknown = set(a.before.split(",")) - set(BEFORE)
    if unknown or a.pairs < 1:
        p.error(f"--before takes {', '.join(BEFORE)} (got {', '.join(sorted(unknown))}); --pairs at least 1")
    from gpu_orthol1.bench.env import run_record, write_record

    doc = run_record(pairs=a.pairs, calls=a.calls)
    for before in a.before.split(","):
        for s in a.shapes.split(","):
            shape = tuple(int(v) for v in s.split("x"))
            bt, split = [], []
            for i in range(a.pairs):
                for threads in (1, 2) if i % 2 == 0 else (2, 1):
                    (bt if threads == 1 else split).append(run_child(shape, threads, a.calls, before))
            ratio = [sp / t for t, sp in zip(bt, split, strict=True)]
            row = {
                "shape": list(shape),
                "before": before,
                "bt_ms": bt,
                "split_ms": split,
                "split_over_bt": statistics.median(ratio),
                "split_over_bt_min_max": [min(ratio), max(ratio)],
            }
            doc["results"].append(row)
            print(
                f"after {before:>5}: {s:>12}  BLAS threads {statistics.median(bt):8.3f} ms  pool "
                f"{statistics.median(split):8.3f} ms  pool/BLAS threads {row['split_over_bt']:.3f} "
                f"[{min(ratio):.3f}, {max(ratio):.3f}]",
                flush=True,
            )
    if a.out:
        write_record(doc, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
