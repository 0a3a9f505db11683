"""The measuring loop of `gpu-orthol1 bench`.

Per (method, shape, dtype): the result is first checked once against a float64
reference (a wrong method is reported as wrong and not timed), then timed after
warm-up (compiles, handles) as the median and p20/p80 of at least 5 runs, inputs
rotated between copies when one fits in the last-level cache. Peak memory is
measured after all timings (see base.cpu_peak for why). Peers that are not
installed are skipped with a one-line note.
"""

from __future__ import annotations

import gc
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

from ..reference import Reference
from .base import BETA, RESULT_FIELDS, Case, Prepared, bench_dtype, d2d_bandwidth, gpu_sync, malloc_steady
from .env import cache_bytes, cpu_detail, cpu_name, gpu_name, loadavg, versions
from .report import crossover_flops


@dataclass
class BenchConfig:
    """What one `gpu-orthol1 bench` run measures and how (built by command.make_config)."""

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


def call_chunk(plan: Any) -> int:
    """The slices per chunk a CPU plan's calls without a Gram hook took: the sizes the plan cached for
    them (staging included), read after at least one such call.

    Args:
        plan: a `gpu_orthol1.plan(...)` on the NumPy backend, called at least once.

    Returns:
        The chunk, in slices.

    Raises:
        ValueError: the plan has cached no sizes for such calls yet, or different chunks for
            them (calls with and without a gradient, say, that chunk differently).

    Example:
        >>> import gpu_orthol1 as ol1
        >>> phi = np.ones((16, 4, 8), np.float32)
        >>> p = ol1.plan(phi, backend="numpy", kernel="gemm")
        >>> _ = p(phi)
        >>> call_chunk(p)
        4
    """
    taken = {sz.chunk for key, (sz, _t) in plan._chunks.sizes.items() if not key[-1]}  # key[-1]: hooked
    if len(taken) != 1:
        raise ValueError(f"expected one chunk size cached for the plan's calls, found {sorted(taken)}")
    return taken.pop()


def make_case(rng, shape, dtype, sweep, cache, max_copies=8):
    dtype = bench_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
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
    """One run: every (device, case, method) of its config checked, timed and measured, as result rows."""

    def __init__(self, config: BenchConfig, progress: bool = True):
        self.config = config
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
        self.checkpoint: Any = (
            None  # called after every case: main() rewrites the CSV/JSON, so a killed run keeps them
        )

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
        p = self.config
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
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rng = np.random.default_rng()
        for device in self.config.devices:
            methods = [mt for mt in self.config.methods if mt.device == device]
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
                self.d2d_bw = d2d_bandwidth(64 << 20 if self.config.runs <= 5 else 256 << 20)
                self.note(f"GPU device-to-device copy bandwidth: {self.d2d_bw / 1e9:.0f} GB/s (read + write)")
                if self.config.crossover:  # first: cheap, and what sets backend="auto"'s threshold
                    run_crossover(self, rng, stamp)
            if device == "cpu":
                malloc_steady()  # the allocator regime of every CPU timing (see there)
            cache = cache_bytes(device)
            cases = self.cases_for(device)
            for mt in usable:  # a dtype the run measures that a method cannot take: one line why
                for dt in dict.fromkeys(dt for _s, dt, _w in cases):
                    if dt not in mt.dtypes and dt in mt.no_dtype:
                        self.note(f"skipped {mt.name} on {device} for {dt}: {mt.no_dtype[dt]}")
            bar = self._bar(len(cases) * len(usable), f"bench {device}")
            for ci, (shape, dt, sweep) in enumerate(cases):
                if time.time() - self.t_start > self.config.time_limit_s:
                    self.note(
                        f"--time-limit {self.config.time_limit_s:g} s reached: {len(cases) - ci} {device} "
                        "case(s) not run"
                    )
                    break
                case = make_case(rng, shape, dt, sweep, cache)
                ref = None
                case_rows = []
                for mt in usable:
                    if bar is not None:
                        bar.set_postfix_str(f"{mt.name} {case.label} {dt}", refresh=False)
                    if (
                        dt not in mt.dtypes
                        or (sweep != "ref" and mt.name in self.config.sweep_skip)
                        or (dt != "float32" and mt.name in self.config.f32_only)
                    ):
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
                                ref = Reference.build(case.host[0], BETA)
                            chk = ref.check(loss, grad, mt.tol_class(dt))
                            row["loss_err"], row["grad_err"] = chk.loss_err, chk.grad_err
                            if not chk.ok:
                                row["status"], row["note"] = "wrong", chk.why
                                case_rows.append(row)
                                continue
                        # the correctness call above was the first warm-up; limits get one here
                        warm = max(self.config.warmup, 1 if mt.family == "limit" else 0)
                        n, p20, p50, p80 = time_runs(
                            prep, self.config.runs, len(case.host), self.config.method_budget_s, warm, t_first
                        )
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
                set_ratios(case_rows, case, device, self.d2d_bw)
                self._measure_memory()  # after this case's timings; frees its inputs and state
                self.rows += case_rows
                if self.checkpoint is not None:
                    self.checkpoint()
                if bar is None:  # no progress bar: one line per case, so logs show where time goes
                    print(
                        f"[{ci + 1}/{len(cases)}] {device} {case.label} {dt} ({sweep}): "
                        f"{time.time() - self.t_start:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                del case, ref
            if bar is not None:
                bar.close()
        return self.rows

    def note(self, s):
        self.config.notes.append(s)
        print(f"note: {s}", file=sys.stderr)

    def write_json(self, argv: list[str], path: str) -> None:
        """The run's environment, notes and rows as one JSON document (what bench/summarize.py reads)."""
        doc = {
            "command": "gpu-orthol1 bench " + " ".join(argv),
            "devices": self.device_names,
            "cpu_detail": cpu_detail(),
            "versions": self.vers,
            "host": self.host,
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
            "loadavg_start": self.load_start,
            "loadavg_end": loadavg(),
            "d2d_bandwidth_gbs": None if self.d2d_bw is None else self.d2d_bw / 1e9,
            "crossover_flops": crossover_flops(self.crossover_rows) if self.crossover_rows else None,
            "notes": self.config.notes,
            "rows": self.rows,
        }
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, default=float)

    def _row(self, mt, case, device, stamp):
        row = {k: "" for k in RESULT_FIELDS}
        row.update(
            method=mt.name,
            family=mt.family,
            device=device,
            device_name=self.device_names.get(device, ""),
            backend=mt.backend,
            precision=mt.precision,
            sweep=case.sweep,
            shape=case.label,
            l=case.l,
            m=case.m,
            n=case.n,
            dtype=case.dtype.name,
            status="",
            runs=0,
            gflops=4.0 * case.l * case.m * case.n**2 / 1e9,
            host=self.host,
            loadavg=loadavg(),
            timestamp=stamp,
        )
        row.update({f"v_{k}": v for k, v in self.vers.items()})
        return row

    def _measure_memory(self):
        if not self.pending_mem:
            return
        # Each CPU probe runs gc.collect() (base.cpu_peak); with torch and JAX loaded, a full collection
        # walks millions of long-lived objects (0.3-0.6 s each, two per probe). One full collection here,
        # then those objects are frozen out of the probes' collections, which still see every new one.
        gc.collect()
        gc.freeze()
        try:
            for row, prep in self.pending_mem:
                try:
                    b, how = prep.peak()
                    row["peak_mb"], row["peak_how"] = b / 2**20, how
                except Exception as e:  # noqa: BLE001 - reported in the row
                    row["peak_how"] = f"failed: {_first_line(e)}"
        finally:
            gc.unfreeze()
        gpu = any(r["device"] == "gpu" for r, _ in self.pending_mem)
        self.pending_mem = []
        if gpu:
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()


def set_ratios(rows: list[dict], case: Case, device: str, d2d_bw: float | None) -> None:
    """Each ok row's ratios to the case's limits (BLAS/cuBLAS, memory) and to gpu_orthol1's time."""
    ok = [r for r in rows if r["status"] == "ok"]
    lim = {r["precision"]: r["p50_ms"] for r in ok if r["family"] == "limit"}
    mem_ms = 0.0  # none on the CPU (falsy, as an absent limit)
    if device == "gpu" and d2d_bw:
        mem_ms = 2.0 * case.nbytes / d2d_bw * 1e3  # read phi + write the gradient
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


def run_crossover(bench: Bench, rng: Any, stamp: str) -> None:
    """backend="numpy" vs backend="cupy" (with host<->device copies) on NumPy inputs of growing size."""
    import gpu_orthol1 as ol1

    if bench.config.crossover is None:
        return
    (l, n), ms = bench.config.crossover
    bar = bench._bar(len(ms), "crossover")
    for m in ms:
        phi = [random_phi(rng, (l, m, n), np.float32) for _ in range(4)]
        for backend in ("numpy", "cupy"):

            def call(k: int, b: Any = backend, x: list = phi) -> Any:
                return ol1.loss_and_grad(x[k], BETA, backend=b)

            prep = Prepared(
                call,
                lambda r: r,
                gpu_sync,
                lambda: (0.0, ""),
            )
            row = {k: "" for k in RESULT_FIELDS}
            row.update(
                method=f"auto-crossover[{backend}]",
                family="crossover",
                device="gpu",
                device_name=bench.device_names.get("gpu", ""),
                backend=backend,
                precision="highest",
                sweep="crossover",
                shape=f"{l}x{m}x{n}",
                l=l,
                m=m,
                n=n,
                dtype="float32",
                gflops=4.0 * l * m * n * n / 1e9,
                host=bench.host,
                loadavg=loadavg(),
                timestamp=stamp,
                note="NumPy input and output: host<->device copies included",
            )
            row.update({f"v_{k}": v for k, v in bench.vers.items()})
            try:
                k, p20, p50, p80 = time_runs(prep, bench.config.runs, 4, bench.config.method_budget_s, 2)
                row.update(runs=k, p20_ms=p20, p50_ms=p50, p80_ms=p80, status="ok")
            except Exception as e:  # noqa: BLE001 - reported in the row
                row.update(status="error", note=_first_line(e))
            bench.rows.append(row)
            bench.crossover_rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    flops = crossover_flops(bench.crossover_rows)
    if flops is not None:
        bench.note(
            f"measured CPU/GPU crossover for NumPy inputs: GPU faster from {flops:.3g} GEMM flops "
            f"(4*l*m*n^2) on; set gpu_orthol1._backends.GPU_CROSSOVER_FLOPS from it"
        )
    else:
        bench.note("crossover: the GPU never won at the measured sizes (or a side failed)")
