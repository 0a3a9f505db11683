"""CPU: what bounds a call on slices along axis 1 (issue 26's two points above 1.10x): the layout, the
Gram's BLAS routine, and the two ways around the layout.

    python bench/bench_cpu_layout_floor.py --out bench/results/cpu-layout-floor.json [--shapes 1024x16x32,...]

For each (l, m, n) shape (phi C-contiguous (l, m, n), slices along axis 1, float32), interleaved round
by round, each timed call after an untimed one of the same method:

- ``limit``: the Gram and gradient GEMMs over contiguous (m, l, n) operands (``limit-blas``,
  BLAS's own threads), no sign pass; ``limit_1t``: the same on one BLAS thread;
- ``gram``, ``gram_1t``: the contiguous Gram GEMMs alone, BLAS's threads and one thread (NumPy's
  matmul of a matrix with its own transpose calls BLAS's syrk: whether that routine threads here);
- ``layout``: the same GEMMs on the slices where they lie, the gradient written where it lies, in
  the chunks a plan takes (the floor for this layout with BLAS doing the arithmetic);
- ``stage_in``: each chunk of phi copied into slice order first, both GEMMs on the copy, the
  gradient written where it lies;
- ``stage_out``: both GEMMs read phi where it lies, the gradient into a slice-order buffer, then
  copied out;
- ``ours``: ``gpu_orthol1.plan(phi, ...)``'s call (loss and gradient, sign pass included).

"paired" is the median over the rounds of each round's ratio against ``limit`` (this VM drifts by
tens of percent between rounds); ``gram_threads`` is the paired gram/gram_1t ratio. Every method's
gradient is checked against the plan's (with the plan's S) before timing. The JSON records the CPU,
BLAS, the load average before and after, and the date.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import ThreadpoolController

import gpu_orthol1 as ol1
from gpu_orthol1.bench import command, runner
from gpu_orthol1.bench.env import run_record, write_record

SHAPES = "1024x16x32,512x16x64,512x128x64"


def methods(x: np.ndarray, chunk: int, blas: ThreadpoolController) -> tuple[dict, np.ndarray]:
    """The timed methods on phi `x` (l, m, n) and their signs S; each GEMM method returns the
    gradient Phi_i S_i it wrote. `blas`: the BLAS libraries' controller, found once (finding them
    walks the process's shared objects, about a millisecond: never inside a timed call)."""
    l, m, n = x.shape
    V = x.transpose(1, 0, 2)  # (m, l, n) slice views where they lie
    C = np.ascontiguousarray(V)
    S = np.sign(np.random.default_rng(0).standard_normal((m, n, n))).astype(x.dtype)
    G = np.empty((m, n, n), x.dtype)
    buf = np.empty((chunk, l, n), x.dtype)
    obuf = np.empty((chunk, l, n), x.dtype)

    def limit():
        out = np.empty_like(C)
        np.matmul(C.transpose(0, 2, 1), C, out=G)
        np.matmul(C, S, out=out)
        return out.transpose(1, 0, 2)

    def limit_1t():
        with blas.limit(limits=1):
            return limit()

    def gram():
        np.matmul(C.transpose(0, 2, 1), C, out=G)

    def gram_1t():
        with blas.limit(limits=1):
            gram()

    def layout():
        out = np.empty_like(x)
        Vo = out.transpose(1, 0, 2)
        for a in range(0, m, chunk):
            b = min(a + chunk, m)
            np.matmul(V[a:b].transpose(0, 2, 1), V[a:b], out=G[a:b])
            np.matmul(V[a:b], S[a:b], out=Vo[a:b])
        return out

    def stage_in():
        out = np.empty_like(x)
        Vo = out.transpose(1, 0, 2)
        for a in range(0, m, chunk):
            b = min(a + chunk, m)
            s = buf[: b - a]
            s[...] = V[a:b]
            np.matmul(s.transpose(0, 2, 1), s, out=G[a:b])
            np.matmul(s, S[a:b], out=Vo[a:b])
        return out

    def stage_out():
        out = np.empty_like(x)
        Vo = out.transpose(1, 0, 2)
        for a in range(0, m, chunk):
            b = min(a + chunk, m)
            o = obuf[: b - a]
            np.matmul(V[a:b].transpose(0, 2, 1), V[a:b], out=G[a:b])
            np.matmul(V[a:b], S[a:b], out=o)
            Vo[a:b] = o
        return out

    return {
        "limit": limit,
        "limit_1t": limit_1t,
        "gram": gram,
        "gram_1t": gram_1t,
        "layout": layout,
        "stage_in": stage_in,
        "stage_out": stage_out,
    }, S


def time_shape(shape, rounds, rng) -> dict:
    xs = [runner.random_phi(rng, shape, np.float32) for _ in range(2)]
    p = ol1.plan(xs[0], 1e-3, backend="numpy", kernel="gemm")
    p(xs[0])
    # the chunk the plan's hook-free call took (staging included), which the layout methods copy
    chunk = next(sz.chunk for key, (sz, _t) in p._chunks.sizes.items() if not key[-1])
    blas = ThreadpoolController().select(user_api="blas")
    per_x = [methods(x, chunk, blas) for x in xs]
    # correctness first: every method's gradient is Phi_i S_i, checked against the float64 product
    for fns, S in per_x[:1]:
        want = np.einsum("lmk,mkn->lmn", xs[0].astype(np.float64), S.astype(np.float64))
        for k in ("limit", "limit_1t", "layout", "stage_in", "stage_out"):
            got = fns[k]()
            if not np.allclose(got, want, rtol=1e-4, atol=1e-5):
                raise SystemExit(f"{shape}: {k} does not compute Phi S")
    fns_by_x = [dict(f, ours=(lambda x=x: p(x))) for (f, _S), x in zip(per_x, xs, strict=True)]
    names = list(fns_by_x[0])
    for _ in range(3):  # untimed rounds first: the first calls of a run read slower here
        for k in names:
            fns_by_x[0][k]()
    ts: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            fns_by_x[1 - r % 2][k]()
            f = fns_by_x[r % 2][k]
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    t = {k: np.asarray(v) for k, v in ts.items()}
    return {
        "shape": list(shape),
        "chunk": chunk,
        "threads": p._threads,
        "ms": {k: float(np.median(v)) * 1e3 for k, v in t.items()},
        "paired": {k: float(np.median(t[k] / t["limit"])) for k in names if k != "limit"},
        "gram_threads": float(np.median(t["gram"] / t["gram_1t"])),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", type=command._parse_shapes, default=command._parse_shapes(SHAPES))
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="JSON file to write")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    from threadpoolctl import threadpool_info

    rng = np.random.default_rng(a.seed)
    doc = run_record(rounds=a.rounds, blas=threadpool_info())
    for shape in a.shapes:
        res = time_shape(tuple(shape), a.rounds, rng)
        doc["results"].append(res)
        pr = res["paired"]
        print(
            f"{'x'.join(map(str, shape)):>12}: limit {res['ms']['limit']:.3f} ms; x limit (paired): "
            + ", ".join(f"{k} {v:.2f}" for k, v in pr.items())
            + f"; syrk BLAS threads / one thread {res['gram_threads']:.2f}",
            flush=True,
        )
    write_record(doc, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
