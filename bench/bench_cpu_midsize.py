"""CPU: gpu_orthol1 against naive NumPy and the two-GEMM BLAS limit at the bench's sweep points (issue 26).

Times, interleaved round by round on the same inputs, for each (l, m, n) shape (slices along m, as
`gpu-orthol1 bench` lays them out):

- ``ours``: ``gpu_orthol1.loss_and_grad(x, beta, backend="numpy")``;
- ``naive``: what users write, the bench's ``numpy-naive`` (matmul on the transposed views);
- ``limit``: the bench's ``limit-blas``, the core's Gram and gradient GEMMs alone over contiguous
  operands, the faster of two threadings timed apart: ``limit_split`` (the slices split over one part
  per core on the pool, BLAS on one thread each) and ``limit_blas_threads`` (one part, BLAS
  threading each GEMM itself), so that the floor does not depend on gpu_orthol1's choice;
- ``layout_limit``: the same GEMMs on the slices where they lie (`in_layout_limit`), the faster of
  ``layout_split`` and ``layout_blas_threads``: for slices along axis 1 the contiguous ``limit``
  leaves out reading and writing rows m*n elements apart, which no implementation can skip (at
  (512, 1024, 64) float32 a gather of the input into slice order alone takes about a quarter of
  ``limit``).

Each timed call follows an untimed call of the same method (on the other input copy), so that BLAS
threads left spinning by the method timed before it (OpenBLAS's idle worker spins for about 2^28
cycles, 0.1 s on the AMD EPYC) are done by then for calls of 0.1 s or more; shorter calls still
share a core with that worker for a while, which slows the slice pool most (bench_cpu_threads_spin.py
measures it apart). Writes a JSON file with the medians, the ratios ours/limit, ours/naive and
ours/layout_limit (of the medians, and ``paired``: the median of each round's ratio against the
methods timed in the same round, which this VM's drift between rounds moves less; ``above_1_10``
flags a paired ours/limit above the CPU promise's 1.10), the CPU, NumPy's BLAS
(threadpoolctl's threadpool_info), the load average before and after, and the date. A shared machine
disturbs the figures: compare ratios from one run, not times across runs.

    python bench/bench_cpu_midsize.py --out bench/results/cpu-midsize.json
    python bench/bench_cpu_midsize.py --shapes 512x1024x64,1024x16x32 --runs 9 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import gpu_orthol1 as ol1
from gpu_orthol1 import _cpu_pool
from gpu_orthol1.bench import base, command, methods, runner
from gpu_orthol1.bench.env import run_record, write_record
from gpu_orthol1.bench.flags import SLOW_RATIO

# the three points issue 26 names, then the bench's --quick sweeps and reference shapes
ISSUE_SHAPES = ((512, 1024, 64), (1024, 16, 32), (512, 128, 64))


def default_shapes(full: bool) -> list[tuple[int, int, int]]:
    sw = command.SWEEPS["full" if full else "quick"]
    (l_m, n_m), ms = sw["m"]
    (l_n, m_n), ns = sw["n"]
    shapes = (
        list(ISSUE_SHAPES)
        + [(l_m, m, n_m) for m in ms]
        + [(l_n, m_n, n) for n in ns]
        + list(command.REF_SHAPES)
    )
    return list(dict.fromkeys(shapes))


def blas_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return threadpool_info()


def in_layout_limit(xs, parts):
    """The same two GEMMs per slice as ``limit`` (the core's NumPy device calls, `parts` parts on the
    pool), on the slices where they lie in the input and the gradient written where it lies in its
    own array, no sign pass: the floor for the layout given, which for slices along axis 1 includes
    reading and writing rows that lie m*n elements apart. None when BLAS cannot read the layout."""
    from gpu_orthol1 import _driver
    from gpu_orthol1._numpy_dev import NumpyDevice

    dev = NumpyDevice()
    V = [x.transpose(1, 0, 2) for x in xs]
    lay = _driver.layout_of(V[0])
    if lay is None:
        return None
    m, _l, n = V[0].shape
    G = np.empty((m, n * n), dtype=xs[0].dtype)
    S = np.sign(np.random.default_rng(0).standard_normal((m, n * n))).astype(xs[0].dtype)

    def call(k):
        out = np.empty_like(xs[k])
        Vo = out.transpose(1, 0, 2)
        lay_o = _driver.layout_of(Vo)

        def part(a, b):
            src = _driver.StridedChunk(V[k], lay, a)
            dev.gram(src, b - a, G[a:b])
            dev.grad(src, _driver.StridedChunk(Vo, lay_o, a), b - a, S[a:b], 1.0, 0.0)

        _cpu_pool.run_split(part, m, parts)
        return out

    return call


def time_shape(shape, dtype, runs, rng) -> dict:
    xs = [runner.random_phi(rng, shape, dtype) for _ in range(2)]
    case = base.Case(*shape, np.dtype(dtype), "ref", xs)
    split = methods._limit("cpu", "highest", threads=os.cpu_count() or 1).prepare(case)
    blas_threads = methods._limit("cpu", "highest", threads=1).prepare(case)
    fns = {
        "ours": lambda k: ol1.loss_and_grad(xs[k], base.BETA, backend="numpy"),
        "naive": lambda k: methods._naive(np, xs[k], base.BETA),
        "limit_split": split.call,
        "limit_blas_threads": blas_threads.call,
    }
    layout_split = in_layout_limit(xs, os.cpu_count() or 1)
    if layout_split is not None:
        fns["layout_split"] = layout_split
        fns["layout_blas_threads"] = in_layout_limit(xs, 1)
    for f in fns.values():  # warm-up: plans, workspaces, numba's compiled pass
        f(0)
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(runs):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]  # no method always runs right after another
        for k in order:
            # BLAS's threads spin for a while after a threaded call (OpenBLAS: about 2^28 cycles), so
            # a call right after another method's shares the cores with them: an untimed call of the
            # same method first, as a call in a training loop follows its own previous call
            fns[k](1 - r % 2)
            t0 = time.perf_counter()
            out = fns[k](r % 2)
            ts[k].append(time.perf_counter() - t0)
            del out
    med = {k: float(np.median(v)) * 1e3 for k, v in ts.items()}
    # this VM's speed drifts by tens of percent between rounds, so besides the ratio of the medians
    # each round's ratio is taken against the methods timed in the same round, and the median of
    # those kept (`paired`): the estimator docs/performance.md's core figures use
    t = {k: np.asarray(v) for k, v in ts.items()}
    lim_r = np.minimum(t["limit_split"], t["limit_blas_threads"])
    paired = {
        "ours_over_limit": float(np.median(t["ours"] / lim_r)),
        "ours_over_naive": float(np.median(t["ours"] / t["naive"])),
    }
    if "layout_split" in t:
        lay_r = np.minimum(t["layout_split"], t["layout_blas_threads"])
        paired["ours_over_layout_limit"] = float(np.median(t["ours"] / lay_r))
        paired["layout_limit_over_limit"] = float(np.median(lay_r / lim_r))  # what the layout costs BLAS
    med["limit"] = min(med["limit_split"], med["limit_blas_threads"])
    if "layout_split" in med:
        med["layout_limit"] = min(med["layout_split"], med["layout_blas_threads"])
    return {
        "shape": list(shape),
        "dtype": np.dtype(dtype).name,
        "runs": runs,
        "slice_threads": _cpu_pool.cpu_threads(shape[1], shape[0], shape[2]),
        "ms": med,
        "ms_all": {k: [round(t * 1e3, 4) for t in v] for k, v in ts.items()},
        "ours_over_limit": med["ours"] / med["limit"],
        "ours_over_naive": med["ours"] / med["naive"],
        "ours_over_layout_limit": med["ours"] / med["layout_limit"] if "layout_limit" in med else None,
        "paired": paired,
        "above_1_10": paired["ours_over_limit"] > SLOW_RATIO,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--shapes",
        type=command._parse_shapes,
        default=None,
        help="LxMxN,... (default: issue 26's points, the bench's --quick sweeps and reference shapes)",
    )
    p.add_argument("--full", action="store_true", help="the bench's full sweeps instead of the --quick ones")
    p.add_argument("--dtype", default="float32", choices=("float16", "float32", "float64"))
    p.add_argument("--runs", type=int, default=7, help="timed rounds per shape (default 7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    shapes = a.shapes if a.shapes else default_shapes(a.full)
    rng = np.random.default_rng(a.seed)
    doc = run_record(blas=blas_info(), gpu_orthol1_file=ol1.__file__)
    for shape in shapes:
        res = time_shape(shape, a.dtype, a.runs, rng)
        doc["results"].append(res)
        ms = res["ms"]
        print(
            f"{'x'.join(map(str, shape)):>14} {a.dtype}: ours {ms['ours']:9.2f} ms  naive {ms['naive']:9.2f}  "
            f"limit {ms['limit']:9.2f}  ours/limit {res['ours_over_limit']:.2f}  "
            f"ours/naive {res['ours_over_naive']:.2f}  "
            f"ours/layout-limit {res['ours_over_layout_limit'] or float('nan'):.2f}  "
            f"paired ours/limit {res['paired']['ours_over_limit']:.2f}"
            f"{'  ABOVE ' + format(SLOW_RATIO, 'g') if res['above_1_10'] else ''}",
            flush=True,
        )
    write_record(doc, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
