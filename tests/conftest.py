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
os.environ.pop("GPU_ORTHOL1_GRAM", None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    # `-n N` alone means --dist load: tests handed out a few at a time in collection order, so a
    # long test collected late keeps one worker busy after the other has run out. worksteal gives
    # each worker half of the collection and lets an idle one take half of the other's queue;
    # with the long tests collected first (below), both finish within a short test of each other.
    # An explicit --dist wins. (The workers re-read the command line; the scheduling is the
    # controller's alone, which is the process that reads this.)
    given = [*map(str, config.invocation_params.args), *os.environ.get("PYTEST_ADDOPTS", "").split()]
    if getattr(config.option, "dist", "no") == "load" and not any(a.startswith("--dist") for a in given):
        config.option.dist = "worksteal"


def _run_order(item):
    # 0: the gloo_group tests, first in the first worker's half, never stolen (the other worker
    # steals from the end of a queue), so one worker spawns each process group once;
    # 1: tests marked `long`; 2: the rest. The sort is stable: pytest's own grouping of items by
    # fixture parameter (one gloo group per world size, not one per test) survives it.
    if "gloo_group" in getattr(item, "fixturenames", ()):
        return 0
    return 1 if item.get_closest_marker("long") else 2


@pytest.hookimpl(trylast=True)  # after pytest's reordering by fixture parameter
def pytest_collection_modifyitems(config, items):
    items.sort(key=_run_order)
    skip_gpu = pytest.mark.skip(reason="needs a real GPU: run bench/gpu_check.sh (GPU_ORTHOL1_TEST_GPU=1)")
    skip_sim = pytest.mark.skip(reason="simulator test; this run uses the real GPU")
    for item in items:
        if "gpu" in item.keywords and not REAL_GPU:
            item.add_marker(skip_gpu)
        if "cudasim" in item.keywords and REAL_GPU:
            item.add_marker(skip_sim)


@pytest.fixture(scope="session", params=[2, 3], ids=["2ranks", "3ranks"])
def gloo_group(request, tmp_path_factory):
    """One gloo process group per world size (2, and 3 for uneven and empty shards) for the whole run:
    the cases of tests/_dist_workers.py and tests/_ddp_workers.py, spawned once (tests/_groups.py).
    Its tests are collected first (see _run_order), so that under pytest-xdist one worker runs them all."""
    torch = pytest.importorskip("torch")  # the optional extra; the GPU machine's torch has it too
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    from . import _groups

    return _groups.run(request.param, tmp_path_factory.mktemp(f"gloo{request.param}"))


@pytest.fixture
def rng():
    # fresh inputs on every run; the seed is printed so a failure can be replayed
    seed = np.random.SeedSequence().entropy
    print(f"rng seed = {seed}")
    return np.random.default_rng(seed)
