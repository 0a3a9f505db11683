"""OrthoL1's training-loop surface: beta schedules, lazy application (every=k), checkpoints, metrics
and the DDP split around the passes `OrthoL1` runs (`_loss`, `_add_grad_`, `_step_`).

A base class of OrthoL1, like `regularizer._Presets`, so that the regularizer's class stays readable;
the bookkeeping itself (`State`, `Split`, `MetricsRun`) lives in `_training`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import _training

if TYPE_CHECKING:
    from ._groups import _GroupRunner
    from .regularizer import _Target

Loss = torch.Tensor | dict[torch.device, torch.Tensor]


class _Checkpoints:
    """state_dict / load_state_dict of the regularizer's training state (a base of `_TrainingLoop`)."""

    _train: _training.State
    _applied: float

    def state_dict(self) -> dict:
        """The regularizer's training state: the step (the schedule's position and the lazy counter),
        every, a float beta (a schedule object's own state_dict() when it has one).

        Returns:
            A dict of plain Python values, for torch.save next to the model's and optimizer's.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4), beta=lambda s: 1e-3, every=3)
            >>> ckpt = {"ortho": reg.state_dict()}
        """
        return self._train.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s state: the run continues as the saved one would have.

        Args:
            state: a dict from `state_dict()`.

        Raises:
            ValueError: not such a dict, or saved with another `every`.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4), every=3)
            >>> reg.load_state_dict({"step": 7, "every": 3, "beta": 1.0})
        """
        self._train.load_state_dict(state)
        if self._train.const is not None:
            self._applied = self._train.const


class _Schedule(_Checkpoints):
    """The step counter and the weight each call applies: beta, step, every, and advance() for CUDA
    graph replays (a base of `_TrainingLoop`)."""

    _split: _training.Split | None
    _applied: float  # the weight of the running call: every * beta(step) (* world size under split=)

    if TYPE_CHECKING:  # OrthoL1 provides it
        _runner: _GroupRunner

    @property
    def beta(self) -> float:
        """beta at the current `step`: the float given, or the schedule's value there (checked)."""
        return self._train.beta_at(self._train.step)

    @beta.setter
    def beta(self, value: float | Callable[[int], float]) -> None:
        self._train.set_beta(value)
        # the weight a call applies; loss(), add_grad_() and step_() set it per call
        self._applied = self._train.const if self._train.const is not None else 0.0

    @property
    def step(self) -> int:
        """Calls of loss(), add_grad_() and step_() so far (the schedule's argument); settable."""
        return self._train.step

    @step.setter
    def step(self, value: int) -> None:
        self._train.set_step(value)

    @property
    def every(self) -> int:
        """The penalty applies on steps with step % every == 0, with every * beta."""
        return self._train.every

    def advance(self) -> float:
        """Count one step for the replay of a CUDA graph that captured loss(), add_grad_() or step_():
        write this step's weight (every * beta(step), 0 on a step the lazy rule skips; times the world
        size under split=) into the device memory the captured pass reads (the gradient GEMM's
        coefficients and the loss's factor), so that the next replay applies it without a new capture.
        Call it once before each replay, outside the capture. Under capture, those calls count no step
        themselves and refuse metrics=True; run each once eagerly before capturing (warm-up).

        Returns:
            The weight written.

        Raises:
            ValueError: a bad schedule value, or a new weight for a graph whose capture ran parameters of
                the per-tensor path (layouts BLAS cannot read in place: their beta is a host value);
                nothing is written, the step does not advance.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4), beta=lambda step: 1e-3 * 0.9**step, every=2)
            >>> w = reg.advance()  # then graph.replay()
        """
        s, k = self._train.step, self._train.every
        w = self._train.beta_at(s) * k if s % k == 0 else 0.0
        w *= self._split.world if self._split is not None else 1
        self._runner.weights.write(w)
        self._train.step = s + 1
        return w


class _TrainingLoop(_Schedule):
    """The public methods wrapping OrthoL1's passes: each counts a step and applies its weight."""

    _collect: _training.MetricsRun | None  # set by loss/add_grad_(metrics=True) and metrics()

    if TYPE_CHECKING:  # OrthoL1 provides these
        targets: list[_Target]

        def _sharded(self, active: list[int]) -> bool: ...
        def _loss(self) -> torch.Tensor: ...
        def _add_grad_(self) -> Loss: ...
        def _step_(self, lr: float) -> Loss: ...

    def _begin(self, metrics: Any) -> float | None:
        """The weight of this call (None: a step the lazy rule skips), checked before anything runs."""
        if not isinstance(metrics, (bool, np.bool_)):
            raise ValueError(f"metrics must be True or False, got {metrics!r}")
        if metrics and self._sharded(self._runner.active()):
            raise ValueError("metrics=True is not available over DTensor (sharded) parameters")
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            if metrics:  # its dict would hold the capture's values, not the replay's
                raise ValueError(
                    "metrics=True is not available under CUDA graph capture; call metrics() outside"
                )
            # no step counted: every replay runs the pass at the weight advance() wrote (0: a skipped step)
            self._applied, self._collect = self._runner.weights.value, None
            return self._applied
        w = self._train.begin()
        if w is not None:
            world = self._split.world if self._split is not None else 1
            self._applied = w * world
            self._collect = _training.MetricsRun(1.0 / world) if metrics else None
        return w

    def _run(self, pass_: Callable[[], Any], metrics: bool, detached: bool) -> Any:
        """One counted call of `pass_` (loss's or add_grad_'s) at this step's weight."""
        if self._begin(metrics) is None:
            return _skipped(self, metrics)
        try:
            out = pass_()
        except BaseException:
            self._collect = None  # a failed pass leaves no half-filled metrics for the next call
            raise
        return self._finish(out, metrics, detached)

    def _finish(self, out: Any, metrics: bool, detached: bool) -> Any:
        """The full penalty's value under the split (one all-reduce, off the gradient path) and the metrics."""
        try:
            m = self._collect.result(self.targets, self._applied) if self._collect is not None else None
        finally:
            self._collect = None
        if self._split is not None:
            if isinstance(out, dict):
                raise ValueError("OrthoL1(split=...) needs the parameters on one device per rank")
            full = _training.full_value(out, self._split)
            out = full if detached else out + (full - out.detach())
        return (out, m) if metrics else out

    def loss(self, metrics: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """beta * sum over all matrices of sum |Gram - I|, a torch scalar with autograd (float64 when every
        parameter is float64, float32 otherwise). Add it to the task loss; its backward hands each
        parameter the gradient formed in this same forward pass. A double backward (create_graph=True)
        is exact, as for `ortho_l1` (torch.compile refuses it with torch's error; over DTensor
        (sharded) parameters the second backward raises).

        Each call counts one `step`; with `every=k` the steps where step % k != 0 return a zero tensor
        without computing anything, the others apply k * beta(step). Under `split=` this rank's
        share of the matrices is evaluated with world-size times the weight (DDP's gradient averaging
        then yields the full penalty's gradient); the value returned is the full penalty (one scalar
        all-reduce, detached from the gradient path). Inside torch.compile, a float beta with every=1,
        no split and no metrics is one custom op (the step is not counted there); the others break
        the graph at this call (it runs eagerly and counts the step), and fullgraph=True refuses them.

        Args:
            metrics: also return `metrics()`'s dict for this pass's matrices (the rank's share under
                split=; {} on a skipped step), a by-product of the same Grams.

        Returns:
            The loss tensor, or (loss, metrics dict) when metrics=True.

        Raises:
            ValueError: a schedule value that is not finite or negative (before anything is computed),
                parameters on several devices, metrics over DTensor parameters.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4), beta=lambda step: 1e-3 * 0.99 ** step, every=2)
            >>> penalty, m = reg.loss(metrics=True)
        """
        if torch.compiler.is_compiling():  # one custom op to dynamo: no graph break
            if (
                metrics
                or self._train.schedule is not None
                or self._train.every != 1
                or self._split is not None
            ):
                return self._loss_eager(metrics)
            return self._loss()
        return self._run(self._loss, metrics, detached=False)

    @torch.compiler.disable
    def _loss_eager(self, metrics: bool) -> Any:
        # a graph break whose frames dynamo compiles none of: they would pin the registry key into guards
        return self.loss(metrics)

    def add_grad_(self, metrics: bool = False) -> Loss | tuple[Loss, dict]:
        """Add d(loss())/dW into each parameter's .grad (created as zeros when None), without an autograd
        graph, before optimizer.step(). Parameters whose requires_grad is False are skipped. The
        gradient GEMM accumulates straight into .grad; the only extra memory is the Gram workspace
        chunk (on CPU also one matrix-sized temporary). Counts one `step` (see `loss` for `every`).

        When to call it: without split=, anywhere between zero_grad() and optimizer.step() (under
        DDP after backward() too: every rank adds the same full gradient). Under split= call it
        BEFORE backward(): each rank adds world-size times its share's gradient to .grad, and DDP's
        all-reduce in backward() averages .grad (what it held before included) over the ranks.

        Args:
            metrics: also return the metrics dict of this pass (see `loss`).

        Returns:
            The loss value (detached; the full penalty under split=; {device: loss} when the
            parameters span several devices), or (loss, metrics dict) when metrics=True.

        Raises:
            ValueError: a bad schedule value, a .grad that does not match its parameter.
            TypeError: a sparse .grad.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4), 1e-3)
            >>> value = reg.add_grad_()
        """
        return self._run(self._add_grad_, metrics, detached=True)

    def step_(self, lr: float) -> Loss:
        """The update rule W <- W - lr * d(loss())/dW in place, decoupled from the optimizer (like AdamW's
        weight decay), from the weights before the update; parameters whose requires_grad is False are
        left alone. Counts one `step` (see `loss` for `every`). Not available under split=.

        Args:
            lr: the step size, a finite real number.

        Returns:
            The loss value before the step (detached, the dtype rule of `loss()`).

        Raises:
            ValueError: a bad lr or schedule value, or a regularizer built with split=.
            TypeError: a parameter is not a dense real float tensor.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4), 1e-3)
            >>> value = reg.step_(0.1)
        """
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(float(lr)):
            raise ValueError(f"lr must be a finite real number, got {lr!r}")
        if self._split is not None:
            raise ValueError(
                "step_() does not take split= (the ranks would update different matrices); "
                "use add_grad_() before backward() or loss()"
            )
        if self._begin(False) is None:
            return _skipped(self, False)
        return self._step_(lr)

    @torch.no_grad()
    def metrics(self, flat: bool = False, prefix: str = "") -> dict:
        """How orthogonal each matrix is, from one Gram-only pass per group (no gradient GEMM).

        Per matrix (by name): "penalty" (beta(step) times its loss, without the every factor),
        "max_cos" (the largest |cosine| between two different rows/columns of the penalized Gram:
        the worst pair), "fro" (||G - I||_F / sqrt(n)) and "mean_abs" (the mean |G - I| entry); the
        slices of a stack combine as: penalty summed, max_cos max, fro root mean square, mean_abs
        mean. Every selected matrix is evaluated, under split= too. Does not count a step.

        Args:
            flat: return {prefix + name + "/" + key: float} (reads the values: one host sync)
                instead of {name: {key: 0-d float64 tensor}} (no host sync until read).
            prefix: put in front of each flat key, e.g. "ortho/".

        Returns:
            The nested or flat dict described above.

        Raises:
            ValueError: DTensor (sharded) parameters, a bad schedule value or prefix.

        Example:
            >>> reg = OrthoL1(torch.nn.Linear(8, 4))
            >>> logs = reg.metrics(flat=True, prefix="ortho/")  # {"ortho/weight/max_cos": ..., ...}
        """
        active = [j for j, t in enumerate(self.targets) if t.param.requires_grad]  # every rank's share
        if self._sharded(active):
            raise ValueError("metrics() is not available over DTensor (sharded) parameters")
        beta = self.beta
        saved, self._applied = self._applied, beta
        self._collect = run = _training.MetricsRun()
        try:
            self._runner.execute(
                None, beta_gemm=0.0, want_grad=False, params={j: self.targets[j].param for j in active}
            )
            m = run.result(self.targets, beta)
        finally:
            self._collect, self._applied = None, saved
        return _training.flatten(m, prefix) if flat else m


def _skipped(reg: _TrainingLoop, metrics: bool) -> Any:
    """What a call returns on a step the lazy rule skips: a zero loss (and {} for the metrics)."""
    dev = reg.targets[0].param.device if reg.targets else None
    z = torch.zeros((), dtype=reg._runner.loss_dtype(), device=dev)
    return (z, {}) if metrics else z
