"""A plan's GPU side: the per-stream per-slice losses a call writes, and the calls' lock and kept
fused-kernel launchers (`GpuCalls`). `Plan` owns one per GPU plan."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _driver
from ._device import Device, GpuDevice

# A plain call (no alloc=, not under capture) keeps its workspace per stream when it is at most this
# large (cuBLAS's 32 MiB on Hopper included): three to four allocations fewer per call, host time
# the two-GEMM path spends before its first launch. Larger workspaces go back to the pool per call.
GPU_KEEP_WORKSPACE = 64 << 20


class StreamLosses:
    """The per-slice losses of a plan's GPU calls, one array kept per stream (calls on one stream run
    in order, so they may share it; the plan's lock keeps a call's launches together)."""

    MAX_STREAMS = 8  # a caller cycling through streams: keep the newest

    def __init__(self, xp: Any, m: int):
        self._xp, self._m = xp, m
        self._kept: dict[int, tuple[Any, Any]] = {}  # stream address -> (losses, the stream)

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, stream: Any) -> Any:
        """The losses array for a call on `stream` (CuPy's current one, as the device bound it), made
        on the first call there. While the stream captures a graph, a fresh one: a graph replayed on
        another stream would share the kept one with calls there."""
        key = stream.ptr
        # the legacy default stream (0) cannot capture (and asking fails while another stream does)
        if key and stream.is_capturing():
            return self._xp.empty(self._m, dtype=np.float64)
        hit = self._kept.get(key)
        if hit is None:
            if len(self._kept) >= self.MAX_STREAMS:
                self._kept.clear()
            # kept with its stream: while that lives, no other stream has its address
            hit = self._kept[key] = (self._xp.empty(self._m, dtype=np.float64), stream)
        return hit[0]

    def stream_of(self, key: int) -> Any:
        """The stream kept with the losses of stream address `key`."""
        return self._kept[key][1]


class GpuCalls:
    """A plan's GPU calls: the lock that keeps one call's launches together, the per-stream losses
    and the fused kernel's launchers (one per layout of phi, the gradient and the losses: per call
    only the addresses and scalars are packed)."""

    MAX_LAUNCHERS = 8  # a caller cycling through out= layouts: keep the newest

    def __init__(self, dev: Device, m: int, fused_cfg: Any):
        self.dev: GpuDevice = dev  # type: ignore[assignment]  # made only for GPU devices' calls
        self.lock = threading.Lock()
        self.losses = StreamLosses(dev.xp, m)
        self._workspaces: dict[int, tuple] = {}  # stream address -> (sizes, buffers, the stream)
        self.launchers: dict[tuple, Any] = {}  # (phi and gradient layouts, losses strides, want_grad) -> go
        self._cfg = fused_cfg
        # a call's arrays are the device's own kind (torch tensors come as CuPy views): their address
        # without _addr's checks for other kinds
        self._addr: Callable[[Any], int] = (
            (lambda a: a.ctypes.data) if dev.xp is np else (lambda a: a.data.ptr)
        )

    def workspace(
        self, stream: Any, alloc: Callable[[tuple, Any], Any], sz: _driver.Sizes, l: int, n: int, dtype: Any
    ) -> dict:
        """The chunk buffers of a call (`_driver.workspace`): for a plain call on `stream` (None or
        False: a call that allocates its own, torch's or a graph's), the ones kept for this stream
        and these sizes; calls on one stream run in order and the plan's lock keeps a call's
        launches together, so they may share them, as they share their losses (`StreamLosses`)."""
        if not stream or sz.chunk * sz.per_slice + sz.blas_bytes > GPU_KEEP_WORKSPACE:
            return _driver.workspace(alloc, sz, l, n, dtype)
        key = stream.ptr
        if key and stream.is_capturing():  # a graph replayed on another stream must not share them
            return _driver.workspace(alloc, sz, l, n, dtype)
        hit = self._workspaces.get(key)
        if hit is None or hit[0] != sz:
            if len(self._workspaces) >= StreamLosses.MAX_STREAMS:
                self._workspaces.clear()
            hit = self._workspaces[key] = (sz, _driver.workspace(alloc, sz, l, n, dtype), stream)
        return hit[1]

    def fused(
        self,
        view: Callable[[Any], Any],
        p: Any,
        grad: Any,
        losses: Any,
        alpha: float,
        accumulate: bool,
        want_grad: bool,
    ) -> None:
        """Launch the fused kernel; view(a): the plan's slice view of p or grad."""
        # phi's layout is the plan's, but execute() is also called directly (torch, ranks): key on it too
        key = (
            p.strides,
            grad.dtype if want_grad else None,
            grad.strides if want_grad else None,
            losses.strides,
            want_grad,
        )
        go = self.launchers.get(key)
        if go is None:
            if len(self.launchers) >= self.MAX_LAUNCHERS:
                self.launchers.clear()
            go = self.launchers[key] = self.dev.fused_launcher(
                self._cfg, view(p), view(grad) if want_grad else None, losses, want_grad
            )
        addr = self._addr
        pa = addr(p)
        go(pa, addr(grad) if want_grad else pa, addr(losses), alpha, accumulate)
