"""The fused pass over the Gram workspace: G -> S = sign(G - I), per-slice sum |G - I|.

(Or another member of the penalty family, chosen at compile time: L2, a free diagonal, the Gram
of unit-normalized columns; see docs/penalties.md. The pass then writes the matrix M that the
gradient GEMM multiplies in place of S.)

One CUDA block handles one slice (a row of the 2-D workspace), so the slice's
loss is reduced inside the block in a fixed order: no float atomics, and the
same input gives the bit-identical loss on every call. Because the block owns
the whole slice, it can also apply the NaN policy in the same launch: when the
slice's sum is not finite (NaN or Inf anywhere in G), the block overwrites the
slice's S with NaN, so the gradient GEMM that follows returns NaN for every
entry of that slice instead of a mix of NaN, Inf and finite values.

Slices too large for one block (n > 90 on a GPU) are cut into parts over several blocks instead
(`split`, at the end of this file): per-part sums, then a fixed-order second pass that does the
same reduction and NaN policy per slice.

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

# bfloat16 S (`bits` kernels): Numba has no bfloat16 type, so those kernels take S as int16 over the
# same memory and store the bit patterns of the signs, which bfloat16 holds exactly (the GEMM's
# alpha carries 2 beta, so the host passes scale = 1 and these kernels do not read it)
BF16_ONE = 0x3F80
BF16_MINUS_ONE = 0xBF80 - 0x10000
BF16_NAN = 0x7FC0


@cuda.jit(device=True)
def block_sum(buf, x, t, tpb):
    """The block's sum of every thread's x in a fixed tree order (no atomics: the same bits on every
    call). buf: a shared float64 array of tpb entries, tpb a power of two; all threads must call."""
    buf[t] = x
    cuda.syncthreads()
    width = tpb // 2
    while width > 0:
        if t < width:
            buf[t] += buf[t + width]
        cuda.syncthreads()
        width //= 2
    return buf[0]


@cuda.jit(device=True)
def slice_done(s, b, total, nn, t, tpb, write_s, losses, loss_offset, nanv):
    """The NaN policy and the loss of slice b, once its block has the slice's `total`: a non-finite
    slice gets NaN in every entry of S (when S is written) and as its loss. Inf - Inf never happens
    in these sums of non-negative terms, so any non-finite slice shows as NaN or +Inf here."""
    if not math.isfinite(total):
        k = t if write_s else nn
        while k < nn:
            s[b, k] = nanv
            k += tpb
        total = math.nan
    if t == 0:
        losses[loss_offset + b] = total


@cuda.jit(device=True)
def rowcol(k, n):
    """(row, column) of entry k of an n x n row-major slice: one division per thread and loop."""
    row = k // n
    return row, k - row * n


@cuda.jit(device=True)
def step(row, col, drow, dcol, n):
    """(row, column) after moving (drow, dcol) = rowcol(stride, n) entries on: the stride loops track
    where they are instead of testing k % (n + 1) per entry, a 64-bit division on the GPU."""
    row += drow
    col += dcol
    if col >= n:
        col -= n
        row += 1
    return row, col


_kernels: dict = {}


def _make_span(l2, offdiag, bits=False, tri=0):
    """A thread's stride loop over entries of slice b for the elementwise members (L1, L2, free
    diagonal): writes M into s when write_s, returns the sum of the entries' loss terms. One body for
    the one-block and the split pass.

    tri > 0 (a compile-time block size, so the block index is a division by a constant): the Gram
    holds only its blocks (I, J) of tri x tri entries with I <= J (row-major view; the blocked
    triangle GEMM, `gpu_orthol1._triangle`), the others hold nothing meaningful. Entries of the
    blocks off the diagonal count twice (G is symmetric) and write M at (j, k) and (k, j); the
    entries of the other blocks are never read, so S may still be G itself."""

    @cuda.jit(device=True)
    def entry(g, s, b, k, diag, scale, write_s):
        x = float64(g[b, k])
        term = float64(0.0)
        if diag:  # entry j*n + j
            if offdiag:
                term = x * 0.0  # a free diagonal still carries NaN/Inf into the loss
                x = 0.0
            else:
                x -= 1.0
        if l2:
            term += x * x
            if write_s:
                s[b, k] = 2.0 * scale * x  # NaN stays NaN
        else:
            term += abs(x)
            if write_s and bits:  # bfloat16 bit patterns (scale is 1: see BF16_ONE)
                if x > 0.0:
                    s[b, k] = BF16_ONE
                elif x < 0.0:
                    s[b, k] = BF16_MINUS_ONE
                elif x == 0.0:
                    s[b, k] = 0
                else:
                    s[b, k] = BF16_NAN
            elif write_s:
                if x > 0.0:
                    s[b, k] = scale
                elif x < 0.0:
                    s[b, k] = -scale
                elif x == 0.0:
                    s[b, k] = 0.0
                else:  # NaN must stay NaN, not become sign 0
                    s[b, k] = x
        return term

    @cuda.jit(device=True)
    def span_sum(g, s, b, k, end, n, tpb, scale, write_s):
        """The loss terms of entries k, k + tpb, ... below `end` of slice b (M written as it goes):
        one thread's share of a stride loop, in a fixed order."""
        acc = float64(0.0)
        row, col = rowcol(k, n)
        drow, dcol = rowcol(tpb, n)
        while k < end:
            if tri == 0:
                acc += entry(g, s, b, k, row == col, scale, write_s)
            else:
                brow = row // tri
                bcol = col // tri
                if brow == bcol:
                    acc += entry(g, s, b, k, row == col, scale, write_s)
                elif brow < bcol:
                    acc += 2.0 * entry(g, s, b, k, False, scale, write_s)
                    if write_s:
                        s[b, col * n + row] = s[b, k]
            k += tpb
            row, col = step(row, col, drow, dcol, n)
        return acc

    return span_sum


def _make_kernel(tpb, l2=False, offdiag=False, normalize=False, ncol=1, bits=False, tri=0):
    """The pass for `tpb` threads per block and one member of the penalty family.

    l2, offdiag and normalize are compile-time constants (closure variables), so the default L1
    kernel is the same code as before they existed. ncol: how many columns one thread owns in the
    normalized pass (ceil(n / tpb)), the size of its local array. bits: S is bfloat16 as int16. tri:
    see `_make_span` (not with normalize, which reads whole columns)."""
    span_sum = _make_span(l2, offdiag, bits, tri)
    nanv = BF16_NAN if bits else math.nan

    @cuda.jit
    def sign_abs_sum(g, s, n, losses, loss_offset, scale, write_s):
        """g: (slices, n*n) Gram rows (any float dtype); s: same shape, may be g itself;
        losses: float64 (m,), slice b of this launch writes losses[loss_offset + b];
        s gets scale * M when write_s is true (loss-only calls skip those writes), where M is
        sign(g - I) for the default L1 loss (docs/penalties.md for the others)."""
        b = cuda.blockIdx.x
        t = cuda.threadIdx.x
        nn = n * n
        acc = float64(0.0)
        if normalize:
            # One thread per column j (G is symmetric: column j is row j, and reading it down the
            # rows keeps a warp's loads contiguous). M_kj for k != j needs only G_kj and the two
            # diagonal entries, so it is written in the same sweep; M_jj needs the column's sum
            # c_j = sum_k Ghat_kj F_kj and is written after a barrier, because S may be G itself
            # and every thread reads the diagonal until then.
            mjj = cuda.local.array(ncol, float64)
            ci = 0
            j = t
            while j < n:
                d = float64(g[b, j * (n + 1)])
                acc += d * 0.0  # NaN/Inf on the diagonal: the slice is not finite
                rj = 1.0 / math.sqrt(d) if d > 0.0 else 0.0
                c = float64(0.0)
                for k in range(n):
                    if k != j:
                        dk = float64(g[b, k * (n + 1)])
                        rk = 1.0 / math.sqrt(dk) if dk > 0.0 else 0.0
                        gh = float64(g[b, k * n + j]) * rk * rj
                        if l2:
                            acc += gh * gh
                            fk = 2.0 * gh
                        else:
                            acc += abs(gh)
                            if gh > 0.0:
                                fk = 1.0
                            elif gh < 0.0:
                                fk = -1.0
                            elif gh == 0.0:
                                fk = 0.0
                            else:  # NaN stays NaN
                                fk = gh
                        c += gh * fk
                        if write_s:
                            s[b, k * n + j] = scale * rk * rj * fk
                if rj == 0.0 and not offdiag:
                    acc += 1.0  # a zero column: its diagonal Ghat_jj - 1 = -1 counts (|-1| = (-1)^2 = 1)
                # F_jj = 0 (Ghat_jj = 1 exactly) or r_j = 0 (a zero column): M_jj = -r_j^2 c_j
                mjj[ci] = -scale * rj * rj * c
                ci += 1
                j += tpb
            cuda.syncthreads()
            if write_s:
                ci = 0
                j = t
                while j < n:
                    s[b, j * (n + 1)] = mjj[ci]
                    ci += 1
                    j += tpb
        else:
            acc = span_sum(g, s, b, t, nn, n, tpb, scale, write_s)

        buf = cuda.shared.array(tpb, float64)
        slice_done(s, b, block_sum(buf, acc, t, tpb), nn, t, tpb, write_s, losses, loss_offset, nanv)

    return sign_abs_sum


def get_kernel(
    tpb: int,
    l2: bool = False,
    offdiag: bool = False,
    normalize: bool = False,
    ncol: int = 1,
    bits: bool = False,
    tri: int = 0,
):
    """The pass for `tpb` threads per block and one variant (compiled lazily, once per key).
    ncol matters only with normalize: use `columns_per_thread(n, tpb)`. bits: S is bfloat16, passed
    as int16 (the L1 signs only: L2 and the normalized Gram write values that need rounding). tri > 0:
    the Gram holds only its upper blocks of tri x tri entries (`_make_span`)."""
    if tpb not in BLOCK_SIZES:
        raise ValueError(f"threads per block must be one of {BLOCK_SIZES}, got {tpb}")
    if bits and (l2 or normalize):
        raise ValueError(
            "the bfloat16 sign pass writes the L1 signs only (no penalty='l2' or normalize=True)"
        )
    if tri and normalize:
        raise ValueError("the normalized pass reads whole columns: it takes no triangle Gram")
    key = (tpb, bool(l2), bool(offdiag), bool(normalize), int(ncol) if normalize else 1, bool(bits), int(tri))
    kern = _kernels.get(key)
    if kern is None:
        kern = _kernels[key] = _make_kernel(*key)
    return kern


def pick_block_size(n: int) -> int:
    """Enough threads to keep a slice's n*n entries streaming, without idle threads for small n."""
    nn = n * n
    for tpb in BLOCK_SIZES[3:]:
        if tpb * 8 >= nn:
            return tpb
    return BLOCK_SIZES[-1]


def pick_block_size_normalized(n: int) -> int:
    """The normalized pass runs one thread per column: enough threads for n columns, at least a warp."""
    for tpb in BLOCK_SIZES[3:]:
        if tpb >= n:
            return tpb
    return BLOCK_SIZES[-1]


def columns_per_thread(n: int, tpb: int) -> int:
    return max(1, -(-n // tpb))


def launch(n: int, normalize: bool, max_block: int = BLOCK_SIZES[-1]) -> tuple[int, int]:
    """(threads per block, columns per thread) of the pass for n x n slices."""
    pick = pick_block_size_normalized if normalize else pick_block_size
    tpb = min(pick(n), max_block)
    return tpb, columns_per_thread(n, tpb) if normalize else 1


# -- the split pass: large slices over several blocks -------------------------------------------
#
# One block per slice leaves most SMs idle when a call has few large slices ((4096, 32, 128) has
# 32 slices for 132 SMs; (512, 64, 512) 64 blocks each streaming 262144 entries). A slice with more
# entries than one block covers at SPLIT_PER_THREAD entries per thread is cut into parts of
# SPLIT_PER_THREAD * tpb entries; each part's block writes its partial sum, and a second launch sums
# a slice's partials in a fixed order (so the loss is still the same bits on every call) and applies
# the NaN policy. The cut depends on n alone, never on how many slices a chunk holds: a slice's loss
# does not change with the workspace budget.

SPLIT_PER_THREAD = 8
SPLIT_THREADS = 256


def split(n: int, normalize: bool = False, max_block: int = BLOCK_SIZES[-1]) -> tuple[int, int, int]:
    """(threads per block, parts per slice, entries per part) of the split pass; parts == 1 means
    the one-block pass (`launch`). The normalized pass reads whole columns: never split."""
    nn = n * n
    if normalize or nn <= max_block * SPLIT_PER_THREAD:
        return launch(n, normalize, max_block)[0], 1, nn
    tpb = min(SPLIT_THREADS, max_block)
    per = tpb * SPLIT_PER_THREAD
    return tpb, -(-nn // per), per


def _make_part_kernel(tpb, l2, offdiag, bits=False, tri=0):
    span_sum = _make_span(l2, offdiag, bits, tri)

    @cuda.jit
    def sign_abs_part(g, s, n, partials, per_part, scale, write_s):
        """Block i handles part i % parts of slice i // parts (parts = partials.shape[1]): entries
        [p * per_part, (p + 1) * per_part) of the slice; its sum goes to partials[b, p]."""
        parts = partials.shape[1]
        bid = cuda.blockIdx.x
        b = bid // parts
        p = bid - b * parts
        t = cuda.threadIdx.x
        end = min(n * n, (p + 1) * per_part)
        acc = span_sum(g, s, b, p * per_part + t, end, n, tpb, scale, write_s)
        buf = cuda.shared.array(tpb, float64)
        total = block_sum(buf, acc, t, tpb)
        if t == 0:
            partials[b, p] = total

    return sign_abs_part


def _make_finish_kernel(tpb, bits):
    nanv = BF16_NAN if bits else math.nan

    @cuda.jit
    def sign_abs_finish(s, n, partials, losses, loss_offset, write_s):
        """Slice b's loss: its partials summed in a fixed order (thread t takes parts t, t + tpb, ...,
        then the block's tree); a non-finite slice gets NaN in every entry of S and as its loss."""
        b = cuda.blockIdx.x
        t = cuda.threadIdx.x
        acc = float64(0.0)
        p = t
        while p < partials.shape[1]:
            acc += partials[b, p]
            p += tpb
        buf = cuda.shared.array(tpb, float64)
        slice_done(s, b, block_sum(buf, acc, t, tpb), n * n, t, tpb, write_s, losses, loss_offset, nanv)

    return sign_abs_finish


def get_split_kernels(tpb: int, l2: bool = False, offdiag: bool = False, bits: bool = False, tri: int = 0):
    """(part kernel, finish kernel) of the split pass for `tpb` threads per block (compiled once);
    bits: S is bfloat16 passed as int16, as in `get_kernel`; tri as for `get_kernel` (the finish
    kernel is the same for both)."""
    if tpb not in BLOCK_SIZES:
        raise ValueError(f"threads per block must be one of {BLOCK_SIZES}, got {tpb}")
    if bits and l2:
        raise ValueError("the bfloat16 sign pass writes the L1 signs only (no penalty='l2')")
    key = ("split", tpb, bool(l2), bool(offdiag), bool(bits), int(tri))
    kern = _kernels.get(key)
    if kern is None:
        kern = _kernels[key] = (
            _make_part_kernel(tpb, bool(l2), bool(offdiag), bool(bits), int(tri)),
            _make_finish_kernel(tpb, bool(bits)),
        )
    return kern


# -- the loss: per-slice losses to the returned value in one launch ------------------------------

TOTAL_THREADS = 256
# Entries each thread loads before adding them. One at a time, the sum of 4096 losses took 3.9 us on
# an H100, 16 load latencies in a row (bench/results/gpu-h100-call-profile.txt; 1.9 us for 32 slices)
TOTAL_UNROLL = 8


def _make_total_kernel(tpb, each):
    @cuda.jit
    def loss_total(losses, count, scale, out):
        """each=False (one block): out[0] = scale * the sum of losses[:count], summed in a fixed order
        (thread t takes entries t, t + tpb, ..., then the block's tree), so the same losses give the
        same bits on every call. each=True: out[i] = scale * losses[i]. Rounded to out's dtype once."""
        t = cuda.threadIdx.x
        if each:
            i = cuda.blockIdx.x * tpb + t
            if i < count:
                out[i] = losses[i] * scale
            return
        acc = float64(0.0)
        xs = cuda.local.array(TOTAL_UNROLL, float64)
        last = count - 1
        i = t
        while i < count:
            # a trip's loads before its adds (which keep the thread's order): one load latency per
            # TOTAL_UNROLL entries, not one per entry
            for u in range(TOTAL_UNROLL):
                xs[u] = losses[min(i + tpb * u, last)]
            for u in range(TOTAL_UNROLL):
                if i + tpb * u < count:
                    acc += xs[u]
            i += tpb * TOTAL_UNROLL
        buf = cuda.shared.array(tpb, float64)
        total = block_sum(buf, acc, t, tpb)
        if t == 0:
            out[0] = total * scale

    return loss_total


def get_total_kernel(tpb: int = TOTAL_THREADS, each: bool = False):
    """The loss's reduction (`each`: scale each slice's loss, reduction="none"), compiled once."""
    if tpb not in BLOCK_SIZES:
        raise ValueError(f"threads per block must be one of {BLOCK_SIZES}, got {tpb}")
    key = ("total", tpb, bool(each))
    kern = _kernels.get(key)
    if kern is None:
        kern = _kernels[key] = _make_total_kernel(tpb, bool(each))
    return kern
