"""The functional API's plan cache: a small LRU of plans keyed by what changes them, so that a
repeated call pays a lookup, not a re-plan."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from . import _backends, _checks, _penalty, _triangle
from ._plan import Plan

CACHE_SIZE = 32
_ENV_NAMES = (_backends.ENV_BACKEND, _checks.ENV_WORKSPACE, _checks.ENV_KERNEL, _triangle.ENV_GRAM)


_ENVIRON = os.environ  # the mapping `_env_key`'s encoded names belong to
_ENV_CODED = tuple(os.environ.encodekey(n) for n in _ENV_NAMES) if hasattr(os.environ, "encodekey") else None


def _env_key() -> tuple:
    """The raw values of the settings a plan reads from the environment (the cache key's part for
    them; None for an unset one). CPython keeps os.environ's values in the dict os.environ._data
    under os.environ.encodekey(name), and os.environ's own methods keep it in step with the process
    environment; its get() reads it through two Python calls and, for an unset name, a KeyError:
    about 7 us for the four names, which small calls feel (PointNet-sized torch inputs). Anything
    else bound to os.environ (a test's replacement mapping) is read through its own get()."""
    env = os.environ
    data = getattr(env, "_data", None)
    if env is _ENVIRON and type(data) is dict and _ENV_CODED is not None:
        return tuple(map(data.get, _ENV_CODED))
    return tuple(env.get(n) for n in _ENV_NAMES)


_cache: OrderedDict[tuple, Plan] = OrderedDict()
_cache_lock = threading.Lock()


def cached(
    phi: Any,
    axis: Any,
    reduction: Any,
    precision: Any,
    backend: Any,
    workspace_bytes: Any,
    penalty: Any = "l1",
    diagonal: Any = True,
    normalize: Any = False,
    bf16_bits: bool = False,
) -> Plan:
    """The plan for this call from the LRU cache, made on a miss (argument errors are raised then).
    bf16_bits: phi is the int16 carrier of bfloat16 data (the torch bridge's CUDA hand-over)."""
    # checked before the lookup: diagonal=1 would otherwise hash like True and find its plan
    variant = _penalty.check(penalty, diagonal, normalize)
    key: tuple | None
    try:
        tp = type(phi)
        key = (
            tp,
            phi.shape,
            phi.strides,
            phi.dtype,
            phi.device.id if tp is not np.ndarray else None,
            axis,
            type(axis),  # 1.0 and True hash like 1: a cached plan must not let them past the checks
            reduction,
            precision,
            backend,
            workspace_bytes,
            type(workspace_bytes),
            variant,
            bf16_bits,
            _env_key(),
        )
        with _cache_lock:
            p = _cache.get(key)
            if p is not None:
                _cache.move_to_end(key)
                return p
    except (AttributeError, TypeError):  # not an array, or an unhashable argument: Plan() says which
        key = None
    p = Plan(
        phi,
        1.0,
        axis=axis,
        reduction=reduction,
        precision=precision,
        backend=backend,
        workspace_bytes=workspace_bytes,
        penalty=variant.penalty,
        diagonal=variant.diagonal,
        normalize=variant.normalize,
        _bf16_bits=bf16_bits,
    )
    if key is not None:
        with _cache_lock:
            _cache[key] = p
            if len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return p


def clear_cache() -> None:
    """Forget every cached plan."""
    with _cache_lock:
        _cache.clear()
