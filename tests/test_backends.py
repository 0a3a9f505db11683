"""Backend choice: available_backends, the env override, auto's size rule, and the real no-GPU fallback."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import gpu_orthol1 as ol1
from gpu_orthol1 import _backends, _cache

from .reference import check, random_phi


@pytest.fixture
def fresh_probe(monkeypatch):
    """Forget the cached GPU probe and the once-per-process warning; restore both afterwards."""
    monkeypatch.setattr(_backends, "_gpu_probe", None)
    monkeypatch.setattr(_backends, "_warned", False)
    yield
    _backends._gpu_probe = None


def test_available_backends_lists_numpy_and_explains_missing():
    av = ol1.available_backends()
    assert "numpy" in av and av[-1] == "numpy"
    for name in ("cupy", "numpy"):
        assert (name in av) != (name in av.reasons)
    assert all(isinstance(r, str) and r for r in av.reasons.values())


def test_env_overrides_auto_not_explicit(monkeypatch, rng):
    phi = random_phi(rng, (6, 3, 4), np.float64)
    monkeypatch.setenv(_backends.ENV_BACKEND, "numpy")
    loss, g = ol1.loss_and_grad(phi, 0.5)
    check(phi, loss, g, 0.5)
    monkeypatch.setenv(_backends.ENV_BACKEND, "cupy")
    if "cupy" not in ol1.available_backends():
        with pytest.raises(ol1.BackendUnavailableError, match="unavailable"):
            ol1.loss(phi, 0.5)
    # an explicit backend wins over the variable
    check(phi, ol1.loss(phi, 0.5, backend="numpy"), g, 0.5)


def test_auto_below_crossover_never_probes(monkeypatch, fresh_probe, rng):
    def boom():
        raise AssertionError("auto probed the GPU for a problem below the crossover")

    monkeypatch.setattr(_backends, "_probe_gpu", boom)
    phi = random_phi(rng, (8, 4, 5), np.float32)
    loss, g = ol1.loss_and_grad(phi)
    check(phi, loss, g)


def test_real_no_gpu_fallback_warns_once(monkeypatch, fresh_probe, rng):
    """On this CPU-only machine CuPy is installed (the test extra pulls cupy-cuda12x) but cannot
    reach a GPU: auto must fall back to the CPU with one warning, never crash."""
    pytest.importorskip("cupy")
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)  # probe CuPy for real, not the simulator
    ok, why = _backends.gpu_status(refresh=True)
    if ok:
        pytest.skip("a usable GPU is present: no fallback to exercise")
    assert why
    shape = (64, 8, 64)  # 4*l*m*n^2 = 8.4e6 flops: lower the crossover so auto wants the GPU
    monkeypatch.setattr(_backends, "GPU_CROSSOVER_FLOPS", 1e6)
    phi = random_phi(rng, shape, np.float32)
    with pytest.warns(ol1.GpuFallbackWarning, match="running on the CPU"):
        loss, g = ol1.loss_and_grad(phi, 0.1)
    check(phi, loss, g, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ol1.GpuFallbackWarning)
        ol1.loss(phi, 0.1)  # second time: silent
    with pytest.raises(ol1.BackendUnavailableError, match=why[:30].replace("(", r"\(").replace(")", r"\)")):
        ol1.loss(phi, 0.1, backend="cupy")


@pytest.mark.parametrize("entry", ["loss", "grad", "loss_and_grad", "plan"])
def test_fallback_warning_points_at_the_callers_line(entry, monkeypatch, fresh_probe, rng):
    """GpuFallbackWarning is attributed to the line that called gpu_orthol1 (this file), not to a line
    inside the package, for each entry point that resolves "auto" (a plan resolves it when made)."""
    monkeypatch.setattr(
        _backends, "_probe_gpu", lambda: (False, "cupy is installed but (test) finds no device")
    )
    monkeypatch.setattr(_backends, "GPU_CROSSOVER_FLOPS", 1.0)
    _cache.clear_cache()  # a cached plan has resolved "auto" already: no warning would come
    phi = random_phi(rng, (6, 3, 4), np.float64)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        getattr(ol1, entry)(phi, 0.5)
        line = sys._getframe().f_lineno - 1
    (w,) = [w for w in got if issubclass(w.category, ol1.GpuFallbackWarning)]
    assert (w.filename, w.lineno) == (__file__, line), f"attributed to {w.filename}:{w.lineno}"
    _cache.clear_cache()  # nor keep the plans resolved under the patched probe


def test_missing_cupy_reason_gives_an_install_command_that_works(monkeypatch, fresh_probe):
    """gpu_orthol1 is not on a package index: `pip install 'gpu_orthol1[gpu]'` fails. The hint names the
    checkout's extra and the two wheels it stands for (pyproject's [gpu])."""
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    ok, why = _backends.gpu_status(refresh=True)
    assert not ok and why.startswith("cupy is not installed")
    assert "pip install -e '.[gpu]'" in why and "gpu_orthol1[" not in why
    # the wheels named are the ones pyproject's [gpu] extra installs
    extra = re.search(
        r"^gpu = \[(.*)\]$", (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(), re.M
    ).group(1)
    for req in re.findall(r'"([^"]+)"', extra):
        assert re.sub(r">=.*", "", req) in why
    assert ol1.available_backends().reasons["cupy"] == why
