"""The one chunk loop behind every entry point: Gram GEMM, fused sign pass, gradient GEMM.

A batch of slices comes in one of two forms, and the loop serves both:

- `Strided`: the slices of one (m, l, n) view, slice i at a fixed stride from slice 0 (the core
  API's arrays). Layouts BLAS cannot read are staged chunk by chunk through a C-contiguous buffer.
- `Pointers`: separate (l, n) matrices of one dtype and layout, one address each (a model's
  parameters, `OrthoL1`).

A *device* supplies the array module and the primitives over a chunk of either form:

- ``prepare(src, cc)``: what the GEMMs read for this chunk (the CPU casts float16 to float32 here);
- ``gram(src, cc, ws)`` and ``grad(src, dst, cc, sgn, alpha, beta)``;
- ``sign_abs(ws, sgn, n, losses, offset, scale, write_s, variant, partials)``: the fused elementwise
  pass (`variant`: which member of the penalty family, `_penalty.Variant`; it writes the matrix M
  the gradient GEMM multiplies, S = sign(G - I) for the default L1 loss);
- ``sign_parts(n, variant)``: into how many parts the pass cuts one slice (the GPU splits large
  slices over several blocks; `partials` is then a (count, parts) float64 buffer for their sums);
- ``blas_workspace_bytes`` and ``set_blas_workspace(buf)``: a workspace of the call's own for the
  BLAS (the GPU: so that cuBLAS never allocates while a CUDA graph is being captured).

Devices: `_numpy_dev.NumpyDevice` (NumPy matmul on the views + the Numba CPU pass) and
`_cupy.CupyDevice` (cuBLAS + the Numba CUDA kernel); `gpu_orthol1.testing.EmulatedGpuDevice`
runs the GPU device's cuBLAS argument sets over NumPy buffers and its kernel under numba's
simulator, so CI checks the GPU path's logic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import _backends, _dtypes, _gemm
from ._penalty import DEFAULT, Variant

if TYPE_CHECKING:
    from ._device import Device


class CopyWarning(UserWarning):
    """An operand's memory layout forces gpu_orthol1 to copy data (chunk by chunk)."""


def layout_of(arr: Any) -> _gemm.Layout | None:
    """The layout BLAS reads an (m, l, n) view in, or None where it cannot read it in place."""
    es = _gemm.element_strides(arr.dtype.itemsize, arr.strides)
    return None if es is None else _gemm.layout(arr.shape, es)


class MetricsHook:
    """A `gram_hook` that records per-slice metrics of the Grams (`_metrics.Collector`). On a device
    with a ``sign_abs_metrics`` pass (the CPU) and the default penalty, the loop hands it the metrics
    buffers of the next slices (`take`) and the device computes them inside its sign pass, reading each
    slice once; elsewhere it is called like any other hook."""

    def __call__(self, ws: Any) -> None:
        raise NotImplementedError

    def take(self, count: int) -> tuple:
        """(max_cos, fro, mean_abs) views for the next `count` slices, and advance past them."""
        raise NotImplementedError


class DefaultBudget(int):
    """A workspace budget nobody asked for: it may grow to one slice instead of refusing the call."""


def plan_chunks(
    m: int,
    l: int,
    n: int,
    itemsize: int,
    acc_itemsize: int,
    sgn_itemsize: int,
    stage_phi: bool,
    stage_out: bool,
    extra: int,
    budget: int,
) -> tuple[int, int]:
    """Slices per chunk and the bytes one slice needs, or MemoryError naming the sizes.

    A budget the caller set (workspace_bytes=, the environment) is a hard limit; the default
    (`DefaultBudget`) always admits one slice, so default arguments never refuse a call."""
    per_slice = n * n * acc_itemsize + extra
    if sgn_itemsize:
        per_slice += n * n * sgn_itemsize
    if stage_phi:
        per_slice += l * n * itemsize
    if stage_out:
        per_slice += l * n * itemsize
    if isinstance(budget, DefaultBudget):
        budget = max(int(budget), per_slice)
    if m and n and per_slice > budget:
        raise MemoryError(
            f"one slice needs {per_slice} bytes of workspace (Gram {n}x{n}, l={l}), more than the "
            f"workspace budget of {budget} bytes; raise workspace_bytes= or GPU_ORTHOL1_WORKSPACE_BYTES"
        )
    return max(1, min(m, budget // max(per_slice, 1))), per_slice


# -- the two forms of a batch ------------------------------------------------------------------


class StridedChunk(NamedTuple):
    """Slices first .. first+count-1 of `arr`, an (m', l, n) view BLAS reads with layout `lay`.
    (A NamedTuple: a frozen dataclass's __init__ costs a microsecond or two per chunk, which small
    CPU calls feel.)"""

    arr: Any
    lay: _gemm.Layout
    first: int


@dataclass(frozen=True)
class PointerChunk:
    """Separate (l, n) matrices, all with layout `lay`; `mats[e]` is an array (CPU) or a tensor.
    `addrs`: the workspace's buffer for the GEMM's device address arrays (GPU), else None."""

    mats: tuple
    lay: _gemm.Layout
    addrs: Any = None


@dataclass
class Strided:
    V: Any  # (m, l, n) view of phi, slices first
    Vout: Any  # (m, l, n) view of the gradient's memory, or None
    lay_phi: _gemm.Layout | None  # None: staged through a C-contiguous chunk buffer
    lay_out: _gemm.Layout | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.V.shape


@dataclass
class Pointers:
    phis: list  # (l, n) matrices
    outs: list | None
    lay: _gemm.Layout
    lay_out: _gemm.Layout | None
    l: int
    n: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.phis), self.l, self.n)


def staging(V: Any, Vout: Any, want_grad: bool) -> tuple[_gemm.Layout | None, _gemm.Layout | None]:
    """(lay_phi, lay_out) of a strided batch, None for an operand BLAS cannot read in place (it is
    then copied chunk by chunk, with one CopyWarning)."""
    m, l, n = V.shape
    if l == 0:  # G = 0, nothing to read or write: any layout will do
        return _gemm.Layout("T", n, 0), _gemm.Layout("T", n, 0)
    lay_phi = layout_of(V)
    lay_out = layout_of(Vout) if want_grad else _gemm.Layout("T", n, 0)
    if lay_phi is None or lay_out is None:
        which = " and ".join(w for w, lay in (("phi", lay_phi), ("out", lay_out)) if lay is None)
        _backends.warn_caller(
            f"gpu_orthol1: the layout of {which} (strides {V.strides if lay_phi is None else Vout.strides} "
            f"bytes for slices, rows, columns) cannot be read by BLAS in place; copying it chunk by chunk",
            CopyWarning,
        )
    return lay_phi, lay_out


@dataclass(frozen=True)
class Sizes:
    """What a chunk of a batch needs, decided once by a plan."""

    chunk: int
    per_slice: int
    acc_dtype: np.dtype
    sgn_dtype: np.dtype | None  # None: S is written over the Gram in place
    stage_phi: bool
    stage_out: bool
    parts: int = 1  # the sign pass's parts per slice (> 1: a "partials" buffer of float64 sums)
    blas_bytes: int = 0  # cuBLAS's workspace for the call (GPU), outside the per-slice budget
    addr_slots: int = 0  # uint64 entries of the "addrs" buffer (GPU pointer-array GEMMs: 3 per slice)


def sizes(
    dev: Device,
    m: int,
    l: int,
    n: int,
    dtype: np.dtype,
    *,
    want_grad: bool,
    accumulate: bool,
    stage_phi: bool,
    stage_out: bool,
    budget: int,
    variant: Variant = DEFAULT,
    pointers: bool = False,
    tri: int = 0,
) -> Sizes:
    """`pointers`: the batch is a `Pointers` one (separate matrices); `tri`: the block size of a
    triangle Gram (`_triangle`), 0 for the full GEMM."""
    acc = np.dtype(dev.acc_dtype(dtype))
    sgd = np.dtype(dev.sign_dtype(dtype))
    separate = want_grad and sgd != acc
    if separate and _dtypes.holds_bf16(sgd) and (variant.penalty == "l2" or variant.normalize):
        raise ValueError(
            f"penalty={variant.penalty!r}, normalize={variant.normalize} needs float16, float32 or float64 "
            "on the GPU (its bfloat16 sign pass writes the L1 signs only); pass float32 parameters"
        )
    parts = dev.sign_parts(n, variant)
    addrs = 3 if pointers and getattr(dev, "fills_addresses", False) else 0  # uint64 A, B, C per slice
    if tri:
        addrs = max(addrs, 3 * ((n // tri) * (n // tri + 1) // 2) + (1 if pointers else 0))
    extra = (
        dev.extra_bytes_per_slice(l, n, dtype, want_grad, accumulate)
        + (8 * parts if parts > 1 else 0)
        + 8 * addrs
    )
    chunk, per_slice = plan_chunks(
        m,
        l,
        n,
        dtype.itemsize,
        acc.itemsize,
        sgd.itemsize if separate else 0,
        stage_phi,
        stage_out,
        extra,
        budget,
    )
    return Sizes(
        chunk,
        per_slice,
        acc,
        sgd if separate else None,
        stage_phi,
        stage_out,
        parts,
        dev.blas_workspace_bytes,
        addrs * chunk,
    )


def workspace(alloc: Callable[..., Any], sz: Sizes, l: int, n: int, dtype: Any) -> dict:
    """The chunk buffers: "ws" (Grams), "sgn" (signs, or ws itself), staging buffers, the sign
    pass's partial sums, the BLAS's workspace and the pointer-array GEMMs' addresses when needed."""
    try:
        ws = alloc((sz.chunk, n * n), sz.acc_dtype)
        bufs = {"ws": ws, "sgn": alloc((sz.chunk, n * n), sz.sgn_dtype) if sz.sgn_dtype is not None else ws}
        if sz.parts > 1:
            bufs["partials"] = alloc((sz.chunk, sz.parts), np.float64)
        if sz.blas_bytes:
            bufs["blas"] = alloc((sz.blas_bytes,), np.uint8)
        if sz.addr_slots:
            bufs["addrs"] = alloc((sz.addr_slots,), np.uint64)
        if sz.stage_phi:
            bufs["phi_stage"] = alloc((sz.chunk, l, n), dtype)
        if sz.stage_out:
            bufs["out_stage"] = alloc((sz.chunk, l, n), dtype)
    except MemoryError as e:  # numpy's and cupy's out-of-memory errors are both MemoryErrors
        raise MemoryError(
            f"could not allocate the workspace: {sz.chunk} slice(s) of {sz.per_slice} bytes (Gram {n}x{n}, "
            f"l={l}, {dtype}); lower workspace_bytes= or free memory ({e})"
        ) from e
    return bufs


def run(
    dev: Device,
    batch: Strided | Pointers,
    wsb: dict,
    chunk: int,
    losses: Any,
    *,
    loss_offset: int = 0,
    alpha: Any,
    beta_gemm: float,
    want_grad: bool,
    gram_hook: Callable[[Any], object] | None = None,
    first: int = 0,
    count: int | None = None,
    variant: Variant = DEFAULT,
    tri: int = 0,
) -> None:
    """Unscaled losses of slices first .. first+count-1 into losses[loss_offset + i] (float64), and
    alpha * Phi S (+ beta_gemm * out) into the gradient when want_grad.

    alpha: a number, or (a GPU device, `Pointers` batches) a 2-entry array in device memory holding
    [alpha, beta_gemm] in the GEMM's dtype, which the gradient GEMM reads when it runs (cuBLAS's device
    pointer mode): a CUDA graph of the call then replays with the values written there last.

    gram_hook(ws), when given, sees each chunk's Grams before the sign pass and may change them in
    place (the distributed entry points sum partial Grams over ranks there). tri > 0: the Grams'
    blocked triangle (`_triangle`, block size tri; the workspace sized with sizes(tri=tri)), never
    with a gram_hook, which would see blocks that were not computed."""
    if tri and gram_hook is not None:
        raise ValueError("a triangle Gram takes no gram_hook")
    m, l, n = batch.shape
    if count is None:
        count = m - first
    if count <= 0 or n == 0:
        return
    blas = wsb.get("blas")
    args = (dev, batch, wsb, chunk, losses, loss_offset, alpha, beta_gemm, want_grad, gram_hook, first, count)
    if blas is None:
        _loop(*args, variant, tri)
        return
    dev.set_blas_workspace(blas)
    try:
        _loop(*args, variant, tri)
    finally:  # the buffer goes back to its allocator: the BLAS must not keep it
        dev.set_blas_workspace(None)


def _buffer_layout(buf: Any) -> _gemm.Layout:
    """The layout of a C-contiguous staging buffer (BLAS always reads those in place)."""
    lay = layout_of(buf)
    assert lay is not None, "a C-contiguous buffer has a BLAS layout"
    return lay


def _head(a: Any, count: int) -> Any:
    """The first `count` rows of a workspace buffer (itself when it has no more: a GPU array's slice
    costs host time on every chunk)."""
    return a if a.shape[0] == count else a[:count]


def _loop(
    dev: Device,
    batch: Any,
    wsb: dict,
    chunk: int,
    losses: Any,
    loss_offset: int,
    alpha: Any,
    beta_gemm: float,
    want_grad: bool,
    gram_hook: Callable[[Any], object] | None,
    first: int,
    count: int,
    variant: Variant,
    tri: int = 0,
) -> None:
    # batch: a Strided or Pointers one (Any: the loop tells them apart by a flag, not isinstance)
    m, l, n = batch.shape
    ws, sgn, partials, addrs = wsb["ws"], wsb["sgn"], wsb.get("partials"), wsb.get("addrs")
    tri_kw = {"tri": tri} if tri else {}  # devices without a triangle Gram never see the keyword
    if not isinstance(batch, Strided) and addrs is None and getattr(dev, "fills_addresses", False):
        raise ValueError(
            "a Pointers batch on this device needs its workspace sized with sizes(..., pointers=True)"
        )
    if dev.folds_alpha:  # scale S in the sign pass (CPU: saves a pass over the gradient)
        scale, gemm_alpha = alpha, 1.0
    else:  # scale in the GEMM (GPU: free, and exact for float16 S)
        scale, gemm_alpha = 1.0, alpha
    strided = isinstance(batch, Strided)
    stage_phi = strided and batch.lay_phi is None
    stage_out = strided and want_grad and batch.lay_out is None
    if stage_phi:
        st_phi = wsb["phi_stage"]
        lay_st_phi = _buffer_layout(st_phi)
    if stage_out:
        st_out = wsb["out_stage"]
        lay_st_out = _buffer_layout(st_out)
    fused_metrics = getattr(dev, "sign_abs_metrics", None) if variant.is_default else None
    if not isinstance(gram_hook, MetricsHook):
        fused_metrics = None
    src: StridedChunk | PointerChunk
    dst: StridedChunk | PointerChunk
    for s0 in range(first, first + count, chunk):
        cc = min(chunk, first + count - s0)
        if strided:
            if stage_phi:
                st_phi[:cc] = batch.V[s0 : s0 + cc]
                src = StridedChunk(st_phi, lay_st_phi, 0)
            else:
                src = StridedChunk(batch.V, batch.lay_phi, s0)
            if want_grad:
                dst = (
                    StridedChunk(st_out, lay_st_out, 0)
                    if stage_out
                    else StridedChunk(batch.Vout, batch.lay_out, s0)
                )
        else:
            src = PointerChunk(tuple(batch.phis[s0 : s0 + cc]), batch.lay, addrs)
            if want_grad:
                dst = PointerChunk(tuple(batch.outs[s0 : s0 + cc]), batch.lay_out, addrs)
        if l == 0:
            ws[:cc] = 0
        else:
            src = dev.prepare(src, cc)
            if tri:
                dev.gram_triangle(src, cc, ws, tri, addrs)  # type: ignore[attr-defined]  # GPU devices
            else:
                dev.gram(src, cc, ws)
        ws_c = _head(ws, cc)
        sgn_c = ws_c if sgn is ws else _head(sgn, cc)
        if fused_metrics is not None:  # the metrics inside the sign pass: one read of each slice
            assert isinstance(gram_hook, MetricsHook)
            fused_metrics(
                ws_c, sgn_c, n, losses, loss_offset + s0 - first, scale, want_grad, *gram_hook.take(cc)
            )
        else:
            if gram_hook is not None:
                gram_hook(ws_c)
            dev.sign_abs(
                ws_c,
                sgn_c,
                n,
                losses,
                loss_offset + s0 - first,
                scale,
                want_grad,
                variant,
                None if partials is None else _head(partials, cc),
                **tri_kw,
            )
        if not want_grad or l == 0:
            continue
        if stage_out:
            dev.grad(src, dst, cc, sgn, gemm_alpha, 0.0)
            if beta_gemm:
                batch.Vout[s0 : s0 + cc] += st_out[:cc]
            else:
                batch.Vout[s0 : s0 + cc] = st_out[:cc]
        else:
            dev.grad(src, dst, cc, sgn, gemm_alpha, beta_gemm)
