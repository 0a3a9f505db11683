"""Which member of the orthogonality-penalty family a plan computes (docs/penalties.md).

    penalty="l1" : beta * sum |E|          F = sign(E)
    penalty="l2" : beta * sum E**2         F = 2 E
    E = mask * (G - I), or mask * (Ghat - I) with normalize=True (Ghat = D^-1/2 G D^-1/2, D = diag(G));
    mask = 1 - I with diagonal=False (the diagonal is free), all ones otherwise.

Every variant keeps the two-GEMM structure: the elementwise pass writes the matrix M that the
gradient GEMM multiplies (M = F, or D^-1/2 (F - diag(Ghat F)) D^-1/2 when normalizing), and the
gradient is alpha * Phi M with alpha = 2 beta for all of them. A plan checks the keywords once
(`check`) and hands the resulting `Variant` to the elementwise pass of its device.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

PENALTIES = ("l1", "l2")


class Variant(NamedTuple):
    penalty: str = "l1"
    diagonal: bool = True
    normalize: bool = False

    @property
    def is_default(self) -> bool:
        return self == DEFAULT

    @property
    def l2(self) -> bool:
        return self.penalty == "l2"

    @property
    def offdiag(self) -> bool:
        return not self.diagonal

    def flags(self) -> tuple[bool, bool, bool]:
        """(l2, offdiag, normalize): the kernels' compile-time switches."""
        return self.penalty == "l2", not self.diagonal, self.normalize


DEFAULT = Variant()


def _check_bool(name: str, value: Any) -> bool:
    # like accumulate=: bools only (0/1 would also hash like False/True in the plan cache's key)
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check(penalty: Any = "l1", diagonal: Any = True, normalize: Any = False) -> Variant:
    """The Variant for these keywords, or ValueError naming the one that is wrong."""
    if type(penalty) is str and penalty == "l1" and diagonal is True and normalize is False:
        return DEFAULT  # the common call, without the checks below
    if not isinstance(penalty, str) or penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    return Variant(str(penalty), _check_bool("diagonal", diagonal), _check_bool("normalize", normalize))
