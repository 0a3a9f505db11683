"""gpu_orthol1.jax on the CPU adds nothing to the core's call (issue 23's 1.1x target): the callback's
NumPy views alias XLA's own input and output buffers, the compiled step is the one custom call (no
transpose, copy or cotangent multiply around it), and the gradient is written into huge pages as
NumPy's own allocation is (gpu_orthol1/jax/_hugepages.py)."""

import re
import resource
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import gpu_orthol1 as ol1  # noqa: E402
from gpu_orthol1 import reference as R  # noqa: E402
from gpu_orthol1.jax import _hugepages, _ops, ortho_l1  # noqa: E402

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode():
    if not sys.platform.startswith("linux") or not THP.exists():
        return None
    m = re.search(r"\[(\w+)\]", THP.read_text())
    return m.group(1) if m else None


def _spy(monkeypatch):
    """Record the addresses of the NumPy views the CPU callback gets."""
    seen = {}
    run = _ops._run_cpu

    def spy(outs, ins, *a):
        seen["ins"] = [np.asarray(x).ctypes.data for x in ins]
        seen["outs"] = [np.asarray(o).ctypes.data for o in outs]
        return run(outs, ins, *a)

    monkeypatch.setattr(_ops, "_run_cpu", spy)
    return seen


@pytest.mark.parametrize("shape,axis", [((37, 5, 24), 1), ((9, 23, 6), 0), ((29, 13), 1)])
def test_callback_views_alias_xla_buffers(shape, axis, monkeypatch, rng):
    phi = R.random_phi(rng, shape, np.float32, l=R.slice_rows(shape, axis))
    x = jnp.asarray(phi)
    seen = _spy(monkeypatch)
    f = jax.jit(jax.value_and_grad(lambda x: ortho_l1(x, 0.3, axis=axis)))
    loss, g = jax.block_until_ready(f(x))
    assert seen["ins"] == [x.unsafe_buffer_pointer()]  # the input: XLA's buffer, not a copy
    assert seen["outs"] == [loss.unsafe_buffer_pointer(), g.unsafe_buffer_pointer()]  # written in place
    R.check(phi, np.asarray(loss), np.asarray(g), 0.3, axis, "sum", dtype=np.float32)


def test_compiled_step_is_the_callback_alone(rng):
    """No pass of XLA's around the core call: value_and_grad's cotangent of 1 multiplies nothing,
    and the (m, l, n) slice view is the callback's NumPy view, not an XLA transpose."""
    x = jnp.asarray(R.random_phi(rng, (40, 6, 16), np.float32))
    hlo = jax.jit(jax.value_and_grad(lambda x: ortho_l1(x, 1e-3))).lower(x).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    ops = re.findall(r"[\]})] ([a-z][a-z-]*)\(", entry)  # the op after each instruction's result type
    assert ops.count("custom-call") == 1, entry
    assert not {"multiply", "transpose", "copy", "broadcast", "fusion"} & set(ops), entry


def test_advise_small_noncontiguous_and_contents():
    small = np.ones(1000, np.float32)
    assert _hugepages.advise(small) is False  # under NumPy's 4 MiB threshold
    big = np.arange(3 << 20, dtype=np.float32)  # 12 MiB
    assert _hugepages.advise(big[::2]) is False  # not a dense buffer
    before = big.copy()
    advised = _hugepages.advise(big)
    assert advised == (_thp_mode() is not None and _hugepages._numpy_uses_hugepages())
    np.testing.assert_array_equal(big, before)  # advice, never a change of contents


def _minflt(fn):
    fn()  # compiled, plans made, workspaces kept
    best = None
    for _ in range(3):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = fn()
        jax.block_until_ready(out)
        del out
        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        best = f if best is None else min(best, f)
    return best


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="transparent huge pages are off (or not Linux)")
def test_gradient_faults_in_huge_pages_like_numpy(rng):
    """The gradient's first touch: one fault per 4 KiB page cost 12-18% of the call on 64 MiB
    gradients; the callback's output now takes huge pages, as NumPy's allocation does. (Over 32 MiB:
    glibc hands smaller blocks back from its heap, already touched, and XLA allocates through it.)"""
    phi = R.random_phi(rng, (64, 4096, 36), np.float32)  # a 36 MiB gradient: 9216 small pages
    x = jnp.asarray(phi)
    f = jax.jit(jax.value_and_grad(lambda x: ortho_l1(x, 1e-3)))
    small_pages = phi.nbytes // 4096
    core = _minflt(lambda: ol1.loss_and_grad(phi, 1e-3, backend="numpy"))
    if core > small_pages // 2:
        pytest.skip(f"the kernel gave NumPy's own gradient no huge pages either ({core} faults)")
    ours = _minflt(lambda: f(x))
    assert ours < small_pages // 2, f"{ours} page faults for {small_pages} pages (the core: {core})"
