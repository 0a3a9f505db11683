"""Many (DTensor) parameters at once: what OrthoL1's loss(), add_grad_() and step_() call on a model
after fully_shard. Targets with the same global slice shape, dtype, split and group are stacked into
one call of the splits, so a model's matrices cost a handful of collectives.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .. import _penalty
from ..torch import _core
from ..torch._bridge import _check_precision, _resolve_precision
from ._dtensor import _dtensor_split, _first_order
from ._meta import _DTYPES, _compute_view, _from_slice_view, _kind_of, _meta_device, _slice_view
from ._splits import _run, _run_core

# ---------------------------------------------------------------------------------------------
# many DTensor parameters (OrthoL1 on an FSDP2 model)


STACK_BYTES = 64 << 20  # most local bytes stacked into one batched call (a copy of the shards)


@dataclass
class _Member:
    j: int  # index in targets
    V: Any  # (m, l, n) slice view of the local shard (transposed for "rows")
    kind: int  # -1 replicated/plain, 0 m, 1 l, 2 n
    group: Any
    back: Any  # slice-view gradient -> the local parameter's shape
    key: tuple  # rank-independent: which members can share one call
    scale: float = 1.0  # multiplies beta for this target


def _member(j, w, how, axis, transpose, scale=1.0):
    """One target as a slice view: Conv weights flattened to (out, -1) in logical order (the same on
    every rank, so the ranks' partial Grams pair the same columns)."""
    from torch.distributed.tensor import DTensor

    if how not in ("matrix", "flatten", "stack"):
        raise ValueError(f"target {j}: how must be 'matrix', 'flatten' or 'stack', got {how!r}")
    if isinstance(w, DTensor):
        shard_dim, grp = _dtensor_split(w)
        local, gshape = w.to_local(), tuple(w.shape)
    else:
        shard_dim, grp, local, gshape = None, None, w, tuple(w.shape)
    local = local.detach()
    if local.dtype not in _DTYPES:
        raise ValueError(f"target {j}: dtype {local.dtype} is not float16, bfloat16, float32 or float64")
    shape = local.shape
    if how == "flatten":
        if shard_dim is not None and shard_dim > 1:
            raise ValueError(
                f"target {j}: a {local.dim()}-D weight flattened to (out, -1) can be sharded on dim 0 "
                f"or 1 only (its rows or a block of the flattened columns), got Shard({shard_dim})"
            )
        local = local.reshape(shape[0], math.prod(shape[1:]))  # (-1 is ambiguous for an empty shard)
        gshape = (gshape[0], math.prod(gshape[1:]))
    elif how == "matrix" and local.dim() != 2:
        raise ValueError(f"target {j}: how='matrix' needs a 2-D parameter, got shape {tuple(shape)}")
    nd = local.dim()
    ax = int(axis) % 3 if nd == 3 else 0
    V = _slice_view(local, nd, ax, bool(transpose))
    gV = tuple(_slice_view(torch.empty(gshape, device="meta"), nd, ax, bool(transpose)).shape)

    def back(G, nd=nd, ax=ax, tr=bool(transpose), shape=shape):
        return _from_slice_view(G, nd, ax, tr).reshape(shape)

    if shard_dim is None:
        return _Member(j, V, -1, None, back, ("local", j), scale)
    kind = _kind_of(nd, ax, shard_dim, bool(transpose))
    if kind == 0:  # slices split over ranks: its own call (another target's slices would interleave)
        return _Member(j, V, 0, grp, back, ("slices", j), scale)
    ranks = tuple(dist.get_process_group_ranks(grp))
    # same key -> same local (l, n) on this rank (DTensor splits a size the same way every time)
    return _Member(
        j,
        V,
        kind,
        grp,
        back,
        ("split", ranks, kind, str(local.dtype), local.device.type, scale, gV[1:]),
        scale,
    )


def _first_group(targets):
    """The process group of the first sharded target (from placements alone: the same on every rank)."""
    from torch.distributed.tensor import DTensor

    for t in targets:
        w = t[0]
        if isinstance(w, DTensor):
            shard_dim, grp = _dtensor_split(w)
            if shard_dim is not None:
                return grp
    return None


def _fingerprint(members, group, local_error, device):
    """One all-gather before any batched call: ranks whose target lists differ would batch differently
    and mismatch their collectives, and a rank that failed on its own shards (local_error) would skip
    them; either way every rank raises the same ValueError instead."""
    import hashlib

    text = repr([(m.j, m.key, m.kind) for m in members]).encode()
    h = int.from_bytes(hashlib.sha256(text).digest()[:7], "little")
    t = torch.tensor([int(local_error is not None), len(members), h], dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    failed = [r for r, p in enumerate(parts) if int(p[0])]
    if failed:
        mine = f" (here: {local_error})" if local_error is not None else ""
        raise ValueError(
            f"gpu_orthol1.distributed: rank(s) {failed} could not prepare their shards of the targets{mine}"
        )
    if any(not torch.equal(p, parts[0]) for p in parts):
        raise ValueError(
            "gpu_orthol1.distributed: the ranks passed different targets (number, shapes, "
            "placements, modes or order differ); every rank must pass the same list"
        )


def orthol1_dtensor_execute(
    targets: Sequence[tuple],
    beta: float,
    *,
    want_grad: bool = True,
    outs: Sequence[Any] | None = None,
    accumulate: bool = False,
    workspace_bytes: int | None = None,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str | None = None,
) -> tuple[Any, list]:
    """Loss and local gradients of many (DTensor) parameters: what OrthoL1 needs after fully_shard.

    targets: one (param, how, axis, transpose[, scale]) per parameter, as OrthoL1's targets hold them
    (scale multiplies beta for that parameter, 1 by default): param a
    DTensor (Shard(d) on one mesh dim and Replicate on the others, or replicated; FSDP2 makes Shard(0))
    or a plain tensor (computed locally); how "matrix" (2-D), "flatten" (Conv weights as (out, -1),
    sharded on dim 0 or 1) or "stack" (3-D, slices along axis); transpose True penalizes each slice's
    row Gram (mode "rows").
    outs: None, or per target a tensor of the LOCAL parameter's shape (e.g. p.grad.to_local()) that
    receives the gradient (accumulate=True adds it). Returns (loss, grads): the summed loss, beta
    included, as a float64 0-d tensor, the same on every rank; grads per target: the local gradient
    (outs[j] when given; None when want_grad is False). Wrap a fresh gradient as a DTensor with
    DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).

    Batched: sharded targets with the same global slice shape, dtype, split and process group are
    stacked (a copy of their local shards, up to STACK_BYTES per call) and go through ONE
    `loss_and_grad`: one metadata all-gather and one all-reduce of packed Grams per workspace chunk
    for row splits, one all-gather of the stacked shards for column splits. A 48-matrix group is then
    a handful of collectives instead of a hundred. Collective: every rank passes the same targets in
    the same order (checked: one small all-gather first); replicated and plain targets run locally.

    Args:
        targets: per parameter (param, how, axis, transpose[, scale]).
        beta: the loss's factor, finite and >= 0.
        want_grad: form the gradients.
        outs: None, or per target the local tensor that receives its gradient.
        accumulate: add into outs instead of writing them.
        workspace_bytes: the workspace budget per chunk, or None.
        penalty: "l1" or "l2".
        diagonal: False leaves the Gram's diagonal free.
        normalize: True takes the Gram of the unit-normalized rows or columns.
        precision: None (torch's float32 matmul setting, read now), "highest" or "tf32".

    Returns:
        (loss, grads): the summed float64 loss, the same on every rank, and the local gradients.

    Raises:
        ValueError: a target is malformed, outs does not match, or the ranks' targets differ or
            failed on some rank (on every rank alike).

    Example:
        >>> fully_shard(model)  # every parameter a Shard(0) DTensor
        >>> targets = [(p, "matrix", 1, False) for p in model.parameters() if p.dim() == 2]
        >>> loss, grads = orthol1_dtensor_execute(targets, 1e-3)
    """
    b = _core.check_beta(beta)
    variant = _penalty.check(penalty, diagonal, normalize)
    prec = _resolve_precision(_check_precision(precision))
    if outs is not None and len(outs) != len(targets):
        raise ValueError(f"outs has {len(outs)} entries for {len(targets)} targets")
    if accumulate and outs is None:
        raise ValueError("accumulate=True needs outs= (the tensors to add the gradients into)")
    group = _first_group(targets)
    members, local_error = [], None
    for j, t in enumerate(targets):
        if not 4 <= len(t) <= 5:
            raise ValueError(
                f"target {j}: expected (param, how, axis, transpose[, scale]), got {len(t)} items"
            )
        w, how, axis, tr = t[:4]
        scale = _core.check_beta(t[4]) if len(t) == 5 else 1.0
        try:
            members.append(_member(j, w, how, axis, tr, scale))
        except ValueError:  # an argument error: decided by placements, modes and dtypes, alike on all ranks
            raise
        except Exception as e:  # noqa: BLE001 - this rank's own shards: told to every rank below
            if group is None:
                raise
            local_error = f"target {j}: {type(e).__name__}: {e}"
            break
    if group is not None:
        _fingerprint(members, group, local_error, _meta_device(group, None))
    batches: dict = {}
    for m in members:
        batches.setdefault(m.key, []).append(m)
    grads: list = [None] * len(members)
    dev = members[0].V.device if members else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=dev)  # summed where the losses are: no host sync
    for key, ms in batches.items():
        for part in _cut(key, ms):
            lt, gs = _run_members(part, b, want_grad, workspace_bytes, variant, prec)
            total = total + lt.to(device=dev, dtype=torch.float64)
            for m, g in zip(part, gs, strict=True):
                grads[m.j] = g
    out_grads: list = []
    for j, g in enumerate(grads):
        if g is not None and outs is not None:
            if accumulate:
                outs[j].add_(g)
            else:
                outs[j].copy_(g)
            g = outs[j]
        out_grads.append(g)
    return total, out_grads


def _cut(key, ms):
    """Batches of at most STACK_BYTES of GLOBAL slices (at least one member each): sizes every rank
    computes alike, so all ranks make the same calls (a local row count differs between ranks)."""
    if ms[0].kind < 1:
        return [ms]
    l, n = key[-1]
    out, cur, size = [], [], 0
    for m in ms:
        nb = m.V.shape[0] * l * n * m.V.element_size()
        if cur and size + nb > STACK_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(m)
        size += nb
    out.append(cur)
    return out


def _run_members(ms, b, want_grad, workspace_bytes, variant, prec):
    """One call for members that share a key: (loss, [local gradient per member])."""
    m0 = ms[0]
    b = b * m0.scale  # one scale per batch: it is part of the batch key
    if m0.kind == -1:
        t = m0.V  # replicated / plain: the core on the whole tensor, no collective
        lt, G = _run_core(_compute_view(t), b, "sum", want_grad, t.device, variant=variant, precision=prec)
    elif m0.kind == 0:
        lt, G, _ = _run(m0.V, b, 0, 0, "sum", m0.group, want_grad, False, workspace_bytes, variant, prec)
    else:
        V = m0.V if len(ms) == 1 else torch.cat([m.V for m in ms], 0)  # stacked slices (a copy)
        lt, G, _ = _run(V, b, 0, m0.kind, "sum", m0.group, want_grad, False, workspace_bytes, variant, prec)
    if not want_grad:
        return lt, [None] * len(ms)
    gs, off = [], 0
    for m in ms:
        g = G.narrow(0, off, m.V.shape[0])
        off += m.V.shape[0]
        if g.dtype != m.V.dtype:
            g = g.to(m.V.dtype)
        gs.append(m.back(g))
    return lt, gs


# ---------------------------------------------------------------------------------------------
# OrthoL1's three methods over (DTensor) targets, for gpu_orthol1.torch to call


def _dtensor_meta(p):
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        return p.device_mesh, tuple(p.placements), p.shape, p.stride()
    return None


def _wrap_grad(g, meta):
    from torch.distributed.tensor import DTensor

    if meta is None:
        return g
    mesh, placements, shape, stride = meta
    return DTensor.from_local(g, mesh, placements, run_check=False, shape=shape, stride=stride)


class _TargetsLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, beta, kw, *params):
        want = any(ctx.needs_input_grad[3:])
        targets = [(p,) + sp for p, sp in zip(params, spec, strict=True)]
        loss, grads = orthol1_dtensor_execute(targets, beta, want_grad=want, **kw)
        ctx.want = want
        if want:
            ctx.grads = grads  # formed in this forward pass: the backward only scales them
            ctx.metas = [_dtensor_meta(p) for p in params]
            ctx.save_for_backward(*params)
        return loss

    @staticmethod
    def backward(ctx, go):
        if not ctx.want:
            return (None,) * len(ctx.needs_input_grad)
        out = tuple(
            _first_order(_wrap_grad(g * go.to(g.dtype), m), p)
            for g, m, p in zip(ctx.grads, ctx.metas, ctx.saved_tensors, strict=True)
        )
        return (None, None, None) + out


def orthol1_dtensor_loss(
    targets: Sequence[tuple],
    beta: float,
    *,
    workspace_bytes: int | None = None,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str | None = None,
) -> Any:
    """OrthoL1.loss() for (DTensor) targets (see `orthol1_dtensor_execute`): the summed loss as a float64
    0-d tensor with autograd; its backward hands each parameter the gradient formed in the forward pass
    (a DTensor with the parameter's placements for a DTensor).

    Args:
        targets: as for `orthol1_dtensor_execute`.
        beta: the loss's factor.
        workspace_bytes: the workspace budget per chunk, or None.
        penalty: "l1" or "l2".
        diagonal: False leaves the Gram's diagonal free.
        normalize: True takes the Gram of the unit-normalized rows or columns.
        precision: None (torch's float32 matmul setting), "highest" or "tf32".

    Returns:
        The summed loss with autograd.

    Raises:
        ValueError: as for `orthol1_dtensor_execute`.

    Example:
        >>> loss = orthol1_dtensor_loss(targets, 1e-3)
        >>> loss.backward()
    """
    spec = [(t[1], t[2], bool(t[3])) + tuple(t[4:5]) for t in targets]
    params = [t[0] for t in targets]
    kw = dict(workspace_bytes=workspace_bytes, penalty=penalty, diagonal=diagonal, normalize=normalize)
    kw["precision"] = _resolve_precision(_check_precision(precision))
    return _TargetsLoss.apply(spec, _core.check_beta(beta), kw, *params)


@torch.no_grad()
def orthol1_dtensor_add_grad_(
    targets: Sequence[tuple],
    beta: float,
    *,
    workspace_bytes: int | None = None,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str | None = None,
) -> Any:
    """OrthoL1.add_grad_() for (DTensor) targets: adds the gradient into each parameter's .grad (made as
    zeros with the parameter's placements when None) through its local tensor; returns the loss.

    Args:
        targets: as for `orthol1_dtensor_execute`.
        beta: the loss's factor.
        workspace_bytes: the workspace budget per chunk, or None.
        penalty: "l1" or "l2".
        diagonal: False leaves the Gram's diagonal free.
        normalize: True takes the Gram of the unit-normalized rows or columns.
        precision: None (torch's float32 matmul setting), "highest" or "tf32".

    Returns:
        The summed loss (float64, detached).

    Raises:
        ValueError: a .grad's placements or shape differ from its parameter's, or as for
            `orthol1_dtensor_execute`.

    Example:
        >>> value = orthol1_dtensor_add_grad_(targets, 1e-3)  # after the task loss's backward
    """
    outs = []
    for j, p in enumerate(t[0] for t in targets):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        meta, gmeta = _dtensor_meta(p), _dtensor_meta(p.grad)
        if (meta is None) != (gmeta is None) or (
            meta is not None and gmeta is not None and (meta[1] != gmeta[1] or meta[2] != gmeta[2])
        ):
            raise ValueError(
                f"target {j}: .grad has placements {gmeta and gmeta[1]}, shape "
                f"{tuple(p.grad.shape)}; the parameter {meta and meta[1]}, {tuple(p.shape)}"
            )
        outs.append(p.grad.to_local() if gmeta is not None else p.grad)
    loss, _ = orthol1_dtensor_execute(
        targets,
        beta,
        outs=outs,
        accumulate=True,
        workspace_bytes=workspace_bytes,
        penalty=penalty,
        diagonal=diagonal,
        normalize=normalize,
        precision=precision,
    )
    return loss


@torch.no_grad()
def orthol1_dtensor_step_(
    targets: Sequence[tuple],
    beta: float,
    lr: float,
    *,
    workspace_bytes: int | None = None,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str | None = None,
) -> Any:
    """OrthoL1.step_(lr) for (DTensor) targets: W <- W - lr * dL/dW on each rank's shard, every gradient
    from the weights before the update; returns the loss before the step.

    Args:
        targets: as for `orthol1_dtensor_execute`.
        beta: the loss's factor.
        lr: the step size, a finite real number.
        workspace_bytes: the workspace budget per chunk, or None.
        penalty: "l1" or "l2".
        diagonal: False leaves the Gram's diagonal free.
        normalize: True takes the Gram of the unit-normalized rows or columns.
        precision: None (torch's float32 matmul setting), "highest" or "tf32".

    Returns:
        The summed loss before the step (float64, detached).

    Raises:
        ValueError: lr is not a finite real number, or as for `orthol1_dtensor_execute`.

    Example:
        >>> value = orthol1_dtensor_step_(targets, 1e-3, lr=0.1)
    """
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(float(lr)):
        raise ValueError(f"lr must be a finite real number, got {lr!r}")
    loss, grads = orthol1_dtensor_execute(
        targets,
        beta,
        workspace_bytes=workspace_bytes,
        penalty=penalty,
        diagonal=diagonal,
        normalize=normalize,
        precision=precision,
    )
    for p, g in zip((t[0] for t in targets), grads, strict=True):
        (p.to_local() if _dtensor_meta(p) is not None else p).sub_(g, alpha=float(lr))
    return loss
