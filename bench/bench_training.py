"""What OrthoL1's metrics cost, on the matrices of a transformer (issue 25's targets).

    python bench/bench_training.py                                 # 12 layers, d_model 512, float32, CPU
    python bench/bench_training.py --layers 1 --d-model 64 --reps 2 --out /tmp/x   # smoke

Per layer the 4 attention projections (d x d) and the 2 MLP matrices (4d x d, d x 4d), as in
bench_distributed.py. Methods, interleaved (A B C D, D C B A, ...) after one warm-up each, median of --reps:

- loss+backward: `reg.loss().backward()` (the Gram and gradient GEMMs, the gradient into .grad);
- metrics:       `reg.metrics()` (one Gram-only pass, no gradient GEMM), values read (one sync);
- loss:          `reg.loss()` under autograd (its forward forms the gradient too);
- loss+metrics:  `reg.loss(metrics=True)`, the metrics a by-product of the same pass.

Targets: metrics <= 0.6x loss+backward; loss+metrics <= 1.05x loss. Also the time of the CPU sign
pass in loss() and in loss(metrics=True) (which computes the metrics in the same loop), timed directly.
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distributed import cpu_model, loadavg, shapes  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/cpu-training-metrics")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    import torch

    from gpu_orthol1.torch import OrthoL1

    gen = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter((torch.randn(o, i, generator=gen) / o**0.5).to(args.device))
        for _name, _kind, (o, i) in shapes(args.d_model, args.layers)
    ]
    reg = OrthoL1(params, 1e-3)
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def loss_backward():
        reg.loss().backward()

    def metrics():
        m = reg.metrics()
        torch.stack([v for d in m.values() for v in d.values()]).tolist()  # read the values

    def loss():
        reg.loss()

    def loss_metrics():
        _, m = reg.loss(metrics=True)

    methods = {"loss+backward": loss_backward, "metrics": metrics, "loss": loss, "loss+metrics": loss_metrics}
    times: dict = {k: [] for k in methods}

    def once(fn):
        for p in params:
            p.grad = None
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    # the metrics' own cost, measured directly: the time in the CPU device's sign pass during loss()
    # (`sign_abs`) and during loss(metrics=True) (`sign_abs_metrics`: the same pass with the metrics
    # computed in its loop). The difference of two medians of multi-second calls is at the mercy of
    # the machine's load; these passes are short and single-threaded.
    from gpu_orthol1 import _numpy_dev

    pass_s = [0.0]
    Dev = _numpy_dev.NumpyDevice

    def timed(name):
        inner = getattr(Dev, name)

        def wrapper(*a):
            t0 = time.perf_counter()
            inner(*a)
            pass_s[0] += time.perf_counter() - t0

        setattr(Dev, name, staticmethod(wrapper) if isinstance(Dev.__dict__[name], staticmethod) else wrapper)

    timed("sign_abs")
    timed("sign_abs_metrics")
    start = loadavg()
    for fn in methods.values():
        once(fn)
    passes: dict = {"loss": [], "loss+metrics": []}
    names = list(methods)
    for r in range(args.reps):
        for k in (
            names if r % 2 == 0 else names[::-1]
        ):  # A B C D, then D C B A: no method always follows another
            pass_s[0] = 0.0
            times[k].append(once(methods[k]))
            if k in passes:
                passes[k].append(pass_s[0])
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    doc = {
        "command": " ".join(
            ["python", "bench/bench_training.py"] + (argv if argv is not None else sys.argv[1:])
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": start,
        "loadavg_end": loadavg(),
        "args": vars(args),
        "median_ms": med,
        "all_ms": {k: [round(1e3 * x, 1) for x in v] for k, v in times.items()},
        "metrics_over_loss_backward": med["metrics"] / med["loss+backward"],
        "loss_metrics_over_loss": med["loss+metrics"] / med["loss"],
        "sign_pass_ms": {k: 1e3 * statistics.median(v) for k, v in passes.items()},
        "metrics_in_pass_ms": 1e3
        * (statistics.median(passes["loss+metrics"]) - statistics.median(passes["loss"])),
        "metrics_in_pass_share_of_loss": (
            statistics.median(passes["loss+metrics"]) - statistics.median(passes["loss"])
        )
        / statistics.median(times["loss"]),
        "note": args.note,
    }
    md = [
        f"# OrthoL1 metrics cost: {args.layers} layers, d_model {args.d_model}, float32, {args.device}",
        "",
        f"`{doc['command']}` at {doc['date']} on {doc['cpu_model']} ({doc['cpu_count']} CPUs, torch threads "
        f"{doc['torch_threads']}); load average {start} at start, {doc['loadavg_end']} at end. "
        f"Median of {args.reps} interleaved runs.",
        "",
        "| method | ms |",
        "|---|---|",
    ]
    md += [f"| {k} | {v:.0f} |" for k, v in med.items()]
    md += [
        "",
        f"- metrics() / (loss() + backward): {doc['metrics_over_loss_backward']:.2f} (target <= 0.6)",
        f"- loss(metrics=True) / loss(): {doc['loss_metrics_over_loss']:.3f} (target <= 1.05)",
        f"- the sign pass took {doc['sign_pass_ms']['loss']:.1f} ms in loss() and "
        f"{doc['sign_pass_ms']['loss+metrics']:.1f} ms in loss(metrics=True) (the metrics computed in its loop): "
        f"{doc['metrics_in_pass_ms']:.1f} ms, {100 * doc['metrics_in_pass_share_of_loss']:.1f} % of loss()'s median",
    ]
    if args.note:
        md += ["", args.note]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
