"""Plans: everything decided once for arrays of one shape, dtype, strides, kind and device.

A `Plan` holds the backend and its device object (cuBLAS handle, kernel launch
configurations), the slice view (which axis indexes the slices), the layouts BLAS reads,
the chunk size and workspace sizes for each kind of call, and the CPU's small workspace.
A call checks that its array matches, then `_plan_run` binds the addresses and runs the one chunk
loop (`_driver.run`) or the fused kernel. The functional API (`loss`, `grad`, `loss_and_grad`) keeps a small LRU
cache of plans (`_cache`).

The framework layers (torch, distributed) reach a plan's internals only through this module's
functions `execute`, `chunk_for`, `reduce_into` and `check_out`, which take the plan first.

Threads: a plan may be shared. On the CPU the device is stateless and a call that finds
the plan's workspace in use by another thread allocates its own; on the GPU a call holds
the plan's lock while it enqueues its work (binding the cuBLAS handle to the calling
thread's current stream), so calls from several threads and streams serialize their
enqueueing, not the GPU work, and workspaces come from CuPy's stream-ordered pool.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _backends, _checks, _cpu_pool, _driver, _dtypes, _penalty, _plan_run, _triangle
from ._device import Device, make_device, pick_kernel
from ._gpu_calls import GpuCalls
from ._plan_run import Alloc, GramHook
from ._slices import Chunking, Slices


def _device_dtype(dtype: Any, host_in: bool, dev: Device, bf16_bits: bool) -> tuple[bool, Any]:
    """(whether a NumPy bfloat16 phi goes to the GPU as its int16 carrier, the dtype of the device's
    buffers): CuPy has no bfloat16, so the GPU computes bfloat16 through the carrier (`_dtypes`)."""
    if bf16_bits and not (dev.xp is not np or getattr(dev, "emulates_gpu", False)):
        raise ValueError("a bfloat16 carrier (_bf16_bits=True) runs on the GPU device only")
    up = host_in and _dtypes.is_bf16(dtype)
    return up, (_dtypes.BITS if up else dtype)


class Plan:
    """The loss and gradient for arrays like the one the plan was made for (see `gpu_orthol1.plan`).

    ``plan(phi, out=None, accumulate=False)`` returns what `want` names, as the functional
    API returns it. A plan may be shared between threads (see the module docstring).

    Args:
        phi: an array like the ones the plan will be called with (shape, dtype, strides, kind,
            device); the other arguments are `gpu_orthol1.plan`'s, which is how plans are made.

    Example:
        >>> import numpy as np, gpu_orthol1
        >>> phi = np.random.default_rng(0).standard_normal((8, 16, 4)).astype(np.float32)
        >>> p = gpu_orthol1.plan(phi, 0.5, want="loss")
        >>> float(p(phi)) > 0
        True
    """

    def __init__(
        self,
        phi: Any,
        beta: Any = 1.0,
        *,
        axis: Any = 1,
        reduction: Any = "sum",
        want: Any = "loss_and_grad",
        precision: Any = "highest",
        backend: Any = "auto",
        workspace_bytes: Any = None,
        kernel: Any = "auto",
        penalty: Any = "l1",
        diagonal: Any = True,
        normalize: Any = False,
        _device: Device | None = None,
        _bf16_bits: bool = False,
    ) -> None:
        # _bf16_bits: phi is the int16 carrier of bfloat16 data (`_dtypes`; the torch bridge's CUDA hand-over)
        self._is_cupy = _checks.check_bits(phi) if _bf16_bits else _checks.check_phi(phi)
        axis = _checks.check_axis(axis, phi.ndim)
        self._beta = _checks.check_beta(beta)
        self._reduction = _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)
        self._precision = _checks.check_choice("precision", precision, _checks.PRECISIONS)
        self._want = _checks.check_choice("want", want, _checks.WANTS)
        workspace_bytes = _checks.check_workspace_bytes(workspace_bytes)
        self._variant = _penalty.check(penalty, diagonal, normalize)  # the family member, fixed here
        name = _backends.check_name(backend)
        self._axis = axis
        self._shape, self._dtype, self._strides = phi.shape, phi.dtype, phi.strides
        self._device_id = phi.device.id if self._is_cupy else None
        self._array_type = type(phi)
        sl = self._slices = Slices(phi, axis)
        self._m, self._l, self._n = sl.m, sl.l, sl.n
        self._resolved = _backends.resolve(name, self._is_cupy, 4.0 * self._l * self._m * self._n * self._n)
        self._dev: Device = _device if _device is not None else make_device(self._resolved, self._precision)
        self._xp = self._dev.xp
        self._host_in = not self._is_cupy and self._xp is not np  # a NumPy input computed on the GPU
        self._bf16_up, self._ddtype = _device_dtype(phi.dtype, self._host_in, self._dev, _bf16_bits)
        self._budget = _checks.workspace_budget(
            workspace_bytes, "numpy" if self._xp is np else "cupy", self._xp
        )
        cpu = self._on_cpu = self._xp is np and not getattr(self._dev, "emulates_gpu", False)
        lay_phi = sl.fix_layout(phi, self._host_in, cpu)
        self._kernel, self._fused_cfg = pick_kernel(
            kernel,
            self._dev,
            self._variant,
            isinstance(self._budget, _driver.DefaultBudget),
            self._host_in or lay_phi is not None,
            self._l,
            self._n,
            self._dtype,
            self._precision,
            self._m,
        )
        self._ldt = np.float64 if phi.dtype == np.float64 else np.float32
        self._chunks = Chunking(
            self._dev,
            sl,
            self._ddtype,
            self._variant,
            self._budget,
            _cpu_pool.CPU_CHUNK_PHI_BYTES if cpu else 0,
        )
        self._tri = self._chunks.tri = _triangle.pick(
            self._dev, self._kernel, self._variant, self._n, self._ddtype
        )
        self._gpu = GpuCalls(self._dev, self._m, self._fused_cfg)
        self._launch_reduce = hasattr(self._dev, "loss_total")  # the GPU device (or its emulator)
        self._cpu = _cpu_pool.CpuRunner(self._dev, self._m, self._l, self._n, self._ddtype)
        self._threads = _cpu_pool.cpu_threads(self._m, self._l, self._n) if cpu else 1

    # -- read-only attributes ----------------------------------------------------------------------

    shape = property(lambda self: self._shape, doc="The shape of the arrays this plan takes.")
    dtype = property(lambda self: self._dtype, doc="The dtype of the arrays this plan takes.")
    strides = property(lambda self: self._strides, doc="The strides (bytes) of the arrays this plan takes.")
    axis = property(lambda self: self._axis, doc="The axis that indexes the slices (0..2).")
    m = property(lambda self: self._m, doc="The number of slices.")
    l = property(lambda self: self._l, doc="The rows of one slice.")  # noqa: E741
    n = property(lambda self: self._n, doc="The columns of one slice (the Gram is n x n).")
    beta = property(lambda self: self._beta, doc="The weight of the loss (a float).")
    reduction = property(lambda self: self._reduction, doc='"sum", "mean" or "none".')
    want = property(lambda self: self._want, doc='What a call returns: "loss", "grad" or "loss_and_grad".')
    precision = property(lambda self: self._precision, doc='"highest" or "tf32".')
    backend = property(lambda self: self._resolved, doc='The resolved backend: "numpy" or "cupy".')
    kernel = property(lambda self: self._kernel, doc='The path: "gemm" (two GEMMs) or "fused" (one kernel).')
    gram = property(
        lambda self: "triangle" if self._tri else "full", doc='The Gram GEMM: "full" or "triangle".'
    )
    is_cupy = property(lambda self: self._is_cupy, doc="Whether the plan takes CuPy arrays.")
    variant = property(
        lambda self: self._variant, doc="The member of the penalty family (`_penalty.Variant`)."
    )

    def __repr__(self) -> str:
        kind = "cupy" if self._is_cupy else "numpy"
        return (
            f"Plan({kind} {self._shape} {self._dtype}, axis={self._axis}, m={self._m} slices of "
            f"{self._l}x{self._n}, reduction={self._reduction!r}, want={self._want!r}, "
            f"backend={self._resolved!r})"
        )

    # -- checks ------------------------------------------------------------------------------------

    def _view(self, a: Any) -> Any:
        return self._slices.view(a)

    def _check_call(self, phi: Any, out: Any, accumulate: Any) -> bool:
        """ValueError unless a call with these arrays fits the plan; whether it wants the gradient."""
        why = _mismatch(self, phi)
        if why is not None:
            raise ValueError(f"this plan does not fit phi: {why}")
        want_grad = self._want != "loss"
        if not want_grad and (out is not None or accumulate):
            raise ValueError("a plan made with want='loss' takes no out= or accumulate=")
        if want_grad:
            self._check_out(out, phi, accumulate)
        return want_grad

    def _check_out(self, out: Any, phi: Any, accumulate: Any) -> None:
        _checks.check_out(out, phi, accumulate, self._is_cupy)

    # -- running -----------------------------------------------------------------------------------

    def __call__(self, phi: Any, out: Any = None, accumulate: bool = False) -> Any:
        """What `want` names for `phi` (an array like the plan's): the loss, the gradient (into `out`
        when given, added to it when accumulate=True), or both as (loss, grad).

        Raises:
            ValueError: phi does not match the plan (naming what differs), or `out` does not fit.
        """
        want_grad = self._check_call(phi, out, accumulate)
        loss, grad = self._execute(phi, out, accumulate, self._beta, want_grad)
        if self._want == "loss":
            return loss
        if self._want == "grad":
            return grad
        return loss, grad

    def _chunk_for(self, want_grad: bool, accumulate: bool = False) -> int:
        return self._chunks.chunk_for(want_grad, accumulate)

    def _execute(
        self,
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
        """(loss, grad) for an array that matches the plan, arguments already checked (see `execute`)."""
        return _plan_run.run(
            self,
            phi,
            out,
            accumulate,
            beta,
            want_grad,
            gram_hook=gram_hook,
            chunk=chunk,
            alloc=alloc,
            losses=losses,
        )

    def _alloc(self, shape: tuple, dtype: Any) -> Any:
        return self._xp.empty(shape, dtype=dtype)

    def _reduce(self, losses: Any, beta: float) -> Any:
        return _plan_run.reduce(self, losses, beta)

    def _reduce_into(self, losses: Any, beta: float, buf: Any) -> None:
        _plan_run.reduce_into(self, losses, beta, buf)

    def graph(self, phi: Any, out: Any = None, accumulate: bool = False) -> GraphedCall:
        """Capture one call for these arrays into a CUDA graph.

        The `GraphedCall`'s `replay()` re-runs both GEMMs (or the fused kernel), the elementwise
        pass and the loss reduction with one launch, for the same `phi` and `out` addresses (their
        contents may change between replays). Workspaces and results are allocated once, here; each
        replay overwrites the returned loss and gradient arrays.

        Args:
            phi: a CuPy array like the plan's, in a layout BLAS reads in place (no staging copies).
            out: where the gradient goes (same rules as for a call), or None for an array of its own.
            accumulate: add the gradient into `out` on each replay.

        Returns:
            The `GraphedCall`.

        Raises:
            ValueError: not the GPU backend with a CuPy phi, a staged layout, or a call the plan refuses.

        Example:
            >>> g = plan.graph(phi)  # doctest: +SKIP
            >>> loss, grad = g.replay()  # doctest: +SKIP
        """
        want_grad = self._check_call(phi, out, accumulate)
        if not self._is_cupy or self._xp is np:
            raise ValueError("graph() needs the GPU backend and a CuPy phi")
        return GraphedCall(self, phi, out, bool(accumulate), want_grad)


class GraphedCall:
    """A plan's call captured in a CUDA graph (see `Plan.graph`); `replay()` returns what the plan's
    `want` names, as arrays that the next replay overwrites."""

    def __init__(self, plan: Plan, phi: Any, out: Any, accumulate: bool, want_grad: bool):
        import cupy

        self.plan, self.phi, self.out = plan, phi, out
        V = plan._view(phi)
        if plan.kernel == "gemm" and plan.m and plan.n and plan.l and _driver.layout_of(V) is None:
            raise ValueError("graph() needs a phi whose layout BLAS reads in place (this one is staged)")
        if (
            out is not None
            and plan.kernel == "gemm"
            and plan.l
            and _driver.layout_of(plan._view(out)) is None
        ):
            raise ValueError("graph() needs an out whose layout BLAS reads in place (this one is staged)")
        target = out if out is not None else (cupy.empty_like(phi) if want_grad else None)
        self.grad = target
        self.losses = cupy.empty(plan.m, dtype=np.float64)
        self._loss_buf = cupy.empty(plan.m if plan.reduction == "none" else 1, dtype=plan._ldt)
        self.loss = self._loss_buf if plan.reduction == "none" else self._loss_buf.reshape(())
        bufs: list = []

        def record(shape: tuple, dtype: Any) -> Any:
            bufs.append(cupy.empty(shape, dtype=dtype))
            return bufs[-1]

        # a first, uncaptured run compiles the kernels and makes the workspaces; it writes only
        # buffers of its own (the user's out is not touched before the first replay)
        scratch = cupy.empty_like(target) if (target is not None and target is out) else target
        execute(plan, phi, scratch, False, plan.beta, want_grad, alloc=record, losses=self.losses)
        reduce_into(plan, self.losses, plan.beta, self._loss_buf)  # compiles and loads its kernel now
        it = iter(bufs)

        def again(shape: tuple, dtype: Any) -> Any:
            buf = next(it)
            assert buf.shape == tuple(shape) and buf.dtype == dtype, "capture allocates like the first run"
            return buf

        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                execute(plan, phi, target, accumulate, plan.beta, want_grad, alloc=again, losses=self.losses)
                reduce_into(plan, self.losses, plan.beta, self._loss_buf)
            finally:
                self.graph = stream.end_capture()
        self._stream = stream
        self._keep = bufs  # the graph reads and writes these addresses

    def replay(self) -> Any:
        """Launch the captured call on the current stream; what the plan's `want` names."""
        import cupy

        self.graph.launch(stream=cupy.cuda.get_current_stream())
        if self.plan.want == "loss":
            return self.loss
        if self.plan.want == "grad":
            return self.grad
        return self.loss, self.grad


def _mismatch(plan: Plan, phi: Any) -> str | None:
    """What differs between phi and the arrays `plan` takes (None: nothing)."""
    if type(phi) is not plan._array_type:
        _checks.check_array(
            phi
        )  # not an array at all: the TypeError the functional API raises (docs/errors.md)
        return (
            f"phi is a {type(phi).__module__}.{type(phi).__name__}, the plan's a "
            f"{plan._array_type.__module__}.{plan._array_type.__name__}"
        )
    if phi.shape != plan._shape:
        return f"phi has shape {phi.shape}, the plan's {plan._shape}"
    if phi.dtype != plan._dtype:
        return f"phi has dtype {phi.dtype}, the plan's {plan._dtype}"
    if phi.strides != plan._strides:
        return f"phi has strides {phi.strides}, the plan's {plan._strides} (make a plan for this layout)"
    if plan._is_cupy and phi.device.id != plan._device_id:
        return f"phi is on GPU {phi.device.id}, the plan's on GPU {plan._device_id}"
    return None


# -- the one internal interface of the framework layers (torch, distributed) --------------------


def execute(
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
    """(loss, grad) for an array that matches the plan, arguments already checked.

    gram_hook(ws) sees each chunk's Grams (a (count, n*n) array of the plan's array module)
    before the sign pass and may change them in place; chunk caps the slices per chunk (ranks
    that sum partial Grams must cut the same chunks). alloc(shape, dtype) makes the gradient
    (when out is None) and the workspaces, and `losses`, an (m,) float64 array, receives the
    unscaled per-slice losses (the returned loss is then None): how the torch integration keeps
    every allocation in torch's allocator, as a CUDA graph capture needs."""
    return plan._execute(
        phi, out, accumulate, beta, want_grad, gram_hook=gram_hook, chunk=chunk, alloc=alloc, losses=losses
    )


def chunk_for(plan: Plan, want_grad: bool, accumulate: bool = False) -> int:
    """Slices per chunk of a call (readable layouts, no thread split): what `execute(chunk=)` may cap."""
    return plan._chunk_for(want_grad, accumulate)


def reduce_into(plan: Plan, losses: Any, beta: float, buf: Any) -> None:
    """The GPU's loss from the per-slice losses into `buf` (1 entry, or m for reduction="none")."""
    plan._reduce_into(losses, beta, buf)


def check_out(plan: Plan, out: Any, phi: Any, accumulate: Any) -> None:
    """ValueError unless `out` (or None) can take the gradient of `phi`, an array like the plan's."""
    plan._check_out(out, phi, accumulate)


def io(plan: Plan) -> tuple[Any, bool, bool]:
    """(array module the plan computes with, whether a NumPy input runs on the GPU, whether phi is
    2-D): what a caller of `execute(losses=...)` needs to hand back per-slice results like a call."""
    return plan._xp, plan._host_in, plan._slices.squeeze
