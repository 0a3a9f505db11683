"""Address arrays for cuBLAS's pointer-array GEMMs, written on the device by a kernel.

`OrthoL1` batches separate matrices (a model's parameters) through ``?gemmBatched``, which reads
three device arrays of matrix addresses. Copying those arrays from the host would need either a
synchronization (to keep a cached copy safe from every stream) or a host-to-device copy during a
CUDA graph capture; both break `torch.cuda.graph` capture of the call. Instead the addresses go
in as kernel parameters -- `SLOTS` of them per launch, a UniTuple that Numba flattens into
SLOTS 64-bit parameters -- and this kernel stores them into a buffer of the call's workspace,
in stream order. A captured graph records the parameters, so each replay writes the same
addresses again.

`numba.cuda` is imported here: import this module lazily.
"""

from __future__ import annotations

from ._compat import check_numba_cuda_numpy

check_numba_cuda_numpy()

from numba import cuda  # noqa: E402

SLOTS = 128  # addresses per launch: 1 KiB of the 4 KiB a launch's parameters may take

_kernels: dict = {}


def _make_fill_kernel(slots):
    @cuda.jit
    def fill_addresses(out, first, count, vals):
        """out[first + i] = vals[i] for i < count (count <= slots): one block of `slots` threads."""
        i = cuda.threadIdx.x
        if i < count:
            out[first + i] = vals[i]

    return fill_addresses


def get_fill_kernel(slots: int = SLOTS):
    """The kernel that stores `slots` addresses (kernel parameters) into a uint64 array."""
    kern = _kernels.get(slots)
    if kern is None:
        kern = _kernels[slots] = _make_fill_kernel(slots)
    return kern
