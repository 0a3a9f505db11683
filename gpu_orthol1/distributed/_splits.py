"""The three splits, and the functional form `loss_and_grad` / `loss` on a plain tensor's shard.

Which dim of the (m, l, n) slice view the shards split decides what moves (see the package docstring):
l (rows): partial Grams summed over the group; m (slices): local slices, the loss reduced; n
(columns): resharded to a row split and back (COLUMN_SPLIT "reshard") or gathered ("gather").
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .. import _penalty
from ..torch import _core
from ..torch._bridge import _from_array, _to_array
from . import _meta
from ._gram import _gram_hook
from ._meta import (
    _F_AXIS,
    _F_BETA,
    _F_CHUNK,
    _F_NDIM,
    _F_RED,
    REDUCTIONS,
    _bits_beta,
    _compute_view,
    _default_workspace,
    _exchange,
    _from_slice_view,
    _group_of,
    _inspect,
    _meta_device,
    _readable,
    _stream_ctx,
    _validate,
)


def _run_core(
    V: torch.Tensor,
    beta: float,
    reduction: str,
    want_grad: bool,
    device: torch.device,
    *,
    hook: Any = None,
    chunk: int | None = None,
    plan: Any = None,
    ws: int | None = None,
    variant: Any = _penalty.DEFAULT,
    precision: str = "highest",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The core on an (m, l, n) slice view V (readable, float16/32/64): (loss tensor, grad view or None).
    precision: resolved ("highest" or "tf32")."""
    G = torch.empty_like(V) if want_grad else None
    if G is not None and not _readable(G):
        G = torch.empty(V.shape, dtype=V.dtype, device=V.device)
    with _stream_ctx(device):
        a = _to_array(V)
        p = (
            plan
            if plan is not None
            else _core.cached(
                a, 0, reduction, precision, "numpy" if device.type == "cpu" else "cupy", ws, *variant
            )
        )
        loss, _ = _core.execute(
            p, a, _to_array(G) if G is not None else None, False, beta, want_grad, gram_hook=hook, chunk=chunk
        )
        return _from_array(loss, device), G


def _gather_along(x: torch.Tensor, dim: int, sizes: list[int], group: Any, rank: int) -> torch.Tensor:
    """The concatenation along dim of every rank's x (uneven sizes along dim: known from the metadata).
    gloo's all_gather wants equal sizes, so shards are padded to the largest; the ranks' pieces land in
    one buffer, which is the result as it is when the sizes are even (no concatenating copy)."""
    x = x.movedim(dim, 0).contiguous()
    rest = tuple(x.shape[1:])
    per = math.prod(rest)
    big = max(sizes)
    if x.shape[0] == big:
        buf = x.reshape(-1)
    else:
        buf = x.new_zeros(big * per)
        buf[: x.numel()] = x.reshape(-1)
    out = x.new_empty((len(sizes), big * per))
    dist.all_gather(list(out.unbind(0)), buf, group=group)
    if all(s == big for s in sizes):
        full = out.view((len(sizes) * big,) + rest)
    else:
        full = torch.cat(
            [p[: s * per].view((s,) + rest) for p, s in zip(out.unbind(0), sizes, strict=True)], 0
        )
    return full.movedim(0, dim)


def _split_sizes(total: int, world: int) -> list[int]:
    """torch.tensor_split's sizes: the first total % world ranks get one more."""
    return [total // world + (1 if r < total % world else 0) for r in range(world)]


def _all_to_all(
    blocks: list[torch.Tensor], out_sizes: list[int], out_dtype: torch.dtype, group: Any
) -> tuple[torch.Tensor, ...]:
    """Send blocks[q] (tensors) to rank q and receive out_sizes[p] numbers from each rank p: one
    all_to_all_single over one packed send buffer (uneven sizes allowed). Returns the pieces by rank."""
    ref = blocks[0]
    send = ref.new_empty(sum(b.numel() for b in blocks), dtype=out_dtype)
    o = 0
    for b in blocks:
        send[o : o + b.numel()].view(b.shape).copy_(b)
        o += b.numel()
    recv = ref.new_empty(sum(out_sizes), dtype=out_dtype)
    dist.all_to_all_single(recv, send, list(out_sizes), [b.numel() for b in blocks], group=group)
    return recv.split(list(out_sizes))


def _columns_via_rows(
    V: torch.Tensor,
    b: float,
    red: str,
    want_grad: bool,
    device: torch.device,
    sizes: list[int],
    g: Any,
    rank: int,
    world: int,
    workspace_bytes: int | None,
    variant: Any,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A column split computed as a row split. Every rank sends each other rank that rank's rows of its
    columns (all-to-all), so it holds a slab of whole rows (m, l_r, n); the row split's partial Grams are
    summed (packed all-reduce) and each rank forms its slab's gradient rows; a second all-to-all returns
    every rank its columns. Sends 2 (world-1)/world of its shard plus the packed Grams, instead of
    (world-1) times its shard; each rank computes 1/world of the GEMMs and never holds all of Phi."""
    m, l, n_me = V.shape
    rows = _split_sizes(l, world)
    r0 = [sum(rows[:q]) for q in range(world)]
    c0 = [sum(sizes[:p]) for p in range(world)]
    L = rows[rank]
    pieces = _all_to_all(
        [V[:, r0[q] : r0[q] + rows[q], :] for q in range(world)], [m * L * s for s in sizes], V.dtype, g
    )
    Vrow = _compute_view(torch.cat([p.view(m, L, s) for p, s in zip(pieces, sizes, strict=True)], dim=2))
    # the ranks' slabs may differ by a row: agree on the chunk (the least; 0 = a rank could not plan)
    ws = workspace_bytes if workspace_bytes is not None else _default_workspace(device, L, Vrow.shape[2])
    plan, chunk, err = None, 0, None
    try:
        with _stream_ctx(device):
            plan = _core.cached(
                _to_array(Vrow), 0, red, precision, "numpy" if device.type == "cpu" else "cupy", ws, *variant
            )
            chunk = int(_core.chunk_for(plan, bool(want_grad)))
    except Exception as e:  # noqa: BLE001 - told to every rank by the MIN below
        err = e
    agreed = torch.tensor([chunk], dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=g)
    if int(agreed.item()) < 1:
        mine = f" ({type(err).__name__}: {err})" if chunk < 1 else ""
        raise ValueError(
            f"gpu_orthol1.distributed: a rank could not plan its row slab of the column split{mine}"
        )
    lt, Grow = _run_core(
        Vrow, b, red, want_grad, device, hook=_gram_hook(g, device), chunk=int(agreed.item()), plan=plan
    )
    if not want_grad:
        return lt, None
    assert Grow is not None
    back = _all_to_all(
        [Grow[:, :, c0[q] : c0[q] + sizes[q]] for q in range(world)],
        [m * rows[p] * n_me for p in range(world)],
        Grow.dtype,
        g,
    )
    return lt, torch.cat([p.view(m, rows[q], n_me) for q, p in enumerate(back)], dim=1)


def _run(
    local: Any,
    beta: Any,
    axis: Any,
    shard_dim: Any,
    reduction: Any,
    group: Any,
    want_grad: bool,
    transpose: bool = False,
    workspace_bytes: Any = None,
    variant: Any = _penalty.DEFAULT,
    precision: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int] | None]:
    """loss_and_grad / loss and the DTensor forms: (loss, grad_local or None, (first, count) of the
    global slices this rank holds when the shards split the slice axis, else None)."""
    g, rank, world = _group_of(group)
    mine = _inspect(
        local, beta, axis, shard_dim, reduction, want_grad, transpose, workspace_bytes, variant, precision
    )
    rows = _exchange(mine, g, world, _meta_device(g, local))
    sizes = _validate(rows, rank, mine)
    row = mine.row
    nd, ax, red = row[_F_NDIM], row[_F_AXIS], REDUCTIONS[row[_F_RED]]
    b = _bits_beta(row[_F_BETA])
    device = local.device
    ldt = torch.float64 if local.dtype == torch.float64 else torch.float32
    V = mine.V
    kind = mine.kind
    v, prec = mine.variant, mine.precision
    if kind == 1:  # rows of every slice: sum partial Grams, signs and gradient rows locally
        chunk = min(r[_F_CHUNK] for r in rows)
        lt, G = _run_core(
            V, b, red, want_grad, device, hook=_gram_hook(g, device), chunk=chunk, plan=mine.plan
        )  # the plan made by _inspect, at this call's precision
        loss_t = lt
    elif kind == 0:  # whole slices: local slices, then the loss over the group
        V = _compute_view(V)
        m_glob = sum(sizes)
        bl = b / m_glob if red == "mean" and m_glob else b  # "mean" is over the GLOBAL slice count
        lt, G = _run_core(
            V, bl, "none" if red == "none" else "sum", want_grad, device, variant=v, precision=prec
        )
        if red == "none":
            loss_t = _gather_along(lt, 0, sizes, g, rank)
        else:
            tot = lt.to(torch.float64).reshape(1)
            dist.all_reduce(tot, group=g)
            loss_t = tot.reshape(())
    elif _meta.COLUMN_SPLIT == "reshard" and world > 1:  # columns: move to a row split and back
        lt, G = _columns_via_rows(
            V, b, red, want_grad, device, sizes, g, rank, world, workspace_bytes, v, prec
        )
        loss_t = lt
    else:  # columns of every slice, gathered: the whole tensor on every rank
        full = _gather_along(V, 2, sizes, g, rank)  # dim 2 of the slice view is n
        full = _compute_view(full)
        lt, Gf = _run_core(full, b, red, want_grad, device, variant=v, precision=prec)
        loss_t = lt
        G = None
        if want_grad:
            assert Gf is not None
            off = sum(sizes[:rank])
            G = Gf.narrow(2, off, sizes[rank]).clone()  # its own columns; the full buffer is freed
    loss_t = loss_t.to(ldt)
    # which of the global slices this rank's gradient holds (a "none" loss's grad_output is per slice)
    own = (sum(sizes[:rank]), sizes[rank]) if kind == 0 else None
    if not want_grad:
        return loss_t, None, own
    assert G is not None
    grad = _from_slice_view(G, nd, ax, transpose)
    if grad.dtype != local.dtype:  # bfloat16: computed in float32
        grad = grad.to(local.dtype)
    return loss_t, grad, own


def loss_and_grad(
    local: Any,
    beta: float = 1.0,
    *,
    axis: int = 1,
    shard_dim: int,
    reduction: str = "sum",
    group: Any = None,
    workspace_bytes: int | None = None,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str | None = None,
) -> tuple[Any, Any]:
    """Loss and this rank's gradient shard of a Phi split over the ranks of `group`.

    local: this rank's piece (a CPU or CUDA torch tensor) of the global Phi, 3-D with slices along
    `axis` (the core's convention) or 2-D (one slice (l, n)), split along `shard_dim` (negative
    allowed) into contiguous pieces in rank order; uneven sizes (as torch.tensor_split and DTensor
    make them) and empty pieces are fine. float16, bfloat16 (computed in float32), float32, float64.

    Returns (loss, grad_local): the global loss, a 0-d tensor ((m,) for reduction="none"), the same
    on every rank (bitwise, on ranks with the same hardware), float64 for float64 input and float32
    otherwise; and dL/d(local), this rank's piece of the global gradient, local's shape and dtype.
    "mean" divides by the global number of slices.

    Every rank must call it with its own shard and the same other arguments (collective call). Shards
    that do not form one tensor, arguments that differ between ranks, and bad arguments on any rank
    raise the same ValueError on every rank. workspace_bytes: as in the core (a hard limit per chunk);
    default 16 MiB on the CPU (each chunk of slices costs one all-reduce), the core's default on GPU.
    penalty, diagonal, normalize: the member of the penalty family, as in the core API
    (docs/penalties.md): every member is computed from the summed Gram, so every split supports it.
    precision: float32 GEMMs on CUDA in float32 ("highest") or on TF32 tensor cores ("tf32"); None
    follows torch.get_float32_matmul_precision() at each call, as `gpu_orthol1.torch.ortho_l1` does.
    The ranks must agree on the resolved value (checked with the other arguments).

    Args:
        local: this rank's shard (a CPU or CUDA torch tensor, 2-D or 3-D).
        beta: the loss's factor, finite and >= 0 (the same on every rank).
        axis: the slice axis of a 3-D Phi.
        shard_dim: the dim of Phi the shards split (negative allowed).
        reduction: "sum", "mean" (over the global slices) or "none".
        group: the process group (default: the world).
        workspace_bytes: the workspace budget per chunk, or None for the default.
        penalty: "l1" or "l2".
        diagonal: False leaves the Gram's diagonal free.
        normalize: True takes the Gram of the unit-normalized columns.
        precision: None (torch's float32 matmul setting), "highest" or "tf32".

    Returns:
        (loss, grad_local): the global loss, the same on every rank, and this rank's gradient shard.

    Raises:
        ValueError: on every rank alike, when any rank's arguments are bad, differ between ranks, or
            the shards do not form one tensor; also when torch.distributed is not initialized.

    Example:
        >>> local = torch.randn(64 // dist.get_world_size(), 16)  # this rank's rows of a (64, 16) Phi
        >>> loss, grad_local = loss_and_grad(local, 1e-3, shard_dim=0)
    """
    loss_t, grad, _ = _run(
        local,
        beta,
        axis,
        shard_dim,
        reduction,
        group,
        True,
        workspace_bytes=workspace_bytes,
        variant=(penalty, diagonal, normalize),
        precision=precision,
    )
    return loss_t, grad


def loss(
    local: Any,
    beta: float = 1.0,
    *,
    axis: int = 1,
    shard_dim: int,
    reduction: str = "sum",
    group: Any = None,
    workspace_bytes: int | None = None,
    penalty: str = "l1",
    diagonal: bool = True,
    normalize: bool = False,
    precision: str | None = None,
) -> Any:
    """The global loss only (no gradient GEMM); arguments and collectives as in `loss_and_grad`.

    Args:
        local: this rank's shard, as in `loss_and_grad`.
        beta: the loss's factor.
        axis: the slice axis of a 3-D Phi.
        shard_dim: the dim of Phi the shards split.
        reduction: "sum", "mean" or "none".
        group: the process group (default: the world).
        workspace_bytes: the workspace budget per chunk, or None.
        penalty: "l1" or "l2".
        diagonal: False leaves the Gram's diagonal free.
        normalize: True takes the Gram of the unit-normalized columns.
        precision: None (torch's float32 matmul setting), "highest" or "tf32".

    Returns:
        The global loss, the same on every rank (0-d; (m,) for reduction="none").

    Raises:
        ValueError: as in `loss_and_grad`.

    Example:
        >>> value = loss(torch.randn(8, 16), 1e-3, shard_dim=0)  # collective: every rank calls it
    """
    return _run(
        local,
        beta,
        axis,
        shard_dim,
        reduction,
        group,
        False,
        workspace_bytes=workspace_bytes,
        variant=(penalty, diagonal, normalize),
        precision=precision,
    )[0]
