"""Version checks the kernels need before `numba.cuda` is imported."""

from __future__ import annotations

import numpy as np


def check_numba_cuda_numpy() -> None:
    """numba-cuda (0.30.4, the newest release as of 2026-11) registers an overload for np.row_stack
    while building its typing context; NumPy 2.5 removed that alias, so the first kernel compile
    fails with an AttributeError deep inside numba. Say so up front instead (the simulator runs
    the kernels as Python and is not affected); gpu_orthol1 does not patch NumPy."""
    from numba import config

    if hasattr(np, "row_stack") or getattr(config, "ENABLE_CUDASIM", False):
        return
    try:
        from importlib.metadata import version

        nc = version("numba-cuda")
    except Exception:
        nc = "the installed numba.cuda"
    raise RuntimeError(
        f"numba-cuda {nc} cannot compile CUDA kernels with NumPy {np.__version__} (NumPy 2.5 removed "
        "np.row_stack, which numba-cuda's typing still references): install numpy<2.5 "
        "(pip install 'numpy<2.5'), as the gpu extra pins"
    )
