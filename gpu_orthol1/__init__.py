"""gpu_orthol1: the L1 orthogonality regularizer and its gradient, batched over many matrices.

    loss = beta * sum_i sum_jk |Phi_i^T Phi_i - I_n|_jk,   dL/dPhi_i = 2 beta Phi_i sign(Phi_i^T Phi_i - I_n)

CuPy and Numba are imported on first use, so importing this package is cheap
on a CPU-only machine.
"""

from ._api import grad, loss, loss_and_grad, plan
from ._backends import BackendUnavailableError, GpuFallbackWarning, available_backends
from ._driver import CopyWarning
from ._metrics import metrics
from ._plan import Plan

__version__ = "0.1.0"

__all__ = [
    "loss",
    "grad",
    "loss_and_grad",
    "metrics",
    "plan",
    "Plan",
    "available_backends",
    "BackendUnavailableError",
    "GpuFallbackWarning",
    "CopyWarning",
    "__version__",
]
