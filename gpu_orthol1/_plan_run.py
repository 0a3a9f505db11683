"""The running of a plan's call: a `Plan` (`_plan`) decides everything once; the functions here take
it first and run one call with what it decided.

`run` picks the path (the fused kernel, or the GEMMs' chunk loop of `_driver.run` on the GPU or
`_cpu_pool` on the CPU), `reduce` and `reduce_into` turn the per-slice losses into the call's loss.
They read the plan's attributes and change none: a plan may be shared between threads (see `_plan`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _driver, _dtypes

if TYPE_CHECKING:
    from ._plan import Plan

Alloc = Callable[[tuple, Any], Any]
GramHook = Callable[[Any], object]


def run(
    plan: Plan,
    phi: Any,
    out: Any,
    accumulate: Any,
    beta: float,
    want_grad: bool,
    *,
    gram_hook: GramHook | None = None,
    chunk: int | None = None,
    alloc: Alloc | None = None,
    losses: Any = None,
) -> tuple[Any, Any]:
    """(loss, grad) for an array that matches the plan, arguments already checked (`_plan.execute`)."""
    xp = plan._xp
    p = xp.asarray(_carrier(phi, plan._bf16_up)) if plan._host_in else phi
    grad = (
        _new_grad(xp, plan._host_in, p, _carrier(out, plan._bf16_up), accumulate, alloc)
        if want_grad
        else None
    )
    m, n = plan._m, plan._n
    raw = losses is not None
    # a GPU call with something to launch keeps its per-slice losses per stream (`GpuCalls`)
    # and then launches its loss reduction under the plan's lock, so that no other thread's call
    # of this plan writes them in between on the same stream
    keep = bool(not raw and m and n and alloc is None and xp is not np)
    if not raw and not keep:
        losses = xp.zeros(m, dtype=np.float64) if n == 0 else xp.empty(m, dtype=np.float64)
    elif n == 0:
        losses[...] = 0
    if plan._kernel == "fused" and gram_hook is None:
        if not (m and n):
            return _finish(plan, losses, beta, raw, want_grad, grad, out)
        alpha = 2.0 * beta / (m if plan._reduction == "mean" else 1)
        if plan._on_cpu:
            plan._cpu.fused(plan._view, p, grad, losses, alpha, bool(accumulate), want_grad)
            return _finish(plan, losses, beta, raw, want_grad, grad, out)
        with plan._gpu.lock:
            stream = plan._gpu.dev.bind(cublas=False)
            if keep:
                losses = plan._gpu.losses.get(stream)
            plan._gpu.fused(plan._view, p, grad, losses, alpha, bool(accumulate), want_grad)
            return _finish(plan, losses, beta, raw, want_grad, grad, out)
    batch = plan._slices.batch(p, grad, out, want_grad)
    threads = plan._threads if gram_hook is None else 1  # a hook sees the chunks in order
    sz, threads = plan._chunks.sizes_for(
        want_grad,
        bool(accumulate),
        batch.lay_phi is None,
        want_grad and batch.lay_out is None,
        threads,
        hooked=gram_hook is not None,
    )
    if chunk is not None and chunk < sz.chunk:
        sz = dataclasses.replace(sz, chunk=max(1, int(chunk)))
    alpha = 2.0 * beta / (m if plan._reduction == "mean" and m else 1)
    kw: dict[str, Any] = dict(
        alpha=alpha,
        beta_gemm=1.0 if accumulate else 0.0,
        want_grad=want_grad,
        gram_hook=gram_hook,
        variant=plan._variant,
        tri=0 if gram_hook else plan._tri,
    )  # a hook reads whole Grams
    if m and n:
        if xp is np:
            plan._cpu.run(batch, sz, losses, kw, threads)
        else:
            with plan._gpu.lock:
                stream = plan._gpu.dev.bind()
                if keep:
                    losses = plan._gpu.losses.get(stream)
                wsb = plan._gpu.workspace(keep and stream, alloc or plan._alloc, sz, plan._l, n, plan._ddtype)
                _driver.run(plan._dev, batch, wsb, sz.chunk, losses, **kw)
                return _finish(plan, losses, beta, raw, want_grad, grad, out)
    return _finish(plan, losses, beta, raw, want_grad, grad, out)


def _finish(
    plan: Plan, losses: Any, beta: float, raw: bool, want_grad: bool, grad: Any, out: Any
) -> tuple[Any, Any]:
    xp = plan._xp
    loss = None if raw else reduce(plan, losses, beta)
    if not want_grad:
        return loss, None
    if plan._host_in:
        host = xp.asnumpy(grad).view(plan._dtype)  # bfloat16 comes back as its carrier
        if out is not None:
            out[...] = host
            return loss, out
        return loss, host
    return loss, grad


def reduce(plan: Plan, losses: Any, beta: float) -> Any:
    """The call's loss (per the plan's reduction, in its loss dtype) from the unscaled per-slice losses."""
    xp = plan._xp
    if plan._launch_reduce:  # the GPU device (or its emulator): one launch
        each = plan._reduction == "none"
        buf = xp.empty(plan._m if each else 1, dtype=plan._ldt)
        reduce_into(plan, losses, beta, buf)
        loss = buf if each else buf.reshape(())
    elif plan._reduction == "none":
        loss = (losses * beta).astype(plan._ldt)
    else:
        total = losses.sum() * beta
        if plan._reduction == "mean" and plan._m:
            total = total / plan._m
        loss = total.astype(plan._ldt)
    if plan._host_in:
        return xp.asnumpy(loss)
    if xp is np:
        return np.asarray(loss)
    return loss


def reduce_into(plan: Plan, losses: Any, beta: float, buf: Any) -> None:
    """The GPU's loss from the per-slice losses into `buf` (1 entry, or m for reduction="none")."""
    scale = beta / (plan._m if plan._reduction == "mean" and plan._m else 1)
    plan._gpu.dev.loss_total(losses, plan._m, scale, buf, plan._reduction == "none")


def _new_grad(xp: Any, host_in: bool, p: Any, out: Any, accumulate: Any, alloc: Alloc | None) -> Any:
    """Where a call's gradient goes: out, or a new array like p (host_in: a NumPy phi the GPU computes)."""
    if out is not None and not host_in:
        return out
    if out is not None and accumulate:
        return xp.asarray(out)
    if alloc is not None:
        return alloc(p.shape, p.dtype)
    if p.flags.c_contiguous:
        # the common case without empty_like: CuPy's works out the layout in Python, about 7 us
        # per call under cProfile on the H100 machine's host (bench/results/gpu-h100-vec-profile.txt)
        return xp.empty(p.shape, p.dtype)
    return xp.empty_like(p)


def _carrier(a: Any, up: bool) -> Any:
    """A NumPy bfloat16 array the GPU computes as its int16 carrier (the same memory)."""
    return a.view(_dtypes.BITS) if up and a is not None else a
