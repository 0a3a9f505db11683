"""How OrthoL1 runs: its targets grouped by (device, dtype, slice shape, memory layout), one batched
Gram GEMM, fused sign pass and gradient GEMM per group and workspace chunk (a cuBLAS pointer-array call
over the separate tensors on CUDA; float16 and bfloat16 as they are, 16-bit operands and float32 Grams),
and the per-tensor path for layouts BLAS cannot read. `_GroupRunner` is owned by one OrthoL1 and reads its targets and settings.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import _driver
from . import _core
from ._bridge import (
    _check_tensor,
    _core_device,
    _DeviceWeights,
    _flat_order,
    _host_array,
    _np_dtype,
    _on_torch_stream,
    _slices,
)
from ._ops import _expr_dtype, _penalty_expr, _run_core

if TYPE_CHECKING:
    from .regularizer import OrthoL1


class _GroupRunner:
    """Groups and runs the active targets of one OrthoL1 (`reg`); keeps the workspace budget per device."""

    def __init__(self, reg: OrthoL1):
        self.reg = reg
        self._budgets: dict = {}  # device -> workspace budget, fixed at the first call there
        self.weights = _DeviceWeights()  # the GPU's weight in device memory (CUDA graph replays read it)

    def active(self) -> list[int]:
        """Indices of the targets that take part in this call: requires_grad may have been switched off."""
        split = self.reg._split
        share = None if split is None else split.share  # under split=: this rank's matrices
        return [j for j, t in enumerate(self.reg.targets) if t.param.requires_grad and (share is None or j in share)]

    def _groups(self, active, outs, params=None):
        """{key: [(target index, V, Vo)]} for the batched path, and the list of per-tensor fallbacks.
        params: {target index: tensor} in place of the parameters (the torch.compile op's inputs)."""
        groups: dict = {}
        single = []
        for j in active:
            t = self.reg.targets[j]
            p = t.param if params is None else params[j]
            V, lay = t.param_view(p)
            if outs is None:
                Vo, lay_o = None, None
            elif isinstance(outs, _LazyOuts):  # empty_like(param) later: the param's own layout
                Vo, lay_o = None, lay
            else:
                Vo, lay_o = t.out_view(outs[j], V, lay, p)
            ok = lay is not None and (outs is None or lay_o is not None)
            if not ok:
                single.append((j, V, Vo))
                continue
            key = (p.device, p.dtype, V.shape[1], V.shape[2], lay, lay_o, t.scale)
            groups.setdefault(key, []).append((j, V, Vo))
        return groups, single

    def _budget(self, device):
        """The workspace budget, decided at the first call on this device (as a plan decides it when
        made): no memGetInfo per call, which a CUDA graph capture would also refuse. Call on the
        device's stream (`_on_torch_stream`), so that CuPy asks the right GPU."""
        b = self._budgets.get(device)
        if b is None:
            if device.type == "cpu":
                b = _core.workspace_budget(self.reg.workspace_bytes, "numpy", np)
            else:
                import cupy

                b = _core.workspace_budget(self.reg.workspace_bytes, "cupy", cupy)
            self._budgets[device] = b
        return b

    def execute(self, outs: Any, *, beta_gemm: float, want_grad: bool, after_group: Callable | None = None,
                params: dict | None = None, precision: str | None = None) -> dict:
        """Run every active target; gradients (dL/dW, plus beta_gemm * out) into outs.
        Returns {device: loss tensor (float64, beta included)}. params: see `_groups`. precision:
        resolved ("highest" or "tf32"); None: the regularizer's, resolved now (torch's setting)."""
        self.reg.backend_calls = 0
        prec = self.reg._precision_now() if precision is None else precision
        active = self.active() if params is None else list(params)
        groups, single = self._groups(active, outs if want_grad else None, params)
        by_dev: dict = {}
        for key, members in groups.items():
            by_dev.setdefault(key[0], []).append((key, members))
        single_by_dev: dict = {}
        for s in single:
            by_dev.setdefault(s[1].device, [])
            single_by_dev.setdefault(s[1].device, []).append(s)
        totals = {}
        scaled = any(self.reg.targets[j].scale != 1.0 for j in active)
        if any(self.weights.capturing(d) for d in single_by_dev):  # their beta is a host value: recorded
            self.weights.fixed = self.reg._applied
        for device, glist in by_dev.items():
            cuda = device.type == "cuda"
            with _on_torch_stream(device) if cuda else nullcontext():
                factory = self.reg._device_factory
                dev = factory(precision=prec) if factory and not cuda else _core_device(device, prec)
                # the GPU device (or its emulation) reads the weight from device memory, so that a captured
                # pass replays with the weight written last (a pass without gradient leaves it alone)
                on_dev = (cuda or getattr(dev, "emulates_gpu", False)) and (
                    want_grad or self.weights.capturing(device))
                wdev = self.weights.scalar(device, self.reg._applied) if on_dev else None
                if cuda:
                    dev.bind()

                    def alloc(shape, dt, _d=device):
                        return torch.empty(shape, dtype=getattr(torch, np.dtype(dt).name), device=_d)

                    def buf(x):
                        return x

                    def slices(x):  # one C++ call for all of a stack's matrix views
                        return x.unbind(0)
                else:
                    alloc = np.empty
                    buf = _host_array

                    slices = list

                nslices = sum(V.shape[0] for _, members in glist for _, V, _ in members)
                losses = torch.zeros(nslices, dtype=torch.float64, device=device)
                collect = self.reg._collect  # metrics=True / metrics(): read the Grams on the way
                if collect is not None:
                    collect.device(device, nslices, losses)
                losses_a = buf(losses)
                weights = torch.ones(nslices, dtype=torch.float64, device=device) if scaled else None
                budget = None
                off = 0
                for key, members in glist:
                    _, dtype, l, n, lay, lay_o, scale = key
                    alpha: Any = 2.0 * self.reg._applied * scale
                    if wdev is not None:  # [alpha, GEMM beta] in device memory
                        # in the compute type's scalar type: float32 for 16-bit operands (cuBLAS reads
                        # alpha and beta as the compute type's, CUBLAS_COMPUTE_32F)
                        cdt = torch.float64 if dtype == torch.float64 else torch.float32
                        alpha = self.weights.coefficients(device, cdt, scale, beta_gemm)
                    phis: list = []
                    gouts: list = []
                    for j, V, Vo in members:
                        if want_grad and Vo is None:
                            Vo = self.reg.targets[j].view(outs[j])
                        Va = buf(V)
                        phis.extend(slices(Va))
                        if want_grad:
                            Voa = buf(Vo)
                            gouts.extend(slices(Voa))
                    if budget is None:
                        budget = self._budget(device)
                    batch = _driver.Pointers(phis, gouts if want_grad else None, lay, lay_o, l, n)
                    npdt = _np_dtype(dtype)
                    sz = _driver.sizes(dev, len(phis), l, n, npdt, want_grad=want_grad, accumulate=bool(beta_gemm),
                                       stage_phi=False, stage_out=False, budget=budget, variant=self.reg.variant,
                                       pointers=True)
                    wsb = _driver.workspace(alloc, sz, l, n, npdt)
                    counter = _CallCounter(dev)
                    _driver.run(counter, batch, wsb, sz.chunk, losses_a, loss_offset=off, alpha=alpha,
                                beta_gemm=beta_gemm, want_grad=want_grad, variant=self.reg.variant,
                                gram_hook=None if collect is None else collect.hook(device, off, n, members))
                    self.reg.backend_calls += counter.calls
                    if weights is not None:
                        weights[off:off + len(phis)] = scale
                    off += len(phis)
                    if after_group is not None:
                        after_group([j for j, _, _ in members])
                total = (losses if weights is None else losses * weights).sum() * (
                    self.reg._applied if wdev is None else wdev)
                for j, V, Vo in single_by_dev.get(device, []):
                    if want_grad and Vo is None:
                        Vo = self.reg.targets[j].view(outs[j])
                    one = self._single(V, Vo, device, beta_gemm, want_grad, self.reg.targets[j].scale, prec)
                    if collect is not None:
                        collect.add_single(j, V, one)
                    total = total + one
                    if after_group is not None:
                        after_group([j])
                totals[device] = total
        return totals

    def _single(self, V, Vo, device, beta_gemm, want_grad, scale=1.0, precision="highest"):
        """One tensor through the core (layouts BLAS cannot read: the core stages them chunk by chunk)."""
        self.reg.backend_calls += 1
        loss = _run_core(V, Vo, self.reg._applied * scale, "sum", want_grad, device,
                         accumulate=bool(beta_gemm), variant=self.reg.variant, precision=precision)
        return loss.to(torch.float64)

    def check_devices(self) -> None:
        devs = {t.param.device for t in self.reg.targets}
        if len(devs) > 1:
            raise ValueError("OrthoL1.loss(): the parameters are on several devices "
                             f"{sorted(map(str, devs))}; "
                             "one loss tensor cannot live on all of them (use add_grad_() or step_(), which "
                             "work per device, or one OrthoL1 per device)")
        for t in self.reg.targets:
            _check_tensor(t.param, f"parameter {t.name!r}")

    def loss_dtype(self) -> torch.dtype:
        return torch.float64 if all(t.param.dtype == torch.float64 for t in self.reg.targets) else torch.float32

    def result(self, totals: dict) -> Any:
        dt = self.loss_dtype()
        if not totals:
            return torch.zeros((), dtype=dt)
        if len(totals) == 1:
            return next(iter(totals.values())).to(dt)
        return {d: v.to(dt) for d, v in totals.items()}

    def loss_expr(self, active: list[int], params: tuple) -> torch.Tensor:
        """The loss of targets `active` with parameters `params` as differentiable torch ops (what a
        double backward differentiates; see `_ops._penalty_expr`)."""
        reg = self.reg
        total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
        for j, p in zip(active, params, strict=True):
            t = reg.targets[j]
            per = _penalty_expr(_slices(_expr_dtype(p), t.how, t.axis, t.transpose), reg.variant)
            total = total + (reg._applied * t.scale) * per.sum()
        return total

    def grad_outs(self, active: list[int]) -> tuple[list, list]:
        """add_grad_'s destinations: per target its .grad (made as zeros when None), checked; and the
        (.grad, temporary) pairs of .grads laid out unlike their weights, to add after the run."""
        targets = self.reg.targets
        outs: list = [None] * len(targets)
        staged: list = []  # (.grad, temporary in the weight's layout)
        for j in active:
            t = targets[j]
            p = t.param
            _check_tensor(p, f"parameter {t.name!r}")
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            g = p.grad
            if g.layout != torch.strided:
                raise TypeError(f"parameter {t.name!r} has a {g.layout} .grad (e.g. a sparse Embedding); "
                                "add_grad_ needs a dense gradient")
            if g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
                raise ValueError(f"parameter {t.name!r}: .grad is {g.dtype} {tuple(g.shape)} on {g.device}, "
                                 f"the parameter {p.dtype} {tuple(p.shape)} on {p.device}")
            if t.how == "flatten" and _flat_order(g) != _flat_order(p):
                # .grad laid out unlike the weight (a contiguous .grad of a channels_last weight): its
                # (out, -1) view would order the columns differently, so go through the weight's layout
                warnings.warn(f"gpu_orthol1: parameter {t.name!r} has a .grad laid out unlike the parameter "
                              f"(strides {g.stride()} against {p.stride()}); adding through a temporary",
                              _driver.CopyWarning, stacklevel=3)
                staged.append((g, torch.zeros_like(p)))
                g = staged[-1][1]
            outs[j] = g
        return outs, staged


class _LazyOuts:
    """step_'s gradient buffers: made (empty_like the parameter) when their group runs, freed after."""

    def __init__(self, targets):
        self._targets = targets
        self._bufs: dict = {}

    def __getitem__(self, j):
        b = self._bufs.get(j)
        if b is None:
            b = self._bufs[j] = torch.empty_like(self._targets[j].param)
        return b

    def __setitem__(self, j, value):
        if value is None:
            self._bufs.pop(j, None)
        else:
            self._bufs[j] = value


class _CallCounter:
    """Counts the device's GEMM calls (what `OrthoL1.backend_calls` reports)."""

    def __init__(self, dev):
        self._dev = dev
        self.calls = 0

    def gram(self, *a):
        self.calls += 1
        self._dev.gram(*a)

    def grad(self, *a):
        self.calls += 1
        self._dev.grad(*a)

    def __getattr__(self, name):
        return getattr(self._dev, name)

