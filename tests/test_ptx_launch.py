"""The lean GPU launch (gpu_orthol1/_ptx.py): our Numba kernels compiled to PTX and launched by CuPy
with the parameters Numba's own launcher would pass; and the cuBLAS workspace each call hands over
(gpu_orthol1/_cublas.py, _driver.run). The flattening is checked here on host arrays; on a card
(`gpu`) against the parameter list of every kernel the GPU tests compiled."""

from __future__ import annotations

import numpy as np
import pytest

import gpu_orthol1 as ol1
from gpu_orthol1 import _plan, _ptx

from .helpers import make

numba = pytest.importorskip("numba")
types = numba.types


def test_flatten_follows_numbas_array_abi():
    import struct

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.zeros((2, 3, 5), np.float64)[:, ::-1, ::2]  # any strides, negative too
    sig = (
        _ptx.array_type(np.float32, 2),
        types.int64,
        _ptx.array_type(np.float64, 3, "A"),
        types.float32,
        types.float64,
        types.boolean,
    )
    flat = _ptx.flatten(sig, (a, 7, b, 0.5, 2.0, np.True_))
    want = [
        0,
        0,
        12,
        4,
        a.ctypes.data,
        3,
        4,
        16,
        4,
        7,
        0,
        0,
        b.size,
        8,
        b.ctypes.data,
        *b.shape,
        *b.strides,
        0.5,
        2.0,
        True,
    ]
    assert list(flat) == want
    assert [type(x) for x in flat[-3:]] == [float, float, bool]
    assert b.strides[1] < 0 and flat[10 + 5 + 3 + 1] == b.strides[1]
    # the parameter block: one 8-byte slot per parameter, each value at the start of its slot
    fmt = _ptx.param_format(sig)
    assert struct.calcsize(fmt) == 8 * len(want)
    block = struct.pack(fmt, *flat)
    slots = [block[8 * i : 8 * i + 8] for i in range(len(want))]
    assert struct.unpack("<Q", slots[4])[0] == a.ctypes.data
    assert struct.unpack("<q", slots[10 + 5 + 4])[0] == b.strides[1]
    assert struct.unpack("<f", slots[-3][:4])[0] == 0.5 and slots[-3][4:] == bytes(4)
    assert struct.unpack("<d", slots[-2])[0] == 2.0
    assert slots[-1] == b"\x01" + bytes(7)
    assert _ptx.slot_ptx_types(sig) == _ptx_types(sig)
    # a UniTuple (the address kernel's addresses) is one parameter per member
    tsig = (types.int64, types.UniTuple(types.uint64, 3))
    assert _ptx.flatten(tsig, (5, (1 << 63, 2, 3))) == (5, 1 << 63, 2, 3)
    # a float32 scalar beyond float32's range becomes inf (not an error), as a NumPy scalar did
    fsig = (types.float32,)
    with pytest.warns(RuntimeWarning, match="overflow"):
        big = _ptx.flatten(fsig, (1e39,))
    assert struct.unpack("<f4x", struct.pack(_ptx.param_format(fsig), *big))[0] == np.inf
    assert _ptx.param_format(tsig) == "<qQQQ" and _ptx.slot_ptx_types(tsig) == [".u64"] * 4
    with pytest.raises(ValueError, match="2 members, the kernel 3"):
        _ptx.flatten(tsig, (5, (1, 2)))


def test_the_cupy_api_the_launcher_relies_on():
    """What `PtxKernel` uses of CuPy, checked without a GPU: RawModule.get_function returns a
    RawKernel (no handle of its own), whose `kernel` is the loaded cupy.cuda.Function with the
    CUfunction handle `ptr`; the driver's launchKernel takes (f, grid xyz, block xyz, shared
    memory, stream, kernelParams, extra). A launcher written against another shape of this API
    failed on every launch."""
    cupy = pytest.importorskip("cupy")
    from cupy.cuda import function
    from cupy_backends.cuda.api import driver

    assert "ptr" in function.Function.__dict__  # a public cdef attribute: the CUfunction
    assert "kernel" in cupy.RawKernel.__dict__ and not hasattr(cupy.RawKernel, "ptr")
    sig = driver.launchKernel.__doc__.split("(", 1)[1].split(")", 1)[0]
    names = [a.split()[-1] for a in sig.split(",")]
    assert names == [
        "f",
        "grid_dim_x",
        "grid_dim_y",
        "grid_dim_z",
        "block_dim_x",
        "block_dim_y",
        "block_dim_z",
        "shared_mem_bytes",
        "stream",
        "kernel_params",
        "extra",
    ]


def test_flatten_refuses_what_it_cannot_pass():
    with pytest.raises(ValueError, match="2 dimensions, the kernel 1"):
        _ptx.flatten((_ptx.array_type(np.float64, 1),), (np.zeros((2, 2)),))
    with pytest.raises(TypeError, match="cannot pass a list"):
        _ptx.flatten((_ptx.array_type(np.float64, 1),), ([1.0],))
    with pytest.raises(TypeError, match="no launcher"):
        _ptx.flatten((types.complex128,), (1j,))


def test_entry_params_reads_the_parameter_list():
    ptx = """.version 8.5
.target sm_90
.visible .entry _Z3fooPf(
	.param .u64 _Z3fooPf_param_0,
	.param .f64 _Z3fooPf_param_1,
	.param .u8 _Z3fooPf_param_2
)
{
	.reg .b32 %r<2>;
	ret;
}"""
    assert _ptx.entry_params(ptx) == [".u64", ".f64", ".u8"]
    with pytest.raises(ValueError, match="no kernel entry"):
        _ptx.entry_params(".version 8.5\n")


def _ptx_types(argtypes):
    """The PTX parameter types Numba's ABI gives `argtypes` (what flatten must produce)."""
    out = []
    for t in argtypes:
        if isinstance(t, types.Array):
            out += [".u64"] * (5 + 2 * t.ndim)
        elif isinstance(t, types.UniTuple):
            out += _ptx_types([t.dtype]) * t.count
        elif isinstance(t, types.Boolean):
            out.append(".u8")
        elif isinstance(t, types.Float):
            out.append(f".f{t.bitwidth}")
        else:
            out.append(f".u{t.bitwidth}")
    return out


def _fail(ws):
    raise ValueError("a hook that fails")


@pytest.mark.cudasim
def test_each_gemm_call_hands_cublas_a_workspace(rng):
    """The two-GEMM path gives the BLAS a workspace of the call's own on every call and takes it
    back at the end (also when the call fails); the fused path needs none."""
    from gpu_orthol1.testing import EmulatedGpuDevice

    phi = make(np, rng, (5, 6, 4), np.float32, "C", 1)
    dev = EmulatedGpuDevice()
    p = _plan.Plan(phi, 0.5, backend="numpy", _device=dev)
    p(phi)
    p(phi)
    got = dev.blas_workspaces
    assert len(got) == 4 and got[1] is None and got[3] is None  # handed over, then released
    assert got[0].nbytes == got[2].nbytes == dev.blas_workspace_bytes
    with pytest.raises(ValueError):  # released on the way out of a failing call too
        _plan.execute(p, phi, None, False, 0.5, True, gram_hook=_fail)
    assert len(got) == 6 and got[5] is None
    fdev = EmulatedGpuDevice()
    pf = _plan.Plan(phi, 0.5, backend="numpy", kernel="fused", _device=fdev)
    pf(phi)
    assert fdev.blas_workspaces == []


@pytest.mark.gpu
def test_gpu_ptx_parameters_match_the_flattening(rng):
    """Every kernel compiled for PTX launch (the two-GEMM path's one-block and split passes, the fused
    kernel, the loss reduction, the address kernel; several dtypes) takes exactly the parameters
    `flatten` passes, in the slots `param_format` lays out."""
    import cupy

    for shape, dt in (((9, 5, 7), np.float32), ((9, 5, 100), np.float16), ((6, 3, 5), np.float64)):
        phi = make(cupy, rng, shape, dt, "C", 1)
        ol1.plan(phi, 0.5, kernel="gemm")(phi)  # n = 100: the split sign pass
    for shape, dt in (((9, 5, 7), np.float32), ((9, 5, 96), np.float16), ((6, 3, 5), np.float64)):
        phi = make(cupy, rng, shape, dt, "C", 1)
        ol1.plan(phi, 0.5, kernel="fused")(phi)  # n = 96: the 16 x 16 grid
    from gpu_orthol1._cupy import CupyDevice

    dev = CupyDevice()  # the pointer-array GEMMs' address kernel: 300 addresses, three launches
    dev.bind()
    ptrs = (np.arange(300, dtype=np.uint64) * 8 + (1 << 40)).reshape(3, 100)
    buf = cupy.zeros(300, dtype=cupy.uint64)
    dev._fill_addresses(buf, ptrs)
    assert (buf.get() == ptrs.ravel()).all()
    assert len(_ptx._cache) >= 6
    for kern in _ptx._cache.values():
        assert _ptx.entry_params(kern.ptx) == _ptx_types(kern.argtypes) == _ptx.slot_ptx_types(kern.argtypes)


class _CheckedLaunch:
    """Stands in for `_ptx.PtxKernel` on a CPU: each launch packs its arguments exactly as the real
    launcher would (`flatten` + the `param_format` block: a wrong count, dimension or value range
    fails here), then runs the kernel under numba's simulator."""

    launches: list = []

    def __init__(self, dispatcher, argtypes):
        self.dispatcher, self.argtypes = dispatcher, tuple(argtypes)

    def launch(self, stream_ptr, grid, block, *args):
        import struct

        assert isinstance(stream_ptr, int) and isinstance(grid, int) and isinstance(block, int)
        struct.pack(_ptx.param_format(self.argtypes), *_ptx.flatten(self.argtypes, args))
        self.launches.append((self.dispatcher, grid, block))
        self.dispatcher[grid, block](*args)

    def __call__(self, grid, block, *args):
        self.launch(0, int(grid), int(block), *args)

    def launch_params(self, stream_ptr, grid, block, params_ptr):
        """A `_ptx.BoundLaunch`'s launch: read the arguments back out of its parameter block, as
        the kernel would (arrays from their address, shape and strides), then run the kernel."""
        import ctypes
        import struct

        from gpu_orthol1.testing import host_view

        assert isinstance(stream_ptr, int) and isinstance(grid, int) and isinstance(block, int)
        fmt = _ptx.param_format(self.argtypes)
        slots = (ctypes.c_void_p * (struct.calcsize(fmt) // 8)).from_address(params_ptr)
        vals = list(struct.unpack(fmt, b"".join(ctypes.string_at(a, 8) for a in slots)))
        args = []
        for ty in self.argtypes:
            if isinstance(ty, types.Array):
                meminfo, parent, size, isz, data = vals[:5]
                shape, strides = tuple(vals[5 : 5 + ty.ndim]), tuple(vals[5 + ty.ndim : 5 + 2 * ty.ndim])
                del vals[: 5 + 2 * ty.ndim]
                dt = np.dtype(str(ty.dtype))
                assert meminfo == parent == 0 and size == int(np.prod(shape)) and isz == dt.itemsize
                args.append(host_view(data, shape, strides, dt))
            else:
                args.append(vals.pop(0))
        assert not vals
        self.launches.append((self.dispatcher, grid, block))
        self.dispatcher[grid, block](*args)


@pytest.mark.cudasim
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_cupy_devices_own_launch_code_on_the_simulator(monkeypatch, reduction, rng):
    """CupyDevice's sign pass (one-block and split), loss reduction and address kernel launches, its
    own code (signatures, argument lists, grids), with only the launcher swapped for one that packs
    the parameter block as on a card and runs the kernel under the simulator; results against the
    float64 reference, and the grouped path's addresses against the matrices'."""
    from gpu_orthol1._cupy import CupyDevice
    from gpu_orthol1.testing import EmulatedGpuDevice

    from .reference import check

    class RealLaunches(EmulatedGpuDevice):
        sign_abs = CupyDevice.sign_abs
        _sign_abs_split = CupyDevice._sign_abs_split
        loss_total = CupyDevice.loss_total
        _fill_addresses = CupyDevice._fill_addresses

        def __init__(self):
            super().__init__()
            self._launch = {}
            self._i64, self._f64, self._bool = types.int64, types.float64, types.boolean
            self._max_block = 1024  # the card's: CupyDevice.sign_parts splits above n = 90
            self._stream_ptr = 0

    monkeypatch.setattr(_ptx, "kernel", _CheckedLaunch)
    _CheckedLaunch.launches.clear()
    for shape in ((5, 3, 7), (3, 2, 91)):  # one-block pass; split pass (5 parts of 256 threads)
        phi = make(np, rng, shape, np.float32, "C", 1)
        p = _plan.Plan(phi, 0.7, reduction=reduction, backend="numpy", _device=RealLaunches())
        loss, grad = p(phi)
        check(phi, loss, grad, 0.7, 1, reduction, np.float32)
    kinds = {d.py_func.__name__ for d, _, _ in _CheckedLaunch.launches}
    assert {"sign_abs_sum", "sign_abs_part", "sign_abs_finish", "loss_total"} <= kinds

    dev = RealLaunches()
    ptrs = (np.arange(3 * 50, dtype=np.uint64) * 8 + (1 << 40)).reshape(3, 50)
    addrs = np.zeros(200, np.uint64)
    dev._fill_addresses(addrs, ptrs)  # 150 addresses: two launches of 128 slots
    assert (addrs[:150] == ptrs.ravel()).all() and not addrs[150:].any()
    assert sum(d.py_func.__name__ == "fill_addresses" for d, _, _ in _CheckedLaunch.launches) == 2


@pytest.mark.cudasim
def test_cupy_devices_fused_launch_on_the_simulator(monkeypatch, rng):
    """CupyDevice.fused's own launch (its signature with any-layout arrays and the accumulator's
    float type, its arguments) through the checking launcher, on slices-first contiguous input."""
    from gpu_orthol1._cupy import CupyDevice
    from gpu_orthol1.testing import EmulatedGpuDevice

    from .reference import check

    class RealFused(EmulatedGpuDevice):
        fused_launcher = CupyDevice.fused_launcher

        def __init__(self):
            super().__init__()
            self._launch = {}
            self._i64, self._f64, self._bool = types.int64, types.float64, types.boolean
            self._stream_ptr = 0

    monkeypatch.setattr(_ptx, "kernel", _CheckedLaunch)
    _CheckedLaunch.launches.clear()
    for dt in (np.float32, np.float64):
        phi = make(np, rng, (4, 6, 5), dt, "C", 0)  # axis=0: slice i is phi[i], contiguous
        p = _plan.Plan(phi, 0.4, axis=0, backend="numpy", kernel="fused", _device=RealFused())
        loss, grad = p(phi)
        check(phi, loss, grad, 0.4, 0, "sum", dt)
        # the kept launcher again: new arrays (other addresses, same layouts), only those repacked
        phi2 = make(np, rng, phi.shape, dt, "C", 0)
        assert phi2.ctypes.data != phi.ctypes.data
        out = make(np, rng, phi.shape, dt, "C", 0)
        loss, grad = p(phi2, out=out)
        assert grad is out
        check(phi2, loss, grad, 0.4, 0, "sum", dt)
        assert len(p._gpu.launchers) == 1
        # out in another layout: a launcher of its own, the first one kept
        fout = np.asfortranarray(make(np, rng, phi.shape, dt, "C", 0))
        loss, grad = p(phi, out=fout)
        assert grad is fout
        check(phi, loss, grad, 0.4, 0, "sum", dt)
        assert len(p._gpu.launchers) == 2
    assert [d.py_func.__name__ for d, _, _ in _CheckedLaunch.launches].count("fused_ortho_l1") == 6


def test_cap_registers_goes_after_the_entrys_parameters():
    ptx = ".version 8.5\n.visible .entry k(\n\t.param .u64 a,\n\t.param .f32 b\n)\n{\n\tret;\n}\n"
    capped = _ptx.cap_registers(ptx, 112)
    assert capped == ptx.replace("\t.param .f32 b\n)\n", "\t.param .f32 b\n)\n.maxnreg 112\n\n")
    assert _ptx.entry_params(capped) == [".u64", ".f32"]
    assert _ptx.cap_registers(ptx, None) == _ptx.cap_registers(ptx, 0) == ptx
    assert _ptx.cap_registers(capped, 96) == capped.replace(".maxnreg 112", ".maxnreg 96")  # one directive
    with pytest.raises(ValueError, match="no kernel entry"):
        _ptx.cap_registers(".version 8.5\n", 96)


def test_bound_launch_repacks_only_what_varies():
    """A `BoundLaunch`'s parameter block after a call equals the one `flatten` packs for the new
    arguments: addresses and scalars replaced in their slots, everything else as first bound."""
    import ctypes
    import struct

    sig = (
        _ptx.array_type(np.float32, 3, "A"),
        _ptx.array_type(np.float64, 1),
        types.int64,
        types.float32,
        types.boolean,
    )
    a = np.zeros((3, 4, 5), np.float32)[:, ::-1]  # negative strides
    ls = np.zeros(3)
    seen = []

    class Kern:
        argtypes = sig

        def launch_params(self, stream_ptr, grid, block, params_ptr):
            n = struct.calcsize(_ptx.param_format(sig)) // 8
            slots = (ctypes.c_void_p * n).from_address(params_ptr)
            seen.append((stream_ptr, grid, block, b"".join(ctypes.string_at(p, 8) for p in slots)))

    bound = _ptx.BoundLaunch(Kern(), 3, 64, (a, ls, 9, 0.0, False), variable=(0, 1, 3, 4))
    b, ls2 = np.ones((3, 4, 5), np.float32)[:, ::-1], np.ones(3)
    bound.launch(7, b.ctypes.data, ls2.ctypes.data, 0.1, np.True_)
    want = struct.pack(_ptx.param_format(sig), *_ptx.flatten(sig, (b, ls2, 9, 0.1, True)))
    assert seen == [(7, 3, 64, want)]
    assert struct.unpack("<f", want[-16:-12])[0] == np.float32(0.1)  # float32 packing, as flatten's
    with pytest.raises(ValueError, match="3 arguments"):
        _ptx.BoundLaunch(Kern(), 1, 1, (a, ls, 9), variable=(0,))
    with pytest.raises(ValueError, match="3 values for 4 variable arguments"):
        bound.launch(7, b.ctypes.data, ls2.ctypes.data, 0.1)
    with pytest.raises(ValueError, match="twice"):
        _ptx.BoundLaunch(Kern(), 1, 1, (a, ls, 9, 0.0, False), variable=(0, 0))
    assert len(seen) == 1
