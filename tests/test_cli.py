"""The gpu-orthol1 command: run (random or .npy input, --grad-out), info, and errors."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np

import gpu_orthol1 as ol1
from gpu_orthol1 import cli

from .reference import check, random_phi


def test_run_on_file_writes_the_gradient(tmp_path, rng, capsys):
    phi = random_phi(rng, (9, 4, 5), np.float64)
    np.save(tmp_path / "phi.npy", phi)
    rc = cli.main(["run", str(tmp_path / "phi.npy"), "--beta", "0.25", "--backend", "numpy",
                   "--grad-out", str(tmp_path / "g.npy"), "--repeat", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    loss = float(re.search(r"^loss\s+(\S+)", out, re.M).group(1))
    g = np.load(tmp_path / "g.npy")
    check(phi, ol1.loss(phi, 0.25), g, 0.25)
    assert abs(loss - float(ol1.loss(phi, 0.25))) <= 1e-8 * abs(loss)  # printed with 9 digits
    gnorm = float(re.search(r"^grad norm\s+(\S+)", out, re.M).group(1))
    assert abs(gnorm - np.linalg.norm(g)) <= 1e-6 * np.linalg.norm(g)
    assert "backend   numpy on" in out and "m=4 slices of 9 x 5" in out


def test_run_random_axis0_and_2d(capsys):
    assert cli.main(["run", "--shape", "3,7,5", "--axis", "0", "--backend", "numpy", "--repeat", "0"]) == 0
    assert "m=3 slices of 7 x 5" in capsys.readouterr().out
    assert cli.main(["run", "--shape", "6,4", "--dtype", "float16", "--repeat", "0"]) == 0
    assert "dtype float16" in capsys.readouterr().out


def test_info_lists_both_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+numpy\s+available", out, re.M)
    assert re.search(r"^\s+cupy\s+(available|missing\s+\S)", out, re.M)


def test_bad_input_exits_2_with_message(tmp_path, capsys):
    np.save(tmp_path / "ints.npy", np.arange(24).reshape(2, 3, 4))
    assert cli.main(["run", str(tmp_path / "ints.npy")]) == 2
    assert "float16, float32 or float64" in capsys.readouterr().err


def test_console_script_is_installed():
    r = subprocess.run([sys.executable, "-m", "gpu_orthol1.cli", "run", "--shape", "5,2,3", "--repeat", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "loss" in r.stdout
