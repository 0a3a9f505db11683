"""Many separate matrices of one slice shape in ONE batched GEMM: pointer-array plans as plain ints.

`_gemm` describes a strided-batched call, which needs every matrix at a fixed
stride from the first: true of the slices of one array, not of a model's
separate parameter tensors. cuBLAS's pointer-array call (``?gemmBatched``)
takes a device array of addresses instead, one per matrix, with one leading
dimension for all: so a group is matrices of one (l, n), one dtype and one
memory layout (kind, ld), and each batch entry is (buffer, element offset).

The per-matrix arguments are those of `_gemm.gram_call` / `_gemm.grad_call`
for a single slice (the same layout algebra, not a second copy of it); only
the operand addresses differ per entry. `pointer_arrays` turns a plan into
the three address arrays the GPU receives; `emulate_pointer_gemm` executes
those very addresses over NumPy buffers (so the address arithmetic is tested
on a CPU), and `numpy_batched_gemm` runs the plan directly (the CPU backend).
`run_group` is the grouped twin of `_driver.run`: Gram GEMM -> fused sign
pass (the core's kernels, through the device's `sign_abs`) -> gradient GEMM,
chunked by the workspace budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import _driver, _gemm
from ._numpy_dev import numpy_gemm


@dataclass(frozen=True)
class Ref:
    buf: Any  # key of the buffer in the `bufs` dict (hashable)
    offset: int  # elements from the buffer's first element


@dataclass(frozen=True)
class BatchedGemm:
    """C_e = alpha * op(A_e) @ op(B_e) + beta * C_e for every entry e; column-major, one ld per operand."""

    template: _gemm.Gemm  # the single-matrix call (batch=1): ops, sizes, alpha, beta, leading dims
    a: tuple[Ref, ...]
    b: tuple[Ref, ...]
    c: tuple[Ref, ...]

    @property
    def batch(self) -> int:
        return len(self.c)

    def entry(self, e: int) -> _gemm.Gemm:
        """Entry e as a one-matrix strided call (what the emulators execute)."""
        t = self.template
        return replace(
            t,
            a=_gemm.Operand(self.a[e].buf, self.a[e].offset, t.a.ld, 0),
            b=_gemm.Operand(self.b[e].buf, self.b[e].offset, t.b.ld, 0),
            c=_gemm.Operand(self.c[e].buf, self.c[e].offset, t.c.ld, 0),
            batch=1,
        )


def slice_layout(l: int, n: int, sl: int, sn: int) -> _gemm.Layout | None:
    """(kind, ld) of one (l, n) matrix with element strides (sl, sn), or None when BLAS can't read it."""
    return _gemm.layout((1, l, n), (0, sl, sn))


def gram_batched(lay: _gemm.Layout, phi: Sequence[Ref], ws_first: int, l: int, n: int) -> BatchedGemm:
    """G_e = Phi_e^T Phi_e into ws rows ws_first + e (n x n each)."""
    t = _gemm.gram_call(_gemm.Layout(lay.kind, lay.ld, 0), 0, 1, l, n)
    ws = tuple(Ref("ws", (ws_first + e) * n * n) for e in range(len(phi)))
    return BatchedGemm(t, tuple(phi), tuple(phi), ws)


def grad_batched(lay: _gemm.Layout, phi: Sequence[Ref], lay_out: _gemm.Layout, out: Sequence[Ref],
                 sgn_first: int, l: int, n: int, alpha: float, beta: float) -> BatchedGemm:
    """Out_e = alpha * Phi_e @ S_e + beta * Out_e, S_e in sgn row sgn_first + e."""
    t = _gemm.grad_call(_gemm.Layout(lay.kind, lay.ld, 0), 0, _gemm.Layout(lay_out.kind, lay_out.ld, 0), 0,
                        1, l, n, alpha, beta)
    sgn = tuple(Ref("sgn", (sgn_first + e) * n * n) for e in range(len(phi)))
    if t.a.buf == "sgn":  # out kind "T": Out^T = S Phi^T, S is operand A
        return BatchedGemm(t, sgn, tuple(phi), tuple(out))
    return BatchedGemm(t, tuple(phi), sgn, tuple(out))


def pointer_arrays(call: BatchedGemm, addr: Callable[[Any], int],
                   itemsize: Callable[[Any], int]) -> np.ndarray:
    """(3, batch) uint64: the A, B and C address arrays cuBLAS's pointer-array GEMM reads.

    addr(key) is the address of buffer key's first element, itemsize(key) its element size."""
    out = np.empty((3, call.batch), dtype=np.uint64)
    for row, refs in enumerate((call.a, call.b, call.c)):
        out[row] = [addr(r.buf) + r.offset * itemsize(r.buf) for r in refs]
    return out


def numpy_batched_gemm(call: BatchedGemm, bufs: dict) -> None:
    """The CPU backend: each entry through the core's NumPy GEMM (BLAS per matrix)."""
    for e in range(call.batch):
        numpy_gemm(call.entry(e), bufs)


def emulate_pointer_gemm(call: BatchedGemm, ptrs: np.ndarray, bufs: dict) -> None:
    """Execute a pointer-array GEMM as cuBLAS would: resolve each raw address in `ptrs` back to a
    (NumPy) buffer and element offset, then run that entry. A wrong address fails or misreads here."""
    spans, seen = [], set()
    for key, arr in bufs.items():
        lo = arr.ctypes.data
        hi = lo + max(0, sum((s - 1) * st for s, st in zip(arr.shape, arr.strides) if s)) + arr.itemsize
        if (lo, hi, arr.itemsize) not in seen:  # "sgn" may be "ws" itself (S written in place)
            seen.add((lo, hi, arr.itemsize))
            spans.append((lo, hi, key, arr.itemsize))

    def resolve(p: int) -> Ref:
        hits = [(lo, key, isz) for lo, hi, key, isz in spans if lo <= p < hi]
        if len(hits) != 1:
            raise AssertionError(f"address {p:#x} lies in {len(hits)} buffers")
        lo, key, isz = hits[0]
        if (p - lo) % isz:
            raise AssertionError(f"address {p:#x} is not element-aligned in buffer {key!r}")
        return Ref(key, (p - lo) // isz)

    t = call.template
    for e in range(call.batch):
        a, b, c = (resolve(int(ptrs[r, e])) for r in range(3))
        numpy_gemm(replace(t, a=_gemm.Operand(a.buf, a.offset, t.a.ld, 0),
                           b=_gemm.Operand(b.buf, b.offset, t.b.ld, 0),
                           c=_gemm.Operand(c.buf, c.offset, t.c.ld, 0), batch=1), bufs)


@dataclass
class Item:
    """One matrix of a group: its operand in phi and (when a gradient is wanted) in out."""

    phi: Ref
    out: Ref | None


def run_group(dev, items: Sequence[Item], bufs: dict, *, l: int, n: int, dtype, lay: _gemm.Layout,
              lay_out: _gemm.Layout | None, alpha: float, beta_gemm: float, want_grad: bool,
              losses, loss_offset: int, budget: int, alloc: Callable) -> None:
    """Losses of the group's matrices into losses[loss_offset:...] (float64, unscaled by beta), and
    alpha * Phi S (+ beta_gemm * out) into each item's out when want_grad.

    dev: a core device (its acc/sign dtypes, folds_alpha and `sign_abs`) with a `gemm_batched(call,
    bufs)`; alloc(shape, numpy dtype) makes its workspaces. bufs holds the caller's operands and gets
    "ws"/"sgn" added."""
    m = len(items)
    if m == 0 or n == 0:
        return
    dtype = np.dtype(dtype)
    acc = np.dtype(dev.acc_dtype(dtype))
    sgd = np.dtype(dev.sign_dtype(dtype))
    separate_sgn = want_grad and sgd != acc
    extra = dev.extra_bytes_per_slice(l, n, dtype, want_grad, beta_gemm != 0)
    chunk, _ = _driver.plan_chunks(m, l, n, dtype.itemsize, acc.itemsize, sgd.itemsize if separate_sgn else 0,
                                   False, False, extra, budget)
    ws = alloc((chunk, n * n), acc)
    sgn = alloc((chunk, n * n), sgd) if separate_sgn else ws
    bufs["ws"], bufs["sgn"] = ws, sgn
    if dev.folds_alpha:  # as in _driver.run: CPU scales S in the sign pass, GPU in the GEMM
        scale, gemm_alpha = alpha, 1.0
    else:
        scale, gemm_alpha = 1.0, alpha
    for s0 in range(0, m, chunk):
        part = items[s0:s0 + chunk]
        cc = len(part)
        phis = [it.phi for it in part]
        if l == 0:
            ws[:cc] = 0
        else:
            dev.gemm_batched(gram_batched(lay, phis, 0, l, n), bufs)
        dev.sign_abs(ws[:cc], sgn[:cc], n, losses, loss_offset + s0, scale, want_grad)
        if want_grad and l:
            outs = [it.out for it in part]
            assert lay_out is not None and all(o is not None for o in outs)
            dev.gemm_batched(grad_batched(lay, phis, lay_out, outs, 0, l, n, gemm_alpha, beta_gemm),  # type: ignore[arg-type]
                             bufs)


class NumpyGroupedDevice:
    """Mixin: the CPU backend's grouped GEMM (used with `_numpy_dev.NumpyDevice`)."""

    gemm_batched = staticmethod(numpy_batched_gemm)


class EmulatedPointerMixin:
    """Mixin for `_numpy_dev.EmulatedGpuDevice`: the GPU's pointer arrays, executed over NumPy buffers."""

    calls = 0

    def gemm_batched(self, call: BatchedGemm, bufs: dict) -> None:
        self.calls += 1
        ptrs = pointer_arrays(call, lambda k: bufs[k].ctypes.data, lambda k: bufs[k].itemsize)
        emulate_pointer_gemm(call, ptrs, bufs)


def make_numpy_device(emulated: bool = False):
    """A device for `run_group` on NumPy buffers: the CPU backend, or the GPU path's logic emulated."""
    from ._numpy_dev import EmulatedGpuDevice, NumpyDevice

    if emulated:
        cls = type("EmulatedGroupedDevice", (EmulatedPointerMixin, EmulatedGpuDevice), {})
    else:
        cls = type("NumpyGroupedDevice", (NumpyGroupedDevice, NumpyDevice), {})
    return cls()


_PTR_CACHE_MAX = 64


class CupyGroupedDevice:
    """The GPU's grouped GEMM: one cuBLAS ?gemmBatched call (pointer arrays) per plan.

    Built around a `_cupy.CupyDevice` (its cuBLAS handle, bound to CuPy's current stream, and its
    fused kernel). Buffers are torch CUDA tensors (or CuPy arrays). cupy_backends exposes the
    pointer-array GEMM only as sgemmBatched/dgemmBatched (no gemmBatchedEx), so all three operands
    must share float32 or float64; callers send float16 groups through the core one tensor at a time.
    The address arrays are uploaded from pinned memory without a host sync, and cached by content
    (parameters keep their addresses between steps)."""

    def __init__(self, core_dev, torch_device, cache: dict):
        self._dev = core_dev
        self._tdev = torch_device
        self._cache = cache
        self.folds_alpha = core_dev.folds_alpha
        self.acc_dtype = core_dev.acc_dtype
        self.sign_dtype = core_dev.sign_dtype
        self.extra_bytes_per_slice = core_dev.extra_bytes_per_slice
        self.sign_abs = core_dev.sign_abs

    @staticmethod
    def supports(dtype) -> bool:
        return np.dtype(dtype) in (np.dtype(np.float32), np.dtype(np.float64))

    def _upload(self, ptrs: np.ndarray):
        import torch

        # keyed by stream too: an upload queued on another stream may not have run yet
        key = (str(self._tdev), torch.cuda.current_stream(self._tdev).cuda_stream, ptrs.shape, ptrs.tobytes())
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if len(self._cache) >= _PTR_CACHE_MAX:
            self._cache.clear()
        host = torch.from_numpy(ptrs.view(np.int64)).pin_memory()
        # non_blocking from pinned memory: no host sync; torch's host allocator keeps `host` alive
        # until the copy on the current stream has run.
        dev = host.to(self._tdev, non_blocking=True)
        self._cache[key] = dev
        return dev

    def gemm_batched(self, call: BatchedGemm, bufs: dict) -> None:
        cb = self._dev._cublas
        c0 = bufs[call.c[0].buf]
        dt = _np_dtype(c0)
        scal: type[np.floating]
        if dt == np.dtype(np.float32):
            fn, scal = cb.sgemmBatched, np.float32
        elif dt == np.dtype(np.float64):
            fn, scal = cb.dgemmBatched, np.float64
        else:
            raise TypeError(f"the pointer-array GEMM takes float32 or float64 operands, not {dt}")
        ptrs = pointer_arrays(call, lambda k: _addr(bufs[k]), lambda k: _np_dtype(bufs[k]).itemsize)
        dptr = self._upload(ptrs)
        base = dptr.data_ptr()
        bs = 8 * call.batch
        t = call.template
        alpha = np.array(t.alpha, dtype=scal)
        beta = np.array(t.beta, dtype=scal)
        handle = self._dev._handle
        mode = cb.getPointerMode(handle)
        if mode != 0:
            cb.setPointerMode(handle, 0)  # host scalars
        try:
            fn(handle, t.transa, t.transb, t.m, t.n, t.k, alpha.ctypes.data, base, t.a.ld,
               base + bs, t.b.ld, beta.ctypes.data, base + 2 * bs, t.c.ld, call.batch)
        finally:
            if mode != 0:
                cb.setPointerMode(handle, mode)


def _addr(x) -> int:
    if hasattr(x, "data_ptr"):  # torch tensor
        return int(x.data_ptr())
    return int(x.data.ptr)  # CuPy


_TORCH_NP = {"torch.float16": np.float16, "torch.float32": np.float32, "torch.float64": np.float64}


def _np_dtype(x) -> np.dtype:
    d = x.dtype
    if isinstance(d, np.dtype):
        return d
    return np.dtype(_TORCH_NP[str(d)])
