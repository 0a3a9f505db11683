"""What the spawned ranks of tests/test_training.py's DDP tests run.

One gloo group per world size (tests/_groups.py: the group of tests/_dist_workers.py's cases, which
run first) runs every case in the same order on every rank; each rank writes
out_dir/rank{r}.json: per case the parameters after 5 SGD steps (float64, as lists), the penalty
values each step returned, this rank's share of the matrices, and the errors of the bad-input case.
The parent compares: a split run against the unsplit DDP run, for loss() and for add_grad_().
"""

from __future__ import annotations

import json
import os
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

STEPS = 5
LR = 0.05
BETA = 0.3


def _model(torch, seed):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # matrices of unequal cost (the split balances flops), a Conv flattened, biases left out
            sizes = [(12, 9), (7, 12), (16, 7), (5, 16), (10, 5)]
            self.lin = torch.nn.Sequential(*[torch.nn.Linear(i, o, dtype=torch.float64) for o, i in sizes])
            self.conv = torch.nn.Conv1d(1, 4, 3, dtype=torch.float64)

        def forward(self, x):
            h = self.lin(x)
            return (h * h).mean() + 0.01 * self.conv(x[:, None, :9]).sum()

    g = torch.Generator().manual_seed(seed)
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.4)
    return model


def run_case(torch, rank, world, how, split, seed):
    """5 SGD steps of DDP(model) with the penalty through `how` ("loss" or "add_grad_")."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gpu_orthol1.torch import OrthoL1

    model = DDP(_model(torch, seed))
    reg = OrthoL1(model, BETA, split=split)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed + 1 + rank)  # each rank its own data
    values = []
    for _ in range(STEPS):
        x = torch.randn(6, 9, generator=g, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        if how == "loss":
            pen = reg.loss()
            (model(x) + pen).backward()
        elif split is None:  # unsplit: after backward (every rank adds the same full gradient)
            model(x).backward()
            pen = reg.add_grad_()
        elif how == "add_grad_":  # split: before backward, so that DDP's all-reduce carries it
            pen = reg.add_grad_()
            model(x).backward()
        else:  # "late": split, after backward (the documented mistake: DDP has already averaged .grad)
            model(x).backward()
            pen = reg.add_grad_()
        values.append(float(pen.detach()))
        opt.step()
    share = sorted(reg._runner.active()) if reg._split is not None else None
    every = sorted(reg.metrics())  # every matrix, under split= too
    _, own = reg.loss(metrics=True)  # this pass's matrices: the rank's share under split=
    return {
        "metrics_names": every,
        "loss_metrics_names": sorted(own),
        "params": {n: p.detach().reshape(-1).tolist() for n, p in model.named_parameters()},
        "values": values,
        "share": share,
        "names": reg.names,
    }


def bad_inputs(torch, rank, world, seed):
    """A schedule that returns NaN at step 1 or a negative value: ValueError on every rank, nothing written."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gpu_orthol1.torch import OrthoL1

    out = {}
    for what, sched in (
        ("nan", lambda s: float("nan") if s == 1 else 0.1),
        ("negative", lambda s: -1.0 if s == 1 else 0.1),
    ):
        model = DDP(_model(torch, seed))
        reg = OrthoL1(model, sched, split="auto")
        reg.add_grad_()
        before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        try:
            reg.add_grad_()
            out[what] = "no error"
        except ValueError as e:
            same = all(torch.equal(before[n], p.grad) for n, p in model.named_parameters() if n in before)
            out[what] = f"ValueError unchanged={same} step={reg.step}: {e}"
    return out


def run(rank, world, seed, out_dir):
    """Every DDP case on this rank of the initialized gloo group (tests/_groups.py made it, after
    tests/_dist_workers.py's cases ran in it): results to out_dir/rank{rank}.json, case names to
    rank{rank}.progress."""
    import torch
    import torch.distributed as dist

    res: dict = {"cases": {}, "failures": {}}
    os.makedirs(out_dir, exist_ok=True)
    prog = open(os.path.join(out_dir, f"rank{rank}.progress"), "w")

    def attempt(name, fn):
        prog.write(name + "\n")
        prog.flush()
        try:
            return fn()
        except Exception:  # noqa: BLE001 - reported by the parent
            res["failures"][name] = traceback.format_exc(limit=8)
            return None

    try:
        for how in ("loss", "add_grad_"):
            for split in (None, "auto"):
                name = f"{how}-{'split' if split else 'whole'}"
                out = attempt(name, lambda h=how, s=split: run_case(torch, rank, world, h, s, seed))
                if out is not None:
                    res["cases"][name] = out
        out = attempt("late", lambda: run_case(torch, rank, world, "late", "auto", seed))
        if out is not None:
            res["cases"]["late"] = out
        out = attempt("bad", lambda: bad_inputs(torch, rank, world, seed))
        if out is not None:
            res["bad"] = out
        dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        prog.close()
