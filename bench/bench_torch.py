"""OrthoL1 over a transformer's matrices against the per-layer autograd loop users write today.

    python bench/bench_torch.py                       # CPU, 12 layers, d_model 256 (this machine)
    python3 bench/bench_torch.py --device cuda --quick --json $OUT/bench_torch.json   # GPU check, < 60 s
    python3 bench/bench_torch.py --device cuda --quick --precision all --json $OUT/bench_torch_precision.json

Compared, on the same model in the same run, median of --repeat timed runs after warm-up:

- naive:     loss = sum(beta * |Gram(W) - I|.sum() for W in matrices); loss.backward()
             (the smaller Gram per matrix, the same as OrthoL1's mode="auto")
- loss:      OrthoL1(model).loss().backward()
- add_grad_: OrthoL1(model).add_grad_()  (no autograd graph; straight into .grad)

The ratio is naive time / OrthoL1 time (above 1: OrthoL1 is faster). Values and gradients of the
three are checked against each other before timing. On CUDA every timed run is bracketed by
torch.cuda.synchronize().

--precision highest|tf32|bf16|fp16 (or several, or all) times both sides under the SAME setting, one
after the other: "highest" float32 parameters with torch.set_float32_matmul_precision("highest"),
"tf32" float32 with "high" (the loop's matmuls and OrthoL1's float32 GEMMs, precision=None, both on
TF32 tensor cores), "bf16" / "fp16" the model's parameters in bfloat16 / float16. Each side's GEMM
rate is reported as TFLOP/s, counted as GEMMs of 2 k^2 K flops per matrix (k its smaller side, K its
larger): three for the loop (the Gram and autograd's two for its backward), two for OrthoL1 (the Gram
and the gradient), and against the card's dense peak for that precision where the card is in PEAKS.
On the CPU it is a dry run (the 16-bit OrthoL1 paths there may go through float32 copies).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def build(layers, d_model, ffn, dtype, device):
    import torch
    from torch import nn

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model, max(1, d_model // 64), dim_feedforward=ffn, batch_first=True)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    return model.to(device=device, dtype=dtype)


def naive_loss(mats, beta):
    import torch

    total = 0
    for W in mats:
        G = W @ W.T if W.shape[0] < W.shape[1] else W.T @ W  # as mode="auto": rows only when fewer
        total = total + beta * (G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)).abs().sum()
    return total


# dense peaks in TFLOP/s (NVIDIA's data sheets, without sparsity), by card: FP32, TF32, BF16, FP16
PEAKS = {
    "H100 SXM": {"highest": 67, "tf32": 495, "bf16": 990, "fp16": 990},
    "H100 PCIe": {"highest": 51, "tf32": 378, "bf16": 756, "fp16": 756},
    "H200": {"highest": 67, "tf32": 495, "bf16": 990, "fp16": 990},
}
SETTINGS = {  # --precision: (parameter dtype, torch.set_float32_matmul_precision)
    "highest": ("float32", "highest"),
    "tf32": ("float32", "high"),
    "bf16": ("bfloat16", "highest"),
    "fp16": ("float16", "highest"),
}


def card(name):
    """The PEAKS key of a torch.cuda.get_device_name(), or None (an unknown card: no % of peak)."""
    if "H200" in name:
        return "H200"
    if "H100" in name and "PCIe" in name:
        return "H100 PCIe"
    if "H100" in name and ("SXM" in name or "HBM3" in name):  # "NVIDIA H100 80GB HBM3" is the SXM card
        return "H100 SXM"
    return None


def gemm_flops(mats):
    """One step's GEMM flops: (the per-layer loop's, OrthoL1's); 2 k^2 K per GEMM of a k x K matrix."""
    one = sum(2 * min(p.shape) ** 2 * max(p.shape) for p in mats)
    return 3 * one, 2 * one


def timeit(fn, repeat, warmup, sync):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def capture(step, mats):
    """`step` (zero the gradients, then one regularizer step) captured in a torch.cuda.graph, as
    torch's documentation does it: gradients allocated before the capture (the graph writes into
    them), warm-up on a side stream; returns the graph's replay."""
    import torch

    def fn():
        for p in mats:
            p.grad.zero_()
        step(zero=False)

    for p in mats:
        p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    return g.replay


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (the GPU check uses this)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=None, help="default: 256 on CPU, 768 on CUDA (BERT-base)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16"])
    ap.add_argument("--repeat", type=int, default=None, help="timed runs (>= 5; default 7, 5 with --quick)")
    ap.add_argument("--beta", type=float, default=1e-4)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch AND NumPy's BLAS (OpenBLAS), which the CPU path uses "
        "(default: each library's own choice)",
    )
    ap.add_argument(
        "--precision",
        nargs="+",
        default=None,
        choices=[*SETTINGS, "all"],
        help="time both sides under each setting (instead of --dtype at torch's current setting)",
    )
    ap.add_argument("--json", default=None, help="write the results to this path")
    args = ap.parse_args(argv)
    if args.threads:
        # NumPy's OpenBLAS reads this when it loads: before numpy is first imported
        if "numpy" in sys.modules:
            print("# warning: numpy already imported, --threads does not reach its BLAS", file=sys.stderr)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available to torch", file=sys.stderr)
        return 2
    if args.precision is None:
        out = measure(args, args.dtype, None)
        ok = out["agreement_ok"]
    else:
        names = list(SETTINGS) if "all" in args.precision else list(dict.fromkeys(args.precision))
        runs = {}
        saved = torch.get_float32_matmul_precision()
        try:
            for name in names:
                dt, mm = SETTINGS[name]
                torch.set_float32_matmul_precision(mm)
                runs[name] = measure(args, dt, name)
        finally:
            torch.set_float32_matmul_precision(saved)
        ok = all(r["agreement_ok"] for r in runs.values())
        first = next(iter(runs.values()))
        out = {
            "bench": "bench_torch",
            "device": args.device,
            "device_name": first["device_name"],
            "card": first["card"],
            "precision": names,
            "runs": runs,
            "agreement_ok": ok,
        }
        summary(runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if ok else 1


def summary(runs):
    """One line per setting: each side's GEMM rate, eager and replayed, and the ratios."""
    print(f"\n{'setting':<9}{'side':<26}{'ms':>9}{'TFLOP/s':>9}{'% peak':>8}{'x loop':>8}")
    for name, r in runs.items():
        for key, label in (
            ("naive", "per-layer loop"),
            ("loss", "OrthoL1.loss()+backward"),
            ("add_grad_", "OrthoL1.add_grad_()"),
            ("naive_graph", "loop, graph"),
            ("loss_graph", "loss()+backward, graph"),
            ("add_grad_graph", "add_grad_(), graph"),
        ):
            row = r["results"].get(key)
            if row is None or "median_s" not in row:
                continue
            pct = row.get("pct_of_peak")
            ratio = row.get("ratio_vs_naive", row.get("ratio_vs_naive_graph", 1.0))
            print(
                f"{name:<9}{label:<26}{1e3 * row['median_s']:>9.3f}{row['tflops']:>9.3g}"
                f"{'' if pct is None else f'{pct:.1f}':>8}{ratio:>8.2f}"
            )


def measure(args, dtype_name, setting):
    """One model at one setting (torch's matmul precision already set): agreement, then the timings."""
    import torch

    from gpu_orthol1.torch import OrthoL1

    d = args.d_model or (768 if args.device == "cuda" else 256)
    repeat = max(5, args.repeat or (5 if args.quick else 7))
    dtype = getattr(torch, dtype_name)
    model = build(args.layers, d, 4 * d, dtype, args.device)
    reg = OrthoL1(model, args.beta)
    mats = [t.param for t in reg.targets]
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # agreement first: the three give the same loss and gradients
    model.zero_grad(set_to_none=True)
    ref = naive_loss(mats, args.beta)
    ref.backward()
    g_ref = [p.grad.clone() for p in mats]
    model.zero_grad(set_to_none=True)
    loss = reg.loss()
    loss.backward()
    g_loss = [p.grad.clone() for p in mats]
    model.zero_grad(set_to_none=True)
    val = reg.add_grad_()
    g_add = [p.grad.clone() for p in mats]
    loss, ref = loss.detach(), ref.detach()
    rel_loss = abs(float(loss) - float(ref)) / abs(float(ref))

    def rel(a, b):
        num = sum(float((x.double() - y.double()).norm() ** 2) for x, y in zip(a, b, strict=True)) ** 0.5
        den = sum(float(y.double().norm() ** 2) for y in b) ** 0.5
        return num / den

    # float32 vs float32: the two sum in different orders, and an entry of G - I that lands on the
    # other side of 0 flips a sign: a small relative difference in the gradient is expected
    agree = {
        "loss_rel": rel_loss,
        "add_grad_loss_rel": abs(float(val) - float(ref)) / abs(float(ref)),
        "grad_rel_loss": rel(g_loss, g_ref),
        "grad_rel_add_grad": rel(g_add, g_ref),
    }
    # Losses must agree to rounding. Gradients differ by the flipped signs: on an H200 at d_model=768
    # float32 gave a relative gradient difference of 2.0e-3 while float64 agreed to 9e-16, so the
    # float32 gradient tolerance is 1e-2 (an error in the method itself shows at O(1)).
    # TF32 and 16-bit: the loop's Gram is rounded (TF32 operands; bfloat16 / float16 output) unlike
    # ours (float32 Gram): tolerances of the rounding, still far below an error of the method
    loss_tol = {"float16": 1e-2, "bfloat16": 5e-2}.get(dtype_name, 5e-3 if setting == "tf32" else 1e-4)
    grad_tol = {"float64": 1e-10, "float32": 5e-2 if setting == "tf32" else 1e-2, "float16": 5e-2}
    grad_tol = grad_tol.get(dtype_name, 2e-1)
    ok = all(v < (grad_tol if k.startswith("grad") else loss_tol) for k, v in agree.items())

    def run_naive(zero=True):
        if zero:
            model.zero_grad(set_to_none=True)
        naive_loss(mats, args.beta).backward()

    def run_loss(zero=True):
        if zero:
            model.zero_grad(set_to_none=True)
        reg.loss().backward()

    def run_add(zero=True):
        if zero:
            model.zero_grad(set_to_none=True)
        reg.add_grad_()

    warm = 2
    res = {}
    for name, fn in (("naive", run_naive), ("loss", run_loss), ("add_grad_", run_add)):
        med, times = timeit(fn, repeat, warm, sync)
        res[name] = {"median_s": med, "times_s": times}
    if cuda:  # the same steps captured once in a CUDA graph and replayed (issue 8: "also when captured")
        for name, fn in (("naive_graph", run_naive), ("loss_graph", run_loss), ("add_grad_graph", run_add)):
            try:
                replay = capture(fn, mats)
                med, times = timeit(replay, repeat, warm, sync)
                res[name] = {
                    "median_s": med,
                    "times_s": times,
                    "grad_rel": rel([p.grad for p in mats], g_ref),
                }
            except Exception as e:  # report it; the eager rows stand
                res[name] = {"error": f"{type(e).__name__}: {e}"}
    # the baseline again at the end: the machine's load may drift during the run
    med2, times2 = timeit(run_naive, repeat, 0, sync)
    res["naive_again"] = {"median_s": med2, "times_s": times2}
    base = statistics.median(res["naive"]["times_s"] + times2)

    shapes = sorted({tuple(p.shape) for p in mats})
    dev_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    peak_key = card(dev_name) if cuda else None
    if setting is None:  # --dtype at torch's current setting (float64: no peak in the table)
        tf32 = torch.get_float32_matmul_precision() != "highest"
        setting_now = {"float32": "tf32" if tf32 else "highest", "float16": "fp16"}.get(dtype_name)
    else:
        setting_now = setting
    peak = PEAKS[peak_key].get(setting_now) if peak_key and setting_now else None
    f_naive, f_ours = gemm_flops(mats)
    for name, r in res.items():
        if "median_s" in r:
            r["tflops"] = (f_naive if name.startswith("naive") else f_ours) / r["median_s"] / 1e12
            r["pct_of_peak"] = None if peak is None else 100 * r["tflops"] / peak
    print(
        f"# bench_torch: {len(mats)} matrices {shapes} of a {args.layers}-layer transformer, d_model={d}, "
        f"{dtype_name}{'' if setting is None else f' ({setting})'}, device={args.device} ({dev_name}), "
        f"torch {torch.__version__}, matmul precision {torch.get_float32_matmul_precision()}, "
        f"threads={torch.get_num_threads()}, median of {repeat}"
    )
    print(
        f"# agreement with the naive loop: {', '.join(f'{k}={v:.1e}' for k, v in agree.items())} "
        f"({'ok' if ok else 'MISMATCH'})"
    )
    print(f"{'method':<34}{'median ms':>12}{'ratio (naive/this)':>22}")
    print(f"{'naive per-layer autograd loop':<34}{1e3 * base:>12.3f}{1.0:>22.2f}")
    for name, label in (("loss", "OrthoL1.loss() + backward"), ("add_grad_", "OrthoL1.add_grad_()")):
        m = res[name]["median_s"]
        res[name]["ratio_vs_naive"] = base / m
        print(f"{label:<34}{1e3 * m:>12.3f}{base / m:>22.2f}")
    if "naive_graph" in res:  # captured rows: each against the captured loop
        gbase = res["naive_graph"].get("median_s")
        for name, label in (
            ("naive_graph", "naive loop, CUDA graph replay"),
            ("loss_graph", "loss()+backward, graph replay"),
            ("add_grad_graph", "add_grad_(), graph replay"),
        ):
            r = res[name]
            if "error" in r or gbase is None:
                print(f"{label:<34}  {r.get('error', 'no captured baseline')}")
                continue
            r["ratio_vs_naive_graph"] = gbase / r["median_s"]
            print(
                f"{label:<34}{1e3 * r['median_s']:>12.3f}{gbase / r['median_s']:>22.2f}"
                f"   (grad rel. diff {r['grad_rel']:.1e})"
            )
    return {
        "bench": "bench_torch",
        "device": args.device,
        "device_name": dev_name,
        "card": peak_key,
        "peak_tflops": peak,
        "gemm_flops": {"naive": f_naive, "orthol1": f_ours},
        "setting": setting,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "dtype": dtype_name,
        "layers": args.layers,
        "d_model": d,
        "matrices": len(mats),
        "shapes": [list(s) for s in shapes],
        "repeat": repeat,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # at the end of the run; with the CPU count, what judging the run later needs (see summarize.py)
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "naive_median_s": base,
        "agreement": agree,
        "agreement_ok": ok,
        "results": res,
    }


if __name__ == "__main__":
    sys.exit(main())
