"""Keras 3: the orthogonality penalty as a kernel regularizer, on the JAX and torch backends.

    import keras
    from gpu_orthol1.keras import OrthoL1Regularizer, orthogonal

    keras.layers.Dense(64, kernel_regularizer=OrthoL1Regularizer(1e-3, mode="columns"))
    keras.layers.Conv2D(32, 3, kernel_regularizer=orthogonal(0.01, mode="columns"))

Keras lays kernels out with the output units LAST: Dense (in, out), Conv1D (k, in, out), Conv2D
(kh, kw, in, out), Conv3D (kd, kh, kw, in, out). A kernel of 3 or more dims is flattened to the matrix
(prod(other dims), out) by a reshape (no copy); every mode names rows and columns of that matrix:

- mode="columns": the out x out Gram of the output units (filters): each unit's weight vector is kept
  orthogonal to the others. This is PyTorch's mode="rows" on a Linear / Conv weight (out, in, ...).
- mode="rows": the in x in Gram (prod(other dims) x same for a conv kernel).
- mode="auto": the smaller of the two (the Gram that can reach the identity).

Keras's own `OrthogonalRegularizer` defaults to mode="rows" on the kernel as stored and takes rank-2
kernels only; `orthogonal(factor, mode)` computes exactly its value on rank-2 kernels (see below) and
extends it to conv kernels by the flattening above.

The backend is the one Keras was imported with (KERAS_BACKEND, fixed per process): "jax" computes
through `gpu_orthol1.jax`, "torch" through `gpu_orthol1.torch`; others raise.
"""

from __future__ import annotations

from typing import Any

try:
    import keras
except ImportError as _e:  # keras is an optional extra
    raise ImportError(
        "gpu_orthol1.keras needs Keras 3, which is not installed: pip install 'gpu_orthol1[keras]' and set "
        f"KERAS_BACKEND=jax or torch before importing keras ({_e})"
    ) from _e

from . import _checks, _penalty

__all__ = ["OrthoL1Regularizer", "orthogonal"]

MODES = ("rows", "columns", "auto")


def _backend_fn(backend: str):
    if backend == "jax":
        from . import jax as jax_frontend

        return jax_frontend.ortho_l1
    if backend == "torch":
        from . import torch as torch_frontend

        return torch_frontend.ortho_l1
    raise TypeError(
        f"gpu_orthol1.keras runs on the Keras backends 'jax' and 'torch', not {backend!r}; "
        "set KERAS_BACKEND=jax or torch before importing keras"
    )


@keras.saving.register_keras_serializable(package="gpu_orthol1")
class OrthoL1Regularizer(keras.regularizers.Regularizer):
    """The L1 orthogonality penalty (or another family member) of a Dense or Conv kernel.

    Args:
        beta: the weight (a non-negative real number).
        mode: "columns" (out x out Gram of the output units), "rows" (in x in), "auto" (default, the
            smaller Gram), of the kernel flattened to (prod(other dims), out).
        penalty: "l1" (sum of |G - I|) or "l2" (sum of squares); docs/penalties.md.
        diagonal: False leaves the Gram's diagonal free (only off-diagonal entries count).
        normalize: True uses the Gram of the unit-normalized rows or columns.
        keras_scale: divide each kernel's penalty by size * (size - 1) (Keras's mean over the
            off-diagonal entries; `orthogonal()` sets it).

    Called on a kernel, it returns the penalty: a 0-d tensor of the backend (float64 for float64
    kernels, float32 otherwise), differentiable by the backend's autodiff.

    Raises:
        ValueError: a wrong mode, penalty keyword or beta; a kernel of fewer than 2 dims.
        TypeError: a Keras backend other than jax or torch.

    Example:
        >>> import os
        >>> _ = os.environ.setdefault("KERAS_BACKEND", "jax")  # or "torch": fixed at keras's first import
        >>> import keras
        >>> from gpu_orthol1.keras import OrthoL1Regularizer
        >>> layer = keras.layers.Dense(16, kernel_regularizer=OrthoL1Regularizer(1e-3, mode="columns"))
    """

    def __init__(
        self,
        beta: float = 1e-3,
        mode: str = "auto",
        penalty: str = "l1",
        diagonal: bool = True,
        normalize: bool = False,
        keras_scale: bool = False,
    ):
        self.beta = _checks.check_beta(beta)
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.variant = _penalty.check(penalty, diagonal, normalize)
        self.mode = mode
        self.keras_scale = bool(keras_scale)

    def __call__(self, x: Any) -> Any:
        """The penalty of one kernel.

        Args:
            x: a kernel of 2 or more dims (a keras.Variable or the backend's tensor).

        Returns:
            A 0-d tensor of the backend, differentiable by its autodiff.

        Raises:
            ValueError: a kernel of fewer than 2 dims.
            TypeError: a Keras backend other than jax or torch.

        Example:
            >>> import os
            >>> _ = os.environ.setdefault("KERAS_BACKEND", "jax")
            >>> import keras
            >>> from gpu_orthol1.keras import OrthoL1Regularizer
            >>> reg = OrthoL1Regularizer(1e-3, mode="columns")
            >>> round(float(reg(2 * keras.ops.eye(8, 4))), 6)  # G = 4 I (4 x 4): sum |G - I| = 12, times beta
            0.012
        """
        x = keras.ops.convert_to_tensor(x)  # a keras.Variable -> the backend's array (traced under jit)
        if len(x.shape) < 2:
            raise ValueError(
                f"OrthoL1Regularizer takes kernels of 2 or more dims, got shape {tuple(x.shape)}"
            )
        if len(x.shape) > 2:  # conv kernel (..., in, out): the output units are the columns
            x = x.reshape(-1, x.shape[-1])
        l, n = x.shape
        mode = self.mode if self.mode != "auto" else ("rows" if l < n else "columns")
        beta = self.beta
        if self.keras_scale:
            size = l if mode == "rows" else n
            beta = beta / (size * (size - 1)) if size > 1 else 0.0
        fn = _backend_fn(keras.backend.backend())
        return fn(
            x,
            beta,
            mode=mode,
            penalty=self.variant.penalty,
            diagonal=self.variant.diagonal,
            normalize=self.variant.normalize,
        )

    def get_config(self) -> dict:
        """The constructor's keywords (Keras serialization: `from_config(get_config())` is equal).

        Returns:
            A dict of the keywords, JSON-serializable.

        Example:
            >>> import os
            >>> _ = os.environ.setdefault("KERAS_BACKEND", "jax")
            >>> from gpu_orthol1.keras import OrthoL1Regularizer
            >>> OrthoL1Regularizer.from_config(OrthoL1Regularizer(1e-3, mode="rows").get_config()).mode
            'rows'
        """
        return {
            "beta": self.beta,
            "mode": self.mode,
            "penalty": self.variant.penalty,
            "diagonal": self.variant.diagonal,
            "normalize": self.variant.normalize,
            "keras_scale": self.keras_scale,
        }


def orthogonal(factor: float = 0.01, mode: str = "rows") -> OrthoL1Regularizer:
    """Keras 3's `OrthogonalRegularizer(factor, mode)`, extended to conv kernels.

    Keras normalizes the rows (mode="rows") or columns ("columns") of a rank-2 kernel to unit L2 norm,
    forms their Gram P (size x size) and returns factor * 0.5 * sum |P * (1 - I)| / (size * (size - 1) / 2):
    factor times the mean |off-diagonal entry|. This is the L1 penalty with diagonal=False,
    normalize=True and beta = factor / (size * (size - 1)). A conv kernel (..., in, out) is flattened to
    (prod(other dims), out) first (Keras itself raises on it): mode="columns" then regularizes the output
    filters. Differences, both outside the usual range: Keras scales a row of norm below its epsilon
    1e-7 by 1e7 instead of normalizing it (here a zero row stays zero), and for size 1 Keras returns
    NaN (0 / 0) where this returns 0.

    Args:
        factor: Keras's factor (a non-negative real number).
        mode: "rows" (Keras's default) or "columns".

    Returns:
        An OrthoL1Regularizer (serializable; its config records the preset's keywords).

    Raises:
        ValueError: a mode other than "rows" / "columns", or a wrong factor.

    Example:
        >>> import os
        >>> _ = os.environ.setdefault("KERAS_BACKEND", "jax")
        >>> import keras
        >>> from gpu_orthol1.keras import orthogonal
        >>> layer = keras.layers.Conv2D(8, 3, kernel_regularizer=orthogonal(0.01, "columns"))
        >>> float(orthogonal(0.01, "columns")(keras.ops.eye(8, 4)))  # orthonormal columns
        0.0
    """
    if mode not in ("rows", "columns"):
        raise ValueError(f"mode must be 'rows' or 'columns' (Keras's modes), got {mode!r}")
    return OrthoL1Regularizer(factor, mode, penalty="l1", diagonal=False, normalize=True, keras_scale=True)
