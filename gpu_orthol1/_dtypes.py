"""bfloat16 without importing ml_dtypes at `import gpu_orthol1`: recognized by name, made on demand.

NumPy has no bfloat16 of its own; `ml_dtypes.bfloat16` (what JAX hands over) is a NumPy dtype named
"bfloat16", and torch.bfloat16 prints as "torch.bfloat16", so a name test tells them apart from
float16 without importing either library. CuPy has no bfloat16 at all: on the GPU a bfloat16 buffer
travels as an int16 array over the same memory (`BITS`), the "carrier", whose bits cuBLAS reads as
CUDA_R_16BF and the sign pass writes as bfloat16 bit patterns.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BITS = np.dtype(np.int16)  # the bfloat16 carrier on the GPU (and in the sign pass's kernel arguments)

# cudaDataType values by dtype name (CUDA's library_types.h): the int16 carrier is bfloat16
CUDA_ENUM = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14, "int16": 14}


def is_bf16(dtype: Any) -> bool:
    """Whether `dtype` (a NumPy dtype, a torch dtype, or anything printing as one) is bfloat16."""
    return str(dtype) in ("bfloat16", "torch.bfloat16")


def holds_bf16(dtype: Any) -> bool:
    """Whether a device buffer of `dtype` holds bfloat16 numbers: bfloat16 itself or its carrier."""
    return is_bf16(dtype) or dtype == BITS


def bfloat16() -> np.dtype:
    """NumPy's bfloat16 dtype (ml_dtypes), imported on first use; TypeError naming the package if absent."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(
            "bfloat16 arrays need the ml_dtypes package (pip install ml_dtypes; JAX installs it)"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)
