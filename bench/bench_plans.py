"""The per-call cost on the CPU: small shapes against the naive NumPy expression, OrthoL1 against the
per-layer autograd loop, and (with --base) the same measurements for an older checkout, interleaved.

    python bench/bench_plans.py --json bench/results/cpu-plans.json [--base /path/to/old/checkout]

Each measurement runs in a fresh subprocess (one per checkout per round, rounds interleaved, so
drift on a shared machine hits both alike); a figure is the median over rounds of the per-call
median. Every ratio is against a baseline timed in the same subprocess:

- core:    ol1.loss_and_grad(phi) and a reused plan, vs the naive expression
           (A^T A - I, |.|.sum(), 2 beta A sign(.)) on (l, m, n) float32, one BLAS thread;
- orthol1: OrthoL1(model).loss().backward() and .add_grad_() vs the loop users write
           (sum of beta |W^T W - I|.sum() over the weights, then backward), four 128x128 Linear
           layers and a 3-layer CNN, float32, one torch thread. The penalty's cost only: no task loss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SHAPES = [(64, 8, 16), (64, 8, 32)]
BETA = 1e-3


def _per_call_us(fn, calls, rounds=5):
    fn()
    fn()
    meds = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        meds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(meds)


def measure(calls: int) -> dict:
    """One subprocess's figures for the gpu_orthol1 on sys.path."""
    import numpy as np

    import gpu_orthol1 as ol1

    out: dict = {"version_path": os.path.dirname(ol1.__file__), "core": {}, "orthol1": {}}
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        phi = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        eye = np.eye(shape[2], dtype=np.float32)

        def naive(phi=phi, eye=eye):
            A = phi.transpose(1, 0, 2)
            X = A.transpose(0, 2, 1) @ A - eye
            return BETA * np.abs(X).sum(), (2 * BETA * (A @ np.sign(X))).transpose(1, 0, 2)

        def ours(phi=phi):
            return ol1.loss_and_grad(phi, BETA, backend="numpy")

        row = {"naive_us": _per_call_us(naive, calls), "ours_us": _per_call_us(ours, calls)}
        if hasattr(ol1, "plan"):
            p = ol1.plan(phi, BETA, backend="numpy")
            row["plan_us"] = _per_call_us(lambda p=p, phi=phi: p(phi), calls)
        row["naive_us"] = min(row["naive_us"], _per_call_us(naive, calls))  # naive again, after ours
        out["core"]["x".join(map(str, shape))] = row

    import torch
    from torch import nn

    from gpu_orthol1.torch import OrthoL1

    torch.manual_seed(0)
    models = {
        "mlp4x128": nn.Sequential(*[nn.Linear(128, 128) for _ in range(4)]),
        "cnn3": nn.Sequential(
            nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3)
        ),
    }
    for name, model in models.items():
        mats = [p for p in model.parameters() if p.dim() >= 2]
        reg = OrthoL1(model, BETA, mode="columns")

        def loop(mats=mats):
            total = 0
            for W in mats:
                W2 = W.reshape(W.shape[0], -1)
                G = W2.T @ W2
                total = total + BETA * (G - torch.eye(G.shape[0])).abs().sum()
            total.backward()

        def reg_loss(reg=reg):
            reg.loss().backward()

        def reg_add(reg=reg):
            reg.add_grad_()

        n = max(20, calls // 20)
        row = {
            "loop_us": _per_call_us(loop, n),
            "loss_us": _per_call_us(reg_loss, n),
            "add_grad_us": _per_call_us(reg_add, n),
        }
        row["loop_us"] = min(row["loop_us"], _per_call_us(loop, n))
        out["orthol1"][name] = row
    return out


def _child(path: str, calls: int) -> dict:
    env = dict(
        os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path
    )
    code = (
        f"import sys, json, torch; torch.set_num_threads(1); sys.path.insert(0, {path!r}); "
        f"sys.path.insert(1, {os.path.dirname(os.path.abspath(__file__))!r}); import bench_plans; "
        f"print(json.dumps(bench_plans.measure({calls})))"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _median_rows(runs: list[dict]) -> dict:
    med: dict = {}
    for part in ("core", "orthol1"):
        med[part] = {}
        for case in runs[0][part]:
            keys = runs[0][part][case].keys()
            med[part][case] = {k: statistics.median(r[part][case][k] for r in runs) for k in keys}
    return med


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="an older checkout to measure in the same run (interleaved)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, here)
    from gpu_orthol1.bench.env import cpu_name, loadavg

    load0 = loadavg()
    checkouts = {"now": here} | ({"base": os.path.abspath(a.base)} if a.base else {})
    runs: dict = {k: [] for k in checkouts}
    for r in range(a.rounds):
        for k, path in checkouts.items():
            runs[k].append(_child(path, a.calls))
            print(f"round {r + 1}/{a.rounds} {k} done", file=sys.stderr)
    result = {k: _median_rows(v) for k, v in runs.items()}
    for res in result.values():
        for row in res["core"].values():
            row["ours_x_naive"] = row["ours_us"] / row["naive_us"]
            if "plan_us" in row:
                row["plan_x_naive"] = row["plan_us"] / row["naive_us"]
        for row in res["orthol1"].values():
            row["loss_x_loop"] = row["loss_us"] / row["loop_us"]
            row["add_grad_x_loop"] = row["add_grad_us"] / row["loop_us"]
    doc = {
        "command": "python " + " ".join([os.path.relpath(__file__, here)] + (argv or sys.argv[1:])),
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": load0,
        "loadavg_end": loadavg(),
        "threads": "1 BLAS thread, 1 torch thread",
        "results": result,
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
