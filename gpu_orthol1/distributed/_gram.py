"""The Gram all-reduce of a row split: the upper triangle of each symmetric n x n Gram, packed into
a x n numbers (a = n // 2 + 1), summed over the group in the core's workspace, in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..torch._bridge import _from_array


def _split(n: int) -> tuple[int, int]:
    a = n // 2 + 1
    return a, n - a


def pack_grams(G: torch.Tensor) -> torch.Tensor:
    """(cc, n, n) symmetric Grams -> (cc, a, n) with a = n // 2 + 1: rows 0..a-1 of G (the upper-left
    block A and the off-diagonal block B) with the lower triangle of the lower-right block C (c = n - a)
    written over A's strictly lower triangle (shifted down one row). n(n+2)/2 numbers at most, about
    half of the Gram; built from slices and one masked select (no index gathers).

    Args:
        G: (cc, n, n) symmetric Grams (torch tensor).

    Returns:
        The packed (cc, n // 2 + 1, n) tensor (a new tensor).

    Example:
        >>> G = torch.randn(2, 5, 5); G = G + G.mT
        >>> P = pack_grams(G)  # (2, 3, 5)
    """
    n = G.shape[-1]
    a, c = _split(n)
    P = G[:, :a, :].clone()
    if c:
        sub = P[:, 1 : c + 1, :c]
        mask = torch.ones(c, c, dtype=torch.bool, device=G.device).tril_()
        sub.copy_(torch.where(mask, G[:, a:, a:], sub))
    return P


def unpack_grams(P: torch.Tensor, G: torch.Tensor) -> None:
    """The inverse of `pack_grams` into G (cc, n, n): exactly symmetric, NaN stays where it was. Each
    block is one masked select of the packed entries and their mirror images, written in place.

    Args:
        P: the packed (cc, n // 2 + 1, n) tensor from `pack_grams` (or their sum over ranks).
        G: the (cc, n, n) tensor to write the symmetric Grams into.

    Returns:
        None: G is written in place.

    Example:
        >>> out = torch.empty_like(G)
        >>> unpack_grams(pack_grams(G), out)  # out equals G
    """
    n = G.shape[-1]
    a, c = _split(n)
    A = P[:, :, :a]
    upper = torch.ones(a, a, dtype=torch.bool, device=G.device).triu_()
    torch.where(upper, A, A.mT, out=G[:, :a, :a])
    if c:
        B = P[:, :, a:]
        G[:, :a, a:] = B
        G[:, a:, :a] = B.mT
        Cr = P[:, 1 : c + 1, :c]
        lower = torch.ones(c, c, dtype=torch.bool, device=G.device).tril_()
        torch.where(lower, Cr, Cr.mT, out=G[:, a:, a:])


def _gram_hook(group: Any, device: torch.device) -> Callable[[Any], None]:
    def hook(ws: Any) -> None:
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
