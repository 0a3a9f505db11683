"""The two-GEMM plan call's own host (Python) time, on a CPU: the GPU code path with nothing executed.

    python bench/host_gemm_cpu.py [--calls 2000] [--profile] [--shape 4096,32,128] [--dtype float32]

`CupyDevice`'s code runs as on a card -- the plan's checks, the stream-keyed losses, the workspace,
the prepared cuBLAS argument lists filled per call, the sign pass's and the loss reduction's
launchers looked up and their parameters packed -- but over NumPy buffers, with a cuBLAS whose
calls return at once and kernels whose launches return at once. What it leaves out is what only a
card has: CuPy's allocator (a few us per `cupy.empty`), the ctypes call into cuBLAS and its own host
work, the driver's launch. So the figure is a floor of the card's host time, and its profile shows
what of OUR code costs (bench_gpu_plans.py's host_gemm section gives the card's figure).
Directional only on a shared machine.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # the kernels are built (never run) by the simulator

import numpy as np  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096,32,128")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--precision", default="highest")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the calls (by tottime)")
    a = ap.parse_args(argv)
    from gpu_orthol1.testing import host_only_plan

    shape = tuple(int(s) for s in a.shape.split(","))
    phi = np.random.default_rng(0).standard_normal(shape).astype(a.dtype)
    p = host_only_plan(phi, 1e-3, precision=a.precision)
    assert p.kernel == "gemm"
    for _ in range(50):
        p(phi)
    best = []
    for _ in range(5):  # the best of 5 rounds: other jobs on the machine only ever add time
        t0 = time.perf_counter()
        for _ in range(a.calls):
            p(phi)
        best.append((time.perf_counter() - t0) / a.calls * 1e6)
    print(
        f"{shape} {a.dtype} {a.precision}: {min(best):.1f} us per plan call (best of 5 rounds), "
        f"median {sorted(best)[2]:.1f}"
    )
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.calls):
            p(phi)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
