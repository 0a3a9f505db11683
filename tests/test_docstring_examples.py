"""The Example of every public docstring of gpu_orthol1.jax, .optax and .keras runs as written.

Each module's examples run as doctests in a fresh interpreter (this file run as a script), every
example with empty globals: an Example imports what it uses, as a user pasting it would. Keras fixes
its backend for the process when first imported, so its examples run once per backend (jax, torch).
Every public function, class and public method must have an Example with at least one `>>>` line.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _documented(modname: str) -> list[tuple[str, object]]:
    """(name, object) of the module's public callables and their classes' public methods."""
    mod = importlib.import_module(modname)
    out = []
    for name in mod.__all__:
        obj = getattr(mod, name)
        out.append((f"{modname}.{name}", obj))
        if inspect.isclass(obj):
            for mname, member in vars(obj).items():
                if (mname == "__call__" or not mname.startswith("_")) and inspect.isfunction(member):
                    out.append((f"{modname}.{name}.{mname}", member))
    return out


def run_examples(modname: str) -> list[str]:
    """Failures (empty: all ran) of the Examples of `modname`'s public docstrings."""
    problems = []
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    for name, obj in _documented(modname):
        doc = inspect.getdoc(obj) or ""
        if "Example:" not in doc:
            problems.append(f"{name}: no Example section")
            continue
        test = parser.get_doctest(doc[doc.index("Example:") :], {}, name, None, 0)
        if not test.examples:
            problems.append(f"{name}: an Example section without a `>>>` line")
            continue
        res = runner.run(test, out=lambda s, name=name: problems.append(f"{name}:\n{s}"))
        if res.failed and not problems:
            problems.append(f"{name}: {res.failed} example(s) failed")
    return problems


CASES = [
    ("gpu_orthol1.jax", None, "jax"),
    ("gpu_orthol1.optax", None, "optax"),
    ("gpu_orthol1.keras", "jax", "keras"),
    ("gpu_orthol1.keras", "torch", "keras"),
]


@pytest.mark.parametrize("modname,backend,needs", CASES, ids=[f"{m}-{b}" if b else m for m, b, _ in CASES])
def test_examples_run(modname, backend, needs):
    for pkg in (needs, backend):  # found, not imported: keras's import here would pick its default backend
        if pkg is not None and importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_ORTHOL1_", "KERAS_BACKEND", "JAX_"))}
    if backend is not None:
        env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, __file__, modname], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"{modname} (KERAS_BACKEND={backend}):\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert "examples ran" in r.stdout, r.stdout


if __name__ == "__main__":
    found = run_examples(sys.argv[1])
    print("\n".join(found) if found else f"{sys.argv[1]}: examples ran")
    sys.exit(1 if found else 0)
