"""Write bench/results/README.md from the JSON files of `gpu-orthol1 bench` in bench/results/.

    python bench/summarize.py [RESULTS_DIR]

For every device (CPU model or GPU card), each run that measured it gives
the headline table: gpu_orthol1's median on the reference shapes, its ratio to
the BLAS/cuBLAS (and, on GPUs, memory) limit, and how many times faster it is
than each peer. Figures are copied from the JSON files, never typed in, and
every row is judged by gpu_orthol1.bench.flags.flag_rows: a value from a disturbed
measurement is marked, not published. Runs moved to RESULTS_DIR/disturbed/ are
listed with what disturbed them, without a table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gpu_orthol1.bench.flags import FLOOR_RATIO, SPREAD_MAX, cpu_count_of, flag_rows, run_flags
from gpu_orthol1.bench.report import headline_markdown

RERUN = """\
## Re-running

Each run above names the command that produced it; run it again, on a machine whose load average stays
below its CPU count (check `uptime` first), copy the `.csv`, `.json` and `.png` here under the run's
name, and regenerate this page with `python bench/summarize.py`. A full CPU run (all three dtypes,
long sweeps; about 10 minutes on 2 cores):

    gpu-orthol1 bench --device cpu --csv bench/results/cpu.csv --json bench/results/cpu.json \\
        --plot bench/results/cpu.png

Quick CPU check (float32 reference shapes, short sweeps, 5 runs; under 2 minutes on an idle 2-core machine):

    gpu-orthol1 bench --quick --device cpu

GPU (what bench/gpu_check.sh runs; copy its $OUT/bench_gpu.* here, named after the card, then summarize):

    python3 -m gpu_orthol1.bench --quick --device gpu --no-progress --time-limit 150 \\
        --csv $OUT/bench_gpu.csv --json $OUT/bench_gpu.json --plot $OUT/bench_gpu.png

and its bfloat16 step (`bench_bf16`; the quick run's time limit ends before its other dtypes):

    python3 -m gpu_orthol1.bench --quick --device gpu --dtypes bfloat16 --sweep-m none --sweep-n none \\
        --no-crossover --time-limit 40 --no-progress --csv $OUT/bench_bf16_gpu.csv --json $OUT/bench_bf16_gpu.json

`python -m gpu_orthol1.bench` is the same command without the console script.
"""

LEGEND = f"""\
Columns: `gpu_orthol1 ms` is the median of gpu_orthol1.loss_and_grad (backend numpy on CPUs, cupy on GPUs,
precision="highest"; `tf32 ms` with precision="tf32"); `x limit` its time over the limit (CPU: the same two
GEMMs through the same BLAS on contiguous operands; GPU: the larger of that through cuBLAS and the memory
roofline, reading phi and writing the gradient at the measured device-to-device copy bandwidth); `vs X` how
many times faster gpu_orthol1 is than peer X (below 1: the peer is faster); `wrong` means the peer's result
failed the float64 check (for the naive float16 expressions: the float16 loss sum overflows to inf) and was
not timed. Peak MB: extra memory of one call beyond its input (CPU: resident-set high-water mark; GPU: CuPy
pool / torch max allocated / XLA's buffer plan).

Flagged values (a `?` after the number; the `flagged` column says why) come from a measurement that
something else on the machine disturbed, and are not figures to quote. A row is flagged when (1) a method
ran below {FLOOR_RATIO}x the BLAS limit: every method forms the Gram and the gradient GEMM, and a Gram through
syrk saves at most a quarter of the two GEMMs, so a lower ratio means the limit itself was slowed; (2) its
p80/p20 spread is above {SPREAD_MAX}: runs that far apart make the median luck; (3) the 1-minute load average
was above the machine's CPU count when the run started or when the row was measured. A ratio to the limit
is also flagged when the limit's own timing is (`limit ...`). A peer's `vs X` is flagged when either side is.
"""

DISTURBED = """## Disturbed runs (kept, not published)

The runs in [disturbed/](disturbed/) were measured while other jobs shared the machine: their files are
kept as a record, and no figure in this folder or in the top-level README comes from them. A run is moved
there by hand (with a `NAME.why` file saying why) when its flags show the disturbance reached its limits,
so that even its unflagged rows cannot be trusted.
"""


def load_docs(d: Path) -> list[tuple[Path, dict]]:
    docs = []
    for p in sorted(d.glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {p}: {e}", file=sys.stderr)
            continue
        if "rows" in doc and "devices" in doc:
            flag_rows(doc["rows"], cpu_count_of(doc), doc.get("loadavg_start"))
            docs.append((p, doc))
    return docs


def load_line(doc: dict) -> str:
    rows = doc["rows"]
    start = doc.get("loadavg_start") or (rows[0]["loadavg"] if rows else "")
    n = cpu_count_of(doc)
    cpus = f"on {n} CPUs" if n else "CPU count not recorded: load checked only at the start"
    return f"load average at start {start}, at end {doc.get('loadavg_end', '')} ({cpus})"


def flag_counts(rows: list[dict]) -> str:
    """'3 of 40 timed rows flagged (below the floor: 2, spread: 1)'"""
    timed = [r for r in rows if r["status"] == "ok"]
    kinds: dict[str, int] = {}
    for r in timed:
        seen = set()
        for f in filter(None, r.get("flags", "").split("; ")):
            k = ("limit " if f.startswith("limit ") else "") + (
                "below the floor" if "BLAS limit <" in f else "spread" if "spread" in f else "load"
            )
            seen.add(k)
        for k in seen:
            kinds[k] = kinds.get(k, 0) + 1
    n = sum(1 for r in timed if r.get("flags"))
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
    return f"{n} of {len(timed)} timed rows flagged" + (f" ({detail})" if detail else "")


def main(argv: list[str]) -> int:
    d = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results"
    docs = load_docs(d)
    by_device: dict[str, list[tuple[str, Path, dict]]] = {}
    for p, doc in docs:
        stamp = doc["rows"][0]["timestamp"] if doc["rows"] else ""
        for name in doc["devices"].values():
            by_device.setdefault(name, []).append((stamp, p, doc))
    out = [
        "# gpu_orthol1 benchmark results",
        "",
        "Generated by `python bench/summarize.py` from the JSON files in this folder: every run per "
        "device, newest first. The command, versions and machine load of each run are in its JSON; "
        "the CSV has p20/p50/p80 of every method, shape and dtype. Values marked `?` are flagged as "
        "disturbed (see the legend below) and are not figures to quote.",
        "",
    ]
    for name, runs in sorted(by_device.items()):
        out += [f"## {name}", ""]
        for _stamp, p, doc in sorted(runs, key=lambda t: t[0], reverse=True):
            rows = [r for r in doc["rows"] if r["device_name"] == name]
            r0 = rows[0]
            whole = run_flags(doc["rows"], cpu_count_of(doc), doc.get("loadavg_start"))
            out += [
                f"### `{p.stem}`",
                "",
                f"Run `{doc['command']}` at {r0['timestamp']} on host `{doc['host']}`; {load_line(doc)}. "
                "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v) + ".",
                "",
            ]
            if whole:
                out += [f"**Whole run flagged: {'; '.join(whole)}.**", ""]
            out += [flag_counts(rows) + ".", ""]
            out.append(headline_markdown(rows))
            png = p.with_suffix(".png")
            if png.exists():
                out += [f"![time vs m and n]({png.name})", ""]
            if doc.get("d2d_bandwidth_gbs"):
                out += [f"Device-to-device copy bandwidth: {doc['d2d_bandwidth_gbs']:.0f} GB/s.", ""]
            if doc.get("crossover_flops"):
                out += [
                    f"CPU/GPU crossover for NumPy inputs: the GPU (with copies) wins from "
                    f"{doc['crossover_flops']:.3g} GEMM flops (4*l*m*n^2) on.",
                    "",
                ]
            notes = [n for n in doc.get("notes", []) if "GPU part skipped" not in n]
            if notes:
                out += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    out += [LEGEND]
    disturbed = load_docs(d / "disturbed") if (d / "disturbed").is_dir() else []
    if disturbed:
        out.append(DISTURBED)
        for p, doc in disturbed:
            rows = doc["rows"]
            why = p.with_suffix(".why")
            out += [
                f"- `disturbed/{p.stem}`: `{doc['command']}` at {rows[0]['timestamp'] if rows else '?'} on "
                f"{', '.join(doc['devices'].values())}; {load_line(doc)}; {flag_counts(rows)}."
                + (f" {why.read_text().strip()}" if why.exists() else "")
            ]
        out.append("")
    out += [RERUN]
    (d / "README.md").write_text("\n".join(out))
    print(f"wrote {d / 'README.md'} ({len(by_device)} device(s), {len(disturbed)} disturbed run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
