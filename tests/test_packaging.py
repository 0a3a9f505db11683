"""The built wheel installs kernels/ as gpu_orthol1.kernels and never as a top-level `kernels`, and carries
every subpackage (the `gpu-orthol1 bench` harness in gpu_orthol1/bench/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_has_no_top_level_kernels(tmp_path):
    pytest.importorskip("build")
    # from a clean copy: a --no-isolation build in the checkout reuses its build/lib, where a module
    # that the package list no longer names (or never named) survives from an earlier build
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "results"
        ),
    )
    r = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops
    assert "gpu_orthol1/kernels/sign_abs.py" in names and "gpu_orthol1/kernels/sign_abs_cpu.py" in names
    assert "gpu_orthol1/kernels/addresses.py" in names
    # every module of every subpackage in the source tree, so a package left out of pyproject's list fails here
    src = os.path.join(ROOT, "gpu_orthol1")
    for sub in sorted(d for d in os.listdir(src) if os.path.isfile(os.path.join(src, d, "__init__.py"))):
        for mod in sorted(f for f in os.listdir(os.path.join(src, sub)) if f.endswith(".py")):
            assert f"gpu_orthol1/{sub}/{mod}" in names, f"the wheel lacks gpu_orthol1/{sub}/{mod}"
    assert "gpu_orthol1/bench/command.py" in names and "gpu_orthol1/bench/__main__.py" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    assert "gpu_orthol1/py.typed" in names  # PEP 561: the type hints ship
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    from gpu_orthol1 import __version__

    assert wheel.startswith(f"gpu_orthol1-{__version__}-")  # the version is written once, in __init__.py
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert (
        entry
        and "gpu-orthol1 = gpu_orthol1.cli:main" in zipfile.ZipFile(tmp_path / wheel).read(entry[0]).decode()
    )


def test_import_is_light():
    code = "import sys, gpu_orthol1; print(sorted(m for m in ('numba', 'cupy', 'torch', 'numba.cuda') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_ci_run_keeps_the_checkouts_venv_and_runs_the_readme_command(tmp_path):
    """.ci/run makes its own environment (never the checkout's .venv, which the README's commands
    make) and runs the README's test command in it. python3, pip and python are stubs that log."""
    import re
    import shutil

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    readme = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(
        r"^ +python3 -m venv \.venv && \. \.venv/bin/activate && (pip install -e '\.\[test\]'.*)$",
        readme,
        re.M,
    )
    assert m, "the README's test command moved"
    steps = m.group(1).split(" && ")  # after the activate: what CI must run, exactly
    tree = tmp_path / "checkout"
    (tree / ".ci").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, ".ci", "run"), tree / ".ci" / "run")
    (tree / ".venv").mkdir()
    (tree / ".venv" / "mine").write_text("the developer's environment")
    stubs, log = tmp_path / "stubs", tmp_path / "log"
    stubs.mkdir()
    # `python3 -m venv DIR` makes DIR/bin/activate, which defines pip and python as loggers
    (stubs / "python3").write_text(
        '#!/bin/sh\n[ "$1 $2" = "-m venv" ] || exit 1\nmkdir -p "$3/bin"\n'
        'printf \'pip() { echo "pip $*" >> "$LOG"; }\\npython() { echo "python $*" >> "$LOG"; }\\n\' '
        '> "$3/bin/activate"\necho "venv $3" >> "$LOG"\n'
    )
    (stubs / "python3").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "LOG": str(log),
        "TMPDIR": str(tmp_path),
    }
    r = subprocess.run([bash, str(tree / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tree / ".venv" / "mine").read_text() == "the developer's environment"
    venv_line, *ran = log.read_text().splitlines()
    venv_dir = venv_line.split(" ", 1)[1]
    assert not os.path.abspath(venv_dir).startswith(str(tree))  # nothing of CI's left in the checkout
    assert not os.path.exists(venv_dir)  # removed when CI ends
    assert ran == [s.replace("'", "") for s in steps]  # the shell strips the quotes the README has
