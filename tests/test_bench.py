"""`gpu-orthol1 bench` (gpu_orthol1/bench.py): its reference, its correctness gate, and the command on tiny shapes.

Timings are never asserted here (team rule): only that the command checks every
method, produces well-formed rows, reports wrong methods as wrong, and skips
missing peers with a note.
"""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest

from gpu_orthol1 import _bench_methods, _bench_ref, bench

from . import reference as tref

SHAPES = [(7, 5, 3), (3, 4, 13), (33, 2, 9), (1, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bench_reference_is_the_tests_reference(shape, rng):
    """One formula, verified twice: the bench's BLAS-based reference equals tests/reference.py's einsum one."""
    phi = tref.random_phi(rng, shape, np.float64)
    beta = float(rng.uniform(0.1, 3.0))
    per, grad, X = tref.reference(phi, beta)
    for chunk in (1 << 20, 1):  # one chunk, and one slice per chunk
        r = _bench_ref.reference(phi, beta, chunk_bytes=chunk)
        np.testing.assert_allclose(r.per, per, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(r.grad, grad, rtol=1e-13, atol=1e-13)
        P = np.abs(phi.transpose(1, 0, 2))
        mag = P.transpose(0, 2, 1) @ P + np.eye(shape[2])
        np.testing.assert_allclose(r.closeness, np.abs(X) / mag, rtol=1e-6, atol=1e-30)


def test_bench_tolerances_are_the_tests_tolerances():
    for dt in (np.float16, np.float32, np.float64):
        t = _bench_ref.TOL[np.dtype(dt).name]
        assert (t["loss"], t["grad"], t["sign"]) == (tref.LOSS_RTOL[dt], tref.GRAD_RTOL[dt], tref.SIGN_RTOL[dt])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_check_accepts_right_and_rejects_wrong(dtype, rng):
    import gpu_orthol1 as ol1

    phi = tref.random_phi(rng, (40, 6, 8), dtype)
    ref = _bench_ref.reference(phi, 0.5)
    loss, grad = ol1.loss_and_grad(phi, 0.5, backend="numpy")
    ok = _bench_ref.check(ref, loss, grad, np.dtype(dtype).name)
    assert ok.ok, ok.why
    assert ok.compared > 0.5
    bad_loss = _bench_ref.check(ref, loss * (1 + 1e-3), grad, np.dtype(dtype).name)
    assert not bad_loss.ok and "loss" in bad_loss.why
    wrong = grad.copy()
    wrong[3, 2, :] = -wrong[3, 2, :]  # one row of one slice with the sign flipped
    bad_grad = _bench_ref.check(ref, loss, wrong, np.dtype(dtype).name)
    assert not bad_grad.ok and "gradient" in bad_grad.why
    assert not _bench_ref.check(ref, np.nan, grad, np.dtype(dtype).name).ok


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_reference_shape_slices_run_with_default_arguments(dtype, rng):
    """Regression: the 4 MiB default CPU workspace refused float16 slices of l=4096, n=128 (the first
    reference shape), which the bench found. Two slices of that shape, default workspace."""
    import gpu_orthol1 as ol1

    phi = tref.random_phi(rng, (4096, 2, 128), dtype)
    loss, grad = ol1.loss_and_grad(phi, 0.5, backend="numpy")
    res = _bench_ref.check(_bench_ref.reference(phi, 0.5), loss, grad, np.dtype(dtype).name)
    assert res.ok, res.why


def _run(tmp_path, *args):
    csv_p, json_p, png_p = tmp_path / "r.csv", tmp_path / "r.json", tmp_path / "r.png"
    rc = bench.main(["--device", "cpu", "--no-progress", "--csv", str(csv_p), "--json", str(json_p),
                     "--plot", str(png_p), *args])
    doc = json.loads(json_p.read_text())
    with open(csv_p) as f:
        rows = list(csv.DictReader(f))
    return rc, doc, rows, png_p


TINY = ["--shapes", "40x6x8,17x3x5", "--sweep-m", "24x4:2,5", "--sweep-n", "30x3:3,6", "--runs", "5"]


def test_bench_command_cpu_smoke(tmp_path, capsys):
    rc, doc, rows, png = _run(tmp_path, *TINY, "--dtypes", "float32,float64",
                              "--methods", "gpu_orthol1,numpy-naive,torch-eager,jax-jit")
    out = capsys.readouterr().out
    assert rc == 0
    have = {r["method"] for r in rows}
    assert {"gpu_orthol1[numpy]", "numpy-naive", "limit-blas"} <= have
    assert "torch-compile" not in have
    # every (shape, dtype) of the reference set and every sweep point, for each method that ran
    cases = {(r["shape"], r["dtype"], r["sweep"]) for r in rows}
    want = {(s, d, "ref") for s in ("40x6x8", "17x3x5") for d in ("float32", "float64")}
    want |= {("24x2x4", "float32", "m"), ("24x5x4", "float32", "m"), ("30x3x3", "float32", "n"),
             ("30x3x6", "float32", "n")}
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
            assert r["loss_err"] != "" and float(r["loss_err"]) <= _bench_ref.TOL[r["dtype"]]["loss"]
    ours = [r for r in rows if r["family"] == "ours"]
    assert ours and all(float(r["ours_speedup"]) == 1.0 for r in ours)
    assert doc["rows"] and doc["versions"]["gpu_orthol1"] and "cpu" in doc["devices"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gpu_orthol1[numpy]" in out and "| device | shape" in out


def test_missing_peers_are_skipped_with_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.setitem(sys.modules, "jax", None)
    rc, doc, rows, _ = _run(tmp_path, "--shapes", "20x3x4", "--sweep-m", "none", "--sweep-n", "none",
                            "--dtypes", "float32", "--methods", "gpu_orthol1,torch,jax")
    err = capsys.readouterr().err
    assert rc == 0
    assert {r["method"] for r in rows} == {"gpu_orthol1[numpy]", "limit-blas"}
    for name in ("torch-eager", "torch-compile", "jax-jit"):
        line = [ln for ln in err.splitlines() if f"skipped {name} on cpu" in ln]
        assert len(line) == 1 and "not installed" in line[0]
        assert any(f"skipped {name} on cpu" in n for n in doc["notes"])


def test_wrong_method_is_reported_not_timed(tmp_path, monkeypatch):
    real = _bench_methods.all_methods

    def with_a_wrong_one():
        ms = real()
        good = next(m for m in ms if m.name == "numpy-naive")

        def prepare(case):
            p = good.prepare(case)
            p.result = lambda r: (r[0], r[1] * 1.01)  # 1% off: must fail the float32 gradient check
            return p

        wrong = _bench_methods.Method("wrong-peer", "peer", "cpu", "numpy", "highest", prepare,
                                      lambda: (True, ""))
        return [*ms, wrong]

    monkeypatch.setattr(_bench_methods, "all_methods", with_a_wrong_one)
    rc, _doc, rows, _ = _run(tmp_path, "--shapes", "30x4x6", "--sweep-m", "none", "--sweep-n", "none",
                             "--dtypes", "float32", "--methods", "gpu_orthol1,wrong")
    assert rc == 0  # a wrong peer is a finding, not a failure of the command
    w = [r for r in rows if r["method"] == "wrong-peer"]
    assert len(w) == 1 and w[0]["status"] == "wrong" and "gradient" in w[0]["note"]
    assert w[0]["p50_ms"] == "" and w[0]["runs"] == "0"


def test_crossover_flops_picks_the_start_of_the_gpu_winning_tail():
    def rows(pairs):
        out = []
        for g, (t_np, t_cp) in pairs.items():
            out += [{"status": "ok", "gflops": g, "backend": "numpy", "p50_ms": t_np},
                    {"status": "ok", "gflops": g, "backend": "cupy", "p50_ms": t_cp}]
        return out

    # the GPU wins at 0.1 by noise, loses at 1, then wins from 10 on
    assert bench.crossover_flops(rows({0.1: (1, 0.5), 1.0: (2, 3), 10.0: (20, 5), 100.0: (200, 9)})) == 10e9
    assert bench.crossover_flops(rows({1.0: (1, 2), 10.0: (2, 3)})) is None


def test_bad_arguments_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "4x4"])
    assert "LxMxN" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="at least 5"):
        bench.main(["--device", "cpu", "--runs", "3"])


@pytest.mark.gpu
def test_bench_command_gpu_smoke(tmp_path):
    """The GPU half on tiny shapes (torch.compile left out: its compile time belongs to the bench step)."""
    csv_p = tmp_path / "g.csv"
    rc = bench.main(["--device", "gpu", "--no-progress", "--quick", "--csv", str(csv_p), "--shapes", "40x6x8",
                     "--dtypes", "float32,float16", "--sweep-m", "24x4:2,5", "--sweep-n", "none",
                     "--methods", "gpu_orthol1,cupy-naive,torch-eager,jax-jit"])
    assert rc == 0
    with open(csv_p) as f:
        rows = list(csv.DictReader(f))
    have = {r["method"] for r in rows}
    assert {"gpu_orthol1[cupy]", "gpu_orthol1[cupy,tf32]", "cupy-naive", "limit-cublas",
            "auto-crossover[numpy]", "auto-crossover[cupy]"} <= have
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["p50_ms"]) > 0
        if r["family"] in ("ours", "peer", "limit"):
            assert float(r["limit_mem_ms"]) > 0 and r["peak_how"] and not r["peak_how"].startswith("failed")
