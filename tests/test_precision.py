"""precision= on gpu_orthol1.torch and gpu_orthol1.distributed (None follows torch's float32 matmul
setting, read per call), its way to the plans and devices (compute types through the emulated GPU
device), the emulator's TF32 rounding and the "tf32" tolerance class against the float64 reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gpu_orthol1 as ol1
from gpu_orthol1 import _cache, _driver, _plan, testing
from gpu_orthol1.torch import OrthoL1, _bridge, biggan_ortho, keras_orthogonal, ortho_l1
from gpu_orthol1.torch import _core as tcore

from .reference import TOL, check, random_phi, reference

F32, TF32, F64 = testing.COMPUTE_32F, testing.COMPUTE_32F_FAST_TF32, testing.COMPUTE_64F


@pytest.fixture(autouse=True)
def matmul_precision():
    """Every test here changes torch's global setting: put it back (the legacy setter also clears a
    per-backend setting)."""
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


@pytest.fixture
def tseed(rng):
    torch.manual_seed(int(rng.integers(2**31)))
    return rng


@pytest.fixture
def seen(monkeypatch):
    """The precision of every plan the torch and distributed layers ask the core's cache for."""
    got: list = []
    orig = tcore.cached

    def spy(phi, axis, reduction, precision, *rest, **kw):
        got.append(precision)
        return orig(phi, axis, reduction, precision, *rest, **kw)

    monkeypatch.setattr(tcore, "cached", spy)
    return got


def _w(rng, shape, dtype=torch.float32):
    return torch.from_numpy(random_phi(rng, shape, np.float64)).to(dtype).requires_grad_()


# -- resolving None -------------------------------------------------------------------------------


@pytest.mark.parametrize("setting,want", [("highest", "highest"), ("high", "tf32"), ("medium", "tf32")])
def test_none_follows_torchs_setting(setting, want):
    torch.set_float32_matmul_precision(setting)
    assert _bridge._resolve_precision(None) == want
    assert _bridge._resolve_precision("highest") == "highest"
    assert _bridge._resolve_precision("tf32") == "tf32"


def test_none_follows_the_per_backend_api():
    """torch >= 2.9's torch.backends.cuda.matmul.fp32_precision: get_float32_matmul_precision raises
    once both APIs were used, and cuBLAS matmul's own setting decides."""
    m = torch.backends.cuda.matmul
    torch.set_float32_matmul_precision("highest")
    m.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()
    assert _bridge._resolve_precision(None) == "tf32"
    m.fp32_precision = "ieee"
    assert _bridge._resolve_precision(None) == "highest"


# -- every entry point: bad values, the value reaching the plan, read per call ---------------------


def test_bad_precision_is_a_value_error_everywhere(rng):
    w = _w(rng, (6, 4))
    model = nn.Linear(4, 6)
    msg = "precision must be None, 'highest' or 'tf32', got 'high'"
    calls = [
        lambda: ortho_l1(w, precision="high"),
        lambda: keras_orthogonal(w, precision="high"),
        lambda: biggan_ortho(w, precision="high"),
        lambda: OrthoL1(model, precision="high"),
        lambda: OrthoL1.keras(model, precision="high"),
        lambda: OrthoL1.biggan(model, precision="high"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=msg):
            call()
    from gpu_orthol1 import distributed as odist

    with pytest.raises(ValueError, match=msg):
        odist.orthol1_dtensor_execute([(w, "matrix", 1, False)], 1.0, precision="high")
    with pytest.raises(ValueError, match="precision must be None"):
        ortho_l1(w, precision=1)


def test_ortho_l1_reads_the_setting_per_call(seen, rng):
    w = _w(rng, (7, 5))
    got = {}
    for setting in ("highest", "high", "medium", "highest"):
        torch.set_float32_matmul_precision(setting)
        loss = ortho_l1(w, 0.3)
        loss.backward()
        got[setting] = (loss.detach().clone(), w.grad.clone())
        w.grad = None
    assert seen == ["highest", "tf32", "tf32", "highest"]
    # an explicit value wins over torch's setting
    ortho_l1(w, 0.3, precision="tf32")
    torch.set_float32_matmul_precision("high")
    ortho_l1(w, 0.3, precision="highest")
    assert seen[4:] == ["tf32", "highest"]
    # one cached plan per precision, and on the CPU both compute full float32: the same bits
    plans = [p for k, p in _cache._cache.items() if k[1] == (1, 7, 5) and k[3] == np.float32]
    assert {"highest", "tf32"} <= {p.precision for p in plans}
    assert torch.equal(got["high"][0], got["highest"][0]) and torch.equal(got["high"][1], got["highest"][1])


def test_presets_take_precision(seen, rng):
    w = _w(rng, (6, 8))
    torch.set_float32_matmul_precision("high")
    keras_orthogonal(w)
    biggan_ortho(w)
    keras_orthogonal(w, precision="highest")
    biggan_ortho(w, precision="highest")
    assert seen == ["tf32", "tf32", "highest", "highest"]


def _recording_factory(log):
    """A `_device_factory` for OrthoL1 on CPU tensors: the emulated GPU device of each call's precision."""

    def factory(precision="highest"):
        dev = testing.EmulatedGpuDevice(precision=precision)
        log.append((precision, dev))
        return dev

    return factory


def _check_targets(reg, loss, beta, tol_class=None):
    """reg's loss and every target's .grad against the float64 reference (OrthoL1's default penalty)."""
    total = mag = 0.0
    for t in reg.targets:
        V = t.view(t.param.detach()).numpy()  # (m, l, n): slices along axis 0
        per, _, _ = reference(V, beta, 0)
        check(V, per.sum(), t.view(t.param.grad).numpy(), beta, 0, "sum", tol_class=tol_class)
        total += per.sum()
        A = np.abs(V.astype(np.float64))
        mag += beta * (np.matmul(A.transpose(0, 2, 1), A).sum() + V.shape[0] * V.shape[2])
    assert abs(float(loss) - total) <= TOL[tol_class or "float32"]["loss"] * (abs(total) + mag)


@pytest.mark.cudasim
def test_orthol1_grouped_gemms_follow_the_setting_emulated(tseed):
    """The grouped pointer-array path of the GPU device (CupyDevice's own cuBLAS argument lists, run by
    the emulated cuBLAS): cublasSgemmBatched (plain float32) under "highest", cublasGemmBatchedEx with
    CUBLAS_COMPUTE_32F_FAST_TF32 under "high", read at each call of the same OrthoL1; the TF32 result
    (operands rounded as the emulator does) within the "tf32" tolerance of the float64 reference."""
    model = nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 9), nn.Linear(9, 5), nn.Conv2d(2, 3, 2))
    log: list = []
    reg = OrthoL1(model, 0.7)
    reg._device_factory = _recording_factory(log)
    grads = {}
    for setting in ("highest", "high", "highest"):
        torch.set_float32_matmul_precision(setting)
        model.zero_grad(set_to_none=True)
        loss = reg.loss()
        loss.backward()
        prec, dev = log[-1]
        tf32 = setting == "high"
        assert prec == ("tf32" if tf32 else "highest")
        assert dev.compute_types and set(dev.compute_types) == {TF32 if tf32 else F32}
        _check_targets(reg, loss.item(), 0.7, "tf32" if tf32 else None)
        grads[setting] = [t.param.grad.clone() for t in reg.targets]
    # TF32 rounded the operands: not float32's bits (float32 "highest" is reproducible bit for bit)
    assert any(not torch.equal(a, b) for a, b in zip(grads["high"], grads["highest"], strict=True))
    # add_grad_ and step_ take the same setting
    torch.set_float32_matmul_precision("medium")
    reg.add_grad_()
    assert log[-1][0] == "tf32" and set(log[-1][1].compute_types) == {TF32}
    reg.step_(0.01)
    assert log[-1][0] == "tf32" and set(log[-1][1].compute_types) == {TF32}
    # an explicit precision wins over torch's setting
    reg.precision = "highest"
    reg.loss()
    assert log[-1][0] == "highest" and set(log[-1][1].compute_types) == {F32}


@pytest.mark.cudasim
def test_float64_ignores_tf32_emulated(tseed):
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 7)).double()
    log: list = []
    reg = OrthoL1(model, 0.4, precision="tf32")
    reg._device_factory = _recording_factory(log)
    loss = reg.loss()
    loss.backward()
    assert set(log[-1][1].compute_types) == {F64}
    _check_targets(reg, loss.item(), 0.4, "float64")


def test_orthol1_per_tensor_path_takes_the_setting(seen, rng):
    """A layout BLAS cannot read goes through the core one tensor at a time (`_single`): the same
    precision. (bfloat16, which took that path before, is grouped now.)"""
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))
    for lin, (o, i) in zip(model, ((8, 6), (4, 8)), strict=True):
        lin.weight = nn.Parameter(torch.randn(o, 2 * i)[:, ::2])  # strides (2i, 2): staged, not grouped
    reg = OrthoL1(model, 0.5)
    torch.set_float32_matmul_precision("high")
    with pytest.warns(ol1.CopyWarning):  # the staged layouts say so
        reg.loss()
    assert seen == ["tf32", "tf32"]


def test_orthol1_under_torch_compile_follows_the_setting(tseed):
    """The compiled loss() op gets the precision as an argument: traced under one setting, recompiled
    under another (dynamo's global-state guard), and the same for ortho_l1's op."""
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 6))
    devices: list = []
    reg = OrthoL1(model, 0.5)

    def factory(precision="highest"):
        devices.append(precision)
        return _bridge._core_device(torch.device("cpu"), precision)

    reg._device_factory = factory
    w = _w(np.random.default_rng(int(torch.randint(1 << 30, ()))), (6, 5))
    f = torch.compile(lambda: reg.loss() + ortho_l1(w, 0.2), backend="aot_eager", fullgraph=True)
    want = []
    for setting in ("highest", "high", "highest", "medium"):
        torch.set_float32_matmul_precision(setting)
        model.zero_grad(set_to_none=True)
        f().backward()
        want.append("highest" if setting == "highest" else "tf32")
        assert devices == want
        assert all(p.grad is not None for p in model.parameters() if p.dim() == 2)


def test_custom_ops_take_precision_as_an_argument(rng):
    """Both ops' schemas carry the precision (opcheck: schema, fake tensor, autograd registration)."""
    w = _w(rng, (6, 4), torch.float64)
    args = (w, 0.4, "sum", "matrix", 0, True, True, "l1", True, False, "tf32")
    torch.library.opcheck(torch.ops.gpu_orthol1.ortho_l1.default, args)
    reg = OrthoL1(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6)).double(), 0.2)
    params = [t.param for t in reg.targets]
    torch.library.opcheck(
        torch.ops.gpu_orthol1.orthol1_loss.default, (params, reg._op_key, [0, 1], True, "tf32")
    )


# -- the core on the emulated GPU device: strided GEMMs, the "tf32" tolerance ----------------------


@pytest.mark.cudasim
@pytest.mark.parametrize("precision", ["highest", "tf32"])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_core_plan_precision_emulated(precision, layout, rng):
    """The strided-batched GEMMs' compute type and the TF32-rounded result against the reference, on odd
    and non-contiguous shapes (a layout BLAS cannot read is staged: the same GEMMs on the copy)."""
    base = random_phi(rng, (23, 10, 7), np.float32)
    phi = {"C": base, "F": np.asfortranarray(base), "strided": base[:, ::2, :]}[layout]
    dev = testing.EmulatedGpuDevice(precision=precision)
    p = _plan.Plan(phi, 0.6, precision=precision, backend="numpy", _device=dev)
    assert p.precision == precision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _driver.CopyWarning)  # the staged layout says so
        loss, grad = p(phi)
    check(phi, loss, grad, 0.6, 1, "sum", np.float32, tol_class="tf32" if precision == "tf32" else None)
    assert dev.compute_types and set(dev.compute_types) == {TF32 if precision == "tf32" else F32}
    if precision == "tf32":
        l64, g64 = ol1.loss_and_grad(phi, 0.6)  # full float32 on the CPU
        assert not np.array_equal(grad, g64)


@pytest.mark.cudasim
def test_core_plan_float64_under_tf32_emulated(rng):
    phi = random_phi(rng, (9, 4, 6), np.float64)
    dev = testing.EmulatedGpuDevice(precision="tf32")
    loss, grad = _plan.Plan(phi, 0.3, precision="tf32", backend="numpy", _device=dev)(phi)
    check(phi, loss, grad, 0.3)
    assert set(dev.compute_types) == {F64}


def test_to_tf32_rounds_to_nearest_even():
    u = 2.0**-10  # TF32's last mantissa bit at 1.0
    x = np.array([1 + u / 2, 1 + u + u / 2, 1 + u / 2 + 2**-20, -(1 + u / 2 + 2**-20), 3.0], np.float32)
    want = np.array([1.0, 1 + 2 * u, 1 + u, -(1 + u), 3.0], np.float32)
    np.testing.assert_array_equal(testing.to_tf32(x), want)
    special = testing.to_tf32(np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32))
    assert np.isnan(special[0]) and list(special[1:]) == [np.inf, -np.inf, 0.0, 0.0]
    assert np.signbit(special[4])
    r = np.random.default_rng().standard_normal(10000).astype(np.float32) * 1e3
    t = testing.to_tf32(r)
    assert np.all(np.abs(t - r) <= np.abs(r) * 2.0**-11)
    assert np.all((t.view(np.uint32) & 0x1FFF) == 0)


# -- gpu_orthol1.distributed: one gloo rank in this process ----------------------------------------


@pytest.fixture
def gloo(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_distributed_functions_take_precision(gloo, seen, rng):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gpu_orthol1 import distributed as odist

    local = _w(rng, (8, 3, 5)).detach()
    torch.set_float32_matmul_precision("high")
    for shard_dim in (0, 1, 2):  # rows (the plan made with the metadata), slices, columns
        seen.clear()
        odist.loss_and_grad(local, 0.5, shard_dim=shard_dim)
        odist.loss(local, 0.5, shard_dim=shard_dim, precision="highest")
        assert seen == ["tf32", "highest"], shard_dim
    with pytest.raises(ValueError, match="rank 0: precision must be None, 'highest' or 'tf32'"):
        odist.loss_and_grad(local, 0.5, shard_dim=0, precision="fast")
    mesh = init_device_mesh("cpu", (1,))
    w = distribute_tensor(_w(rng, (8, 5)).detach(), mesh, [Shard(0)]).requires_grad_()
    seen.clear()
    ortho_l1(w, 0.5).backward()
    ortho_l1(w, 0.5, precision="highest")
    assert seen == ["tf32", "highest"]
    seen.clear()
    reg = OrthoL1([("w", w)], 0.5)
    reg.loss().backward()
    reg.add_grad_()
    torch.set_float32_matmul_precision("highest")
    reg.step_(0.1)
    assert seen == ["tf32", "tf32", "highest"]


def test_ranks_must_agree_on_the_precision():
    from gpu_orthol1.distributed import _meta

    def row(**kw):
        r = [0] * _meta._NFIELDS
        r[_meta._F_NDIM], r[_meta._F_S0], r[_meta._F_S1], r[_meta._F_S2] = 3, 4, 3, 5
        r[_meta._F_DTYPE] = 1
        for k, v in kw.items():
            r[getattr(_meta, "_F_" + k)] = v
        return r

    mine = _meta._Local(row())
    assert _meta._validate([row(PREC=1), row(PREC=1)], 0, mine) == [4, 4]
    with pytest.raises(ValueError, match="disagree on precision .*: rank 0 'highest', rank 1 'tf32'"):
        _meta._validate([row(PREC=1), row(PREC=2)], 0, mine)


# -- on a card -----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_tf32_on_the_card_within_its_tolerance(rng):
    """Real TF32 (core plan, ortho_l1, OrthoL1's grouped gemmBatchedEx) against the float64 reference
    with the "tf32" tolerance class, and different from float32 "highest" (TF32 did run)."""
    import cupy

    phi = random_phi(rng, (256, 24, 64), np.float32)
    lt, gt = ol1.loss_and_grad(cupy.asarray(phi), 0.5, precision="tf32")
    lh, gh = ol1.loss_and_grad(cupy.asarray(phi), 0.5, precision="highest")
    check(phi, cupy.asnumpy(lt), cupy.asnumpy(gt), 0.5, tol_class="tf32")
    assert not cupy.array_equal(gt, gh)
    w = torch.from_numpy(phi[:, 0, :]).cuda().requires_grad_()
    torch.set_float32_matmul_precision("high")
    loss = ortho_l1(w, 0.5)
    loss.backward()
    check(phi[:, 0, :], loss.item(), w.grad.cpu().numpy(), 0.5, tol_class="tf32")
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 96), nn.Linear(96, 80)).cuda()
    reg = OrthoL1(model, 0.5)
    grads = {}
    for setting in ("high", "highest"):
        torch.set_float32_matmul_precision(setting)
        model.zero_grad(set_to_none=True)
        loss = reg.loss()
        loss.backward()
        cpu = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 96), nn.Linear(96, 80))
        cpu.load_state_dict(model.state_dict())
        for pc, pg in zip(cpu.parameters(), model.parameters(), strict=True):
            pc.grad = None if pg.grad is None else pg.grad.cpu()
        creg = OrthoL1(cpu, 0.5)
        _check_targets(creg, loss.item(), 0.5, "tf32" if setting == "high" else None)
        grads[setting] = [p.grad.clone() for p in model.parameters() if p.dim() == 2]
    assert any(not torch.equal(a, b) for a, b in zip(grads["high"], grads["highest"], strict=True))


# -- bench/bench_precision_error.py and the table in docs/guide.md it backs -------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def _load_bench(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_precision_error_runs(tmp_path):
    import json

    out = tmp_path / "e.json"
    assert _load_bench("bench_precision_error").main(["--shapes", "96,5,9", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["setting"]: r for r in doc["rows"]}
    assert set(rows) == {"highest", "tf32", "tf32-truncate"} and "emulation" in doc["note"]
    # TF32 rounding shows (far above float32's error) and stays within its class
    assert rows["tf32"]["grad_err_fixed_signs"] > 10 * rows["highest"]["grad_err_fixed_signs"]
    assert all(r["within"] for r in rows.values())


def test_guide_precision_table_is_its_file():
    """Each "<= x" of docs/guide.md's precision table bounds its setting's largest error in
    bench/results/cpu-precision-error.json, to the digits printed (within 10 %)."""
    import json
    import re

    doc = json.loads((ROOT / "bench/results/cpu-precision-error.json").read_text())
    text = (ROOT / "docs/guide.md").read_text().split("### Precision (TF32)")[1].split("###")[0]
    settings = {'`"highest"`': "highest", "rounded to nearest": "tf32", "truncated": "tf32-truncate"}
    keys = ("loss_rel_err", "grad_err_fixed_signs", "sign_flips")
    seen = 0
    for line in text.splitlines():
        first = line.split("|")[1] if line.startswith("|") else ""
        setting = next((v for k, v in settings.items() if k in first), None)
        if setting is None:
            continue
        bounds = [float(x) for x in re.findall(r"<= ([0-9.e+-]+)", line)]
        assert len(bounds) == 3, line
        for key, bound in zip(keys, bounds, strict=True):
            worst = max(r[key] for r in doc["rows"] if r["setting"] == setting)
            assert worst <= bound <= 1.1 * worst, (setting, key, worst, bound)
        seen += 1
    assert seen == 3


def test_bench_torch_precision_dry_run(tmp_path, capsys):
    """bench/bench_torch.py --precision all on the CPU: every setting timed on both sides, under the
    setting it names (torch's own restored after), GEMM rates reported, no % of peak off a card."""
    import json

    out = tmp_path / "t.json"
    torch.set_float32_matmul_precision("medium")
    mod = _load_bench("bench_torch")
    args = ["--layers", "1", "--d-model", "16", "--repeat", "5", "--precision", "all", "--json", str(out)]
    assert mod.main(args) == 0
    assert torch.get_float32_matmul_precision() == "medium"
    doc = json.loads(out.read_text())
    assert doc["precision"] == ["highest", "tf32", "bf16", "fp16"] and doc["agreement_ok"]
    want = {"highest": ("float32", "highest"), "tf32": ("float32", "high"), "bf16": ("bfloat16", "highest")}
    want["fp16"] = ("float16", "highest")
    for name, run in doc["runs"].items():
        assert (run["dtype"], run["float32_matmul_precision"]) == want[name]
        assert run["peak_tflops"] is None and run["gemm_flops"]["naive"] == 1.5 * run["gemm_flops"]["orthol1"]
        for key in ("naive", "loss", "add_grad_"):
            r = run["results"][key]
            flops = run["gemm_flops"]["naive" if key == "naive" else "orthol1"]
            assert r["tflops"] == pytest.approx(flops / r["median_s"] / 1e12) and r["pct_of_peak"] is None
    assert "fp16     OrthoL1.add_grad_()" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name,key",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", None),
    ],
)
def test_bench_torch_knows_the_cards_peaks(name, key):
    mod = _load_bench("bench_torch")
    assert mod.card(name) == key
    if key is not None:
        assert set(mod.PEAKS[key]) == set(mod.SETTINGS)
