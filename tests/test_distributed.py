"""gpu_orthol1.distributed on real process groups: gloo on the CPU, 2 and 3 ranks (3 makes uneven and
empty shards), float64 against the single-process core on the full tensor.

Spawning a group costs seconds, so one group per world size runs every case (tests/_dist_workers.py,
then tests/test_training.py's DDP cases: tests/_groups.py) and the tests below read its per-rank
results: one spawn per world size for the whole run. Inputs are fresh random numbers each run; the
seed is printed (and named in every failure) to replay it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the optional extra; the GPU machine's torch has it too
if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

from gpu_orthol1 import distributed as odist  # noqa: E402
from gpu_orthol1.distributed import _meta  # noqa: E402

from . import _dist_workers, _groups  # noqa: E402

GROUP_TIMEOUT_S = 240  # bench_distributed.py's run below (each rank's gloo timeout is 90 s)


@pytest.fixture
def group_run(gloo_group):
    """This file's results from the run-wide gloo group of each world size (conftest.py's gloo_group)."""
    return {"world": gloo_group["world"], "seed": gloo_group["seed"], "ranks": gloo_group["dist"]}


def _failures(run, cat):
    ranks = run["ranks"]
    names = set(ranks[0]["ran"].get(cat, []))
    assert names, f"no {cat} case ran"
    bad = {}
    for r, res in enumerate(ranks):
        assert set(res["ran"].get(cat, [])) == names, f"rank {r} ran other {cat} cases"
        for name, tb in res["failures"].items():
            if name in names:
                bad.setdefault(name, {})[r] = tb.strip().splitlines()[-1]
    return bad


def _assert_clean(run, cat):
    bad = _failures(run, cat)
    assert not bad, (
        f"{len(bad)} {cat} case(s) failed with {run['world']} ranks (seed {run['seed']}):\n"
        + "\n".join(f"  {k}: {v}" for k, v in sorted(bad.items()))
    )


def test_functional_matches_single_process(group_run):
    """every shard_dim x axis x reduction (3-D and 2-D), loss-only, empty shards, chunked calls whose ranks
    would pick different chunk sizes, float32/float16/bfloat16: loss and gradient shards vs the core."""
    _assert_clean(group_run, "functional")


def test_nan_in_one_shard_reaches_every_rank(group_run):
    _assert_clean(group_run, "nan")


def test_dtensor_rows_columns_auto(group_run):
    """2-D DTensors with Shard(0), Shard(1), Replicate() in rows/columns/auto/None modes, 3-D with Shard on
    each dim, and FSDP2 (fully_shard) parameters through orthol1_dtensor_execute."""
    _assert_clean(group_run, "dtensor")


def test_row_split_sends_grams_not_phi(group_run):
    _assert_clean(group_run, "counts")
    counts = group_run["ranks"][0]["counts"]
    l, m, n = 64, 6, 16
    for name in ("l", "l-chunked"):
        gathered = [c for c in counts[name] if c[0] == "all_gather"]
        assert [c[1] for c in gathered] == [_meta._NFIELDS], (
            f"{name}: only the metadata is gathered: {gathered}"
        )
        reduced = sum(c[1] for c in counts[name] if c[0] == "all_reduce")
        assert reduced == m * (n // 2 + 1) * n < m * n * n < l * m * n
    # the row and slice splits send the same on every rank (a column split's blocks follow the shard sizes)
    same = ("l", "l-chunked", "m")
    assert all({k: r["counts"][k] for k in same} == {k: counts[k] for k in same} for r in group_run["ranks"])
    # a column split, resharded, never gathers phi either: all-to-alls of blocks of the shard
    assert [c[0] for c in counts["n"]].count("all_gather") == 1  # the metadata


def test_bad_input_raises_the_same_error_on_every_rank(group_run):
    _assert_clean(group_run, "errors")
    per_rank = [r["errors"] for r in group_run["ranks"]]
    expect = {
        "shape": "do not form one tensor",
        "shard_dim_all": "shard_dim 3 is out of range",
        "shard_dim_one": "shard_dim 5 is out of range",
        "axis_one": "axis 7 is out of range",
        "dtype": "disagree on the shards' dtype",
        "device": "device other than cpu or cuda",
        "ndim": "disagree on the number of dims",
        "not_tensor": "not a torch.Tensor",
        "reduction": "disagree on reduction",
        "reduction_bad": "reduction must be one of",
        "beta": "disagree on beta",
        "beta_nan": "beta must be a finite",
        "int_dtype": "dtype is not float16",
        "workspace": "could not plan",
        "dtensor": "is a DTensor",
        "penalty": "disagree on the penalty",
        "penalty_bad": "penalty must be",
    }
    assert set(per_rank[0]) == set(expect)
    for name, words in expect.items():
        got = [pr[name] for pr in per_rank]
        assert all(t == "ValueError" for t, _ in got), f"{name}: {got}"
        msgs = sorted((m for _, m in got), key=len)
        assert words in msgs[0], f"{name}: {msgs[0]!r} does not say {words!r}"
        # the failing rank may add its own detail in parentheses; the rest is the same everywhere
        assert all(m.startswith(msgs[0]) for m in msgs), f"{name}: messages differ: {msgs}"


# -- pieces that need no process group --------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 16])
def test_gram_packing_round_trip(n, rng):
    X = torch.from_numpy(rng.standard_normal((3, n, n)))
    G = X + X.transpose(1, 2)
    P = odist.pack_grams(G)
    assert P.shape == (3, n // 2 + 1, n) and P.numel() <= 3 * (n * (n + 2) // 2 + 1)
    out = torch.full_like(G, 7.0)
    odist.unpack_grams(P, out)
    assert torch.equal(out, G)
    if n > 1:  # NaN stays in its row and column
        G[1, 0, n - 1] = G[1, n - 1, 0] = float("nan")
        odist.unpack_grams(odist.pack_grams(G), out)
        assert torch.equal(torch.isnan(out), torch.isnan(G))


def _row(**kw):
    row = [0] * _meta._NFIELDS
    row[_meta._F_NDIM], row[_meta._F_S0 : _meta._F_S0 + 3] = 3, [4, 3, 5]
    row[_meta._F_DTYPE], row[_meta._F_DEVICE] = 2, 0
    for k, v in kw.items():
        row[getattr(_meta, "_F_" + k)] = v
    return row


def test_validation_table():
    """What every rank checks on the gathered metadata, including a mix of device types (not possible
    to build on this CPU-only machine)."""
    mine = _meta._Local(_row())
    assert _meta._validate([_row(), _row(S0=2)], 0, mine) == [4, 2]
    with pytest.raises(ValueError, match="disagree on the shards' device type: rank 0 cpu, rank 1 cuda"):
        _meta._validate([_row(), _row(DEVICE=1)], 0, mine)
    with pytest.raises(ValueError, match="do not form one tensor split along dim 0"):
        _meta._validate([_row(), _row(S2=6)], 1, mine)
    with pytest.raises(ValueError, match="rank 1: its local shard has 4 dims"):
        _meta._validate([_row(), _row(STATUS=_meta._E_NDIM, NDIM=4)], 0, mine)


def test_needs_an_initialized_process_group():
    with pytest.raises(ValueError, match="not initialized"):
        odist.loss_and_grad(torch.ones(3, 2, 2), shard_dim=0)
    with pytest.raises(ValueError, match="takes a DTensor"):
        odist.dtensor_ortho_l1(torch.ones(3, 2))


def test_worker_module_is_importable_by_name():
    # torch.multiprocessing.spawn pickles the worker by module path
    assert Path(_groups.__file__).name == "_groups.py"
    assert _groups.main.__module__ == "tests._groups"
    assert _dist_workers.run.__module__ == "tests._dist_workers"


@pytest.mark.long
def test_bench_distributed_smoke(tmp_path):
    """bench/bench_distributed.py end to end on a tiny model (2 ranks): both methods ran, agree, and the
    row-split weights sent fewer bytes than gathering them."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "bd"
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "bench" / "bench_distributed.py"),
            "--ranks",
            "2",
            "--layers",
            "1",
            "--d-model",
            "16",
            "--steps",
            "1",
            "--out",
            str(out),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=GROUP_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    (res,) = doc["results"]
    c64 = res["check"]["float64"]
    assert c64["loss_rel_diff"] < 1e-12 and c64["grad_max_rel_diff"] < 1e-12, c64
    assert res["check"]["float32"]["loss_rel_diff"] < 1e-5
    up = {m: res["methods"][m]["per_kind"]["mlp_up"]["sent_MB_payload"] for m in ("sharded", "gather")}
    assert up["sharded"] < up["gather"], up
    assert out.with_suffix(".md").read_text().startswith("# gpu_orthol1.distributed")


@pytest.mark.long
def test_bench_distributed_ddp_smoke(tmp_path):
    """bench/bench_distributed.py --ddp end to end on a tiny model (2 ranks, float64): the split run equals
    the unsplit one to rounding, and the one-ulp run (the float32 sensitivity column) ran and moved."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "ddp"
    args = ["--ddp", "--ranks", "2", "--layers", "1", "--d-model", "64", "--steps", "1"]
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "bench_distributed.py"), *args, "--ddp-dtype", "float64"]
        + ["--out", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=GROUP_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    (res,) = doc["results"]
    for r in res["per_rank"]:
        assert r["params_max_rel_diff"] < 1e-12, r
        # one ulp of float64 parameters, 5 steps later: moved, and by about rounding
        assert 0 < r["one_ulp_params_max_rel_diff"] < 1e-10, r
    assert "1 ulp away" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(
    "fn",
    [
        odist.loss_and_grad,
        odist.loss,
        odist.dtensor_ortho_l1,
        odist.orthol1_dtensor_execute,
        odist.orthol1_dtensor_loss,
        odist.orthol1_dtensor_add_grad_,
        odist.orthol1_dtensor_step_,
    ],
    ids=lambda f: f.__name__,
)
def test_public_api_fully_annotated(fn):
    import inspect

    sig = inspect.signature(fn)
    assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), fn.__name__
    assert sig.return_annotation is not inspect.Signature.empty, fn.__name__


@pytest.mark.gpu
def test_one_rank_nccl_exercises_the_cuda_path(tmp_path):
    """On a card: one rank with NCCL runs the CUDA path end to end (the Gram hook's all-reduce on
    CuPy workspaces on torch's stream, the loss reduction), against the core on the same tensor."""
    import torch
    import torch.distributed as dist

    import gpu_orthol1 as ol1
    from gpu_orthol1 import distributed as odist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gen = torch.Generator(device="cuda").manual_seed(1)
        phi = torch.randn(40, 6, 9, device="cuda", dtype=torch.float64, generator=gen) / 6
        for shard_dim in (0, 1, 2):
            loss, grad = odist.loss_and_grad(phi, 0.4, axis=1, shard_dim=shard_dim)
            import cupy

            want_l, want_g = ol1.loss_and_grad(cupy.from_dlpack(phi), 0.4, axis=1)
            assert loss.device.type == "cuda" and grad.device.type == "cuda"
            np.testing.assert_allclose(loss.item(), float(want_l), rtol=1e-12)
            np.testing.assert_allclose(grad.cpu().numpy(), cupy.asnumpy(want_g), rtol=1e-12, atol=1e-14)
    finally:
        dist.destroy_process_group()
