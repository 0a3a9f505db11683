"""Shared test plumbing: input layouts built the same way on NumPy and CuPy, and one way to call each backend."""

from __future__ import annotations

import numpy as np

import gpu_orthol1 as ol1

from .reference import random_phi, slice_rows

# How the input's memory is laid out. Each builder gets the array module, a NumPy
# generator and the wanted shape; the random data is made on the host, then the
# same view is taken with xp, so NumPy and CuPy see identical values and strides.
LAYOUTS_3D = ("C", "F", "perm", "rowstrided", "every2", "negative")
LAYOUTS_2D = ("C", "F", "every2", "negative")


def make(xp, rng, shape, dtype, layout="C", axis=1):
    shape = tuple(shape)
    nd = len(shape)
    l = slice_rows(shape, axis)

    def rand(s):
        return xp.asarray(random_phi(rng, s, dtype, l))

    if layout == "C":
        return rand(shape)
    if layout == "F":
        return xp.asfortranarray(rand(shape))
    if layout == "perm":  # memory (d1, d0, d2) seen as (d0, d1, d2)
        return rand((shape[1], shape[0]) + shape[2:]).swapaxes(0, 1)
    if layout == "rowstrided":  # unit last stride, padded rows: readable in place with a larger ld
        return rand((2 * shape[0], shape[1] + 1, shape[2] + 3))[::2, 1:, 2 : 2 + shape[2]]
    if layout == "every2":  # no unit stride anywhere: staged through chunk copies
        return rand(tuple(2 * s for s in shape))[(slice(None, None, 2),) * nd]
    if layout == "negative":
        return rand(shape)[::-1, ..., ::-1]
    raise ValueError(layout)


def run(kind, phi, beta=1.0, *, want_grad=True, **kw):
    """(loss, grad) from backend `kind`: "numpy", "cupy", or "emulated" (the GPU path's logic on the CPU)."""
    if kind == "emulated":
        from gpu_orthol1 import _plan
        from gpu_orthol1._checks import check_beta
        from gpu_orthol1._plan import Plan
        from gpu_orthol1.testing import EmulatedGpuDevice

        args = dict(
            axis=1, reduction="sum", out=None, accumulate=False, precision="highest", workspace_bytes=None
        )
        args.update(kw)
        plan = Plan(
            phi,
            beta,
            axis=args["axis"],
            reduction=args["reduction"],
            backend="numpy",
            precision=args["precision"],
            workspace_bytes=args["workspace_bytes"],
            want="loss_and_grad" if want_grad else "loss",
            _device=EmulatedGpuDevice(),
        )
        if want_grad:
            _plan.check_out(plan, args["out"], phi, args["accumulate"])
        return _plan.execute(plan, phi, args["out"], args["accumulate"], check_beta(beta), want_grad)
    if want_grad:
        return ol1.loss_and_grad(phi, beta, backend=kind, **kw)
    return ol1.loss(phi, beta, backend=kind, **kw), None


def host(x):
    if x is None:
        return None
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return np.asarray(x)
