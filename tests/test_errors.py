"""The bad-input contract: one test per row of docs/errors.md, read from the doc itself.

For every row the test makes the row's call through each entry point it applies
to. It checks that the exception type and the message text match the table,
and that nothing was written: phi, the row's bad argument and a sentinel-filled
out= are byte-for-byte what they were. The row ids in the doc and in CASES must
match exactly, so a row cannot be documented and left untested, or the other way
round.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import gpu_orthol1 as ol1
from gpu_orthol1 import _backends, _cache, _dtypes
from gpu_orthol1 import _plan as plan_module

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
SENTINEL = 7.25  # what out= holds before the call; it must hold it after (exact in bfloat16 too)
REAL_GPU = os.environ.get("GPU_ORTHOL1_TEST_GPU") == "1"  # as tests/conftest.py reads it


def _doc_rows():
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not re.fullmatch(r"[a-z][a-z0-9-]*", cells[0]) or cells[0] == "id":
            continue
        m = re.search(r"`([^`]+)`", cells[4])
        assert m, f"row {cells[0]}: the message column needs the text in backticks"
        rows[cells[0]] = (cells[3], m.group(1), "(GPU" in cells[2])
    return rows


ROWS = _doc_rows()


class World:
    """The arrays of one case: a valid phi, a sentinel out=, and snapshots of whatever must not change."""

    def __init__(self, xp, rng):
        self.xp = xp
        host = rng.standard_normal((5, 4, 3)).astype(np.float32)
        self.phi = xp.asarray(host)
        self.out = xp.full((5, 4, 3), SENTINEL, dtype=np.float32)
        self._watched = []
        self.watch(self.phi)
        self.watch(self.out)

    def watch(self, a):
        if hasattr(a, "dtype") and hasattr(a, "shape"):
            self._watched.append((a, _host_bytes(a)))
        return a

    def assert_untouched(self):
        for a, before in self._watched:
            assert _host_bytes(a) == before, "a failed call wrote into one of its arrays"
        out = _to_host(self.out)
        assert np.all(out == SENTINEL)


def _to_host(a):
    if type(a).__module__.split(".")[0] != "cupy":
        return a
    import cupy

    # a plain ndarray over the same memory: the out-device stand-in reports device 1, and its own
    # .get() would switch to that (absent) device
    return cupy.ndarray(a.shape, a.dtype, a.data, a.strides).get()


def _host_bytes(a):
    if type(a).__module__.split(".")[0] == "cupy":
        a = _to_host(a)
    a = np.asarray(a)
    if a.dtype == object:
        return repr(a.tolist())
    return a.tobytes() + repr((a.shape, a.strides, a.dtype.str)).encode()


def _no_gpu(monkeypatch, reason="cupy is not installed (made unusable by the test)"):
    # The probe result, not the machine, decides: this row runs the same on a GPU host.
    monkeypatch.setattr(_backends, "gpu_status", lambda refresh=False: (False, reason))


LOSS, GRAD, BOTH = "loss", "grad", "loss_and_grad"
ALL = (LOSS, GRAD, BOTH)
WITH_OUT = (GRAD, BOTH)


def _call(entry, phi, *args, **kw):
    return getattr(ol1, entry)(phi, *args, **kw)


# id -> (entry points, build(world, monkeypatch) -> (phi, positional args, keyword args)).
# For entry points other than loss, the world's sentinel out= is passed unless the case sets out.
def _phi(factory):
    return lambda w, mp: (w.watch(factory()), (), {})


def _opt(**kw):
    return lambda w, mp: (w.phi, (), kw)


def _beta(value):
    return lambda w, mp: (w.phi, (value,), {})


def _env(var, value, **kw):
    def build(w, mp):
        mp.setenv(var, value)
        return w.phi, (), kw

    return build


def _out(make):
    def build(w, mp):
        out = w.watch(make(w))  # first: make may replace w.phi
        return w.phi, (), {"out": out}

    return build


def _cupy_numpy_backend(w, mp):
    return w.phi, (), {"backend": "numpy"}


def _backend_cupy_missing(w, mp):
    _no_gpu(mp)
    return w.phi, (), {"backend": "cupy"}


def _env_cupy_missing(w, mp):
    _no_gpu(mp)
    mp.setenv("GPU_ORTHOL1_BACKEND", "cupy")
    return w.phi, (), {}


def _readonly(w):
    o = np.full(w.phi.shape, SENTINEL, np.float32)
    o.flags.writeable = False
    return o


def _overlapping_view(w):
    big = w.xp.asarray(np.arange(75, dtype=np.float32).reshape(5, 5, 3) / 75)
    w.phi = w.watch(big[:, :4])
    return big[:, 1:]


def _self_overlap(w):
    base = np.full(4, SENTINEL, np.float32)
    return np.lib.stride_tricks.as_strided(base, w.phi.shape, (0, 4, 4), writeable=True)


def _other_device(w):
    import cupy

    if cupy.cuda.runtime.getDeviceCount() >= 2:
        with cupy.cuda.Device(1):
            return cupy.full(w.phi.shape, SENTINEL, np.float32)

    # One GPU: a CuPy array that reports device 1 stands in for an array on a second card.
    class OnDevice1(cupy.ndarray):
        @property
        def device(self):
            return cupy.cuda.Device(1)

    OnDevice1.__module__ = "cupy.stand_in"  # gpu_orthol1 recognizes CuPy arrays by their module
    out = OnDevice1(w.phi.shape, np.float32)
    out.fill(SENTINEL)
    return out


def _matrix():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # np.matrix is deprecated, still seen
        return np.matrix(np.ones((3, 2), np.float32))


def _cannot_allocate(w, mp):
    # 2**48 bytes of gradient: beyond the 47-bit user address space of x86-64/arm64, so no
    # overcommit setting lets the allocation succeed. phi itself is a zero-stride view.
    phi = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (1 << 16, 1 << 16, 1 << 14), (0, 0, 0))
    return phi, (), {"backend": "numpy"}  # "auto" would pick the GPU for this many flops


def _bf16_gpu_path(**kw):
    """A bfloat16 NumPy phi and out= computed on the GPU path: on the card (GPU_ORTHOL1_TEST_GPU=1)
    through backend="cupy", elsewhere through the emulated GPU device (the card's argument sets and
    kernels under numba's simulator) standing in for the CPU's. Plans are cached apart, so that no
    emulated plan outlives the row."""

    def build(w, mp):
        bf16 = _dtypes.bfloat16()
        w.phi = w.watch(np.asarray(_to_host(w.phi)).astype(bf16))
        w.out = w.watch(np.full(w.phi.shape, SENTINEL, bf16))
        mp.setattr(_cache, "_cache", OrderedDict())
        if REAL_GPU:
            return w.phi, (), {"backend": "cupy", **kw}
        from gpu_orthol1.testing import EmulatedGpuDevice

        mp.setattr(plan_module, "make_device", lambda resolved, precision: EmulatedGpuDevice())
        return w.phi, (), {"backend": "numpy", **kw}

    return build


def _bf16_fused(w, mp):
    mp.setenv("GPU_ORTHOL1_KERNEL", "fused")  # loss and grad take no kernel=: the override forces it
    return _bf16_gpu_path()(w, mp)


CASES = {
    "phi-list": (ALL, _phi(lambda: [[1.0, 2.0]])),
    "phi-scalar": (ALL, _phi(lambda: 1.0)),
    "phi-masked": (ALL, _phi(lambda: np.ma.ones((3, 2), np.float32))),
    "phi-matrix": (ALL, _phi(_matrix)),
    "phi-ndim1": (ALL, _phi(lambda: np.ones(3, np.float32))),
    "phi-ndim4": (ALL, _phi(lambda: np.ones((2, 2, 2, 2), np.float32))),
    "phi-int": (ALL, _phi(lambda: np.ones((3, 2), np.int32))),
    "phi-bool": (ALL, _phi(lambda: np.ones((3, 2), bool))),
    "phi-complex": (ALL, _phi(lambda: np.ones((3, 2), np.complex64))),
    "phi-object": (ALL, _phi(lambda: np.full((3, 2), 1.5, dtype=object))),
    "phi-longdouble": (ALL, _phi(lambda: np.ones((3, 2), np.longdouble))),
    "phi-bigendian": (ALL, _phi(lambda: np.ones((3, 2), ">f4"))),
    "phi-cupy-numpy-backend": (ALL, _cupy_numpy_backend),
    "axis-range-high": (ALL, _opt(axis=3)),
    "axis-range-low": (ALL, _opt(axis=-4)),
    "axis-float": (ALL, _opt(axis=1.0)),
    "axis-bool": (ALL, _opt(axis=True)),
    "axis-none": (ALL, _opt(axis=None)),
    "reduction-unknown": (ALL, _opt(reduction="avg")),
    "reduction-none": (ALL, _opt(reduction=None)),
    "backend-unknown": (ALL, _opt(backend="torch")),
    "precision-unknown": (ALL, _opt(precision="fast")),
    "penalty-unknown": (ALL, _opt(penalty="l3")),
    "penalty-none": (ALL, _opt(penalty=None)),
    "diagonal-not-bool": (ALL, _opt(diagonal=1)),
    "normalize-not-bool": (ALL, _opt(normalize="yes")),
    "option-unknown": (ALL, _opt(foo=1)),
    "option-loss-out": ((LOSS,), lambda w, mp: (w.phi, (), {"out": w.out})),
    "option-positional": (ALL, lambda w, mp: (w.phi, (1.0, 1), {})),
    "beta-nan": (ALL, _beta(float("nan"))),
    "beta-inf": (ALL, _beta(-np.inf)),
    "beta-overflow": (ALL, _beta(10**400)),
    "beta-complex": (ALL, _beta(1j)),
    "beta-string": (ALL, _beta("1")),
    "beta-bool": (ALL, _beta(True)),
    "beta-array": (ALL, lambda w, mp: (w.phi, (w.watch(np.ones(1)),), {})),
    "beta-negative": (ALL, _beta(-1.0)),
    "beta-negative-int": (ALL, _beta(-2)),
    "beta-negative-tiny": (ALL, _beta(-5e-324)),
    "out-shape": (WITH_OUT, _out(lambda w: w.xp.full((5, 4, 2), SENTINEL, np.float32))),
    "out-dtype": (WITH_OUT, _out(lambda w: w.xp.full((5, 4, 3), SENTINEL, np.float64))),
    "out-kind": (WITH_OUT, _out(lambda w: [SENTINEL] * 3)),
    "out-kind-numpy-for-cupy": (WITH_OUT, _out(lambda w: np.full((5, 4, 3), SENTINEL, np.float32))),
    "out-device": (WITH_OUT, _out(_other_device)),
    "out-readonly": (WITH_OUT, _out(_readonly)),
    "out-is-phi": (WITH_OUT, lambda w, mp: (w.phi, (), {"out": w.phi})),
    "out-overlaps-phi": (WITH_OUT, _out(_overlapping_view)),
    "out-overlaps-phi-cupy": (WITH_OUT, _out(_overlapping_view)),
    "out-self-overlap": (WITH_OUT, _out(_self_overlap)),
    "accumulate-no-out": (WITH_OUT, lambda w, mp: (w.phi, (), {"accumulate": True, "out": None})),
    "accumulate-not-bool": (WITH_OUT, _opt(accumulate=1)),
    "backend-cupy-missing": (ALL, _backend_cupy_missing),
    "env-backend-unknown": (ALL, _env("GPU_ORTHOL1_BACKEND", "gpu")),
    "env-backend-cupy-missing": (ALL, _env_cupy_missing),
    "env-gram-unknown": (ALL, _env("GPU_ORTHOL1_GRAM", "half")),
    "env-workspace-text": (ALL, _env("GPU_ORTHOL1_WORKSPACE_BYTES", "abc")),
    "env-workspace-zero": (ALL, _env("GPU_ORTHOL1_WORKSPACE_BYTES", "0")),
    "env-workspace-float": (ALL, _env("GPU_ORTHOL1_WORKSPACE_BYTES", "1.5")),
    "workspace-zero": (ALL, _opt(workspace_bytes=0)),
    "workspace-negative": (ALL, _opt(workspace_bytes=-1)),
    "workspace-float": (ALL, _opt(workspace_bytes=1.5)),
    "workspace-string": (ALL, _opt(workspace_bytes="100")),
    "workspace-bool": (ALL, _opt(workspace_bytes=True)),
    "workspace-too-small": (ALL, _opt(workspace_bytes=30)),
    "cannot-allocate": ((GRAD, BOTH), _cannot_allocate),
    "kernel-fused-bf16": (ALL, _bf16_fused),
    "bf16-gpu-l2-grad": (WITH_OUT, _bf16_gpu_path(penalty="l2")),
    "bf16-gpu-normalize-grad": (WITH_OUT, _bf16_gpu_path(normalize=True)),
}
# Rows whose out= must not be the world's sentinel (they pass their own, or none at all).
_OWN_OUT = {"cannot-allocate"}
GPU_ROWS = {rid for rid, (_, _, gpu) in ROWS.items() if gpu}
# GPU-path rows that need no card: the emulator runs them here (cudasim), the card in its `gpu` run
EMULATED_ROWS = {"kernel-fused-bf16", "bf16-gpu-l2-grad", "bf16-gpu-normalize-grad"}


def test_doc_and_cases_match():
    assert ROWS, f"no table rows found in {DOC}"
    assert set(ROWS) == set(CASES), (
        f"documented but not tested: {sorted(set(ROWS) - set(CASES))}; "
        f"tested but not documented: {sorted(set(CASES) - set(ROWS))}"
    )


def _params():
    for rid in CASES:
        if rid in EMULATED_ROWS:
            yield pytest.param(
                rid,
                marks=[pytest.mark.cudasim, pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")],
                id=rid,
            )
            yield pytest.param(rid, marks=[pytest.mark.gpu], id=f"{rid}-card")
            continue
        marks = [pytest.mark.gpu] if rid in GPU_ROWS else []
        yield pytest.param(rid, marks=marks, id=rid)


@pytest.mark.parametrize("rid", list(_params()))
def test_row(rid, rng, monkeypatch):
    exc_name, fragment, gpu = ROWS[rid]
    entries, build = CASES[rid]
    if gpu:
        import cupy as xp
    else:
        xp = np
    exc_type = {
        "TypeError": TypeError,
        "ValueError": ValueError,
        "MemoryError": MemoryError,
        "BackendUnavailableError": ol1.BackendUnavailableError,
    }[exc_name]
    for entry in entries:
        w = World(xp, rng)
        with monkeypatch.context() as mp:
            phi, args, kw = build(w, mp)
            if entry != LOSS and "out" not in kw and rid not in _OWN_OUT:
                kw["out"] = w.out
            with pytest.raises(exc_type) as info:
                _call(entry, phi, *args, **kw)
        assert type(info.value) is exc_type or exc_type is MemoryError, (
            f"{entry}: raised {type(info.value).__name__}, the table says {exc_name}"
        )
        assert fragment in str(info.value), f"{entry}: message {str(info.value)!r} lacks {fragment!r}"
        w.assert_untouched()


def test_accepted_not_rows(rng):
    """The 'accepted, so not rows' paragraph of docs/errors.md: these calls succeed."""
    phi = rng.standard_normal((5, 4, 3)).astype(np.float32)
    ref = ol1.loss(phi, 0.5)
    assert float(ol1.loss(phi[:, 0, :], axis=7)) == float(ol1.loss(phi[:, 0, :]))
    assert float(ol1.loss(phi, np.float32(0.5), axis=np.int64(1))) == float(ref)
    assert float(ol1.loss(phi, np.array(0.5))) == float(ref)
    from fractions import Fraction

    assert float(ol1.loss(phi, Fraction(1, 2))) == float(ref)
    out = np.zeros_like(phi)
    ol1.grad(phi, out=out, accumulate=np.bool_(True))
    np.testing.assert_array_equal(out, ol1.grad(phi))
    assert float(ol1.loss(phi, diagonal=np.bool_(False), normalize=np.bool_(True))) == float(
        ol1.loss(phi, diagonal=False, normalize=True)
    )
    ro = phi.copy()
    ro.flags.writeable = False
    assert float(ol1.loss(ro, 0.5)) == float(ref)
    assert float(ol1.loss(phi.view(np.memmap), 0.5)) == float(ref)


@pytest.mark.parametrize(
    "beta",
    [np.float32(-0.5), np.array(-0.5), -0.5 + 0 * np.ones(()), -1, -(10**400)],
    ids=["np-float32", "0d-array", "np-float64", "int", "huge-negative-int"],
)
def test_negative_beta_of_every_accepted_kind_and_in_plans(beta, rng):
    """The beta-negative rows for the other kinds of beta the 'accepted' paragraph lists, and for
    plan() (which checks beta when made)."""
    phi = rng.standard_normal((5, 4, 3)).astype(np.float32)
    for call in (
        lambda: ol1.loss(phi, beta),
        lambda: ol1.grad(phi, beta),
        lambda: ol1.loss_and_grad(phi, beta),
        lambda: ol1.plan(phi, beta),
    ):
        with pytest.raises(ValueError, match="beta must be"):
            call()
    from fractions import Fraction

    with pytest.raises(ValueError, match=r"beta must be >= 0, got Fraction\(-1, 2\)"):
        ol1.plan(phi, Fraction(-1, 2), want="loss")


def test_zero_beta_is_accepted(rng):
    phi = rng.standard_normal((5, 4, 3)).astype(np.float64)
    for beta in (0.0, -0.0, 0, np.float32(0)):
        loss, g = ol1.loss_and_grad(phi, beta)
        assert float(loss) == 0.0 and not g.any()
        assert float(ol1.plan(phi, beta, want="loss")(phi)) == 0.0


def test_blank_env_counts_as_unset(rng, monkeypatch):
    phi = rng.standard_normal((5, 4, 3)).astype(np.float32)
    ref = ol1.loss(phi)
    monkeypatch.setenv("GPU_ORTHOL1_BACKEND", "   ")
    monkeypatch.setenv("GPU_ORTHOL1_WORKSPACE_BYTES", " ")
    assert float(ol1.loss(phi)) == float(ref)
    # an explicit backend overrides a bad environment value
    monkeypatch.setenv("GPU_ORTHOL1_BACKEND", "gpu")
    assert float(ol1.loss(phi, backend="numpy")) == float(ref)
