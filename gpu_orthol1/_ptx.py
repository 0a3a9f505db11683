"""Our Numba kernels launched without Numba's dispatcher: compiled once per signature to PTX
(`numba.cuda.compile_ptx`), loaded by CuPy (`cupy.RawModule`) and launched by the driver's
cuLaunchKernel with a parameter block packed in one step.

Why: on an H100 (bench/results/gpu-h100-check.md) one launch through Numba's dispatcher cost about
0.2 ms of host time (argument typing, `from_cuda_array_interface` per array, ctypes marshalling),
more than both cuBLAS calls of a small call together. The kernel bodies stay Numba Python in
kernels/ (the simulator runs the same functions in CI); only the launcher changes.

A Numba kernel's PTX entry takes each argument flattened the way Numba's own launcher passes it:
an array as (meminfo, parent, nitems, itemsize, data, shape..., strides...) -- meminfo and parent
are unused on the device and passed as 0, strides in bytes -- and a scalar as its own type.
`flatten` gives the values and `param_format` their layout; `tests/test_ptx_launch.py` checks both
against the PTX's parameter list.
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
_thread = threading.local()  # `ready`: this thread has a current CUDA context for the driver's launch


def ensure_context():
    """Make the primary context of CuPy's current device current in this thread, where none is:
    cuLaunchKernel launches into the thread's current context, and a thread that has made no CUDA
    runtime call yet has none (CUDA_ERROR_INVALID_CONTEXT; CuPy's own launches set it up, ours go
    to the driver directly). cudaSetDevice (`Device.use`) makes it current since CUDA 12."""
    import cupy
    from cupy.cuda import driver

    if driver.ctxGetCurrent() == 0:
        cupy.cuda.Device().use()
    _thread.ready = True


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


# One 8-byte slot per parameter (kernelParams points at each): the struct code of each kind of
# scalar, padded to its slot. Numba passes an integer or a pointer as 64 bits, a boolean as a byte.
_SLOT = {
    "int64": "q",
    "uint64": "Q",
    "int32": "i4x",
    "uint32": "I4x",
    "float64": "d",
    "float32": "f4x",
    "bool": "?7x",
}


def _codes(ty) -> list[str]:
    """The struct codes of the parameters one argument of Numba type `ty` becomes."""
    from numba import types

    if isinstance(ty, types.Array):  # meminfo, parent, nitems, itemsize, data, shape..., strides...
        return ["Q", "Q", "q", "q", "Q"] + ["q"] * (2 * ty.ndim)
    if isinstance(ty, types.UniTuple):  # flattened: one parameter per member
        return _codes(ty.dtype) * ty.count
    name = "bool" if isinstance(ty, types.Boolean) else str(ty)
    if not isinstance(ty, (types.Boolean, types.Integer, types.Float)) or name not in _SLOT:
        raise TypeError(f"no launcher for kernel argument type {ty}")
    return [_SLOT[name]]


def _packer(ty):
    """A function appending the parameter values of one argument of Numba type `ty` to a list."""
    from numba import types

    _codes(ty)  # refuses what it cannot pass
    if isinstance(ty, types.Array):
        ndim = ty.ndim

        def pack(a, flat):
            ptr, shape, strides, size, isz = _fields(a)
            if len(shape) != ndim:
                raise ValueError(f"kernel argument has {len(shape)} dimensions, the kernel {ndim}")
            flat += (0, 0, size, isz, ptr)
            flat += shape
            flat += strides

        return pack
    if isinstance(ty, types.UniTuple):
        count = ty.count

        def pack_tuple(a, flat):
            if len(a) != count:
                raise ValueError(f"kernel argument has {len(a)} members, the kernel {count}")
            flat += a

        return pack_tuple
    conv = _scalar_conv(ty)

    def pack_scalar(a, flat):
        flat.append(conv(a))

    return pack_scalar


def _scalar_conv(ty):
    """The Python value a scalar argument of Numba type `ty` is packed as."""
    from numba import types

    if isinstance(ty, types.Boolean):
        return bool
    if isinstance(ty, types.Float):
        # float32 through NumPy: a value beyond its range becomes inf, as a NumPy scalar argument did
        return float if ty.bitwidth == 64 else (lambda a: float(np.float32(a)))
    return int


def flatten(argtypes, args, packers=None) -> tuple:
    """The kernel parameter values Numba's ABI expects for `args` typed as `argtypes`."""
    flat: list = []
    for pack, a in zip(packers or [_packer(t) for t in argtypes], args, strict=True):
        pack(a, flat)
    return tuple(flat)


def param_format(argtypes) -> str:
    """The struct format of the kernel's parameter block: one 8-byte slot per parameter."""
    return "<" + "".join(c for t in argtypes for c in _codes(t))


PTX_TYPE = {"q": ".u64", "Q": ".u64", "d": ".f64", "f": ".f32", "i": ".u32", "I": ".u32", "?": ".u8"}


def slot_ptx_types(argtypes) -> list[str]:
    """The PTX type of each slot `param_format` lays out (what the PTX entry must declare)."""
    return [PTX_TYPE[c[0]] for t in argtypes for c in _codes(t)]


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
    """One Numba kernel (a `cuda.jit` dispatcher) for one signature, loaded by CuPy and launched with
    the driver's cuLaunchKernel on a given stream: `kernel.launch(stream_ptr, grid, block, *args)`.

    The parameters are packed by one `struct.pack_into` into a block made once (one 8-byte slot
    each, `kernelParams` pointing at the slots), not converted one by one by CuPy's launcher: that
    conversion, 31 parameters for the sign pass, was the launch's main host cost on an H100
    (bench/results/gpu-h100-profile.txt). The driver copies the parameters when the launch is
    enqueued (also into a graph being captured), so the block is reused at once; a lock keeps two
    threads launching the same kernel from packing into it together."""

    def __init__(self, dispatcher, argtypes, device_cc):
        import struct

        import cupy
        from cupy_backends.cuda.api import driver
        from numba import cuda

        ptx, _ = cuda.compile_ptx(dispatcher.py_func, tuple(argtypes), cc=_cc(device_cc))
        ptx = cap_registers(ptx, getattr(dispatcher, "targetoptions", {}).get("max_registers"))
        name = re.search(r"\.visible\s+\.entry\s+(\S+?)\s*\(", ptx).group(1)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            self._module = cupy.RawModule(path=path)
            self._fn = self._module.get_function(name)  # loads the module now, while the file exists
            self._function = self._fn.kernel  # the loaded cupy.cuda.Function (a RawKernel has no handle)
        self.argtypes = tuple(argtypes)
        self._packers = [_packer(t) for t in self.argtypes]
        self.ptx = ptx
        self._struct = struct.Struct(param_format(self.argtypes))
        self._block, self._params, self._params_ptr = param_block(self._struct.size)
        self._fptr = self._function.ptr
        self._driver_launch = driver.launchKernel
        self._lock = threading.Lock()

    def launch(self, stream_ptr, grid, block, *args):
        vals = flatten(self.argtypes, args, self._packers)
        with self._lock:
            self._struct.pack_into(self._block, 0, *vals)
            self.launch_params(stream_ptr, grid, block, self._params_ptr)

    def launch_params(self, stream_ptr, grid, block, params_ptr):
        """Launch with a parameter block packed elsewhere (`BoundLaunch`): `params_ptr` is the
        address of its array of slot addresses."""
        if not getattr(_thread, "ready", False):  # once per thread
            ensure_context()
        self._driver_launch(self._fptr, grid, 1, 1, block, 1, 1, 0, stream_ptr, params_ptr, 0)

    def __call__(self, grid, block, *args):
        """Launch on CuPy's current stream."""
        import cupy

        self.launch(cupy.cuda.get_current_stream().ptr, int(grid), int(block), *args)


def cap_registers(ptx: str, count: int | None) -> str:
    """The PTX with its kernel entry capped at `count` registers per thread (a .maxnreg directive:
    cuda.jit(max_registers=...) applies at Numba's own link step, which this launcher skips, so it
    goes into the PTX the driver compiles); unchanged for None or 0."""
    if not count:
        return ptx
    head = re.search(r"\.visible\s+\.entry\s+\S+\s*\(.*?\)", ptx, re.S)
    if head is None:
        raise ValueError("no kernel entry in this PTX")
    rest = ptx[head.end() :]
    body = rest.index("{") if "{" in rest else len(rest)
    if ".maxnreg" in rest[:body]:  # one directive per entry (ptxas refuses two): replace it
        return ptx[: head.end()] + re.sub(r"\.maxnreg\s+\d+", f".maxnreg {int(count)}", rest, count=1)
    return f"{ptx[: head.end()]}\n.maxnreg {int(count)}\n{rest}"


def param_block(size: int):
    """(block, slot address array, its address): `size` bytes of 8-byte slots and the array of
    their addresses that cuLaunchKernel's kernelParams takes."""
    import ctypes

    nparams = size // 8
    block = ctypes.create_string_buffer(max(8, size))
    base = ctypes.addressof(block)
    params = (ctypes.c_void_p * max(1, nparams))(*(base + 8 * i for i in range(nparams)))
    return block, params, ctypes.addressof(params)


class BoundLaunch:
    """A kernel's launch with every parameter fixed but the arguments at positions `variable` (an
    array's data address, or a scalar): a parameter block of its own, packed per call from a kept
    list with only those slots replaced. What a plan keeps for the fused kernel, whose arrays keep
    their shapes, strides and dtypes from call to call and change only their addresses: packing
    three arrays' fields per launch (`flatten`) was most of the launch's host time.

    `kern` is a `PtxKernel` (or anything with its `argtypes` and `launch_params`); `args` are the
    arguments of a first launch, `grid` and `block` its sizes."""

    def __init__(self, kern, grid: int, block: int, args, variable):
        import struct

        from numba import types

        argtypes = kern.argtypes
        if len(args) != len(argtypes):
            raise ValueError(f"{len(args)} arguments for a kernel of {len(argtypes)}")
        self.kern, self.grid, self.block = kern, int(grid), int(block)
        if len(set(variable)) != len(variable):
            raise ValueError(f"an argument is named twice in variable={tuple(variable)}")
        self._vals = list(flatten(argtypes, args))
        starts = np.cumsum([0] + [len(_codes(t)) for t in argtypes]).tolist()
        self._slots, self._convs = [], []
        for k in variable:
            ty = argtypes[k]
            if isinstance(ty, types.Array):  # (meminfo, parent, nitems, itemsize, data, ...)
                self._slots.append(starts[k] + 4)
                self._convs.append(int)
            elif isinstance(ty, types.UniTuple):
                raise TypeError("a tuple argument cannot vary in a bound launch")
            else:
                self._slots.append(starts[k])
                self._convs.append(_scalar_conv(ty))
        self._struct = struct.Struct(param_format(argtypes))
        self._block, self._params, self.params_ptr = param_block(self._struct.size)
        self._lock = threading.Lock()

    def launch(self, stream_ptr, *values):
        """Launch with the `variable` arguments set to `values` (addresses for arrays), in order."""
        if len(values) != len(self._slots):
            raise ValueError(f"{len(values)} values for {len(self._slots)} variable arguments")
        with self._lock:
            vals = self._vals
            for slot, conv, v in zip(self._slots, self._convs, values, strict=True):
                vals[slot] = conv(v)
            self._struct.pack_into(self._block, 0, *vals)
            self.kern.launch_params(stream_ptr, self.grid, self.block, self.params_ptr)


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
