"""How a plan cuts its arrays: the slices-first view and the layouts BLAS reads (`Slices`), and the
chunking of each kind of call under the workspace budget (`Chunking`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from . import _cpu_pool, _driver, _gemm, _penalty
from ._device import Device

_PERMS = {0: (0, 1, 2), 1: (1, 0, 2), 2: (2, 0, 1)}  # slice axis -> the (m, l, n) view's axes


class Slices:
    """The (m, l, n) slices-first view of arrays of one shape (a 2-D shape is one slice) and the
    layout BLAS reads phi's view in (None: staged; when the GPU computes a NumPy input it reads a
    C-contiguous device copy, whose layout is not known here)."""

    def __init__(self, phi: Any, axis: int):
        self.squeeze = phi.ndim == 2  # one slice; axis has nothing to index
        shape3 = phi.shape if not self.squeeze else (phi.shape[0], 1, phi.shape[1])
        self.perm = _PERMS[axis]
        self.m, self.l, self.n = (int(shape3[i]) for i in self.perm)
        self.lay_phi: _gemm.Layout | None = None
        self._stage_far_rows = False

    def fix_layout(self, phi: Any, host_in: bool, stage_far_rows: bool) -> _gemm.Layout | None:
        """Fix phi's layout (once the device is known; host_in: a NumPy phi the GPU computes) and
        whether short gradient rows far apart go through a buffer (the CPU); returns the layout."""
        self.lay_phi = None if host_in else _driver.layout_of(self.view(phi))
        self._stage_far_rows = stage_far_rows
        return self.lay_phi

    def view(self, a: Any) -> Any:
        """The (m, l, n) slices-first view of an array shaped like phi."""
        if self.squeeze:
            a = a[:, None, :]
        return a.transpose(self.perm)

    def batch(self, p: Any, grad: Any, out: Any, want_grad: bool) -> _driver.Strided:
        """The strided batch of a GEMM-path call: views and the layouts BLAS reads (None: staged)."""
        V = self.view(p)
        lay_phi: _gemm.Layout | None
        lay_out: _gemm.Layout | None
        if self.m == 0 or self.n == 0 or self.l == 0:  # nothing for BLAS to read: any layout will do
            Vout = self.view(grad) if want_grad else None
            lay_phi = lay_out = _gemm.Layout("T", self.n, 0)
        elif want_grad:
            Vout = self.view(grad)
            if out is None and self.lay_phi is not None:
                lay_out = self.lay_phi if grad.strides == p.strides else _driver.layout_of(Vout)
                lay_phi = self.lay_phi
            else:
                lay_phi, lay_out = _driver.staging(V, Vout, True)
            if (
                lay_out is not None
                and self._stage_far_rows
                and _cpu_pool.far_rows(lay_out, self.n, grad.dtype.itemsize)
            ):
                lay_out = None  # written through the chunk buffer: faster here, and no CopyWarning
        else:
            Vout = None
            lay_phi = self.lay_phi
            if lay_phi is None:
                lay_phi, _ = _driver.staging(V, None, False)
            lay_out = None
        return _driver.Strided(V, Vout, lay_phi, lay_out)


class Chunking:
    """Slices per chunk and workspace sizes of each kind of call, decided on its first call."""

    def __init__(
        self,
        dev: Device,
        slices: Slices,
        dtype: Any,
        variant: _penalty.Variant,
        budget: int,
        phi_chunk_bytes: int = 0,
    ):
        """phi_chunk_bytes > 0 (the CPU, `_cpu_pool.CPU_CHUNK_PHI_BYTES`): calls without a Gram hook
        take at most as many slices per chunk as fit this many bytes of phi (one slice at least)."""
        self._dev, self._s, self._dtype, self._variant, self._budget = dev, slices, dtype, variant, budget
        self._phi_chunk_bytes = phi_chunk_bytes
        self.tri = 0  # the triangle Gram's block size (`_triangle.pick`), set by the plan
        self.sizes: dict[tuple, tuple[_driver.Sizes, int]] = {}

    def sizes_for(
        self,
        want_grad: bool,
        accumulate: bool,
        stage_phi: bool,
        stage_out: bool,
        threads: int,
        *,
        hooked: bool,
    ) -> tuple[_driver.Sizes, int]:
        """(sizes, threads): the chunking of a call, and how many threads share the slices.
        hooked: the call has a Gram hook, whose chunks keep the budget's size (the distributed
        entry points agree on them across ranks through `chunk_for`)."""
        key = (want_grad, accumulate, stage_phi, stage_out, threads, hooked)
        hit = self.sizes.get(key)
        if hit is None:
            s = self._s

            def sizes(budget: int) -> _driver.Sizes:
                return _driver.sizes(
                    self._dev,
                    s.m,
                    s.l,
                    s.n,
                    self._dtype,
                    want_grad=want_grad,
                    accumulate=accumulate,
                    stage_phi=stage_phi,
                    stage_out=stage_out,
                    budget=budget,
                    variant=self._variant,
                    tri=self.tri,
                )

            if threads > 1:  # the budget bounds the call: each thread's chunk gets its share
                try:
                    hit = (sizes(type(self._budget)(max(1, self._budget // threads))), threads)
                except MemoryError:  # a share holds no slice: the whole budget, one thread
                    pass
            if hit is None:
                hit = (sizes(self._budget), 1)
            if self._phi_chunk_bytes and not hooked:
                sz = hit[0]
                cap = max(1, self._phi_chunk_bytes // max(1, s.l * s.n * sz.acc_dtype.itemsize))
                if cap < sz.chunk:
                    hit = (dataclasses.replace(sz, chunk=cap), hit[1])
            self.sizes[key] = hit
        return hit

    def chunk_for(self, want_grad: bool, accumulate: bool = False) -> int:
        """Slices per chunk of a call (readable layouts, no thread split)."""
        return self.sizes_for(want_grad, bool(accumulate), False, False, 1, hooked=True)[0].chunk
