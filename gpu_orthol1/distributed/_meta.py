"""The metadata every rank shares before any data moves, and the checks on it.

Every rank all-gathers a small int64 row (dims, dtype, device type, shard_dim, axis, reduction, beta,
chunking, the penalty, COLUMN_SPLIT, the precision) and validates the gathered table the same way, so a shard that
does not fit the others, or arguments that differ between ranks, raise the same ValueError on every
rank instead of leaving the collectives mismatched (a hang). Also here: the (m, l, n) slice views and
which of their dims the shards split.
"""

from __future__ import annotations

import numbers
import struct
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import _driver, _penalty
from ..torch import _core
from ..torch._bridge import PRECISIONS, _on_torch_stream, _resolve_precision, _to_array

REDUCTIONS = _core.REDUCTIONS
MODES = ("rows", "columns", "auto")
_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bfloat16)
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
(
    _F_STATUS,
    _F_NDIM,
    _F_S0,
    _F_S1,
    _F_S2,
    _F_DTYPE,
    _F_DEVICE,
    _F_SHARD,
    _F_AXIS,
    _F_RED,
    _F_WANT,
    _F_BETA,
    _F_CHUNK,
    _F_TRANSPOSE,
    _F_WS,
    _F_COLSPLIT,
    _F_VARIANT,
    _F_PREC,
    _NFIELDS,
) = range(19)

# local statuses, in the order they are checked
(
    _OK,
    _E_TYPE,
    _E_DTENSOR,
    _E_LAYOUT,
    _E_DTYPE,
    _E_DEVICE,
    _E_NDIM,
    _E_SHARD,
    _E_AXIS,
    _E_RED,
    _E_BETA,
    _E_WS,
    _E_PLAN,
    _E_VARIANT,
    _E_PREC,
) = range(15)

_KINDS = ("m", "l", "n")  # which dim of the (m, l, n) slice view the shards split


def _int_field(x: Any) -> int:
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
    precision: str = "highest"  # resolved (None: this rank's torch setting)


def _slice_view(t: torch.Tensor, ndim: int, axis: int, transpose: bool) -> torch.Tensor:
    """(m, l, n) view of a 2-D (one slice) or 3-D tensor; transpose swaps each slice's l and n."""
    V = t.unsqueeze(0) if ndim == 2 else t.movedim(axis, 0)
    return V.transpose(1, 2) if transpose else V


def _from_slice_view(G: torch.Tensor, ndim: int, axis: int, transpose: bool) -> torch.Tensor:
    if transpose:
        G = G.transpose(1, 2)
    return G[0] if ndim == 2 else G.movedim(0, axis)


def _kind_of(ndim: int, axis: int, shard_dim: int, transpose: bool) -> int:
    if ndim == 2:
        k = 1 + shard_dim
    else:
        others = [d for d in range(3) if d != axis]
        k = 0 if shard_dim == axis else 1 + others.index(shard_dim)
    if transpose and k:
        k = 3 - k
    return k


def _readable(V: torch.Tensor) -> bool:
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


def _stream_ctx(device: torch.device) -> AbstractContextManager:
    return _on_torch_stream(device) if device.type == "cuda" else nullcontext()


def _default_workspace(device: torch.device, l: int, n: int) -> int | None:
    if device.type != "cpu":
        return None  # the core's GPU default: a quarter of free memory up to 1 GiB, already few chunks
    # a budget passed to the core is a hard limit: keep room for one slice of any size
    return max(CPU_DEFAULT_WORKSPACE, 16 * n * n + 16 * l * n)


def _inspect(
    local: Any,
    beta: Any,
    axis: Any,
    shard_dim: Any,
    reduction: Any,
    want_grad: bool,
    transpose: bool,
    workspace_bytes: Any,
    variant: Any,
    precision: Any = None,
) -> _Local:
    """This rank's metadata row, never raising: an error is a status the whole group will see."""
    row = [0] * _NFIELDS
    row[_F_SHARD], row[_F_AXIS] = _int_field(shard_dim), _int_field(axis)
    row[_F_RED] = (
        REDUCTIONS.index(reduction) if isinstance(reduction, str) and reduction in REDUCTIONS else -1
    )
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
        b = _core.check_beta(beta)
    except ValueError:
        return fail(_E_BETA)
    row[_F_BETA] = _beta_bits(b)
    try:
        ws = _core.check_workspace_bytes(workspace_bytes)
    except ValueError:
        return fail(_E_WS)
    try:
        v = _penalty.check(*variant)
    except ValueError as e:
        return fail(_E_VARIANT, str(e))
    row[_F_VARIANT] = _penalty.PENALTIES.index(v.penalty) * 4 + 2 * v.diagonal + v.normalize
    out.variant = v
    if precision is not None and (not isinstance(precision, str) or precision not in PRECISIONS):
        return fail(_E_PREC, f"got {precision!r}")
    out.precision = _resolve_precision(precision)
    row[_F_PREC] = PRECISIONS.index(out.precision)
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
                out.plan = _core.cached(
                    a,
                    0,
                    REDUCTIONS[row[_F_RED]],
                    out.precision,
                    "numpy" if local.device.type == "cpu" else "cupy",
                    ws,
                    *v,
                )
                row[_F_CHUNK] = int(_core.chunk_for(out.plan, bool(want_grad)))
        except Exception as e:  # noqa: BLE001 - reported to every rank through the metadata, not raised here
            return fail(_E_PLAN, f"{type(e).__name__}: {e}")
    out.V = V
    return out


def _compute_view(V: torch.Tensor) -> torch.Tensor:
    """The slice view the core reads: float32 for bfloat16 (NumPy/CuPy have no bfloat16), and a
    C-contiguous copy for a layout BLAS cannot read in place, so the core never stages chunks (its
    chunk size then follows from chunk_for alone, which the ranks agree on)."""
    if V.dtype == torch.bfloat16:
        return V.float().contiguous()
    return V if _readable(V) else V.contiguous()


def _group_of(group: Any) -> tuple[Any, int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "gpu_orthol1.distributed: torch.distributed is not initialized "
            "(call torch.distributed.init_process_group first)"
        )
    g = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(g)
    if rank < 0:
        raise ValueError("gpu_orthol1.distributed: this process is not a member of the group passed")
    return g, rank, dist.get_world_size(g)


def _meta_device(group: Any, local: Any) -> torch.device:
    """Where the metadata tensor lives: CPU when the group's backend takes CPU tensors (gloo, mpi,
    a cpu:gloo,cuda:nccl pair), else this rank's CUDA device (NCCL takes CUDA tensors only)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or ("cuda" not in backend and "nccl" not in backend):
        return torch.device("cpu")
    if isinstance(local, torch.Tensor) and local.device.type == "cuda":
        return local.device
    return torch.device("cuda", torch.cuda.current_device())


def _exchange(mine: _Local, group: Any, world: int, device: torch.device) -> list[list[int]]:
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
    _E_PREC: "precision must be None, 'highest' or 'tf32'",
}


def _validate(rows: list[list[int]], rank: int, mine: _Local) -> list[int]:
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
            msg = (
                f"shard_dim {'(not an integer)' if sd == _NOT_INT else sd} is out of range for a "
                f"{row[_F_NDIM]}-D tensor"
            )
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
    differ(
        _F_VARIANT,
        "the penalty (penalty, diagonal, normalize)",
        lambda v: repr((_penalty.PENALTIES[v // 4], bool(v & 2), bool(v & 1))),
    )
    differ(_F_PREC, "precision (None follows each rank's torch setting)", lambda v: repr(PRECISIONS[v]))
    differ(
        _F_COLSPLIT,
        "gpu_orthol1.distributed.COLUMN_SPLIT",
        lambda v: repr(COLUMN_SPLITS[v]) if v >= 0 else "?",
    )
    nd, sd = rows[0][_F_NDIM], rows[0][_F_SHARD]
    shapes = [tuple(row[_F_S0 : _F_S0 + nd]) for row in rows]
    others = [tuple(s for d, s in enumerate(sh) if d != sd) for sh in shapes]
    if any(o != others[0] for o in others):
        listing = ", ".join(f"rank {r} {sh}" for r, sh in enumerate(shapes))
        raise ValueError(
            f"{pre}the shards do not form one tensor split along dim {sd}: every dim but "
            f"shard_dim must be the same on all ranks, got shapes {listing}"
        )
    return [sh[sd] for sh in shapes]
