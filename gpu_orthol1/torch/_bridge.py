"""The tensor bridge shared by gpu_orthol1.torch and gpu_orthol1.distributed: argument checks on
tensors, zero-copy conversion between torch tensors and NumPy/CuPy arrays, torch's current CUDA stream
for CuPy, the core device per torch device, and the (m, l, n) slice views of a parameter.

Imports nothing above the core (gpu_orthol1.torch._core): both framework packages build on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from . import _core

_NP_DTYPE = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
# what the core may ask torch's allocator for: the operand dtypes, bfloat16's int16 carrier, and bytes
# (the cuBLAS workspace)
_TORCH_DTYPE = {np.dtype(v): k for k, v in _NP_DTYPE.items()} | {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(_core.BF16_BITS): torch.int16,
}
_OK_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# checks and zero-copy conversion


def _is_dtensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and type(t).__module__.startswith("torch.distributed")


def _check_tensor(t: Any, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(
            f"{what} is a {t.layout} tensor; gpu_orthol1 needs a dense (strided) tensor "
            "(call .to_dense() first if that is what you mean)"
        )
    if t.is_complex():
        raise TypeError(f"{what} is complex ({t.dtype}); the L1 orthogonality loss here is for real matrices")
    if t.dtype not in _OK_DTYPES:
        raise TypeError(f"{what} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} is on device {t.device}; gpu_orthol1 runs on CPU and CUDA tensors only")


@contextmanager
def _on_torch_stream(device: torch.device) -> Iterator[None]:
    """CuPy (and the core's cuBLAS handle and Numba launches) on torch's current stream of `device`."""
    import cupy

    with cupy.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()):
        # Stream.from_external reads torch's __cuda_stream__ (CuPy 14 deprecates ExternalStream)
        with cupy.cuda.Stream.from_external(torch.cuda.current_stream(device)):
            yield


_devices: dict[tuple[torch.device, str], Any] = {}


def _core_device(device: torch.device, precision: str = "highest") -> Any:
    """The core device for tensors on `device` and a resolved precision, made once per pair (call inside
    `_on_torch_stream` for CUDA: `bind()` picks up the current stream at each call)."""
    dev = _devices.get((device, precision))
    if dev is None:
        dev = _devices[device, precision] = _core.make_device(
            "numpy" if device.type == "cpu" else "cupy", precision
        )
    return dev


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype of a torch floating dtype (bfloat16: ml_dtypes')."""
    return _core.bfloat16() if dtype == torch.bfloat16 else np.dtype(_NP_DTYPE[dtype])


def _host_array(t: torch.Tensor) -> np.ndarray:
    """The NumPy array on a detached CPU tensor's memory (bfloat16: an ml_dtypes view of its bits)."""
    if t.dtype == torch.bfloat16:  # .numpy() refuses bfloat16
        return t.view(torch.int16).numpy().view(_core.bfloat16())
    return t.numpy()


# ---------------------------------------------------------------------------------------------
# precision: the float32 GEMMs' ("highest" or "tf32"), None following torch's own setting

PRECISIONS = (None, "highest", "tf32")


def _check_precision(precision: Any) -> str | None:
    """precision as given (None, "highest" or "tf32"), or a one-line ValueError."""
    if precision is not None and (not isinstance(precision, str) or precision not in PRECISIONS):
        raise ValueError(f"precision must be None, 'highest' or 'tf32', got {precision!r}")
    return precision


def _resolve_precision(precision: str | None) -> str:
    """The precision of this call: a given one, or for None torch's float32 matmul setting as it is
    now ("highest" -> "highest"; "high", "medium" -> "tf32"), so that a later
    torch.set_float32_matmul_precision applies to objects made before it."""
    return _torch_precision() if precision is None else precision


# Dynamo cannot trace a torch call that returns a str: under torch.compile this runs once at trace time
# and its result is a constant of the graph. The graph stays right when the setting changes: dynamo's
# global-state guard covers torch's TF32 flag for cuBLAS, so a changed setting recompiles (a test checks).
@torch.compiler.assume_constant_result
def _torch_precision() -> str:
    try:
        p = torch.get_float32_matmul_precision()
    except RuntimeError:
        # torch >= 2.9 raises here once its per-backend API (torch.backends.cuda.matmul.fp32_precision)
        # and the legacy one were both used; cuBLAS matmul's own setting is then the one to follow
        p = "high" if getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32" else "highest"
    return "highest" if p == "highest" else "tf32"


def _to_array(t: torch.Tensor) -> Any:
    """The NumPy (CPU) or CuPy (CUDA) array on t's memory: no copy. t must be detached. A CUDA bfloat16
    tensor comes as an int16 CuPy array over its bits (CuPy has no bfloat16: the core's carrier)."""
    if t.device.type == "cpu":
        return _host_array(t)
    import cupy

    return cupy.from_dlpack(t.view(torch.int16) if t.dtype == torch.bfloat16 else t)


def _from_array(a: Any, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.from_numpy(np.asarray(a))
    return torch.from_dlpack(a)


# ---------------------------------------------------------------------------------------------
# the (m, l, n) slice view of a parameter (core convention: the Gram is Phi_i^T Phi_i, n x n)


def _flat_order(x: torch.Tensor) -> list[int]:
    """Dims 1.. of x in memory order (outermost first): the column order of its (out, -1) flattening."""
    strides = x.stride()
    return sorted(range(1, x.dim()), key=lambda d: -strides[d])


def _slices(x: torch.Tensor, how: str, axis: int, transpose: bool) -> torch.Tensor:
    """(m, l, n) view of x without copying: how is "matrix" (2-D), "flatten" (Conv: (out, -1)) or
    "stack" (3-D, slices along axis); transpose puts the rows' Gram (l x l) in the core's place."""
    if how == "matrix":
        v = x.unsqueeze(0)
    elif how == "flatten":
        # flatten dims 1.. in memory order: the loss and the row Gram do not depend on the order of the
        # flattened columns, and this keeps channels_last weights a view
        xp = x.permute(0, *_flat_order(x))
        try:
            v = xp.view(x.shape[0], -1).unsqueeze(0)
        except RuntimeError:
            raise ValueError(
                f"a {tuple(x.shape)} parameter with strides {x.stride()} cannot be flattened "
                "to (out, -1) without a copy"
            ) from None
    else:
        v = x if axis == 0 else x.movedim(axis, 0)  # movedim costs a dispatch even as a no-op
    return v.transpose(1, 2) if transpose else v


def _host_slices(a: np.ndarray, how: str, axis: int, transpose: bool) -> np.ndarray:
    """`_slices` on the NumPy array over a CPU tensor's memory ("matrix" or "stack"): the same (m, l, n)
    view, made by NumPy (a view costs far less there than a torch op's dispatch on small inputs)."""
    if how == "matrix":
        v = a[None]
    elif axis == 0:
        v = a
    else:
        v = a.transpose((axis,) + tuple(d for d in range(3) if d != axis))
    return v.transpose(0, 2, 1) if transpose else v


def _pick_transpose(mode: str | None, l: int, n: int) -> bool:
    if mode in (None, "columns"):
        return False
    if mode == "rows":
        return True
    return l < n  # "auto": the smaller Gram


# ---------------------------------------------------------------------------------------------
# the weight of a pass in device memory (CUDA graphs)


class _DeviceWeights:
    """OrthoL1's weight (every * beta(step), times the world size under split=) in device memory, for
    the GPU device: per device a float64 scalar (what the loss total is multiplied by) and, per
    (dtype, scale, GEMM beta), the 2-entry array [2 * scale * weight, GEMM beta] that the gradient
    GEMM reads as its coefficients in cuBLAS's device pointer mode. A CUDA graph that captured a pass
    holds their addresses, not their values, so writing a new weight (`write`, by `OrthoL1.advance`)
    before a replay changes what the replay applies, without a new capture.

    Outside a capture each pass writes the current weight first (a fill launch per array, no host
    sync); while the stream captures, nothing is written (a write would be recorded in the graph and
    replay the capture-time value), and the arrays must exist from an eager pass before."""

    def __init__(self) -> None:
        self._scalars: dict = {}  # device -> float64 0-d tensor
        self._coefs: dict = {}  # (device, dtype, scale, gemm beta) -> 2-entry tensor
        self.value = 0.0  # the weight last written
        self.fixed: float | None = None  # set when a capture ran per-tensor parameters at this weight

    @staticmethod
    def capturing(device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def _missing(self) -> ValueError:
        return ValueError(
            "OrthoL1 under CUDA graph capture: run the same call once eagerly before capturing (the "
            "device scalars that carry beta into the graph are made there, as torch.cuda.graph's warm-up)"
        )

    def scalar(self, device: torch.device, weight: float) -> torch.Tensor:
        """The float64 weight scalar on `device`, holding `weight` unless a capture is running."""
        t = self._scalars.get(device)
        if self.capturing(device):
            if t is None:
                raise self._missing()
            return t
        if t is None:
            t = self._scalars[device] = torch.zeros((), dtype=torch.float64, device=device)
        t.fill_(weight)
        self.value = weight
        return t

    def coefficients(
        self, device: torch.device, dtype: torch.dtype, scale: float, gemm_beta: float
    ) -> torch.Tensor:
        """[2 * scale * weight, gemm_beta] in `dtype` on `device` (the weight `scalar` wrote last)."""
        key = (device, dtype, scale, gemm_beta)
        c = self._coefs.get(key)
        if self.capturing(device):
            if c is None:
                raise self._missing()
            return c
        if c is None:
            c = self._coefs[key] = torch.full((2,), gemm_beta, dtype=dtype, device=device)
        c[0].fill_(2.0 * scale * self.value)
        return c

    def write(self, weight: float) -> None:
        """Put `weight` into every scalar and coefficient array (outside a capture): what the next
        replay of a captured pass applies. ValueError, writing nothing, when a capture ran parameters
        of the per-tensor path (layouts BLAS cannot read in place), whose beta the graph holds as a value."""
        if self.fixed is not None and weight != self.fixed:
            raise ValueError(
                f"OrthoL1.advance(): a captured CUDA graph holds weight {self.fixed!r} for parameters whose "
                f"layout BLAS cannot read in place (the per-tensor path reads beta from the host), so it cannot "
                f"apply {weight!r}; make those parameters contiguous before capturing, or keep beta constant "
                "with every=1"
            )
        self.value = weight
        for t in self._scalars.values():
            t.fill_(weight)
        for (_, _, scale, _), c in self._coefs.items():
            c[0].fill_(2.0 * scale * weight)
