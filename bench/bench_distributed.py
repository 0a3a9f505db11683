"""The regularizer on a sharded transformer: gpu_orthol1.distributed against gather-then-compute.

    python bench/bench_distributed.py                                  # 2 and 4 ranks, d_model 512, 12 layers
    python bench/bench_distributed.py --ranks 2 --layers 1 --d-model 64 --steps 1 --out /tmp/x   # smoke
    python bench/bench_distributed.py --ddp --ranks 2 3                # OrthoL1(split=) under DDP

--ddp: the same matrices, replicated (a DistributedDataParallel model), float32. Per rank, the time
of `OrthoL1.add_grad_()` with split="auto" (this rank's flop-balanced share, world-scaled, plus the
scalar all-reduce of the value) against split=None (every rank the whole penalty), interleaved, after
one warm-up each; the ratio split / unsplit per rank (target: <= 1/world + 0.15). Before timing, 5 SGD
steps of each (add_grad_ before backward, a task loss on rank-local data) are compared: the split
run's parameters against the unsplit run's (float32: relative difference).

Weights: per layer the 4 attention projections (d x d) and the 2 MLP matrices (4d x d, d x 4d),
float32, each split along dim 0 over the ranks (Shard(0), as FSDP2 does), mode "auto" (the smaller
Gram: columns for d x d and 4d x d, rows for d x 4d). Per step, for every rank (gloo on this CPU,
one process per rank, one BLAS thread each):

- sharded: gpu_orthol1.distributed.orthol1_dtensor_execute over the DTensor weights (row splits sum
  packed n x n Grams; the d x 4d weights in rows mode are a column split: resharded to a row split
  and back by two all-to-alls, or gathered with --column-split gather);
- gather:  what a user writes without it: all_gather the shards of each weight, gpu_orthol1.loss_and_grad
  on the full weight, keep this rank's rows of the gradient.

The two run interleaved (A B A B ...) after one warm-up step each, each step behind a barrier; a step's
time is the slowest rank's. Bytes sent per rank are measured (/proc/self/io wchar: gloo's socket writes,
nothing else writes during a step) and also counted from the collectives' payloads. Before timing, the
two methods' losses and gradient shards are compared. A breakdown per weight kind (as many steps,
interleaved) shows where the time and bytes go. Writes JSON (command, CPU model, date, versions, load) and a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("attn", "mlp_up", "mlp_down")


def shapes(d, layers):
    """[(name, kind, (out, in))] of the model's matrices."""
    out = []
    for i in range(layers):
        for p in ("q", "k", "v", "o"):
            out.append((f"l{i}.attn.{p}", "attn", (d, d)))
        out.append((f"l{i}.mlp.up", "mlp_up", (4 * d, d)))
        out.append((f"l{i}.mlp.down", "mlp_down", (d, 4 * d)))
    return out


def wchar():
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


class Payload:
    """Counts what each collective call hands to torch.distributed (elements x itemsize) and the bytes
    a rank sends for it in a ring: all_reduce 2 (W-1)/W x payload, all_gather (W-1) x payload,
    all_to_all_single the blocks for the other ranks."""

    def __init__(self, world):
        self.world = world
        self.sent = 0.0
        self.calls = 0

    def __enter__(self):
        import torch.distributed as dist

        self._orig = dist.all_reduce, dist.all_gather, dist.all_to_all_single
        W = self.world

        def all_reduce(t, *a, **k):
            self.calls += 1
            self.sent += 2 * (W - 1) / W * t.numel() * t.element_size()
            return self._orig[0](t, *a, **k)

        def all_gather(lst, t, *a, **k):
            self.calls += 1
            self.sent += (W - 1) * t.numel() * t.element_size()
            return self._orig[1](lst, t, *a, **k)

        def all_to_all_single(out, t, out_splits=None, in_splits=None, *a, **k):
            self.calls += 1
            own = in_splits[dist.get_rank()] if in_splits else t.numel() // W
            self.sent += (t.numel() - own) * t.element_size()
            return self._orig[2](out, t, out_splits, in_splits, *a, **k)

        dist.all_reduce, dist.all_gather, dist.all_to_all_single = all_reduce, all_gather, all_to_all_single
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_reduce, dist.all_gather, dist.all_to_all_single = self._orig


def rank_main(rank, world, store, args, out_path):
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import gpu_orthol1 as ol1
    import gpu_orthol1.distributed as odist
    from gpu_orthol1.distributed import orthol1_dtensor_execute

    odist.COLUMN_SPLIT = args.column_split
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )
    mesh = init_device_mesh("cpu", (world,))
    beta = 1e-3
    mats = []  # (name, kind, DTensor weight, transpose)
    gen = torch.Generator().manual_seed(args.seed)
    for name, kind, (o, i) in shapes(args.d_model, args.layers):
        full = torch.randn(o, i, generator=gen) / (o**0.5)  # the same full weight on every rank
        local = torch.chunk(full, world, 0)[rank].clone()  # DTensor's Shard(0) split
        w = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
        )
        mats.append((name, kind, w, o < i))  # mode "auto": rows when the row Gram is the smaller
        del full

    def sharded(sel, ms=None):
        targets = [(w, "matrix", 1, tr) for _, k, w, tr in (ms or mats) if k in sel]
        loss, grads = orthol1_dtensor_execute(targets, beta)
        return float(loss), grads

    def gather(sel, ms=None):
        total = 0.0
        grads = []
        for _, k, w, tr in ms or mats:
            if k not in sel:
                continue
            local = w.to_local()
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local.contiguous())
            full = torch.cat(parts, 0).numpy()
            x = full.T if tr else full  # rows mode: the core reads the transposed view in place
            lo, g = ol1.loss_and_grad(x, beta, backend="numpy")
            g = g.T if tr else g
            r0 = sum(p.shape[0] for p in parts[:rank])
            grads.append(torch.from_numpy(np.ascontiguousarray(g[r0 : r0 + local.shape[0]])))
            total += float(lo)
        return total, grads

    methods = {"sharded": sharded, "gather": gather}

    def compare(ms):
        la, ga = sharded(KINDS, ms)
        lb, gb = gather(KINDS, ms)
        scale = max(float(y.abs().max()) for y in gb)
        err = max(float((x - y).abs().max()) for x, y in zip(ga, gb, strict=True)) / scale
        # float32 rounds the Gram differently in the two methods, so an entry of G - I within ~1e-7 of 0
        # may take the other sign: the entries it touches differ by ~4 beta |phi|; count them
        off = sum(int(((x - y).abs() > 1e-3 * scale).sum()) for x, y in zip(ga, gb, strict=True))
        return {
            "loss_rel_diff": abs(la - lb) / abs(lb),
            "grad_max_rel_diff": err,
            "grad_entries_off": off,
            "grad_entries": sum(y.numel() for y in gb),
        }

    # the two agree: exactly in float64 (the same weights, converted); in float32 up to sign flips at the kink
    mats64 = [
        (
            nm,
            k,
            DTensor.from_local(
                w.to_local().double(), mesh, [Shard(0)], run_check=False, shape=w.shape, stride=w.stride()
            ),
            tr,
        )
        for nm, k, w, tr in mats
    ]
    check = {"float64": compare(mats64), "float32": compare(mats)}
    del mats64

    def step(fn, sel):
        dist.barrier()
        w0 = wchar()
        with Payload(world) as pay:
            t0 = time.perf_counter()
            fn(sel)
            t = time.perf_counter() - t0
        return {"s": t, "wchar": wchar() - w0, "payload": pay.sent, "calls": pay.calls}

    rows: dict = {m: [] for m in methods}
    for m in methods:  # warm-up: plans, workspaces, gloo buffers
        step(methods[m], KINDS)
    for _ in range(args.steps):
        for m in methods:
            rows[m].append(step(methods[m], KINDS))
    per_kind: dict = {m: {k: [] for k in KINDS} for m in methods}
    for _ in range(args.steps):
        for k in KINDS:
            for m in methods:
                per_kind[m][k].append(step(methods[m], (k,)))
    with open(out_path, "w") as f:
        json.dump({"rank": rank, "check": check, "steps": rows, "per_kind": per_kind}, f)
    dist.barrier()  # every rank's results written; _spawn_entry leaves without destroying the group


def run_world(world, args):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        mp.start_processes(
            _spawn_entry,
            args=(world, os.path.join(tmp, "store"), vars(args), outs),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return [json.loads(Path(p).read_text()) for p in outs]


def _spawn_entry(rank, world, store, args, outs):
    rank_main(rank, world, store, argparse.Namespace(**args), outs[rank])
    # the results are written: skip destroy_process_group and the interpreter's teardown. The first
    # hung a rank once after the barrier (a CI run of the --ddp smoke test, 2026-12-07: both ranks'
    # results written, one process left sleeping; pytorch/pytorch#75097 reports a similar hang, with
    # NCCL, a barrier before it), and torch 2.13 + gloo occasionally aborts in a C++ destructor in the
    # second (seen by tests/_groups.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def ddp_rank_main(rank, world, store, args, out_path):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gpu_orthol1.torch import OrthoL1

    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, args.ddp_dtype))
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )

    class Mats(torch.nn.Module):
        def forward(self, x):  # a task loss that touches every parameter (through DDP's forward)
            return sum((p[:, : x.shape[1]] @ x.T).square().mean() for p in self.parameters())

    def model():
        gen = torch.Generator().manual_seed(args.seed)
        m = Mats()
        for name, _kind, (o, i) in shapes(args.d_model, args.layers):
            m.register_parameter(
                name.replace(".", "_"), torch.nn.Parameter(torch.randn(o, i, generator=gen) / o**0.5)
            )
        return m

    def task(m, x):
        return m(x)

    # correctness: 5 SGD steps of the split and the unsplit run side by side (the same data), their
    # DDP-averaged gradients compared after each step's backward, the parameters after the 5th step.
    # Relative measures per tensor: max|a - b| / max|b| (the headline, max over tensors) and
    # ||a - b||_F / ||b||_F; and the entries that differ by more than 1e-5 max|b| (a float32 Gram entry
    # within rounding of 0 that takes the other sign moves its gradient entries by ~4 beta |phi|).
    def rel_max(a, b):
        return float((a - b).abs().max() / b.abs().max())

    def rel_norm(a, b):
        return float((a - b).norm() / b.norm())

    # A third run, the float32 penalty's own sensitivity: the unsplit run again from parameters one ulp
    # away (each entry moved to the next float toward +inf). Its distance from the unsplit run after
    # the same 5 steps is what rounding alone does to this run, whatever order the sums take.
    runs = {}
    for split in (None, "auto", "ulp"):
        m = DDP(model())
        if split == "ulp":
            with torch.no_grad():
                for prm in m.parameters():
                    prm.copy_(torch.nextafter(prm, torch.full_like(prm, float("inf"))))
        runs[split] = (
            m,
            OrthoL1(m, 1e-3, split="auto" if split == "auto" else None),
            torch.optim.SGD(m.parameters(), lr=1e-2),
            torch.Generator().manual_seed(args.seed + 1 + rank),
        )
    grad_diffs, values = [], {None: [], "auto": [], "ulp": []}
    for _ in range(5):
        grads = {}
        for split, (m, reg, opt, gen) in runs.items():
            x = torch.randn(4, 64, generator=gen)
            opt.zero_grad()
            values[split].append(float(reg.add_grad_()))  # before backward: DDP's all-reduce carries it
            task(m, x).backward()
            grads[split] = [p.grad.clone() for p in m.parameters()]
            opt.step()
        grad_diffs.append(max(rel_max(a, b) for a, b in zip(grads["auto"], grads[None], strict=True)))
    pa = [p.detach() for p in runs["auto"][0].parameters()]
    pb = [p.detach() for p in runs[None][0].parameters()]
    rel = max(rel_max(a, b) for a, b in zip(pa, pb, strict=True))
    pu = [p.detach() for p in runs["ulp"][0].parameters()]
    check = {
        "one_ulp_params_max_rel_diff": max(rel_max(a, b) for a, b in zip(pu, pb, strict=True)),
        "one_ulp_params_norm_rel_diff": max(rel_norm(a, b) for a, b in zip(pu, pb, strict=True)),
        "params_norm_rel_diff": max(rel_norm(a, b) for a, b in zip(pa, pb, strict=True)),
        "params_entries_over_1e-5": sum(
            int(((a - b).abs() > 1e-5 * b.abs().max()).sum()) for a, b in zip(pa, pb, strict=True)
        ),
        "params_entries": sum(b.numel() for b in pb),
        "grad_max_rel_diff_per_step": grad_diffs,
        "loss_max_rel_diff": max(
            abs(a - b) / abs(b) for a, b in zip(values["auto"], values[None], strict=True)
        ),
    }
    del runs, grads

    regs = {}
    for split in (None, "auto"):
        m = DDP(model())
        regs["split" if split else "whole"] = OrthoL1(m, 1e-3, split=split)
    share = sorted(regs["split"]._runner.active())
    times: dict = {k: [] for k in regs}

    def once(reg):
        dist.barrier()
        t0 = time.perf_counter()
        reg.add_grad_()
        return time.perf_counter() - t0

    for reg in regs.values():  # warm-up
        once(reg)
    for _ in range(args.steps):
        for k, reg in regs.items():
            times[k].append(once(reg))
    with open(out_path, "w") as f:
        json.dump({"rank": rank, "params_max_rel_diff": rel, **check, "share": share, "times": times}, f)
    dist.barrier()  # every rank's results written; _ddp_entry leaves without destroying the group


def _ddp_entry(rank, world, store, args, outs):
    ddp_rank_main(rank, world, store, argparse.Namespace(**args), outs[rank])
    # as _spawn_entry: no destroy_process_group, no teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


CHECK_KEYS = (
    "one_ulp_params_max_rel_diff",
    "one_ulp_params_norm_rel_diff",
    "params_norm_rel_diff",
    "params_entries_over_1e-5",
    "params_entries",
    "grad_max_rel_diff_per_step",
    "loss_max_rel_diff",
)


def run_ddp(world, args):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        mp.start_processes(
            _ddp_entry,
            args=(world, os.path.join(tmp, "store"), vars(args), outs),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        ranks = [json.loads(Path(p).read_text()) for p in outs]
    per_rank = []
    for r in ranks:
        w, s = statistics.median(r["times"]["whole"]), statistics.median(r["times"]["split"])
        per_rank.append(
            {
                "rank": r["rank"],
                "whole_ms": 1e3 * w,
                "split_ms": 1e3 * s,
                "ratio": s / w,
                "matrices": len(r["share"]),
                "params_max_rel_diff": r["params_max_rel_diff"],
                **{k: r[k] for k in CHECK_KEYS if k in r},
                "whole_ms_all": [round(1e3 * x, 1) for x in r["times"]["whole"]],
                "split_ms_all": [round(1e3 * x, 1) for x in r["times"]["split"]],
            }
        )
    return {"ranks": world, "target_ratio": 1 / world + 0.15, "per_rank": per_rank}


def ddp_markdown(doc):
    a = doc["args"]
    lines = [
        f"# OrthoL1(split=) under DDP on the CPU (gloo): {a['layers']} layers, d_model {a['d_model']}, "
        f"{a.get('ddp_dtype', 'float32')}",
        "",
        f"`{doc['command']}` at {doc['date']} on {doc['cpu_model']} ({doc['cpu_count']} CPUs); load average "
        f"{doc['loadavg_start']} at start, {doc['loadavg_end']} at end.",
        "",
        f"Per rank: median of {a['steps']} interleaved `add_grad_()` calls (one BLAS thread per rank).",
        "",
        "| ranks | rank | matrices | unsplit ms | split ms | split / unsplit | target | params rel diff after 5 SGD steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        for x in r["per_rank"]:
            lines.append(
                f"| {r['ranks']} | {x['rank']} | {x['matrices']} | {x['whole_ms']:.0f} | {x['split_ms']:.0f} "
                f"| {x['ratio']:.2f} | {r['target_ratio']:.2f} | {x['params_max_rel_diff']:.1e} |"
            )
    checked = [(r["ranks"], x) for r in doc["results"] for x in r["per_rank"] if "params_norm_rel_diff" in x]
    if checked:
        lines += [
            "",
            "The 5-step comparison per rank, split against unsplit: parameters (max |a - b| / max |b| per "
            "tensor above; here ||a - b||_F / ||b||_F per tensor, max over tensors, and the entries off by "
            "more than 1e-5 max |b|), the DDP-averaged gradients per step (max |a - b| / max |b|) and the "
            "returned loss.",
            "",
            "| ranks | rank | params norm rel diff | entries off > 1e-5 | grad rel diff per step | loss rel diff "
            "| unsplit from params 1 ulp away: max rel diff, norm rel diff |",
            "|---|---|---|---|---|---|---|",
        ]
        for world, x in checked:
            steps = " ".join(f"{g:.0e}" for g in x["grad_max_rel_diff_per_step"])
            ulp = (
                f"{x['one_ulp_params_max_rel_diff']:.1e}, {x['one_ulp_params_norm_rel_diff']:.1e}"
                if "one_ulp_params_max_rel_diff" in x
                else "-"
            )
            lines.append(
                f"| {world} | {x['rank']} | {x['params_norm_rel_diff']:.1e} | "
                f"{x['params_entries_over_1e-5']} of {x['params_entries']} | {steps} | {x['loss_max_rel_diff']:.1e} "
                f"| {ulp} |"
            )
        lines += [
            "",
            "The last column is the unsplit run against itself started from parameters one ulp away (each "
            f"entry the next {a.get('ddp_dtype', 'float32')} toward +inf): how far rounding alone moves this "
            "run in 5 steps. A Gram entry within rounding of 0 takes either sign, each a valid subgradient "
            "of |x|.",
        ]
    if doc.get("note"):
        lines += ["", doc["note"]]
    return "\n".join(lines) + "\n"


def _kind_summary(per_rank):
    """per_rank: each rank's list of step records for one weight kind -> medians (time: slowest rank)."""
    steps = list(zip(*per_rank, strict=True))
    return {
        "ms": 1e3 * statistics.median(max(x["s"] for x in st) for st in steps),
        "sent_MB_measured": statistics.median(x["wchar"] for st in steps for x in st) / 1e6,
        "sent_MB_payload": statistics.median(x["payload"] for st in steps for x in st) / 1e6,
        "collectives": per_rank[0][0]["calls"],
    }


def summarize(world, ranks):
    out = {"ranks": world, "check": ranks[0]["check"], "methods": {}}
    for m in ("sharded", "gather"):
        steps = list(zip(*[r["steps"][m] for r in ranks], strict=True))  # per step: every rank's record
        t = [max(x["s"] for x in st) for st in steps]
        out["methods"][m] = {
            "step_ms_median": 1e3 * statistics.median(t),
            "step_ms_all": [round(1e3 * x, 2) for x in t],
            "sent_MB_per_rank_measured": statistics.median(x["wchar"] for st in steps for x in st) / 1e6,
            "sent_MB_per_rank_payload": statistics.median(x["payload"] for st in steps for x in st) / 1e6,
            "collectives_per_step": ranks[0]["steps"][m][0]["calls"],
            "per_kind": {k: _kind_summary([r["per_kind"][m][k] for r in ranks]) for k in KINDS},
        }
    s, g = out["methods"]["sharded"], out["methods"]["gather"]
    out["speedup"] = g["step_ms_median"] / s["step_ms_median"]
    out["bytes_ratio"] = s["sent_MB_per_rank_measured"] / g["sent_MB_per_rank_measured"]
    return out


def cpu_model():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def loadavg():
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def markdown(doc):
    a = doc["args"]
    lines = [
        f"# gpu_orthol1.distributed on the CPU (gloo): {a['layers']} layers, d_model {a['d_model']}, float32",
        "",
        f"`{doc['command']}` at {doc['date']} on {doc['cpu_model']} ({doc['cpu_count']} CPUs); load average "
        f"{doc['loadavg_start']} at start, {doc['loadavg_end']} at end. Versions: "
        + ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
        + ".",
        "",
        "Per step, every weight of the model (mode auto), weights split along dim 0 (Shard(0)). Time: median "
        f"of {a['steps']} steps, the slowest rank's; bytes: sent per rank per step, measured (socket writes).",
        "",
        "| ranks | method | step ms | MB sent / rank | collectives / step | attn ms / MB | mlp_up ms / MB "
        "| mlp_down ms / MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        for m in ("sharded", "gather"):
            x = r["methods"][m]
            pk = " | ".join(
                f"{x['per_kind'][k]['ms']:.0f} / {x['per_kind'][k]['sent_MB_measured']:.2f}" for k in KINDS
            )
            lines.append(
                f"| {r['ranks']} | {m} | {x['step_ms_median']:.0f} | {x['sent_MB_per_rank_measured']:.2f} "
                f"| {x['collectives_per_step']} | {pk} |"
            )
    lines.append("")
    for r in doc["results"]:
        c64, c32 = r["check"]["float64"], r["check"]["float32"]
        lines.append(
            f"- {r['ranks']} ranks: sharded is {r['speedup']:.2f}x the gather approach's speed and "
            f"sends {r['bytes_ratio']:.2f}x its bytes. The two agree in float64 to "
            f"{c64['loss_rel_diff']:.1e} (loss) and {c64['grad_max_rel_diff']:.1e} (gradient, relative to "
            f"its largest entry); in float32 the loss to {c32['loss_rel_diff']:.1e}, and "
            f"{c32['grad_entries_off']} of {c32['grad_entries']} gradient entries differ by more than "
            "1e-3 of the largest (signs of G - I entries within rounding of 0)."
        )
    if doc.get("note"):
        lines += ["", doc["note"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/cpu-distributed", help="writes OUT.json and OUT.md")
    ap.add_argument(
        "--column-split",
        choices=("reshard", "gather"),
        default="reshard",
        help="gpu_orthol1.distributed.COLUMN_SPLIT for the sharded method",
    )
    ap.add_argument(
        "--ddp", action="store_true", help="OrthoL1(split=) under DDP instead (see the docstring)"
    )
    ap.add_argument("--ddp-dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--note", default="", help="a line for the markdown (e.g. what else loaded the machine)")
    args = ap.parse_args(argv)
    # one BLAS thread per rank (set before the ranks import NumPy): ranks are the parallelism
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import numpy
    import torch

    import gpu_orthol1

    doc = {
        "command": " ".join(
            ["python", "bench/bench_distributed.py"] + (argv if argv is not None else sys.argv[1:])
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": loadavg(),
        "versions": {
            "gpu_orthol1": getattr(gpu_orthol1, "__version__", "?"),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "python": platform.python_version(),
        },
        "args": vars(args),
        "threads_per_rank": 1,
        "backend": "gloo (TCP, localhost)",
        "note": args.note,
        "results": [],
    }
    if args.ddp:
        for w in args.ranks:
            res = run_ddp(w, args)
            doc["results"].append(res)
            print(json.dumps(res["per_rank"]), flush=True)
        doc["loadavg_end"] = loadavg()
        out = Path(args.out + "-ddp" if args.out == ap.get_default("out") else args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        out.with_suffix(".md").write_text(ddp_markdown(doc))
        print(ddp_markdown(doc))
        return
    for w in args.ranks:
        t0 = time.time()
        res = summarize(w, run_world(w, args))
        doc["results"].append(res)
        print(
            f"{w} ranks ({time.time() - t0:.0f} s): "
            + ", ".join(
                f"{m} {x['step_ms_median']:.0f} ms {x['sent_MB_per_rank_measured']:.2f} MB"
                for m, x in res["methods"].items()
            ),
            flush=True,
        )
    doc["loadavg_end"] = loadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
