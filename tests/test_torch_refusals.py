"""What gpu_orthol1.torch refuses with its own one-line error (a torch older than the custom-op API,
a negative penalty weight in every entry point, DTensor parameters in a compiled OrthoL1.loss()), and
where its warnings point."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

import gpu_orthol1 as ol1

torch = pytest.importorskip("torch")
nn = torch.nn

from gpu_orthol1 import torch as otorch  # noqa: E402
from gpu_orthol1.torch import OrthoL1, biggan_ortho, keras_orthogonal, ortho_l1  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "version, ok",
    [
        ("2.3.1", False),
        ("2.1.0+cu121", False),
        ("1.13.1", False),
        ("2.4.0", True),
        ("2.13.0+cpu", True),
        ("2.5.0a0+git1234", True),
        ("3.0.0", True),
    ],
)
def test_torch_version_check(version, ok):
    if ok:
        otorch._check_torch_version(version)
    else:
        with pytest.raises(ImportError, match=rf"needs torch >= 2\.4 .*found torch {re.escape(version)};"):
            otorch._check_torch_version(version)


@pytest.mark.long
def test_import_refuses_an_old_torch_by_its_version():
    """End to end: with torch.__version__ reading 2.3.1, importing gpu_orthol1.torch is one ImportError
    naming the version found (not an AttributeError from torch.library at the first decorator)."""
    code = (
        "import torch; torch.__version__ = '2.3.1'\n"
        "try:\n    import gpu_orthol1.torch\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ImportError: gpu_orthol1.torch needs torch >= 2.4"), r.stdout
    assert "found torch 2.3.1" in r.stdout


def test_copy_warning_points_at_the_callers_line():
    """A weight BLAS cannot read in place (every other column) is copied with a CopyWarning attributed
    to the user's line, through torch's custom-op dispatch."""
    w = torch.randn(3, 6, 8, dtype=torch.float64)[:, :, ::2].requires_grad_(True)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        ortho_l1(w, 0.1, axis=0).backward()
        line = sys._getframe().f_lineno - 1
    where = {(x.filename, x.lineno) for x in got if issubclass(x.category, ol1.CopyWarning)}
    assert where == {(__file__, line)}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)).double()


@pytest.mark.parametrize("bad", [-1.0, -1e-300, float("nan"), float("-inf")])
def test_negative_or_nonfinite_weight_is_refused_everywhere(bad):
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    m = _model()
    msg = "must be >= 0" if bad == bad and bad > float("-inf") else "must be a finite real number"
    calls = {
        "beta": [
            lambda: ortho_l1(w, bad),
            lambda: ortho_l1(w, beta=bad, mode="rows", penalty="l2"),
            lambda: OrthoL1(m, beta=bad),
            lambda: OrthoL1(m, bad, mode="columns"),
        ],
        "factor": [lambda: keras_orthogonal(w, bad), lambda: OrthoL1.keras(m, factor=bad)],
        "strength": [lambda: biggan_ortho(w, bad), lambda: OrthoL1.biggan(m, strength=bad)],
    }
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(ValueError, match=f"{name} {msg}"):
                fn()
    assert w.grad is None and all(p.grad is None for p in m.parameters())


def test_zero_weight_is_accepted():
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    ortho_l1(w, 0.0).backward()
    assert not w.grad.any()
    assert OrthoL1(_model(), beta=0.0).loss().item() == 0.0
    assert keras_orthogonal(w, 0.0).item() == 0.0 and biggan_ortho(w, 0).item() == 0.0


@pytest.fixture
def one_rank_gloo(tmp_path):
    """A one-rank gloo group in this process, and a 1-device CPU mesh over it."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("no torch.distributed here, or a group is already up")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_compiled_loss_refuses_dtensor_parameters(one_rank_gloo):
    """torch.compile(fullgraph=True) of OrthoL1.loss() over DTensor (FSDP2-sharded) parameters: our
    ValueError saying what to do, raised before dynamo reaches the op (it would otherwise fail
    inside DTensor's dispatch with "no sharding strategy", asking the user to file a PyTorch issue)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    w = nn.Parameter(distribute_tensor(torch.randn(6, 4, dtype=torch.float64), one_rank_gloo, [Shard(0)]))
    reg = OrthoL1([w], beta=0.1)
    eager = reg.loss()  # outside compile the sharded path runs
    assert torch.isfinite(eager)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="DTensors .*call reg.loss\\(\\) outside the compiled function"):
        torch.compile(reg.loss, backend="eager", fullgraph=True)()


def test_distributed_functions_refuse_a_negative_beta(one_rank_gloo):
    from torch.distributed.tensor import Shard, distribute_tensor

    from gpu_orthol1 import distributed as odist

    phi = torch.randn(3, 4, 5, dtype=torch.float64)
    for fn in (odist.loss_and_grad, odist.loss):
        with pytest.raises(ValueError, match="beta must be a finite real number >= 0"):
            fn(phi, -1.0, shard_dim=0)
    w = distribute_tensor(torch.randn(6, 4, dtype=torch.float64), one_rank_gloo, [Shard(0)])
    with pytest.raises(ValueError, match="beta must be >= 0, got -1.0"):
        odist.dtensor_ortho_l1(w, -1.0)
    targets = [(w, "matrix", 1, False)]
    for call in (
        lambda: odist.orthol1_dtensor_loss(targets, -1.0),
        lambda: odist.orthol1_dtensor_execute(targets, -1.0),
    ):
        with pytest.raises(ValueError, match="beta must be >= 0, got -1.0"):
            call()
    np.testing.assert_allclose(
        float(odist.loss(phi, 0.5, shard_dim=0)), float(odist.loss(phi, 0.5, shard_dim=1))
    )


@pytest.mark.parametrize("entry", ["ortho_l1", "OrthoL1.loss"])
def test_dtensor_double_backward_raises_at_the_second_backward(one_rank_gloo, entry):
    """Over DTensor parameters the penalty has no second derivative here: the create_graph=True
    gradient equals the first-order one, and differentiating it again raises our error instead of
    silently leaving the penalty's second-order term out (before: a gradient without a graph, so a
    second-order loss with any other term silently missed the penalty's part)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    w = nn.Parameter(distribute_tensor(torch.randn(6, 4, dtype=torch.float64), one_rank_gloo, [Shard(0)]))

    def penalty():
        return ortho_l1(w, 0.1) if entry == "ortho_l1" else OrthoL1([("w", w)], beta=0.1).loss()

    (g0,) = torch.autograd.grad(penalty(), w)
    (g,) = torch.autograd.grad(penalty(), w, create_graph=True)
    assert torch.equal(g.full_tensor(), g0.full_tensor())
    with pytest.raises(RuntimeError, match="second derivative .*DTensor"):
        ((g**2).sum() + (w**2).sum()).backward()
