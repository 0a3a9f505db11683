"""How OrthoL1 runs: its targets grouped by (device, dtype, slice shape, memory layout), one batched
Gram GEMM, fused sign pass and gradient GEMM per group and workspace chunk (a cuBLAS pointer-array call
over the separate tensors on CUDA; float16 and bfloat16 as they are, 16-bit operands and float32 Grams),
and the per-tensor path for layouts BLAS cannot read. `_GroupRunner` is owned by one OrthoL1 and reads its targets and settings.
"""

from __future__ import annotations

import dataclasses
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
        return [
            j
            for j, t in enumerate(self.reg.targets)
            if t.param.requires_grad and (share is None or j in share)
        ]

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

    def execute(
        self,
        outs: Any,
        *,
        beta_gemm: float,
        want_grad: bool,
        after_group: Callable | None = None,
        params: dict | None = None,
        precision: str | None = None,
    ) -> dict:
        """Run every active target; gradients (dL/dW, plus beta_gemm * out) into outs.
        Returns {device: loss tensor (float64, beta included)}. params: see `_groups`. precision:
        resolved ("highest" or "tf32"); None: the regularizer's, resolved now (torch's setting)."""
        self.reg.backend_calls = 0
        prec = self.reg._precision_now() if precision is None else precision
        active = self.active() if params is None else list(params)
        groups, single = self._groups(active, outs if want_grad else None, params)
        by_dev, single_by_dev = _by_device(groups, single)
        if any(self.weights.capturing(d) for d in by_dev.keys() | single_by_dev.keys()):
            # a new capture: it holds a host beta only if per-tensor parameters take part (the last
            # capture is the graph advance() feeds; an earlier one's refusal does not outlive it)
            self.weights.fixed = self.reg._applied if single_by_dev else None
        scaled = any(self.reg.targets[j].scale != 1.0 for j in active)
        call = _Call(outs, beta_gemm, want_grad, after_group, prec, scaled)
        totals = {}
        for device, glist in by_dev.items():
            with _on_torch_stream(device) if device.type == "cuda" else nullcontext():
                run = _DeviceRun(
                    self, device, call, sum(V.shape[0] for _, members in glist for _, V, _ in members)
                )
                for key, members in glist:
                    run.group(key, members)
                totals[device] = run.finish(single_by_dev.get(device, []))
        return totals

    def _single(self, V, Vo, device, beta_gemm, want_grad, scale=1.0, precision="highest"):
        """One tensor through the core (layouts BLAS cannot read: the core stages them chunk by chunk)."""
        self.reg.backend_calls += 1
        loss = _run_core(
            V,
            Vo,
            self.reg._applied * scale,
            "sum",
            want_grad,
            device,
            accumulate=bool(beta_gemm),
            variant=self.reg.variant,
            precision=precision,
        )
        return loss.to(torch.float64)

    def check_devices(self) -> None:
        devs = {t.param.device for t in self.reg.targets}
        if len(devs) > 1:
            raise ValueError(
                "OrthoL1.loss(): the parameters are on several devices "
                f"{sorted(map(str, devs))}; "
                "one loss tensor cannot live on all of them (use add_grad_() or step_(), which "
                "work per device, or one OrthoL1 per device)"
            )
        for t in self.reg.targets:
            _check_tensor(t.param, f"parameter {t.name!r}")

    def loss_dtype(self) -> torch.dtype:
        return (
            torch.float64 if all(t.param.dtype == torch.float64 for t in self.reg.targets) else torch.float32
        )

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
                raise TypeError(
                    f"parameter {t.name!r} has a {g.layout} .grad (e.g. a sparse Embedding); "
                    "add_grad_ needs a dense gradient"
                )
            if g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
                raise ValueError(
                    f"parameter {t.name!r}: .grad is {g.dtype} {tuple(g.shape)} on {g.device}, "
                    f"the parameter {p.dtype} {tuple(p.shape)} on {p.device}"
                )
            if t.how == "flatten" and _flat_order(g) != _flat_order(p):
                # .grad laid out unlike the weight (a contiguous .grad of a channels_last weight): its
                # (out, -1) view would order the columns differently, so go through the weight's layout
                warnings.warn(
                    f"gpu_orthol1: parameter {t.name!r} has a .grad laid out unlike the parameter "
                    f"(strides {g.stride()} against {p.stride()}); adding through a temporary",
                    _driver.CopyWarning,
                    stacklevel=3,
                )
                staged.append((g, torch.zeros_like(p)))
                g = staged[-1][1]
            outs[j] = g
        return outs, staged


def _by_device(groups: dict, single: list) -> tuple[dict, dict]:
    """({device: [(key, members)]}, {device: per-tensor fallbacks}): every device with a target is a
    key of the first, in the order the targets come."""
    by_dev: dict = {}
    for key, members in groups.items():
        by_dev.setdefault(key[0], []).append((key, members))
    single_by_dev: dict = {}
    for s in single:
        by_dev.setdefault(s[1].device, [])
        single_by_dev.setdefault(s[1].device, []).append(s)
    return by_dev, single_by_dev


def _array_io(device: torch.device) -> tuple[Callable, Callable, Callable]:
    """(alloc, buf, slices) of one device's run: how workspaces are made, how a tensor is handed to
    the core's device (CUDA: as it is; CPU: as a NumPy view) and split into its matrices."""
    if device.type != "cuda":
        return np.empty, _host_array, list

    def alloc(shape, dt):
        return torch.empty(shape, dtype=getattr(torch, np.dtype(dt).name), device=device)

    def buf(x):
        return x

    def slices(x):  # one C++ call for all of a stack's matrix views
        return x.unbind(0)

    return alloc, buf, slices


@dataclasses.dataclass(frozen=True)
class _Call:
    """The settings of one `_GroupRunner.execute` call, as its per-device runs read them."""

    outs: Any
    beta_gemm: float
    want_grad: bool
    after_group: Callable | None
    precision: str
    scaled: bool  # some target has a scale other than 1: the per-slice losses are weighted


class _DeviceRun:
    """One device's part of an `_GroupRunner.execute` call: `group()` runs each of its groups (one
    batched pass per workspace chunk), `finish()` runs its per-tensor fallbacks and returns the
    device's loss (float64, beta included)."""

    def __init__(self, runner: _GroupRunner, device: torch.device, call: _Call, nslices: int):
        reg = self.reg = runner.reg
        self.runner, self.device, self.call = runner, device, call
        cuda = device.type == "cuda"
        factory = reg._device_factory
        dev = (
            factory(precision=call.precision)
            if factory and not cuda
            else _core_device(device, call.precision)
        )
        # the GPU device (or its emulation) reads the weight from device memory, so that a captured
        # pass replays with the weight written last (a pass without gradient leaves it alone)
        on_dev = (cuda or getattr(dev, "emulates_gpu", False)) and (
            call.want_grad or runner.weights.capturing(device)
        )
        self.wdev = runner.weights.scalar(device, reg._applied) if on_dev else None
        if cuda:
            dev.bind()
        self.dev = dev
        self.alloc, self.buf, self.slices = _array_io(device)
        self.losses = torch.zeros(nslices, dtype=torch.float64, device=device)
        self.collect = reg._collect  # metrics=True / metrics(): read the Grams on the way
        if self.collect is not None:
            self.collect.device(device, nslices, self.losses)
        self.losses_a = self.buf(self.losses)
        self.scales = torch.ones(nslices, dtype=torch.float64, device=device) if call.scaled else None
        self.budget: Any = None
        self.off = 0  # the group's first entry in `losses`

    def group(self, key: tuple, members: list) -> None:
        """One group's batched run: its matrices' Grams, signs and gradients, chunk by chunk."""
        reg, call, device = self.reg, self.call, self.device
        _, dtype, l, n, lay, lay_o, scale = key
        alpha: Any = 2.0 * reg._applied * scale
        if self.wdev is not None:  # [alpha, GEMM beta] in device memory
            # in the compute type's scalar type: float32 for 16-bit operands (cuBLAS reads
            # alpha and beta as the compute type's, CUBLAS_COMPUTE_32F)
            cdt = torch.float64 if dtype == torch.float64 else torch.float32
            alpha = self.runner.weights.coefficients(device, cdt, scale, call.beta_gemm)
        phis: list = []
        gouts: list = []
        for j, V, Vo in members:
            if call.want_grad and Vo is None:
                Vo = reg.targets[j].view(call.outs[j])
            phis.extend(self.slices(self.buf(V)))
            if call.want_grad:
                gouts.extend(self.slices(self.buf(Vo)))
        if self.budget is None:
            self.budget = self.runner._budget(device)
        batch = _driver.Pointers(phis, gouts if call.want_grad else None, lay, lay_o, l, n)
        npdt = _np_dtype(dtype)
        hook = None if self.collect is None else self.collect.hook(device, self.off, n, members)
        # the Grams' blocked triangle where the plan would take it (large n on the GPU), never under a
        # metrics hook, which reads whole Grams
        tri = _core.triangle_block(self.dev, reg.variant, n, npdt) if hook is None else 0
        sz = _driver.sizes(
            self.dev,
            len(phis),
            l,
            n,
            npdt,
            want_grad=call.want_grad,
            accumulate=bool(call.beta_gemm),
            stage_phi=False,
            stage_out=False,
            budget=self.budget,
            variant=reg.variant,
            pointers=True,
            tri=tri,
        )
        wsb = _driver.workspace(self.alloc, sz, l, n, npdt)
        counter = _CallCounter(self.dev)
        _driver.run(
            counter,
            batch,
            wsb,
            sz.chunk,
            self.losses_a,
            loss_offset=self.off,
            alpha=alpha,
            beta_gemm=call.beta_gemm,
            want_grad=call.want_grad,
            variant=reg.variant,
            gram_hook=hook,
            tri=tri,
        )
        reg.backend_calls += counter.calls
        if self.scales is not None:
            self.scales[self.off : self.off + len(phis)] = scale
        self.off += len(phis)
        if call.after_group is not None:
            call.after_group([j for j, _, _ in members])

    def finish(self, singles: list) -> torch.Tensor:
        """The device's loss: its groups' summed losses, then each per-tensor fallback's, run now."""
        reg, call = self.reg, self.call
        total = (self.losses if self.scales is None else self.losses * self.scales).sum() * (
            reg._applied if self.wdev is None else self.wdev
        )
        for j, V, Vo in singles:
            if call.want_grad and Vo is None:
                Vo = reg.targets[j].view(call.outs[j])
            one = self.runner._single(
                V, Vo, self.device, call.beta_gemm, call.want_grad, reg.targets[j].scale, call.precision
            )
            if self.collect is not None:
                self.collect.add_single(j, V, one)
            total = total + one
            if call.after_group is not None:
                call.after_group([j])
        return total


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

    def gram_triangle(self, *a):
        self.calls += 1
        self._dev.gram_triangle(*a)

    def __getattr__(self, name):
        return getattr(self._dev, name)
