"""The L1 orthogonality loss and gradient of a tensor sharded over the ranks of a process group.

    from gpu_orthol1 import distributed as odist

    # local: this rank's piece of the global (l, m, n) Phi, split along shard_dim in rank order
    loss, grad_local = odist.loss_and_grad(local, beta, axis=1, shard_dim=0)
    loss = odist.loss(local, beta, axis=1, shard_dim=0)

The global Phi is never assembled unless the math needs it. What moves depends on which of the
slice view's three dims (m slices, l rows, n columns; `axis` names the slice dim, the other two
are (l, n) in order) the shards split:

- l (rows of every slice): each rank forms the partial Grams Phi_i,r^T Phi_i,r of its rows and the
  partial Grams are summed over the group (one all-reduce per chunk of slices, of the Grams' upper
  triangles packed into ~n(n+1)/2 numbers each), then every rank takes the signs of the same summed
  Gram and forms its own gradient rows, 2 beta Phi_r S, locally. The loss comes from the same summed
  Gram on every rank: no further collective. This is the FSDP case (weights split along dim 0).
- m (the slice axis itself): each rank computes its own slices; one all-reduce of the loss (an
  all-gather of the per-slice losses for reduction="none").
- n (columns of every slice): the Gram's blocks Phi_a^T Phi_b pair columns of different ranks, and
  the gradient of rank a's columns, 2 beta sum_b Phi_b S_ba, needs every rank's columns: there is no
  reduction smaller than Phi itself, so the shards are all-gathered, every rank computes on the full
  tensor and returns its own columns of the gradient.

Before any of this, every rank all-gathers a small metadata vector (dims, dtype, device type,
shard_dim, axis, reduction, beta, chunking) and validates the table the same way, so a shard that
does not fit the others, or arguments that differ between ranks, raise the same ValueError on every
rank instead of leaving the collectives mismatched (a hang).

`dtensor_ortho_l1` is the DTensor form behind `gpu_orthol1.torch.ortho_l1` (Shard on any dim, or
Replicate); `orthol1_dtensor_execute` evaluates a list of DTensor parameters (FSDP2's Shard(0)).
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import torch
    import torch.distributed as dist
except ImportError as _e:  # torch is an optional extra
    raise ImportError(
        "gpu_orthol1.distributed needs PyTorch, which is not installed: install it first "
        f"(pip install 'torch==2.*' for your platform, see https://pytorch.org/get-started/) ({_e})"
    ) from _e

from . import _cache, _checks, _driver, _penalty, _plan
from .torch import _from_array, _on_torch_stream, _to_array  # one zero-copy bridge for torch <-> NumPy/CuPy

__all__ = ["loss_and_grad", "loss", "dtensor_ortho_l1", "orthol1_dtensor_execute", "orthol1_dtensor_loss",
           "orthol1_dtensor_add_grad_", "orthol1_dtensor_step_"]

REDUCTIONS = _checks.REDUCTIONS
MODES = ("rows", "columns", "auto")
_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bfloat16)
_NP = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_DEVICE_TYPES = ("cpu", "cuda")
# On the CPU each chunk of slices costs one all-reduce of its Grams, so the default chunk is larger
# than the core's 4 MiB cache-sized one: fewer, larger collectives (the GEMMs, not the extra trip of
# the Gram through memory, dominate the time for the matrix sizes where sharding pays).
CPU_DEFAULT_WORKSPACE = 16 << 20
# A column split (shards along n) either reshards to a row split (two all-to-alls of Phi's and the
# gradient's blocks around the row split's Gram all-reduce: compute and memory 1/world, and fewer bytes
# than gathering from 3 ranks on) or gathers Phi and computes the whole tensor on every rank. Every
# rank must use the same (it travels with the metadata).
COLUMN_SPLITS = ("reshard", "gather")
COLUMN_SPLIT = "reshard"
_NOT_INT = -(1 << 62)  # an argument that is not an integer, in the int64 metadata


# ---------------------------------------------------------------------------------------------
# the metadata every rank shares before any data moves

# fields of one rank's metadata row (int64)
(_F_STATUS, _F_NDIM, _F_S0, _F_S1, _F_S2, _F_DTYPE, _F_DEVICE, _F_SHARD, _F_AXIS, _F_RED, _F_WANT, _F_BETA,
 _F_CHUNK, _F_TRANSPOSE, _F_WS, _F_COLSPLIT, _F_VARIANT, _NFIELDS) = range(18)

# local statuses, in the order they are checked
(_OK, _E_TYPE, _E_DTENSOR, _E_LAYOUT, _E_DTYPE, _E_DEVICE, _E_NDIM, _E_SHARD, _E_AXIS, _E_RED, _E_BETA,
 _E_WS, _E_PLAN, _E_VARIANT) = range(14)

_KINDS = ("m", "l", "n")  # which dim of the (m, l, n) slice view the shards split


def _int_field(x) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        return _NOT_INT
    return max(-(1 << 61), min(int(x), 1 << 61))


def _beta_bits(b: float) -> int:
    return struct.unpack("<q", struct.pack("<d", b))[0]


def _bits_beta(i: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(i)))[0]


@dataclass
class _Local:
    """What this rank found about its own arguments (before anything is exchanged)."""

    row: list
    detail: str = ""  # this rank's own words for a local error (only it knows the type name etc.)
    V: Any = None  # the (m, l, n) slice view (a torch tensor, readable by BLAS), when status is OK
    kind: int = -1  # 0 m, 1 l, 2 n
    plan: Any = None
    variant: Any = _penalty.DEFAULT


def _slice_view(t, ndim, axis, transpose):
    """(m, l, n) view of a 2-D (one slice) or 3-D tensor; transpose swaps each slice's l and n."""
    V = t.unsqueeze(0) if ndim == 2 else t.movedim(axis, 0)
    return V.transpose(1, 2) if transpose else V


def _from_slice_view(G, ndim, axis, transpose):
    if transpose:
        G = G.transpose(1, 2)
    return G[0] if ndim == 2 else G.movedim(0, axis)


def _kind_of(ndim, axis, shard_dim, transpose) -> int:
    if ndim == 2:
        k = 1 + shard_dim
    else:
        others = [d for d in range(3) if d != axis]
        k = 0 if shard_dim == axis else 1 + others.index(shard_dim)
    if transpose and k:
        k = 3 - k
    return k


def _readable(V) -> bool:
    """Can BLAS read this (m, l, n) torch view in place (so the core neither stages nor warns)?"""
    if V.numel() == 0:
        return True
    es = V.stride()
    return _driver.layout_of(_StrideProbe(V.shape, es, V.element_size())) is not None


class _StrideProbe:
    """The shape/dtype/strides `_driver.layout_of` reads, for a torch view (no NumPy array needed)."""

    def __init__(self, shape, elem_strides, itemsize):
        self.shape = tuple(shape)
        self.strides = tuple(s * itemsize for s in elem_strides)
        self.dtype = np.dtype(f"V{itemsize}")


def _stream_ctx(device):
    return _on_torch_stream(device) if device.type == "cuda" else nullcontext()


def _default_workspace(device, l, n):
    if device.type != "cpu":
        return None  # the core's GPU default: a quarter of free memory up to 1 GiB, already few chunks
    # a budget passed to the core is a hard limit: keep room for one slice of any size
    return max(CPU_DEFAULT_WORKSPACE, 16 * n * n + 16 * l * n)


def _inspect(local, beta, axis, shard_dim, reduction, want_grad, transpose, workspace_bytes, variant) -> _Local:
    """This rank's metadata row, never raising: an error is a status the whole group will see."""
    row = [0] * _NFIELDS
    row[_F_SHARD], row[_F_AXIS] = _int_field(shard_dim), _int_field(axis)
    row[_F_RED] = REDUCTIONS.index(reduction) if isinstance(reduction, str) and reduction in REDUCTIONS else -1
    row[_F_WANT], row[_F_TRANSPOSE] = int(bool(want_grad)), int(bool(transpose))
    row[_F_WS] = -1 if workspace_bytes is None else _int_field(workspace_bytes)
    row[_F_COLSPLIT] = COLUMN_SPLITS.index(COLUMN_SPLIT) if COLUMN_SPLIT in COLUMN_SPLITS else -1
    row[_F_DTYPE] = row[_F_DEVICE] = row[_F_NDIM] = -1
    out = _Local(row)

    def fail(status, detail=""):
        row[_F_STATUS] = status
        out.detail = detail
        return out

    if not isinstance(local, torch.Tensor):
        return fail(_E_TYPE, f"got {type(local).__module__}.{type(local).__name__}")
    from torch.distributed.tensor import DTensor

    if isinstance(local, DTensor):
        return fail(_E_DTENSOR)
    row[_F_NDIM] = local.dim()
    for i, s in enumerate(local.shape[:3]):
        row[_F_S0 + i] = int(s)
    row[_F_DTYPE] = _DTYPES.index(local.dtype) if local.dtype in _DTYPES else -1
    row[_F_DEVICE] = _DEVICE_TYPES.index(local.device.type) if local.device.type in _DEVICE_TYPES else -1
    if local.layout != torch.strided:
        return fail(_E_LAYOUT, f"layout {local.layout}")
    if row[_F_DTYPE] < 0:
        return fail(_E_DTYPE, f"dtype {local.dtype}")
    if row[_F_DEVICE] < 0:
        return fail(_E_DEVICE, f"device {local.device}")
    nd = local.dim()
    if nd not in (2, 3):
        return fail(_E_NDIM)
    if row[_F_SHARD] == _NOT_INT or not -nd <= row[_F_SHARD] < nd:
        return fail(_E_SHARD)
    row[_F_SHARD] %= nd
    if nd == 3:
        if row[_F_AXIS] == _NOT_INT or not -3 <= row[_F_AXIS] < 3:
            return fail(_E_AXIS)
        row[_F_AXIS] %= 3
    else:
        row[_F_AXIS] = 0  # one slice: axis indexes nothing (as in the core)
    if row[_F_RED] < 0:
        return fail(_E_RED)
    try:
        b = _checks.check_beta(beta)
    except ValueError:
        return fail(_E_BETA)
    row[_F_BETA] = _beta_bits(b)
    try:
        ws = _checks.check_workspace_bytes(workspace_bytes)
    except ValueError:
        return fail(_E_WS)
    try:
        v = _penalty.check(*variant)
    except ValueError as e:
        return fail(_E_VARIANT, str(e))
    row[_F_VARIANT] = _penalty.PENALTIES.index(v.penalty) * 4 + 2 * v.diagonal + v.normalize
    out.variant = v
    out.kind = _kind_of(nd, row[_F_AXIS], row[_F_SHARD], bool(transpose))
    V = _slice_view(local.detach(), nd, row[_F_AXIS], bool(transpose))
    if out.kind == 1:
        # each rank sums partial Grams chunk by chunk: every rank must cut the same chunks, so the
        # chunk size this rank's plan would pick travels with the metadata (the group takes the least)
        try:
            V = _compute_view(V)
            if ws is None:
                ws = _default_workspace(local.device, V.shape[1], V.shape[2])
            with _stream_ctx(local.device):
                a = _to_array(V)
                out.plan = _cache.cached(a, 0, _checks.REDUCTIONS[row[_F_RED]], "highest",
                                        "numpy" if local.device.type == "cpu" else "cupy", ws, *v)
                row[_F_CHUNK] = int(_plan.chunk_for(out.plan, bool(want_grad)))
        except Exception as e:  # noqa: BLE001 - reported to every rank through the metadata, not raised here
            return fail(_E_PLAN, f"{type(e).__name__}: {e}")
    out.V = V
    return out


def _compute_view(V):
    """The slice view the core reads: float32 for bfloat16 (NumPy/CuPy have no bfloat16), and a
    C-contiguous copy for a layout BLAS cannot read in place, so the core never stages chunks (its
    chunk size then follows from chunk_for alone, which the ranks agree on)."""
    if V.dtype == torch.bfloat16:
        return V.float().contiguous()
    return V if _readable(V) else V.contiguous()


def _group_of(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("gpu_orthol1.distributed: torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    g = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(g)
    if rank < 0:
        raise ValueError("gpu_orthol1.distributed: this process is not a member of the group passed")
    return g, rank, dist.get_world_size(g)


def _meta_device(group, local):
    """Where the metadata tensor lives: CPU when the group's backend takes CPU tensors (gloo, mpi,
    a cpu:gloo,cuda:nccl pair), else this rank's CUDA device (NCCL takes CUDA tensors only)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or ("cuda" not in backend and "nccl" not in backend):
        return torch.device("cpu")
    if isinstance(local, torch.Tensor) and local.device.type == "cuda":
        return local.device
    return torch.device("cuda", torch.cuda.current_device())


def _exchange(mine: _Local, group, world, device) -> list[list[int]]:
    t = torch.tensor(mine.row, dtype=torch.int64, device=device)
    rows = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(rows, t, group=group)
    return [r.tolist() for r in rows]


_STATUS_TEXT = {
    _E_TYPE: "its local shard is not a torch.Tensor",
    _E_DTENSOR: "its local shard is a DTensor; pass w.to_local() with shard_dim, or call "
                "gpu_orthol1.torch.ortho_l1(w) on the DTensor",
    _E_LAYOUT: "its local shard is not a dense (strided) tensor",
    _E_DTYPE: "its local shard's dtype is not float16, bfloat16, float32 or float64",
    _E_DEVICE: "its local shard is on a device other than cpu or cuda",
    _E_WS: "workspace_bytes must be a positive integer",
    _E_BETA: "beta must be a finite real number >= 0",
    _E_RED: f"reduction must be one of {REDUCTIONS}",
    _E_PLAN: "it could not plan its part of the call (its own error says why)",
    _E_VARIANT: "penalty must be 'l1' or 'l2', diagonal and normalize True or False",
}


def _validate(rows, rank, mine: _Local):
    """The same checks on the same table on every rank: either all ranks raise the same ValueError or
    none does. Returns the sizes along shard_dim, per rank."""
    pre = "gpu_orthol1.distributed: "
    for r, row in enumerate(rows):
        st = row[_F_STATUS]
        if st == _OK:
            continue
        if st == _E_NDIM:
            msg = f"its local shard has {row[_F_NDIM]} dims; expected 2 (one slice) or 3"
        elif st == _E_SHARD:
            sd = row[_F_SHARD]
            msg = (f"shard_dim {'(not an integer)' if sd == _NOT_INT else sd} is out of range for a "
                   f"{row[_F_NDIM]}-D tensor")
        elif st == _E_AXIS:
            ax = row[_F_AXIS]
            msg = f"axis {'(not an integer)' if ax == _NOT_INT else ax} is out of range for a 3-D tensor"
        else:
            msg = _STATUS_TEXT.get(st, f"unknown status {st}")
        if r == rank and mine.detail:
            msg += f" ({mine.detail})"
        raise ValueError(f"{pre}rank {r}: {msg}")

    def differ(field, what, show=str):
        vals = [row[field] for row in rows]
        if any(v != vals[0] for v in vals):
            listing = ", ".join(f"rank {r} {show(v)}" for r, v in enumerate(vals))
            raise ValueError(f"{pre}the ranks disagree on {what}: {listing}")

    differ(_F_NDIM, "the number of dims of the shards")
    differ(_F_DTYPE, "the shards' dtype", lambda v: str(_DTYPES[v]))
    differ(_F_DEVICE, "the shards' device type", lambda v: _DEVICE_TYPES[v])
    differ(_F_SHARD, "shard_dim")
    differ(_F_AXIS, "axis")
    differ(_F_RED, "reduction", lambda v: repr(REDUCTIONS[v]))
    differ(_F_BETA, "beta", lambda v: repr(_bits_beta(v)))
    differ(_F_WANT, "whether the gradient is wanted (loss vs loss_and_grad)")
    differ(_F_TRANSPOSE, "mode (which Gram of each slice is penalized)")
    differ(_F_WS, "workspace_bytes", lambda v: "None" if v < 0 else str(v))
    differ(_F_VARIANT, "the penalty (penalty, diagonal, normalize)", lambda v: repr(
        (_penalty.PENALTIES[v // 4], bool(v & 2), bool(v & 1))))
    differ(_F_COLSPLIT, "gpu_orthol1.distributed.COLUMN_SPLIT", lambda v: repr(COLUMN_SPLITS[v]) if v >= 0 else "?")
    nd, sd = rows[0][_F_NDIM], rows[0][_F_SHARD]
    shapes = [tuple(row[_F_S0:_F_S0 + nd]) for row in rows]
    others = [tuple(s for d, s in enumerate(sh) if d != sd) for sh in shapes]
    if any(o != others[0] for o in others):
        listing = ", ".join(f"rank {r} {sh}" for r, sh in enumerate(shapes))
        raise ValueError(f"{pre}the shards do not form one tensor split along dim {sd}: every dim but "
                         f"shard_dim must be the same on all ranks, got shapes {listing}")
    return [sh[sd] for sh in shapes]


# ---------------------------------------------------------------------------------------------
# the Gram all-reduce: the upper triangle of each symmetric n x n Gram, packed into a x n numbers


def _split(n):
    a = n // 2 + 1
    return a, n - a


def pack_grams(G):
    """(cc, n, n) symmetric Grams -> (cc, a, n) with a = n // 2 + 1: rows 0..a-1 of G (the upper-left
    block A and the off-diagonal block B) with the lower triangle of the lower-right block C (c = n - a)
    written over A's strictly lower triangle (shifted down one row). n(n+2)/2 numbers at most, about
    half of the Gram; built from slices and one masked select (no index gathers)."""
    n = G.shape[-1]
    a, c = _split(n)
    P = G[:, :a, :].clone()
    if c:
        sub = P[:, 1:c + 1, :c]
        mask = torch.ones(c, c, dtype=torch.bool, device=G.device).tril_()
        sub.copy_(torch.where(mask, G[:, a:, a:], sub))
    return P


def unpack_grams(P, G):
    """The inverse of `pack_grams` into G (cc, n, n): exactly symmetric, NaN stays where it was. Each
    block is one masked select of the packed entries and their mirror images, written in place."""
    n = G.shape[-1]
    a, c = _split(n)
    A = P[:, :, :a]
    upper = torch.ones(a, a, dtype=torch.bool, device=G.device).triu_()
    torch.where(upper, A, A.mT, out=G[:, :a, :a])
    if c:
        B = P[:, :, a:]
        G[:, :a, a:] = B
        G[:, a:, :a] = B.mT
        Cr = P[:, 1:c + 1, :c]
        lower = torch.ones(c, c, dtype=torch.bool, device=G.device).tril_()
        torch.where(lower, Cr, Cr.mT, out=G[:, a:, a:])


def _gram_hook(group, device):
    def hook(ws):
        t = _from_array(ws, device)  # the workspace's memory: the summed Grams land in place
        cc = t.shape[0]
        n = math.isqrt(t.shape[1])
        if n <= 2:  # packing saves nothing
            dist.all_reduce(t, group=group)
            return
        G = t.view(cc, n, n)
        P = pack_grams(G)
        dist.all_reduce(P, group=group)
        unpack_grams(P, G)

    return hook


# ---------------------------------------------------------------------------------------------
# the three splits


def _core(V, beta, reduction, want_grad, device, *, hook=None, chunk=None, plan=None, ws=None,
          variant=_penalty.DEFAULT):
    """The core on an (m, l, n) slice view V (readable, float16/32/64): (loss tensor, grad view or None)."""
    G = torch.empty_like(V) if want_grad else None
    if G is not None and not _readable(G):
        G = torch.empty(V.shape, dtype=V.dtype, device=V.device)
    with _stream_ctx(device):
        a = _to_array(V)
        p = plan if plan is not None else _cache.cached(
            a, 0, reduction, "highest", "numpy" if device.type == "cpu" else "cupy", ws, *variant)
        loss, _ = _plan.execute(p, a, _to_array(G) if G is not None else None, False, beta, want_grad,
                                gram_hook=hook, chunk=chunk)
        return _from_array(loss, device), G


def _gather_along(x, dim, sizes, group, rank):
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
        buf[:x.numel()] = x.reshape(-1)
    out = x.new_empty((len(sizes), big * per))
    dist.all_gather(list(out.unbind(0)), buf, group=group)
    if all(s == big for s in sizes):
        full = out.view((len(sizes) * big,) + rest)
    else:
        full = torch.cat([p[:s * per].view((s,) + rest) for p, s in zip(out.unbind(0), sizes, strict=True)], 0)
    return full.movedim(0, dim)


def _split_sizes(total, world):
    """torch.tensor_split's sizes: the first total % world ranks get one more."""
    return [total // world + (1 if r < total % world else 0) for r in range(world)]


def _all_to_all(blocks, out_sizes, out_dtype, group):
    """Send blocks[q] (tensors) to rank q and receive out_sizes[p] numbers from each rank p: one
    all_to_all_single over one packed send buffer (uneven sizes allowed). Returns the pieces by rank."""
    ref = blocks[0]
    send = ref.new_empty(sum(b.numel() for b in blocks), dtype=out_dtype)
    o = 0
    for b in blocks:
        send[o:o + b.numel()].view(b.shape).copy_(b)
        o += b.numel()
    recv = ref.new_empty(sum(out_sizes), dtype=out_dtype)
    dist.all_to_all_single(recv, send, list(out_sizes), [b.numel() for b in blocks], group=group)
    return recv.split(list(out_sizes))


def _columns_via_rows(V, b, red, want_grad, device, sizes, g, rank, world, workspace_bytes, variant):
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
    pieces = _all_to_all([V[:, r0[q]:r0[q] + rows[q], :] for q in range(world)],
                         [m * L * s for s in sizes], V.dtype, g)
    Vrow = _compute_view(torch.cat([p.view(m, L, s) for p, s in zip(pieces, sizes, strict=True)], dim=2))
    # the ranks' slabs may differ by a row: agree on the chunk (the least; 0 = a rank could not plan)
    ws = workspace_bytes if workspace_bytes is not None else _default_workspace(device, L, Vrow.shape[2])
    plan, chunk, err = None, 0, None
    try:
        with _stream_ctx(device):
            plan = _cache.cached(_to_array(Vrow), 0, red, "highest", "numpy" if device.type == "cpu" else "cupy",
                                ws, *variant)
            chunk = int(_plan.chunk_for(plan, bool(want_grad)))
    except Exception as e:  # noqa: BLE001 - told to every rank by the MIN below
        err = e
    agreed = torch.tensor([chunk], dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=g)
    if int(agreed.item()) < 1:
        mine = f" ({type(err).__name__}: {err})" if chunk < 1 else ""
        raise ValueError(f"gpu_orthol1.distributed: a rank could not plan its row slab of the column split{mine}")
    lt, Grow = _core(Vrow, b, red, want_grad, device, hook=_gram_hook(g, device), chunk=int(agreed.item()),
                     plan=plan)
    if not want_grad:
        return lt, None
    back = _all_to_all([Grow[:, :, c0[q]:c0[q] + sizes[q]] for q in range(world)],
                       [m * rows[p] * n_me for p in range(world)], Grow.dtype, g)
    return lt, torch.cat([p.view(m, rows[q], n_me) for q, p in enumerate(back)], dim=1)


def _run(local, beta, axis, shard_dim, reduction, group, want_grad, transpose=False, workspace_bytes=None,
         variant=_penalty.DEFAULT):
    """loss_and_grad / loss and the DTensor forms: (loss, grad_local or None, (first, count) of the
    global slices this rank holds when the shards split the slice axis, else None)."""
    g, rank, world = _group_of(group)
    mine = _inspect(local, beta, axis, shard_dim, reduction, want_grad, transpose, workspace_bytes, variant)
    rows = _exchange(mine, g, world, _meta_device(g, local))
    sizes = _validate(rows, rank, mine)
    row = mine.row
    nd, ax, red = row[_F_NDIM], row[_F_AXIS], REDUCTIONS[row[_F_RED]]
    b = _bits_beta(row[_F_BETA])
    device = local.device
    ldt = torch.float64 if local.dtype == torch.float64 else torch.float32
    V = mine.V
    kind = mine.kind
    v = mine.variant
    if kind == 1:  # rows of every slice: sum partial Grams, signs and gradient rows locally
        chunk = min(r[_F_CHUNK] for r in rows)
        lt, G = _core(V, b, red, want_grad, device, hook=_gram_hook(g, device), chunk=chunk, plan=mine.plan)
        loss_t = lt
    elif kind == 0:  # whole slices: local slices, then the loss over the group
        V = _compute_view(V)
        m_glob = sum(sizes)
        bl = b / m_glob if red == "mean" and m_glob else b  # "mean" is over the GLOBAL slice count
        lt, G = _core(V, bl, "none" if red == "none" else "sum", want_grad, device, variant=v)
        if red == "none":
            loss_t = _gather_along(lt, 0, sizes, g, rank)
        else:
            tot = lt.to(torch.float64).reshape(1)
            dist.all_reduce(tot, group=g)
            loss_t = tot.reshape(())
    elif COLUMN_SPLIT == "reshard" and world > 1:  # columns: move to a row split and back
        lt, G = _columns_via_rows(V, b, red, want_grad, device, sizes, g, rank, world, workspace_bytes, v)
        loss_t = lt
    else:  # columns of every slice, gathered: the whole tensor on every rank
        full = _gather_along(V, 2, sizes, g, rank)  # dim 2 of the slice view is n
        full = _compute_view(full)
        lt, Gf = _core(full, b, red, want_grad, device, variant=v)
        loss_t = lt
        G = None
        if want_grad:
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


# ---------------------------------------------------------------------------------------------
# public: the functional form


def loss_and_grad(local: Any, beta: float = 1.0, *, axis: int = 1, shard_dim: int, reduction: str = "sum",
                  group: Any = None, workspace_bytes: int | None = None, penalty: str = "l1",
                  diagonal: bool = True, normalize: bool = False) -> tuple[Any, Any]:
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
    """
    loss_t, grad, _ = _run(local, beta, axis, shard_dim, reduction, group, True, workspace_bytes=workspace_bytes,
                           variant=(penalty, diagonal, normalize))
    return loss_t, grad


def loss(local: Any, beta: float = 1.0, *, axis: int = 1, shard_dim: int, reduction: str = "sum",
         group: Any = None, workspace_bytes: int | None = None, penalty: str = "l1", diagonal: bool = True,
         normalize: bool = False) -> Any:
    """The global loss only (no gradient GEMM); arguments and collectives as in `loss_and_grad`."""
    return _run(local, beta, axis, shard_dim, reduction, group, False, workspace_bytes=workspace_bytes,
                variant=(penalty, diagonal, normalize))[0]


# ---------------------------------------------------------------------------------------------
# DTensor


def _dtensor_split(w):
    """(tensor dim the shards split or None for replicated, the process group of that mesh dim)."""
    from torch.distributed.tensor import Replicate, Shard

    shard = []
    for mdim, p in enumerate(w.placements):
        if isinstance(p, Shard):
            shard.append((mdim, p.dim))
        elif not isinstance(p, Replicate):
            raise ValueError(f"gpu_orthol1: DTensor placement {p} is not supported (only Shard(d) and "
                             "Replicate(); redistribute the tensor first, e.g. w.redistribute(placements="
                             "[Replicate()]))")
    if not shard:
        return None, None
    if len(shard) > 1:
        raise ValueError(f"gpu_orthol1: a DTensor sharded over several mesh dims {w.placements} is not "
                         "supported; redistribute it so that one mesh dim shards it")
    mdim, d = shard[0]
    return d, w.device_mesh.get_group(mdim)


def _transpose_for(mode, ndim, shape, axis):
    if mode not in (None,) + MODES:
        raise ValueError(f"mode must be None, 'rows', 'columns' or 'auto', got {mode!r}")
    if mode in (None, "columns"):
        return False
    if mode == "rows":
        return True
    if ndim == 2:
        l, n = shape
    else:
        l, n = (s for i, s in enumerate(shape) if i != axis % 3)
    return l < n  # "auto": the smaller Gram


SECOND_ORDER_REFUSED = (
    "gpu_orthol1: a second derivative (double backward, create_graph=True) of the penalty over DTensor "
    "(sharded) parameters is not supported: the sharded path returns the first-order gradient only. "
    "Differentiate the penalty of the gathered weight (w.full_tensor()) where second derivatives are needed")


class _SecondOrderRefused(torch.autograd.Function):
    """The identity on a first-order gradient, tied to the parameter it came from: differentiating it
    again raises SECOND_ORDER_REFUSED instead of silently dropping the penalty's second-order term."""

    @staticmethod
    def forward(ctx, grad, param):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _gg):
        raise RuntimeError(SECOND_ORDER_REFUSED)


def _first_order(grad, param):
    """grad as the backward returns it: under create_graph=True, marked so a second backward raises."""
    if torch.is_grad_enabled() and param is not None and param.requires_grad:
        return _SecondOrderRefused.apply(grad, param)
    return grad


class _DTensorOrthoL1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, beta, axis, reduction, transpose, want_grad, variant):
        shard_dim, group = _dtensor_split(w)
        local = w.to_local()
        own = None
        if shard_dim is None:  # replicated: every rank holds the whole tensor, no collective
            loss_t, g = _local_run(local, beta, axis, reduction, want_grad, transpose, variant)
        else:
            loss_t, g, own = _run(local, beta, axis, shard_dim, reduction, group, want_grad, transpose,
                                  variant=variant)
        ctx.want, ctx.own = want_grad, own
        if want_grad:
            ctx.save_for_backward(g, w)
            ctx.mesh, ctx.placements = w.device_mesh, tuple(w.placements)
            ctx.gshape, ctx.gstride = w.shape, w.stride()
            ctx.ndim, ctx.axis, ctx.reduction = w.dim(), axis % 3 if w.dim() == 3 else 0, reduction
        return loss_t

    @staticmethod
    def backward(ctx, go):
        from torch.distributed.tensor import DTensor

        if not ctx.want:
            return (None,) * 7
        g, w = ctx.saved_tensors
        if ctx.reduction == "none" and ctx.ndim == 3:
            if ctx.own is not None:  # the shards split the slices: this rank's part of grad_output
                go = go.narrow(0, *ctx.own)
            shape = [1, 1, 1]
            shape[ctx.axis] = -1
            go = go.reshape(shape)
        gl = g * go.to(g.dtype)
        gd = DTensor.from_local(gl, ctx.mesh, ctx.placements, run_check=False, shape=ctx.gshape,
                                stride=ctx.gstride)
        return _first_order(gd, w), None, None, None, None, None, None


def _local_run(t, beta, axis, reduction, want_grad, transpose, variant=_penalty.DEFAULT):
    """One process, whole tensor (a Replicate DTensor's local copy): the core, no collective."""
    nd = t.dim()
    if nd not in (2, 3):
        raise ValueError(f"gpu_orthol1: the DTensor must be 2-D or 3-D, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"gpu_orthol1: the DTensor's dtype {t.dtype} is not float16, bfloat16, float32 or "
                         "float64")
    ax = int(axis) % 3 if nd == 3 else 0
    V = _compute_view(_slice_view(t.detach(), nd, ax, transpose))
    lt, G = _core(V, _checks.check_beta(beta), reduction, want_grad, t.device, variant=_penalty.check(*variant))
    lt = lt.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    if not want_grad:
        return lt, None
    grad = _from_slice_view(G, nd, ax, transpose)
    return lt, grad.to(t.dtype) if grad.dtype != t.dtype else grad


def dtensor_ortho_l1(w: Any, beta: float = 1.0, axis: int = 1, reduction: str = "sum",
                     mode: str | None = None, penalty: str = "l1", diagonal: bool = True,
                     normalize: bool = False) -> Any:
    """`gpu_orthol1.torch.ortho_l1` for a DTensor w (Shard(d) on one mesh dim, Replicate on the
    others, or replicated everywhere): a plain tensor loss (0-d, (m,) for "none"; (1,) for a 2-D w),
    the same on every rank, whose backward gives w a DTensor gradient with w's placements.

    2-D w (l, n): mode None/"columns" penalizes sum |W^T W - I|, "rows" sum |W W^T - I| (computed on
    W^T, so Shard(0) becomes a split of the columns), "auto" the smaller Gram (by the GLOBAL shape).
    3-D w: slices along axis, the mode per slice. Collective: every rank of the sharding mesh dim
    calls it. Which split moves what: see the module docstring (Shard of the penalized Gram's row dim
    sums n x n Grams; of its column dim reshards w to that and back). penalty, diagonal, normalize: the
    member of the penalty family, as in ortho_l1."""
    from torch.distributed.tensor import DTensor

    if not isinstance(w, DTensor):
        raise ValueError(f"dtensor_ortho_l1 takes a DTensor, got {type(w).__name__}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if w.dim() == 3 and (isinstance(axis, bool) or not isinstance(axis, numbers.Integral)
                         or not -3 <= axis < 3):
        raise ValueError(f"axis must be an integer in [-3, 3) for a 3-D weight, got {axis!r}")
    transpose = _transpose_for(mode, w.dim(), tuple(w.shape), axis if w.dim() == 3 else 0)
    want_grad = torch.is_grad_enabled() and w.requires_grad
    variant = _penalty.check(penalty, diagonal, normalize)
    return _DTensorOrthoL1.apply(w, _checks.check_beta(beta), int(axis), reduction, transpose, want_grad, variant)


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
            raise ValueError(f"target {j}: a {local.dim()}-D weight flattened to (out, -1) can be sharded on dim 0 "
                             f"or 1 only (its rows or a block of the flattened columns), got Shard({shard_dim})")
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
    return _Member(j, V, kind, grp, back,
                   ("split", ranks, kind, str(local.dtype), local.device.type, scale, gV[1:]), scale)


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
        raise ValueError(f"gpu_orthol1.distributed: rank(s) {failed} could not prepare their shards of the "
                         f"targets{mine}")
    if any(not torch.equal(p, parts[0]) for p in parts):
        raise ValueError("gpu_orthol1.distributed: the ranks passed different targets (number, shapes, "
                         "placements, modes or order differ); every rank must pass the same list")


def orthol1_dtensor_execute(targets: Sequence[tuple], beta: float, *,
                            want_grad: bool = True, outs: Sequence[Any] | None = None, accumulate: bool = False,
                            workspace_bytes: int | None = None, penalty: str = "l1", diagonal: bool = True,
                            normalize: bool = False) -> tuple[Any, list]:
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
    the same order (checked: one small all-gather first); replicated and plain targets run locally."""
    b = _checks.check_beta(beta)
    variant = _penalty.check(penalty, diagonal, normalize)
    if outs is not None and len(outs) != len(targets):
        raise ValueError(f"outs has {len(outs)} entries for {len(targets)} targets")
    if accumulate and outs is None:
        raise ValueError("accumulate=True needs outs= (the tensors to add the gradients into)")
    group = _first_group(targets)
    members, local_error = [], None
    for j, t in enumerate(targets):
        if not 4 <= len(t) <= 5:
            raise ValueError(f"target {j}: expected (param, how, axis, transpose[, scale]), got {len(t)} items")
        w, how, axis, tr = t[:4]
        scale = _checks.check_beta(t[4]) if len(t) == 5 else 1.0
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
            lt, gs = _run_members(part, b, want_grad, workspace_bytes, variant)
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


def _run_members(ms, b, want_grad, workspace_bytes, variant):
    """One call for members that share a key: (loss, [local gradient per member])."""
    m0 = ms[0]
    b = b * m0.scale  # one scale per batch: it is part of the batch key
    if m0.kind == -1:
        t = m0.V  # replicated / plain: the core on the whole tensor, no collective
        lt, G = _core(_compute_view(t), b, "sum", want_grad, t.device, variant=variant)
    elif m0.kind == 0:
        lt, G, _ = _run(m0.V, b, 0, 0, "sum", m0.group, want_grad, False, workspace_bytes, variant)
    else:
        V = m0.V if len(ms) == 1 else torch.cat([m.V for m in ms], 0)  # stacked slices (a copy)
        lt, G, _ = _run(V, b, 0, m0.kind, "sum", m0.group, want_grad, False, workspace_bytes, variant)
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
        out = tuple(_first_order(_wrap_grad(g * go.to(g.dtype), m), p)
                    for g, m, p in zip(ctx.grads, ctx.metas, ctx.saved_tensors, strict=True))
        return (None, None, None) + out


def orthol1_dtensor_loss(targets: Sequence[tuple], beta: float, *,
                         workspace_bytes: int | None = None, penalty: str = "l1", diagonal: bool = True,
                         normalize: bool = False) -> Any:
    """OrthoL1.loss() for (DTensor) targets (see `orthol1_dtensor_execute`): the summed loss as a float64
    0-d tensor with autograd; its backward hands each parameter the gradient formed in the forward pass
    (a DTensor with the parameter's placements for a DTensor)."""
    spec = [(t[1], t[2], bool(t[3])) + tuple(t[4:5]) for t in targets]
    params = [t[0] for t in targets]
    kw = dict(workspace_bytes=workspace_bytes, penalty=penalty, diagonal=diagonal, normalize=normalize)
    return _TargetsLoss.apply(spec, _checks.check_beta(beta), kw, *params)


@torch.no_grad()
def orthol1_dtensor_add_grad_(targets: Sequence[tuple], beta: float, *,
                              workspace_bytes: int | None = None, penalty: str = "l1", diagonal: bool = True,
                              normalize: bool = False) -> Any:
    """OrthoL1.add_grad_() for (DTensor) targets: adds the gradient into each parameter's .grad (made as
    zeros with the parameter's placements when None) through its local tensor; returns the loss."""
    outs = []
    for j, p in enumerate(t[0] for t in targets):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        meta, gmeta = _dtensor_meta(p), _dtensor_meta(p.grad)
        if (meta is None) != (gmeta is None) or (meta is not None and gmeta is not None
                                                 and (meta[1] != gmeta[1] or meta[2] != gmeta[2])):
            raise ValueError(f"target {j}: .grad has placements {gmeta and gmeta[1]}, shape "
                             f"{tuple(p.grad.shape)}; the parameter {meta and meta[1]}, {tuple(p.shape)}")
        outs.append(p.grad.to_local() if gmeta is not None else p.grad)
    loss, _ = orthol1_dtensor_execute(targets, beta, outs=outs, accumulate=True, workspace_bytes=workspace_bytes,
                                      penalty=penalty, diagonal=diagonal, normalize=normalize)
    return loss


@torch.no_grad()
def orthol1_dtensor_step_(targets: Sequence[tuple], beta: float, lr: float, *,
                          workspace_bytes: int | None = None, penalty: str = "l1", diagonal: bool = True,
                          normalize: bool = False) -> Any:
    """OrthoL1.step_(lr) for (DTensor) targets: W <- W - lr * dL/dW on each rank's shard, every gradient
    from the weights before the update; returns the loss before the step."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(float(lr)):
        raise ValueError(f"lr must be a finite real number, got {lr!r}")
    loss, grads = orthol1_dtensor_execute(targets, beta, workspace_bytes=workspace_bytes, penalty=penalty,
                                          diagonal=diagonal, normalize=normalize)
    for p, g in zip((t[0] for t in targets), grads, strict=True):
        (p.to_local() if _dtensor_meta(p) is not None else p).sub_(g, alpha=float(lr))
    return loss
