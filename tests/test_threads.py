"""Concurrent calls from several Python threads on the CPU backend.

The CPU kernel is compiled with nogil=True and NumPy's matmul releases the GIL, so threads really
run at the same time. Each thread's result must equal, bit for bit, the same call made alone, and
match the float64 reference. The last test runs concurrent calls under numba's "workqueue"
threading layer in a subprocess. That layer aborts the whole process when two threads enter a
parallel=True region at once. The CPU kernel was parallel=True when this test found that abort;
it is serial now. The test keeps a parallel kernel from coming back without a guard.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import gpu_orthol1 as ol1

from .helpers import make
from .reference import check

THREADS = 8
ROUNDS = 6
ROOT = Path(__file__).resolve().parent.parent


def _jobs(rng):
    """Different shapes, dtypes, layouts, reductions and budgets, so threads differ in what they run."""
    jobs = []
    for i in range(THREADS):
        dtype = (np.float16, np.float32, np.float64)[i % 3]
        shape = ((23, 40, 9), (17, 33, 12), (31, 25, 6), (9, 50, 8))[i % 4]
        layout = ("C", "F", "every2", "negative")[(i // 2) % 4]
        phi = make(np, rng, shape, dtype, layout, 1)
        kw = dict(reduction=("sum", "none", "mean")[i % 3], workspace_bytes=(None, 3000)[i % 2])
        jobs.append((phi, float(rng.uniform(0.2, 2.0)), kw))
    return jobs


def _hammer(fn, n_items):
    """fn(i) for every item from THREADS threads at once, ROUNDS times; results of the last round."""
    start = threading.Barrier(THREADS)

    def worker(i):
        start.wait()
        res = None
        for _ in range(ROUNDS):
            res = fn(i)
        return res

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(worker, range(n_items)))


@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")
def test_concurrent_calls_match_serial(rng):
    jobs = _jobs(rng)
    serial = [ol1.loss_and_grad(phi, beta, backend="numpy", **kw) for phi, beta, kw in jobs]
    before = [phi.copy() for phi, _, _ in jobs]
    got = _hammer(
        lambda i: ol1.loss_and_grad(jobs[i][0], jobs[i][1], backend="numpy", **jobs[i][2]), len(jobs)
    )
    for (phi, beta, kw), (l0, g0), (l1, g1), b in zip(jobs, serial, got, before, strict=True):
        assert l0.tobytes() == l1.tobytes() and g0.tobytes() == g1.tobytes(), "a threaded call differs"
        np.testing.assert_array_equal(phi, b)
        check(phi, l1, g1, beta, 1, kw["reduction"], phi.dtype)


def test_concurrent_calls_share_one_input(rng):
    # one phi read by every thread at once, each writing (and accumulating) into its own out=
    phi = make(np, rng, (19, 64, 10), np.float32, "C", 1)
    ref_loss, ref_grad = ol1.loss_and_grad(phi, 0.5)
    outs = [np.zeros_like(phi) for _ in range(THREADS)]

    def call(i):
        return ol1.loss_and_grad(phi, 0.5, out=outs[i], accumulate=True, workspace_bytes=(None, 2000)[i % 2])

    losses = _hammer(call, THREADS)
    for (loss, g), out in zip(losses, outs, strict=True):
        assert g is out and loss.tobytes() == ref_loss.tobytes()
        # ROUNDS accumulations of the same gradient, in order, with nothing from other threads
        want = np.zeros_like(phi)
        for _ in range(ROUNDS):
            want += ref_grad
        np.testing.assert_array_equal(out, want)


def test_workqueue_layer_does_not_abort():
    script = textwrap.dedent(
        """
        import threading, numpy as np, gpu_orthol1 as ol1
        rng = np.random.default_rng(0)
        phis = [rng.standard_normal((20, 64, 16)).astype(np.float32) for _ in range(8)]
        ref = [ol1.loss_and_grad(p, backend="numpy") for p in phis]
        res = [None] * 8
        def f(i):
            for _ in range(20):
                res[i] = ol1.loss_and_grad(phis[i], backend="numpy")
        ts = [threading.Thread(target=f, args=(i,)) for i in range(8)]
        [t.start() for t in ts]; [t.join() for t in ts]
        assert all(np.array_equal(r[1], q[1]) and r[0] == q[0] for r, q in zip(res, ref))
        print("ok")
        """
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (
        f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    )
