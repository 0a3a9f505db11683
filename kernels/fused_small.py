"""Fully fused loss + gradient for small slices: the Gram never leaves the chip.

One launch does the whole computation, one block per slice:

1. G_i = Phi_i^T Phi_i is accumulated in shared memory, reading Phi_i in tiles of
   rows staged through shared memory. Only the lower triangle is computed and
   stored (packed, entry (j, k), k <= j, at j*(j+1)/2 + k): G is symmetric, so
   this halves the flops and the shared memory, and roughly doubles the largest n
   that fits. Accumulation is float32 for float16/float32 input (a product of two
   float16 values is exact in float32) and float64 for float64 input.
2. The block sums |G_i - I| in float64 (off-diagonal entries counted twice) in a
   fixed order: a strided per-thread loop, then a fixed tree over the threads, no
   atomics, so the loss is bit-identical from call to call for a given config and
   n. Same NaN policy as kernels/sign_abs.py: a non-finite sum makes the slice's
   loss NaN and its whole gradient NaN. In the same pass G is overwritten in
   place by S = sign(G - I) (sign(0) = 0).
3. grad_i = alpha * Phi_i S_i goes straight to `out` (or is added to it), with
   Phi_i re-read tile by tile. There is no Gram workspace in device memory.

The loss is the same quantity as the cuBLAS path's but not bit-identical to it
(different summation order).

Launch: grid = number of slices m, block = config.threads (1-D):

    kern = get_fused_kernel(cfg)   # cfg = fused_config(l, n, dtype)
    kern[m, cfg.threads](phi, out, losses, loss_offset, alpha, accumulate, write_grad)

phi, out: 3-D arrays in the slices-first view (m, l, n), any strides (for the
package's (l, m, n) layout pass phi.transpose(1, 0, 2), no copy), dtype
float16/float32/float64; out has phi's shape, and its own dtype and strides. out is
not touched when write_grad is false (phi may then be passed as out).
losses: float64 array; slice b of the launch writes losses[loss_offset + b], the
unscaled sum |G_b - I| (multiply by beta, or beta/m for a mean, on the host).
alpha: the gradient scale, 2*beta (sum) or 2*beta/m (mean).
accumulate: out += alpha * Phi S instead of out = alpha * Phi S.
out may alias phi exactly (same view): every row is staged in shared memory
before its gradient row is written. A slice with n > config.nmax, or a launch
whose block is not config.threads, gets NaN losses and out untouched (a guard
against host bugs, not a feature).

Shared memory per block (static; numba needs compile-time sizes, hence one kernel
per config):  (nmax*(nmax+1)/2 + tile_rows*nmax) * acc_bytes (rounded up to 8) + threads * 8
(packed Gram, staging tile, float64 reduction buffer); see `shared_bytes`. With the
48 KiB static limit and tiles of at least 8 rows at threads=256 the largest n is
145 for float16/float32 (acc float32) and 100 for float64 (`N_MAX`). The staging
tile holds tile_rows*nmax elements, so a slice with n < nmax gets
(tile_rows*nmax) // n rows per tile.

Small n: still one block per slice (no grouping of slices per block); the config
shrinks the block to at least 32 threads for tiny slices instead.

`numba.cuda` is imported here: import this module lazily, after
NUMBA_ENABLE_CUDASIM is set when running under the simulator.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ._compat import check_numba_cuda_numpy

check_numba_cuda_numpy()  # this module may be the first to import numba.cuda

from numba import config as numba_config  # noqa: E402
from numba import cuda, float32, float64  # noqa: E402

from .sign_abs import block_sum  # noqa: E402 - the same fixed-order block reduction

# Static shared memory a block may declare without opting in to dynamic shared memory.
SHARED_LIMIT = 48 * 1024
# Threads per block: powers of two for the tree reduction. Below a warp is only for
# the simulator, where every thread is an OS thread.
THREADS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Fewer rows per tile than this would make the kernel sync-bound; it sets N_MAX.
MIN_TILE_ROWS = 8
# nmax values a config rounds n up to: fewer distinct kernels to compile, at the
# price of reserving shared memory for up to the next step.
NMAX_STEPS = (8, 16, 24, 32, 48, 64, 80, 96, 112, 128)

_ACC = {"float32": float32, "float64": float64}
_ACC_FOR_INPUT = {np.dtype(np.float16): "float32", np.dtype(np.float32): "float32",
                  np.dtype(np.float64): "float64"}


class FusedConfig(NamedTuple):
    nmax: int  # largest n the kernel takes (sizes the packed Gram)
    tile_rows: int  # staging tile is tile_rows * nmax elements
    threads: int  # threads per block
    acc: str  # "float32" or "float64": Gram, tile and gradient arithmetic


def _tri(n: int) -> int:
    return n * (n + 1) // 2


def shared_bytes(cfg: FusedConfig) -> int:
    """Static shared memory of one block of this config, in bytes."""
    acc_bytes = 4 if cfg.acc == "float32" else 8
    gram_and_tile = (_tri(cfg.nmax) + cfg.tile_rows * cfg.nmax) * acc_bytes
    return -(-gram_and_tile // 8) * 8 + cfg.threads * 8  # the float64 buffer is 8-byte aligned


def _max_n(acc: str, threads: int = 256) -> int:
    n = 1
    while shared_bytes(FusedConfig(n + 1, MIN_TILE_ROWS, threads, acc)) <= SHARED_LIMIT:
        n += 1
    return n


# largest n per input dtype (tiles of MIN_TILE_ROWS rows, 256 threads)
N_MAX = {dt: _max_n(acc) for dt, acc in _ACC_FOR_INPUT.items()}


def fits(n: int, dtype) -> bool:
    """Whether slices of width n and this dtype fit the fused kernel."""
    acc = _ACC_FOR_INPUT.get(np.dtype(dtype))
    return acc is not None and 1 <= n <= N_MAX[np.dtype(dtype)]


def _pow2_at_least(x: int) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


def fused_config(l: int, n: int, dtype, threads: int | None = None) -> FusedConfig | None:
    """The kernel config for (l, n) slices of `dtype`, or None when they do not fit.

    threads: force the block size (a power of two; tests under the simulator use
    small blocks). Default: about two entries per thread of the larger of the
    packed Gram and one staging tile, between 32 and 256 threads.
    """
    if not fits(n, dtype):
        return None
    acc = _ACC_FOR_INPUT[np.dtype(dtype)]
    top = N_MAX[np.dtype(dtype)]
    nmax = next((s for s in NMAX_STEPS if n <= s <= top), top)
    tile_rows = 32 if nmax <= 32 else 16 if nmax <= 64 else MIN_TILE_ROWS
    if threads is None:
        work = max(_tri(n), min(l, tile_rows * nmax // n) * n)
        threads = min(256, max(32, _pow2_at_least((work + 1) // 2)))
    elif threads not in THREADS:
        raise ValueError(f"threads per block must be one of {THREADS}, got {threads}")
    cfg = FusedConfig(nmax, tile_rows, threads, acc)
    while shared_bytes(cfg) > SHARED_LIMIT and cfg.tile_rows > 1:
        cfg = cfg._replace(tile_rows=cfg.tile_rows // 2)  # a forced large block ate the room
    return cfg if shared_bytes(cfg) <= SHARED_LIMIT else None


@cuda.jit(device=True)
def _tri_index(p):
    # (j, k), k <= j, of packed index p = j*(j+1)/2 + k; the float root can land one
    # off near perfect squares, hence the integer fix-up
    j = int((math.sqrt(8.0 * p + 1.0) - 1.0) * 0.5)
    if j * (j + 1) // 2 > p:
        j -= 1
    elif (j + 1) * (j + 2) // 2 <= p:
        j += 1
    return j, p - j * (j + 1) // 2


@cuda.jit(device=True)
def _load_tile(tile, phi, i, a0, cnt, n, t, tpb):
    # rows a0 .. of slice i, flattened row-major into the shared tile (stored in its dtype)
    q = t
    while q < cnt:
        tile[q] = phi[i, a0 + q // n, q % n]
        q += tpb


def _make_kernel(nmax, tile_rows, tpb, acc_name):
    ACC = _ACC[acc_name]
    TRI = nmax * (nmax + 1) // 2
    TILE = tile_rows * nmax

    @cuda.jit
    def fused_ortho_l1(phi, out, losses, loss_offset, alpha, accumulate, write_grad):
        i = cuda.blockIdx.x
        t = cuda.threadIdx.x
        l = phi.shape[1]
        n = phi.shape[2]
        g = cuda.shared.array(TRI, ACC)
        tile = cuda.shared.array(TILE, ACC)
        red = cuda.shared.array(tpb, float64)
        # host bugs, caught block-uniformly (so leaving before any syncthreads is safe):
        # a slice wider than the shared arrays, or a block not of the size the strides assume
        if n == 0 or n > nmax or cuda.blockDim.x != tpb:
            if t == 0:
                losses[loss_offset + i] = 0.0 if n == 0 else math.nan
            return
        ntri = n * (n + 1) // 2
        rows = TILE // n

        # Each thread owns the packed entries t, t + tpb, ... in the Gram and sign
        # passes alike, so zeroing and accumulating them needs no barrier of its own.
        p = t
        while p < ntri:
            g[p] = 0
            p += tpb
        a0 = 0
        while a0 < l:
            cnt = min(rows, l - a0) * n
            _load_tile(tile, phi, i, a0, cnt, n, t, tpb)
            cuda.syncthreads()
            p = t
            while p < ntri:
                j, k = _tri_index(p)
                s = ACC(0.0)
                r = 0
                while r < cnt:
                    s += tile[r + j] * tile[r + k]
                    r += n
                g[p] += s
                p += tpb
            cuda.syncthreads()  # the next tile overwrites what others may still read
            a0 += rows

        acc = float64(0.0)
        p = t
        while p < ntri:
            j, k = _tri_index(p)
            x = float64(g[p])
            if j == k:
                x -= 1.0
                acc += abs(x)
            else:  # stands for (j, k) and (k, j); doubling is exact
                acc += 2.0 * abs(x)
            if x > 0.0:
                g[p] = 1.0
            elif x < 0.0:
                g[p] = -1.0
            else:  # 0 (NaN too: the slice is then all NaN anyway)
                g[p] = 0.0
            p += tpb
        total = block_sum(red, acc, t, tpb)
        # |.|-sums never hold Inf - Inf: a non-finite slice shows as NaN or +Inf here
        finite = math.isfinite(total)
        if t == 0:
            losses[loss_offset + i] = total if finite else math.nan
        if not write_grad:
            return
        if not finite:
            q = t
            while q < l * n:
                out[i, q // n, q % n] = math.nan
                q += tpb
            return

        scale = ACC(alpha)
        a0 = 0
        while a0 < l:
            cnt = min(rows, l - a0) * n
            _load_tile(tile, phi, i, a0, cnt, n, t, tpb)
            cuda.syncthreads()
            q = t
            while q < cnt:
                r = q // n
                b = q - r * n
                row = r * n
                s = ACC(0.0)
                # column b of S: S[j, b] = g[b(b+1)/2 + j] for j <= b, g[j(j+1)/2 + b] for j > b.
                # One loop with a select rather than two loops split at b: every thread of a
                # warp then runs n iterations, not max(b+1) + max(n-b-1). Triangular numbers
                # mod 32 are all distinct, so 32 consecutive b of 4-byte entries hit 32 banks.
                pb = b * (b + 1) // 2
                pj = 0
                for j in range(n):
                    s += tile[row + j] * g[pb + j if j <= b else pj + b]
                    pj += j + 1
                v = scale * s
                if accumulate:
                    v += ACC(out[i, a0 + r, b])
                out[i, a0 + r, b] = v
                q += tpb
            cuda.syncthreads()
            a0 += rows

    return fused_ortho_l1


_kernels: dict = {}


def get_fused_kernel(cfg: FusedConfig):
    """The fused kernel for this config (compiled lazily, once per config; numba then
    specializes it per argument types: dtypes, layouts, flags)."""
    if cfg.threads not in THREADS:
        raise ValueError(f"threads per block must be one of {THREADS}, got {cfg.threads}")
    if cfg.acc not in _ACC:
        raise ValueError(f"acc must be one of {tuple(_ACC)}, got {cfg.acc!r}")
    if shared_bytes(cfg) > SHARED_LIMIT:
        raise ValueError(f"{cfg} needs {shared_bytes(cfg)} bytes of shared memory, over {SHARED_LIMIT}")
    kern = _kernels.get(cfg)
    if kern is None:
        kern = _kernels[cfg] = _make_kernel(*cfg)
    return kern


def resource_usage(kernel, signature) -> dict | None:
    """Registers, local and static shared memory of `kernel` compiled for `signature`
    (e.g. "void(float32[:, :, :], float32[:, :, :], float64[:], int64, float64, boolean, boolean)"),
    read from the compiled cubin; None under the simulator, which has no such numbers."""
    if getattr(numba_config, "ENABLE_CUDASIM", 0) or not hasattr(kernel, "get_regs_per_thread"):
        return None
    compiled = kernel.compile(signature)
    return {
        "regs_per_thread": compiled.regs_per_thread,
        "shared_mem_per_block": compiled.shared_mem_per_block,
        "local_mem_per_thread": compiled.local_mem_per_thread,
        "max_threads_per_block": compiled.max_threads_per_block,
    }
