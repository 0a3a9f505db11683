"""The two-GEMM GPU call path's host bookkeeping (issue 22 item 4), on a CPU: a plan on
`testing.HostOnlyGpuDevice` runs the GPU backend's call path with nothing executed.

A plain call keeps its workspace per stream (`_gpu_calls.GpuCalls.workspace`): fewer allocations
per call. A call under a stream capture, a call that brings its own allocator (torch, graphs) and
a workspace above the cap allocate per call as before."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_orthol1 import _driver, _gpu_calls, _plan
from gpu_orthol1.testing import HostStream, host_only_plan

from .reference import random_phi


@pytest.fixture
def made(monkeypatch):
    """The workspaces `_driver.workspace` makes, in order."""
    seen: list = []
    orig = _driver.workspace

    def counted(*args):
        seen.append(orig(*args))
        return seen[-1]

    monkeypatch.setattr(_driver, "workspace", counted)
    return seen


def test_plain_calls_keep_their_workspace(made, rng):
    phi = random_phi(rng, (33, 5, 12), np.float32, 33)
    p = host_only_plan(phi, 0.5)
    assert p.kernel == "gemm"
    for _ in range(3):
        p(phi)
    assert len(made) == 1
    p._gpu.dev.stream = HostStream(ptr=2)  # another stream: its own
    p(phi)
    p(phi)
    assert len(made) == 2
    _plan.execute(p, phi, None, False, 0.5, True, chunk=2)  # other sizes: other buffers
    assert len(made) == 3
    p(phi)  # the stream keeps one set: the call's sizes again
    assert len(made) == 4


def test_capture_alloc_and_large_workspaces_allocate_per_call(made, rng, monkeypatch):
    phi = random_phi(rng, (33, 5, 12), np.float32, 33)
    p = host_only_plan(phi, 0.5)
    p._gpu.dev.stream = HostStream(ptr=3, capturing=True)
    p(phi)
    p(phi)
    assert len(made) == 2  # a graph replayed on another stream must not share a kept workspace
    p._gpu.dev.stream = HostStream(ptr=3)
    bufs: list = []

    def alloc(shape, dtype):
        bufs.append(np.empty(shape, dtype))
        return bufs[-1]

    for _ in range(2):
        _plan.execute(p, phi, None, False, 0.5, True, alloc=alloc)
    assert len(made) == 4
    monkeypatch.setattr(_gpu_calls, "GPU_KEEP_WORKSPACE", 100)
    p(phi)
    p(phi)
    assert len(made) == 6
