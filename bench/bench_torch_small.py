"""Small inputs through the torch API: ortho_l1 against the expression it replaces, and against the core.

    python bench/bench_torch_small.py [--rounds 20] [--calls 20] [--floors] [--out FILE.json]

PointNet-sized batches, float32 on the CPU, x of shape (m, d, d) requiring grad:

- upstream:  fxia22/pointnet.pytorch's feature_transform_regularizer, forward + backward:
             I = torch.eye(d)[None]; torch.mean(torch.norm(torch.bmm(x, x.transpose(2, 1)) - I, dim=(1, 2)))
- ortho_l1:  ortho_l1(x, beta, axis=0, mode="rows"), forward + backward (the replacement; another
             penalty, the same work: one batched Gram, one elementwise pass, one batched GEMM)
- fwd:       ortho_l1's forward alone (x requires grad, so the gradient is formed in it)
- plan:      a `gpu_orthol1.plan(...)` call on the NumPy view of the same data (loss and gradient):
             the core's per-call cost, the floor of ortho_l1's forward

Rounds interleave the methods (one batch of --calls calls of each per round, each batch timed as a
whole, per-call time = batch time / calls) and a figure is the median over --rounds rounds, so that
drift on a shared machine hits every method alike. Ratios: ortho_l1 / upstream (target <= 1.0) and
fwd / plan (target <= 1.3). Values are checked against the float64 formula before timing.
--floors adds a table of what bounds fwd / plan from below (`floor_methods`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

SHAPES = [(32, 3, 3), (32, 64, 64)]
BETA = 1e-3


def upstream(x):
    import torch

    d = x.size()[1]
    eye = torch.eye(d)[None, :, :]
    return torch.mean(torch.norm(torch.bmm(x, x.transpose(2, 1)) - eye, dim=(1, 2)))


def methods(shape, rng):
    import torch

    import gpu_orthol1 as ol1
    from gpu_orthol1.torch import ortho_l1

    x = torch.from_numpy((rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)).requires_grad_(
        True
    )
    xt = x.detach().numpy().transpose(0, 2, 1)  # the core's convention: Gram of the columns of each slice
    p = ol1.plan(xt, BETA, axis=0)

    # correctness first: ortho_l1 and the plan against the float64 formula
    x64 = x.detach().double()
    want = BETA * (x64 @ x64.transpose(1, 2) - torch.eye(shape[1], dtype=torch.float64)).abs().sum()
    got = ortho_l1(x, BETA, axis=0, mode="rows").detach()
    assert abs(float(got) - float(want)) <= 1e-5 * float(want), (float(got), float(want))
    got_p, _ = p(xt)
    assert abs(float(got_p) - float(want)) <= 1e-5 * float(want), (float(got_p), float(want))

    def run_upstream():
        x.grad = None
        upstream(x).backward()

    def run_ortho():
        x.grad = None
        ortho_l1(x, BETA, axis=0, mode="rows").backward()

    def run_fwd():
        ortho_l1(x, BETA, axis=0, mode="rows")

    def run_plan():
        p(xt)

    return {"upstream": run_upstream, "ortho_l1": run_ortho, "fwd": run_fwd, "plan": run_plan}


def floor_methods(shape, rng):
    """What bounds fwd / plan from below, as calls timed like the others (--floors):

    - plan:         the plan call, as in the main table;
    - plan+op:      the plan call, then one trivial torch op (a 0-d new_empty): the cost of going from
                    NumPy's code to torch's and back, which every ortho_l1 call pays at least once;
    - apply:        a trivial autograd.Function's apply (forward returns a 0-d tensor): torch's own cost
                    of a node with autograd, the least an eager ortho_l1 can pay;
    - plan-in-apply: the plan call inside that Function's forward, the loss handed back through
                    torch.from_numpy: the floor of ortho_l1's forward on this design;
    - fwd:          ortho_l1's forward, as in the main table."""
    import torch

    import gpu_orthol1 as ol1
    from gpu_orthol1.torch import ortho_l1

    x = torch.from_numpy((rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)).requires_grad_(
        True
    )
    xt = x.detach().numpy().transpose(0, 2, 1)
    p = ol1.plan(xt, BETA, axis=0)
    y = torch.zeros(3)

    class Trivial(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w.new_empty(())

        @staticmethod
        def backward(ctx, go):
            return None

    class PlanInApply(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            loss, _ = p(xt)
            return torch.from_numpy(np.asarray(loss))

        @staticmethod
        def backward(ctx, go):
            return None

    return {
        "plan": lambda: p(xt),
        "plan+op": lambda: (p(xt), y.new_empty(())),
        "apply": lambda: Trivial.apply(x),
        "plan-in-apply": lambda: PlanInApply.apply(x),
        "fwd": lambda: ortho_l1(x, BETA, axis=0, mode="rows"),
    }


def measure_floors(shape, rounds, calls, rng):
    fns = floor_methods(shape, rng)
    per = _interleaved(fns, rounds, calls)
    return {"shape": list(shape), "median_us": {k: statistics.median(v) * 1e6 for k, v in per.items()}}


def _interleaved(fns, rounds, calls):
    for fn in fns.values():  # warm-up: plan caches, allocator, first-call dispatch setup
        for _ in range(3):
            fn()
    per = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per[name].append((time.perf_counter() - t0) / calls)
    return per


def measure(shape, rounds, calls, rng):
    per = _interleaved(methods(shape, rng), rounds, calls)
    med = {k: statistics.median(v) for k, v in per.items()}
    # ratios per round, then the median: drift between rounds cancels
    r_up = statistics.median(a / b for a, b in zip(per["ortho_l1"], per["upstream"], strict=True))
    r_plan = statistics.median(a / b for a, b in zip(per["fwd"], per["plan"], strict=True))
    return {
        "shape": list(shape),
        "median_us": {k: v * 1e6 for k, v in med.items()},
        "ortho_l1_over_upstream": r_up,
        "fwd_over_plan": r_plan,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=20, help="calls per timed batch")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument(
        "--floors", action="store_true", help="also time what bounds fwd / plan from below (floor_methods)"
    )
    args = ap.parse_args(argv)

    import torch

    from gpu_orthol1.bench.env import cpu_detail, cpu_name, loadavg

    rng = np.random.default_rng(0)
    load0 = loadavg()
    rows = [measure(s, args.rounds, args.calls, rng) for s in SHAPES]
    floors = [measure_floors(s, args.rounds, args.calls, rng) for s in SHAPES] if args.floors else []
    load1 = loadavg()
    if args.out:
        res = {
            "cpu": cpu_name(),
            "cpu_detail": cpu_detail(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_before": load0,
            "load_after": load1,
            "rounds": args.rounds,
            "calls": args.calls,
            "beta": BETA,
            "dtype": "float32",
            "rows": rows,
            "floors": floors,
        }
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(
        f"{'shape':>12} {'upstream us':>12} {'ortho_l1 us':>12} {'ratio':>7} {'fwd us':>9} {'plan us':>9} "
        f"{'fwd/plan':>9}"
    )
    for r in rows:
        m = r["median_us"]
        print(
            f"{'x'.join(map(str, r['shape'])):>12} {m['upstream']:12.1f} {m['ortho_l1']:12.1f} "
            f"{r['ortho_l1_over_upstream']:7.2f} {m['fwd']:9.1f} {m['plan']:9.1f} {r['fwd_over_plan']:9.2f}"
        )
    for r in floors:
        m = r["median_us"]
        print(
            f"{'x'.join(map(str, r['shape'])):>12} floors (us): "
            + "  ".join(f"{k} {v:.1f}" for k, v in m.items())
        )
    print(
        f"targets: ortho_l1/upstream <= 1.0, fwd/plan <= 1.3; load average {load0} -> {load1} "
        f"on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
