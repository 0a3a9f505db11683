"""Judging result rows after the fact, from what the CSV/JSON hold: `flag_rows` marks timings that
something else on the machine disturbed (not figures to publish), `slow_rows` marks the points where
gpu_orthol1 misses its CPU promise (within 1.10x of the BLAS limit, never slower than naive NumPy).
"""

from __future__ import annotations

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


def _row_flags(r, cpu_count: int | None) -> list[str]:
    if r.get("status") != "ok":
        return []
    out = []
    p20, p80 = r.get("p20_ms", ""), r.get("p80_ms", "")
    if (
        p20 not in ("", None)
        and p80 not in ("", None)
        and float(p20) > 0
        and float(p80) / float(p20) > SPREAD_MAX
    ):
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
    own = {id(r): _row_flags(r, cpu_count) + whole for r in rows}
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


def split_flags(flags: str) -> list[str]:
    """The reasons in a "flags" or "slow" field, as a list."""
    return [f for f in flags.split("; ") if f]


def own_flags(flags: str) -> str:
    """The reasons of a row's flags that concern its own timing (not its limit's)."""
    return "; ".join(f for f in flags.split("; ") if f and not f.startswith("limit "))


# The CPU promise, checked on every point a run measures (the sweeps as much as the reference
# shapes): gpu_orthol1 within SLOW_RATIO of the limit (its own two GEMMs through the same BLAS, no
# sign pass), and no slower than SLOW_PEER, the expression users write without it.
SLOW_RATIO = 1.10
SLOW_PEER = "numpy-naive"


def slow_rows(rows: list[dict]) -> list[dict]:
    """Set every row's "slow": for gpu_orthol1's own CPU rows (full precision, timed), the reasons
    it misses the CPU promise, joined by "; " (empty when it keeps it); empty for every other row.
    Returns the rows.

    Example:
        >>> ours = {"method": "gpu_orthol1[numpy]", "family": "ours", "device": "cpu", "precision": "highest",
        ...         "status": "ok", "shape": "512x1024x64", "dtype": "float32", "sweep": "m", "p50_ms": 198.0,
        ...         "ratio_blas": 198.0 / 154.0}
        >>> naive = dict(ours, method="numpy-naive", family="peer", p50_ms=168.0, ratio_blas=168.0 / 154.0)
        >>> slow_rows([ours, naive])[0]["slow"]
        '1.29x the BLAS limit > 1.1; slower than numpy-naive (198 > 168 ms)'
    """
    naive = {_case_key(r): r for r in rows if r.get("method") == SLOW_PEER and r.get("status") == "ok"}
    for r in rows:
        r["slow"] = ""
        if not (
            r.get("family") == "ours"
            and r.get("device") == "cpu"
            and r.get("precision") == "highest"
            and r.get("status") == "ok"
            and r.get("p50_ms") not in ("", None)
        ):
            continue
        why = []
        rb = r.get("ratio_blas", "")
        if rb not in ("", None) and float(rb) > SLOW_RATIO:
            why.append(f"{float(rb):.2f}x the BLAS limit > {SLOW_RATIO:g}")
        peer = naive.get(_case_key(r))
        if (
            peer is not None
            and peer.get("p50_ms") not in ("", None)
            and float(r["p50_ms"]) > float(peer["p50_ms"])
        ):
            why.append(f"slower than {SLOW_PEER} ({float(r['p50_ms']):.4g} > {float(peer['p50_ms']):.4g} ms)")
        r["slow"] = "; ".join(why)
    return rows


def _case_key(r: dict) -> tuple:
    return (r.get("device"), r.get("shape"), r.get("dtype"), r.get("sweep"))
