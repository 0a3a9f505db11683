"""gpu_orthol1.jax on the CPU: jit(value_and_grad(ortho_l1)) against the core's own call and against
JAX's jit(value_and_grad) of the naive expression.

    python bench/bench_jax.py [--repeat 9] [--shapes 4096,32,128 64,4096,64 512,64,512]
                              [--device cpu|gpu] [--json bench/results/cpu-jax.json]

For each shape (l, m, n) (m slices of (l, n) along axis 1), float32, beta 1e-3, loss and gradient:

- ol1: `gpu_orthol1.loss_and_grad(phi, beta)` on a NumPy array (the baseline; with --device gpu on
  a CuPy array, the CuPy path, its stream synchronized after each call);
- gpu_orthol1.jax: `jax.jit(jax.value_and_grad(lambda x: ortho_l1(x, beta)))` on a jax.Array
  (the core through buffer_callback, plus the custom_vjp's scaling of the saved gradient);
- jax naive: `jax.jit(jax.value_and_grad(naive))`, the batched expression at Precision.HIGHEST.

Runs are interleaved (each method once per round, after a warm-up round that also compiles), and
every result is first checked against the float64 reference. --device gpu puts the JAX inputs on
JAX's first GPU (set XLA_PYTHON_CLIENT_PREALLOCATE=false, or XLA takes 75% of the card before CuPy
asks); it exits with a message when JAX or CuPy sees no GPU. Medians and p20/p80 per method; each
ratio is the median of per-round ratios. The JSON records the CPU model, CPU count, versions and
the load average (a shared machine's figures are disturbed: say so when quoting them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

import gpu_orthol1 as ol1
from gpu_orthol1 import reference as R

SHAPES = [(4096, 32, 128), (64, 4096, 64), (512, 64, 512)]
BETA = 1e-3


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def methods(phi, device="cpu"):
    import jax
    import jax.numpy as jnp

    from gpu_orthol1.jax import ortho_l1

    x = jnp.asarray(phi)
    if device == "gpu":
        import cupy

        x = jax.device_put(x, jax.devices("gpu")[0])
        cp_phi = cupy.asarray(phi)

        def core():
            out = ol1.loss_and_grad(cp_phi, BETA, backend="cupy")
            cupy.cuda.get_current_stream().synchronize()
            return out
    else:

        def core():
            return ol1.loss_and_grad(phi, BETA, backend="numpy")

    def naive(x):
        G = jnp.matmul(
            jnp.swapaxes(jnp.moveaxis(x, 1, 0), 1, 2),
            jnp.moveaxis(x, 1, 0),
            precision=jax.lax.Precision.HIGHEST,
        )
        return BETA * jnp.abs(G - jnp.eye(x.shape[2], dtype=x.dtype)).sum()

    ours = jax.jit(jax.value_and_grad(lambda x: ortho_l1(x, BETA)))
    peer = jax.jit(jax.value_and_grad(naive))
    return {
        "ol1": core,
        "gpu_orthol1.jax": lambda: jax.block_until_ready(ours(x)),
        "jax naive": lambda: jax.block_until_ready(peer(x)),
    }


def check(phi, fn, name):
    loss, grad = fn()
    if hasattr(grad, "get"):  # CuPy
        loss, grad = loss.get(), grad.get()
    R.check(phi, np.asarray(loss), np.asarray(grad), BETA, 1, "sum", dtype=np.float32)


def bench_shape(shape, repeat, rng, device="cpu"):
    phi = R.random_phi(rng, shape, np.float32)
    ms = methods(phi, device)
    for name, fn in ms.items():  # the warm-up round: compiles, and checks every result
        check(phi, fn, name)
    times = {k: [] for k in ms}
    for _ in range(repeat):
        for name, fn in ms.items():
            time.sleep(0.05 if device == "cpu" else 0.002)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    row = {"shape": list(shape), "dtype": "float32", "device": device}
    for name, ts in times.items():
        a = np.array(ts) * 1e3
        row[name] = {
            "median_ms": float(np.median(a)),
            "p20_ms": float(np.percentile(a, 20)),
            "p80_ms": float(np.percentile(a, 80)),
        }
    base = np.array(times["gpu_orthol1.jax"])
    row["jax_over_ol1"] = float(np.median(base / np.array(times["ol1"])))
    row["naive_over_jax"] = float(np.median(np.array(times["jax naive"]) / base))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in SHAPES])
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = ap.parse_args(argv)
    import jax

    gpu_name = None
    if args.device == "gpu":
        try:
            import cupy

            gpu_name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
            jax.devices("gpu")
        except Exception as e:  # noqa: BLE001 - any missing piece: say which and stop
            sys.exit(f"bench_jax --device gpu: no GPU for JAX and CuPy here ({type(e).__name__}: {e})")

    rng = np.random.default_rng(0)
    load0 = os.getloadavg()[0]
    rows = []
    for s in args.shapes:
        row = bench_shape(tuple(int(v) for v in s.split(",")), args.repeat, rng, args.device)
        rows.append(row)
        print(
            f"{tuple(row['shape'])}: ol1 {row['ol1']['median_ms']:.2f} ms, gpu_orthol1.jax "
            f"{row['gpu_orthol1.jax']['median_ms']:.2f} ms, jax naive {row['jax naive']['median_ms']:.2f} ms; "
            f"jax/ol1 {row['jax_over_ol1']:.3f}x, naive/jax {row['naive_over_jax']:.2f}x",
            flush=True,
        )
    doc = {
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "cpu_model": cpu_model(),
        "gpu": gpu_name,
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": {
            "jax": jax.__version__,
            "numpy": np.__version__,
            "gpu_orthol1": ol1.__version__,
            "python": platform.python_version(),
        },
        "load_start": load0,
        "load_end": os.getloadavg()[0],
        "disturbed": load0 > 2.0,
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    main()
