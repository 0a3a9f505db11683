"""Test set-up. Without GPU_ORTHOL1_TEST_GPU=1 the CUDA kernels run under numba's
simulator, which must be chosen before numba.cuda is first imported: hence here,
at the top. bench/gpu_check.sh sets GPU_ORTHOL1_TEST_GPU=1 to run the `gpu` tests
on a real card instead (the simulator tests are then skipped)."""

import os

REAL_GPU = os.environ.get("GPU_ORTHOL1_TEST_GPU") == "1"
if not REAL_GPU:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
os.environ.pop("GPU_ORTHOL1_BACKEND", None)
os.environ.pop("GPU_ORTHOL1_WORKSPACE_BYTES", None)

import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

if not REAL_GPU:
    # The simulator runs each CUDA thread as an OS thread, and its block manager polls them in a
    # loop that holds the GIL for a whole switch interval (5 ms by default) while the threads it
    # waits for need the GIL for a few bytecodes between syncthreads() calls. With 0.1 ms the
    # simulated kernels run 3-5x faster (CPU time too: less of it spent polling); nothing
    # measured here depends on the interval.
    sys.setswitchinterval(1e-4)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a real GPU: run bench/gpu_check.sh (GPU_ORTHOL1_TEST_GPU=1)")
    skip_sim = pytest.mark.skip(reason="simulator test; this run uses the real GPU")
    for item in items:
        if "gpu" in item.keywords and not REAL_GPU:
            item.add_marker(skip_gpu)
        if "cudasim" in item.keywords and REAL_GPU:
            item.add_marker(skip_sim)


@pytest.fixture
def rng():
    # fresh inputs on every run; the seed is printed so a failure can be replayed
    seed = np.random.SeedSequence().entropy
    print(f"rng seed = {seed}")
    return np.random.default_rng(seed)
