"""Fully fused loss + gradient for small slices: the Gram never leaves the chip.

One launch does the whole computation, one block per slice, from register micro-tiles:

1. G_i = Phi_i^T Phi_i. The block's threads form a G x G grid (G = sqrt(threads)); thread
   (ty, tx) owns T x T Gram entries (T = nmax / G) in registers: rows and columns in runs of
   `vec` adjacent ones, the runs VG = vec * G apart (ty * vec + VG * c + e, c < T / vec, e < vec;
   vec = 1 is the interleaved layout ty + G * a). Phi_i is staged through shared memory tile_rows
   rows at a time (zero-padded to nmax columns; rows nmax + vec apart, 16-byte aligned for
   vec > 1), and per row a thread reads each of its 2 * T / vec runs in one vector load of at
   most 16 bytes and does T*T FMAs: at n = 64, float32, 4 loads per 64 FMAs (16 with vec = 1),
   73.5 instructions per row (two rows per loop trip) in the SASS ptxas makes for sm_90.
   Accumulation is float32 for float16/float32 input (a product of two float16 values is exact
   in float32) and float64 for float64 input.
2. Each thread subtracts I from its entries and sums |G - I| in float64 in a fixed order; the
   block sums the threads' totals in a fixed tree (no atomics: the loss is bit-identical from call
   to call for a given config and n), and S = sign(G - I) (sign(0) = 0) goes to shared memory.
   Same NaN policy as kernels/sign_abs.py: a non-finite sum makes the slice's loss NaN and its
   whole gradient NaN.
3. grad_i = alpha * Phi_i S_i: thread (ty, tx) computes rows ty + G*a (a < tile_rows / G) and
   columns tx + G*b of each staged row tile (interleaved, so that a warp's stores of a row are
   adjacent), again in registers, and writes them (or adds them) straight into `out`. S is stored
   with its columns permuted so that a thread's T columns of one row come in runs of `srun`
   adjacent ones, each read in one vector load of at most 16 bytes, and a warp's runs of one
   vector load side by side (adjacent bytes: no bank conflict; optionally the thread columns
   XOR-swizzled per run of vec rows, `swizzle`, which spreads the sign phase's writes over the
   banks but costs more index arithmetic than it saves), and the phase steps over S's rows `jrun`
   at a time, reading each of its tile rows' jrun entries in one vector load. The rows a warp reads,
   consecutive ones nmax + vec apart, fall in distinct banks. The tiles go in reverse order, so
   that the last one the Gram phase staged is used again where it is: a slice of k tiles takes
   2k - 1 tile loads (one if it fits one tile).
   There is no Gram workspace in device memory.

The loss is the same quantity as the cuBLAS path's but not bit-identical to it (different
summation order).

Launch: grid = number of slices m, block = config.threads (1-D):

    kern = get_fused_kernel(cfg)   # cfg = fused_config(l, n, dtype)
    kern[m, cfg.threads](phi, out, losses, loss_offset, alpha, accumulate, write_grad)

phi, out: 3-D arrays in the slices-first view (m, l, n), any strides (for the package's (l, m, n)
layout pass phi.transpose(1, 0, 2), no copy), dtype float16/float32/float64; out has phi's shape,
and its own dtype and strides. out is not touched when write_grad is false (phi may then be passed
as out). losses: float64 array; slice b of the launch writes losses[loss_offset + b], the unscaled
sum |G_b - I| (multiply by beta, or beta/m for a mean, on the host). alpha: the gradient scale,
2*beta (sum) or 2*beta/m (mean). accumulate: out += alpha * Phi S instead of out = alpha * Phi S.
out may alias phi exactly (same view): the Gram is complete before the first write, and every row
is staged in shared memory before its gradient row is written. A slice with n > config.nmax, or a
launch whose block is not config.threads, gets NaN losses and out untouched (a guard against host
bugs, not a feature).

Shared memory per block (static; numba needs compile-time sizes, hence one kernel per config):
ceil8((tile_rows * (nmax + vec) + nmax * nmax) * acc_bytes) + threads * 8 (the staging tile, S, the
float64 reduction buffer); see `shared_bytes`. Registers bound T, and the gradient rows per thread,
to TMAX: 8 for a float32 accumulator, 4 for float64. Slices up to n = 8 * TMAX run on an 8 x 8
grid (64 threads), wider ones on a 16 x 16 grid while S fits the 48 KiB static limit: the largest
n is 96 for float16/float32 and 64 for float64 (`N_MAX`).

`numba.cuda` is imported here: import this module lazily, after NUMBA_ENABLE_CUDASIM is set when
running under the simulator.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from ._compat import check_numba_cuda_numpy

check_numba_cuda_numpy()  # this module may be the first to import numba.cuda

from numba import config as numba_config  # noqa: E402
from numba import cuda, float32, float64, uint64  # noqa: E402

from .sign_abs import block_sum  # noqa: E402 - the same fixed-order block reduction

# Static shared memory a block may declare without opting in to dynamic shared memory.
SHARED_LIMIT = 48 * 1024
# Threads per block: square grids (G x G) of a power-of-two size, for the tree reduction. The 2 x 2
# and 4 x 4 grids are for the simulator, where every thread is an OS thread.
THREADS = (4, 16, 64, 256)
# Largest micro-tile side per accumulator: T*T Gram entries (and TMAX*T gradient entries) live in
# registers, so past this ptxas would spill.
TMAX = {"float32": 8, "float64": 4}

# Runs of adjacent columns a thread may own (FusedConfig.vec): one shared-memory load of up to 16 bytes each.
VECS = (1, 2, 4)

# Defaults chosen by the launch alone on an H100 (bench/results/gpu-h100-vec-kernel.json,
# `bench_gpu_plans.py --kernel-only`, float32, kernel ms at 2^26 elements, l = 64):
# - vec: the widest run pays where the micro-tile side T is above 4 (n = 64, T = 8: 0.756 ms against
#   0.778 with vec = 1; n = 96, T = 6: 1.416 against 1.730) and loses at T <= 4 (n = 16, T = 2:
#   0.409 against 0.375; n = 32, T = 4: 0.445 against 0.428), so runs start above this side;
VEC_FROM_SIDE = 4
# - gradient rows per thread: at T = TMAX (n = 57..64, float32 accumulator) 8 rows need 160
#   registers (6 blocks per SM), 4 rows 125 (8 blocks; ptxas offline, cpu-offline-fused-sass.md;
#   127 with the gradient phase since, on the card): 0.686 against 0.756 ms, and at (64, 4096, 64)
#   0.189 against 0.224 (float16: 0.183 against 0.217), although that kernel then read a 64-row
#   slice twice (4 tile loads; the reverse tile order since takes 3).
#   At n = 8, 16, 32 halving the rows lost (0.495 against 0.451, 0.419 against 0.409, 0.456 against 0.445).
GRAD_ROWS_AT_FULL_TILE = 4

_ACC = {"float32": float32, "float64": float64}
_ACC_FOR_INPUT = {
    np.dtype(np.float16): "float32",
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
}


class FusedConfig(NamedTuple):
    nmax: int  # largest n the kernel takes: a multiple of the grid side G
    tile_rows: int  # rows of Phi staged at a time: a multiple of G
    threads: int  # threads per block, G * G
    acc: str  # "float32" or "float64": Gram, tile and gradient arithmetic
    # columns a thread owns come in runs of `vec` adjacent ones (1: interleaved, G apart), so that
    # it reads each run from shared memory in one vector load of vec * acc bytes (at most 16)
    vec: int = 1
    # the gradient phase steps over S's rows `jrun` at a time, reading each of its tile rows' jrun
    # entries in one vector load (a divisor of vec: tile rows are nmax + vec apart)
    jrun: int = 1
    # S's row layout for the gradient phase, where thread column tx owns the T columns tx + G * b:
    # in runs of `srun` adjacent columns (a divisor of T), a warp's runs side by side, so that each
    # vector load of one run across the warp reads adjacent bytes (srun = T: a thread's T columns in
    # one block, tx * T). The default, the longest run one 16-byte load reads, against srun = T on an
    # H100 at (64, 4096, 64) float32: 0.170 against 0.205 ms (bench/results/gpu-h100-srun-kernel.json)
    srun: int = 1
    # those runs XOR-swizzled among the thread columns per run of vec rows, so that the rows a
    # warp writes at once in the sign phase fall in other banks where vec > 1 (at vec = 1 the
    # swizzle permutes the same banks; the reads, one row at a time, keep their pattern). Off by
    # default: the index arithmetic costs more than the conflicts (H100,
    # bench/results/gpu-h100-srun-kernel.json, kernel ms at 2^26 elements, l = 64: n = 64 0.612
    # unswizzled against 0.647; n = 32 0.411 against 0.432; n = 96 1.341 against 1.354; n = 8 and
    # 16 within 2 %, the other way)
    swizzle: bool = False
    # a cap on registers per thread (the PTX's .maxnreg); 0: as many as ptxas likes. Tried at n = 64
    # float32 for more blocks per SM: 112 registers (ptxas spills only outside the inner loops) kept
    # 8 blocks on an H100, where shared memory (25.6 KB a block) and the register file's split over
    # the 4 schedulers both allow 8, and ran 14 % slower (0.195 against 0.170 ms at (64, 4096, 64),
    # bench/results/gpu-h100-unroll-kernel.json); left at 0
    maxreg: int = 0


def grid_side(threads: int) -> int:
    """G of a G x G thread grid of `threads` threads."""
    side = math.isqrt(threads)
    if threads not in THREADS or side * side != threads:
        raise ValueError(f"threads per block must be one of {THREADS}, got {threads}")
    return side


def shared_bytes(cfg: FusedConfig) -> int:
    """Static shared memory of one block of this config, in bytes."""
    acc_bytes = 4 if cfg.acc == "float32" else 8
    tile_and_s = (cfg.tile_rows * (cfg.nmax + cfg.vec) + cfg.nmax * cfg.nmax) * acc_bytes
    return -(-tile_and_s // 8) * 8 + cfg.threads * 8  # the float64 buffer is 8-byte aligned


def _default_side(n: int, acc: str) -> int:
    return 8 if n <= 8 * TMAX[acc] else 16


def _valid(cfg: FusedConfig) -> bool:
    side = math.isqrt(cfg.threads)
    acc_bytes = 4 if cfg.acc == "float32" else 8
    return (
        cfg.nmax % side == 0
        and cfg.tile_rows % side == 0
        and cfg.tile_rows > 0
        and cfg.vec in VECS
        and cfg.vec * acc_bytes <= 16
        and (cfg.nmax // side) % cfg.vec == 0
        and cfg.jrun in VECS
        and cfg.vec % cfg.jrun == 0
        and cfg.srun >= 1
        and cfg.maxreg >= 0
        and (cfg.nmax // side) % cfg.srun == 0
        and shared_bytes(cfg) <= SHARED_LIMIT
    )


def _widest_vec(nmax: int, side: int, acc: str) -> int:
    # the longest run that divides the micro-tile side and fits one 16-byte load
    acc_bytes = 4 if acc == "float32" else 8
    return max(v for v in VECS if (nmax // side) % v == 0 and v * acc_bytes <= 16)


def _default_vec(nmax: int, side: int, acc: str) -> int:
    return _widest_vec(nmax, side, acc) if nmax // side > VEC_FROM_SIDE else 1


def _max_n(acc: str) -> int:
    n = 0
    while True:
        side = _default_side(n + 1, acc)
        nmax = -(-(n + 1) // side) * side
        cfg = FusedConfig(nmax, side, side * side, acc, _default_vec(nmax, side, acc))
        if nmax // side > TMAX[acc] or not _valid(cfg):
            return n
        n += 1


# largest n per input dtype (default grids, one row per thread in the gradient phase)
N_MAX = {dt: _max_n(acc) for dt, acc in _ACC_FOR_INPUT.items()}


def fits(n: int, dtype) -> bool:
    """Whether slices of width n and this dtype fit the fused kernel."""
    acc = _ACC_FOR_INPUT.get(np.dtype(dtype))
    return acc is not None and 1 <= n <= N_MAX[np.dtype(dtype)]


def fused_config(
    l: int,
    n: int,
    dtype,
    threads: int | None = None,
    vec: int | None = None,
    jrun: int | None = None,
    srun: int | None = None,
) -> FusedConfig | None:
    """The kernel config for (l, n) slices of `dtype`, or None when they do not fit.

    threads: force the block size (one of THREADS; tests under the simulator use small grids).
    Default: an 8 x 8 grid up to n = 8 * TMAX, else 16 x 16. Rows per tile: TMAX per thread row
    (register-bound; GRAD_ROWS_AT_FULL_TILE where the micro-tile side is TMAX with a float32
    accumulator), fewer when l is short or shared memory is short. vec: force the run length of the
    columns a thread owns (one of VECS, dividing the micro-tile side); default the longest that one
    16-byte load reads where the micro-tile side is above VEC_FROM_SIDE, else 1. jrun: force the
    gradient phase's step over S's rows (a divisor of vec); default vec. srun: force the run length
    of S's columns (a divisor of the micro-tile side); default the longest one 16-byte load reads.
    """
    if not fits(n, dtype):
        return None
    acc = _ACC_FOR_INPUT[np.dtype(dtype)]
    side = _default_side(n, acc) if threads is None else grid_side(threads)
    nmax = -(-n // side) * side
    if vec is None:
        vec = _default_vec(nmax, side, acc)
    elif vec not in VECS or (nmax // side) % vec or vec * (4 if acc == "float32" else 8) > 16:
        raise ValueError(
            f"vec must be one of {VECS}, divide the micro-tile side {nmax // side} and read "
            f"at most 16 bytes, got {vec}"
        )
    if jrun is None:
        jrun = vec
    elif jrun not in VECS or vec % jrun:
        raise ValueError(f"jrun must be one of {VECS} and divide vec={vec}, got {jrun}")
    if srun is None:
        srun = _widest_vec(nmax, side, acc)
    elif (
        isinstance(srun, bool) or not isinstance(srun, numbers.Integral) or srun < 1 or (nmax // side) % srun
    ):
        raise ValueError(f"srun must divide the micro-tile side {nmax // side}, got {srun!r}")
    else:
        srun = int(srun)
    top = GRAD_ROWS_AT_FULL_TILE if acc == "float32" and nmax // side == TMAX[acc] else TMAX[acc]
    rows = max(1, min(top, -(-l // side)))  # rows per thread in the gradient phase
    cfg = FusedConfig(nmax, rows * side, side * side, acc, vec, jrun, srun)
    while not _valid(cfg) and rows > 1:
        rows -= 1
        cfg = cfg._replace(tile_rows=rows * side)
    return cfg if _valid(cfg) else None


@cuda.jit(device=True)
def _load_tile(tile, phi, i, a0, cnt, n, ty, tx, side, rows_per_thread, ld, cols_per_thread):
    # rows a0 .. a0 + side * rows_per_thread - 1 of slice i into the tile (row r at r * ld), in the
    # tile's dtype; zeros past the slice's cnt rows and n columns, so that padded entries are exact
    # zeros. Branch-free, a row of loads in flight at a time: every load reads a valid element (the
    # index clamped into the slice) and a select zeroes the padding, so a warp does not wait for one
    # load before it issues the next. Indices, cnt and n: uint64 (no negative-index handling).
    vals = cuda.local.array(cols_per_thread, tile.dtype)
    for a in range(rows_per_thread):
        r = ty + uint64(side * a)
        rr = min(r, cnt - uint64(1))
        for b in range(cols_per_thread):
            c = tx + uint64(side * b)
            vals[b] = phi[i, a0 + rr, min(c, n - uint64(1))]
        for b in range(cols_per_thread):
            c = tx + uint64(side * b)
            tile[r * ld + c] = vals[b] if (r < cnt and c < n) else 0


def _make_kernel(nmax, tile_rows, tpb, acc_name, vec, jrun, srun, swizzle, maxreg):
    ACC = _ACC[acc_name]
    G = math.isqrt(tpb)
    T = nmax // G  # Gram micro-tile side
    RT = tile_rows // G  # gradient rows per thread per tile
    V = vec
    VG = V * G
    # Tile row stride: a multiple of V (each row's runs stay aligned for vector loads) whose rows fall
    # in distinct banks for the column reads of the gradient phase (consecutive rows, one per ty of a
    # warp: 4 for G = 8, 2 for G = 16).
    LD = nmax + V
    TILE = tile_rows * LD
    NN = nmax * nmax
    J = jrun
    R = srun
    PAIRS = T >= 6  # the Gram loop takes two rows per trip
    SWZ = G - 1 if swizzle else 0  # mask of the row-dependent XOR on S's thread columns (G: a power of two)
    # vector loads need 16-byte aligned rows (tile rows for vec > 1, S's runs); the simulator takes
    # no alignment at all, and has no vector loads to align for
    ALIGN = None if numba_config.ENABLE_CUDASIM else 16

    @cuda.jit(device=True)
    def own(t, a):
        # the a-th Gram row (or column) of the thread at grid coordinate t: runs of V, VG apart
        return t * uint64(V) + uint64((a // V) * VG + a % V)

    @cuda.jit(device=True)
    def gram_row(tile, base, g, va, vb, ty, tx):
        # one staged row (at `base`) into the thread's T x T Gram entries
        for a in range(T):
            va[a] = tile[base + own(ty, a)]
        for b in range(T):
            vb[b] = tile[base + own(tx, b)]
        for a in range(T):
            for b in range(T):
                g[a, b] += va[a] * vb[b]

    # the simulator has no registers to cap (and its jit takes no such option)
    cap = {} if numba_config.ENABLE_CUDASIM or not maxreg else {"max_registers": maxreg}

    @cuda.jit(**cap)
    def fused_ortho_l1(phi, out, losses, loss_offset, alpha, accumulate, write_grad):
        i = cuda.blockIdx.x
        t = cuda.threadIdx.x
        l = phi.shape[1]
        n = phi.shape[2]
        tile = cuda.shared.array(TILE, ACC, alignment=ALIGN)
        s = cuda.shared.array(NN, ACC, alignment=ALIGN)
        red = cuda.shared.array(tpb, float64)
        # host bugs, caught block-uniformly (so leaving before any syncthreads is safe):
        # a slice wider than the shared arrays, or a block not of the size the grid assumes
        if n == 0 or n > nmax or cuda.blockDim.x != tpb:
            if t == 0:
                losses[loss_offset + i] = 0.0 if n == 0 else math.nan
            return
        # uint64 indices from here on: numba then emits no negative-index handling per access
        ty = uint64(t // G)
        tx = uint64(t % G)
        ld = uint64(LD)
        iu = uint64(i)
        nu = uint64(n)
        g = cuda.local.array((T, T), ACC)
        va = cuda.local.array(T, ACC)
        vb = cuda.local.array(T, ACC)
        for a in range(T):
            for b in range(T):
                g[a, b] = 0
        a0 = 0
        while a0 < l:
            cnt = min(tile_rows, l - a0)
            _load_tile(tile, phi, iu, uint64(a0), uint64(cnt), nu, ty, tx, G, RT, ld, T)
            cuda.syncthreads()
            # unsigned while loops, here and in the gradient phase: numba's range() costs ~8
            # instructions per row (signed 64-bit trip-count bookkeeping), as much as the loads at
            # small n. A unit step lets LLVM unroll where the body is small (8 or 16 rows per trip
            # at T <= 4, in the SASS ptxas makes for sm_90); from T = 6 on it does not, so two
            # rows per trip there: the 64-bit counter, compare and address arithmetic (10
            # instructions at n = 64) then come once per two rows (78 -> 73.5 per row)
            r = uint64(0)
            if PAIRS:
                while r + uint64(1) < uint64(cnt):
                    gram_row(tile, r * ld, g, va, vb, ty, tx)
                    gram_row(tile, (r + uint64(1)) * ld, g, va, vb, ty, tx)
                    r += uint64(2)
                if r < uint64(cnt):
                    gram_row(tile, r * ld, g, va, vb, ty, tx)
            else:
                while r < uint64(cnt):
                    gram_row(tile, r * ld, g, va, vb, ty, tx)
                    r += uint64(1)
            cuda.syncthreads()  # the next tile overwrites what others may still read
            a0 += tile_rows

        acc = float64(0.0)
        for a in range(T):
            j = own(ty, a)
            for b in range(T):
                k = own(tx, b)
                x = float64(g[a, b])
                if j == k:
                    x -= 1.0
                sg = 0.0
                if j < nu and k < nu:  # padded entries: S = 0, no loss
                    acc += abs(x)
                    if x > 0.0:
                        sg = 1.0
                    elif x < 0.0:
                        sg = -1.0
                # column k = c + G * b (thread column c of the gradient phase, its b-th): run
                # b // R, thread column c XOR the row's run of V, position b % R in the run.
                # NaN gets 0: the slice is then all NaN anyway
                c = (k % uint64(G)) ^ ((j // uint64(V)) & uint64(SWZ))
                b2 = k // uint64(G)
                s[j * uint64(nmax) + (b2 // uint64(R)) * uint64(G * R) + c * uint64(R) + b2 % uint64(R)] = sg
        total = block_sum(red, acc, t, tpb)  # its barriers also publish S
        # |.|-sums never hold Inf - Inf: a non-finite slice shows as NaN or +Inf here
        finite = math.isfinite(total)
        if t == 0:
            losses[loss_offset + i] = total if finite else math.nan
        if not write_grad or l == 0:
            return
        if not finite:
            r = ty
            while r < uint64(l):
                c = tx
                while c < nu:
                    out[iu, r, c] = math.nan
                    c += uint64(G)
                r += uint64(G)
            return

        scale = ACC(alpha)
        o = cuda.local.array((RT, T), ACC)
        vr = cuda.local.array((RT, J), ACC)
        vs = cuda.local.array((J, T), ACC)
        # rows of S and columns of the tile past n are zeros: stepping J at a time up to jend is exact
        jend = (nu + uint64(J - 1)) // uint64(J) * uint64(J)
        # tiles in reverse order: the last one the Gram phase staged is still in shared memory
        last = (l - 1) // tile_rows * tile_rows
        a0 = last
        while True:
            cnt = min(tile_rows, l - a0)
            if a0 != last:
                _load_tile(tile, phi, iu, uint64(a0), uint64(cnt), nu, ty, tx, G, RT, ld, T)
                cuda.syncthreads()
            for a in range(RT):
                for b in range(T):
                    o[a, b] = 0
            j = uint64(0)
            while j < jend:
                for a in range(RT):
                    for e in range(J):
                        vr[a, e] = tile[(ty + uint64(G * a)) * ld + j + uint64(e)]
                # rows j .. j + J - 1 share one run of V (J divides V), so one swizzle
                col = (tx ^ ((j // uint64(V)) & uint64(SWZ))) * uint64(R)
                for e in range(J):
                    for b in range(T):
                        vs[e, b] = s[(j + uint64(e)) * uint64(nmax) + uint64((b // R) * G * R + b % R) + col]
                for e in range(J):  # the same order over j as one row at a time
                    for a in range(RT):
                        for b in range(T):
                            o[a, b] += vr[a, e] * vs[e, b]
                j += uint64(J)
            for a in range(RT):
                r = ty + uint64(G * a)
                if r < uint64(cnt):
                    for b in range(T):
                        k = tx + uint64(G * b)
                        if k < nu:
                            v = scale * o[a, b]
                            if accumulate:
                                v += ACC(out[iu, uint64(a0) + r, k])
                            out[iu, uint64(a0) + r, k] = v
            if a0 == 0:
                break
            cuda.syncthreads()  # the next tile overwrites what others may still read
            a0 -= tile_rows

    return fused_ortho_l1


_kernels: dict = {}


def get_fused_kernel(cfg: FusedConfig):
    """The fused kernel for this config (compiled lazily, once per config; numba then
    specializes it per argument types: dtypes, layouts, flags)."""
    grid_side(cfg.threads)
    if cfg.acc not in _ACC:
        raise ValueError(f"acc must be one of {tuple(_ACC)}, got {cfg.acc!r}")
    if not _valid(cfg):
        raise ValueError(
            f"{cfg}: nmax and tile_rows must be multiples of the grid side "
            f"{math.isqrt(cfg.threads)}, vec one of {VECS} dividing nmax / side in at most "
            f"16 bytes, jrun one of {VECS} dividing vec, srun >= 1 dividing nmax / side, maxreg "
            f">= 0, and the block needs {shared_bytes(cfg)} bytes of shared memory "
            f"(at most {SHARED_LIMIT})"
        )
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
