"""Facts about the machine a run happens on, shared by `gpu-orthol1 run`/`info` and `gpu-orthol1 bench`.

The names here are written into every results file (`device_name`, `versions`,
`loadavg`), and `flags.cpu_count_of` reads the CPU count back from `cpu_name()`'s
"(N CPUs)" suffix, so there is one spelling of each fact for the whole package.
"""

from __future__ import annotations

import os
import platform


def versions() -> dict[str, str]:
    """Installed versions of gpu_orthol1 and the peers the bench times ("" where one is missing)."""
    from importlib import metadata

    out = {}
    for key, dists in (
        ("gpu_orthol1", ("gpu_orthol1",)),
        ("numpy", ("numpy",)),
        ("cupy", ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy")),
        ("torch", ("torch",)),
        ("jax", ("jax",)),
    ):
        out[key] = ""
        for d in dists:
            try:
                out[key] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def cpu_name() -> str:
    """The CPU model and the CPU count, e.g. "AMD EPYC 7B13 (2 CPUs)"."""
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


def gpu_name(with_device: bool = False) -> str:
    """The current CUDA device's name (e.g. "NVIDIA H200"), with " (device N)" when `with_device`.

    Imports CuPy: call it only where a GPU is known to be usable."""
    import cupy

    dev = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return f"{name} (device {dev.id})" if with_device else name


def cache_bytes(device: str) -> int:
    """The last-level cache in bytes ("gpu": the L2 of the current device; "cpu": the largest of cpu0)."""
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
    """The 1, 5 and 15-minute load averages as "0.12 0.34 0.56" ("" where the OS has none)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""


def run_record(**fields: object) -> dict:
    """The opening of a bench script's JSON results file, before its first measurement.

    Args:
        **fields: the script's own entries (its arguments, constants it measures), after the common ones.

    Returns:
        {"date" (UTC, ISO 8601), "cpu" (`cpu_name()`), "cpu_count", "numpy" (its version),
        "loadavg_start" (1, 5, 15 min), **fields, "results": []}; `write_record` adds the load
        average at the end.

    Raises:
        Nothing of its own.

    Example:
        >>> doc = run_record(rounds=21)
        >>> [k for k in doc if k not in ("date", "cpu", "cpu_count", "numpy", "loadavg_start")]
        ['rounds', 'results']
    """
    from datetime import datetime, timezone

    import numpy as np

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "loadavg_start": os.getloadavg(),
        **fields,
        "results": [],
    }


def write_record(doc: dict, path: str) -> None:
    """Add the load average at the end of the run to `doc` (a `run_record`) and write it to `path` as JSON.

    Args:
        doc: the run's record, its "results" filled.
        path: the JSON file to write (replaced if it exists).

    Returns:
        None.

    Raises:
        OSError: `path` cannot be written.

    Example:
        >>> import json, os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "r.json")
        >>> write_record(run_record(), p)
        >>> sorted(json.load(open(p)))[:3]
        ['cpu', 'cpu_count', 'date']
    """
    import json

    doc["loadavg_end"] = os.getloadavg()
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
