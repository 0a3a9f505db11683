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

Layout: `_meta` (the metadata exchange and its checks), `_gram` (the packed Gram all-reduce),
`_splits` (the three splits; `loss_and_grad`, `loss`), `_dtensor` (DTensor dispatch), `_targets`
(many DTensor parameters: OrthoL1's loss, add_grad_ and step_). The settings COLUMN_SPLIT, STACK_BYTES and CPU_DEFAULT_WORKSPACE are read and set here, on
the package, as before: each lives in the module that uses it.
"""

from __future__ import annotations

import sys
import types
from typing import Any

try:
    import torch  # noqa: F401 - the check that the optional extra is there
    import torch.distributed  # noqa: F401
except ImportError as _e:  # torch is an optional extra
    raise ImportError(
        "gpu_orthol1.distributed needs PyTorch, which is not installed: install it first "
        f"(pip install 'torch==2.*' for your platform, see https://pytorch.org/get-started/) ({_e})"
    ) from _e

from . import _meta, _targets
from ._dtensor import SECOND_ORDER_REFUSED as SECOND_ORDER_REFUSED  # the message a double backward raises
from ._dtensor import dtensor_ortho_l1
from ._gram import pack_grams, unpack_grams

# constants that were module attributes before the split (the accepted values of COLUMN_SPLIT, mode, reduction)
from ._meta import COLUMN_SPLITS as COLUMN_SPLITS
from ._meta import MODES as MODES
from ._meta import REDUCTIONS as REDUCTIONS
from ._splits import loss, loss_and_grad
from ._targets import (
    orthol1_dtensor_add_grad_,
    orthol1_dtensor_execute,
    orthol1_dtensor_loss,
    orthol1_dtensor_step_,
)

__all__ = [
    "loss_and_grad",
    "loss",
    "dtensor_ortho_l1",
    "orthol1_dtensor_execute",
    "orthol1_dtensor_loss",
    "orthol1_dtensor_add_grad_",
    "orthol1_dtensor_step_",
    "pack_grams",
    "unpack_grams",
]

# settings a user (or a benchmark) assigns on the package, kept in the module that reads them at call time
_SETTINGS: dict[str, types.ModuleType] = {
    "COLUMN_SPLIT": _meta,
    "CPU_DEFAULT_WORKSPACE": _meta,
    "STACK_BYTES": _targets,
}


def __getattr__(name: str) -> Any:
    if name in _SETTINGS:
        return getattr(_SETTINGS[name], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_SETTINGS))


class _Package(types.ModuleType):
    """`gpu_orthol1.distributed.COLUMN_SPLIT = "gather"` sets the value the splits read."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SETTINGS:
            setattr(_SETTINGS[name], name, value)
        else:
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
