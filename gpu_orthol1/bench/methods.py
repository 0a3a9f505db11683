"""The methods `gpu-orthol1 bench` times: gpu_orthol1 itself, what a user would write instead, the limits.

Each is a `base.Method`; `all_methods()` lists them in the order the bench runs them.
Peers are imported lazily; one that is missing makes `available()` return a
one-line reason and the bench skips it.

Every peer computes the same loss, beta * sum |P_i^T P_i - I|, on the same
(l, m, n) C-contiguous input, the way a user would write it in that library.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .. import _dtypes
from .base import (
    BETA,
    Case,
    Method,
    Prepared,
    bits,
    cpu_peak,
    cpu_peak_of,
    cupy_module,
    device_copies,
    from_bits,
    gpu_ok,
    gpu_peak_of,
    gpu_sync,
    noop,
    to_host,
)

ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")

# ---------------------------------------------------------------- gpu_orthol1


def _ours(device: str, precision: str) -> Method:
    backend = "numpy" if device == "cpu" else "cupy"

    def prepare(case: Case) -> Prepared:
        import gpu_orthol1 as ol1

        if device == "cpu":
            xs = case.host
            sync = noop
        else:
            xs = device_copies(case)
            sync = gpu_sync

        def call(k):
            return ol1.loss_and_grad(xs[k], BETA, backend=backend, precision=precision)

        if device != "cpu" and _dtypes.is_bf16(case.dtype):
            from .. import _cache, _plan

            def call(k):
                # CuPy has no bfloat16: the int16 carrier through the functional API's plan cache and
                # loss_and_grad's own steps, the way gpu_orthol1.torch hands over a CUDA bfloat16 tensor
                p = _cache.cached(xs[k], 1, "sum", precision, backend, None, bf16_bits=True)
                return _plan.execute(p, xs[k], None, False, BETA, True)

        def result(r):
            return to_host(r[0]), from_bits(to_host(r[1]), case.dtype)

        peak = cpu_peak_of(call) if device == "cpu" else gpu_peak_of(call)
        return Prepared(call, result, sync, peak, [xs])

    name = f"gpu_orthol1[{backend}{',tf32' if precision == 'tf32' else ''}]"
    avail = (lambda: (True, "")) if device == "cpu" else gpu_ok
    return Method(
        name,
        "ours",
        device,
        backend,
        precision,
        prepare,
        avail,
        ("float32",) if precision == "tf32" else ALL_DTYPES,
    )


# ---------------------------------------------------------------- naive NumPy / CuPy


def _naive(xp, x, beta):
    """What a user writes: slices first, Gram, |G - I| summed, closed-form gradient 2 beta P sign(G - I)."""
    P = x.transpose(1, 0, 2)  # (m, l, n) view
    X = P.transpose(0, 2, 1) @ P - xp.eye(x.shape[2], dtype=x.dtype)
    loss = beta * xp.abs(X).sum()
    grad = (2 * beta) * (P @ xp.sign(X))
    return loss, grad.transpose(1, 0, 2)


def _numpy_naive() -> Method:
    def prepare(case):
        xs = case.host

        def call(k):
            return _naive(np, xs[k], BETA)

        return Prepared(call, lambda r: (r[0], r[1]), noop, cpu_peak_of(call), [xs])

    # bfloat16 runs as written: NumPy finds no bfloat16 matmul and casts each operand to float32 (a
    # whole copy each; 1.2-1.6x its float32 time, measured), so the gradient comes out float32
    return Method("numpy-naive", "peer", "cpu", "numpy", "highest", prepare, lambda: (True, ""), ALL_DTYPES)


def _cupy_naive() -> Method:
    def prepare(case):
        xs = device_copies(case)
        cp = cupy_module()

        def call(k):
            return _naive(cp, xs[k], BETA)

        return Prepared(call, lambda r: (to_host(r[0]), to_host(r[1])), gpu_sync, gpu_peak_of(call), [xs])

    return Method(
        "cupy-naive",
        "peer",
        "gpu",
        "cupy",
        "highest",
        prepare,
        gpu_ok,
        no_dtype={"bfloat16": "CuPy has no bfloat16 dtype"},
    )


# ---------------------------------------------------------------- PyTorch


def _torch_avail(device: str, compiled: bool):
    def avail():
        try:
            import torch
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken install: both mean "skip"
            return False, f"torch is not installed ({type(e).__name__}: {e})"
        if device == "gpu":
            ok, why = gpu_ok()
            if not ok:
                return False, why
            if not torch.cuda.is_available():
                return False, f"torch {torch.__version__} has no usable CUDA"
        if compiled and not hasattr(torch, "compile"):
            return False, f"torch {torch.__version__} has no torch.compile"
        return True, ""

    return avail


def _torch_loss(x, beta):
    import torch

    P = x.permute(1, 0, 2)
    G = P.transpose(1, 2) @ P
    return beta * (G - torch.eye(x.shape[2], dtype=x.dtype, device=x.device)).abs().sum()


_compiled: dict = {}


def _torch_compiled():
    import torch

    if "f" not in _compiled:
        try:  # every reference shape and dtype is a new graph: keep them all instead of falling back to eager
            torch._dynamo.config.cache_size_limit = 64
            if hasattr(torch._dynamo.config, "recompile_limit"):
                torch._dynamo.config.recompile_limit = 64
        except AttributeError:  # older or newer dynamo without these knobs: its defaults
            pass
        _compiled["f"] = torch.compile(_torch_loss)
    return _compiled["f"]


def _torch(device: str, compiled: bool) -> Method:
    def prepare(case):
        import torch

        def tensor(t):  # bfloat16 arrives as its int16 carrier (NumPy and CuPy have no bfloat16)
            return t.view(torch.bfloat16) if _dtypes.is_bf16(case.dtype) else t

        if device == "cpu":
            base = [tensor(torch.from_numpy(bits(h))) for h in case.host]
            sync = noop
            keep: list = [base]
        else:
            cps = device_copies(case)
            base = [tensor(torch.from_dlpack(c)) for c in cps]  # same device memory, no copy
            sync = gpu_sync
            keep = [cps, base]
        f = _torch_compiled() if compiled else _torch_loss

        def call(k):
            x = base[k].detach().requires_grad_(True)
            loss = f(x, BETA)
            loss.backward()
            return loss.detach(), x.grad

        def result(r):
            return r[0].cpu().double().numpy(), r[1].cpu().double().numpy()

        if device == "cpu":
            peak = cpu_peak_of(call)
        else:

            def peak():
                gpu_sync()
                torch.cuda.reset_peak_memory_stats()
                b0 = torch.cuda.memory_allocated()
                r = call(0)
                gpu_sync()
                p = torch.cuda.max_memory_allocated() - b0
                del r
                return float(p), "torch-max-allocated"

        return Prepared(call, result, sync, peak, keep)

    name = "torch-compile" if compiled else "torch-eager"
    return Method(
        name, "peer", device, "torch", "highest", prepare, _torch_avail(device, compiled), ALL_DTYPES
    )


# ---------------------------------------------------------------- JAX


def _jax_import():
    # JAX takes 75% of the GPU at import unless told not to; the other peers share the card.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    jax.config.update("jax_enable_x64", True)  # or float64 inputs are silently computed in float32
    return jax


def _jax_avail(device: str):
    def avail():
        try:
            jax = _jax_import()
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken install: both mean "skip"
            return False, f"jax is not installed ({type(e).__name__}: {e})"
        if device == "gpu":
            ok, why = gpu_ok()
            if not ok:
                return False, why
            try:
                if not jax.devices("gpu"):
                    return False, "jax has no GPU device"
            except Exception as e:  # noqa: BLE001 - jax raises RuntimeError or its own errors
                return False, f"jax has no GPU backend ({type(e).__name__}: {e}); pip install 'jax[cuda12]'"
        return True, ""

    return avail


_jax_fn: dict = {}


def _jax_value_and_grad():
    if "f" not in _jax_fn:
        jax = _jax_import()
        import jax.numpy as jnp

        def loss(x):
            P = jnp.transpose(x, (1, 0, 2))
            # HIGHEST: on GPUs, XLA's default float32 matmul precision is TF32
            G = jnp.matmul(jnp.swapaxes(P, 1, 2), P, precision=jax.lax.Precision.HIGHEST)
            return BETA * jnp.abs(G - jnp.eye(x.shape[2], dtype=x.dtype)).sum()

        _jax_fn["f"] = jax.jit(jax.value_and_grad(loss))
    return _jax_fn["f"]


def _jax(device: str) -> Method:
    def prepare(case):
        jax = _jax_import()
        dev = jax.devices("cpu" if device == "cpu" else "gpu")[0]
        xs = [jax.device_put(h, dev) for h in case.host]
        f = _jax_value_and_grad()

        def call(k):
            return f(xs[k])

        def sync():
            pass  # call() results are waited for in result/timer via block_until_ready

        def result(r):
            return np.asarray(r[0]), np.asarray(r[1])

        def peak():
            if device == "cpu":
                return cpu_peak(lambda: jax.block_until_ready(call(0)))
            ma = f.lower(xs[0]).compile().memory_analysis()
            return float(ma.temp_size_in_bytes + ma.output_size_in_bytes), "xla-plan"

        p = Prepared(lambda k: jax.block_until_ready(call(k)), result, sync, peak, [xs])
        return p

    return Method("jax-jit", "peer", device, "jax", "highest", prepare, _jax_avail(device), ALL_DTYPES)


def _ours_jax(device: str) -> Method:
    """gpu_orthol1.jax under jit(value_and_grad) on the JAX peer's device arrays: the same kernels as
    `_ours`, reached through XLA's buffers (the row next to jax-jit)."""

    def prepare(case):
        jax = _jax_import()
        from gpu_orthol1.jax import ortho_l1

        dev = jax.devices("cpu" if device == "cpu" else "gpu")[0]
        xs = [jax.device_put(h, dev) for h in case.host]
        f = jax.jit(jax.value_and_grad(lambda x: ortho_l1(x, BETA, axis=1)))

        def result(r):
            return np.asarray(r[0]), np.asarray(r[1])

        def peak():
            if device == "cpu":
                return cpu_peak(lambda: jax.block_until_ready(f(xs[0])))
            ma = f.lower(xs[0]).compile().memory_analysis()  # the callback's CuPy workspaces are not in it
            return float(ma.temp_size_in_bytes + ma.output_size_in_bytes), "xla-plan"

        return Prepared(lambda k: jax.block_until_ready(f(xs[k])), result, noop, peak, [xs])

    return Method(
        "gpu_orthol1.jax", "ours", device, "jax", "highest", prepare, _jax_avail(device), ALL_DTYPES
    )


# ---------------------------------------------------------------- the limit: the two GEMMs alone


def _limit(device: str, precision: str, threads: int | None = None, bf16: bool = False) -> Method:
    """The core's own Gram and gradient GEMMs (same BLAS / cuBLAS calls, same compute types) over
    contiguous (m, l, n) operands, in one batch each, with no sign pass: the time gpu_orthol1
    cannot beat with BLAS doing the arithmetic. On the CPU the slices are split over `threads`
    parts (None: as gpu_orthol1 splits them; 1: one part, BLAS threading each GEMM itself).
    bf16 (GPU): the bfloat16 limit, CUDA_R_16BF operands (int16 carriers, as the core's) with a
    float32 Gram and compute type; on the CPU, limit-blas covers bfloat16 as it does float16 (the
    core's float32 chunks)."""

    def prepare(case):
        from .. import _cpu_pool, _driver

        if device == "cpu":
            from .._numpy_dev import NumpyDevice

            dev: Any = NumpyDevice()
            xp: Any = np
            sync = noop
        else:
            from .._cupy import CupyDevice

            dev = CupyDevice(precision)
            xp = cupy_module()
            sync = gpu_sync
        m, n = case.m, case.n
        dt = case.dtype
        carrier = device != "cpu" and _dtypes.is_bf16(dt)  # CuPy has no bfloat16: its int16 carrier
        ddt = _dtypes.BITS if carrier else dt
        A = [
            xp.ascontiguousarray(xp.asarray(bits(h) if carrier else h).transpose(1, 0, 2)) for h in case.host
        ]
        acc = dev.acc_dtype(ddt)
        G = xp.empty((m, n * n), dtype=acc)
        rs = np.random.default_rng(0)
        signs = np.sign(rs.standard_normal((m, n * n)))
        # a bfloat16 S holds bfloat16 bit patterns of the signs, as the core's sign pass writes them
        S = xp.asarray(bits(signs.astype(dt)) if carrier else signs.astype(dev.sign_dtype(ddt)))
        lay = _driver.layout_of(A[0])
        if device != "cpu":
            dev.bind()

        # on the CPU the slices are split over threads exactly as gpu_orthol1 splits them
        parts = (threads or _cpu_pool.cpu_threads(m, case.l, n)) if device == "cpu" else 1

        def call(k):
            out = xp.empty_like(A[k])

            def part(a, b):
                src = dev.prepare(_driver.StridedChunk(A[k], lay, a), b - a)
                dev.gram(src, b - a, G[a:b])
                dev.grad(src, _driver.StridedChunk(out, lay, a), b - a, S[a:b], 1.0, 0.0)

            _cpu_pool.run_split(part, m, parts)
            return out

        peak = cpu_peak_of(call) if device == "cpu" else gpu_peak_of(call)
        return Prepared(call, lambda r: (None, None), sync, peak, [A, G, S])

    lib = "blas" if device == "cpu" else "cublas"
    name = f"limit-{lib}{'-tf32' if precision == 'tf32' else ''}{'-bf16' if bf16 else ''}"
    avail = (lambda: (True, "")) if device == "cpu" else gpu_ok
    if precision == "tf32":
        dtypes: tuple = ("float32",)
    elif device == "cpu":
        dtypes = ALL_DTYPES
    else:  # bfloat16's limit has a name of its own on the GPU, as tf32's
        dtypes = ("bfloat16",) if bf16 else ("float16", "float32", "float64")
    return Method(name, "limit", device, lib, precision, prepare, avail, dtypes)


def all_methods() -> list[Method]:
    return [
        _ours("cpu", "highest"),
        _numpy_naive(),
        _torch("cpu", False),
        _torch("cpu", True),
        _jax("cpu"),
        _ours_jax("cpu"),
        _limit("cpu", "highest"),
        _ours("gpu", "highest"),
        _ours("gpu", "tf32"),
        _cupy_naive(),
        _torch("gpu", False),
        _torch("gpu", True),
        _jax("gpu"),
        _ours_jax("gpu"),
        _limit("gpu", "highest"),
        _limit("gpu", "highest", bf16=True),
        _limit("gpu", "tf32"),
    ]
