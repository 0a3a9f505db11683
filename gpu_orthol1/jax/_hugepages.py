"""Transparent huge pages for the XLA output buffers the CPU callback writes, as NumPy gets them.

NumPy asks the kernel for transparent huge pages (madvise MADV_HUGEPAGE) on every allocation of
4 MiB or more, so the gradient `gpu_orthol1.loss_and_grad` allocates is first touched in 2 MiB pages.
XLA's CPU allocator does not: the same gradient written into XLA's output buffer took one page fault
per 4 KiB page (16385 faults for a 64 MiB float32 gradient against 547) and 12-18% more CPU time on
(4096, 32, 128) and (64, 4096, 64) (Intel Xeon, 2 CPUs, loaded machine: CPU time, not wall time,
compared), which made `jit(value_and_grad(ortho_l1))` slower than the core's own call on the same
data. The advice only changes how the kernel backs pages not yet touched (XLA's large outputs are
fresh mappings), never their contents; where transparent huge pages are off, or "always", or the
system is not Linux, it does nothing.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Any

import numpy as np

_MIN_BYTES = 1 << 22  # NumPy's threshold (numpy/_core/src/multiarray/alloc.c)
_PAGE = 4096
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux, every architecture

_madvise: Any = None  # libc's madvise, once found; False where there is none (not Linux)
_lock = threading.Lock()


def _numpy_uses_hugepages() -> bool:
    """NumPy's own switch (NUMPY_MADVISE_HUGEPAGE, off on kernels older than 4.6), read once."""
    core = getattr(np, "_core", None) or getattr(np, "core", None)  # NumPy 2 names it _core
    get = getattr(getattr(core, "multiarray", None), "_get_madvise_hugepage", None)
    return bool(get()) if get is not None else True


def _libc_madvise() -> Any:
    global _madvise
    with _lock:
        if _madvise is None:
            _madvise = False
            if sys.platform.startswith("linux") and _numpy_uses_hugepages():
                try:
                    fn = ctypes.CDLL(None, use_errno=True).madvise
                except (OSError, AttributeError):
                    pass
                else:
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                    fn.restype = ctypes.c_int
                    _madvise = fn
        return _madvise


def advise(a: np.ndarray) -> bool:
    """Ask for huge pages on the whole pages inside `a`'s memory when it is 4 MiB or more.

    Args:
        a: a NumPy view of a buffer about to be written (e.g. XLA's output buffer).

    Returns:
        Whether the advice was given (False: too small, not Linux, NumPy's switch off, or the
        kernel refused it; none of these is an error: the write is as correct, only slower).
    """
    nbytes = a.nbytes
    if nbytes < _MIN_BYTES:
        return False
    fn = _libc_madvise()
    if not fn:
        return False
    if not a.flags.c_contiguous:  # XLA's buffers are dense; a view of part of one is not advised
        return False
    lo = a.ctypes.data
    start = -(-lo // _PAGE) * _PAGE
    end = (lo + nbytes) // _PAGE * _PAGE  # whole pages only: the pages at the edges may hold others' data
    if end <= start:
        return False
    return fn(start, end - start, _MADV_HUGEPAGE) == 0
