"""The emulated cuBLAS of `gpu_orthol1.testing`: cuBLAS's GEMM argument lists executed over NumPy
buffers the way cuBLAS reads memory (column-major through `as_strided`, raw addresses resolved back
to buffers), with the checks of every argument. Test scaffolding: nothing at runtime imports it."""

from __future__ import annotations

import numbers
from dataclasses import replace

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _dtypes, _gemm
from ._gemm import OP_N, Gemm, Operand

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def _colmajor(arr, op: Operand, rows: int, cols: int, batch: int, writeable=False):
    """The batch of rows x cols column-major matrices cuBLAS would see at (op.offset, op.ld, op.stride)."""
    isz = arr.dtype.itemsize
    # as_strided keeps arr's data pointer (its first element); move it by offset elements.
    start = as_strided(arr, shape=(op.offset + 1,), strides=(isz,), writeable=writeable)[op.offset :]
    return as_strided(
        start, shape=(batch, rows, cols), strides=(op.stride * isz, isz, op.ld * isz), writeable=writeable
    )


def _t(x):
    return x.swapaxes(1, 2)


def to_tf32(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to TF32 (8-bit exponent, 10-bit mantissa), kept in float32: round to
    nearest, ties to even, as an emulation of the tensor cores' input conversion under
    CUBLAS_COMPUTE_32F_FAST_TF32 (NVIDIA does not specify cuBLAS's rounding; truncating instead
    doubles the bound). NaN stays NaN; a value past TF32's largest rounds to infinity, as in float32."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    # add half an ulp of the 10-bit mantissa (minus one, plus the kept last bit: ties to even), then cut
    r = ((bits + np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)).view(
        np.float32
    )
    return np.where(np.isnan(x), x, r)


def _values(arr):
    """The numbers a buffer holds: bfloat16 for the GPU's int16 carrier (what CUDA_R_16BF reads)."""
    return arr.view(_dtypes.bfloat16()) if arr.dtype == _dtypes.BITS else arr


def emulate_gemm(call: Gemm, bufs: dict, tf32: bool = False) -> None:
    """Execute one strided-batched GEMM like cuBLAS: float32 compute for 16-bit and float32 operands,
    float64 for float64; the product rounded once to C's dtype. tf32: the float32 operands rounded to
    TF32 first (`to_tf32`), the products summed in float32."""
    A, B, C = (_values(bufs[r.buf]) for r in (call.a, call.b, call.c))
    ar, ac = (call.m, call.k) if call.transa == OP_N else (call.k, call.m)
    br, bc = (call.k, call.n) if call.transb == OP_N else (call.n, call.k)
    a = _colmajor(A, call.a, ar, ac, call.batch)
    b = _colmajor(B, call.b, br, bc, call.batch)
    c = _colmajor(C, call.c, call.m, call.n, call.batch, writeable=True)
    cdt = _F64 if C.dtype == _F64 else _F32
    opa = (a if call.transa == OP_N else _t(a)).astype(cdt)
    opb = (b if call.transb == OP_N else _t(b)).astype(cdt)
    if tf32:
        opa, opb = to_tf32(opa), to_tf32(opb)
    prod = np.matmul(opa, opb)
    if call.alpha != 1.0:
        prod *= call.alpha
    if call.beta != 0.0:
        prod += call.beta * c.astype(cdt)
    c[...] = prod


def emulate_pointer_gemm(call: _gemm.BatchedGemm, ptrs: np.ndarray, bufs: dict, tf32: bool = False) -> None:
    """Execute a pointer-array GEMM as cuBLAS would: resolve each raw address in `ptrs` back to a
    (NumPy) buffer and element offset, then run that entry. A wrong address fails or misreads here."""
    resolve = _resolver(bufs)
    t = call.template
    for e in range(call.batch):
        a, b, c = (resolve(int(ptrs[r, e])) for r in range(3))
        emulate_gemm(
            replace(
                t,
                a=Operand(a.buf, a.offset, t.a.ld, 0),
                b=Operand(b.buf, b.offset, t.b.ld, 0),
                c=Operand(c.buf, c.offset, t.c.ld, 0),
                batch=1,
            ),
            bufs,
            tf32,
        )


# cuBLAS's values of the enums the GPU device passes (cudaDataType by dtype name: bfloat16 and its
# int16 carrier are CUDA_R_16BF; cublasComputeType_t)
CUDA_DTYPE = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14, "int16": 14}
COMPUTE_32F, COMPUTE_64F, COMPUTE_32F_FAST_TF32 = 68, 70, 77
HANDLE = 0x5A5A  # the emulator's stand-in for a cuBLAS handle


def _resolver(bufs: dict, inside: bool = False):
    """address -> Ref(buffer key, element offset) over NumPy buffers; a stray address fails.
    inside: an address may point into the middle of views of one stack (a column block of separate
    matrices that overlap in extent); any buffer holding it reads the same memory, take the first."""
    spans, seen = [], set()
    for key, arr in bufs.items():
        lo = arr.ctypes.data
        hi = (
            lo
            + max(0, sum((s - 1) * st for s, st in zip(arr.shape, arr.strides, strict=True) if s))
            + arr.itemsize
        )
        if (lo, hi, arr.itemsize) not in seen:  # "sgn" may be "ws" itself (S written in place)
            seen.add((lo, hi, arr.itemsize))
            spans.append((lo, hi, key, arr.itemsize))

    def resolve(p: int) -> _gemm.Ref:
        hits = [(lo, key, isz) for lo, hi, key, isz in spans if lo <= p < hi]
        if len(hits) > 1:  # the slices of one stack overlap in extent: the matrix that starts here
            hits = hits[:1] if inside else [h for h in hits if h[0] == p]
        if len(hits) != 1:
            raise AssertionError(f"address {p:#x} lies in {len(hits)} buffers")
        lo, key, isz = hits[0]
        if (p - lo) % isz:
            raise AssertionError(f"address {p:#x} is not element-aligned in buffer {key!r}")
        return _gemm.Ref(key, (p - lo) // isz)

    return resolve


def check_pointer_args(name: str, args: list, call: _gemm.BatchedGemm, addrs, bufs: dict) -> None:
    """Assert that a pointer-array GEMM's argument list (`CupyDevice._pointer_args`) describes `call`
    the way cuBLAS reads it: the function for the operand dtypes, the address arrays' places in
    `addrs`, the dtype enums and compute type (gemmBatchedEx), leading dimensions and coefficients."""
    import ctypes

    t = call.template
    dts = [bufs[refs[0].buf].dtype for refs in (call.a, call.b, call.c)]
    base, bs = addrs.ctypes.data, 8 * call.batch
    assert args[0] == HANDLE and list(args[1:6]) == [t.transa, t.transb, t.m, t.n, t.k]
    scal = ctypes.c_double if dts[2] == _F64 else ctypes.c_float
    if name in ("sgemmBatched", "dgemmBatched"):
        want = "sgemmBatched" if dts[0] == _F32 else "dgemmBatched"
        assert name == want and dts[0] == dts[1] == dts[2], f"{name} for operands {dts}"
        assert list(args[7:11]) == [base, t.a.ld, base + bs, t.b.ld]
        assert list(args[12:15]) == [base + 2 * bs, t.c.ld, call.batch]
        beta_at = 11
    else:
        assert name == "gemmBatchedEx" and len(args) == 20 and args[19] == -1, name
        tf32 = dts[0] == dts[1] == dts[2] == _F32  # float32 operands take the Ex call for TF32 alone
        assert tf32 or dts[0].itemsize == dts[1].itemsize == 2, f"gemmBatchedEx for operands {dts}"
        for pos, dt in zip((8, 11, 15), dts, strict=True):
            assert args[pos] == CUDA_DTYPE[dt.name], f"argument {pos} is {args[pos]} for {dt}"
        assert args[7] == base and args[10] == base + bs and args[14] == base + 2 * bs
        assert [args[9], args[12], args[16], args[17]] == [t.a.ld, t.b.ld, t.c.ld, call.batch]
        compute = COMPUTE_32F_FAST_TF32 if tf32 else COMPUTE_32F
        assert args[18] == compute, f"compute type {args[18]} for operands {dts}"
        beta_at = 13
    if not isinstance(t.alpha, numbers.Real):
        # [alpha, beta] in device memory (cuBLAS's device pointer mode): that array's two entries, in
        # the compute type's scalar type
        coef = np.asarray(t.alpha)
        assert coef.dtype == (_F64 if scal is ctypes.c_double else _F32) and coef.shape == (2,), coef
        assert args[6] == coef.ctypes.data and args[beta_at] == args[6] + coef.itemsize
        return
    alpha, beta = scal.from_address(args[6]).value, scal.from_address(args[beta_at]).value
    assert (alpha, beta) == (
        np.float32(t.alpha) if scal is ctypes.c_float else t.alpha,
        np.float32(t.beta) if scal is ctypes.c_float else t.beta,
    ), (alpha, beta)


def gemm_from_args(args, bufs: dict) -> Gemm:
    """The `Gemm` a cublasGemmStridedBatchedEx argument list describes, in cuBLAS's order (handle,
    transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB, beta, C, Ctype,
    ldc, strideC, batchCount, computeType, algo), checked against the buffers it points into."""
    import ctypes

    assert len(args) == 23 and args[0] == HANDLE and args[22] == -1
    resolve = _resolver(bufs)
    ops = []
    for pos in (7, 11, 16):
        ref = resolve(int(args[pos]))
        dt = bufs[ref.buf].dtype
        assert args[pos + 1] == CUDA_DTYPE[dt.name], (
            f"operand at argument {pos} is {dt}, its enum {args[pos + 1]}"
        )
        ops.append(Operand(ref.buf, ref.offset, args[pos + 2], args[pos + 3]))
    c_dt = bufs[ops[2].buf].dtype
    want = {COMPUTE_64F} if c_dt == _F64 else {COMPUTE_32F}
    if bufs[ops[0].buf].dtype == _F32 and c_dt == _F32:
        want.add(COMPUTE_32F_FAST_TF32)  # TF32 takes float32 operands only
    assert args[21] in want, f"compute type {args[21]} for a {c_dt} output"
    scal = ctypes.c_double if c_dt == _F64 else ctypes.c_float
    alpha, beta = scal.from_address(args[6]).value, scal.from_address(args[15]).value
    return Gemm(args[1], args[2], args[3], args[4], args[5], alpha, ops[0], ops[1], beta, ops[2], args[20])


def emulate_batched_ex(args, bufs: dict) -> None:
    """Execute a cublasGemmBatchedEx argument list (handle, transa, transb, m, n, k, alpha, Aarray,
    Atype, lda, Barray, Btype, ldb, beta, Carray, Ctype, ldc, batchCount, computeType, algo) over
    NumPy buffers: the address arrays read from host memory, each address resolved to a buffer
    (a stray one fails), the operand types and compute type checked against the buffers."""
    import ctypes

    assert len(args) == 20 and args[0] == HANDLE and args[19] == -1
    batch = int(args[17])
    resolve = _resolver(bufs, inside=True)
    arrays = [np.ctypeslib.as_array((ctypes.c_uint64 * batch).from_address(args[p])) for p in (7, 10, 14)]
    types = (args[8], args[11], args[15])
    c_dt = None
    for e in range(batch):
        refs = [resolve(int(arr[e])) for arr in arrays]
        for ref, ty in zip(refs, types, strict=True):
            assert ty == CUDA_DTYPE[bufs[ref.buf].dtype.name], f"operand {ref.buf!r} typed {ty}"
        c_dt = bufs[refs[2].buf].dtype
        scal = ctypes.c_double if c_dt == _F64 else ctypes.c_float
        alpha, beta = scal.from_address(args[6]).value, scal.from_address(args[13]).value
        ops = [
            Operand(r.buf, r.offset, ld, 0) for r, ld in zip(refs, (args[9], args[12], args[16]), strict=True)
        ]
        emulate_gemm(
            Gemm(args[1], args[2], args[3], args[4], args[5], alpha, ops[0], ops[1], beta, ops[2], 1),
            bufs,
            args[18] == COMPUTE_32F_FAST_TF32,
        )
    if c_dt is not None:
        want = {COMPUTE_64F} if c_dt == _F64 else {COMPUTE_32F}
        if c_dt == _F32 and types[0] == CUDA_DTYPE["float32"]:
            want.add(COMPUTE_32F_FAST_TF32)  # TF32 takes float32 operands only
        assert args[18] in want, f"compute type {args[18]}"
