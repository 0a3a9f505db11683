"""The training-loop helpers (issue 25): metrics from the penalty's own pass, beta schedules, lazy
application (every=k), checkpoints of the regularizer's state, the DDP work split (gloo, 2 and 3
ranks), and the errors for bad inputs. References are float64 and written here from the formulas."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gpu_orthol1 as ol1  # noqa: E402
from gpu_orthol1.torch import OrthoL1  # noqa: E402

# -- float64 references --------------------------------------------------------------------------


def ref_metrics(V, beta=1.0):
    """Per slice of V (m, l, n), float64: (penalty, max_cos, fro, mean_abs) from the definitions."""
    V = np.asarray(V, dtype=np.float64)
    out = {k: [] for k in ("penalty", "max_cos", "fro", "mean_abs")}
    for S in V:
        n = S.shape[1]
        G = S.T @ S
        E = G - np.eye(n)
        out["penalty"].append(beta * np.abs(E).sum())
        norms = np.linalg.norm(S, axis=0)
        cos = 0.0
        for i in range(n):
            for j in range(n):
                if i != j and norms[i] > 0 and norms[j] > 0:
                    cos = max(cos, abs(S[:, i] @ S[:, j]) / (norms[i] * norms[j]))
        out["max_cos"].append(cos)
        out["fro"].append(np.sqrt((E * E).sum() / n))
        out["mean_abs"].append(np.abs(E).mean())
    return {k: np.array(v) for k, v in out.items()}


def _close(got, want, rtol, what):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(
        got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max(initial=0))), err_msg=what
    )


# -- core metrics ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("shape,axis", [((5, 9, 6), 0), ((9, 4, 7), 1), ((8, 5, 3), 2)])
def test_core_metrics_equal_reference(rng, dtype, rtol, shape, axis):
    phi = rng.standard_normal(shape).astype(dtype)
    phi[..., 1] = 0  # a zero column somewhere: its cosines count as 0
    got = ol1.metrics(phi, 0.7, axis=axis)
    V = np.moveaxis(phi.astype(np.float64), axis, 0)  # (m, l, n): the other two axes keep their order
    want = ref_metrics(V, 0.7)
    for k in want:
        assert got[k].shape == (V.shape[0],) and got[k].dtype == np.float64, k
        _close(got[k], want[k], rtol, f"{k} {shape} axis={axis} {dtype}")


@pytest.mark.filterwarnings("ignore::gpu_orthol1.CopyWarning")
def test_core_metrics_2d_noncontiguous(rng):
    big = rng.standard_normal((14, 20))
    phi = big[::2, 1:13:2]  # (7, 6), strided both ways
    got = ol1.metrics(phi)
    want = ref_metrics(phi[None])
    for k in want:
        assert got[k].shape == (), k
        _close(got[k], want[k][0], 1e-12, k)
    q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    m = ol1.metrics(q[:, :4])
    assert float(m["max_cos"]) < 1e-12 and float(m["fro"]) < 1e-12


def test_core_metrics_penalty_matches_loss(rng):
    phi = rng.standard_normal((6, 8, 5))
    for kw in ({}, {"penalty": "l2"}, {"diagonal": False, "normalize": True}):
        got = ol1.metrics(phi, 0.3, **kw)["penalty"]
        _close(got, ol1.loss(phi, 0.3, reduction="none", **kw), 1e-12, str(kw))


@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_chunk_metrics_both_paths_equal_reference(rng, n):
    """The CPU's one-pass kernel and the array-module path (CuPy's, run here with NumPy)."""
    from gpu_orthol1 import _metrics

    V = rng.standard_normal((5, 9, n))
    V[2, :, 0] = 0
    ws = np.einsum("kli,klj->kij", V, V).reshape(5, n * n)
    want = ref_metrics(V)
    for fn in (_metrics.chunk_metrics, _metrics.chunk_metrics_xp):
        out = [np.full(5, -1.0) for _ in range(3)]
        fn(np, ws.copy(), n, *out)
        for k, o in zip(("max_cos", "fro", "mean_abs"), out, strict=True):
            _close(o, want[k], 1e-12, f"{fn.__name__} {k} n={n}")


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("n", [1, 2, 7, 16, 33])
def test_sign_pass_with_metrics_equals_reference_and_sign_pass(rng, dtype, rtol, n):
    """The CPU's sign pass with the metrics in its loop: the metrics equal the float64 reference, the
    losses and S equal the plain pass's bit for bit, in place and into a separate S; a slice holding
    NaN gets NaN metrics."""
    from gpu_orthol1.kernels import metrics_cpu, sign_abs_cpu

    V = rng.standard_normal((6, 9, n))
    V[2, :, 0] = 0  # a zero column
    ws = np.einsum("kli,klj->kij", V, V).reshape(6, n * n).astype(dtype)
    want = ref_metrics(V.astype(dtype))
    for inplace in (True, False):
        g1, g2 = ws.copy(), ws.copy()
        s1, s2 = (g1, g2) if inplace else (np.zeros_like(ws), np.zeros_like(ws))
        l1, l2 = np.full(8, -1.0), np.full(8, -1.0)
        out = [np.full(6, -1.0) for _ in range(3)]
        sign_abs_cpu.sign_abs_sum(g1, s1, n, l1, 1, 0.3, True)
        metrics_cpu.sign_abs_metrics(g2, s2, n, l2, 1, 0.3, True, *out)
        assert np.array_equal(l1, l2) and np.array_equal(s1, s2), inplace
        for k, o in zip(("max_cos", "fro", "mean_abs"), out, strict=True):
            _close(o, want[k], rtol, f"{k} n={n} {dtype} inplace={inplace}")
    q, _ = np.linalg.qr(rng.standard_normal((n + 3, n)))  # orthonormal columns: fro ~ 1e-16, not sqrt(eps)
    gq = (q.T @ q).reshape(1, n * n)
    out = [np.zeros(1) for _ in range(3)]
    metrics_cpu.sign_abs_metrics(gq, gq.copy(), n, np.zeros(1), 0, 1.0, False, *out)
    assert out[1][0] < 1e-12 and out[0][0] < 1e-12 and out[2][0] < 1e-12
    bad = ws.copy()
    bad[3, n * n // 2] = np.nan
    out = [np.zeros(6) for _ in range(3)]
    metrics_cpu.sign_abs_metrics(bad, bad, n, np.zeros(6), 0, 1.0, False, *out)
    assert all(np.isnan(o[3]) for o in out) and all(np.isfinite(o[4]) for o in out)


def test_metrics_computed_inside_the_cpu_sign_pass(monkeypatch):
    """loss(metrics=True), add_grad_(metrics=True), metrics() and ol1.metrics on the CPU take no pass over
    the Grams of their own (the sign pass computes them): the separate pass is not called, and the
    loss and gradient are those of a call without metrics, bit for bit."""
    from gpu_orthol1 import _metrics

    net = _net(3, torch.float32)
    reg = OrthoL1(net, 0.25)
    plain = reg.loss()
    plain.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    want = _ref_reg_metrics(reg, 0.25)

    def no_pass(*a):
        raise AssertionError("a separate metrics pass over the Grams ran")

    monkeypatch.setattr(_metrics, "chunk_metrics", no_pass)
    for p in net.parameters():
        p.grad = None
    loss, m = reg.loss(metrics=True)
    loss.backward()
    assert torch.equal(loss, plain)
    for p, g in zip(net.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    _check_reg_metrics(m, want, 2e-5)
    _check_reg_metrics(reg.metrics(), want, 2e-5)
    for p in net.parameters():
        p.grad = None
    _check_reg_metrics(reg.add_grad_(metrics=True)[1], want, 2e-5)
    phi = np.random.default_rng(1).standard_normal((5, 7, 4))
    _close(ol1.metrics(phi)["fro"], ref_metrics(np.moveaxis(phi, 1, 0))["fro"], 1e-12, "core")


# -- OrthoL1 metrics ---------------------------------------------------------------------------------


def _net(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(7, 11), torch.nn.Tanh(), torch.nn.Linear(11, 5), torch.nn.Conv2d(5, 3, 2)
    )
    net.stack = torch.nn.Parameter(torch.empty(3, 6, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.to(dtype)


def _ref_reg_metrics(reg, beta):
    out = {}
    for t in reg.targets:
        V = t.view(t.param.detach()).double().numpy()
        r = ref_metrics(V, beta * t.scale)
        out[t.name] = {
            "penalty": r["penalty"].sum(),
            "max_cos": r["max_cos"].max(),
            "fro": math.sqrt((r["fro"] ** 2).mean()),
            "mean_abs": r["mean_abs"].mean(),
        }
    return out


def _check_reg_metrics(got, want, rtol):
    assert list(got) == list(want)
    for name, d in want.items():
        for k, v in d.items():
            t = got[name][k]
            assert isinstance(t, torch.Tensor) and t.dim() == 0 and t.dtype == torch.float64, (name, k)
            _close(t.item(), v, rtol, f"{name}/{k}")


@pytest.mark.parametrize("mode", ["auto", "rows", "columns"])
def test_orthol1_metrics_equal_reference(mode):
    net = _net()
    reg = OrthoL1(net, 0.25, mode)
    want = _ref_reg_metrics(reg, 0.25)
    _check_reg_metrics(reg.metrics(), want, 1e-12)
    assert reg.step == 0  # metrics() is not a training step
    loss, m = reg.loss(metrics=True)
    _check_reg_metrics(m, want, 1e-12)
    _close(loss.item(), sum(d["penalty"] for d in want.values()), 1e-12, "loss")
    for p in net.parameters():
        p.grad = None
    value, m2 = reg.add_grad_(metrics=True)
    _check_reg_metrics(m2, want, 1e-12)
    assert reg.step == 2
    flat = reg.metrics(flat=True, prefix="ortho/")
    assert set(flat) == {f"ortho/{n}/{k}" for n in want for k in want[n]}
    assert all(type(v) is float for v in flat.values())
    _close(flat["ortho/0.weight/max_cos"], want["0.weight"]["max_cos"], 1e-12, "flat")


def test_orthol1_metrics_single_path_bfloat16():
    net = _net(1, torch.float32)
    net[0].to(torch.bfloat16)  # through the core one tensor at a time
    reg = OrthoL1(net, 0.5)
    want = _ref_reg_metrics(reg, 0.5)
    got = reg.metrics()
    _check_reg_metrics(got, want, 2e-5)


# -- schedules and every=k -----------------------------------------------------------------------------


def sched(step):
    return 0.2 * 0.9**step


def _hand_penalty(net, mode):
    """sum over matrices of sum |Gram - I| as torch ops (the hand-written loop's penalty)."""
    reg = OrthoL1(net, 1.0, mode)
    total = torch.zeros((), dtype=torch.float64)
    for t in reg.targets:
        V = t.view(t.param)
        G = V.transpose(1, 2) @ V
        total = total + (G - torch.eye(G.shape[-1], dtype=G.dtype)).abs().sum()
    return total


def _task(net, x):
    h = net[2](net[1](net[0](x)))
    return (
        (h * h).mean()
        + net[3](h[:, :, None, None].expand(-1, -1, 2, 2)).sum() * 0.01
        + (net.stack * 0.1).sum()
    )


@pytest.mark.parametrize("how", ["loss", "add_grad_", "step_"])
@pytest.mark.parametrize("every", [1, 3])
def test_schedule_and_every_equal_hand_loop(how, every):
    steps, lr = 8, 0.05
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 7, generator=g, dtype=torch.float64) for _ in range(steps)]
    a, b = _net(2), _net(2)
    reg = OrthoL1(a, sched, every=every)
    oa, ob = torch.optim.SGD(a.parameters(), lr=lr), torch.optim.SGD(b.parameters(), lr=lr)
    for s in range(steps):
        oa.zero_grad()
        if how == "loss":
            (_task(a, xs[s]) + reg.loss()).backward()
        elif how == "add_grad_":
            _task(a, xs[s]).backward()
            reg.add_grad_()
        else:
            _task(a, xs[s]).backward()
            reg.step_(lr)
        oa.step()
        assert reg.step == s + 1
        ob.zero_grad()
        loss = _task(b, xs[s])
        if s % every == 0:
            loss = loss + every * sched(s) * _hand_penalty(b, "auto")
        loss.backward()
        ob.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        _close(pa.detach().numpy(), pb.detach().numpy(), 1e-11, n)


def test_skipped_steps_compute_nothing():
    net = _net(3)
    reg = OrthoL1(net, 0.1, every=4)
    reg.step = 1
    z = reg.loss()
    assert z.item() == 0 and not z.requires_grad and z.dtype == torch.float64
    for p in net.parameters():
        p.grad = None
    assert reg.add_grad_().item() == 0 and all(p.grad is None for p in net.parameters())
    assert reg.loss(metrics=True)[1] == {}
    assert reg.step == 4 and reg.loss().item() > 0  # step 4: applies, with 4 * beta
    assert reg.beta == 0.1 and reg.every == 4


# -- checkpoints -------------------------------------------------------------------------------------


def _train(net, reg, opt, xs, first, last):
    for s in range(first, last):
        opt.zero_grad()
        (_task(net, xs[s]) + reg.loss()).backward()
        opt.step()


def test_resume_is_bit_identical():
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(4, 7, generator=g, dtype=torch.float64) for _ in range(15)]

    def fresh():
        net = _net(4)
        return net, OrthoL1(net, sched, every=3), torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    net, reg, opt = fresh()
    _train(net, reg, opt, xs, 0, 15)
    net1, reg1, opt1 = fresh()
    _train(net1, reg1, opt1, xs, 0, 7)
    buf = io.BytesIO()
    torch.save({"model": net1.state_dict(), "opt": opt1.state_dict(), "ortho": reg1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    net2, reg2, opt2 = fresh()
    net2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    reg2.load_state_dict(ck["ortho"])
    assert reg2.step == 7
    _train(net2, reg2, opt2, xs, 7, 15)
    for (n, p), q in zip(net.named_parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q), n
    # without the regularizer's state the resumed run differs (the test can fail)
    net3, reg3, opt3 = fresh()
    net3.load_state_dict(ck["model"])
    opt3.load_state_dict(ck["opt"])
    _train(net3, reg3, opt3, xs, 7, 15)
    assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), net3.parameters(), strict=True))


# -- bad inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, "x"])
def test_bad_schedule_value_raises_before_writing(bad):
    net = _net(6)
    reg = OrthoL1(net, lambda s: bad if s == 1 else 0.1)
    reg.add_grad_()
    before = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    with pytest.raises(ValueError, match="schedule returned .* at step 1"):
        reg.add_grad_()
    assert [p.grad for p in net.parameters() if p.grad is not None] and all(
        torch.equal(a, p.grad)
        for a, p in zip(before, (p for p in net.parameters() if p.grad is not None), strict=True)
    )
    assert reg.step == 1  # not advanced: the call can be retried after fixing the schedule
    with pytest.raises(ValueError, match="schedule"):
        reg.loss()
    with pytest.raises(ValueError, match="schedule"):
        reg.beta  # noqa: B018 - the property evaluates the schedule


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "2"])
def test_bad_every(every):
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        OrthoL1(_net(), 0.1, every=every)


def test_bad_beta_split_and_state():
    with pytest.raises(ValueError, match="beta"):
        OrthoL1(_net(), float("nan"))
    if torch.distributed.is_available() and not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="initialized process group"):
            OrthoL1(_net(), 0.1, split=object())
        assert OrthoL1(_net(), 0.1, split="auto")._split is None  # no group: nothing to split
    with pytest.raises(ValueError, match="split must be"):
        OrthoL1(_net(), 0.1, split="all")
    reg = OrthoL1(_net(), 0.1, every=3)
    with pytest.raises(ValueError, match="every=2"):
        reg.load_state_dict({"step": 4, "every": 2})
    with pytest.raises(ValueError, match="state_dict"):
        reg.load_state_dict({"steps": 4})
    with pytest.raises(ValueError, match="step must be"):
        reg.step = -1
    with pytest.raises(ValueError, match="metrics must be"):
        reg.loss(metrics="yes")


# -- the DDP split (gloo, spawned ranks) -------------------------------------------------------------


@pytest.fixture
def ddp_run(gloo_group):
    """(world, seed, per-rank results) of tests/_ddp_workers.py's cases, run in the run-wide gloo group of
    each world size (conftest.py's gloo_group, after tests/test_distributed.py's cases)."""
    return gloo_group["world"], gloo_group["seed"], gloo_group["ddp"]


@pytest.mark.parametrize("how", ["loss", "add_grad_"])
def test_ddp_split_equals_unsplit(ddp_run, how):
    world, seed, ranks = ddp_run
    for r, res in enumerate(ranks):
        assert not res["failures"], f"rank {r} (seed {seed}): {res['failures']}"
    whole, split = f"{how}-whole", f"{how}-split"
    shares = [set(res["cases"][split]["share"]) for res in ranks]
    n = len(ranks[0]["cases"][split]["names"])
    assert set().union(*shares) == set(range(n)) and sum(map(len, shares)) == n  # a partition
    assert all(shares)  # 6 matrices, flop-balanced: every rank has work
    for r, res in enumerate(ranks):
        a, b = res["cases"][whole], res["cases"][split]
        _close(b["values"], a["values"], 1e-12, f"rank {r}: the value returned is the full penalty")
        for name, p in a["params"].items():
            _close(b["params"][name], p, 1e-12, f"rank {r} {name} after 5 steps (seed {seed})")
        assert b["params"] == ranks[0]["cases"][split]["params"]  # DDP kept the ranks in step
        names = b["names"]
        assert b["metrics_names"] == sorted(names)
        assert b["loss_metrics_names"] == sorted(names[j] for j in b["share"])
    assert a["values"][0] > 0


def test_ddp_split_add_grad_after_backward_is_not_carried(ddp_run):
    """Why add_grad_() goes before backward() under split=: added after, DDP has already averaged
    .grad, so each rank steps with its own share only and the ranks drift apart."""
    world, seed, ranks = ddp_run
    whole = ranks[0]["cases"]["add_grad_-whole"]["params"]
    late = [res["cases"]["late"]["params"] for res in ranks]
    assert late[0] != late[1]
    assert any(not np.allclose(late[0][k], whole[k], rtol=1e-9, atol=0) for k in whole)


def test_ddp_bad_schedule_raises_on_every_rank(ddp_run):
    world, seed, ranks = ddp_run
    for r, res in enumerate(ranks):
        for what in ("nan", "negative"):
            msg = res["bad"][what]
            assert msg.startswith("ValueError unchanged=True step=1"), (r, what, msg)


class _Stateful:
    """A schedule object with its own state (a plateau-style factor), saved through state_dict."""

    def __init__(self):
        self.factor = 1.0

    def __call__(self, step):
        return 0.1 * self.factor

    def state_dict(self):
        return {"factor": self.factor}

    def load_state_dict(self, d):
        self.factor = d["factor"]


def test_stateful_schedule_and_repr():
    s = _Stateful()
    reg = OrthoL1(_net(7), s, every=2)
    s.factor = 0.25
    reg.loss()
    d = reg.state_dict()
    assert d == {"step": 1, "every": 2, "schedule": {"factor": 0.25}}
    s2 = _Stateful()
    reg2 = OrthoL1(_net(7), s2, every=2)
    reg2.load_state_dict(d)
    assert s2.factor == 0.25 and reg2.step == 1 and reg2.beta == pytest.approx(0.025)
    assert "every=2" in repr(reg2) and "schedule" in repr(reg2)


def test_schedule_under_torch_compile_breaks_the_graph_and_counts():
    net = _net(8)
    reg = OrthoL1(net, lambda s: 0.1 * (s + 1), every=2)
    ref = _hand_penalty(net, "auto").item()

    @torch.compile(backend="eager")
    def f():
        return reg.loss()

    got = [f().item() for _ in range(4)]
    assert reg.step == 4
    _close(got, [2 * 0.1 * ref, 0.0, 2 * 0.3 * ref, 0.0], 1e-12, "compiled loss per step")
