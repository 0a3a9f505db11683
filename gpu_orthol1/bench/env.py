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


# the instruction sets that pick a BLAS's kernels (OpenBLAS: Haswell's for AVX2, SkylakeX's for
# AVX-512), in the order /proc/cpuinfo's flags would name them
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def cpu_detail(cpuinfo: str = "/proc/cpuinfo", cache: str = "/sys/devices/system/cpu/cpu0/cache") -> dict:
    """What tells apart two CPUs that `cpu_name()` spells alike ("AMD EPYC" names several
    generations on the cloud VMs this project measures on): the CPU family, model and stepping, the
    instruction sets that pick BLAS's kernels, cpu0's L2 cache, and BLAS's own kernel choice.

    Args:
        cpuinfo: the file to read the first CPU's block of (Linux's /proc/cpuinfo format).
        cache: cpu0's cache folder (Linux's sysfs layout: index*/level, index*/size).

    Returns:
        {"family", "model", "stepping" (ints, None where /proc/cpuinfo has none), "isa" (the
        subset of avx2, fma, avx512f, avx512_bf16, amx_tile the CPU has), "l2_bytes" (cpu0's L2,
        None if unknown), "blas" ([{"internal_api", "version", "architecture"}] per BLAS library
        threadpoolctl finds; [] where it finds none)}.

    Raises:
        Nothing of its own: facts it cannot read are None or empty.

    Example:
        >>> sorted(cpu_detail())
        ['blas', 'family', 'isa', 'l2_bytes', 'model', 'stepping']
    """
    info: dict = {"family": None, "model": None, "stepping": None, "isa": [], "l2_bytes": None, "blas": []}
    keys = {"cpu family": "family", "model": "model", "stepping": "stepping"}
    try:
        with open(cpuinfo, errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # cpu0's block only
                k, _, v = line.partition(":")
                k, v = k.strip(), v.strip()
                if k in keys and v.isdigit():
                    info[keys[k]] = int(v)
                elif k == "flags":
                    have = set(v.split())
                    info["isa"] = [flag for flag in _ISA_FLAGS if flag in have]
    except OSError:
        pass
    try:
        for idx in sorted(os.listdir(cache)):
            try:
                with open(f"{cache}/{idx}/level") as f:
                    if f.read().strip() != "2":
                        continue
                with open(f"{cache}/{idx}/size") as f:
                    s = f.read().strip()
                info["l2_bytes"] = _size_bytes(s)
                break
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    from threadpoolctl import threadpool_info  # a dependency of gpu_orthol1

    info["blas"] = [
        {k: lib.get(k) for k in ("internal_api", "version", "architecture")}
        for lib in threadpool_info()
        if lib.get("user_api") == "blas"
    ]
    return info


def gpu_name(with_device: bool = False) -> str:
    """The current CUDA device's name (e.g. "NVIDIA H200"), with " (device N)" when `with_device`.

    Imports CuPy: call it only where a GPU is known to be usable."""
    import cupy

    dev = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return f"{name} (device {dev.id})" if with_device else name


def _size_bytes(s: str) -> int:
    """A sysfs cache size ("32K", "1024K", "2M", "512") in bytes; ValueError if it is not one."""
    return int(s.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)


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
                best = max(best, _size_bytes(s))
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
        {"date" (UTC, ISO 8601), "cpu" (`cpu_name()`), "cpu_detail" (`cpu_detail()`), "cpu_count",
        "numpy" (its version), "loadavg_start" (1, 5, 15 min), **fields, "results": []};
        `write_record` adds the load average at the end.

    Raises:
        Nothing of its own.

    Example:
        >>> doc = run_record(rounds=21)
        >>> [k for k in doc if k not in ("date", "cpu", "cpu_detail", "cpu_count", "numpy", "loadavg_start")]
        ['rounds', 'results']
    """
    from datetime import datetime, timezone

    import numpy as np

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_detail": cpu_detail(),
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
        >>> sorted(json.load(open(p)))[:4]
        ['cpu', 'cpu_count', 'cpu_detail', 'date']
    """
    import json

    doc["loadavg_end"] = os.getloadavg()
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
