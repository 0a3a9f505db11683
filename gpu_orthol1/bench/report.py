"""What `gpu-orthol1 bench` prints and writes: the plain-text tables, the headline (Markdown), the
CSV, the plot, and the CPU/GPU crossover read from the rows.
"""

from __future__ import annotations

import math

from .base import PEERS, RESULT_FIELDS
from .flags import own_flags, split_flags


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


def _fmt(x, spec):
    if x == "" or x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def table(rows, sweeps=("ref",)) -> str:
    """Plain-text table: per (device, shape, dtype), every method's median, ratio to the limit, how many
    times faster gpu_orthol1 is (its time divided by this method's), peak memory, where gpu_orthol1
    misses its CPU promise ("SLOW: ..."; see flags.slow_rows) and why a row is flagged as disturbed
    (see flags.flag_rows)."""
    head = [
        "method",
        "device",
        "shape",
        "dtype",
        "median ms",
        "p20-p80 ms",
        "x limit",
        "ours faster by",
        "peak MB",
        "status",
        "slow",
        "flags",
    ]
    lines = []
    for r in rows:
        if r["sweep"] not in sweeps:
            continue
        spd = r["ours_speedup"]
        lines.append(
            [
                r["method"],
                r["device"],
                r["shape"],
                r["dtype"],
                _fmt(r["p50_ms"], ".3f"),
                f"{_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}" if r["p50_ms"] != "" else "-",
                _fmt(r["ratio_limit"], ".2f"),
                ("-" if r["family"] != "peer" or spd == "" else f"{spd:.2f}x"),
                _fmt(r["peak_mb"], ".1f"),
                r["status"] + (f" ({r['note']})" if r["note"] else ""),
                f"SLOW: {r['slow']}" if r.get("slow") else "",
                r.get("flags", ""),
            ]
        )
    w = (
        [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
        if lines
        else [len(h) for h in head]
    )
    out = ["  ".join(h.ljust(k) for h, k in zip(head, w, strict=True)).rstrip()]
    out += ["  ".join(str(c).ljust(k) for c, k in zip(ln, w, strict=True)).rstrip() for ln in lines]
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
        ours = [
            r for r in rs if r["family"] == "ours" and r["precision"] == "highest" and r["status"] == "ok"
        ]
        if not ours:
            continue
        o = ours[0]
        own = split_flags(own_flags(o.get("flags", "")))
        flags: dict[str, list[str]] = {}
        if own:
            flags["ms"] = own
        if o.get("flags"):
            flags["x_limit"] = split_flags(o["flags"])
        h = {
            "device": device,
            "device_name": dname,
            "shape": shape,
            "dtype": dtype,
            "method": o["method"],
            "ms": o["p50_ms"],
            "x_limit": o["ratio_limit"],
            "peak_mb": o["peak_mb"],
            "flags": flags,
        }
        tf = [r for r in rs if r["family"] == "ours" and r["precision"] == "tf32" and r["status"] == "ok"]
        h["tf32_ms"] = tf[0]["p50_ms"] if tf else ""
        if tf and own_flags(tf[0].get("flags", "")):
            flags["tf32_ms"] = split_flags(own_flags(tf[0]["flags"]))
        for p in PEERS:
            pr = [r for r in rs if r["method"] == p]
            if not pr:
                h[p] = ""
            elif pr[0]["status"] == "ok":
                h[p] = pr[0]["p50_ms"] / o["p50_ms"]
                why = list(dict.fromkeys(own + split_flags(own_flags(pr[0].get("flags", "")))))
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

        def mark(key, text, fl=fl):
            return text + "?" if key in fl and text != "-" else text

        cells = [
            h["device_name"] or h["device"],
            h["shape"],
            h["dtype"],
            mark("ms", _fmt(h["ms"], ".2f")),
            mark("x_limit", _fmt(h["x_limit"], ".2f")),
            _fmt(h["peak_mb"], ".0f"),
        ]
        if "tf32 ms" in head:
            cells.append(mark("tf32_ms", _fmt(h["tf32_ms"], ".2f")))
        for p in peers:
            v = h[p]
            cells.append(mark(p, f"{v:.1f}x") if isinstance(v, float) else (v or "-"))
        why: dict[str, list[str]] = {}  # one entry per distinct reason, naming the values it concerns
        for key, reasons in fl.items():
            for reason in reasons:
                why.setdefault(reason, []).append(
                    key.replace("_", " ")
                    if key in ("x_limit", "tf32_ms")
                    else ("ms" if key == "ms" else f"vs {key}")
                )
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
                pts = sorted(
                    (r[sweep], r["p50_ms"], r["p20_ms"], r["p80_ms"]) for r in rs if r["method"] == name
                )
                x = [p[0] for p in pts]
                y = [p[1] for p in pts]
                fam = next(r["family"] for r in rs if r["method"] == name)
                style: dict = (
                    {"ls": "--", "color": "k", "lw": 1.2} if fam == "limit" else {"marker": "o", "ms": 3}
                )
                if fam == "ours":
                    style["lw"] = 2.5
                ax.plot(x, y, label=name, **style)
                if fam != "limit":
                    ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], alpha=0.15)
            mem = sorted(
                (r[sweep], r["limit_mem_ms"])
                for r in rs
                if r["family"] == "ours" and r["limit_mem_ms"] != "" and r["precision"] == "highest"
            )
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
