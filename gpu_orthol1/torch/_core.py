"""The one door from the framework layers (gpu_orthol1.torch, gpu_orthol1.distributed) into the core.

Every call the torch and distributed code makes into the core goes through these functions: the
argument checks (`_checks`), the plan cache (`_cache`), the core devices (`_device`) and the plan
hooks of the internal interface (`_plan.execute`, `_plan.chunk_for`), so that what the framework
layers need from the core is named in one place. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

from .. import _cache, _checks, _device, _dtypes, _metrics, _plan, _triangle

REDUCTIONS = _checks.REDUCTIONS
METRIC_KEYS = _metrics.KEYS
BF16_BITS = (
    _dtypes.BITS
)  # how a CUDA bfloat16 tensor reaches the core: an int16 CuPy view (CuPy has no bfloat16)


def bfloat16() -> Any:
    """NumPy's bfloat16 dtype (ml_dtypes), imported on first use."""
    return _dtypes.bfloat16()


def cached(
    phi: Any,
    axis: int,
    reduction: str,
    precision: str,
    backend: str,
    workspace_bytes: int | None,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    bf16_bits: bool = False,
) -> Any:
    """The functional API's cached plan for phi's layout (bf16_bits: phi is bfloat16's int16 carrier)."""
    return _cache.cached(
        phi, axis, reduction, precision, backend, workspace_bytes, penalty, diagonal, normalize, bf16_bits
    )


def check_beta(beta: Any, what: str = "beta") -> float:
    return _checks.check_beta(beta, what)


def check_workspace_bytes(workspace_bytes: Any) -> int | None:
    return _checks.check_workspace_bytes(workspace_bytes)


def workspace_budget(workspace_bytes: int | None, resolved: str, xp: Any) -> int:
    return _checks.workspace_budget(workspace_bytes, resolved, xp)


def make_device(resolved: str, precision: str) -> Any:
    return _device.make_device(resolved, precision)


def execute(
    plan: Any,
    phi: Any,
    out: Any,
    accumulate: bool,
    beta: float,
    want_grad: bool,
    *,
    gram_hook: Any = None,
    chunk: int | None = None,
    alloc: Any = None,
    losses: Any = None,
) -> Any:
    """The plan's run on phi with the framework layers' hooks (workspaces from their allocator, the
    per-slice losses into their buffer, a Gram hook for the distributed all-reduce)."""
    return _plan.execute(
        plan,
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


def triangle_block(dev: Any, variant: Any, n: int, dtype: Any) -> int:
    """The block size of the Grams' blocked triangle for a two-GEMM run on `dev` (the rule a plan
    follows, `_triangle.pick`: large n on a GPU device, GPU_ORTHOL1_GRAM), 0 for the full GEMM."""
    return int(_triangle.pick(dev, "gemm", variant, n, dtype))


def chunk_for(plan: Any, want_grad: bool, accumulate: bool = False) -> int:
    return _plan.chunk_for(plan, want_grad, accumulate)


def metrics_collector(xp: Any, m: int, n: int, first: int = 0, bufs: dict | None = None) -> Any:
    """A `gram_hook` filling per-slice metric buffers (`_metrics.Collector`), for OrthoL1's metrics."""
    return _metrics.Collector(xp, m, n, first, bufs)


def chunk_metrics(xp: Any, ws: Any, n: int, max_cos: Any, fro: Any, mean_abs: Any) -> None:
    """The metrics of a chunk of Grams into the given buffers (`_metrics.chunk_metrics`)."""
    _metrics.chunk_metrics(xp, ws, n, max_cos, fro, mean_abs)
