"""The tests' name for gpu_orthol1.reference, the one float64 reference (see there)."""

from gpu_orthol1.reference import (  # noqa: F401
    GRAD_RTOL,
    LOSS_RTOL,
    SIGN_RTOL,
    TOL,
    check,
    random_phi,
    reduce,
    reference,
    slice_rows,
    to_lmn,
)
