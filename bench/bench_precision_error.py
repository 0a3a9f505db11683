"""The error of each precision setting against the float64 reference, on the reference shapes.

    python bench/bench_precision_error.py [--shapes 4096,32,128 64,4096,64 512,64,512] [--seed 0]
                                          [--json bench/results/cpu-precision-error.json]

Settings, float32 input (random_phi: X = G - I of order 1), beta 0.5:

- "highest": the package's own float32 result on this machine (NumPy backend; on a GPU the float32
  GEMMs accumulate in a different order, with errors of the same size).
- "tf32": TF32 EMULATED, not measured on a card: both GEMMs' float32 operands rounded to a 10-bit
  mantissa, round to nearest even (`gpu_orthol1.testing.to_tf32`, what the emulated GPU device does
  under CUBLAS_COMPUTE_32F_FAST_TF32), the products summed in float32 (NumPy's sgemm), S = sign(G - I)
  in float32 (exact in TF32), the loss summed in float64.
- "tf32-truncate": the same with the low 13 bits cut instead (NVIDIA does not document cuBLAS's
  conversion; truncation is the worse case).

Each row: the loss's relative error and the gradient's largest error relative to its entry bound
2 beta sum_j |Phi[a, i, j]| (`gpu_orthol1.reference.Reference.check`), against the "tf32" tolerance
class of `gpu_orthol1.reference.TOL` (float32's for "highest"). Errors are not timings: the load of
the machine does not change them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np

import gpu_orthol1 as ol1
from gpu_orthol1.reference import TOL, Reference, random_phi
from gpu_orthol1.testing import to_tf32

REF_SHAPES = ((4096, 32, 128), (64, 4096, 64), (512, 64, 512))  # gpu_orthol1.bench.command's
BETA = 0.5


def _truncate(x: np.ndarray) -> np.ndarray:
    return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def emulated(
    phi: np.ndarray, beta: float, round_fn, S64: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(loss, gradient, S, the gradient from the float64 reference's signs S64) of (l, m, n) float32
    phi with both GEMMs' operands rounded by round_fn."""
    P = round_fn(phi).transpose(1, 0, 2)  # (m, l, n) slices, rounded once: both GEMMs read phi
    G = np.matmul(P.transpose(0, 2, 1), P)  # float32 accumulation
    X = G - np.eye(G.shape[-1], dtype=np.float32)
    loss = beta * float(np.abs(X, dtype=np.float64).sum())
    S = np.sign(X)  # exact in TF32
    grad = np.matmul(P, S) * np.float32(2 * beta)
    fixed = np.matmul(P, S64) * np.float32(2 * beta)  # the gradient GEMM's own error, no sign flip
    return loss, grad.transpose(1, 0, 2), S, fixed.transpose(1, 0, 2)


def _same(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def run(shapes, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for shape in shapes:
        phi = random_phi(rng, shape, np.float32)
        ref = Reference.build(phi, BETA)
        P64 = phi.astype(np.float64).transpose(1, 0, 2)
        S64 = np.sign(np.matmul(P64.transpose(0, 2, 1), P64) - np.eye(shape[2])).astype(np.float32)
        del P64
        # "highest": the package's float32 result; its S and fixed-sign gradient from float32 GEMMs
        base = emulated(phi, BETA, _same, S64)
        results = {
            "highest": ol1.loss_and_grad(phi, BETA, backend="numpy") + base[2:],
            "tf32": emulated(phi, BETA, to_tf32, S64),
            "tf32-truncate": emulated(phi, BETA, _truncate, S64),
        }
        for setting, (loss, grad, S, fixed) in results.items():
            cls = "float32" if setting == "highest" else "tf32"
            r = ref.check(loss, grad, cls)
            fixed_err = float(np.max(np.abs(fixed - ref.grad) / ref.bound))
            rows.append(
                dict(
                    shape=list(shape),
                    setting=setting,
                    emulated=setting != "highest",
                    loss_rel_err=r.loss_err,
                    grad_err_of_bound=r.grad_err,
                    compared=r.compared,
                    grad_err_fixed_signs=fixed_err,
                    sign_flips=float(np.mean(S != S64)),
                    tol_class=cls,
                    tol=TOL[cls],
                    within=r.ok,
                )
            )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in REF_SHAPES])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    rows = run(shapes, args.seed)
    print(
        f"{'shape (l, m, n)':>16} {'setting':>13} {'loss rel err':>12} {'grad err':>9} {'compared':>8} "
        f"{'fixed-sign':>10} {'sign flips':>10}  within"
    )
    for r in rows:
        print(
            f"{' x '.join(map(str, r['shape'])):>16} {r['setting']:>13} {r['loss_rel_err']:12.2e} "
            f"{r['grad_err_of_bound']:9.2e} {r['compared']:8.3f} {r['grad_err_fixed_signs']:10.2e} "
            f"{r['sign_flips']:10.2e}  {r['within']} ({r['tol_class']})"
        )
    if args.json:
        doc = dict(
            command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            machine=platform.processor() or platform.machine(),
            versions=dict(
                numpy=np.__version__, gpu_orthol1=ol1.__version__, python=platform.python_version()
            ),
            beta=BETA,
            seed=args.seed,
            note="tf32 rows are an emulation on the CPU (operands rounded to TF32, float32 sums), not a card",
            rows=rows,
        )
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(r["within"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
