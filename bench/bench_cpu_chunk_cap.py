"""CPU: plan calls with the chunk cap on phi's bytes (`_cpu_pool.CPU_CHUNK_PHI_BYTES`) against the same
plans without it, at the sweep points of bench_cpu_midsize.py.

    python bench/bench_cpu_chunk_cap.py --out bench/results/cpu-chunk-cap.json [--shapes 512x128x64,...]

For each (l, m, n) shape (m slices of (l, n) along axis 1, float32, loss and gradient), one plan is
made with the cap as shipped and one with the cap out of reach (2^40 bytes, the chunking of the
workspace budget alone); their calls are timed interleaved round by round, each timed call after an
untimed one of the same plan, with a third method: the uncapped plan with its whole workspace kept
between calls (`CPU_KEEP_WORKSPACE` out of reach while it runs), as the capped plan's smaller one is.
"paired" is the median over the rounds of each round's capped/uncapped ratio (this VM drifts by tens
of percent between rounds), with its quartiles; "paired_kept" the same against the kept-workspace
method (the cap's gain apart from the allocation it saves). "chunk": the slices per chunk each plan's
calls took. Both plans' results are
checked against each other before timing. The JSON records the CPU, the load average before and
after, and the date.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import gpu_orthol1 as ol1
from gpu_orthol1 import _cpu_pool
from gpu_orthol1.bench import command, runner
from gpu_orthol1.bench.env import run_record, write_record

SHAPES = (
    "512x128x64,4096x32x128,512x1024x64,1024x16x32,64x4096x64,512x64x512,1024x16x128,1024x16x512,512x16x64"
)
UNCAPPED = 1 << 40


def time_shape(shape, rounds, rng) -> dict:
    xs = [runner.random_phi(rng, shape, np.float32) for _ in range(2)]
    shipped = _cpu_pool.CPU_CHUNK_PHI_BYTES
    plans = {}
    try:
        for name, cap in (("capped", shipped), ("uncapped", UNCAPPED)):
            _cpu_pool.CPU_CHUNK_PHI_BYTES = cap  # read when the plan is made
            plans[name] = ol1.plan(xs[0], 1e-3, backend="numpy", kernel="gemm")
    finally:
        _cpu_pool.CPU_CHUNK_PHI_BYTES = shipped
    (la, ga), (lb, gb) = plans["capped"](xs[0]), plans["uncapped"](xs[0])
    if not (np.isclose(la, lb, rtol=1e-5) and np.allclose(ga, gb, rtol=1e-4, atol=1e-7)):
        raise SystemExit(f"{shape}: the capped and uncapped plans disagree")
    chunks = {k: runner.call_chunk(p) for k, p in plans.items()}  # the chunks the calls took
    keep = _cpu_pool.CPU_KEEP_WORKSPACE

    def kept_uncapped(x):
        # the uncapped plan with its whole workspace kept between calls, as the capped plan's smaller
        # one is (CPU_KEEP_WORKSPACE): the cap's gain apart from the allocation it saves
        _cpu_pool.CPU_KEEP_WORKSPACE = UNCAPPED
        try:
            return plans["uncapped"](x)
        finally:
            _cpu_pool.CPU_KEEP_WORKSPACE = keep

    fns = {"capped": plans["capped"], "uncapped": plans["uncapped"], "uncapped_kept": kept_uncapped}
    for _ in range(3):  # untimed rounds first: the first calls of a run read slower here
        for f in fns.values():
            f(xs[0])
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            fns[k](xs[1 - r % 2])
            t0 = time.perf_counter()
            fns[k](xs[r % 2])
            ts[k].append(time.perf_counter() - t0)
    out = {
        "shape": list(shape),
        "threads": plans["capped"]._threads,
        "chunk": chunks,
        "ms": {k: float(np.median(v)) * 1e3 for k, v in ts.items()},
    }
    for base_name, key in (("uncapped", "paired"), ("uncapped_kept", "paired_kept")):
        ratio = np.asarray(ts["capped"]) / np.asarray(ts[base_name])
        out[key] = float(np.median(ratio))
        out[key + "_p25_p75"] = [float(v) for v in np.percentile(ratio, [25, 75])]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=command._parse_shapes, default=command._parse_shapes(SHAPES))
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    doc = run_record(cap_bytes=_cpu_pool.CPU_CHUNK_PHI_BYTES, rounds=a.rounds)
    for shape in a.shapes:
        res = time_shape(tuple(shape), a.rounds, rng)
        doc["results"].append(res)
        q1, q3 = res["paired_p25_p75"]
        k1, k3 = res["paired_kept_p25_p75"]
        print(
            f"{'x'.join(map(str, shape)):>14}: capped {res['ms']['capped']:8.3f} ms (chunk {res['chunk']['capped']}), "
            f"uncapped {res['ms']['uncapped']:8.3f} ms (chunk {res['chunk']['uncapped']}), "
            f"paired {res['paired']:.3f} [{q1:.3f}, {q3:.3f}]; against the uncapped plan with its "
            f"workspace kept {res['paired_kept']:.3f} [{k1:.3f}, {k3:.3f}]",
            flush=True,
        )
    write_record(doc, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
