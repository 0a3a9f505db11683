"""Device code of gpu_orthol1, installed as ``gpu_orthol1.kernels``.

Nothing is imported here on purpose: ``sign_abs`` imports ``numba.cuda`` and
``sign_abs_cpu`` imports numba's CPU JIT, and a CPU-only ``import gpu_orthol1``
must stay fast. The host code imports the module it needs on first use.
"""
