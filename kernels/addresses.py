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


# -- the blocked triangle of the Gram (gpu_orthol1._triangle) -----------------------------------

TRIANGLE_THREADS = 128


def _make_triangle_kernel():
    from numba import uint64

    @cuda.jit
    def triangle_addresses(
        out, bases, strided, phi0, phi_step, count, nblocks, col_bytes, ws0, ws_step, row_bytes, blk_bytes
    ):
        """The A, B and C address arrays of the blocked-triangle Gram GEMM, in one launch.

        Entry e = s * P + q (P = nblocks (nblocks + 1) / 2 block pairs per slice, pair q = (I, J) with
        I <= J, row by row): A is column block J of slice s's phi, B column block I, C the Gram's
        block at (row I, column J) of slice s in the row-major view the sign pass reads (row_bytes:
        one block row, blk_bytes: one block column of the Gram; col_bytes: one block of phi's columns). Slice s's
        phi starts at phi0 + s * phi_step (`strided`) or at bases[s] (separate matrices). Addresses
        and byte counts are uint64 throughout: NumPy's rules would turn int64 + uint64 into float64.
        out: 3 * count * P uint64 entries (A's, then B's, then C's)."""
        e = uint64(cuda.blockIdx.x) * uint64(cuda.blockDim.x) + uint64(cuda.threadIdx.x)
        pairs = nblocks * (nblocks + uint64(1)) // uint64(2)
        total = count * pairs
        if e >= total:
            return
        s = e // pairs
        left = e - s * pairs
        i = uint64(0)
        while left >= nblocks - i:
            left -= nblocks - i
            i += uint64(1)
        j = i + left
        base = phi0 + s * phi_step if strided else bases[s]
        out[e] = base + j * col_bytes
        out[total + e] = base + i * col_bytes
        out[uint64(2) * total + e] = ws0 + s * ws_step + i * row_bytes + j * blk_bytes

    return triangle_addresses


def get_triangle_kernel():
    """The kernel that writes the blocked-triangle GEMM's three address arrays (compiled once)."""
    kern = _kernels.get("triangle")
    if kern is None:
        kern = _kernels["triangle"] = _make_triangle_kernel()
    return kern
