"""PyTorch integration: an autograd loss, a model-wide regularizer with gradient injection and an update rule.

    from gpu_orthol1.torch import ortho_l1, OrthoL1

    loss = task_loss + ortho_l1(layer.weight, beta=1e-3, mode="rows")     # one tensor
    reg = OrthoL1(model, beta=1e-3)                                       # every matrix of a model
    (task_loss + reg.loss()).backward()        # or: task_loss.backward(); reg.add_grad_()
    reg.step_(lr)                              # or decoupled: W <- W - lr * d(reg.loss())/dW

Everything runs on the tensors' own memory: CPU tensors through zero-copy `.numpy()` views and the
core's NumPy backend, CUDA tensors through the core's cuBLAS + Numba CUDA device on torch's current
stream (no extra sync; workspaces come from torch's caching allocator or CuPy's stream-ordered pool).

Precision: float16, float32 and float64 are computed in place (Gram and loss in float32 for float16).
bfloat16 has no NumPy/CuPy dtype: such a parameter is computed from a float32 copy (Gram, loss and
gradient in float32, the gradient rounded to bfloat16 when written back), one tensor at a time.

Layout: `_bridge` (checks, tensor <-> array, streams, slice views; shared with gpu_orthol1.distributed),
`_ops` (the custom ops and autograd Functions), `functional` (ortho_l1 and the presets' one-tensor
forms), `regularizer` (OrthoL1; its grouping and execution in `_groups`, its training-loop methods in
`_loop` over the schedules, metrics and DDP split of `_training`).
"""

from __future__ import annotations

import re

try:
    import torch
except ImportError as _e:  # torch is an optional extra
    raise ImportError(
        "gpu_orthol1.torch needs PyTorch, which is not installed: install it first "
        "(pip install 'torch==2.*' for your platform, see https://pytorch.org/get-started/), "
        f"then import gpu_orthol1.torch again ({_e})"
    ) from _e

# torch.library.custom_op, the op behind ortho_l1 and OrthoL1.loss (eager, torch.compile, CUDA graphs),
# came in torch 2.4; an older torch would fail at the first decorator (in _ops) with an AttributeError
TORCH_MIN = (2, 4)


def _check_torch_version(version: str) -> None:
    """ImportError naming `version` (a torch.__version__) when it is older than TORCH_MIN."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is not None and (int(m[1]), int(m[2])) < TORCH_MIN:
        raise ImportError(
            f"gpu_orthol1.torch needs torch >= {TORCH_MIN[0]}.{TORCH_MIN[1]} (for torch.library."
            f"custom_op), found torch {version}; upgrade it: pip install 'torch>=2.4'"
        )


_check_torch_version(str(torch.__version__))

# after the torch checks above: these modules register the custom ops
from .functional import biggan_ortho, keras_orthogonal, ortho_l1  # noqa: E402
from .regularizer import OrthoL1  # noqa: E402

__all__ = ["OrthoL1", "ortho_l1", "keras_orthogonal", "biggan_ortho"]
