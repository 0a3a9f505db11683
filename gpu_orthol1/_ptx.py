"""Our Numba kernels launched without Numba's dispatcher: compiled once per signature to PTX
(`numba.cuda.compile_ptx`), loaded and launched by CuPy (`cupy.RawModule`).

Why: on an H100 (bench/results/gpu-h100-check.md) one launch through Numba's dispatcher cost about
0.2 ms of host time (argument typing, `from_cuda_array_interface` per array, ctypes marshalling),
more than both cuBLAS calls of a small call together. The kernel bodies stay Numba Python in
kernels/ (the simulator runs the same functions in CI); only the launcher changes.

A Numba kernel's PTX entry takes each argument flattened the way Numba's own launcher passes it:
an array as (meminfo, parent, nitems, itemsize, data, shape..., strides...) -- meminfo and parent
are unused on the device and passed as 0, strides in bytes -- and a scalar as its own type.
`flatten` does that; `tests/test_ptx_launch.py` checks it against the PTX's parameter list.
"""

from __future__ import annotations

import importlib
import os
import re
import tempfile
import threading

import numpy as np

_cache: dict = {}
_lock = threading.Lock()


def array_type(dtype, ndim: int, layout: str = "C"):
    from numba import from_dtype, types

    return types.Array(from_dtype(np.dtype(dtype)), ndim, layout)  # type: ignore[call-overload]  # numba's stubs


def _fields(a):
    """(data pointer, shape, strides in bytes, size, itemsize) of a CuPy array or any object with
    __cuda_array_interface__ (a torch tensor)."""
    if hasattr(a, "data") and hasattr(a.data, "ptr"):  # CuPy
        return a.data.ptr, a.shape, a.strides, a.size, a.itemsize
    if hasattr(a, "data_ptr"):  # torch
        isz = a.element_size()
        return a.data_ptr(), tuple(a.shape), tuple(s * isz for s in a.stride()), a.numel(), isz
    if isinstance(a, np.ndarray):  # host memory: only for tests of the flattening itself
        return a.ctypes.data, a.shape, a.strides, a.size, a.itemsize
    raise TypeError(f"cannot pass a {type(a).__name__} to a GPU kernel")


def _packer(ty):
    """A function appending the parameters of one argument of Numba type `ty` to a list."""
    from numba import types

    if isinstance(ty, types.Array):
        ndim = ty.ndim
        u64, i64 = np.uint64, np.int64

        def pack(a, flat):
            ptr, shape, strides, size, isz = _fields(a)
            if len(shape) != ndim:
                raise ValueError(f"kernel argument has {len(shape)} dimensions, the kernel {ndim}")
            flat += (u64(0), u64(0), i64(size), i64(isz), u64(ptr))
            flat += map(i64, shape)
            flat += map(i64, strides)
        return pack
    if isinstance(ty, types.Boolean):
        scalar = np.bool_
    elif isinstance(ty, (types.Integer, types.Float)):
        scalar = np.dtype(str(ty)).type
    else:
        raise TypeError(f"no launcher for kernel argument type {ty}")

    def pack_scalar(a, flat):
        flat.append(scalar(a))
    return pack_scalar


def flatten(argtypes, args, packers=None) -> tuple:
    """The kernel parameters Numba's ABI expects for `args` typed as `argtypes`."""
    flat: list = []
    for pack, a in zip(packers or [_packer(t) for t in argtypes], args):
        pack(a, flat)
    return tuple(flat)


def entry_params(ptx: str) -> list[str]:
    """The PTX types of the kernel entry's parameters, in order ('.u64', '.f64', '.u8', ...)."""
    head = re.search(r"\.visible\s+\.entry\s+\S+\s*\((.*?)\)", ptx, re.S)
    if head is None:
        raise ValueError("no kernel entry in this PTX")
    return re.findall(r"\.param\s+(\.\w+)", head.group(1))


def _cc(device_cc: tuple[int, int]) -> tuple[int, int]:
    """The newest architecture Numba's NVVM targets that the device runs (PTX is forward compatible)."""
    try:
        nvrtc = importlib.import_module("numba.cuda.cudadrv.nvrtc")  # numba-cuda's, not numba's own
        return tuple(nvrtc.find_closest_arch(device_cc))
    except Exception:  # an older numba-cuda: ask for the device's own
        return device_cc


class PtxKernel:
    """One Numba kernel (a `cuda.jit` dispatcher) for one signature, launched by CuPy on the current
    stream: `kernel(grid, block, *args)`."""

    def __init__(self, dispatcher, argtypes, device_cc):
        import cupy
        from numba import cuda

        ptx, _ = cuda.compile_ptx(dispatcher.py_func, tuple(argtypes), cc=_cc(device_cc))
        name = re.search(r"\.visible\s+\.entry\s+(\S+?)\s*\(", ptx).group(1)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            self._module = cupy.RawModule(path=path)
            self._fn = self._module.get_function(name)  # loads the module now, while the file exists
        self.argtypes = tuple(argtypes)
        self._packers = [_packer(t) for t in self.argtypes]
        self.ptx = ptx

    def __call__(self, grid, block, *args):
        self._fn((int(grid),), (int(block),), flatten(self.argtypes, args, self._packers))


def kernel(dispatcher, argtypes) -> PtxKernel:
    """The launcher for `dispatcher` (kept alive by kernels/' own caches) and `argtypes` on the
    current device, compiled once per process: plans share it."""
    import cupy

    dev = cupy.cuda.Device()
    full = (dev.id, id(dispatcher), tuple(argtypes))
    hit = _cache.get(full)
    if hit is None:
        with _lock:
            hit = _cache.get(full)
            if hit is None:
                cc = dev.compute_capability
                hit = _cache[full] = PtxKernel(dispatcher, argtypes, (int(cc[:-1]), int(cc[-1])))
    return hit
