"""The `gpu-orthol1` command: `run` (loss and gradient of a tensor), `info` (backends), `bench`."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from ._cliargs import dims_of, unwritable
from .bench import main as bench_main
from .bench.env import cpu_name, gpu_name

DEFAULT_SHAPE = (4096, 32, 128)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = dims_of(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shape wants integers like 4096,32,128 or 4096x32x128, got {text!r}"
        ) from None
    if len(dims) not in (2, 3) or min(dims) < 0:
        raise argparse.ArgumentTypeError(f"--shape wants 2 or 3 non-negative sizes, got {text!r}")
    return dims


def _count(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = -1
    if k < 0:
        raise argparse.ArgumentTypeError(f"wants a count (0 or more), got {text!r}")
    return k


class CliError(Exception):
    """A user mistake found by the command itself: printed as one line, exit status 2."""


def _describe(shape: tuple[int, ...], dtype: Any) -> str:
    return f"a {len(shape)}-D {dtype} array of shape {tuple(shape)}"


def _load_phi(path: str, convert: bool) -> np.ndarray:
    """The array of a .npy file, or a CliError that says what the file holds and what is expected."""
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CliError(f"{path} is a directory; expected a .npy file")
    want = "a .npy file (numpy.save) holding a 2-D (l, n) or 3-D (l, m, n) float array"
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
            if magic[:4] == b"PK\x03\x04":  # the zip container of numpy.savez
                try:
                    with np.load(path, allow_pickle=False) as z:
                        names = ", ".join(z.files) or "none"
                except Exception:  # noqa: BLE001 - a damaged zip raises zipfile's own errors; the names are a courtesy
                    names = "unreadable"
                raise CliError(
                    f"{path} is a .npz archive (arrays: {names}); expected {want}: "
                    "save the one array with numpy.save"
                )
            if magic != b"\x93NUMPY":
                raise CliError(f"{path} is not a .npy file (no NumPy header); expected {want}")
            f.seek(0)
            version = np.lib.format.read_magic(f)
            shape, _, dtype = (
                np.lib.format.read_array_header_1_0(f)
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0(f)
            )
    except CliError:
        raise
    except (OSError, ValueError, EOFError) as e:  # unreadable, truncated, a damaged header
        raise CliError(f"{path}: cannot read it as a .npy file ({type(e).__name__}: {e})") from None
    holds = f"{path} holds {_describe(shape, dtype)}"
    if dtype.hasobject:
        raise CliError(f"{holds} (Python objects, which are never unpickled here); expected {want}")
    if len(shape) not in (2, 3):
        raise CliError(f"{holds}; expected a 2-D (l, n) or 3-D (l, m, n) array")
    if convert:
        if dtype.kind not in "biuf":
            raise CliError(f"{holds}; --dtype converts real numbers only")
    elif dtype not in (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)):
        raise CliError(f"{holds}; expected float16, float32 or float64 (or pass --dtype to convert)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # e.g. a header that promises more data than the file has
        raise CliError(f"{path}: cannot read its data ({type(e).__name__}: {e})") from None


def _grad_out_path(path: str) -> str:
    """The file numpy.save will write (it appends .npy), checked for writability before any computing."""
    real = path if path.endswith(".npy") else path + ".npy"
    why = unwritable("--grad-out", real)
    if why:
        raise CliError(why)
    return real


def _cmd_run(args: argparse.Namespace) -> int:
    import gpu_orthol1 as ol1
    from gpu_orthol1 import _backends

    grad_out = _grad_out_path(args.grad_out) if args.grad_out else None
    if args.phi:
        if args.shape:
            raise CliError("--shape sets the size of the random tensor; a file brings its own shape")
        phi = _load_phi(args.phi, convert=bool(args.dtype))
        source = args.phi
        if args.dtype:
            phi = phi.astype(args.dtype, copy=False)
    else:
        shape = args.shape or DEFAULT_SHAPE
        rng = np.random.default_rng(args.seed)
        # the scale only; an out-of-range axis is reported by the first call below, as the API words it
        l = shape[0] if len(shape) == 2 else next(s for i, s in enumerate(shape) if i != args.axis % 3)
        phi = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(max(l, 1))).astype(
            args.dtype or "float32"
        )
        source = f"random {phi.shape} (seed {args.seed})"

    # the first call validates phi and axis (the API's own checks and messages), so it comes before
    # anything below indexes the shape with axis
    t0 = time.perf_counter()
    loss, grad = ol1.loss_and_grad(
        phi, args.beta, axis=args.axis, backend=args.backend, precision=args.precision
    )
    first = time.perf_counter() - t0
    if phi.ndim == 3:
        m = phi.shape[args.axis]
        l, n = (s for i, s in enumerate(phi.shape) if i != args.axis % 3)
    else:
        m, (l, n) = 1, phi.shape
    resolved = _backends.resolve(_backends.check_name(args.backend), False, 4.0 * l * m * n * n)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        loss, grad = ol1.loss_and_grad(
            phi, args.beta, axis=args.axis, backend=args.backend, precision=args.precision
        )
        times.append(time.perf_counter() - t0)
    device = gpu_name(with_device=True) if resolved == "cupy" else cpu_name()
    gnorm = float(np.linalg.norm(grad.astype(np.float64).ravel()))
    print(f"input     {source}, dtype {phi.dtype}, axis {args.axis}: m={m} slices of {l} x {n}")
    print(f"loss      {float(loss):.9g}   (beta {args.beta:g}, reduction sum)")
    print(f"grad norm {gnorm:.9g}")
    print(f"backend   {resolved} on {device}")
    line = f"time      first call {first * 1e3:.2f} ms (includes JIT compilation and set-up)"
    if times:
        line += f"; median of {len(times)} warm calls {np.median(times) * 1e3:.2f} ms (host wall clock, with copies)"
    print(line)
    if grad_out:
        np.save(grad_out, grad)
        print(f"gradient  written to {grad_out}")
    return 0


def _installed(module: str) -> bool:
    """Whether `module` can be found, without importing it (CuPy's import can fail on a broken install)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cmd_info(args: argparse.Namespace) -> int:
    import gpu_orthol1 as ol1

    av = ol1.available_backends()
    print(f"gpu_orthol1 {ol1.__version__}, numpy {np.__version__}, python {platform.python_version()}")
    for name in ("cupy", "numpy"):
        if name in av:
            where = gpu_name(with_device=True) if name == "cupy" else cpu_name()
            print(f"  {name:6s} available   {where}")
        else:
            # installed but not working (no driver, no device, broken libraries) is not "missing":
            # the fix is a different one
            state = "unusable" if _installed(name) else "missing"
            why = " ".join(av.reasons.get(name, "").split())  # one line, whatever the exception held
            print(f"  {name:6s} {state:11s} {why}")
    env = os.environ.get("GPU_ORTHOL1_BACKEND")
    print(
        f"  backend='auto' picks: {'GPU_ORTHOL1_BACKEND=' + env if env else 'cupy for CuPy input; for NumPy input cupy above the crossover when available, else numpy'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return bench_main(argv[1:])
    p = argparse.ArgumentParser(prog="gpu-orthol1", description="L1 orthogonality loss and gradient.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="loss and gradient of a tensor (.npy) or of a random one")
    r.add_argument("phi", nargs="?", help="a .npy file; without it a random tensor of --shape")
    r.add_argument(
        "--shape", type=_shape, help="l,m,n or lxmxn (or l,n / lxn) of the random tensor; default 4096,32,128"
    )
    r.add_argument(
        "--axis",
        type=int,
        default=1,
        help="the axis of a 3-D tensor that indexes the m matrices (default: %(default)s)",
    )
    r.add_argument(
        "--beta",
        type=float,
        default=1e-3,
        help="the penalty's weight: loss = beta * sum_i |Phi_i^T Phi_i - I|_1 (default: %(default)g)",
    )
    r.add_argument(
        "--dtype",
        choices=["float16", "float32", "float64"],
        default=None,
        help="default: float32 for random input, the file's dtype otherwise",
    )
    r.add_argument(
        "--backend",
        choices=["auto", "numpy", "cupy"],
        default="auto",
        help="where to compute (default: %(default)s: see `gpu-orthol1 info`)",
    )
    r.add_argument(
        "--precision",
        choices=["highest", "tf32"],
        default="highest",
        help="float32 GEMMs on the GPU: full precision or TF32 (default: %(default)s)",
    )
    r.add_argument(
        "--repeat", type=_count, default=3, help="warm calls to time after the first (default: %(default)s)"
    )
    r.add_argument("--seed", type=int, default=0, help="seed of the random tensor (default: %(default)s)")
    r.add_argument("--grad-out", help="save the gradient to this .npy file")
    sub.add_parser("info", help="which backends are available here, and why not")
    sub.add_parser("bench", help="benchmarks against peers and limits (gpu-orthol1 bench --help)")
    args = p.parse_args(argv)
    try:
        return _cmd_run(args) if args.cmd == "run" else _cmd_info(args)
    except (CliError, TypeError, ValueError, MemoryError, RuntimeError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the exception held
        print(f"gpu-orthol1: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
