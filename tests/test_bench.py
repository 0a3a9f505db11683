"""`gpu-orthol1 bench` (gpu_orthol1/bench/): its correctness gate, its flags for disturbed timings,
bench/summarize.py, and the command on tiny shapes.

Timings are never asserted here (team rule): only that the command checks every
method, produces well-formed rows, reports wrong methods as wrong, and skips
missing peers with a note.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys

import numpy as np
import pytest

from gpu_orthol1.bench import base, command, flags, methods, report, runner
from gpu_orthol1.reference import TOL, Reference, random_phi


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_check_accepts_right_and_rejects_wrong(dtype, rng):
    import gpu_orthol1 as ol1

    phi = random_phi(rng, (40, 6, 8), dtype)
    ref = Reference.build(phi, 0.5)
    loss, grad = ol1.loss_and_grad(phi, 0.5, backend="numpy")
    ok = ref.check(loss, grad, np.dtype(dtype).name)
    assert ok.ok, ok.why
    assert ok.compared > 0.5
    bad_loss = ref.check(loss * (1 + 1e-3), grad, np.dtype(dtype).name)
    assert not bad_loss.ok and "loss" in bad_loss.why
    wrong = grad.copy()
    wrong[3, 2, :] = -wrong[3, 2, :]  # one row of one slice with the sign flipped
    bad_grad = ref.check(loss, wrong, np.dtype(dtype).name)
    assert not bad_grad.ok and "gradient" in bad_grad.why
    assert not ref.check(np.nan, grad, np.dtype(dtype).name).ok


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_reference_shape_slices_run_with_default_arguments(dtype, rng):
    """Regression: the 4 MiB default CPU workspace refused float16 slices of l=4096, n=128 (the first
    reference shape), which the bench found. Two slices of that shape, default workspace."""
    import gpu_orthol1 as ol1

    phi = random_phi(rng, (4096, 2, 128), dtype)
    loss, grad = ol1.loss_and_grad(phi, 0.5, backend="numpy")
    res = Reference.build(phi, 0.5).check(loss, grad, np.dtype(dtype).name)
    assert res.ok, res.why


def _run(tmp_path, *args):
    csv_p, json_p, png_p = tmp_path / "r.csv", tmp_path / "r.json", tmp_path / "r.png"
    rc = command.main(
        [
            "--device",
            "cpu",
            "--no-progress",
            "--csv",
            str(csv_p),
            "--json",
            str(json_p),
            "--plot",
            str(png_p),
            *args,
        ]
    )
    doc = json.loads(json_p.read_text())
    with open(csv_p) as f:
        rows = list(csv.DictReader(f))
    return rc, doc, rows, png_p


TINY = ["--shapes", "40x6x8,17x3x5", "--sweep-m", "24x4:2,5", "--sweep-n", "30x3:3,6", "--runs", "5"]


@pytest.mark.long
def test_bench_command_cpu_smoke(tmp_path, capsys):
    rc, doc, rows, png = _run(
        tmp_path,
        *TINY,
        "--dtypes",
        "float32,float64",
        "--methods",
        "gpu_orthol1,numpy-naive,torch-eager,jax-jit",
    )
    out = capsys.readouterr().out
    assert rc == 0
    have = {r["method"] for r in rows}
    assert {"gpu_orthol1[numpy]", "numpy-naive", "limit-blas"} <= have
    if importlib.util.find_spec("jax") is not None:  # the test extra has it: the row next to jax-jit
        assert {"jax-jit", "gpu_orthol1.jax"} <= have
    assert "torch-compile" not in have
    # every (shape, dtype) of the reference set and every sweep point, for each method that ran
    cases = {(r["shape"], r["dtype"], r["sweep"]) for r in rows}
    want = {(s, d, "ref") for s in ("40x6x8", "17x3x5") for d in ("float32", "float64")}
    want |= {
        ("24x2x4", "float32", "m"),
        ("24x5x4", "float32", "m"),
        ("30x3x3", "float32", "n"),
        ("30x3x6", "float32", "n"),
    }
    assert cases == want
    for r in rows:
        assert r["status"] == "ok", r
        assert int(r["runs"]) >= 5
        p20, p50, p80 = float(r["p20_ms"]), float(r["p50_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= p50 <= p80
        assert float(r["peak_mb"]) >= 0 and r["peak_how"] in ("rss-hwm", "tracemalloc")
        assert r["device"] == "cpu" and r["device_name"] and r["timestamp"] and r["v_numpy"] == np.__version__
        assert float(r["ratio_limit"]) > 0 and float(r["limit_blas_ms"]) > 0
        if r["family"] != "limit":  # checked against the float64 reference before it was timed
            assert r["loss_err"] != "" and float(r["loss_err"]) <= TOL[r["dtype"]]["loss"]
    ours = [r for r in rows if r["method"] == "gpu_orthol1[numpy]"]
    assert ours and all(float(r["ours_speedup"]) == 1.0 for r in ours)
    assert doc["rows"] and doc["versions"]["gpu_orthol1"] and "cpu" in doc["devices"]
    assert set(doc["cpu_detail"]) == {"family", "model", "stepping", "isa", "l2_bytes", "blas"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gpu_orthol1[numpy]" in out and "| device | shape" in out


def test_bench_command_cpu_bfloat16(tmp_path, capsys, monkeypatch):
    """bfloat16 rows (ml_dtypes inputs): every method that takes it checked against the float64
    reference with its tolerance class, then timed; a method without bfloat16 skipped with one note;
    the JSON goes through bench/summarize.py."""
    pytest.importorskip("ml_dtypes")
    real = methods.all_methods

    def with_a_float32_only_peer():
        good = next(m for m in real() if m.name == "numpy-naive")
        only32 = base.Method(
            "f32-peer",
            "peer",
            "cpu",
            "numpy",
            "highest",
            good.prepare,
            lambda: (True, ""),
            ("float32",),
            {"bfloat16": "it has no bfloat16"},
        )
        return [*real(), only32]

    monkeypatch.setattr(methods, "all_methods", with_a_float32_only_peer)
    rc, doc, rows, _ = _run(
        tmp_path,
        "--shapes",
        "33x5x7",
        "--sweep-m",
        "none",
        "--sweep-n",
        "none",
        "--runs",
        "5",
        "--dtypes",
        "bfloat16",
        "--methods",
        "gpu_orthol1,numpy-naive,torch-eager,jax-jit,f32-peer",
    )
    err = capsys.readouterr().err
    assert rc == 0
    by = {r["method"]: r for r in rows}
    want = {"gpu_orthol1[numpy]", "numpy-naive", "torch-eager", "limit-blas"}
    if importlib.util.find_spec("jax") is not None:
        want |= {"jax-jit", "gpu_orthol1.jax"}
    assert want <= set(by) and "f32-peer" not in by
    all_ms = {m.name: m for m in real()}
    for r in rows:
        assert r["dtype"] == "bfloat16" and r["status"] == "ok", r
        assert 0 < float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        if r["family"] != "limit":
            tol = TOL[all_ms[r["method"]].tol_class("bfloat16")]
            assert float(r["loss_err"]) <= tol["loss"] and float(r["grad_err"]) <= tol["grad"], r
            assert float(r["ratio_blas"]) > 0  # limit-blas takes bfloat16 on the CPU (the core's chunks)
    # ours within the bfloat16 class: the loss as float32's, the gradient rounded once
    assert float(by["gpu_orthol1[numpy]"]["loss_err"]) <= TOL["bfloat16"]["loss"]
    skipped = [
        ln for ln in err.splitlines() if "skipped f32-peer on cpu for bfloat16: it has no bfloat16" in ln
    ]
    assert len(skipped) == 1 and any("f32-peer" in n for n in doc["notes"])
    # the report and bench/summarize.py over bfloat16 rows
    hl = report.headline(doc["rows"])
    assert [h["dtype"] for h in hl] == ["bfloat16"] and hl[0]["method"] == "gpu_orthol1[numpy]"
    res = tmp_path / "results"
    res.mkdir()
    (res / "cpu-bf16.json").write_text((tmp_path / "r.json").read_text())
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "bench" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    assert summarize.main([str(res)]) == 0
    page = (res / "README.md").read_text()
    assert "| 33x5x7 | bfloat16 |" in page


def test_bfloat16_methods_and_tolerance_classes():
    ms = {m.name: m for m in methods.all_methods()}
    lim = ms["limit-cublas-bf16"]
    assert (lim.family, lim.device, lim.precision, lim.dtypes) == ("limit", "gpu", "highest", ("bfloat16",))
    assert "bfloat16" not in ms["limit-cublas"].dtypes and "bfloat16" in ms["limit-blas"].dtypes
    for name in ("gpu_orthol1[numpy]", "gpu_orthol1[cupy]", "gpu_orthol1.jax"):
        assert ms[name].tol_class("bfloat16") == "bfloat16"
    for name in ("numpy-naive", "torch-eager", "torch-compile", "jax-jit"):
        assert "bfloat16" in ms[name].dtypes and ms[name].tol_class("bfloat16") == "lowp-bf16"
        assert ms[name].tol_class("float16") == "lowp"
    assert "bfloat16" not in ms["cupy-naive"].dtypes and "bfloat16" in ms["cupy-naive"].no_dtype
    assert "bfloat16" not in ms["gpu_orthol1[cupy,tf32]"].dtypes


@pytest.mark.cudasim
def test_limit_cublas_bf16_argument_sets_emulated(monkeypatch, rng):
    """limit-cublas-bf16's two GEMMs as the emulator executes the GPU device's argument sets: int16
    carriers read as CUDA_R_16BF, the Gram in float32, S holding bfloat16 bit patterns of the signs."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from gpu_orthol1 import _cupy
    from gpu_orthol1.testing import EmulatedGpuDevice

    bf16 = np.dtype(ml_dtypes.bfloat16)
    devs = []
    monkeypatch.setattr(_cupy, "CupyDevice", lambda precision: devs.append(EmulatedGpuDevice()) or devs[-1])
    monkeypatch.setattr(base, "cupy_module", lambda: np)
    monkeypatch.setattr(methods, "cupy_module", lambda: np)
    case = runner.make_case(rng, (13, 4, 6), "bfloat16", "ref", cache=0)
    assert case.dtype == bf16 and case.host[0].dtype == bf16
    prep = methods._limit("gpu", "highest", bf16=True).prepare(case)
    out = prep.call(0)
    A, G, S = prep.keep
    assert A[0].dtype == np.int16 and G.dtype == np.float32 and S.dtype == np.int16 and out.dtype == np.int16
    P = case.host[0].astype(np.float64).transpose(1, 0, 2)  # (m, l, n)
    Sv = S.view(bf16).astype(np.float64).reshape(4, 6, 6)
    assert set(np.unique(Sv)) <= {-1.0, 0.0, 1.0} and np.abs(Sv).sum() > 0
    np.testing.assert_allclose(G.reshape(4, 6, 6), P.transpose(0, 2, 1) @ P, rtol=1e-6, atol=1e-6)
    want = P @ Sv
    got = out.view(bf16).astype(np.float64)
    assert np.all(np.abs(got - want) <= 2**-8 * (np.abs(P) @ np.abs(Sv)) + 1e-30)
    assert [k for k, _ in devs[0].gemm_calls] == ["strided", "strided"]


def test_missing_peers_are_skipped_with_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.setitem(sys.modules, "jax", None)
    rc, doc, rows, _ = _run(
        tmp_path,
        "--shapes",
        "20x3x4",
        "--sweep-m",
        "none",
        "--sweep-n",
        "none",
        "--dtypes",
        "float32",
        "--methods",
        "gpu_orthol1,torch,jax",
    )
    err = capsys.readouterr().err
    assert rc == 0
    assert {r["method"] for r in rows} == {"gpu_orthol1[numpy]", "limit-blas"}
    for name in ("torch-eager", "torch-compile", "jax-jit"):
        line = [ln for ln in err.splitlines() if f"skipped {name} on cpu" in ln]
        assert len(line) == 1 and "not installed" in line[0]
        assert any(f"skipped {name} on cpu" in n for n in doc["notes"])


def test_wrong_method_is_reported_not_timed(tmp_path, monkeypatch):
    real = methods.all_methods

    def with_a_wrong_one():
        ms = real()
        good = next(m for m in ms if m.name == "numpy-naive")

        def prepare(case):
            p = good.prepare(case)
            p.result = lambda r: (r[0], r[1] * 1.01)  # 1% off: must fail the float32 gradient check
            return p

        wrong = base.Method("wrong-peer", "peer", "cpu", "numpy", "highest", prepare, lambda: (True, ""))
        return [*ms, wrong]

    monkeypatch.setattr(methods, "all_methods", with_a_wrong_one)
    rc, _doc, rows, _ = _run(
        tmp_path,
        "--shapes",
        "30x4x6",
        "--sweep-m",
        "none",
        "--sweep-n",
        "none",
        "--dtypes",
        "float32",
        "--methods",
        "gpu_orthol1,wrong",
    )
    assert rc == 0  # a wrong peer is a finding, not a failure of the command
    w = [r for r in rows if r["method"] == "wrong-peer"]
    assert len(w) == 1 and w[0]["status"] == "wrong" and "gradient" in w[0]["note"]
    assert w[0]["p50_ms"] == "" and w[0]["runs"] == "0"


def test_crossover_flops_picks_the_start_of_the_gpu_winning_tail():
    def rows(pairs):
        out = []
        for g, (t_np, t_cp) in pairs.items():
            out += [
                {"status": "ok", "gflops": g, "backend": "numpy", "p50_ms": t_np},
                {"status": "ok", "gflops": g, "backend": "cupy", "p50_ms": t_cp},
            ]
        return out

    # the GPU wins at 0.1 by noise, loses at 1, then wins from 10 on
    assert report.crossover_flops(rows({0.1: (1, 0.5), 1.0: (2, 3), 10.0: (20, 5), 100.0: (200, 9)})) == 10e9
    assert report.crossover_flops(rows({1.0: (1, 2), 10.0: (2, 3)})) is None


def _usage_error(capsys, monkeypatch, *argv) -> str:
    """Run `gpu-orthol1 bench ARGV`, which must stop with status 2 before measuring anything."""

    def no_run(self):
        raise AssertionError("the bench started measuring before reporting a usage error")

    monkeypatch.setattr(runner.Bench, "run", no_run)
    with pytest.raises(SystemExit) as e:
        command.main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("gpu-orthol1 bench: error: ")
    return err.strip().splitlines()[-1]


def test_bad_arguments_are_clear_errors(capsys, monkeypatch):
    assert "LxMxN" in _usage_error(capsys, monkeypatch, "--shapes", "4x4")
    assert "at least 5" in _usage_error(capsys, monkeypatch, "--device", "cpu", "--runs", "3")
    assert "unknown dtype" in _usage_error(capsys, monkeypatch, "--device", "cpu", "--dtypes", "float8")
    assert "matches no method" in _usage_error(capsys, monkeypatch, "--device", "cpu", "--methods", "nosuch")


def test_unusable_outputs_are_found_before_the_bench_runs(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no" / "such" / "dir"
    for opt in ("--csv", "--json", "--plot"):
        msg = _usage_error(capsys, monkeypatch, "--device", "cpu", opt, str(missing / "r.out"))
        assert opt in msg and "does not exist" in msg
    assert "is a directory" in _usage_error(capsys, monkeypatch, "--device", "cpu", "--json", str(tmp_path))
    assert "same file" in _usage_error(
        capsys, monkeypatch, "--device", "cpu", "--csv", str(tmp_path / "r"), "--json", str(tmp_path / "r")
    )
    assert ".xyz" in _usage_error(capsys, monkeypatch, "--device", "cpu", "--plot", str(tmp_path / "r.xyz"))


def test_plot_without_matplotlib_is_refused_up_front(tmp_path, capsys, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    msg = _usage_error(capsys, monkeypatch, "--device", "cpu", "--plot", str(tmp_path / "r.png"))
    assert "--plot needs matplotlib" in msg and "leave --plot out" in msg


def test_usage_errors_leave_no_traceback(tmp_path):
    """The same through the console entry point, as a user sees it."""
    import subprocess

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpu_orthol1.cli",
            "bench",
            "--device",
            "cpu",
            "--csv",
            str(tmp_path / "missing" / "r.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "does not exist" in r.stderr.strip().splitlines()[-1]
    assert r.stdout == ""


# ---------------------------------------------------------------- flags for disturbed measurements


def _row(
    method,
    family,
    p20,
    p50,
    p80,
    *,
    limit_ms=None,
    shape="64x8x16",
    dtype="float32",
    sweep="ref",
    precision="highest",
    load="0.50 0.40 0.30",
    device="cpu",
):
    r = {k: "" for k in base.RESULT_FIELDS}
    r.update(
        method=method,
        family=family,
        device=device,
        device_name="Test CPU (2 CPUs)",
        precision=precision,
        sweep=sweep,
        shape=shape,
        dtype=dtype,
        status="ok",
        runs=5,
        p20_ms=p20,
        p50_ms=p50,
        p80_ms=p80,
        loadavg=load,
        timestamp="2026-01-01T00:00:00+00:00",
    )
    if limit_ms:
        r.update(limit_blas_ms=limit_ms, ratio_blas=p50 / limit_ms, ratio_limit=p50 / limit_ms)
    return r


def _case(ours_p50=10.0, limit=(9.8, 10.0, 10.2), peer=(19.0, 20.0, 21.0), **kw):
    lim = _row("limit-blas", "limit", *limit, limit_ms=limit[1], **kw)
    ours = _row(
        "gpu_orthol1[numpy]", "ours", ours_p50 * 0.99, ours_p50, ours_p50 * 1.01, limit_ms=limit[1], **kw
    )
    pr = _row("torch-eager", "peer", *peer, limit_ms=limit[1], **kw)
    ours["ours_speedup"], pr["ours_speedup"] = 1.0, peer[1] / ours_p50
    return [ours, pr, lim]


def test_clean_rows_are_not_flagged():
    rows = flags.flag_rows(_case(), cpu_count=2)
    assert [r["flags"] for r in rows] == ["", "", ""]
    h = report.headline(rows)[0]
    assert h["flags"] == {}
    md = report.headline_markdown(rows)
    assert "?" not in md and "| 10.00 | 1.00 |" in md


@pytest.mark.parametrize(
    "ratio, flagged", [(0.74, True), (0.5, True), (0.39, True), (0.75, False), (1.03, False)]
)
def test_a_method_below_the_floor_flags_the_row(ratio, flagged):
    rows = flags.flag_rows(_case(ours_p50=10.0 * ratio), cpu_count=2)
    ours = rows[0]
    assert bool(ours["flags"]) == flagged
    if flagged:
        assert f"{ratio:.2f}x the BLAS limit < 0.75" in ours["flags"]
        md = report.headline_markdown(rows)
        assert f"{10.0 * ratio:.2f}?" in md and f"{ratio:.2f}?" in md  # the time and the ratio are marked
        assert "vs torch-eager" in md.splitlines()[-1]  # a speedup over a peer needs our time too
    assert rows[2]["flags"] == ""  # the limit's ratio to itself is 1


def test_the_floor_applies_to_peers_but_not_to_limits():
    rows = flags.flag_rows(_case(peer=(5.0, 5.0, 5.0)), cpu_count=2)
    assert rows[0]["flags"] == "" and "BLAS limit <" in rows[1]["flags"]
    h = report.headline(rows)[0]
    assert set(h["flags"]) == {"torch-eager"}


@pytest.mark.parametrize("p20, p80, flagged", [(10.0, 12.5, False), (10.0, 12.6, True), (8.0, 15.0, True)])
def test_wide_spread_flags_the_row(p20, p80, flagged):
    rows = _case()
    rows[1].update(p20_ms=p20, p80_ms=p80)
    flags.flag_rows(rows, cpu_count=2)
    assert ("spread p80/p20" in rows[1]["flags"]) == flagged
    assert rows[0]["flags"] == ""


def test_a_disturbed_limit_flags_the_ratios_that_use_it():
    rows = flags.flag_rows(_case(limit=(9.0, 10.0, 13.0)), cpu_count=2)
    ours, peer, lim = rows
    assert "spread" in lim["flags"]
    assert ours["flags"].startswith("limit spread")
    h = report.headline(rows)[0]
    assert set(h["flags"]) == {"x_limit"}  # our time and the peer ratio do not depend on the limit


def test_load_above_the_cpu_count_flags_rows_and_runs():
    rows = _case(load="2.50 1.00 1.00")
    flags.flag_rows(rows, cpu_count=2)
    assert all("load 2.50 > 2 CPUs" in r["flags"] for r in rows)
    assert flags.flag_rows(_case(load="2.50 1.00 1.00"), cpu_count=4)[0]["flags"] == ""
    # a run that started loaded: every row, however quiet later
    rows = _case(load="1.00 1.00 1.00")
    flags.flag_rows(rows, cpu_count=2, start_load="3.10 2.00 1.00")
    assert all("run started at load 3.10 > 2 CPUs" in r["flags"] for r in rows)
    assert flags.run_flags(rows, 2, "1.90 1.00 1.00") == []
    # unknown CPU count: a start at load <= 1 passes whatever the count, above 1 is unknown, so flagged
    assert flags.run_flags(rows, None, "0.91 0.32 0.12") == []
    assert flags.run_flags(rows, None, "1.38 0.44 0.16") != []
    assert flags.flag_rows(_case(load="4.85 1.00 1.00"), cpu_count=None, start_load="0.5")[0]["flags"] == ""


def test_cpu_count_is_read_from_the_results():
    assert flags.cpu_count_of({"cpu_count": 16, "devices": {"gpu": "NVIDIA H200"}}) == 16
    assert flags.cpu_count_of({"devices": {"cpu": "AMD EPYC (2 CPUs)"}}) == 2
    assert flags.cpu_count_of({"devices": {"gpu": "NVIDIA H200"}}) is None


def test_failed_rows_are_not_flagged():
    rows = _case()
    rows[1].update(status="wrong", p20_ms="", p50_ms="", p80_ms="", ratio_blas="", note="gradient off")
    flags.flag_rows(rows, cpu_count=2)
    assert rows[1]["flags"] == ""
    assert "| wrong |" in report.headline_markdown(rows)


# ---------------------------------------------------------------- the CPU promise: slow points


def _sweep_point(
    ours_ms,
    limit_ms=10.0,
    naive_ms=20.0,
    *,
    shape="512x1024x64",
    sweep="m",
    device="cpu",
    precision="highest",
):
    """gpu_orthol1, numpy-naive and the limit on one sweep point, as the runner leaves them."""
    kw = dict(shape=shape, sweep=sweep, device=device)
    lim = _row("limit-blas", "limit", limit_ms, limit_ms, limit_ms, limit_ms=limit_ms, **kw)
    ours = _row(
        "gpu_orthol1[numpy]", "ours", ours_ms, ours_ms, ours_ms, limit_ms=limit_ms, precision=precision, **kw
    )
    naive = _row("numpy-naive", "peer", naive_ms, naive_ms, naive_ms, limit_ms=limit_ms, **kw)
    return [ours, naive, lim]


@pytest.mark.parametrize(
    "ours_ms, naive_ms, want",
    [
        (10.0, 20.0, []),
        (11.0, 20.0, []),  # 1.10x the limit exactly keeps the promise
        (11.2, 20.0, ["1.12x the BLAS limit > 1.1"]),
        (10.5, 10.0, ["slower than numpy-naive (10.5 > 10 ms)"]),
        # the (512, 1024, 64) point: 198 ms against a 154 ms limit, naive NumPy 168 ms
        (
            198 / 154 * 10,
            168 / 154 * 10,
            ["1.29x the BLAS limit > 1.1", "slower than numpy-naive (12.86 > 10.91 ms)"],
        ),
    ],
)
def test_slow_points_are_marked(ours_ms, naive_ms, want):
    rows = flags.slow_rows(_sweep_point(ours_ms, naive_ms=naive_ms))
    assert flags.split_flags(rows[0]["slow"]) == want
    assert rows[1]["slow"] == "" and rows[2]["slow"] == ""  # a peer or a limit promises nothing
    line = next(ln for ln in report.table(rows, sweeps=("m",)).splitlines() if ln.startswith("gpu_orthol1"))
    assert ("SLOW: " + "; ".join(want) in line) if want else "SLOW" not in line


def test_slow_is_the_cpu_promise_only():
    # a GPU row or a TF32 row far above the limit is not judged by the CPU promise
    for kw in ({"device": "gpu"}, {"precision": "tf32"}):
        assert flags.slow_rows(_sweep_point(30.0, naive_ms=5.0, **kw))[0]["slow"] == ""
    # naive NumPy is compared on the same point only, never on another shape or sweep
    rows = (
        _sweep_point(10.0, naive_ms=20.0)
        + _sweep_point(10.0, naive_ms=5.0, shape="1024x16x32", sweep="n")[1:]
    )
    assert flags.slow_rows(rows)[0]["slow"] == ""
    # without a naive row (--methods left it out) only the limit is checked
    ours, _naive, lim = _sweep_point(10.5, naive_ms=1.0)
    assert flags.slow_rows([ours, lim])[0]["slow"] == ""
    # a row that failed its check has no time to judge
    ours, naive, lim = _sweep_point(30.0)
    ours.update(status="wrong", p50_ms="", ratio_blas="")
    assert flags.slow_rows([ours, naive, lim])[0]["slow"] == ""


def test_slow_points_reach_the_json_and_csv(tmp_path):
    """The field is in every row the command writes (its value depends on the timings: not asserted)."""
    rc, doc, rows, _ = _run(
        tmp_path,
        "--shapes",
        "20x3x4",
        "--sweep-m",
        "16x4:2",
        "--sweep-n",
        "16x2:3",
        "--dtypes",
        "float32",
        "--methods",
        "gpu_orthol1,numpy-naive",
    )
    assert rc == 0
    for r in [*rows, *doc["rows"]]:
        assert "slow" in r
        if r["family"] != "ours":
            assert r["slow"] == ""


def test_summarize_marks_flagged_values_and_lists_disturbed_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "summarize", Path(__file__).resolve().parent.parent / "bench" / "summarize.py"
    )
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)

    def doc(rows, **kw):
        return {
            "command": "gpu-orthol1 bench --quick",
            "devices": {"cpu": "Test CPU (2 CPUs)"},
            "versions": {"gpu_orthol1": "0"},
            "host": "h",
            "loadavg_end": "0.5 0.5 0.5",
            "notes": [],
            "rows": rows,
            **kw,
        }

    clean = _case(shape="64x8x16")
    below = _case(ours_p50=3.9, shape="128x8x16")
    (tmp_path / "quiet.json").write_text(json.dumps(doc(clean + below)))
    (tmp_path / "disturbed").mkdir()
    (tmp_path / "disturbed" / "busy.json").write_text(json.dumps(doc(_case(), loadavg_start="3.5 3 3")))
    (tmp_path / "disturbed" / "busy.why").write_text("Moved here: other jobs ran.\n")
    assert summarize.main([str(tmp_path)]) == 0
    md = (tmp_path / "README.md").read_text()
    line = {ln.split(" | ")[1]: ln for ln in md.splitlines() if ln.startswith("| Test CPU")}
    assert "?" not in line["64x8x16"]
    assert "| 3.90? | 0.39? |" in line["128x8x16"] and "0.39x the BLAS limit < 0.75" in line["128x8x16"]
    assert "1 of 6 timed rows flagged (below the floor: 1)" in md
    assert "`disturbed/busy`" in md and "run started at load" not in md.split("## Disturbed")[0]
    assert "Moved here: other jobs ran." in md and "3 of 3 timed rows flagged (load: 3)" in md
    assert "## Re-running" in md and "cpu.png" not in md.split("## Re-running")[0]


@pytest.mark.gpu
def test_bench_command_gpu_smoke(tmp_path):
    """The GPU half on tiny shapes (torch.compile left out: its compile time belongs to the bench step)."""
    csv_p = tmp_path / "g.csv"
    rc = command.main(
        [
            "--device",
            "gpu",
            "--no-progress",
            "--quick",
            "--csv",
            str(csv_p),
            "--shapes",
            "40x6x8",
            "--dtypes",
            "float32,float16,bfloat16",
            "--sweep-m",
            "24x4:2,5",
            "--sweep-n",
            "none",
            "--methods",
            "gpu_orthol1,cupy-naive,torch-eager,jax-jit",
        ]
    )
    assert rc == 0
    with open(csv_p) as f:
        rows = list(csv.DictReader(f))
    have = {r["method"] for r in rows}
    assert {
        "gpu_orthol1[cupy]",
        "gpu_orthol1[cupy,tf32]",
        "cupy-naive",
        "limit-cublas",
        "limit-cublas-bf16",
        "auto-crossover[numpy]",
        "auto-crossover[cupy]",
    } <= have
    bf = {r["method"] for r in rows if r["dtype"] == "bfloat16"}
    assert {"gpu_orthol1[cupy]", "limit-cublas-bf16"} <= bf and "cupy-naive" not in bf
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["p50_ms"]) > 0
        if r["family"] in ("ours", "peer", "limit"):
            assert float(r["limit_mem_ms"]) > 0 and r["peak_how"] and not r["peak_how"].startswith("failed")


# ------------------------------------- the figures of docs/performance.md and README.md are the results files'

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
PERFORMANCE = "docs/performance.md"


def _readme_table(starts_with: str, doc: str = PERFORMANCE) -> list[list[str]]:
    """The body rows of the first Markdown table after the paragraph of `doc` that starts with `starts_with`."""
    text = (ROOT / doc).read_text()
    after = text[text.index(starts_with) :]
    rows = []
    for line in after.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and rule


def _printed(cell: str, value: float):
    """A README number equals the file's value to the digits printed."""
    num = cell.rstrip("x")
    decimals = len(num.split(".")[1]) if "." in num else 0
    assert abs(float(num) - value) <= 0.5 * 10**-decimals + 1e-12, (cell, value)


def _shape(cell: str) -> str:
    return cell.split(",")[0].replace(" ", "")


def _published(doc_path):
    doc = json.loads((ROOT / doc_path).read_text())
    rows = flags.flag_rows(doc["rows"], flags.cpu_count_of(doc), doc.get("loadavg_start"))
    return rows, report.headline(rows)


def _check_cells(cells, cols, h, rows):
    for cell, col in zip(cells, cols, strict=True):
        if col.startswith("limit:") or col.startswith("method:"):  # a single row's median
            name = col.split(":", 1)[1]
            r = next(
                (
                    r
                    for r in rows
                    if r["sweep"] == "ref"
                    and r["shape"] == h["shape"]
                    and r["dtype"] == h["dtype"]
                    and r["method"] == name
                ),
                None,
            )
            flagged, value = (False, "") if r is None else (bool(flags.own_flags(r["flags"])), r["p50_ms"])
        else:
            flagged, value = col in h["flags"], h[col]
        if cell == "flagged":
            assert flagged, (h["shape"], col)
        elif cell in ("", "(not run)"):
            assert value == "", (h["shape"], col)
        else:
            assert not flagged, f"{h['shape']} {col}: the docs quote a flagged value"
            _printed(cell, value)


def test_readme_gpu_table_is_one_unflagged_run():
    rows, hl = _published("bench/results/gpu-h200-fused-quick.json")
    cols = [
        "ms",
        "limit:limit-cublas",
        "x_limit",
        "tf32_ms",
        "limit:limit-cublas-tf32",
        "torch-eager",
        "torch-compile",
        "jax-jit",
    ]
    table = _readme_table("**GPU: NVIDIA H200**")
    assert len(table) == 3
    for cells in table:
        h = next(h for h in hl if h["shape"] == _shape(cells[0]) and h["dtype"] == cells[0].split(", ")[1])
        _check_cells(cells[1:], cols, h, rows)


def test_readme_gpu_per_call_tables_are_their_file():
    doc = json.loads((ROOT / "bench/results/gpu-h100-ctx-plans.json").read_text())
    table = _readme_table("**GPU per call and per path: NVIDIA H100**")
    host = doc["host"]
    rows = (host["loss_and_grad"], host["plan_fused"], host["plan_gemm"], host["graph_replay_fused"])
    assert len(table) == len(rows)
    for cells, t in zip(table, rows, strict=True):  # microseconds
        _printed(cells[1], 1e3 * t["host_ms"])
        _printed(cells[2], 1e3 * t["device_ms"])
    shapes = _readme_table("| shape, dtype | limit-cublas ms | two-GEMM ms (x limit) | fused ms (x limit) |")
    assert len(shapes) == 6
    for cells in shapes:
        kind = cells[0].split(", ")[1]
        prec, dt = ("tf32", "float32") if kind == "tf32" else ("highest", kind)
        shape = [int(x) for x in _shape(cells[0]).split("x")]
        r = next(
            r for r in doc["shapes"] if r["shape"] == shape and r["dtype"] == dt and r["precision"] == prec
        )
        _printed(cells[1], r["limit_cublas_ms"])
        for col, key in ((2, "gemm"), (3, "fused"), (5, "fused_graph")):
            if cells[col] in ("", "-"):
                assert f"{key}_ms" not in r, cells
                continue
            ms, ratio = cells[col].rstrip(")").split(" (")
            _printed(ms, r[f"{key}_ms"])
            _printed(ratio, r[f"{key}_ms"] / r["limit_cublas_ms"])
        if cells[4] in ("", "-"):
            assert "fused_x_limit_median" not in r, cells
        else:
            _printed(cells[4], r["fused_x_limit_median"])
        if cells[6]:
            _printed(cells[6], r["jax-jit_synced_ms"])
        else:
            assert prec == "tf32"


def test_readme_cpu_peer_table_is_one_unflagged_run():
    rows, hl = _published("bench/results/cpu-quick.json")
    cols = ["ms", "x_limit", "numpy-naive", "torch-eager", "torch-compile", "jax-jit"]
    table = _readme_table("**CPU peers: AMD EPYC, 2 CPUs")
    assert len(table) == 3
    for cells in table:
        h = next(h for h in hl if h["shape"] == _shape(cells[0]) and h["dtype"] == "float32")
        assert "AMD EPYC (2 CPUs)" == h["device_name"]
        _check_cells(cells[1:], cols, h, rows)


def test_readme_cpu_core_table_is_its_file():
    doc = json.loads((ROOT / "bench/results/raw/core-cpu.json").read_text())
    table = _readme_table("**CPU: AMD EPYC, 2 CPUs, float32**")
    assert len(table) == 3
    for cells in table:
        shape = [int(x) for x in _shape(cells[0]).split("x")]
        ours, naive = (
            next(r for r in doc["rows"] if r["shape"] == shape and r["method"] == m)
            for m in ("gpu_orthol1", "naive_numpy")
        )
        for r in (ours, naive):  # what flag_rows would say of them: no spread, not below the floor
            assert r["p80_ms"] / r["p20_ms"] <= flags.SPREAD_MAX and r["ratio_to_limit"] >= flags.FLOOR_RATIO
        _printed(cells[1], ours["p50_ms"])
        _printed(cells[2], ours["limit_ms"])
        _printed(cells[3], ours["ratio_to_limit"])
        _printed(cells[4], naive["ratio_to_limit"])
        _printed(cells[5].split(" MB")[0], ours["peak_extra_mb"])


def test_cpu_intel_core_table_is_its_file():
    doc = json.loads((ROOT / "bench/results/cpu-core-intel-5.json").read_text())
    table = _readme_table("**CPU: Intel Xeon, 2 CPUs, float32**")
    assert len(table) == 3
    for cells in table:
        shape = [int(x) for x in _shape(cells[0]).split("x")]
        ours, naive = (
            next(r for r in doc["rows"] if r["shape"] == shape and r["method"] == m)
            for m in ("gpu_orthol1", "naive_numpy")
        )
        _printed(cells[2], ours["limit_ms"])
        for cell, r, key in (
            (cells[1], ours, "p50_ms"),
            (cells[3], ours, "ratio_to_limit"),
            (cells[4], naive, "ratio_to_limit"),
        ):
            flagged = r["p80_ms"] / r["p20_ms"] > flags.SPREAD_MAX or r["ratio_to_limit"] < flags.FLOOR_RATIO
            if cell == "flagged":
                assert flagged, (cells[0], key)
            else:
                assert not flagged, (cells[0], key)
                _printed(cell, r[key])


def test_cpu_plans_tables_are_their_file():
    res = json.loads((ROOT / "bench/results/cpu-plans.json").read_text())["results"]
    table = _readme_table("**CPU per-call cost: plans, Intel Xeon, 2 CPUs**")
    assert len(table) == 2
    for cells in table:
        now, base = res["now"]["core"][_shape(cells[0])], res["base"]["core"][_shape(cells[0])]
        for cell, d, key in ((cells[1], base, "ours"), (cells[2], now, "ours"), (cells[3], now, "plan")):
            us, ratio = cell.rstrip(")").split(" us (")
            _printed(us, d[f"{key}_us"])
            _printed(ratio, d[f"{key}_x_naive"])
        after, before = cells[4].rstrip(" us").split(" / ")
        _printed(after, now["naive_us"])
        _printed(before, base["naive_us"])
    models = _readme_table("| model, float32 | before | after | loop |")
    assert len(models) == 2
    for cells, key in zip(models, ("mlp4x128", "cnn3"), strict=True):
        for cell, side in ((cells[1], "base"), (cells[2], "now")):
            loss, add = cell.split(" / ")
            _printed(loss, res[side]["orthol1"][key]["loss_x_loop"])
            _printed(add, res[side]["orthol1"][key]["add_grad_x_loop"])
        _printed(cells[3].rstrip(" us"), res["now"]["orthol1"][key]["loop_us"])


def test_readme_speed_table_is_two_unflagged_runs():
    """README's "How fast" table: each row's figures from the one results file the row names."""
    table = _readme_table("| machine (results file) |", "README.md")
    assert len(table) == 5
    cols = ["ms", "naive", "torch-eager", "torch-compile", "jax-jit"]
    for cells in table:
        path = cells[0].split("`")[1]
        rows, hl = _published(path)
        h = next(h for h in hl if h["shape"] == _shape(cells[1]) and h["dtype"] == "float32")
        assert cells[0].split(" (")[0].split(": ", 1)[1].startswith(h["device_name"].split(" (")[0])
        naive = "cupy-naive" if cells[0].startswith("GPU") else "numpy-naive"
        _check_cells(cells[2:], [naive if c == "naive" else c for c in cols], h, rows)


def test_readme_torch_figure_is_its_file():
    doc = json.loads((ROOT / "bench/results/gpu-h200-fused-torch.json").read_text())
    text = (ROOT / "README.md").read_text()
    ratio = text.split("ran ")[1].split("x faster than the per-layer autograd loop")[0]
    _printed(ratio, doc["results"]["loss"]["ratio_vs_naive"])
    assert doc["device_name"] == "NVIDIA H200" and doc["agreement_ok"]


def test_no_published_figure_comes_from_a_disturbed_run():
    readme = (
        (ROOT / "README.md").read_text()
        + (ROOT / PERFORMANCE).read_text()
        + (ROOT / "bench/results/README.md").read_text().split("## Disturbed runs")[0]
    )
    for p in (ROOT / "bench/results/disturbed").glob("*.json"):
        assert not (ROOT / "bench/results" / p.name).exists()
        assert f"results/{p.name}" not in readme and f"`{p.stem}`" not in readme.replace("`cpu-quick`", "")


def test_training_metrics_table_is_its_file():
    doc = json.loads((ROOT / "bench/results/cpu-training-metrics.json").read_text())
    med = doc["median_ms"]
    table = _readme_table("**OrthoL1 metrics cost: AMD EPYC, 2 CPUs, float32**")
    keys = {
        "`loss()` + backward": ("loss+backward", None),
        "`loss()`": ("loss", None),
        "`metrics()`": ("metrics", "metrics_over_loss_backward"),
        "`loss(metrics=True)`": ("loss+metrics", "loss_metrics_over_loss"),
    }
    assert [c[0] for c in table] == list(keys)
    for cells in table:
        key, ratio = keys[cells[0]]
        _printed(cells[1], med[key])
        if ratio is None:
            assert cells[2] == ""
        else:
            _printed(cells[2].split(" of ")[0], doc[ratio])
    text = (ROOT / PERFORMANCE).read_text()
    hook, added = round(doc["metrics_hook_ms_in_loss"]), round(med["loss+metrics"] - med["loss"])
    assert f"took\n{hook} ms of the {added} ms" in text or f"took {hook} ms of the {added} ms" in text


def test_ddp_split_table_is_its_file():
    doc = json.loads((ROOT / "bench/results/cpu-distributed-ddp.json").read_text())
    table = _readme_table("**OrthoL1(split=) under DDP: AMD EPYC, 2 CPUs, gloo, float32**")
    want = [(r, x) for r in doc["results"] for x in r["per_rank"]]
    assert len(table) == len(want)
    for cells, (r, x) in zip(table, want, strict=True):
        assert (int(cells[0]), int(cells[1]), int(cells[2])) == (r["ranks"], x["rank"], x["matrices"])
        for cell, value in zip(
            cells[3:7], (x["whole_ms"], x["split_ms"], x["ratio"], r["target_ratio"]), strict=True
        ):
            _printed(cell, value)
        mant, exp = cells[7].split("e")
        _printed(mant, x["params_max_rel_diff"] / 10 ** int(exp))


def test_cpu_detail_reads_the_first_cpu_and_its_l2(tmp_path):
    """cpu_detail: family, model and stepping of cpu0's block (not a later CPU's), the ISA subset that
    picks BLAS's kernels, the level-2 cache's size whatever its index; None where a file is missing
    or a value is not a number."""
    from gpu_orthol1.bench.env import cpu_detail

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu sse2 avx2 fma avx512f avx512dq\n\n"
        "processor\t: 1\ncpu family\t: 23\nmodel\t\t: 49\nstepping\t: 0\nflags\t\t: avx2\n"
    )
    cache = tmp_path / "cache"
    for idx, level, size in (("index0", 1, "32K"), ("index3", 2, "2M"), ("index2", 3, "32768K")):
        (cache / idx).mkdir(parents=True)
        (cache / idx / "level").write_text(f"{level}\n")
        (cache / idx / "size").write_text(f"{size}\n")
    (cache / "index1").mkdir()  # no level file: skipped
    d = cpu_detail(str(info), str(cache))
    assert (d["family"], d["model"], d["stepping"]) == (25, 17, 1)
    assert d["isa"] == ["avx2", "fma", "avx512f"]
    assert d["l2_bytes"] == 2 << 20
    # the BLAS libraries threadpoolctl finds in this process (NumPy's, at least)
    assert d["blas"] and all(set(b) == {"internal_api", "version", "architecture"} for b in d["blas"])
    odd = tmp_path / "odd"
    odd.write_text("processor\t: 0\ncpu family\t: ?\nmodel\t\t: 17\n")
    d = cpu_detail(str(odd), str(tmp_path / "missing"))
    assert (d["family"], d["model"], d["stepping"], d["isa"], d["l2_bytes"]) == (None, 17, None, [], None)
    none = cpu_detail(str(tmp_path / "missing"), str(tmp_path / "missing"))
    assert (none["family"], none["model"], none["stepping"], none["isa"], none["l2_bytes"]) == (
        None,
        None,
        None,
        [],
        None,
    )


def test_bench_records_name_the_cpu_in_detail():
    """run_record (the bench scripts' records) places cpu_detail's facts beside the CPU's name, before
    the script's own fields (`gpu-orthol1 bench`'s JSON: in test_bench_command_cpu_smoke)."""
    from gpu_orthol1.bench.env import run_record

    doc = run_record(rounds=3)
    keys = list(doc)
    assert keys.index("cpu") < keys.index("cpu_detail") < keys.index("rounds")
    assert set(doc["cpu_detail"]) == {"family", "model", "stepping", "isa", "l2_bytes", "blas"}


def _range(values, fmt="{:.2f}") -> str:
    """How the docs print the span of some figures: "lo-hi" at the printed digits."""
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def test_cpu_sweep_second_host_table_is_its_file():
    doc = json.loads((ROOT / "bench/results/cpu-midsize-epyc-zen4.json").read_text())
    table = _readme_table("**CPU sweep points on a second AMD EPYC host, float32**")
    assert doc["cpu_detail"]["family"] == 25 and doc["cpu_detail"]["model"] == 17
    assert doc["cpu_detail"]["blas"][0]["architecture"] == "SkylakeX"
    assert len(table) == len(doc["results"])
    layout_cost = []
    for cells, r in zip(table, doc["results"], strict=True):
        assert [int(v) for v in cells[0].split(" x ")] == r["shape"]
        ms, paired = r["ms"], r["paired"]
        a = {k: np.asarray(v) for k, v in r["ms_all"].items()}
        lay = float(
            np.median(
                np.minimum(a["layout_split"], a["layout_blas_threads"])
                / np.minimum(a["limit_split"], a["limit_blas_threads"])
            )
        )
        layout_cost.append((r["above_1_10"], lay))
        values = (
            ms["ours"],
            ms["limit"],
            paired["ours_over_limit"],
            lay,
            paired["ours_over_layout_limit"],
            paired["ours_over_naive"],
        )
        for cell, value in zip(cells[1:], values, strict=True):
            _printed(cell, value)
    text = " ".join((ROOT / PERFORMANCE).read_text().split())
    assert f"cpu-midsize-epyc-zen4.json`, {doc['date'][:16].replace('T', ' ')} UTC" in text
    words = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert f"Here {words[sum(r['above_1_10'] for r in doc['results'])]} of the nine points miss" in text
    bound = [v for above, v in layout_cost if above and v >= 1.10]
    assert f"At {words[len(bound)]} of the five, the in-layout GEMMs alone take {_range(bound)}x" in text
    assert max(r["paired"]["ours_over_naive"] for r in doc["results"]) < 1.0
    within = [r["paired"]["ours_over_layout_limit"] for r in doc["results"]]
    assert f"within {_range(within)}x of the in-layout limit" in text


def test_cpu_layout_floor_table_is_its_file():
    doc = json.loads((ROOT / "bench/results/cpu-layout-floor.json").read_text())
    assert doc["cpu"] == "AMD EPYC (2 CPUs)" and doc["cpu_detail"]["family"] == 25
    head = "**What bounds the mid-sized points**"
    text_raw = (ROOT / PERFORMANCE).read_text()
    header = next(ln for ln in text_raw[text_raw.index(head) :].splitlines() if ln.startswith("|"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "shape (l, m, n)",
        "limit ms",
        "in-layout, whole",
        "in-layout, chunks",
        "stage_in",
        "stage_out",
        "gpu_orthol1",
        "/ chunks",
        "batch-first",
        "copy, then batch-first",
        "Gram: BLAS threads / one thread",
    ]
    table = _readme_table(head)
    rows = doc["results"]
    assert len(table) == len(rows)
    for cells, r in zip(table, rows, strict=True):
        assert [int(v) for v in cells[0].split(" x ")] == r["shape"] and r["threads"] == 1
        p = r["paired"]
        values = (
            r["ms"]["limit"],
            p["layout_whole"],
            p["layout"],
            p["stage_in"],
            p["stage_out"],
            p["ours"],
            r["ours_over_layout"],
            p["ours_axis0"],
            p["copy_axis0"],
            r["gram_threads"],
        )
        for cell, value in zip(cells[1:], values, strict=True):
            _printed(cell, value)
    text = " ".join(text_raw.split())
    assert f"cpu-layout-floor.json`, the same host, {doc['date'][:16].replace('T', ' ')} UTC" in text
    assert f"load average {doc['loadavg_start'][0]:.2f} at the start" in text

    def paired(k):
        return [r["paired"][k] for r in rows]

    def each(k):
        return [r[k] for r in rows]

    assert (
        f"take {_range(paired('layout_whole'))}x the contiguous ones in one matmul each, "
        f"and {_range(paired('layout'))}x in the plan's chunks" in text
    )
    assert (
        f"gpu_orthol1 takes {_range(paired('ours_axis0'))}x the limit, against {_range(paired('ours'))}x "
        "on the (l, m, n) layout" in text
    )
    assert f"takes {_range(paired('stage_in') + paired('stage_out'))}x the limit" in text
    assert all(min(r["paired"]["stage_in"], r["paired"]["stage_out"]) > r["paired"]["layout"] for r in rows)
    assert f"then calling, takes {_range(paired('copy_axis0'))}x" in text
    assert f"takes {_range(each('gram_threads'))}x its time on one thread" in text
    assert f"the Gram, {_range(paired('gram'))} of the limit's time" in text
    assert f"takes {_range(each('ours_over_layout'))}x the chunked in-layout GEMMs" in text
    # the layout advice in the guide quotes the same run, and holds at every point it names
    guide = " ".join((ROOT / "docs/guide.md").read_text().split())
    assert all(v > 1 for v in each("ours_over_axis0") + each("copy_axis0_over_ours"))
    assert f"took {_range(each('ours_over_axis0'))}x the time of the same call on the slices stored" in guide
    assert f"(`np.ascontiguousarray`) took {_range(each('copy_axis0_over_ours'))}x the in-place call" in guide
