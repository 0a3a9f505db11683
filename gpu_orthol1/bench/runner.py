"""`gpu-orthol1 bench`: gpu_orthol1 against what a user would write instead, and against the hardware limit.

    gpu-orthol1 bench [--quick] [--device cpu|gpu|all] [--shapes LxMxN,...] [--dtypes ...]
                      [--csv FILE] [--json FILE] [--plot FILE.png]
    python -m gpu_orthol1.bench ...            (the same, without the console script)

Per (method, shape, dtype): the result is first checked once against a float64
reference (a wrong method is reported as wrong and not timed), then timed after
warm-up (compiles, handles) as the median and p20/p80 of at least 5 runs, inputs
rotated between copies when one fits in the last-level cache. Peak memory is
measured after all timings (see _bench_methods.cpu_peak for why). Peers that are
not installed are skipped with a one-line note. Methods: see _bench_methods.py.
Rows whose timing something else disturbed are flagged (flag_rows) and are not
figures to publish. Output paths and --plot are checked before anything runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from .cli import unwritable

REF_SHAPES = ((4096, 32, 128), (64, 4096, 64), (512, 64, 512))
# Scaling sweeps: (fixed dims, values). time vs m at fixed (l, n); time vs n at fixed (l, m).
SWEEPS: dict[str, dict[str, tuple]] = {
    "full": {"m": ((512, 64), (8, 32, 128, 512, 2048, 8192)), "n": ((1024, 16), (16, 32, 64, 128, 256, 512))},
    "quick": {"m": ((512, 64), (16, 128, 1024)), "n": ((1024, 16), (32, 128, 512))},
    "gpu": {"m": ((512, 64), (16, 64, 256, 1024, 4096, 16384)), "n": ((1024, 64), (16, 32, 64, 128, 256, 512))},
    "gpu-quick": {"m": ((512, 64), (16, 256, 4096)), "n": ((1024, 64), (16, 64, 256))},
}
# CPU<->GPU crossover for backend="auto" with NumPy inputs: (l, n) fixed, m grows.
CROSSOVER = {"quick": ((256, 64), (1, 4, 16, 64, 256, 1024, 4096)),
             "full": ((256, 64), (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384))}
PEERS = ("numpy-naive", "torch-eager", "torch-compile", "jax-jit", "cupy-naive")
RESULT_FIELDS = [
    "method", "family", "device", "device_name", "backend", "precision", "sweep", "shape", "l", "m", "n",
    "dtype", "status", "note", "runs", "p20_ms", "p50_ms", "p80_ms", "limit_blas_ms", "limit_mem_ms",
    "ratio_blas", "ratio_mem", "ratio_limit", "ours_speedup", "peak_mb", "peak_how", "loss_err", "grad_err",
    "gflops", "v_gpu_orthol1", "v_numpy", "v_cupy", "v_torch", "v_jax", "host", "loadavg", "timestamp",
    "flags",
]


# ---------------------------------------------------------------- environment facts

def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for key, dists in (("gpu_orthol1", ("gpu_orthol1",)), ("numpy", ("numpy",)),
                       ("cupy", ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy")),
                       ("torch", ("torch",)), ("jax", ("jax",))):
        out[key] = ""
        for d in dists:
            try:
                out[key] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs)"


def gpu_name() -> str:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def cache_bytes(device: str) -> int:
    if device == "gpu":
        import cupy

        return int(cupy.cuda.Device().attributes.get("L2CacheSize", 50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(f"{base}/{idx}/size") as f:
                    s = f.read().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
                best = max(best, int(s.rstrip("KMG")) * mult)
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return best or (32 << 20)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""


# ---------------------------------------------------------------- measurement

@dataclass
class Plan:
    devices: list[str]
    ref_shapes: list[tuple[int, int, int]]
    dtypes: list[str]
    sweeps: dict[str, dict]  # device -> {"m": ((l, n), ms), "n": ((l, m), ns)}
    crossover: tuple | None
    runs: int
    warmup: int
    method_budget_s: float  # a method slower than this for `runs` runs gets fewer (noted)
    methods: list[Any] = field(default_factory=list)
    sweep_skip: tuple = ()  # methods left out of the sweeps (--quick: torch.compile recompiles per shape)
    f32_only: tuple = ()  # methods run on float32 only (--quick: torch.compile, again for its compile time)
    time_limit_s: float = math.inf  # cases not started by then are skipped (with a note)
    notes: list[str] = field(default_factory=list)


def random_phi(rng, shape, dtype):
    """Entries of X = G - I of order 1: no zeros, no sign ties (as gpu_orthol1.reference.random_phi, drawn
    in float32 below float64 to halve the set-up time of large cases)."""
    l = shape[0]
    gen = np.float64 if np.dtype(dtype) == np.float64 else np.float32  # float32 draws: half the time
    x = rng.standard_normal(shape, dtype=gen)
    x *= gen(1.3 / math.sqrt(max(l, 1)))
    return x.astype(dtype, copy=False)


def make_case(rng, shape, dtype, sweep, cache, max_copies=8):
    from ._bench_methods import Case

    one = random_phi(rng, shape, dtype)
    # Rotate copies so that each run reads its input from memory, not from the previous run's cache.
    copies = 1 if one.nbytes >= 2 * cache else min(max_copies, math.ceil(2 * cache / max(one.nbytes, 1)))
    host = [one] + [random_phi(rng, shape, dtype) for _ in range(copies - 1)]
    return Case(shape[0], shape[1], shape[2], np.dtype(dtype), sweep, host)


def time_runs(prep, runs, copies, budget_s, warmup, t_first=None):
    """(runs taken, p20, p50, p80) in ms. The median is over `runs` calls, fewer only when `runs`
    calls would take over budget_s (full mode's float16 NumPy peers: no warm-up beyond the first,
    checked call `t_first` then); many more for sub-ms calls."""
    t_warm = None
    if t_first is not None and t_first * runs > budget_s:
        warmup, t_warm = 0, t_first
    for i in range(warmup):
        prep.sync()
        t0 = time.perf_counter()
        r = prep.call(i % copies)
        prep.sync()
        t_warm = time.perf_counter() - t0
        del r
    n = runs
    if t_warm is not None and t_warm * runs > budget_s:
        n = max(1, int(budget_s / max(t_warm, 1e-9)))
    ts: list[float] = []
    # very short calls: more samples (up to 10x) until they add up to 50 ms, for a stable median
    while len(ts) < n or (sum(ts) < 0.05 and len(ts) < 10 * runs):
        i = len(ts)
        prep.sync()
        t0 = time.perf_counter()
        r = prep.call(i % copies)
        prep.sync()
        ts.append(time.perf_counter() - t0)
        del r
    ts_ms = np.array(ts) * 1e3
    return len(ts), np.percentile(ts_ms, 20), np.percentile(ts_ms, 50), np.percentile(ts_ms, 80)


def _first_line(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}".strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


class Bench:
    def __init__(self, plan: Plan, progress: bool = True):
        self.plan = plan
        self.rows: list[dict] = []
        self.vers = versions()
        self.host = platform.node()
        self.pending_mem: list[tuple[dict, Any]] = []
        self.d2d_bw: float | None = None
        self.progress = progress
        self.device_names: dict[str, str] = {}
        self.crossover_rows: list[dict] = []
        self.t_start = time.time()
        self.load_start = loadavg()
        self.checkpoint: Any = None  # called after every case: main() rewrites the CSV/JSON, so a killed run keeps them

    def _bar(self, total, desc):
        if not self.progress:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)

    def cases_for(self, device):
        # float32 reference shapes, then the sweeps, then the other dtypes: what --time-limit cuts last
        # is what the headline and the plots need least
        p = self.plan
        first = [d for d in p.dtypes if d == "float32"] or p.dtypes[:1]
        out = [(s, dt, "ref") for dt in first for s in p.ref_shapes]
        later = [(s, dt, "ref") for s in p.ref_shapes for dt in p.dtypes if dt not in first]
        sw = p.sweeps.get(device) or {}
        if "m" in sw:
            (l, n), ms = sw["m"]
            out += [((l, m, n), "float32", "m") for m in ms]
        if "n" in sw:
            (l, m), ns = sw["n"]
            out += [((l, m, n), "float32", "n") for n in ns]
        return out + later

    def run(self) -> list[dict]:
        from .reference import Reference

        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rng = np.random.default_rng()
        for device in self.plan.devices:
            methods = [mt for mt in self.plan.methods if mt.device == device]
            usable = []
            for mt in methods:
                ok, why = mt.available()
                if ok:
                    usable.append(mt)
                else:
                    self.note(f"skipped {mt.name} on {device}: {why}")
            if not usable:
                continue
            self.device_names[device] = cpu_name() if device == "cpu" else gpu_name()
            if device == "gpu":
                from ._bench_methods import d2d_bandwidth

                self.d2d_bw = d2d_bandwidth(64 << 20 if self.plan.runs <= 5 else 256 << 20)
                self.note(f"GPU device-to-device copy bandwidth: {self.d2d_bw / 1e9:.0f} GB/s (read + write)")
                if self.plan.crossover:  # first: cheap, and what sets backend="auto"'s threshold
                    self._crossover(rng, stamp)
            if device == "cpu":
                from ._bench_methods import malloc_steady

                malloc_steady()  # the allocator regime of every CPU timing (see there)
            cache = cache_bytes(device)
            cases = self.cases_for(device)
            bar = self._bar(len(cases) * len(usable), f"bench {device}")
            for ci, (shape, dt, sweep) in enumerate(cases):
                if time.time() - self.t_start > self.plan.time_limit_s:
                    self.note(f"--time-limit {self.plan.time_limit_s:g} s reached: {len(cases) - ci} {device} "
                              "case(s) not run")
                    break
                case = make_case(rng, shape, dt, sweep, cache)
                ref = None
                case_rows = []
                for mt in usable:
                    if bar is not None:
                        bar.set_postfix_str(f"{mt.name} {case.label} {dt}", refresh=False)
                    if dt not in mt.dtypes or (sweep != "ref" and mt.name in self.plan.sweep_skip) \
                            or (dt != "float32" and mt.name in self.plan.f32_only):
                        if bar is not None:
                            bar.update(1)
                        continue
                    row = self._row(mt, case, device, stamp)
                    try:
                        prep = mt.prepare(case)
                        t_first = None
                        if mt.family != "limit":
                            prep.sync()
                            t_first = time.perf_counter()
                            with np.errstate(all="ignore"):  # an overflow shows as a wrong result below
                                r = prep.call(0)  # also the first warm-up: compiles, handles
                            prep.sync()
                            t_first = time.perf_counter() - t_first
                            loss, grad = prep.result(r)
                            del r
                            if ref is None:
                                ref = Reference.build(case.host[0], _beta())
                            chk = ref.check(loss, grad, mt.tol_class(dt))
                            row["loss_err"], row["grad_err"] = chk.loss_err, chk.grad_err
                            if not chk.ok:
                                row["status"], row["note"] = "wrong", chk.why
                                case_rows.append(row)
                                continue
                        # the correctness call above was the first warm-up; limits get one here
                        warm = max(self.plan.warmup, 1 if mt.family == "limit" else 0)
                        n, p20, p50, p80 = time_runs(prep, self.plan.runs, len(case.host),
                                                     self.plan.method_budget_s, warm, t_first)
                        row.update(runs=n, p20_ms=p20, p50_ms=p50, p80_ms=p80, status="ok")
                        if n < 5:
                            row["note"] = f"only {n} run(s): one call takes {p50 / 1e3:.1f} s"
                        self.pending_mem.append((row, prep))
                    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, the bench goes on
                        row["status"], row["note"] = "error", _first_line(e)
                    finally:
                        if bar is not None:
                            bar.update(1)
                    case_rows.append(row)
                self._ratios(case_rows, case, device)
                self._measure_memory()  # after this case's timings; frees its inputs and state
                self.rows += case_rows
                if self.checkpoint is not None:
                    self.checkpoint()
                if bar is None:  # no progress bar: one line per case, so logs show where time goes
                    print(f"[{ci + 1}/{len(cases)}] {device} {case.label} {dt} ({sweep}): "
                          f"{time.time() - self.t_start:.0f} s", file=sys.stderr, flush=True)
                del case, ref
            if bar is not None:
                bar.close()
        return self.rows

    def note(self, s):
        self.plan.notes.append(s)
        print(f"note: {s}", file=sys.stderr)

    def _row(self, mt, case, device, stamp):
        row = {k: "" for k in RESULT_FIELDS}
        row.update(method=mt.name, family=mt.family, device=device, device_name=self.device_names.get(device, ""),
                   backend=mt.backend, precision=mt.precision, sweep=case.sweep, shape=case.label,
                   l=case.l, m=case.m, n=case.n, dtype=case.dtype.name, status="", runs=0,
                   gflops=4.0 * case.l * case.m * case.n ** 2 / 1e9, host=self.host, loadavg=loadavg(),
                   timestamp=stamp)
        row.update({f"v_{k}": v for k, v in self.vers.items()})
        return row

    def _ratios(self, rows, case, device):
        ok = [r for r in rows if r["status"] == "ok"]
        lim = {r["precision"]: r["p50_ms"] for r in ok if r["family"] == "limit"}
        mem_ms = ""
        if device == "gpu" and self.d2d_bw:
            mem_ms = 2.0 * case.nbytes / self.d2d_bw * 1e3  # read phi + write the gradient
        ours = [r["p50_ms"] for r in ok if r["family"] == "ours" and r["precision"] == "highest"]
        for r in ok:
            lb = lim.get(r["precision"], lim.get("highest"))
            if lb:
                r["limit_blas_ms"] = lb
                r["ratio_blas"] = r["p50_ms"] / lb
            if mem_ms:
                r["limit_mem_ms"] = mem_ms
                r["ratio_mem"] = r["p50_ms"] / mem_ms
            bound = max([x for x in (lb, mem_ms) if x] or [0.0])
            if bound:
                r["ratio_limit"] = r["p50_ms"] / bound
            if ours:
                r["ours_speedup"] = r["p50_ms"] / ours[0]

    def _measure_memory(self):
        if not self.pending_mem:
            return
        for row, prep in self.pending_mem:
            try:
                b, how = prep.peak()
                row["peak_mb"], row["peak_how"] = b / 2 ** 20, how
            except Exception as e:  # noqa: BLE001 - reported in the row
                row["peak_how"] = f"failed: {_first_line(e)}"
        gpu = any(r["device"] == "gpu" for r, _ in self.pending_mem)
        self.pending_mem = []
        if gpu:
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()

    def _crossover(self, rng, stamp):
        """backend="numpy" vs backend="cupy" (with host<->device copies) on NumPy inputs of growing size."""
        import gpu_orthol1 as ol1

        from ._bench_methods import Prepared, gpu_sync

        (l, n), ms = self.plan.crossover
        bar = self._bar(len(ms), "crossover")
        for m in ms:
            phi = [random_phi(rng, (l, m, n), np.float32) for _ in range(4)]
            for backend in ("numpy", "cupy"):
                prep = Prepared(lambda k, b=backend, x=phi: ol1.loss_and_grad(x[k], _beta(), backend=b),
                                lambda r: r, gpu_sync, lambda: (0.0, ""))
                row = {k: "" for k in RESULT_FIELDS}
                row.update(method=f"auto-crossover[{backend}]", family="crossover", device="gpu",
                           device_name=self.device_names.get("gpu", ""), backend=backend, precision="highest",
                           sweep="crossover", shape=f"{l}x{m}x{n}", l=l, m=m, n=n, dtype="float32",
                           gflops=4.0 * l * m * n * n / 1e9, host=self.host, loadavg=loadavg(), timestamp=stamp,
                           note="NumPy input and output: host<->device copies included")
                row.update({f"v_{k}": v for k, v in self.vers.items()})
                try:
                    k, p20, p50, p80 = time_runs(prep, self.plan.runs, 4, self.plan.method_budget_s, 2)
                    row.update(runs=k, p20_ms=p20, p50_ms=p50, p80_ms=p80, status="ok")
                except Exception as e:  # noqa: BLE001 - reported in the row
                    row.update(status="error", note=_first_line(e))
                self.rows.append(row)
                self.crossover_rows.append(row)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        flops = crossover_flops(self.crossover_rows)
        if flops is not None:
            self.note(f"measured CPU/GPU crossover for NumPy inputs: GPU faster from {flops:.3g} GEMM flops "
                      f"(4*l*m*n^2) on; set gpu_orthol1._backends.GPU_CROSSOVER_FLOPS from it")
        else:
            self.note("crossover: the GPU never won at the measured sizes (or a side failed)")


def _beta():
    from ._bench_methods import BETA

    return BETA


def crossover_flops(rows) -> float | None:
    """Smallest size (in GEMM flops) from which backend="cupy" beats "numpy" at that and every larger size."""
    by: dict[float, dict[str, float]] = {}
    for r in rows:
        if r["status"] == "ok":
            by.setdefault(r["gflops"], {})[r["backend"]] = r["p50_ms"]
    sizes = sorted(g for g, d in by.items() if "numpy" in d and "cupy" in d)
    found = None
    for g in reversed(sizes):
        if by[g]["cupy"] < by[g]["numpy"]:
            found = g
        else:
            break
    return None if found is None else found * 1e9


# ---------------------------------------------------------------- disturbed measurements
#
# A timing that another job on the machine disturbed is not a figure to publish. Three checks, all
# on what the CSV/JSON already hold, so a committed run can be judged after the fact:
#
# - FLOOR_RATIO: every method computes the Gram and the gradient GEMM, and the limit is those two
#   GEMMs alone. Forming the symmetric Gram through syrk saves at most half of the first GEMM, a
#   quarter of the pair, so a method measured below 0.75x the limit means the limit (or the
#   method) was slowed by something else.
# - SPREAD_MAX: p80/p20 of one method's runs above 1.25 means its runs differ by more than the
#   effects this bench reports (a few percent to the limit); the median is then luck.
# - load: a 1-minute load average above the CPU count, when the run started or when the row was
#   measured, means other work held every core.
FLOOR_RATIO = 0.75
SPREAD_MAX = 1.25


def _load1(s) -> float | None:
    try:
        return float(str(s).split()[0])
    except (ValueError, IndexError):
        return None


def cpu_count_of(doc: dict) -> int | None:
    """The CPU count of the machine a results JSON came from: recorded since the flags were added,
    else read from the CPU's device name ("... (2 CPUs)"), else None (unknown)."""
    if doc.get("cpu_count"):
        return int(doc["cpu_count"])
    name = (doc.get("devices") or {}).get("cpu", "")
    if name.endswith(" CPUs)") and "(" in name:
        try:
            return int(name.rsplit("(", 1)[1].split()[0])
        except ValueError:
            return None
    return None


def run_flags(rows, cpu_count: int | None, start_load=None) -> list[str]:
    """Why a whole run is disturbed: its load at the start (start_load, else the first row's) was
    above the CPU count. With the count unknown, only a load of at most 1 passes (every machine has a
    core)."""
    if start_load is None and rows:
        start_load = rows[0].get("loadavg", "")
    load = _load1(start_load)
    if load is None:
        return []
    if cpu_count is None:
        return [] if load <= 1 else [f"run started at load {load:.2f} on an unrecorded CPU count"]
    return [f"run started at load {load:.2f} > {cpu_count} CPUs"] if load > cpu_count else []


def _own_flags(r, cpu_count: int | None) -> list[str]:
    if r.get("status") != "ok":
        return []
    out = []
    p20, p80 = r.get("p20_ms", ""), r.get("p80_ms", "")
    if p20 not in ("", None) and p80 not in ("", None) and float(p20) > 0 and float(p80) / float(p20) > SPREAD_MAX:
        out.append(f"spread p80/p20 {float(p80) / float(p20):.2f} > {SPREAD_MAX}")
    rb = r.get("ratio_blas", "")
    if r.get("family") in ("ours", "peer") and rb not in ("", None) and float(rb) < FLOOR_RATIO:
        out.append(f"{float(rb):.2f}x the BLAS limit < {FLOOR_RATIO}")
    load = _load1(r.get("loadavg", ""))
    if cpu_count is not None and load is not None and load > cpu_count:
        out.append(f"load {load:.2f} > {cpu_count} CPUs")
    return out


def flag_rows(rows, cpu_count: int | None, start_load=None) -> list[dict]:
    """Set every row's "flags" (reasons joined by "; ", empty when clean) and return the rows.

    A row carries its own reasons, the run's, and its limit's reasons prefixed "limit " (its ratio to
    the limit is only as good as the limit's timing)."""
    whole = run_flags(rows, cpu_count, start_load)
    own = {id(r): _own_flags(r, cpu_count) + whole for r in rows}
    limits: dict[tuple, dict] = {}
    for r in rows:
        if r.get("family") == "limit" and r.get("status") == "ok":
            limits[(r["device"], r["shape"], r["dtype"], r["sweep"], r["precision"])] = r
    for r in rows:
        fl = list(own[id(r)])
        if r.get("family") in ("ours", "peer"):
            key = (r["device"], r["shape"], r["dtype"], r["sweep"])
            lim = limits.get(key + (r["precision"],), limits.get(key + ("highest",)))
            if lim is not None:
                fl += [f"limit {f}" for f in own[id(lim)] if f not in whole]
        r["flags"] = "; ".join(fl)
    return rows


def _reasons(flags: str) -> list[str]:
    return [f for f in flags.split("; ") if f]


def _own(flags: str) -> str:
    """The reasons of a row's flags that concern its own timing (not its limit's)."""
    return "; ".join(f for f in flags.split("; ") if f and not f.startswith("limit "))


# ---------------------------------------------------------------- output

def _fmt(x, spec):
    if x == "" or x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def table(rows, sweeps=("ref",)) -> str:
    """Plain-text table: per (device, shape, dtype), every method's median, ratio to the limit, how many
    times faster gpu_orthol1 is (its time divided by this method's), peak memory, and why a row is
    flagged as disturbed (see flag_rows)."""
    head = ["method", "device", "shape", "dtype", "median ms", "p20-p80 ms", "x limit", "ours faster by",
            "peak MB", "status", "flags"]
    lines = []
    for r in rows:
        if r["sweep"] not in sweeps:
            continue
        spd = r["ours_speedup"]
        lines.append([
            r["method"], r["device"], r["shape"], r["dtype"], _fmt(r["p50_ms"], ".3f"),
            f"{_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}" if r["p50_ms"] != "" else "-",
            _fmt(r["ratio_limit"], ".2f"), ("-" if r["family"] != "peer" or spd == "" else f"{spd:.2f}x"),
            _fmt(r["peak_mb"], ".1f"), r["status"] + (f" ({r['note']})" if r["note"] else ""),
            r.get("flags", ""),
        ])
    w = [max(len(str(x)) for x in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    out = ["  ".join(h.ljust(k) for h, k in zip(head, w)).rstrip()]
    out += ["  ".join(str(c).ljust(k) for c, k in zip(ln, w)).rstrip() for ln in lines]
    return "\n".join(out)


def headline(rows) -> list[dict]:
    """One line per (device, shape, dtype) of the reference cases: gpu_orthol1's median, its ratio to the
    limit, and how many times faster it is than each peer. h["flags"] maps each flagged value ("ms",
    "x_limit", "tf32_ms", a peer's name) to the reasons it is not a figure to publish (rows need "flags": run
    flag_rows first; rows without them count as clean)."""
    out = []
    groups: dict = {}
    for r in rows:
        if r["sweep"] == "ref":
            groups.setdefault((r["device"], r["device_name"], r["shape"], r["dtype"]), []).append(r)
    for (device, dname, shape, dtype), rs in groups.items():
        ours = [r for r in rs if r["family"] == "ours" and r["precision"] == "highest" and r["status"] == "ok"]
        if not ours:
            continue
        o = ours[0]
        own = _reasons(_own(o.get("flags", "")))
        flags: dict[str, list[str]] = {}
        if own:
            flags["ms"] = own
        if o.get("flags"):
            flags["x_limit"] = _reasons(o["flags"])
        h = {"device": device, "device_name": dname, "shape": shape, "dtype": dtype, "method": o["method"],
             "ms": o["p50_ms"], "x_limit": o["ratio_limit"], "peak_mb": o["peak_mb"], "flags": flags}
        tf = [r for r in rs if r["family"] == "ours" and r["precision"] == "tf32" and r["status"] == "ok"]
        h["tf32_ms"] = tf[0]["p50_ms"] if tf else ""
        if tf and _own(tf[0].get("flags", "")):
            flags["tf32_ms"] = _reasons(_own(tf[0]["flags"]))
        for p in PEERS:
            pr = [r for r in rs if r["method"] == p]
            if not pr:
                h[p] = ""
            elif pr[0]["status"] == "ok":
                h[p] = pr[0]["p50_ms"] / o["p50_ms"]
                why = list(dict.fromkeys(own + _reasons(_own(pr[0].get("flags", "")))))
                if why:
                    flags[p] = why
            else:
                h[p] = pr[0]["status"]
        out.append(h)
    return out


def headline_markdown(rows) -> str:
    """The headline as a Markdown table. A value followed by "?" comes from a flagged (disturbed)
    measurement and is not a figure to publish; the last column says why."""
    hl = headline(rows)
    if not hl:
        return "(no reference-shape results for gpu_orthol1 in this run)\n"
    peers = [p for p in PEERS if any(h[p] != "" for h in hl)]
    head = ["device", "shape l x m x n", "dtype", "gpu_orthol1 ms", "x limit", "peak MB"]
    if any(h["tf32_ms"] != "" for h in hl):
        head.append("tf32 ms")
    head += [f"vs {p}" for p in peers] + ["flagged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for h in hl:
        fl = h["flags"]

        def mark(key, text):
            return text + "?" if key in fl and text != "-" else text

        cells = [h["device_name"] or h["device"], h["shape"], h["dtype"], mark("ms", _fmt(h["ms"], ".2f")),
                 mark("x_limit", _fmt(h["x_limit"], ".2f")), _fmt(h["peak_mb"], ".0f")]
        if "tf32 ms" in head:
            cells.append(mark("tf32_ms", _fmt(h["tf32_ms"], ".2f")))
        for p in peers:
            v = h[p]
            cells.append(mark(p, f"{v:.1f}x") if isinstance(v, float) else (v or "-"))
        why: dict[str, list[str]] = {}  # one entry per distinct reason, naming the values it concerns
        for key, reasons in fl.items():
            for reason in reasons:
                why.setdefault(reason, []).append(key.replace("_", " ") if key in ("x_limit", "tf32_ms") else
                                                  ("ms" if key == "ms" else f"vs {key}"))
        cells.append("; ".join(f"{', '.join(keys)}: {reason}" for reason, keys in why.items()))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows, path):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_json(bench: Bench, argv, path):
    doc = {
        "command": "gpu-orthol1 bench " + " ".join(argv),
        "devices": bench.device_names,
        "versions": bench.vers,
        "host": bench.host,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "loadavg_start": bench.load_start,
        "loadavg_end": loadavg(),
        "d2d_bandwidth_gbs": None if bench.d2d_bw is None else bench.d2d_bw / 1e9,
        "crossover_flops": crossover_flops(bench.crossover_rows) if bench.crossover_rows else None,
        "notes": bench.plan.notes,
        "rows": bench.rows,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=float)


def plot(rows, path, title=""):
    """Time vs m and time vs n (log-log), one line per method, the limit drawn dashed; one row per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = [d for d in ("cpu", "gpu") if any(r["device"] == d and r["sweep"] in ("m", "n") for r in rows)]
    if not devices:
        return False
    fig, axes = plt.subplots(len(devices), 2, figsize=(12, 4.5 * len(devices)), squeeze=False)
    for i, dev in enumerate(devices):
        for j, sweep in enumerate(("m", "n")):
            ax = axes[i][j]
            rs = [r for r in rows if r["device"] == dev and r["sweep"] == sweep and r["status"] == "ok"]
            names = list(dict.fromkeys(r["method"] for r in rs))
            for name in names:
                pts = sorted((r[sweep], r["p50_ms"], r["p20_ms"], r["p80_ms"]) for r in rs if r["method"] == name)
                x = [p[0] for p in pts]
                y = [p[1] for p in pts]
                fam = next(r["family"] for r in rs if r["method"] == name)
                style: dict = {"ls": "--", "color": "k", "lw": 1.2} if fam == "limit" else {"marker": "o", "ms": 3}
                if fam == "ours":
                    style["lw"] = 2.5
                ax.plot(x, y, label=name, **style)
                if fam != "limit":
                    ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], alpha=0.15)
            mem = sorted((r[sweep], r["limit_mem_ms"]) for r in rs
                         if r["family"] == "ours" and r["limit_mem_ms"] != "" and r["precision"] == "highest")
            if mem:
                ax.plot([p[0] for p in mem], [p[1] for p in mem], ls=":", color="k", label="limit-memory")
            fixed = [r for r in rs][:1]
            if fixed:
                f = fixed[0]
                fx = f"l={f['l']}, n={f['n']}" if sweep == "m" else f"l={f['l']}, m={f['m']}"
            else:
                fx = ""
            dname = next((r["device_name"] for r in rs if r["device_name"]), dev)
            ax.set_title(f"{dname}: time vs {sweep} ({fx}, float32)", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(sweep)
            ax.set_ylabel("median ms (p20-p80 shaded)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- command line

def _parse_shapes(s):
    if s.strip().lower() in ("", "none"):
        return []
    out = []
    for part in s.split(","):
        dims = part.lower().split("x")
        if len(dims) != 3 or not all(d.strip().isdigit() and int(d) > 0 for d in dims):
            raise argparse.ArgumentTypeError(f"shape {part!r} is not LxMxN with positive integers")
        out.append(tuple(int(d) for d in dims))
    return out


def _parse_sweep(s):
    """'LxN:m1,m2,...' (or 'LxM:n1,...' for --sweep-n); 'none' turns the sweep off."""
    if s.strip().lower() == "none":
        return "off"
    try:
        fixed, vals = s.split(":")
        a, b = (int(x) for x in fixed.lower().split("x"))
        v = tuple(int(x) for x in vals.split(","))
        if min((a, b) + v) <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"sweep {s!r} is not 'AxB:v1,v2,...' with positive integers") from None
    return ((a, b), v)


def parser():
    p = argparse.ArgumentParser(
        prog="gpu-orthol1 bench",
        description="Time gpu_orthol1.loss_and_grad against naive NumPy/CuPy, PyTorch (eager, torch.compile) "
                    "and JAX on this machine, check every method against a float64 reference first, and "
                    "report the ratio to the BLAS/cuBLAS (and GPU memory) limit and the peak memory.")
    p.add_argument("--quick", action="store_true", help="float32 reference shapes on the CPU, short sweeps, "
                   "5 runs (about 1-2 minutes on 2 cores)")
    p.add_argument("--device", choices=("cpu", "gpu", "all"), default="all",
                   help="all (default): the CPU, and the GPU when one is usable")
    p.add_argument("--shapes", type=_parse_shapes, default=None,
                   help="reference shapes LxMxN,... (slices along M); 'none' for sweeps only")
    p.add_argument("--dtypes", default=None, help="comma list of float16,float32,float64 for the reference "
                   "shapes (default: all three; --quick: float32 on the CPU)")
    p.add_argument("--sweep-m", type=_parse_sweep, default=None, help="time vs m: 'LxN:m1,m2,...' or 'none'")
    p.add_argument("--sweep-n", type=_parse_sweep, default=None, help="time vs n: 'LxM:n1,n2,...' or 'none'")
    p.add_argument("--no-crossover", action="store_true", help="skip the GPU CPU/GPU crossover sizes")
    p.add_argument("--methods", default=None,
                   help="comma list of substrings; only methods whose name contains one of them run "
                        "(limits always run)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per method (at least 5; default 5 "
                   "with --quick, else 10)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="start no new case after S seconds (the rest is skipped with a note; outputs "
                        "are still written)")
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
            raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib, "
                             "or pip install -e '.[bench]' from the repository root); "
                             "leave --plot out to run without a plot") from None
        ext = os.path.splitext(a.plot)[1].lstrip(".").lower()
        kinds = FigureCanvasBase.get_supported_filetypes()
        if ext and ext not in kinds:
            raise UsageError(f"--plot {a.plot!r}: matplotlib cannot write .{ext} files; use one of "
                             + ", ".join(f".{k}" for k in sorted(kinds)))


def make_plan(a) -> Plan:
    from . import _backends
    from ._bench_methods import all_methods

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
        bad = [d for d in dtypes if d not in ("float16", "float32", "float64")]
        if bad:
            raise UsageError(f"unknown dtype(s) {bad}; use float16, float32, float64")
    else:
        dtypes = ["float32"] if a.quick and devices == ["cpu"] else ["float32", "float16", "float64"]
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
    methods = all_methods()
    if a.methods:
        want = [w.strip() for w in a.methods.split(",") if w.strip()]
        names = sorted({mt.name for mt in methods if mt.family != "limit"})
        if not any(w in name for w in want for name in names):
            # only the limits would run: a bench with nothing to compare
            raise UsageError(f"--methods {a.methods!r} matches no method; names: {', '.join(names)}")
        methods = [mt for mt in methods if mt.family == "limit" or any(w in mt.name for w in want)]
    crossover = None if a.no_crossover else CROSSOVER["quick" if a.quick else "full"]
    plan = Plan(devices, ref, dtypes, sweeps, crossover, runs, 2,  # 0 extra warm-ups: 2.5x too slow (measured)
                math.inf if a.quick else 20.0, methods)
    plan.notes = notes
    if a.quick and any(mt.name == "torch-compile" for mt in methods):
        plan.sweep_skip = plan.f32_only = ("torch-compile",)
        notes.append("--quick runs torch-compile on the float32 reference shapes only (it recompiles for "
                     "every shape and dtype)")
    if a.time_limit is not None:
        plan.time_limit_s = a.time_limit
    return plan


def main(argv: list[str] | None = None) -> int:
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
        from . import _backends

        if not _backends.gpu_status()[0]:
            a.dtypes = "float32"
    try:
        plan = make_plan(a)
    except UsageError as e:
        p.error(str(e))
    for s in plan.notes:
        print(f"note: {s}", file=sys.stderr)
    if not plan.devices:
        print("gpu-orthol1 bench: nothing to run on the requested device", file=sys.stderr)
        return 1
    if plan.dtypes == ["float32"] and a.quick and "cpu" in plan.devices:
        print("note: --quick times float32 only on the CPU (float16/float64: pass --dtypes)", file=sys.stderr)
    t0 = time.time()
    bench = Bench(plan, progress=not a.no_progress)

    def save():
        flag_rows(bench.rows, os.cpu_count(), bench.load_start)
        if a.csv:
            write_csv(bench.rows, a.csv)
        if a.json:
            write_json(bench, argv, a.json)

    bench.checkpoint = save
    rows = flag_rows(bench.run(), os.cpu_count(), bench.load_start)
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
    for s in plan.notes:
        print(f"note: {s}")
    flagged = [r for r in rows if r.get("flags")]
    if flagged:
        print(f"note: {len(flagged)} of {len(rows)} row(s) flagged as disturbed (flags column; a '?' in the "
              "headline): re-run those on a quiet machine before quoting them")
    save()
    if a.plot and not plot(rows, a.plot, title=f"gpu_orthol1 bench {'--quick ' if a.quick else ''}({bench.host})"):
        print("note: no sweep results to plot", file=sys.stderr)
    print(f"bench finished in {time.time() - t0:.0f} s (load average now {loadavg()})")
    bad = [r for r in rows if r["family"] == "ours" and r["status"] != "ok"]
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
