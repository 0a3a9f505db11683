"""What a training loop needs around `OrthoL1`: beta schedules, lazy application, checkpoints,
per-matrix metrics from the penalty's own pass, and the DDP work split.

`OrthoL1` keeps one `State` (the step, the schedule, `every`) and, under `split=`, one `Split`
(which matrices this rank evaluates); its public methods call the helpers here around their pass.

- Schedules: beta is a float or a callable ``step -> float``; the value is checked (finite, >= 0)
  before anything is computed or written, so a bad schedule raises on every rank at the same step.
- Lazy application (``every=k``): on steps with ``step % k == 0`` the penalty applies with weight
  ``k * beta(step)``; on the others the call computes nothing.
- The DDP split: each rank evaluates a deterministic, flop-balanced share of the matrices with the
  weight multiplied by the world size, so that DDP's gradient averaging (a mean over ranks of the
  per-rank gradients) carries exactly the full penalty's gradient.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import _core

KEYS = _core.METRIC_KEYS


def check_every(every: Any) -> int:
    """`every` as an int >= 1; ValueError otherwise."""
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"every must be an integer >= 1 (apply the penalty every k steps), got {every!r}")
    return int(every)


def check_value(b: Any, step: int) -> float:
    """A schedule's value at `step` as a float; ValueError naming the step unless finite and >= 0."""
    if isinstance(b, bool) or not isinstance(b, (numbers.Real, np.ndarray, torch.Tensor)):
        raise ValueError(
            f"the beta schedule returned {b!r} at step {step}; it must return a finite real number >= 0"
        )
    try:
        v = float(b)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        raise ValueError(
            f"the beta schedule returned {b!r} at step {step}; it must return a finite real number >= 0"
        ) from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(
            f"the beta schedule returned {v!r} at step {step}; it must be finite and >= 0 "
            "(nothing was computed or written)"
        )
    return v


class State:
    """The step counter, beta (a float or a schedule ``step -> float``) and `every` of a regularizer."""

    def __init__(self, beta: float | Callable[[int], float], every: int = 1):
        self.every = check_every(every)
        self.step = 0
        self.set_beta(beta)

    def set_beta(self, beta: Any) -> None:
        if callable(beta) and not isinstance(beta, (numbers.Real, np.ndarray, torch.Tensor)):
            self.schedule: Callable[[int], float] | None = beta
            self.const = None
        else:
            self.schedule = None
            self.const = _core.check_beta(beta)

    def set_step(self, step: Any) -> None:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        self.step = int(step)

    def beta_at(self, step: int) -> float:
        if self.schedule is None:
            return self.const  # type: ignore[return-value]
        return check_value(self.schedule(step), step)

    def begin(self) -> float | None:
        """The weight this call applies (every * beta(step)), or None on a step the lazy rule skips;
        the step advances either way, and only once the value is known to be good."""
        s = self.step
        w = self.beta_at(s) * self.every if s % self.every == 0 else None
        self.step = s + 1
        return w

    def describe(self) -> str:
        b = (
            repr(self.const)
            if self.schedule is None
            else f"schedule {getattr(self.schedule, '__name__', self.schedule)!r}"
        )
        return b + (f", every={self.every}" if self.every != 1 else "")

    def state_dict(self) -> dict:
        d: dict = {"step": self.step, "every": self.every}
        if self.schedule is None:
            d["beta"] = self.const
        elif hasattr(self.schedule, "state_dict"):  # a stateful schedule object keeps its own position
            d["schedule"] = self.schedule.state_dict()
        return d

    def load_state_dict(self, d: dict) -> None:
        if not isinstance(d, dict) or "step" not in d or "every" not in d:
            raise ValueError(
                "OrthoL1.load_state_dict: expected the dict of OrthoL1.state_dict() "
                f"(keys 'step' and 'every'), got {type(d).__name__} with keys {sorted(d) if isinstance(d, dict) else None}"
            )
        every = check_every(d["every"])
        if every != self.every:
            raise ValueError(
                f"OrthoL1.load_state_dict: the checkpoint was saved with every={every}, this "
                f"regularizer has every={self.every}; build it with the same every"
            )
        if "schedule" in d and self.schedule is not None and hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(d["schedule"])
        if self.schedule is None and "beta" in d:
            self.set_beta(d["beta"])
        self.set_step(d["step"])


# -- the DDP split -----------------------------------------------------------------------------------


class Split:
    """One rank's share of the matrices: `share` (target indices), the group, its size and this rank."""

    def __init__(self, group: Any, world: int, rank: int, share: frozenset):
        self.group, self.world, self.rank, self.share = group, world, rank, share


def assign(costs: list[float], world: int) -> list[int]:
    """The rank of each matrix: largest cost first, each to the least loaded rank (ties: the lower
    index, the lower rank), so the assignment depends on the costs alone and is the same on every rank."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += costs[j]
    return owner


def resolve_split(split: Any, module: Any, targets: list) -> Split | None:
    """The `Split` of `OrthoL1(split=...)`: None (no split), "auto" (the default group when one is
    initialized and `module` is a DistributedDataParallel) or a process group."""
    if split is None:
        return None
    dist = torch.distributed
    ready = dist.is_available() and dist.is_initialized()
    if isinstance(split, str):
        if split != "auto":
            raise ValueError(f"split must be None, 'auto' or a process group, got {split!r}")
        ddp = isinstance(module, torch.nn.parallel.DistributedDataParallel)
        if not (ready and ddp):
            return None
        group = None
    else:
        if not ready:
            raise ValueError(
                "OrthoL1(split=group) needs an initialized process group "
                "(torch.distributed.init_process_group) on every rank"
            )
        group = split
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    costs = []
    for t in targets:
        s, l, n = t.view(t.param.detach()).shape
        costs.append(float(s) * l * n * n)  # the Gram and gradient GEMMs: 2 l n^2 flops each per slice
    owner = assign(costs, world)
    return Split(group, world, rank, frozenset(j for j, r in enumerate(owner) if r == rank))


def full_value(local: torch.Tensor, sp: Split) -> torch.Tensor:
    """The full penalty from each rank's (world-scaled) share: one scalar all-reduce, detached. The
    shares are unscaled and summed in float64 (a float32 sum of world-scaled shares rounds each
    term twice), then rounded once to the loss's dtype."""
    v = local.detach().to(torch.float64) / sp.world
    torch.distributed.all_reduce(v, group=sp.group)
    return v.to(local.dtype)


# -- metrics -----------------------------------------------------------------------------------------


class MetricsRun:
    """Per-slice metric buffers filled by the `gram_hook` of each group of `_GroupRunner.execute`, and
    the per-matrix dict built from them with torch ops (no host sync). `factor`: the reported
    penalty over the weight the pass applies (1 / world under the split)."""

    def __init__(self, factor: float = 1.0):
        self.factor = factor
        self.dev: dict = {}  # device -> (losses, {key: buffer})
        self.where: dict = {}  # target index -> (device, first slice, count)
        self.single: dict = {}  # target index -> ({key: (count,) buffer}, loss tensor)

    def device(self, device: torch.device, nslices: int, losses: torch.Tensor) -> None:
        self.dev[device] = (
            losses,
            {k: torch.zeros(nslices, dtype=torch.float64, device=device) for k in KEYS[1:]},
        )

    def hook(self, device: torch.device, off: int, n: int, members: list) -> Callable:
        pos = off
        for j, V, _ in members:
            self.where[j] = (device, pos, V.shape[0])
            pos += V.shape[0]
        bufs = self.dev[device][1]
        if device.type == "cuda":
            import cupy

            col = _core.metrics_collector(cupy, 0, n, off, {k: cupy.asarray(b) for k, b in bufs.items()})
            return lambda ws: col.hook(cupy.asarray(ws))
        # the collector itself: the CPU device fills it inside its sign pass (the workspaces are NumPy)
        return _core.metrics_collector(np, 0, n, off, {k: b.numpy() for k, b in bufs.items()})

    def add_single(self, j: int, V: torch.Tensor, loss: torch.Tensor) -> None:
        """A matrix the core ran on its own (bfloat16, float16 on CUDA, odd layouts): its Gram again
        in float32/64 torch ops, for the metrics only."""
        Vd = V.detach().double() if V.dtype == torch.float64 else V.detach().float()
        G = Vd.transpose(1, 2) @ Vd
        s, n = G.shape[0], G.shape[1]
        bufs = {k: torch.zeros(s, dtype=torch.float64, device=V.device) for k in KEYS[1:]}
        if V.device.type == "cuda":
            import cupy

            _core.chunk_metrics(
                cupy, cupy.asarray(G.reshape(s, n * n)), n, *(cupy.asarray(bufs[k]) for k in KEYS[1:])
            )
        else:
            _core.chunk_metrics(np, G.reshape(s, n * n).numpy(), n, *(bufs[k].numpy() for k in KEYS[1:]))
        self.single[j] = (bufs, loss.detach())

    def result(self, targets: list, weight: float) -> dict:
        """{name: {"penalty", "max_cos", "fro", "mean_abs"}} of every matrix the pass ran, 0-d float64
        tensors; a stack's slices combine as: penalty summed, max_cos max, fro the root mean square
        (||E||_F / sqrt(n) over the stack), mean_abs the mean."""
        out = {}
        for j, (device, first, count) in self.where.items():
            losses, bufs = self.dev[device]
            s = slice(first, first + count)
            t = targets[j]
            out[t.name] = {
                "penalty": losses[s].sum() * (weight * t.scale * self.factor),
                **_combine({k: bufs[k][s] for k in KEYS[1:]}),
            }
        for j, (bufs, loss) in self.single.items():
            out[targets[j].name] = {"penalty": loss.to(torch.float64) * self.factor, **_combine(bufs)}
        return {t.name: out[t.name] for t in targets if t.name in out}  # the regularizer's order


def _combine(b: dict) -> dict:
    if b["max_cos"].numel() == 1:
        return {k: b[k].reshape(()) for k in KEYS[1:]}
    return {
        "max_cos": b["max_cos"].max(),
        "fro": (b["fro"] * b["fro"]).mean().sqrt(),
        "mean_abs": b["mean_abs"].mean(),
    }


def flatten(m: dict, prefix: str = "") -> dict:
    """{prefix + name + "/" + key: float}: the nested metrics dict as TensorBoard / W&B scalars
    (reading the floats syncs with the device once per value)."""
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a str, got {prefix!r}")
    return {f"{prefix}{name}/{k}": float(v) for name, d in m.items() for k, v in d.items()}
