"""Static checks inside the one pytest command: ruff over the repository, mypy over the package, and
complete type hints on the public API.

ruff and mypy come with the `test` extra. Where one is missing (the GPU machine has neither), its
test is skipped with the reason; the CPU CI run has both.
"""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_orthol1 as ol1

ROOT = Path(__file__).resolve().parent.parent
# Used only while pyproject.toml names no rules of its own: ruff's defaults changed between
# versions (0.17 turns on dozens of opinion rules), so the suite pins the long-standing default
# set (pyflakes + pycodestyle errors). E741 is off because `l` is the slice's row count, as in
# the math.
FALLBACK_RUFF_RULES = ["--select", "E4,E7,E9,F", "--ignore", "E741"]


def _tool(name):
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} is not installed here (from the repository root: pip install -e '.[test]')")
    return exe


def _pyproject_selects_ruff_rules() -> bool:
    text = (ROOT / "pyproject.toml").read_text()
    section = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("["):
            section = s
        elif section in ("[tool.ruff.lint]", "[tool.ruff]") and s.split("=")[0].strip() in (
            "select",
            "extend-select",
        ):
            return True
    return False


def _run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def test_ruff_clean():
    args = [] if _pyproject_selects_ruff_rules() else FALLBACK_RUFF_RULES
    rc, out = _run([_tool("ruff"), "check", "--output-format", "concise", *args, "."])
    assert rc == 0, f"{' '.join(['ruff check', *args, '.'])} found problems:\n{out}"


def test_ruff_format_clean():
    """`ruff format --check`: the tree is as the formatter writes it (the pre-commit hook keeps it so)."""
    rc, out = _run([_tool("ruff"), "format", "--check", "."])
    assert rc == 0, f"ruff format --check . would reformat:\n{out}"


@pytest.mark.long
def test_mypy_clean():
    rc, out = _run([_tool("mypy"), "gpu_orthol1", "kernels"])
    assert rc == 0, f"mypy gpu_orthol1 kernels found problems:\n{out}"


@pytest.mark.parametrize(
    "fn", [ol1.loss, ol1.grad, ol1.loss_and_grad, ol1.available_backends], ids=lambda f: f.__name__
)
def test_public_api_fully_annotated(fn):
    sig = inspect.signature(fn)
    missing = [p.name for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{fn.__name__}: parameters without type hints: {missing}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{fn.__name__}: no return type"


# the core API, and each framework layer whose framework is installed (gpu_orthol1.keras is left to
# tests/test_keras.py's subprocesses: Keras fixes its backend for the process at import)
FRAMEWORK_MODULES = (
    "gpu_orthol1",
    "gpu_orthol1.torch",
    "gpu_orthol1.distributed",
    "gpu_orthol1.jax",
    "gpu_orthol1.optax",
)


def _framework_callables():
    """(id, callable) for every public function, class and public method of the core API and of the
    framework layers (their `__all__`), for the frameworks installed here."""
    import importlib

    out = []
    for modname in FRAMEWORK_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue  # that framework is not installed: its layer is checked where it is
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not callable(obj):  # __version__
                continue
            out.append((f"{modname}.{name}", obj))
            if inspect.isclass(obj):
                for mname, member in vars(obj).items():
                    if mname == "__init__" or not mname.startswith("_"):
                        fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                        if inspect.isfunction(fn):
                            out.append((f"{modname}.{name}.{mname}", fn))
    return out


_FRAMEWORK = _framework_callables()


@pytest.mark.skipif(not _FRAMEWORK, reason="torch is not installed (the torch extra)")
@pytest.mark.parametrize("what,fn", _FRAMEWORK, ids=[w for w, _ in _FRAMEWORK])
def test_framework_api_annotated_and_documented(what, fn):
    """issue 24 item 5: every public callable of gpu_orthol1.torch / .distributed is typed, and the
    public functions and methods document Args (when they take any), Returns and an Example."""
    if inspect.isclass(fn) and issubclass(fn, BaseException):
        assert inspect.getdoc(fn), f"{what}: an exception or warning class without a docstring"
        return
    if inspect.isclass(fn):
        doc = inspect.getdoc(fn) or ""
        fields = "Attributes:" if issubclass(fn, tuple) else "Args:"  # a NamedTuple's fields are attributes
        assert fields in doc and "Example:" in doc, f"{what}: the class docstring lacks {fields}/Example"
        return
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{what}: parameters without type hints: {missing}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{what}: no return type"
    if fn.__name__ in ("__init__", "__repr__"):
        return
    doc = inspect.getdoc(fn) or ""
    sections = (["Args:"] if params else []) + ["Returns:", "Example:"]
    lacking = [s for s in sections if s not in doc]
    assert not lacking, f"{what}: the docstring has no {lacking} section(s)"
