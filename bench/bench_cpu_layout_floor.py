"""CPU: what bounds a call on slices along axis 1 at the sweep points that run on BLAS's own threads
(issue 26's points above 1.10x): the layout, the chunks, the Gram's BLAS routine, and the two ways
around the layout.

    python bench/bench_cpu_layout_floor.py --out bench/results/cpu-layout-floor.json [--shapes 1024x16x32,...]

For each (l, m, n) shape (phi C-contiguous (l, m, n), slices along axis 1, float32), interleaved round
by round, each timed call after an untimed one of the same method, all on BLAS's own threads unless
named _1t:

- ``limit``: the Gram and the gradient GEMMs as one batched NumPy matmul each over contiguous
  (m, l, n) operands, no sign pass (the GEMMs of the sweep's ``limit-blas`` on BLAS's threads, without
  its pool); ``limit_1t``: the same on one BLAS thread;
- ``gram``, ``gram_1t``: the contiguous Gram GEMMs alone (NumPy's matmul of a matrix with its own
  transpose calls BLAS's syrk: whether that routine threads here);
- ``layout_whole``: the same two matmuls on the slices where they lie, the gradient written where it
  lies (the sweep's in-layout limit on BLAS's threads);
- ``layout``: the same in the chunks the plan takes (the floor of the plan's arrangement with BLAS
  doing the arithmetic);
- ``stage_in``: each chunk of phi copied into slice order first, both GEMMs on the copy, the
  gradient written where it lies;
- ``stage_out``: both GEMMs read phi where it lies, the gradient into a slice-order buffer, then
  copied out;
- ``ours``: ``gpu_orthol1.plan(phi, ...)``'s call (loss and gradient, sign pass included);
  ``ours_axis0``: the same slices batch-first, a plan with ``axis=0`` on the contiguous (m, l, n)
  copy (what a user who controls the layout can pass); ``copy_axis0``: that copy made inside the
  timed call (``np.ascontiguousarray`` of phi's (m, l, n) view), then the batch-first plan's call
  (the gradient returned as the (l, m, n) view of its result, no copy back).

"paired" is the median over the rounds of each round's ratio against ``limit`` (this VM drifts by
tens of percent between rounds); ``ours_over_layout``, ``ours_over_axis0``, ``copy_axis0_over_ours``
and ``gram_threads`` are paired alike (ours / layout, ours / ours_axis0, copy_axis0 / ours,
gram / gram_1t). Before timing, every method's gradient is checked against the float64 product
Phi_i S_i (S: fixed random signs), the Grams against the float64 Phi_i^T Phi_i, the plan's loss and
gradient against the float64 reference (`gpu_orthol1.reference.check`), and the batch-first plan's
(with and without the copy) against the plan's. Shapes whose plan splits the slices over the CPU
pool are refused: the methods here run one part on BLAS's threads.
The JSON records the CPU (`cpu_detail`), the load average before and after, the seed and the date.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import ThreadpoolController

import gpu_orthol1 as ol1
from gpu_orthol1.bench import command, runner
from gpu_orthol1.bench.env import run_record, write_record
from gpu_orthol1.reference import check

SHAPES = "1024x16x32,512x16x64,512x128x64,1024x16x128"  # the sweep points on BLAS's own threads


def methods(x: np.ndarray, chunk: int, blas: ThreadpoolController) -> tuple[dict, np.ndarray]:
    """The timed GEMM methods on phi `x` and the signs S they multiply by.

    Args:
        x: phi, (l, m, n), its slices along axis 1.
        chunk: the slices per chunk of the chunked methods (the plan's).
        blas: the BLAS libraries' controller, found once (finding them walks the process's shared
            objects, about a millisecond: never inside a timed call).

    Returns:
        ({name: method}, S (m, n, n) of +-1): each method returns what it computed: the gradient
        Phi_i S_i with x's shape, or for gram / gram_1t the Grams (m, n, n).

    Raises:
        Nothing of its own.

    Example:
        >>> from threadpoolctl import ThreadpoolController
        >>> x = np.ones((8, 3, 4), np.float32)
        >>> fns, S = methods(x, 2, ThreadpoolController().select(user_api="blas"))
        >>> fns["layout"]().shape, fns["gram"]().shape
        ((8, 3, 4), (3, 4, 4))
    """
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
        return np.matmul(C.transpose(0, 2, 1), C, out=G)

    def gram_1t():
        with blas.limit(limits=1):
            return gram()

    def layout_whole():
        out = np.empty_like(x)
        np.matmul(V.transpose(0, 2, 1), V, out=G)
        np.matmul(V, S, out=out.transpose(1, 0, 2))
        return out

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
        "layout_whole": layout_whole,
        "layout": layout,
        "stage_in": stage_in,
        "stage_out": stage_out,
    }, S


def copy_then_call(p0, x: np.ndarray) -> tuple:
    """The batch-first plan `p0` on a slice-order copy of phi `x` (l, m, n) made in the call: the loss,
    and the gradient as the (l, m, n) view of the plan's (m, l, n) result (no copy back)."""
    loss, grad = p0(np.ascontiguousarray(x.transpose(1, 0, 2)))
    return loss, grad.transpose(1, 0, 2)


GEMMS = ("limit", "limit_1t", "layout_whole", "layout", "stage_in", "stage_out")


def time_shape(shape: tuple[int, int, int], rounds: int, rng: np.random.Generator) -> dict:
    """One shape's record: the plan's chunk and threads, each method's median ms and paired ratios.

    Raises:
        SystemExit: a method computes something else than it should, or the plan splits the
            slices over the CPU pool (this bench covers the points on BLAS's own threads).
    """
    beta = 1e-3
    xs = [runner.random_phi(rng, shape, np.float32) for _ in range(2)]
    p = ol1.plan(xs[0], beta, backend="numpy", kernel="gemm")
    if p._threads != 1:
        raise SystemExit(
            f"{'x'.join(map(str, shape))}: the plan splits its slices over {p._threads} pool threads; "
            "this bench covers the points that run on BLAS's own threads"
        )
    loss, grad = p(xs[0])
    check(xs[0], loss, grad, beta)
    chunk = runner.call_chunk(p)
    blas = ThreadpoolController().select(user_api="blas")
    per_x = [methods(x, chunk, blas) for x in xs]
    fns0, S = per_x[0]
    x64 = xs[0].astype(np.float64).transpose(1, 0, 2)
    want_g = np.matmul(x64.transpose(0, 2, 1), x64)
    want = np.matmul(x64, S.astype(np.float64)).transpose(1, 0, 2)
    for k in ("gram", "gram_1t"):
        if not np.allclose(fns0[k](), want_g, rtol=1e-4, atol=1e-5):
            raise SystemExit(f"{shape}: {k} does not compute Phi^T Phi")
    for k in GEMMS:
        if not np.allclose(fns0[k](), want, rtol=1e-4, atol=1e-5):
            raise SystemExit(f"{shape}: {k} does not compute Phi S")
    cs = [np.ascontiguousarray(x.transpose(1, 0, 2)) for x in xs]  # the same slices, batch-first
    p0 = ol1.plan(cs[0], beta, axis=0, backend="numpy", kernel="gemm")
    loss0, grad0 = p0(cs[0])
    if p0._threads != 1 or not (
        np.isclose(loss0, loss, rtol=1e-5)
        and np.allclose(grad0, grad.transpose(1, 0, 2), rtol=1e-4, atol=1e-7)
    ):
        raise SystemExit(f"{shape}: the batch-first plan disagrees with the axis-1 one or splits its slices")
    loss_c, grad_c = copy_then_call(p0, xs[0])  # the same plan on the same values: bit for bit
    if not (loss_c == loss0 and np.array_equal(grad_c, grad0.transpose(1, 0, 2))):
        raise SystemExit(f"{shape}: the copy-then-call method disagrees with the batch-first plan")
    fns_by_x = [
        dict(
            f,
            ours=(lambda x=x: p(x)),
            ours_axis0=(lambda c=c: p0(c)),
            copy_axis0=(lambda x=x: copy_then_call(p0, x)),
        )
        for (f, _S), x, c in zip(per_x, xs, cs, strict=True)
    ]
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
        "ours_over_layout": float(np.median(t["ours"] / t["layout"])),
        "ours_over_axis0": float(np.median(t["ours"] / t["ours_axis0"])),
        "copy_axis0_over_ours": float(np.median(t["copy_axis0"] / t["ours"])),
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
    if not a.shapes:
        ap.error("--shapes names no shape")
    rng = np.random.default_rng(a.seed)
    doc = run_record(rounds=a.rounds, seed=a.seed)
    for shape in a.shapes:
        res = time_shape(tuple(shape), a.rounds, rng)
        doc["results"].append(res)
        pr = res["paired"]
        print(
            f"{'x'.join(map(str, shape)):>12}: limit {res['ms']['limit']:.3f} ms; x limit (paired): "
            + ", ".join(f"{k} {v:.2f}" for k, v in pr.items())
            + f"; ours / layout {res['ours_over_layout']:.2f}; syrk BLAS threads / one thread "
            + f"{res['gram_threads']:.2f}",
            flush=True,
        )
    write_record(doc, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
