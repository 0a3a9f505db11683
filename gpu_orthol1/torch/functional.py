"""The functional API: `ortho_l1` (one tensor, autograd) and the presets' one-tensor forms
`keras_orthogonal` and `biggan_ortho`.

gpu_orthol1.distributed (DTensor weights) is reached through a function-level import only, so that
importing this package never runs that package's __init__ half-way.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .. import _penalty
from . import _core
from ._bridge import _check_precision, _check_tensor, _is_dtensor, _pick_transpose, _resolve_precision
from ._ops import _ortho_l1_call

MODES = ("rows", "columns", "auto")


def ortho_l1(
    weight: torch.Tensor,
    beta: float = 1.0,
    *,
    axis: int = 1,
    reduction: str = "sum",
    mode: str | None = None,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str | None = None,
) -> torch.Tensor:
    """L1 orthogonality loss of a 2-D weight or of the slices of a 3-D one, as a torch scalar with autograd.

    2-D weight W (l, n): mode None or "columns" penalizes sum |W^T W - I| (n x n), "rows" sum |W W^T - I|
    (l x l), "auto" the smaller of the two. 3-D weight: slices along `axis` (the core's convention,
    each slice (l, n)), with the same modes per slice. reduction "sum" | "mean" (over slices) | "none"
    (per-slice losses, shape (m,); (1,) for 2-D). The loss is float64 for float64 weights, float32
    otherwise. The backward returns the gradient formed in the forward pass (one pass, no recomputation)
    times grad_output. CPU tensors use the NumPy backend on zero-copy views; CUDA tensors the cuBLAS
    backend on torch's current stream.

    Double backward (torch.autograd.grad(..., create_graph=True), gradient penalties, MAML): when the
    backward runs with grad mode on, it forms the gradient again from the saved weight as torch ops
    (the same loss written out: Gram, mask, |.| or square, normalization), which autograd then
    differentiates, so second derivatives are exact (for penalty="l1", 2 beta dW sign(E) with the sign
    held constant, as autograd holds it for |x|). Only that backward pays for it; the first-order one
    is unchanged. Under torch.compile a double backward raises torch's own error ("aot_autograd does
    not currently support double backward"). In-place changes to the weight between the forward and
    the backward raise autograd's usual error (the weight is saved, without a copy, for this).

    Eager calls run through a plain autograd.Function; torch.compile, dispatch modes, functorch
    transforms and CUDA graph capture see the custom op `gpu_orthol1::ortho_l1` (the same function).

    penalty ("l1" | "l2"), diagonal (False: the diagonal is free) and normalize (True: the Gram of
    the unit-normalized rows or columns that `mode` picks) choose the member of the penalty family,
    as in the core API (docs/penalties.md).

    precision (float32 weights on CUDA): "highest" runs the GEMMs in float32, "tf32" on TF32 tensor
    cores; None (default) follows torch.get_float32_matmul_precision() at each call ("highest" ->
    "highest", "high" or "medium" -> "tf32"), as torch's own matmuls do. float64 is always computed in
    full precision; the CPU computes full float32 under either setting (docs/guide.md, precision).

    Args:
        weight: a 2-D or 3-D float tensor (CPU or CUDA; float16, bfloat16, float32, float64), or a
            DTensor (sharded or replicated: `gpu_orthol1.distributed.dtensor_ortho_l1`).
        beta: the loss's factor, finite and >= 0.
        axis: the slice axis of a 3-D weight, in [-3, 3).
        reduction: "sum", "mean" (over slices) or "none" (per-slice losses).
        mode: None or "columns" (W^T W), "rows" (W W^T) or "auto" (the smaller Gram).
        penalty: "l1" or "l2".
        diagonal: False leaves the Gram's diagonal free.
        normalize: True takes the Gram of the unit-normalized rows or columns.
        precision: None (torch's float32 matmul setting), "highest" or "tf32".

    Returns:
        The loss with autograd: 0-D, or (m,) for reduction="none" ((1,) for a 2-D weight).

    Raises:
        TypeError: weight is not a dense real float tensor.
        ValueError: weight is not 2-D or 3-D, or an argument is out of range (axis, reduction, mode,
            beta, penalty family, precision).

    Example:
        >>> lin = torch.nn.Linear(8, 4)
        >>> loss = ortho_l1(lin.weight, beta=1e-3, mode="rows")  # sum |W W^T - I|, W (4, 8)
        >>> loss.backward()
    """
    if _is_dtensor(weight):  # sharded (FSDP2, DTensor): partial Grams summed over ranks, no gather
        from .. import distributed

        return distributed.dtensor_ortho_l1(
            weight, beta, axis, reduction, mode, penalty, diagonal, normalize, precision
        )
    _check_tensor(weight, "weight")
    dim = weight.dim()
    head = (dim, axis, type(axis), reduction, mode, penalty, diagonal, type(diagonal))
    key = (*head, normalize, type(normalize), precision)
    memo = True
    try:
        # (torch.compile traces the checks themselves: a graph need not guard on the memo)
        spec = None if torch.compiler.is_compiling() else _SPECS.get(key)
    except TypeError:  # an unhashable argument: the checks below name it
        memo, spec = False, None
    if spec is None:
        spec = _check_args(weight, axis, reduction, mode, penalty, diagonal, normalize, precision)
        if memo and not torch.compiler.is_compiling():
            if len(_SPECS) >= _SPECS_MAX:
                _SPECS.clear()
            _SPECS[key] = spec
    how, m_axis, variant, li, ni = spec
    shape = weight.shape
    want_grad = torch.is_grad_enabled() and weight.requires_grad
    return _ortho_l1_call(
        weight,
        _core.check_beta(beta),
        reduction,
        how,
        m_axis,
        _pick_transpose(mode, shape[li], shape[ni]),
        want_grad,
        *variant,
        _resolve_precision(precision),
    )


# The checked keyword arguments of recent `ortho_l1` calls (with the weight's dims), and what they
# decide: a repeated call skips the checks (a few microseconds that PointNet-sized inputs feel).
_SPECS: dict[tuple, tuple] = {}
_SPECS_MAX = 256


def _check_args(
    weight: torch.Tensor,
    axis: Any,
    reduction: Any,
    mode: Any,
    penalty: Any,
    diagonal: Any,
    normalize: Any,
    precision: Any,
) -> tuple[str, int, Any, int, int]:
    """(how, slice axis, penalty variant, the dims of l and n in the weight's shape) of an `ortho_l1`
    call, or the errors table's error."""
    _check_precision(precision)
    variant = _penalty.check(penalty, diagonal, normalize)
    if mode not in (None,) + MODES:
        raise ValueError(f"mode must be None, 'rows', 'columns' or 'auto', got {mode!r}")
    if weight.dim() == 2:
        how, m_axis = "matrix", 0
    elif weight.dim() == 3:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -3 <= int(axis) < 3:
            raise ValueError(f"axis must be an integer in [-3, 3) for a 3-D weight, got {axis!r}")
        how, m_axis = "stack", int(axis) % 3
    else:
        raise ValueError(
            "weight must be 2-D (l, n) or 3-D (slices along axis), got shape "
            f"{tuple(weight.shape)}; "
            "use OrthoL1 for Conv weights (flattened to (out, -1))"
        )
    if not isinstance(reduction, str) or reduction not in _core.REDUCTIONS:
        raise ValueError(f"reduction must be one of {_core.REDUCTIONS}, got {reduction!r}")
    li, ni = (d for d in range(weight.dim()) if d != m_axis or how == "matrix")
    return how, m_axis, tuple(variant), li, ni


def keras_orthogonal(
    w: torch.Tensor, factor: float = 0.01, mode: str = "rows", *, precision: str | None = None
) -> torch.Tensor:
    """Keras 3's `OrthogonalRegularizer(factor, mode)(w)` on the 2-D tensor w as given, with autograd.

    Keras normalizes the rows (mode="rows") or columns ("columns") of w to unit L2 norm, forms their
    Gram P (size x size) and returns factor * 0.5 * sum |P * (1 - I)| / (size * (size - 1) / 2), i.e.
    factor * sum |P * (1 - I)| / (size * (size - 1)): factor times the mean |off-diagonal entry|.
    Here that is `ortho_l1(w, factor / (size * (size - 1)), mode=mode, penalty="l1", diagonal=False,
    normalize=True)`.

    The mode applies to w as given, as Keras applies it to the kernel it is handed. A Keras Dense
    kernel is (in, out) and a torch Linear weight (out, in), its transpose: for the penalty Keras
    puts on the matching Dense layer pass `layer.weight.T`, or use `OrthoL1.keras(model, ...)`, whose
    mode is in Keras's layout. Differences, both outside the usual range: Keras scales a row of norm
    below its epsilon 1e-7 by 1e7 instead of normalizing it (here every non-zero row is normalized,
    a zero row stays zero), and for size 1 Keras returns NaN (0 / 0) where this returns 0.

    Args:
        w: a 2-D float tensor (CPU or CUDA).
        factor: Keras's `factor`, finite and >= 0.
        mode: "rows" (Keras's default) or "columns" of w.
        precision: None (torch's float32 matmul setting), "highest" or "tf32", as for `ortho_l1`.

    Returns:
        A 0-D tensor (float64 for float64 w, float32 otherwise) with autograd.

    Raises:
        TypeError: w is not a dense real float tensor.
        ValueError: w is not 2-D, mode is not "rows" or "columns", factor is negative or not finite,
            or precision is not None, "highest" or "tf32".

    Example:
        >>> lin = torch.nn.Linear(8, 4)
        >>> loss = keras_orthogonal(lin.weight.T, 0.01, "rows")  # Keras's Dense(4) kernel regularizer
    """
    _check_tensor(w, "w")
    if w.dim() != 2:
        raise ValueError(f"keras_orthogonal takes a 2-D weight, as Keras does, got shape {tuple(w.shape)}")
    if mode not in ("rows", "columns"):
        raise ValueError(f"mode must be 'rows' or 'columns' (Keras's modes), got {mode!r}")
    factor = _core.check_beta(factor, "factor")
    size = w.shape[0] if mode == "rows" else w.shape[1]
    beta = factor / (size * (size - 1)) if size > 1 else 0.0
    return ortho_l1(w, beta, mode=mode, penalty="l1", diagonal=False, normalize=True, precision=precision)


def biggan_ortho(w: torch.Tensor, strength: float = 1e-4, *, precision: str | None = None) -> torch.Tensor:
    """BigGAN's orthogonal regularization of one weight, with autograd: W = w viewed as (out, -1),
    loss (strength / 2) * sum of squared off-diagonal entries of W W^T. Its gradient is the term
    BigGAN-PyTorch's `utils.ortho(model, strength)` adds to w.grad, 2 * strength * ((W W^T) * (1 - I)) W.
    (`OrthoL1.biggan(model, strength).add_grad_()` does that for every weight of a model at once.)

    Args:
        w: a float tensor of 2 or more dims (CPU or CUDA), viewed as (out, -1).
        strength: BigGAN's `strength`, finite and >= 0.
        precision: None (torch's float32 matmul setting), "highest" or "tf32", as for `ortho_l1`.

    Returns:
        A 0-D tensor (float64 for float64 w, float32 otherwise) with autograd.

    Raises:
        TypeError: w is not a dense real float tensor.
        ValueError: w has fewer than 2 dims, strength is negative or not finite, or precision is not
            None, "highest" or "tf32".

    Example:
        >>> conv = torch.nn.Conv2d(3, 8, 3)
        >>> loss = biggan_ortho(conv.weight, 1e-4)  # W = weight viewed as (8, 27)
    """
    _check_tensor(w, "w")
    if w.dim() < 2:
        raise ValueError(
            f"biggan_ortho takes a weight of 2 or more dims (viewed as (out, -1)), got shape {tuple(w.shape)}"
        )
    beta = _core.check_beta(strength, "strength") / 2
    prec = _resolve_precision(_check_precision(precision))
    how = "matrix" if w.dim() == 2 else "flatten"
    want_grad = torch.is_grad_enabled() and w.requires_grad
    return _ortho_l1_call(w, beta, "sum", how, 0, True, want_grad, "l2", False, False, prec)
