"""OrthoL1: the L1 orthogonality regularizer over every matrix-shaped parameter of a model.

What it selects and how (flattened Conv weights, stacks, transposes) lives here; how the selected
matrices are grouped and run lives in `_groups._GroupRunner`, which each OrthoL1 owns.
gpu_orthol1.distributed (DTensor parameters) is reached through function-level imports only.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _gemm, _penalty
from . import _core, _training
from ._bridge import (
    _check_precision,
    _check_tensor,
    _is_dtensor,
    _pick_transpose,
    _resolve_precision,
    _slices,
)
from ._groups import _GroupRunner, _LazyOuts
from ._loop import _TrainingLoop
from ._ops import _dtensor_class, _dtensor_compile_refused, _orthol1_op, _OrthoL1ModelFn, _register

MODES = ("rows", "columns", "auto")
# include= / exclude=: a glob pattern on the parameter's name, a list of them, or a callable (name, param)
Rule = str | Iterable[str] | Callable[[str, torch.Tensor], bool]


@dataclass
class _Target:
    name: str
    param: torch.Tensor
    how: str  # "matrix" | "flatten" | "stack"
    axis: int
    transpose: bool
    scale: float = 1.0  # multiplies beta for this matrix (the Keras preset's mean over entries)
    _cached: tuple | None = field(default=None, repr=False, compare=False)

    def view(self, x):
        return _slices(x, self.how, self.axis, self.transpose)

    def param_view(self, p=None):
        """(slices view, BLAS layout) of the parameter (or of `p`, the tensor a compiled graph hands
        over in its place), made once and kept while it keeps its memory, shape and strides (an
        optimizer's in-place steps do; `param.data = ...` or `.to()` give a new key): OrthoL1 asks
        every training step, and remaking them cost ~0.1 ms a step on a 3-layer CNN."""
        if p is None:
            p = self.param
        key = (p.data_ptr(), p.shape, p.stride(), p.dtype, p.device)
        hit = self._cached
        if hit is None or hit[0] != key:
            V = self.view(p.detach())
            hit = self._cached = (
                key,
                V,
                _gemm.slice_layout(V.shape[1], V.shape[2], V.stride(1), V.stride(2)),
            )
        return hit[1], hit[2]

    def out_view(self, out, V, lay, p=None):
        """(slices view, layout) of `out`, a tensor shaped like the parameter `p` (default: the
        parameter) whose slices are `V`: one as_strided with V's geometry when out has p's strides,
        the general view otherwise."""
        if p is None:
            p = self.param
        if out.shape == p.shape and out.stride() == p.stride():
            off = out.storage_offset() + V.storage_offset() - p.storage_offset()
            return out.as_strided(V.shape, V.stride(), off), lay
        Vo = self.view(out)
        return Vo, _gemm.slice_layout(Vo.shape[1], Vo.shape[2], Vo.stride(1), Vo.stride(2))


def _matches(rule, name, p) -> bool:
    if callable(rule):
        return bool(rule(name, p))
    if isinstance(rule, str):
        rule = (rule,)
    return any(fnmatch.fnmatchcase(name, pat) for pat in rule)


THREE_D = ("auto", "flatten", "stack")


def _select(
    params_or_module: Any, mode: str, axis: int, include: Rule | None, exclude: Rule | None, three_d: str
) -> tuple[list[_Target], list[str]]:
    """OrthoL1's targets, and the names of the 3-D parameters whose kind three_d="auto" had to guess."""
    conv = set()
    module_given = isinstance(params_or_module, torch.nn.Module)
    if module_given:
        named = list(params_or_module.named_parameters())
        for mod in params_or_module.modules():
            if isinstance(mod, torch.nn.modules.conv._ConvNd):
                conv.add(id(mod.weight))
    elif isinstance(params_or_module, torch.Tensor):
        named = [("param", params_or_module)]
    else:
        named = []
        for i, x in enumerate(params_or_module):
            named.append(tuple(x) if isinstance(x, (tuple, list)) else (str(i), x))
    targets: list[_Target] = []
    seen = set()
    ambiguous = []
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
        if id(p) in seen or p.dim() < 2 or not p.requires_grad:
            continue
        if include is not None and not _matches(include, name, p):
            continue
        if exclude is not None and _matches(exclude, name, p):
            continue
        _check_tensor(p, f"parameter {name!r}")
        seen.add(id(p))
        if p.dim() == 3 and three_d == "auto" and not module_given:
            ambiguous.append(name)
        flatten_3d = three_d == "flatten" or (three_d == "auto" and id(p) in conv)
        if p.dim() == 2:
            how, l, n = "matrix", p.shape[0], p.shape[1]
        elif p.dim() >= 4 or flatten_3d:
            how, l, n = "flatten", p.shape[0], math.prod(p.shape[1:])
        else:
            ax = axis % 3
            how = "stack"
            l, n = (s for i, s in enumerate(p.shape) if i != ax)
        targets.append(_Target(name, p, how, axis % 3, _pick_transpose(mode, l, n)))
    return targets, ambiguous


class _Presets:
    """OrthoL1's preset constructors (Keras 3's OrthogonalRegularizer, BigGAN's utils.ortho)."""

    @classmethod
    def keras(cls, params_or_module: Any, factor: float = 0.01, mode: str = "rows", **kw: Any) -> OrthoL1:
        """Keras 3's `OrthogonalRegularizer(factor, mode)` on the Keras kernel of every selected weight,
        so that a model ported from Keras gets the penalty Keras gives it under the same mode name.

        Per matrix: factor * mean |off-diagonal entry| of the Gram of the L2-normalized rows
        (mode="rows") or columns ("columns") of the Keras kernel; the loss is the sum over matrices
        (Keras adds each layer's penalty to the model's loss). The Keras kernel of a torch weight:
        a Linear weight (out, in) is read as the Dense kernel W^T (in, out), so Keras's rows are the
        weight's columns; a Conv (and ConvTranspose) weight (out, in, *k) as Keras's conv kernel
        (*k, in, out) reshaped to (prod(k) * in, out), i.e. W viewed as (out, -1) and transposed
        (Keras's regularizer itself takes 2-D kernels only; the order of the flattened rows changes
        nothing); each slice of a 3-D stack likewise as an (out, in) weight; an Embedding weight
        (num, dim), when the module is passed, as stored, Keras's Embedding layout. Parameters
        passed without their module are read as (out, in) weights. A 1-row Gram (size 1) adds 0.
        `keras_orthogonal(w, ...)` applies Keras's rule to one tensor as given instead.

        Args:
            params_or_module: as for OrthoL1.
            factor: Keras's `factor`, finite and >= 0.
            mode: "rows" (Keras's default) or "columns", of the Keras kernel.
            **kw: other OrthoL1 keywords (not mode, penalty, diagonal, normalize).

        Returns:
            An OrthoL1 whose `loss()` is that sum; `add_grad_()` and `step_()` as for OrthoL1.

        Raises:
            ValueError: mode is not "rows" or "columns", factor is negative or not finite, or
                OrthoL1 refuses the selection.
            TypeError: as for OrthoL1.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
            >>> # as Dense layers with kernel_regularizer=OrthogonalRegularizer(0.01, "rows")
            >>> reg = OrthoL1.keras(model, 0.01, "rows")
            >>> penalty = reg.loss()  # add to the task loss
        """
        if mode not in ("rows", "columns"):
            raise ValueError(f"mode must be 'rows' or 'columns' (Keras's modes), got {mode!r}")
        make: Any = cls  # the subclass: OrthoL1 or a user's subclass of it
        reg = make(
            params_or_module,
            _core.check_beta(factor, "factor"),
            "rows",
            penalty="l1",
            diagonal=False,
            normalize=True,
            **kw,
        )
        as_stored = set()  # Keras's Embedding table is (input_dim, output_dim), torch's layout
        if isinstance(params_or_module, torch.nn.Module):
            for mod in params_or_module.modules():
                if isinstance(mod, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                    as_stored.add(id(mod.weight))
        for t in reg.targets:
            # transpose=True makes the core's Gram the torch matrix's row Gram; Keras's kernel is the
            # transpose of torch's (out, in) weight, so Keras's rows are its columns
            t.transpose = (mode == "rows") == (id(t.param) in as_stored)
            t._cached = None
            size = t.view(t.param.detach()).shape[2]
            t.scale = 1.0 / (size * (size - 1)) if size > 1 else 0.0
        reg.mode = f"keras {mode}"  # the repr's mode; not one of OrthoL1's (torch-layout) modes
        return reg

    @classmethod
    def biggan(cls, params_or_module: Any, strength: float = 1e-4, **kw: Any) -> OrthoL1:
        """BigGAN-PyTorch's `utils.ortho(model, strength)`: every parameter of 2 or more dims viewed as
        W = (out, -1), loss (strength / 2) * sum of squared off-diagonal entries of W W^T, whose
        gradient 2 * strength * ((W W^T) * (1 - I)) W is what BigGAN adds to .grad: call
        `add_grad_()` where BigGAN calls `utils.ortho`. 3-D parameters are flattened like Conv1d
        weights unless three_d= says otherwise; other keywords as for OrthoL1.

        Args:
            params_or_module: as for OrthoL1.
            strength: BigGAN's `strength`, finite and >= 0.
            **kw: other OrthoL1 keywords (not mode, penalty, diagonal).

        Returns:
            An OrthoL1 with BigGAN's penalty.

        Raises:
            ValueError: strength is negative or not finite, or OrthoL1 refuses the selection.
            TypeError: as for OrthoL1.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))
            >>> reg = OrthoL1.biggan(model, 1e-4)
            >>> _ = reg.add_grad_()  # where BigGAN calls utils.ortho(model, 1e-4)
        """
        kw.setdefault("three_d", "flatten")
        make: Any = cls  # the subclass: OrthoL1 or a user's subclass of it
        return make(
            params_or_module,
            _core.check_beta(strength, "strength") / 2,
            "rows",
            penalty="l2",
            diagonal=False,
            **kw,
        )


class OrthoL1(_Presets, _TrainingLoop):
    """The L1 orthogonality regularizer over every matrix-shaped parameter of a model.

    params_or_module: an nn.Module, one tensor, or an iterable of parameters or of (name, parameter)
    pairs. Taken: 2-D parameters (Linear (out, in) and the like), Conv weights of any dimension,
    flattened to (out, in*k...), and 3-D parameters by `three_d`: "flatten" (as Conv1d weights),
    "stack" (stacks of matrices along `axis`), or "auto" (default): flattened when they belong to a
    Conv module of the module passed, stacks otherwise; when parameters are passed without their
    module, "auto" cannot tell a Conv1d weight from a stack, so it warns once, naming them. Left out:
    0-D/1-D parameters (biases, norms), parameters with requires_grad=False (also those switched off
    after the regularizer was built: every call skips them), and what include/exclude rule out: each
    is a glob pattern on the parameter's name (or a list of them) or a callable (name, param) -> bool;
    a parameter is taken when it matches include (if given) and not exclude. Shared parameters count
    once. A selection of no matrices raises ValueError unless allow_empty=True.

    mode: "rows" penalizes sum |W W^T - I|, "columns" sum |W^T W - I|, "auto" (default) the smaller
    Gram (the one that can reach zero). The loss is beta times the sum over all matrices; `loss()`,
    `add_grad_()` and `step_()` return it as float64 when every parameter is float64, else float32.

    penalty ("l1" | "l2"), diagonal and normalize choose the member of the penalty family as in the
    core API (docs/penalties.md); `OrthoL1.keras(...)` and `OrthoL1.biggan(...)` are the Keras 3
    OrthogonalRegularizer and BigGAN presets.

    Parameters with one (slice shape, dtype, memory layout) are evaluated together: one batched Gram
    GEMM, one fused sign pass and one batched gradient GEMM per group and workspace chunk (on CUDA
    a cuBLAS pointer-array call over the separate tensors, no stacking copy), through the same chunk
    loop as the core API. float16 on CUDA, bfloat16 and layouts BLAS cannot read go through the core
    one tensor at a time. The workspace budget (workspace_bytes=, else GPU_ORTHOL1_WORKSPACE_BYTES,
    else a share of the free GPU memory) is fixed at the first call on each device.

    precision: the float32 GEMMs' on CUDA, "highest" or "tf32" (TF32 tensor cores); None (default)
    follows torch.get_float32_matmul_precision() at each call ("high"/"medium" -> "tf32"), so a
    later torch.set_float32_matmul_precision applies. float64 is always full precision; the CPU
    computes full float32 under either (docs/guide.md, precision).

    Args:
        params_or_module: an nn.Module, one tensor, or an iterable of parameters or (name, parameter).
        beta: the loss's factor, finite and >= 0, or a schedule: a callable step -> beta (see `step`),
            checked at each call before anything is computed.
        mode: "rows", "columns" or "auto".
        axis: the slice axis of 3-D parameters taken as stacks.
        include: which parameters to take (glob pattern(s) on the name, or a callable (name, param)).
        exclude: which parameters to leave out (same forms).
        workspace_bytes: the workspace budget per chunk (a positive integer), or None.
        three_d: "auto", "flatten" or "stack".
        allow_empty: accept a selection of no matrices.
        penalty: "l1" or "l2".
        diagonal: False leaves the Gram's diagonal free.
        normalize: True takes the Gram of the unit-normalized rows or columns.
        every: apply the penalty every k-th step only, with k * beta (lazy regularization).
        split: None, "auto" (under DDP: the default process group) or a process group: each rank
            evaluates its flop-balanced share of the matrices (docs/guide.md, training loops).
        precision: None (torch's float32 matmul setting, read per call), "highest" or "tf32".

    Raises:
        TypeError: a selected parameter is not a dense real float tensor, or an entry is not a tensor.
        ValueError: an argument is out of range, or nothing was selected (without allow_empty).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> reg = OrthoL1(model, beta=1e-3)
        >>> reg.loss().backward()   # or: reg.add_grad_() after the task loss's backward
    """

    def __init__(
        self,
        params_or_module: Any,
        beta: float = 1.0,
        mode: str = "auto",
        *,
        axis: int = 1,
        include: Rule | None = None,
        exclude: Rule | None = None,
        workspace_bytes: int | None = None,
        three_d: str = "auto",
        allow_empty: bool = False,
        penalty: str = "l1",
        diagonal: bool = True,
        normalize: bool = False,
        every: int = 1,
        split: Any = None,
        precision: str | None = None,
    ) -> None:
        self.precision = _check_precision(precision)
        self._train = _training.State(1.0, every)
        self._collect = None
        self._split = None  # set below, once the targets are known
        self.variant = _penalty.check(penalty, diagonal, normalize)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if three_d not in THREE_D:
            raise ValueError(f"three_d must be one of {THREE_D}, got {three_d!r}")
        self.beta = beta  # a float or a schedule step -> float (checked by the setter)
        self.workspace_bytes = _core.check_workspace_bytes(workspace_bytes)
        self.mode = mode
        self._device_factory: Callable | None = None  # tests: a core device for CPU tensors
        self.targets, ambiguous = _select(params_or_module, mode, axis, include, exclude, three_d)
        if not self.targets and not allow_empty:
            raise ValueError(
                "OrthoL1: no matrices were selected (no parameter of 2 or more dims with "
                "requires_grad=True passed include/exclude); pass allow_empty=True if that is fine"
            )
        if ambiguous:
            warnings.warn(
                f"OrthoL1: 3-D parameters {ambiguous} were passed without their module, so three_d='auto' "
                f"treats them as stacks of matrices along axis={axis % 3}; if they are Conv1d weights pass "
                "the module or three_d='flatten' (three_d='stack' silences this warning)",
                UserWarning,
                stacklevel=2,
            )
        self.backend_calls = 0  # batched GEMM calls + per-tensor core calls of the last method call
        self._runner = _GroupRunner(self)  # the grouping and the workspace budgets
        self._op_key = _register(self)  # how the torch.compile op finds this regularizer
        self._split = _training.resolve_split(split, params_or_module, self.targets)

    @property
    def names(self) -> list[str]:
        """The selected parameters' names, in target order."""
        return [t.name for t in self.targets]

    def __repr__(self) -> str:
        fam = (
            ""
            if self.variant.is_default
            else (
                f", penalty={self.variant.penalty!r}, diagonal="
                f"{self.variant.diagonal}, normalize={self.variant.normalize}"
            )
        )
        return (
            f"OrthoL1({len(self.targets)} matrices, beta={self._train.describe()}, mode={self.mode!r}{fam})"
        )

    def _loss(self) -> torch.Tensor:
        """`loss()`'s pass at the weight `_applied` (the custom op under torch.compile, else eager)."""
        runner = self._runner
        if torch.compiler.is_compiling():  # one custom op to dynamo: no graph break
            active = runner.active()
            if not active:
                return torch.zeros((), dtype=runner.loss_dtype())
            params = [self.targets[j].param for j in active]
            dt = _dtensor_class()
            if dt is not None and any(isinstance(p, dt) for p in params):  # before the loss op sees a DTensor
                return _dtensor_compile_refused(torch.zeros((), dtype=runner.loss_dtype()))
            prec = self._precision_now()  # traced: a later torch setting recompiles (dynamo's guard)
            return _orthol1_op(params, self._op_key, active, torch.is_grad_enabled(), prec)[0]
        runner.check_devices()
        active = runner.active()
        if not active:
            return torch.zeros((), dtype=runner.loss_dtype())
        if self._sharded(active):
            from .. import distributed

            return distributed.orthol1_dtensor_loss(
                self._dtensor_targets(active), self._applied, **self._family_kw()
            ).to(runner.loss_dtype())
        return _OrthoL1ModelFn.apply(self, torch.is_grad_enabled(), *[self.targets[j].param for j in active])

    def _precision_now(self) -> str:
        """This call's precision: `precision`, or for None torch's float32 matmul setting now."""
        return _resolve_precision(self.precision)

    def _sharded(self, active: list[int]) -> bool:
        """Any DTensor parameter (a model after fully_shard): the whole call goes through
        gpu_orthol1.distributed, one collective per shape group per chunk."""
        return any(_is_dtensor(self.targets[j].param) for j in active)

    def _dtensor_targets(self, active: list[int]) -> list[tuple]:
        return [(t.param, t.how, t.axis, t.transpose, t.scale) for t in (self.targets[j] for j in active)]

    def _family_kw(self) -> dict[str, Any]:
        return dict(
            workspace_bytes=self.workspace_bytes,
            penalty=self.variant.penalty,
            diagonal=self.variant.diagonal,
            normalize=self.variant.normalize,
            precision=self._precision_now(),
        )

    @torch.no_grad()
    def _add_grad_(self) -> torch.Tensor | dict[torch.device, torch.Tensor]:
        """`add_grad_()`'s pass at the weight `_applied`."""
        active = self._runner.active()
        if self._sharded(active):
            from .. import distributed

            return distributed.orthol1_dtensor_add_grad_(
                self._dtensor_targets(active), self._applied, **self._family_kw()
            ).to(self._runner.loss_dtype())
        outs, staged = self._runner.grad_outs(active)
        res = self._runner.result(self._runner.execute(outs, beta_gemm=1.0, want_grad=True))
        for g, tmp in staged:
            g.add_(tmp)
        return res

    @torch.no_grad()
    def _step_(self, lr: float) -> torch.Tensor | dict[torch.device, torch.Tensor]:
        """`step_()`'s pass at the weight `_applied` (`lr` checked by `step_`)."""
        active = self._runner.active()
        if self._sharded(active):
            from .. import distributed

            return distributed.orthol1_dtensor_step_(
                self._dtensor_targets(active), self._applied, lr, **self._family_kw()
            ).to(self._runner.loss_dtype())
        for t in self.targets:
            _check_tensor(t.param, f"parameter {t.name!r}")
        tmps = _LazyOuts(self.targets)

        def apply(js: list[int]) -> None:
            for j in js:
                self.targets[j].param.sub_(tmps[j], alpha=float(lr))
                tmps[j] = None

        return self._runner.result(
            self._runner.execute(tmps, beta_gemm=0.0, want_grad=True, after_group=apply)
        )
