"""What the spawned ranks of tests/test_distributed.py run (in the group that tests/_groups.py starts
once per world size for this file and tests/test_training.py's DDP cases).

Spawning a process group costs seconds, so ONE group per world size runs every case in the same
order on every rank; each rank writes its results to out_dir/rank{r}.json (failures per case, the
ValueError messages of the error cases, collective counts) and appends each case's name to
out_dir/rank{r}.progress before running it, so a hang names its case. Every case does all of its
collectives before it asserts anything, so a failed check on one rank never desynchronizes the group.
"""

from __future__ import annotations

import json
import os
import traceback
import warnings

import numpy as np

# one BLAS / torch thread per rank: 2 or 3 ranks share this machine's cores
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REDS = ("sum", "mean", "none")
TOL64 = 1e-12


class Failure(AssertionError):
    pass


def _close(got, ref, tol, what):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise Failure(f"{what}: shape {got.shape}, expected {ref.shape}")
    fin = np.isfinite(ref)
    if not np.array_equal(fin, np.isfinite(got)) or not np.array_equal(np.isnan(ref), np.isnan(got)):
        raise Failure(f"{what}: NaN/Inf pattern differs: got {got.ravel()[:8]}, expected {ref.ravel()[:8]}")
    if not fin.any():
        return
    scale = max(float(np.max(np.abs(ref[fin]))), 1e-300)
    err = float(np.max(np.abs(got[fin] - ref[fin]))) / scale
    if err > tol:
        raise Failure(f"{what}: relative error {err:.3g} > {tol:g}")


class Ctx:
    def __init__(self, rank, world, seed):
        self.rank, self.world, self.seed = rank, world, seed
        self.case_no = 0
        self.mesh = None

    def rng(self):
        # the same data on every rank: a per-case generator from the run's seed
        return np.random.default_rng([self.seed, self.case_no])

    def phi(self, shape, l):
        return self.rng().standard_normal(shape) / np.sqrt(max(l, 1))


def _same_on_all_ranks(x):
    """All ranks' copies of a float64 tensor (the test's own collective, not counted)."""
    import torch
    import torch.distributed as dist

    t = x.detach().to(torch.float64).reshape(-1).contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [p.numpy() for p in parts]


def _rows_of(ndim, axis):
    return 0 if ndim == 2 else [d for d in range(3) if d != axis][0]


# -- the functional API -------------------------------------------------------------------------


def case_functional(
    ctx,
    shape,
    axis,
    shard_dim,
    red,
    want_grad=True,
    dtype="float64",
    contiguous=False,
    workspace_bytes=None,
    uneven_chunks=False,
    column_split="reshard",
    variant=None,
):
    import torch

    import gpu_orthol1 as ol1
    from gpu_orthol1 import distributed as odist

    nd = len(shape)
    full = ctx.phi(shape, shape[_rows_of(nd, axis % 3)])
    beta = 0.37
    tdt = getattr(torch, dtype)
    ft = torch.from_numpy(full).to(tdt)
    local = torch.tensor_split(ft, ctx.world, dim=shard_dim)[ctx.rank]
    if contiguous:
        local = local.contiguous()
    vkw = dict(zip(("penalty", "diagonal", "normalize"), variant, strict=True)) if variant else {}
    odist.COLUMN_SPLIT = column_split
    try:
        if want_grad:
            loss, g = odist.loss_and_grad(
                local,
                beta,
                axis=axis,
                shard_dim=shard_dim,
                reduction=red,
                workspace_bytes=workspace_bytes,
                **vkw,
            )
        else:
            loss = odist.loss(
                local,
                beta,
                axis=axis,
                shard_dim=shard_dim,
                reduction=red,
                workspace_bytes=workspace_bytes,
                **vkw,
            )
            g = None
    finally:
        odist.COLUMN_SPLIT = "reshard"
    alls = _same_on_all_ranks(loss)
    if uneven_chunks:  # the case is meant to make the ranks' own chunk sizes differ: check it does
        from gpu_orthol1 import _plan

        mine = _plan.chunk_for(_plan.Plan(local.numpy(), axis=axis, workspace_bytes=workspace_bytes), True)
        chunks = [int(x[0]) for x in _same_on_all_ranks(torch.tensor([float(mine)]))]
        if len(set(chunks)) < 2:
            raise Failure(f"the ranks' chunk sizes are all {chunks[0]}: the case does not test the MIN")
    # reference: the single-process core on the full tensor (bfloat16: its float32 values)
    ref_in = ft.float().numpy() if tdt == torch.bfloat16 else ft.numpy()
    with warnings.catch_warnings():  # the reference may copy an unreadable layout: fine here
        warnings.simplefilter("ignore", ol1.CopyWarning)
        ref_loss, ref_grad = ol1.loss_and_grad(ref_in, beta, axis=axis, reduction=red, backend="numpy", **vkw)
    ldt = torch.float64 if tdt == torch.float64 else torch.float32
    if loss.dtype != ldt or tuple(loss.shape) != tuple(np.shape(ref_loss)):
        raise Failure(f"loss is {loss.dtype} {tuple(loss.shape)}, expected {ldt} {np.shape(ref_loss)}")
    if any(not np.array_equal(a, alls[0], equal_nan=True) for a in alls):
        raise Failure(f"the loss differs between ranks: {alls}")
    tol = {"float64": TOL64, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}[dtype]
    _close(loss.numpy(), ref_loss, tol, "loss")
    if want_grad:
        gref = torch.tensor_split(torch.from_numpy(np.ascontiguousarray(ref_grad)), ctx.world, dim=shard_dim)[
            ctx.rank
        ]
        if g.shape != local.shape or g.dtype != local.dtype:
            raise Failure(f"grad is {g.dtype} {tuple(g.shape)}, local {local.dtype} {tuple(local.shape)}")
        gtol = {"float64": TOL64, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}[dtype]
        _close(g.float().numpy() if dtype == "bfloat16" else g.numpy(), gref.numpy(), gtol, "grad")


def case_nan(ctx, shape, axis, shard_dim):
    """A NaN in one rank's shard: the affected slice's loss is NaN on every rank, the others exact."""
    import torch

    import gpu_orthol1 as ol1
    from gpu_orthol1 import distributed as odist

    full = ctx.phi(shape, shape[_rows_of(3, axis)])
    ft = torch.from_numpy(full)
    # a NaN in the first element of rank 0's shard, in slice 1 where the shard holds it
    idx = [0, 0, 0]
    idx[axis] = 1 if shard_dim != axis else 0
    ft[tuple(idx)] = float("nan")
    bad_slice = idx[axis]
    local = torch.tensor_split(ft, ctx.world, dim=shard_dim)[ctx.rank]
    per, g = odist.loss_and_grad(local, 0.5, axis=axis, shard_dim=shard_dim, reduction="none")
    tot = odist.loss(local, 0.5, axis=axis, shard_dim=shard_dim, reduction="sum")
    alls = _same_on_all_ranks(per)
    ref, rg = ol1.loss_and_grad(ft.numpy(), 0.5, axis=axis, reduction="none", backend="numpy")
    if not np.isnan(per[bad_slice].item()) or np.isnan(np.delete(per.numpy(), bad_slice)).any():
        raise Failure(f"per-slice loss {per.numpy()}: expected NaN at slice {bad_slice} only")
    if not all(np.array_equal(a, alls[0], equal_nan=True) for a in alls):
        raise Failure("the per-slice losses differ between ranks")
    if not np.isnan(tot.item()):
        raise Failure(f"sum loss {tot.item()} is not NaN")
    _close(per.numpy(), ref, TOL64, "per-slice loss")
    gref = torch.tensor_split(torch.from_numpy(np.ascontiguousarray(rg)), ctx.world, dim=shard_dim)[ctx.rank]
    _close(g.numpy(), gref.numpy(), TOL64, "grad")


# -- collectives: what moves --------------------------------------------------------------------


class CountCollectives:
    """Patches torch.distributed.all_reduce / all_gather (what gpu_orthol1.distributed calls) to
    record each call's kind and the element count and bytes of what it sends."""

    def __enter__(self):
        import torch.distributed as dist

        self.calls = []
        self._orig = dist.all_reduce, dist.all_gather, dist.all_to_all_single

        def all_reduce(t, *a, **k):
            self.calls.append(("all_reduce", t.numel(), t.numel() * t.element_size(), tuple(t.shape)))
            return self._orig[0](t, *a, **k)

        def all_gather(lst, t, *a, **k):
            self.calls.append(("all_gather", t.numel(), t.numel() * t.element_size(), tuple(t.shape)))
            return self._orig[1](lst, t, *a, **k)

        def all_to_all_single(out, t, out_splits=None, in_splits=None, *a, **k):
            # what this rank sends to the others (its own block stays)
            own = in_splits[dist.get_rank()] if in_splits else t.numel() // dist.get_world_size()
            self.calls.append(
                ("all_to_all", t.numel() - own, (t.numel() - own) * t.element_size(), tuple(t.shape))
            )
            return self._orig[2](out, t, out_splits, in_splits, *a, **k)

        dist.all_reduce, dist.all_gather, dist.all_to_all_single = all_reduce, all_gather, all_to_all_single
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_reduce, dist.all_gather, dist.all_to_all_single = self._orig


def case_counts(ctx, results):
    """An l-split sends the small metadata and packed n x n Grams only, never Phi: counted."""
    import torch

    from gpu_orthol1 import distributed as odist
    from gpu_orthol1.distributed import _meta, _splits

    l, m, n = 64, 6, 16
    full = torch.from_numpy(ctx.phi((l, m, n), l))
    out = {}
    a = n // 2 + 1
    for name, sd, kw in (
        ("l", 0, {}),
        ("l-chunked", 0, {"workspace_bytes": 2 * n * n * 8}),
        ("m", 1, {}),
        ("n", 2, {}),
        ("n-gather", 2, {}),
    ):
        local = torch.tensor_split(full, ctx.world, dim=sd)[ctx.rank]
        odist.COLUMN_SPLIT = "gather" if name == "n-gather" else "reshard"
        try:
            with CountCollectives() as cc:
                odist.loss_and_grad(local, 1.0, axis=1, shard_dim=sd, **kw)
        finally:
            odist.COLUMN_SPLIT = "reshard"
        out[name] = cc.calls
        meta = [c for c in cc.calls if c[0] == "all_gather" and c[1] == _meta._NFIELDS]
        rest = [c for c in cc.calls if c not in meta]
        if len(meta) != 1:
            raise Failure(f"{name}: expected one metadata all_gather of 15 int64, got {cc.calls}")
        if name.startswith("l"):
            chunks = 3 if name == "l-chunked" else 1
            if [c[0] for c in rest] != ["all_reduce"] * chunks:
                raise Failure(f"{name}: expected {chunks} all_reduce(s) of Grams only, got {rest}")
            sent = sum(c[1] for c in rest)
            if sent != m * a * n:
                raise Failure(
                    f"{name}: Gram all_reduce sent {sent} numbers, expected m*a*n = {m * a * n} "
                    f"(packed upper triangles; the full Grams are {m * n * n}, phi {l * m * n})"
                )
        elif name == "m":
            if [(c[0], c[1]) for c in rest] != [("all_reduce", 1)]:
                raise Failure(f"m split: expected one all_reduce of the loss, got {rest}")
        elif name == "n":
            # all-to-all of Phi's blocks, the chunk MIN, the packed Grams, all-to-all of the gradient
            kinds = [c[0] for c in rest]
            n_me = local.shape[2]
            if kinds != ["all_to_all", "all_reduce", "all_reduce", "all_to_all"] or rest[1][1] != 1:
                raise Failure(f"n split (reshard): got {rest}")
            rows_me = _splits._split_sizes(l, ctx.world)[ctx.rank]
            if rest[0][1] != m * (l - rows_me) * n_me or rest[3][1] != m * rows_me * (n - n_me):
                raise Failure(
                    f"n split: sent {rest[0][1]} numbers of phi and {rest[3][1]} of the gradient, "
                    f"expected {m * (l - rows_me) * n_me} and {m * rows_me * (n - n_me)}"
                )
            if rest[2][1] != m * a * n:
                raise Failure(f"n split: Gram all_reduce of {rest[2][1]} numbers, expected {m * a * n}")
        else:
            if [c[0] for c in rest] != ["all_gather"] or rest[0][1] != l * m * -(-n // ctx.world):
                raise Failure(f"n split (gather): expected one all_gather of the (padded) shard, got {rest}")
    results["counts"] = out


# -- bad input: the same ValueError on every rank, no hang ----------------------------------------


def _error_inputs(ctx):
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    r, w = ctx.rank, ctx.world
    base = torch.from_numpy(ctx.phi((6, 4, 5), 6))
    piece = torch.tensor_split(base, w, dim=0)[r]
    dt = distribute_tensor(base, ctx.mesh, [Shard(0)])  # collective: made on every rank
    kw = dict(axis=1, shard_dim=0)
    cases = {
        # rank 1's shard has a different non-shard dim
        "shape": (piece[:, :3] if r == 1 else piece, kw),
        "shard_dim_all": (piece, dict(axis=1, shard_dim=3)),
        "shard_dim_one": (piece, dict(axis=1, shard_dim=5 if r == w - 1 else 0)),
        "axis_one": (piece, dict(axis=7 if r == 0 else 1, shard_dim=0)),
        "dtype": (piece.float() if r == 0 else piece, kw),
        "device": (piece.to("meta") if r == 1 else piece, kw),
        "ndim": (piece[0] if r == 0 else piece, kw),
        "not_tensor": (piece.numpy() if r == w - 1 else piece, kw),
        "reduction": (piece, dict(kw, reduction="mean" if r == 0 else "sum")),
        "reduction_bad": (piece, dict(kw, reduction="avg")),
        "beta": (piece, dict(kw, beta=2.0 if r == 1 else 1.0)),
        "beta_nan": (piece, dict(kw, beta=float("nan") if r == 0 else 1.0)),
        "int_dtype": (piece.to(torch.int64) if r == 1 else piece, kw),
        "workspace": (piece, dict(kw, workspace_bytes=8 if r == 0 else None)),
        "dtensor": (dt if r == 0 else piece, kw),
        "penalty": (piece, dict(kw, penalty="l2" if r == 0 else "l1")),
        "penalty_bad": (piece, dict(kw, penalty="l3")),
    }
    return cases


def case_errors(ctx, results):
    import torch

    from gpu_orthol1 import distributed as odist

    msgs = {}
    for name, (local, kw) in _error_inputs(ctx).items():
        beta = kw.pop("beta", 1.0)
        try:
            odist.loss_and_grad(local, beta, **kw)
            msgs[name] = ["no error", ""]
        except Exception as e:  # noqa: BLE001 - the test compares types and messages across ranks
            msgs[name] = [type(e).__name__, str(e)]
        # the group is still in step: a valid call right after works
        ok = torch.from_numpy(ctx.phi((5, 3, 4), 5))
        odist.loss(torch.tensor_split(ok, ctx.world, dim=0)[ctx.rank], 1.0, shard_dim=0)
    results["errors"] = msgs


# -- DTensor ------------------------------------------------------------------------------------


def _ref_dtensor(full, beta, axis, red, mode, vkw=None):
    import gpu_orthol1 as ol1

    if full.ndim == 2:
        l, n = full.shape
        tr = mode == "rows" or (mode == "auto" and l < n)
        x = full.T if tr else full
        loss, g = ol1.loss_and_grad(
            np.ascontiguousarray(x), beta, reduction=red, backend="numpy", **(vkw or {})
        )
        return loss, (g.T if tr else g)
    d = [i for i in range(3) if i != axis]
    l, n = full.shape[d[0]], full.shape[d[1]]
    tr = mode == "rows" or (mode == "auto" and l < n)
    x = np.swapaxes(full, d[0], d[1]) if tr else full
    loss, g = ol1.loss_and_grad(
        np.ascontiguousarray(x), beta, axis=axis, reduction=red, backend="numpy", **(vkw or {})
    )
    return loss, (np.swapaxes(g, d[0], d[1]) if tr else g)


def case_dtensor(ctx, shape, placement, mode, red, axis=1, variant=None):
    import torch
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from gpu_orthol1.distributed import dtensor_ortho_l1

    pl = Replicate() if placement == "R" else Shard(placement)
    full = ctx.phi(shape, shape[0])
    beta = 0.23
    w = distribute_tensor(torch.from_numpy(full), ctx.mesh, [pl]).requires_grad_(True)
    vkw = dict(zip(("penalty", "diagonal", "normalize"), variant, strict=True)) if variant else {}
    loss = dtensor_ortho_l1(w, beta, axis=axis, reduction=red, mode=mode, **vkw)
    go = torch.from_numpy(ctx.rng().uniform(0.5, 1.5, size=tuple(loss.shape)))
    (loss * go).sum().backward()
    alls = _same_on_all_ranks(loss)
    gfull = w.grad.full_tensor() if isinstance(w.grad, DTensor) else None
    if isinstance(loss, DTensor):
        raise Failure("the loss is a DTensor; expected a plain tensor")
    if gfull is None:
        raise Failure(f"w.grad is {type(w.grad).__name__}, expected a DTensor")
    if tuple(w.grad.placements) != tuple(w.placements):
        raise Failure(f"grad placements {w.grad.placements} != w's {w.placements}")
    if any(not np.array_equal(a, alls[0]) for a in alls):
        raise Failure("the loss differs between ranks")
    rl, rg = _ref_dtensor(full, beta, axis % 3, red, mode, vkw)
    _close(loss.detach().numpy(), rl, TOL64, "loss")
    gon = go.numpy()
    if red == "none" and full.ndim == 3:
        shp = [1, 1, 1]
        shp[axis % 3] = -1
        gon = gon.reshape(shp)
    elif red == "none":
        gon = gon.reshape(())
    else:
        gon = gon.reshape(())
    _close(gfull.numpy(), rg * gon, TOL64, "grad")


def case_fsdp(ctx, stack_bytes=None, counts=None):
    """FSDP2: parameters become DTensor Shard(0); orthol1_dtensor_execute matches the unsharded model.
    Several matrices share a shape (batched into one call), in both modes; a Conv weight is flattened;
    stack_bytes cuts the batches smaller; counts records the collectives of one call."""
    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    import gpu_orthol1 as ol1
    from gpu_orthol1 import distributed as odist
    from gpu_orthol1.distributed import _targets

    torch.manual_seed(ctx.seed % (1 << 31))
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.Flatten(),
        nn.Linear(12, 7),
        nn.Linear(7, 9, bias=False),
        *[nn.Linear(9, 9) for _ in range(3)],
        nn.Linear(9, 20),
        nn.Linear(20, 9),
        nn.Linear(9, 20),
        nn.Linear(20, 9),
    ).double()
    ref = {name: p.detach().clone().numpy() for name, p in model.named_parameters() if p.dim() >= 2}
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    params = [(name, p) for name, p in model.named_parameters() if p.dim() >= 2]
    # mode "auto" (the smaller Gram: rows for the (6, 27) conv, (7, 12) and (9, 20)), one 9x9 in rows, and
    # one 9x9 with its own beta scale (as OrthoL1's Keras preset makes): a batch of its own
    targets = [
        (
            p,
            "flatten" if p.dim() == 4 else "matrix",
            1,
            p.shape[0] < np.prod(p.shape[1:]) or name == "5.weight",
            0.5 if name == "4.weight" else 1.0,
        )
        for name, p in params
    ]
    old = odist.STACK_BYTES
    if stack_bytes is not None:
        odist.STACK_BYTES = stack_bytes
    try:
        if counts is not None:
            with CountCollectives() as cc:
                loss, grads = odist.orthol1_dtensor_execute(targets, 0.7)
            counts["fsdp"] = cc.calls
        else:
            loss, grads = odist.orthol1_dtensor_execute(targets, 0.7)
        # add_grad_'s form: accumulate into given local tensors
        outs = [torch.ones_like(p.to_local()) for _, p in params]
        loss2, _ = odist.orthol1_dtensor_execute(targets, 0.7, outs=outs, accumulate=True)
    finally:
        odist.STACK_BYTES = old
    alls = _same_on_all_ranks(torch.stack([loss, loss2]))
    from torch.distributed.tensor import DTensor

    def full(g, p):
        return DTensor.from_local(
            g, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
        ).full_tensor()

    gfull = [full(g, p) for (_, p), g in zip(params, grads, strict=True)]
    ofull = [full(o, p) for (_, p), o in zip(params, outs, strict=True)]
    # a rank whose list differs (one target short): the same ValueError on every rank
    try:
        odist.orthol1_dtensor_execute(targets[:-1] if ctx.rank == 0 else targets, 0.7)
        mismatch = "no error"
    except ValueError as e:
        mismatch = str(e)
    # a failure on one rank's own shards (here: rank 1 cannot prepare target 2): ValueError everywhere
    orig = _targets._member

    def broken(j, *a):
        if ctx.rank == 1 and j == 2:
            raise RuntimeError("injected")
        return orig(j, *a)

    _targets._member = broken
    try:
        odist.orthol1_dtensor_execute(targets, 0.7)
        local_fail = "no error"
    except ValueError as e:
        local_fail = str(e)
    finally:
        _targets._member = orig
    want = 0.0
    for (name, _), (_p, _how, _ax, tr, sc), gf, of in zip(params, targets, gfull, ofull, strict=True):
        x = ref[name].reshape(ref[name].shape[0], -1)
        x = x.T if tr else x
        lo, gr = ol1.loss_and_grad(np.ascontiguousarray(x), 0.7 * sc, backend="numpy")
        want += float(lo)
        gr = (gr.T if tr else gr).reshape(ref[name].shape)
        _close(gf.numpy(), gr, TOL64, f"grad of {name}")
        _close(of.numpy(), gr + 1.0, TOL64, f"accumulated grad of {name}")
    if any(not np.array_equal(a, alls[0]) for a in alls):
        raise Failure("the loss differs between ranks")
    _close(loss.numpy(), want, TOL64, "loss")
    _close(loss2.numpy(), want, TOL64, "loss (accumulating call)")
    if "passed different targets" not in mismatch:
        raise Failure(f"different target lists: {mismatch!r}")
    if "rank(s) [1] could not prepare" not in local_fail:
        raise Failure(f"a local failure on rank 1: {local_fail!r}")
    if counts is not None:
        # 1 fingerprint, then per batch (8 batches for 10 matrices, each shape fits one chunk) one metadata
        # exchange and: a row split (7x9, 9x9 scaled, 9x9, 20x9 x2, in columns) one Gram all-reduce; a
        # column split (the conv, 12x7, one 9x9, 9x20 x2, all in rows) all-to-all, chunk MIN, Grams, all-to-all
        want = 1 + 4 * (1 + 1) + 4 * (1 + 4)
        if len(counts["fsdp"]) != want:
            raise Failure(
                f"expected {want} collectives (batched), got {len(counts['fsdp'])}: {counts['fsdp']}"
            )


def case_fsdp_train_step(ctx):
    """docs/sharded.md's first example: FSDP2 model, loss = task loss + sum of dtensor_ortho_l1 over the sharded weights,
    one backward. p.grad (DTensor) must equal the unsharded model's gradient of the same total (the same
    input on every rank, so FSDP's gradient average is the one task gradient)."""
    import copy

    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from gpu_orthol1.distributed import dtensor_ortho_l1

    torch.manual_seed(ctx.seed % (1 << 31))
    model = nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3)
    ).double()
    ref = copy.deepcopy(model)
    x = torch.from_numpy(ctx.rng().standard_normal((4, 6)))
    for i in (0, 2, 4):
        fully_shard(model[i], mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    beta = 0.05

    def total(m, reg):
        task = m(x).square().mean()
        return task + sum(reg(p) for p in m.parameters() if p.dim() == 2)

    total(model, lambda w: dtensor_ortho_l1(w, beta, mode="auto")).backward()

    def naive(w):  # autograd through the smaller Gram, as mode="auto"
        G = w @ w.T if w.shape[0] < w.shape[1] else w.T @ w
        return beta * (G - torch.eye(G.shape[0], dtype=G.dtype)).abs().sum()

    total(ref, naive).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        g = p.grad.full_tensor()
        _close(g.numpy(), q.grad.numpy(), 1e-10, f"grad of {name}")


def case_orthol1_helpers(ctx):
    """orthol1_dtensor_loss / add_grad_ / step_ (what OrthoL1 calls for DTensor parameters) on an FSDP2
    model, against the core on the unsharded weights."""
    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import gpu_orthol1 as ol1
    from gpu_orthol1 import distributed as odist

    torch.manual_seed(ctx.seed % (1 << 31) + 1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3), nn.Conv1d(2, 4, 3)).double()
    ref = {name: p.detach().clone().numpy() for name, p in model.named_parameters() if p.dim() >= 2}
    for layer in model:
        fully_shard(layer, mesh=ctx.mesh)
    params = [(name, p) for name, p in model.named_parameters() if p.dim() >= 2]
    targets = [
        (p, "flatten" if p.dim() == 3 else "matrix", 1, p.shape[0] < np.prod(p.shape[1:])) for _, p in params
    ]
    want, wgrads = 0.0, {}
    for (name, _), (_, _, _, tr) in zip(params, targets, strict=True):
        x = ref[name].reshape(ref[name].shape[0], -1)
        lo, g = ol1.loss_and_grad(np.ascontiguousarray(x.T if tr else x), 0.3, backend="numpy")
        want += float(lo)
        wgrads[name] = (g.T if tr else g).reshape(ref[name].shape)
    # loss() with autograd: DTensor gradients with the parameters' placements
    loss = odist.orthol1_dtensor_loss(targets, 0.3)
    (2.0 * loss).backward()
    g1 = {name: p.grad.full_tensor().numpy() for name, p in params}
    placements_ok = all(isinstance(p.grad, DTensor) and p.grad.placements == p.placements for _, p in params)
    # add_grad_: into the existing .grad (2 x the gradient now), then once more
    l2 = odist.orthol1_dtensor_add_grad_(targets, 0.3)
    g2 = {name: p.grad.full_tensor().numpy() for name, p in params}
    # step_: W <- W - lr * grad, from the weights before the step
    l3 = odist.orthol1_dtensor_step_(targets, 0.3, 0.1)
    w3 = {name: p.full_tensor().detach().numpy() for name, p in params}
    alls = _same_on_all_ranks(torch.stack([loss.detach(), l2, l3]))
    if not placements_ok:
        raise Failure("loss().backward() did not give DTensor grads with the parameters' placements")
    for name in g1:
        _close(g1[name], 2.0 * wgrads[name], TOL64, f"loss() grad of {name}")
        _close(g2[name], 3.0 * wgrads[name], TOL64, f"add_grad_ of {name}")
        _close(w3[name], ref[name] - 0.1 * wgrads[name], TOL64, f"step_ of {name}")
    for x in (loss.detach(), l2, l3):
        _close(x.numpy(), want, TOL64, "loss")
    if any(not np.array_equal(a, alls[0]) for a in alls):
        raise Failure("the losses differ between ranks")


def case_orthol1_public(ctx, how):
    """The public entry points on an FSDP2 model: OrthoL1(model) and ortho_l1(DTensor) from
    gpu_orthol1.torch, a few SGD steps with the penalty through loss() or add_grad_(), against the same
    model unsharded (the same input on every rank: FSDP's gradient average is the one task gradient)."""
    import copy

    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from gpu_orthol1.torch import OrthoL1, ortho_l1

    torch.manual_seed(ctx.seed % (1 << 31) + 2)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 9), nn.Tanh(), nn.Conv1d(3, 4, 3)).double()
    ref = copy.deepcopy(model)
    x = torch.from_numpy(ctx.rng().standard_normal((5, 6)))
    xc = torch.from_numpy(ctx.rng().standard_normal((2, 3, 7)))
    for i in (0, 2, 4):
        fully_shard(model[i], mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    regs = [OrthoL1(m, 0.05) for m in (model, ref)]

    def task(m):
        return m[:4](x).square().mean() + m[4](xc).square().mean()

    losses = []
    for m, reg in zip((model, ref), regs, strict=True):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            if how == "loss":
                total = task(m) + reg.loss()
                total.backward()
            else:
                task(m).backward()
                total = reg.add_grad_()
            opt.step()
        losses.append(float(reg.loss().detach()))
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        _close(
            p.full_tensor().detach().numpy(), q.detach().numpy(), 1e-10, f"{how}: weight {name} after 3 steps"
        )
    _close(np.float64(losses[0]), np.float64(losses[1]), 1e-12, f"{how}: loss after 3 steps")
    # ortho_l1 on one sharded weight, through gpu_orthol1.torch
    w = model[2].weight
    lw = ortho_l1(w, 0.3, mode="rows")
    W = ref[2].weight.detach()
    want = 0.3 * (W @ W.T - torch.eye(9, dtype=W.dtype)).abs().sum()
    _close(lw.detach().numpy(), want.numpy(), 1e-12, "ortho_l1(DTensor)")


# -- the list every rank runs -------------------------------------------------------------------


def cases(world):
    out = []
    shape3 = (7, 5, 8)
    for axis in (0, 1, 2):
        for sd in (0, 1, 2, -1):
            for red in REDS:
                out.append(
                    (
                        "functional",
                        f"3d axis={axis} shard_dim={sd} {red}",
                        lambda c, a=axis, s=sd, r=red: case_functional(c, shape3, a, s, r),
                    )
                )
        for sd in (0, 1, 2):
            out.append(
                (
                    "functional",
                    f"3d loss-only axis={axis} shard_dim={sd}",
                    lambda c, a=axis, s=sd: case_functional(c, shape3, a, s, "mean", want_grad=False),
                )
            )
            out.append(
                (
                    "functional",
                    f"3d contiguous axis={axis} shard_dim={sd}",
                    lambda c, a=axis, s=sd: case_functional(c, shape3, a, s, "sum", contiguous=True),
                )
            )
    for sd in (0, 1, -2):
        for red in REDS:
            out.append(
                (
                    "functional",
                    f"2d shard_dim={sd} {red}",
                    lambda c, s=sd, r=red: case_functional(c, (7, 5), 1, s, r),
                )
            )
    # an empty shard on the last rank(s), and one slice fewer than ranks
    out.append(("functional", "empty shard rows", lambda c: case_functional(c, (2, 3, 4), 1, 0, "sum")))
    out.append(("functional", "empty shard slices", lambda c: case_functional(c, (4, 2, 3), 1, 1, "none")))
    out.append(("functional", "empty shard cols", lambda c: case_functional(c, (4, 3, 2), 1, 2, "mean")))
    # several chunks per call: float64 with a tiny budget, and float16 whose ranks would pick different
    # chunk sizes (its per-slice workspace grows with the local row count): the group takes the least
    out.append(
        (
            "functional",
            "chunked float64",
            lambda c: case_functional(c, (9, 6, 4), 1, 0, "none", workspace_bytes=2 * 4 * 4 * 8),
        )
    )
    # (float16 n=4: 32 bytes per local row + 64 per slice; 1600 bytes hold 2 slices of <= 23 rows, 1 of 24)
    out.append(
        (
            "functional",
            "chunked float16 uneven chunks",
            lambda c: case_functional(
                c,
                (24 * c.world - 1, 6, 4),
                1,
                0,
                "sum",
                dtype="float16",
                workspace_bytes=1600,
                uneven_chunks=True,
            ),
        )
    )
    # the penalty family (docs/penalties.md): every split computes it from the summed Gram
    for variant in (("l2", True, False), ("l1", False, True), ("l2", False, True)):
        for axis, sd, cs in ((1, 0, "reshard"), (1, 1, "reshard"), (1, 2, "reshard"), (0, 1, "gather")):
            out.append(
                (
                    "functional",
                    f"penalty {variant} axis={axis} shard_dim={sd} {cs}",
                    lambda c, a=axis, s=sd, v=variant, k=cs: case_functional(
                        c, shape3, a, s, "sum", variant=v, column_split=k
                    ),
                )
            )
    # column splits the other way too: gathered (COLUMN_SPLIT = "gather")
    for axis, sd, red in ((1, 2, "sum"), (0, 1, "none"), (2, 1, "mean")):
        out.append(
            (
                "functional",
                f"gather-mode axis={axis} shard_dim={sd} {red}",
                lambda c, a=axis, s=sd, r=red: case_functional(c, shape3, a, s, r, column_split="gather"),
            )
        )
    out.append(
        (
            "functional",
            "gather-mode 2d",
            lambda c: case_functional(c, (7, 5), 1, 1, "sum", column_split="gather"),
        )
    )
    for dt in ("float32", "bfloat16"):
        for sd in (0, 1, 2):
            out.append(
                (
                    "functional",
                    f"{dt} shard_dim={sd}",
                    lambda c, s=sd, d=dt: case_functional(c, (9, 5, 6), 1, s, "sum", dtype=d),
                )
            )
    for axis, sd in ((1, 0), (1, 1), (1, 2), (0, 2)):
        out.append(
            ("nan", f"NaN axis={axis} shard_dim={sd}", lambda c, a=axis, s=sd: case_nan(c, (6, 4, 5), a, s))
        )
    for shape in ((7, 5), (5, 7), (6, 6)):
        for pl in (0, 1, "R"):
            for mode in ("rows", "columns", "auto", None):
                for red in ("sum", "mean", "none") if mode == "auto" else ("sum",):
                    out.append(
                        (
                            "dtensor",
                            f"dtensor {shape} {pl} {mode} {red}",
                            lambda c, sh=shape, p=pl, mo=mode, r=red: case_dtensor(c, sh, p, mo, r),
                        )
                    )
    for pl in (0, 1, 2):
        for mode in ("rows", "columns"):
            out.append(
                (
                    "dtensor",
                    f"dtensor 3d (5, 4, 7) Shard({pl}) {mode} none",
                    lambda c, p=pl, mo=mode: case_dtensor(c, (5, 4, 7), p, mo, "none"),
                )
            )
    for pl in (0, 1, "R"):
        out.append(
            (
                "dtensor",
                f"dtensor penalty l2 normalize {pl} rows",
                lambda c, p=pl: case_dtensor(c, (5, 7), p, "rows", "sum", variant=("l2", False, True)),
            )
        )
    out.append(("dtensor", "fsdp2 orthol1_dtensor_execute", case_fsdp))
    out.append(("dtensor", "fsdp2 training step: task loss + dtensor_ortho_l1", case_fsdp_train_step))
    out.append(("dtensor", "fsdp2 OrthoL1 helpers: loss, add_grad_, step_", case_orthol1_helpers))
    out.append(
        (
            "dtensor",
            "fsdp2 OrthoL1(model).loss() training steps vs unsharded",
            lambda c: case_orthol1_public(c, "loss"),
        )
    )
    out.append(
        (
            "dtensor",
            "fsdp2 OrthoL1(model).add_grad_() training steps vs unsharded",
            lambda c: case_orthol1_public(c, "add_grad"),
        )
    )
    out.append(
        (
            "dtensor",
            "fsdp2 orthol1_dtensor_execute, small batches",
            lambda c: case_fsdp(c, stack_bytes=9 * 9 * 8),
        )
    )
    out.append(("counts", "fsdp2 batched collectives", lambda c: case_fsdp(c, counts={})))
    out.append(("counts", "collective counts", None))
    out.append(("errors", "bad input on every rank", None))
    return out


def run(rank, world, seed, out_dir):
    """Every case of cases(world) on this rank of the initialized gloo group (tests/_groups.py made it):
    failures, error messages and counts go to out_dir/rank{rank}.json, case names to rank{rank}.progress."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    ctx = Ctx(rank, world, seed)
    ctx.mesh = init_device_mesh("cpu", (world,))
    results: dict = {"failures": {}, "ran": {}}
    os.makedirs(out_dir, exist_ok=True)
    prog = open(os.path.join(out_dir, f"rank{rank}.progress"), "w")
    try:
        for i, (cat, name, fn) in enumerate(cases(world)):
            ctx.case_no = i
            prog.write(name + "\n")
            prog.flush()
            results["ran"].setdefault(cat, []).append(name)
            try:
                if cat == "counts" and fn is None:
                    case_counts(ctx, results)
                elif cat == "errors":
                    case_errors(ctx, results)
                else:
                    fn(ctx)
            except Exception:  # noqa: BLE001 - recorded, reported by the parent test
                results["failures"][name] = traceback.format_exc(limit=6)
        dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        prog.close()
