"""The cuBLAS calls of the GPU device, made through ctypes on the library CuPy has loaded.

Why not `cupy_backends.cuda.libs.cublas`: CuPy refuses every cuBLAS call while a stream is being
captured ("calling cuBLAS API during stream capture is currently unsupported", seen on an H100 with
CuPy 14.2), which rules out CUDA graphs of our call, through `Plan.graph()` or `torch.cuda.graph`.
cuBLAS itself supports capture: coefficients in host pointer mode are recorded in the graph, and a
workspace we own (`cublasSetWorkspace`) keeps it from allocating during the capture. So the device
calls the C functions directly on CuPy's handle: the same library, handle and enum values (CuPy's
constants), argument for argument the signatures of cupy_backends' wrappers.
"""

from __future__ import annotations

import ctypes
import os
import sys

_P = ctypes.c_void_p
_I = ctypes.c_int
_LL = ctypes.c_longlong

_PROTOTYPES = {
    "cublasSetStream_v2": (_P, _P),
    "cublasSetWorkspace_v2": (_P, _P, ctypes.c_size_t),
    "cublasGetPointerMode_v2": (_P, ctypes.POINTER(_I)),
    "cublasSetPointerMode_v2": (_P, _I),
    "cublasGemmStridedBatchedEx": (
        _P,
        _I,
        _I,
        _I,
        _I,
        _I,
        _P,
        _P,
        _I,
        _I,
        _LL,
        _P,
        _I,
        _I,
        _LL,
        _P,
        _P,
        _I,
        _I,
        _LL,
        _I,
        _I,
        _I,
    ),
    # handle, transa, transb, m, n, k, alpha, Aarray, Atype, lda, Barray, Btype, ldb, beta, Carray,
    # Ctype, ldc, batchCount, computeType, algo
    "cublasGemmBatchedEx": (_P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _P, _I, _I, _P, _P, _I, _I, _I, _I, _I),
    "cublasSgemmBatched": (_P, _I, _I, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _I, _I),
    "cublasDgemmBatched": (_P, _I, _I, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _I, _I),
}


class CublasError(RuntimeError):
    pass


def _library_path() -> str:
    """The cuBLAS that this process has loaded (CuPy's), by path where /proc says which, else by name
    (the dynamic loader returns a library already loaded under that name)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(" ")[-1]
                if os.path.basename(path).startswith("libcublas.so"):
                    return path
    except OSError:
        pass
    from cupy.cuda import runtime

    major = runtime.runtimeGetVersion() // 1000
    return f"cublas64_{major}.dll" if sys.platform == "win32" else f"libcublas.so.{major}"


class Cublas:
    """setStream, setWorkspace, getPointerMode, setPointerMode, gemmStridedBatchedEx, gemmBatchedEx,
    sgemmBatched, dgemmBatched: cupy_backends' argument order (cuBLAS's for gemmBatchedEx), raising CublasError on a failed status."""

    def __init__(self):
        import cupy

        cupy.cuda.device.get_cublas_handle()  # CuPy loads its cuBLAS and makes the handle first
        self.path = _library_path()
        lib = ctypes.CDLL(self.path)
        for name, args in _PROTOTYPES.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = _I
            setattr(self, "_" + name, fn)

    @staticmethod
    def _check(status, name):
        if status:
            raise CublasError(f"{name} failed with cuBLAS status {status}")

    def setStream(self, handle, stream):
        self._check(self._cublasSetStream_v2(handle, stream), "cublasSetStream")

    def setWorkspace(self, handle, ptr, nbytes):
        self._check(self._cublasSetWorkspace_v2(handle, ptr, nbytes), "cublasSetWorkspace")

    def getPointerMode(self, handle):
        mode = _I()
        self._check(self._cublasGetPointerMode_v2(handle, ctypes.byref(mode)), "cublasGetPointerMode")
        return mode.value

    def setPointerMode(self, handle, mode):
        self._check(self._cublasSetPointerMode_v2(handle, mode), "cublasSetPointerMode")

    def gemmStridedBatchedEx(self, *args):
        self._check(self._cublasGemmStridedBatchedEx(*args), "cublasGemmStridedBatchedEx")

    def gemmBatchedEx(self, *args):
        self._check(self._cublasGemmBatchedEx(*args), "cublasGemmBatchedEx")

    def sgemmBatched(self, *args):
        self._check(self._cublasSgemmBatched(*args), "cublasSgemmBatched")

    def dgemmBatched(self, *args):
        self._check(self._cublasDgemmBatched(*args), "cublasDgemmBatched")


_lib: Cublas | None = None


def library() -> Cublas:
    global _lib
    if _lib is None:
        _lib = Cublas()
    return _lib
