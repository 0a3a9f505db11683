"""The gpu-orthol1 command: run (random or .npy input, --grad-out), info, and errors."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import gpu_orthol1 as ol1
from gpu_orthol1 import cli
from gpu_orthol1._backends import BackendList
from gpu_orthol1.bench import command

from .reference import check, random_phi


def test_run_on_file_writes_the_gradient(tmp_path, rng, capsys):
    phi = random_phi(rng, (9, 4, 5), np.float64)
    np.save(tmp_path / "phi.npy", phi)
    rc = cli.main(
        [
            "run",
            str(tmp_path / "phi.npy"),
            "--beta",
            "0.25",
            "--backend",
            "numpy",
            "--grad-out",
            str(tmp_path / "g.npy"),
            "--repeat",
            "1",
        ]
    )
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
    assert re.search(r"^\s+cupy\s+(available|missing\s+\S|unusable\s+\S)", out, re.M)
    if "cupy" not in ol1.available_backends():  # here: "missing" only where CuPy is not installed at all
        state = "unusable" if cli._installed("cupy") else "missing"
        assert re.search(rf"^\s+cupy\s+{state}\s+\S", out, re.M), out


def test_info_says_unusable_and_why_when_cupy_is_installed_but_cannot_run(capsys, monkeypatch):
    why = (
        "cupy is installed but finds no usable CUDA driver or device: cudaErrorInsufficientDriver: "
        "CUDA driver version is insufficient\n  for CUDA runtime version"
    )
    monkeypatch.setattr(ol1, "available_backends", lambda: BackendList(["numpy"], {"cupy": why}))
    monkeypatch.setattr(cli, "_installed", lambda module: True)
    assert cli.main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] == ["cupy"])
    assert line.split()[1] == "unusable"
    assert line.endswith(
        "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"
    )
    monkeypatch.setattr(cli, "_installed", lambda module: False)
    assert cli.main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] == ["cupy"])
    assert line.split()[1] == "missing"


def test_run_help_explains_axis_and_beta_with_their_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal width
    text = text[text.rindex("--shape SHAPE") :]  # the option list, after the usage line
    axis = text[text.index("--axis AXIS") : text.index("--beta BETA")]
    beta = text[text.index("--beta BETA") : text.index("--dtype")]
    assert "axis" in axis[len("--axis AXIS") :] and "(default: 1)" in axis
    assert "weight" in beta and "(default: 0.001)" in beta
    for opt, default in (
        ("--backend", "auto"),
        ("--precision", "highest"),
        ("--repeat", "3"),
        ("--seed", "0"),
    ):
        assert f"(default: {default}" in text[text.index(opt + " ") :], opt


def test_shapes_take_both_separators_in_run_and_bench(capsys):
    assert cli.main(["run", "--shape", "3x7x5", "--axis", "0", "--backend", "numpy", "--repeat", "0"]) == 0
    assert "m=3 slices of 7 x 5" in capsys.readouterr().out
    assert cli.main(["run", "--shape", "6X4", "--repeat", "0", "--backend", "numpy"]) == 0
    assert "random (6, 4)" in capsys.readouterr().out
    want = [(40, 6, 8), (17, 3, 5)]
    for text in ("40x6x8,17x3x5", "40,6,8;17,3,5", "40,6,8 17,3,5", "40X6X8;17,3,5"):
        assert command._parse_shapes(text) == want, text
    assert command._parse_shapes("64,8,16") == [(64, 8, 16)]
    assert command._parse_sweep("24,4:2,5") == command._parse_sweep("24x4:2,5") == ((24, 4), (2, 5))


def test_a_shape_that_mixes_separators_is_a_clear_error():
    rc, err, out = _cli("run", "--shape", "3,7x5")
    assert rc == 2 and "Traceback" not in err and "4096,32,128 or 4096x32x128" in err.strip().splitlines()[-1]
    rc, err, out = _cli("bench", "--device", "cpu", "--shapes", "40x6,8")
    assert rc == 2 and "Traceback" not in err and "is not LxMxN (or L,M,N)" in err.strip().splitlines()[-1]


def test_bad_input_exits_2_with_message(tmp_path, capsys):
    np.save(tmp_path / "ints.npy", np.arange(24).reshape(2, 3, 4))
    assert cli.main(["run", str(tmp_path / "ints.npy")]) == 2
    assert "float16, float32 or float64" in capsys.readouterr().err


def test_console_script_is_installed():
    r = subprocess.run(
        [sys.executable, "-m", "gpu_orthol1.cli", "run", "--shape", "5,2,3", "--repeat", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "loss" in r.stdout


# ---------------------------------------------------------------- user mistakes: one line, exit status 2


def _cli(*args, cwd=None):
    """`gpu-orthol1 ARGS` as a user runs it: (exit status, stderr, stdout)."""
    r = subprocess.run(
        [sys.executable, "-m", "gpu_orthol1.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    return r.returncode, r.stderr, r.stdout


def _one_line_error(*args, cwd=None) -> str:
    rc, err, out = _cli(*args, cwd=cwd)
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-orthol1: error: "), err
    assert out == ""  # nothing was computed or reported as done
    return lines[0][len("gpu-orthol1: error: ") :]


def _api_message(phi, **kw) -> str:
    try:
        ol1.loss_and_grad(phi, **kw)
    except ValueError as e:
        return str(e)
    raise AssertionError("the API accepted it")


def test_axis_out_of_range_is_the_api_message(tmp_path):
    want = _api_message(np.zeros((2, 3, 4), np.float32), axis=5)
    assert want == "axis 5 is out of range for a 3-D phi"
    assert _one_line_error("run", "--axis", "5") == want
    assert _one_line_error("run", "--shape", "3,4,5", "--axis", "-4") == _api_message(
        np.zeros((2, 3, 4), np.float32), axis=-4
    )
    np.save(tmp_path / "phi.npy", np.zeros((4, 3, 2)))
    assert (
        _one_line_error("run", tmp_path / "phi.npy", "--axis", "3") == "axis 3 is out of range for a 3-D phi"
    )


def test_files_that_hold_the_wrong_thing_say_what_they_hold(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros(5))
    np.save(tmp_path / "four.npy", np.zeros((2, 2, 2, 2), np.float32))
    np.savez(tmp_path / "two.npz", a=np.zeros((3, 2)), b=np.ones(2))
    (tmp_path / "phi.txt").write_text("1 2 3\n4 5 6\n")
    np.save(tmp_path / "obj.npy", np.array([1.0, "a"], dtype=object), allow_pickle=True)
    np.save(tmp_path / "ints.npy", np.arange(24).reshape(2, 3, 4))
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((6, 3, 4)))
    (tmp_path / "cut.npy").write_bytes(good.read_bytes()[:200])

    msg = _one_line_error("run", tmp_path / "one.npy")
    assert (
        "holds a 1-D float64 array of shape (5,)" in msg and "expected a 2-D (l, n) or 3-D (l, m, n)" in msg
    )
    msg = _one_line_error("run", tmp_path / "four.npy")
    assert "holds a 4-D float32 array of shape (2, 2, 2, 2)" in msg and "expected a 2-D" in msg
    msg = _one_line_error("run", tmp_path / "two.npz")
    assert ".npz archive (arrays: a, b)" in msg and "expected a .npy file" in msg
    msg = _one_line_error("run", tmp_path / "phi.txt")
    assert "is not a .npy file" in msg and "expected a .npy file" in msg and "pickle" not in msg
    msg = _one_line_error("run", tmp_path / "obj.npy")
    assert "holds a 1-D object array" in msg and "allow_pickle" not in msg
    msg = _one_line_error("run", tmp_path / "ints.npy")
    assert "holds a 3-D int64 array of shape (2, 3, 4)" in msg and "float16, float32 or float64" in msg
    assert "cannot read its data" in _one_line_error("run", tmp_path / "cut.npy")
    assert _one_line_error("run", tmp_path / "missing.npy").endswith("missing.npy: no such file")
    assert "is a directory" in _one_line_error("run", tmp_path)
    assert "--shape" in _one_line_error("run", good, "--shape", "1,2,3")


def test_dtype_converts_a_file_it_can(tmp_path):
    np.save(tmp_path / "ints.npy", np.arange(24).reshape(2, 3, 4))
    rc, err, out = _cli(
        "run", tmp_path / "ints.npy", "--dtype", "float64", "--repeat", "0", "--backend", "numpy"
    )
    assert rc == 0, err
    assert "dtype float64" in out


def test_grad_out_names_the_file_it_wrote(tmp_path):
    rc, err, out = _cli(
        "run", "--shape", "5,2,3", "--repeat", "0", "--backend", "numpy", "--grad-out", "gout", cwd=tmp_path
    )
    assert rc == 0, err
    assert "gradient  written to gout.npy" in out
    assert (tmp_path / "gout.npy").exists() and not (tmp_path / "gout").exists()
    assert np.load(tmp_path / "gout.npy").shape == (5, 2, 3)


def test_unwritable_grad_out_is_found_before_computing(tmp_path, monkeypatch, capsys):
    msg = _one_line_error("run", "--shape", "5,2,3", "--grad-out", tmp_path / "no" / "dir" / "g")
    assert "g.npy" in msg and "does not exist" in msg
    (tmp_path / "d.npy").mkdir()
    assert "is a directory" in _one_line_error("run", "--shape", "5,2,3", "--grad-out", tmp_path / "d.npy")
    assert "is a directory" in _one_line_error("run", "--shape", "5,2,3", "--grad-out", tmp_path / "d")

    def must_not_run(*a, **k):
        raise AssertionError("computed before checking --grad-out")

    monkeypatch.setattr(ol1, "loss_and_grad", must_not_run)
    assert cli.main(["run", "--shape", "5,2,3", "--grad-out", str(tmp_path / "no" / "g.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
