"""The fused pass over the Gram workspace: G -> S = sign(G - I), per-slice sum |G - I|.

One CUDA block handles one slice (a row of the 2-D workspace), so the slice's
loss is reduced inside the block in a fixed order: no float atomics, and the
same input gives the bit-identical loss on every call. Because the block owns
the whole slice, it can also apply the NaN policy in the same launch: when the
slice's sum is not finite (NaN or Inf anywhere in G), the block overwrites the
slice's S with NaN, so the gradient GEMM that follows returns NaN for every
entry of that slice instead of a mix of NaN, Inf and finite values.

`numba.cuda` is imported here, so import this module lazily (the host code
does), and after NUMBA_ENABLE_CUDASIM is set when running under the simulator.
"""

from __future__ import annotations

import math

from ._compat import check_numba_cuda_numpy

check_numba_cuda_numpy()  # a clear error for numba-cuda 0.30 + NumPy 2.5 (seen on the GPU machine)

from numba import cuda, float64  # noqa: E402

# Threads per block the host may ask for (powers of two, for the tree reduction). A
# compile-time constant per kernel, because the reduction buffer is a shared array
# sized by it. Below a warp is only for the simulator, where every thread is an OS thread.
BLOCK_SIZES = (4, 8, 16, 32, 64, 128, 256, 512, 1024)

_kernels: dict = {}


def _make_kernel(tpb):
    @cuda.jit
    def sign_abs_sum(g, s, n, losses, loss_offset, scale, write_s):
        """g: (slices, n*n) Gram rows (any float dtype); s: same shape, may be g itself;
        losses: float64 (m,), slice b of this launch writes losses[loss_offset + b];
        s gets scale * sign(g - I) when write_s is true (loss-only calls skip those writes)."""
        b = cuda.blockIdx.x
        t = cuda.threadIdx.x
        nn = n * n
        acc = float64(0.0)
        k = t
        while k < nn:
            x = float64(g[b, k])
            if k % (n + 1) == 0:  # diagonal entry j*n + j
                x -= 1.0
            acc += abs(x)
            if write_s:
                if x > 0.0:
                    s[b, k] = scale
                elif x < 0.0:
                    s[b, k] = -scale
                elif x == 0.0:
                    s[b, k] = 0.0
                else:  # NaN must stay NaN, not become sign 0
                    s[b, k] = x
            k += tpb

        buf = cuda.shared.array(tpb, float64)
        buf[t] = acc
        cuda.syncthreads()
        width = tpb // 2
        while width > 0:
            if t < width:
                buf[t] += buf[t + width]
            cuda.syncthreads()
            width //= 2
        total = buf[0]
        # Inf - Inf never happens in |.|-sums, so any non-finite slice shows as NaN or +Inf here.
        if not math.isfinite(total):
            k = t if write_s else nn
            while k < nn:
                s[b, k] = math.nan
                k += tpb
            total = math.nan
        if t == 0:
            losses[loss_offset + b] = total

    return sign_abs_sum


def get_kernel(tpb: int):
    """The fused kernel for `tpb` threads per block (compiled lazily, once per size)."""
    if tpb not in BLOCK_SIZES:
        raise ValueError(f"threads per block must be one of {BLOCK_SIZES}, got {tpb}")
    kern = _kernels.get(tpb)
    if kern is None:
        kern = _kernels[tpb] = _make_kernel(tpb)
    return kern


def pick_block_size(n: int) -> int:
    """Enough threads to keep a slice's n*n entries streaming, without idle threads for small n."""
    nn = n * n
    for tpb in BLOCK_SIZES[3:]:
        if tpb * 8 >= nn:
            return tpb
    return BLOCK_SIZES[-1]
