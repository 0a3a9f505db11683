"""The `gpu-orthol1 bench` command line: options, their checks, the run they ask for, the outputs.

    gpu-orthol1 bench [--quick] [--device cpu|gpu|all] [--shapes LxMxN,...] [--dtypes ...]
                      [--csv FILE] [--json FILE] [--plot FILE.png]
    python -m gpu_orthol1.bench ...            (the same, without the console script)

Methods: see methods.py; the measuring loop: runner.py. Rows whose timing something
else disturbed are flagged (flags.flag_rows) and are not figures to publish; points
where gpu_orthol1 misses its CPU promise are marked slow (flags.slow_rows). Output
paths and --plot are checked before anything runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
import time

from .. import _backends
from .._cliargs import dims_of, unwritable
from . import methods as methods_module
from .base import DTYPES
from .env import loadavg
from .flags import SLOW_PEER, SLOW_RATIO, flag_rows, slow_rows
from .report import headline_markdown, plot, table, write_csv
from .runner import Bench, BenchConfig

REF_SHAPES = ((4096, 32, 128), (64, 4096, 64), (512, 64, 512))
# Scaling sweeps: (fixed dims, values). time vs m at fixed (l, n); time vs n at fixed (l, m).
SWEEPS: dict[str, dict[str, tuple]] = {
    "full": {"m": ((512, 64), (8, 32, 128, 512, 2048, 8192)), "n": ((1024, 16), (16, 32, 64, 128, 256, 512))},
    "quick": {"m": ((512, 64), (16, 128, 1024)), "n": ((1024, 16), (32, 128, 512))},
    "gpu": {
        "m": ((512, 64), (16, 64, 256, 1024, 4096, 16384)),
        "n": ((1024, 64), (16, 32, 64, 128, 256, 512)),
    },
    "gpu-quick": {"m": ((512, 64), (16, 256, 4096)), "n": ((1024, 64), (16, 64, 256))},
}
# CPU<->GPU crossover for backend="auto" with NumPy inputs: (l, n) fixed, m grows.
CROSSOVER = {
    "quick": ((256, 64), (1, 4, 16, 64, 256, 1024, 4096)),
    "full": ((256, 64), (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)),
}


def _parse_shapes(s):
    """Reference shapes: 'LxMxN,LxMxN,...', or 'L,M,N;L,M,N' (';' or a space between shapes); 'none'
    for none."""
    if s.strip().lower() in ("", "none"):
        return []
    out = []
    for chunk in re.split(r"[;\s]+", s.strip()):
        for part in chunk.split(",") if "x" in chunk.lower() else [chunk]:
            try:
                dims = dims_of(part)
            except ValueError:
                dims = ()
            if len(dims) != 3 or min(dims) <= 0:
                raise argparse.ArgumentTypeError(
                    f"shape {part!r} is not LxMxN (or L,M,N) with positive integers; separate shapes "
                    "with ',' when written LxMxN, with ';' or a space when written L,M,N"
                )
            out.append(dims)
    return out


def _parse_sweep(s):
    """'LxN:m1,m2,...' or 'L,N:m1,m2,...' (or 'LxM:n1,...' for --sweep-n); 'none' turns the sweep off."""
    if s.strip().lower() == "none":
        return "off"
    try:
        fixed, vals = s.split(":")
        a, b = dims_of(fixed)
        v = tuple(int(x) for x in vals.split(","))
        if min((a, b) + v) <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"sweep {s!r} is not 'AxB:v1,v2,...' (or 'A,B:v1,v2,...') with positive integers"
        ) from None
    return ((a, b), v)


def parser():
    p = argparse.ArgumentParser(
        prog="gpu-orthol1 bench",
        description="Time gpu_orthol1.loss_and_grad against naive NumPy/CuPy, PyTorch (eager, torch.compile) "
        "and JAX on this machine, check every method against a float64 reference first, and "
        "report the ratio to the BLAS/cuBLAS (and GPU memory) limit and the peak memory.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="float32 reference shapes on the CPU, short sweeps, 5 runs (about 1-2 minutes on 2 cores)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "gpu", "all"),
        default="all",
        help="all (default): the CPU, and the GPU when one is usable",
    )
    p.add_argument(
        "--shapes",
        type=_parse_shapes,
        default=None,
        help="reference shapes LxMxN,LxMxN,... or L,M,N;L,M,N (slices along M); 'none' for sweeps only",
    )
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma list of float16,bfloat16,float32,float64 for the reference shapes, measured in "
        "that order after float32 (default: all four, bfloat16 when ml_dtypes is installed; --quick: "
        "float32 on the CPU)",
    )
    p.add_argument(
        "--sweep-m",
        type=_parse_sweep,
        default=None,
        help="time vs m: 'LxN:m1,m2,...' (or 'L,N:...') or 'none'",
    )
    p.add_argument(
        "--sweep-n",
        type=_parse_sweep,
        default=None,
        help="time vs n: 'LxM:n1,n2,...' (or 'L,M:...') or 'none'",
    )
    p.add_argument("--no-crossover", action="store_true", help="skip the GPU CPU/GPU crossover sizes")
    p.add_argument(
        "--methods",
        default=None,
        help="comma list of substrings; only methods whose name contains one of them run (limits always run)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        help="timed runs per method (at least 5; default 5 with --quick, else 10)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="start no new case after S seconds (the rest is skipped with a note; outputs are still written)",
    )
    p.add_argument("--csv", metavar="FILE")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


class UsageError(ValueError):
    """A bad option value found after parsing; main() reports it like argparse does (exit status 2)."""


def check_outputs(a) -> None:
    """Find unwritable output paths and a --plot that cannot be drawn before the bench runs, not after
    minutes of measuring (the CSV/JSON are first written after the first case, the plot at the end)."""
    given = [(opt, path) for opt, path in (("--csv", a.csv), ("--json", a.json), ("--plot", a.plot)) if path]
    seen: dict[str, str] = {}
    for opt, path in given:
        full = os.path.abspath(path)
        if full in seen:
            raise UsageError(f"{seen[full]} and {opt} name the same file {path!r}")
        seen[full] = opt
        why = unwritable(opt, path)
        if why:
            raise UsageError(why)
    if a.plot:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            raise UsageError(
                "--plot needs matplotlib, which is not installed (pip install matplotlib, "
                "or pip install -e '.[bench]' from the repository root); "
                "leave --plot out to run without a plot"
            ) from None
        ext = os.path.splitext(a.plot)[1].lstrip(".").lower()
        kinds = FigureCanvasBase.get_supported_filetypes()
        if ext and ext not in kinds:
            raise UsageError(
                f"--plot {a.plot!r}: matplotlib cannot write .{ext} files; use one of "
                + ", ".join(f".{k}" for k in sorted(kinds))
            )


def _has_ml_dtypes() -> bool:
    return importlib.util.find_spec("ml_dtypes") is not None


def make_config(a) -> BenchConfig:
    """The run the parsed options ask for; UsageError for a value argparse could not check."""

    devices = ["cpu", "gpu"] if a.device == "all" else [a.device]
    notes = []
    if "gpu" in devices:
        ok, why = _backends.gpu_status()
        if not ok:
            devices.remove("gpu")
            notes.append(f"GPU part skipped: {why}")
    ref = list(REF_SHAPES) if a.shapes is None else a.shapes
    if a.dtypes:
        dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            raise UsageError(f"unknown dtype(s) {bad}; use {', '.join(DTYPES)}")
        if "bfloat16" in dtypes and not _has_ml_dtypes():
            raise UsageError(
                "--dtypes bfloat16 needs the ml_dtypes package (pip install ml_dtypes; JAX installs it)"
            )
    elif a.quick and devices == ["cpu"]:
        dtypes = ["float32"]
    else:
        dtypes = ["float32", "float16", "bfloat16", "float64"]
        if not _has_ml_dtypes():
            dtypes.remove("bfloat16")
            notes.append("bfloat16 not measured: the ml_dtypes package is not installed")
    sweeps: dict[str, dict] = {}
    for dev in devices:
        key = ("gpu-quick" if a.quick else "gpu") if dev == "gpu" else ("quick" if a.quick else "full")
        sw = dict(SWEEPS[key])
        for k, given in (("m", a.sweep_m), ("n", a.sweep_n)):
            if given == "off":
                sw.pop(k)
            elif given is not None:
                sw[k] = given
        sweeps[dev] = sw
    runs = a.runs if a.runs is not None else (5 if a.quick else 10)
    if runs < 5:
        raise UsageError("--runs must be at least 5 (medians and p20/p80 need them)")
    methods = methods_module.all_methods()  # looked up when called: tests replace it
    if a.methods:
        want = [w.strip() for w in a.methods.split(",") if w.strip()]
        names = sorted({mt.name for mt in methods if mt.family != "limit"})
        if not any(w in name for w in want for name in names):
            # only the limits would run: a bench with nothing to compare
            raise UsageError(f"--methods {a.methods!r} matches no method; names: {', '.join(names)}")
        methods = [mt for mt in methods if mt.family == "limit" or any(w in mt.name for w in want)]
    crossover = None if a.no_crossover else CROSSOVER["quick" if a.quick else "full"]
    config = BenchConfig(
        devices,
        ref,
        dtypes,
        sweeps,
        crossover,
        runs,
        2,  # 0 extra warm-ups: 2.5x too slow (measured)
        math.inf if a.quick else 20.0,
        methods,
    )
    config.notes = notes
    if a.quick and any(mt.name == "torch-compile" for mt in methods):
        config.sweep_skip = config.f32_only = ("torch-compile",)
        notes.append(
            "--quick runs torch-compile on the float32 reference shapes only (it recompiles for "
            "every shape and dtype)"
        )
    if a.time_limit is not None:
        config.time_limit_s = a.time_limit
    return config


def judge(rows: list[dict], start_load: str) -> list[dict]:
    """Set each row's "flags" (a disturbed timing) and "slow" (a missed CPU promise); see flags.py."""
    return slow_rows(flag_rows(rows, os.cpu_count(), start_load))


def main(argv: list[str] | None = None) -> int:
    """`gpu-orthol1 bench ARGV`: run the bench, print its tables, write the files asked for.

    Args:
        argv: the arguments after `bench` (default: sys.argv[1:]).

    Returns:
        0, or 2 when a gpu_orthol1 row failed (1 when nothing could run); usage errors exit with
        status 2 through argparse.

    Example:
        >>> main(["--quick", "--device", "cpu", "--json", "cpu-quick.json"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    a = p.parse_args(argv)
    try:
        check_outputs(a)
    except UsageError as e:
        p.error(str(e))
    if a.device == "cpu" and not a.no_crossover:
        a.no_crossover = True
    # quick mode on a CPU-only machine: dtypes default differs when the GPU would have been asked for
    if a.quick and a.dtypes is None and a.device == "all":
        if not _backends.gpu_status()[0]:
            a.dtypes = "float32"
    try:
        config = make_config(a)
    except UsageError as e:
        p.error(str(e))
    for s in config.notes:
        print(f"note: {s}", file=sys.stderr)
    if not config.devices:
        print("gpu-orthol1 bench: nothing to run on the requested device", file=sys.stderr)
        return 1
    if config.dtypes == ["float32"] and a.quick and "cpu" in config.devices:
        print(
            "note: --quick times float32 only on the CPU (float16/bfloat16/float64: pass --dtypes)",
            file=sys.stderr,
        )
    t0 = time.time()
    bench = Bench(config, progress=not a.no_progress)

    def save():
        judge(bench.rows, bench.load_start)
        if a.csv:
            write_csv(bench.rows, a.csv)
        if a.json:
            bench.write_json(argv, a.json)

    bench.checkpoint = save
    rows = judge(bench.run(), bench.load_start)
    print(table(rows))
    sw = table(rows, sweeps=("m", "n"))
    if sw.count("\n"):
        print("\nscaling sweeps (float32):")
        print(sw)
    cr = table(rows, sweeps=("crossover",))
    if cr.count("\n"):
        print("\nCPU/GPU crossover for NumPy inputs (backend=numpy vs backend=cupy incl. copies):")
        print(cr)
    print("\nheadline (reference shapes; 'vs X' = how many times faster gpu_orthol1 is than X):")
    print(headline_markdown(rows))
    for s in config.notes:
        print(f"note: {s}")
    flagged = [r for r in rows if r.get("flags")]
    if flagged:
        print(
            f"note: {len(flagged)} of {len(rows)} row(s) flagged as disturbed (flags column; a '?' in the "
            "headline): re-run those on a quiet machine before quoting them"
        )
    slow = [r for r in rows if r.get("slow")]
    if slow:
        print(
            f"note: {len(slow)} point(s) where gpu_orthol1 misses its CPU promise (within {SLOW_RATIO:g}x "
            f"the BLAS limit, not slower than {SLOW_PEER}): "
            + ", ".join(f"{r['shape']} {r['dtype']} ({r['sweep']})" for r in slow)
            + " (slow column, JSON field 'slow')"
        )
    save()
    if a.plot and not plot(
        rows, a.plot, title=f"gpu_orthol1 bench {'--quick ' if a.quick else ''}({bench.host})"
    ):
        print("note: no sweep results to plot", file=sys.stderr)
    print(f"bench finished in {time.time() - t0:.0f} s (load average now {loadavg()})")
    bad = [r for r in rows if r["family"] == "ours" and r["status"] != "ok"]
    return 2 if bad else 0
