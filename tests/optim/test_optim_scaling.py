"""StepSizeScaling: Scaled Adam / Scaled AdaHesScale against §6's formula, and the torch/SB3 contract."""

import io
import math

import pytest
import torch
from stable_baselines3.common.utils import update_learning_rate

from hesscale.optim import AdaHesScale, MissingCurvatureError, StepSizeScaling

from optim_helpers import (assert_rewound_optimizer_continues_identically, assert_steps_in_lockstep,  # noqa: F401
                           both_paths, draw)
from optim_helpers import make_params as _make_params

SHAPES = [(3, 4), (4,), (2, 3), (3,)]


def make_params(shapes=SHAPES, seed=0, dtype=torch.float64):
    return _make_params(shapes, seed, dtype)


class RefAdam:
    """torch.optim.Adam's update, written out: u = lr·m̂/(sqrt(v̂)+eps) (+ AdaHesScale's v of ĥ²)."""

    def __init__(self, n, lr, betas=(0.9, 0.999), eps=1e-8, curvature_in_v=False):
        self.lr, (self.b1, self.b2), self.eps, self.curv = lr, betas, eps, curvature_in_v
        self.m, self.v, self.t = [0.0] * n, [0.0] * n, 0

    def update(self, gs, hs):
        self.t += 1
        us = []
        for i, (g, h) in enumerate(zip(gs, hs)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            x = h if self.curv else g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * x * x
            m_hat = self.m[i] / (1 - self.b1**self.t)
            v_hat = self.v[i] / (1 - self.b2**self.t)
            us.append(self.lr * m_hat / (torch.sqrt(v_hat) + self.eps))
        return us


class RefScaling:
    """§6: c = sqrt(EMA_beta(ĥ²)) (no bias correction), T = Σ c·u², α = min(max_scale, sqrt(2δ/T))."""

    def __init__(self, n, delta, max_scale=1.0, beta=0.999):
        self.delta, self.max_scale, self.beta = delta, max_scale, beta
        self.e = [0.0] * n

    def alpha(self, us, hs):
        total = 0.0
        for i, (u, h) in enumerate(zip(us, hs)):
            self.e[i] = self.beta * self.e[i] + (1 - self.beta) * h * h
            total += float((torch.sqrt(self.e[i]) * u * u).sum())
        return self.max_scale if total == 0 else min(self.max_scale, math.sqrt(2 * self.delta / total))


@pytest.mark.parametrize("delta", [1e-8, 1e-3, 1e3])
@pytest.mark.usefixtures("both_paths")
def test_scaled_adam_matches_the_formula(delta):
    params = make_params()
    theta = [p.detach().clone() for p in params]
    opt = StepSizeScaling(torch.optim.Adam(params, lr=0.1), delta=delta)
    ref, scal = RefAdam(len(params), lr=0.1), RefScaling(len(params), delta)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        gs, hs = draw(params, gen)
        us = ref.update(gs, hs)
        alpha = scal.alpha(us, hs)
        theta = [t - alpha * u for t, u in zip(theta, us)]
        opt.step()
        assert opt.last_scales[0] == pytest.approx(alpha, rel=1e-10)
        assert opt.last_scales[0] <= 1.0
        for p, t in zip(params, theta):
            torch.testing.assert_close(p.detach(), t, rtol=1e-10, atol=1e-12)
    if delta == 1e-8:
        assert opt.last_scales[0] < 0.01  # the test exercises real shrinking
    if delta == 1e3:
        assert opt.last_scales[0] == 1.0


@pytest.mark.parametrize("beta", [0.999, 0.9])  # equal to AdaHesScale's β2 (v reused), or not
@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.usefixtures("both_paths")
def test_scaled_adahesscale_matches_the_formula(beta, wd):
    params = make_params()
    theta = [p.detach().clone() for p in params]
    lr, delta = 0.1, 1e-4
    opt = StepSizeScaling(AdaHesScale(params, lr=lr, weight_decay=wd), delta=delta, beta=beta)
    ref, scal = RefAdam(len(params), lr=lr, curvature_in_v=True), RefScaling(len(params), delta, beta=beta)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        gs, hs = draw(params, gen)
        us = [u + lr * wd * t for u, t in zip(ref.update(gs, hs), theta)]  # decoupled decay is part of u
        alpha = scal.alpha(us, hs)
        theta = [t - alpha * u for t, u in zip(theta, us)]
        opt.step()
        assert opt.last_scales[0] == pytest.approx(alpha, rel=1e-10)
        for p, t in zip(params, theta):
            torch.testing.assert_close(p.detach(), t, rtol=1e-10, atol=1e-12)
    if beta == 0.999:
        assert len(opt.state) == 0  # AdaHesScale's own v served as c: no second EMA kept
    else:
        assert all("curvature_ema" in opt.state[p] for p in params)


@pytest.mark.usefixtures("both_paths")
def test_scaled_sgd_and_rmsprop_step_along_their_own_update():
    for make in (lambda ps: torch.optim.SGD(ps, lr=0.5), lambda ps: torch.optim.RMSprop(ps, lr=0.01)):
        params = make_params()
        plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt, base = StepSizeScaling(make(params), delta=1e-6), make(plain)
        gen = torch.Generator().manual_seed(3)
        gs, hs = draw(params, gen)
        for q, g in zip(plain, gs):
            q.grad = g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        base.step()
        us = [b - q.detach() for b, q in zip(before, plain)]
        alpha = RefScaling(len(params), 1e-6).alpha(us, hs)
        assert opt.last_scales[0] == pytest.approx(alpha, rel=1e-10)
        for p, b, u in zip(params, before, us):
            torch.testing.assert_close(p.detach(), b - alpha * u, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("max_scale", [0.25, 1.0, 3.0])
def test_alpha_never_exceeds_max_scale(max_scale):
    params = make_params()
    opt = StepSizeScaling(torch.optim.Adam(params, lr=1e-3), delta=1.0, max_scale=max_scale)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        draw(params, gen, hess_scale=1e-6)  # tiny curvature: sqrt(2δ/T) is huge
        opt.step()
        assert opt.last_scales[0] == max_scale


def test_alpha_one_leaves_the_wrapped_step_exactly():
    params = make_params(dtype=torch.float32)
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, base = StepSizeScaling(torch.optim.Adam(params, lr=0.01), delta=1e6), torch.optim.Adam(plain, lr=0.01)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        gs, _ = draw(params, gen)
        for q, g in zip(plain, gs):
            q.grad = g.clone()
        opt.step()
        base.step()
        assert opt.last_scales[0] == 1.0
        for p, q in zip(params, plain):
            assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("case", ["zero curvature", "zero update"])
def test_zero_T_gives_max_scale_without_dividing(case):
    params = make_params()
    opt = StepSizeScaling(torch.optim.SGD(params, lr=0.1), delta=1e-8, max_scale=0.5)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p) if case == "zero curvature" else torch.zeros_like(p)
        p.hess_diag = torch.zeros_like(p) if case == "zero curvature" else torch.ones_like(p)
    opt.step()
    assert opt.last_scales[0] == 0.5
    for p, b in zip(params, before):
        expected = b - 0.5 * 0.1 * p.grad
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("both_paths")
def test_scales_are_per_group_and_named():
    params = make_params()
    groups = [{"params": params[:2], "name": "pi"}, {"params": params[2:], "name": "vf"}]
    opt = StepSizeScaling(torch.optim.Adam(groups, lr=0.1), delta=1e-4)
    ref = RefAdam(len(params), lr=0.1)
    scal_pi, scal_vf = RefScaling(2, 1e-4), RefScaling(2, 1e-4)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        gs, hs = draw(params, gen)
        for p, h in zip(params[2:], hs[2:]):  # the critic's curvature is 100× larger
            p.hess_diag = 100 * h
        hs = hs[:2] + [100 * h for h in hs[2:]]
        us = ref.update(gs, hs)
        a_pi, a_vf = scal_pi.alpha(us[:2], hs[:2]), scal_vf.alpha(us[2:], hs[2:])
        opt.step()
        assert set(opt.last_scales) == {"pi", "vf"}
        assert opt.last_scales["pi"] == pytest.approx(a_pi, rel=1e-10)
        assert opt.last_scales["vf"] == pytest.approx(a_vf, rel=1e-10)
    assert opt.last_scales["vf"] < opt.last_scales["pi"]


def test_unnamed_groups_are_keyed_by_index():
    params = make_params()
    opt = StepSizeScaling(torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.1))
    draw(params, torch.Generator().manual_seed(0))
    opt.step()
    assert set(opt.last_scales) == {0, 1}


@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adam(ps, lr=0.1), lambda ps: AdaHesScale(ps, lr=0.1)])
@pytest.mark.usefixtures("both_paths")
def test_state_dict_round_trip_continues_bit_identically(make):
    params = make_params(dtype=torch.float32)
    opt = StepSizeScaling(make([{"params": params[:2], "name": "pi"}, {"params": params[2:]}]), delta=1e-5, beta=0.99)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        draw(params, gen)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # what SB3's save() does
    buf.seek(0)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = StepSizeScaling(make([{"params": clones[:2], "name": "pi"}, {"params": clones[2:]}]))
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert (opt2.delta, opt2.beta, opt2.skipped_steps) == (1e-5, 0.99, 0)
    assert_steps_in_lockstep(opt, params, opt2, clones, gen, 3, same=lambda a, b: a.last_scales == b.last_scales)


def test_sb3_update_learning_rate_reaches_the_wrapped_optimizer():
    params = make_params()
    inner = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    opt = StepSizeScaling(inner, delta=1e3)
    update_learning_rate(opt, 0.025)
    assert [g["lr"] for g in inner.param_groups] == [0.025, 0.025]
    assert opt.param_groups is inner.param_groups
    before = [p.detach().clone() for p in params]
    gs, hs = draw(params, torch.Generator().manual_seed(8))
    opt.step()
    us = RefAdam(len(params), lr=0.025).update(gs, hs)
    for p, b, u in zip(params, before, us):
        torch.testing.assert_close(p.detach(), b - u, rtol=1e-10, atol=1e-12)


def test_lr_survives_load_state_dict_sharing():
    """After load_state_dict replaces the wrapped groups, SB3's lr updates must still reach them."""
    params = make_params()
    opt = StepSizeScaling(torch.optim.Adam(params, lr=0.1))
    opt.load_state_dict(opt.state_dict())
    update_learning_rate(opt, 0.5)
    assert opt.optimizer.param_groups[0]["lr"] == 0.5


def test_is_a_torch_optimizer_and_works_with_lr_schedulers():
    params = make_params()
    opt = StepSizeScaling(torch.optim.Adam(params, lr=1.0))
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    draw(params, torch.Generator().manual_seed(0))
    opt.step()
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.5
    assert "StepSizeScaling" in repr(opt) and "Adam" in repr(opt)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_grad_and_hess_diag(set_to_none):
    params = make_params()
    opt = StepSizeScaling(torch.optim.Adam(params))
    draw(params, torch.Generator().manual_seed(0))
    opt.zero_grad(set_to_none=set_to_none)
    for p in params:
        assert getattr(p, "hess_diag", None) is None
        assert p.grad is None if set_to_none else torch.count_nonzero(p.grad) == 0


def test_closure_is_evaluated_first_and_its_loss_returned():
    (p,) = make_params([(3,)])
    opt = StepSizeScaling(torch.optim.Adam([p], lr=0.1))
    losses = []

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        p.hess_diag = torch.full_like(p, 2.0)
        losses.append(loss.detach())
        return losses[-1]

    before = p.detach().clone()
    assert opt.step(closure) is losses[0]
    assert len(losses) == 1 and not torch.equal(p.detach(), before)


def test_missing_hess_diag_names_the_parameter_before_anything_steps():
    params = make_params()
    inner = torch.optim.Adam([{"params": params, "name": "critic"}], lr=0.1)
    opt = StepSizeScaling(inner)
    draw(params, torch.Generator().manual_seed(0))
    params[3].hess_diag = None
    before = [p.detach().clone() for p in params]
    with pytest.raises(MissingCurvatureError, match=r"critic\[3\]"):
        opt.step()
    assert len(inner.state) == 0
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adam(ps, lr=0.1), lambda ps: AdaHesScale(ps, lr=0.1)])
@pytest.mark.parametrize("where", ["grad", "hess_diag"])
@pytest.mark.usefixtures("both_paths")
def test_non_finite_group_is_skipped_and_wrapped_state_untouched(make, where):
    params = make_params()
    opt = StepSizeScaling(make([{"params": params[:2], "name": "pi"}, {"params": params[2:], "name": "vf"}]), beta=0.9)
    gen = torch.Generator().manual_seed(9)
    draw(params, gen)
    opt.step()
    inner_state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.optimizer.state[p].items()} for p in params}
    own_state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    before = [p.detach().clone() for p in params]
    draw(params, gen)
    getattr(params[1], where)[2] = float("nan")  # not the first tensor of the group
    grads_before = [p.grad for p in params]
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(params[:2], before[:2]):
        assert torch.equal(p.detach(), b)
        for k, v in inner_state[p].items():
            assert torch.equal(torch.as_tensor(opt.optimizer.state[p][k]), torch.as_tensor(v))
        for k, v in own_state[p].items():
            assert torch.equal(opt.state[p][k], v)
    assert not torch.equal(params[2].detach(), before[2])
    assert all(torch.isfinite(p).all() for p in params)
    assert all(p.grad is g for p, g in zip(params, grads_before))  # hidden grads are put back


def test_adam_at_lr_one_diverges_where_scaled_adam_stays_finite():
    """y = exp(Xw) regression (float32), exact curvature by torch.func (8 parameters)."""
    torch.manual_seed(0)
    x = 2.0 * torch.randn(32, 8)
    y = torch.exp(x @ (0.2 * torch.randn(8)))

    def loss_fn(w):
        return ((torch.exp(x @ w) - y) ** 2).mean()

    def run(opt_fn, steps=60):
        w = torch.nn.Parameter(torch.zeros(8))
        opt, losses = opt_fn([w]), []
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(w)
            loss.backward()
            w.hess_diag = torch.func.hessian(loss_fn)(w.detach()).diagonal()
            opt.step()
            losses.append(loss.item())
        return losses + [loss_fn(w.detach()).item()]

    adam = run(lambda ps: torch.optim.Adam(ps, lr=1.0))
    assert not math.isfinite(max(adam)) or max(adam) > 1e3 * adam[0]  # diverged
    for delta in (1e-8, 1e-4):
        scaled = run(lambda ps: StepSizeScaling(torch.optim.Adam(ps, lr=1.0), delta=delta))
        assert all(math.isfinite(v) for v in scaled)
        assert max(scaled) <= scaled[0] * (1 + 1e-6)
        assert scaled[-1] < scaled[0]
    assert scaled[-1] < 0.1 * scaled[0]  # with δ = 1e-4 it actually fits


@pytest.mark.parametrize(
    "kwargs, bad",
    [(dict(delta=0.0), "0.0"), (dict(delta=-1.0), "-1.0"), (dict(max_scale=0.0), "0.0"), (dict(beta=1.0), "1.0"),
     (dict(max_scale=-2.0), "-2.0")],
)
def test_invalid_hyperparameters_are_rejected(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        StepSizeScaling(torch.optim.Adam(make_params()), **kwargs)


def test_wrapping_a_non_optimizer_is_a_type_error():
    with pytest.raises(TypeError):
        StepSizeScaling(object())
    with pytest.raises(TypeError):
        StepSizeScaling(StepSizeScaling(torch.optim.Adam(make_params())))


def test_factory_builds_a_scaled_optimizer_the_way_sb3_calls_it():
    import pickle

    factory = StepSizeScaling.factory(torch.optim.Adam, delta=1e-6, max_scale=0.5)
    factory = pickle.loads(pickle.dumps(factory))
    opt = factory(make_params(), lr=3e-4, eps=1e-5)  # SB3: optimizer_class(params, lr=..., **optimizer_kwargs)
    assert isinstance(opt, StepSizeScaling) and isinstance(opt.optimizer, torch.optim.Adam)
    assert (opt.delta, opt.max_scale) == (1e-6, 0.5)
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["eps"] == 1e-5


@pytest.mark.usefixtures("both_paths")
def test_mixed_dtypes_in_one_group_sum_into_one_T():
    a = torch.nn.Parameter(torch.randn(4, dtype=torch.float32))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = StepSizeScaling(torch.optim.SGD([a, b], lr=1.0), delta=1e-3, beta=0.5)
    before = [a.detach().clone(), b.detach().clone()]
    for p in (a, b):
        p.grad = torch.ones_like(p)
        p.hess_diag = torch.full_like(p, 4.0)
    opt.step()
    total = (4 + 3) * math.sqrt(0.5 * 16.0) * 1.0  # Σ c·u² with u = 1, c = sqrt((1−β)·16)
    alpha = math.sqrt(2e-3 / total)
    assert opt.last_scales[0] == pytest.approx(alpha, rel=1e-6)
    torch.testing.assert_close(a.detach(), before[0] - alpha)
    torch.testing.assert_close(b.detach(), before[1] - alpha)


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adam(ps, lr=0.1), lambda ps: AdaHesScale(ps, lr=0.1)])
def test_loading_a_checkpoint_into_a_used_wrapper_rewinds_it(make):
    params = make_params(dtype=torch.float32)
    opt = StepSizeScaling(make(params), delta=1e-4, beta=0.9)
    gen = torch.Generator().manual_seed(6)
    assert_rewound_optimizer_continues_identically(
        opt, params, lambda ps: StepSizeScaling(make(ps)), gen,
        same=lambda a, b: a.last_scales == b.last_scales,
    )


def test_infinite_T_means_no_step():
    """ĥ = 1e30 is finite but ĥ² overflows float32: T = inf, α = 0, θ stays (up to rounding)."""
    p = torch.nn.Parameter(torch.randn(5))
    before = p.detach().clone()
    opt = StepSizeScaling(torch.optim.SGD([p], lr=0.1))
    p.grad, p.hess_diag = torch.ones(5), torch.full((5,), 1e30)
    opt.step()
    assert opt.last_scales[0] == 0.0
    torch.testing.assert_close(p.detach(), before)


def test_the_wrapper_is_initialised_by_torch_and_its_step_hooks_run():
    """torch's Optimizer.__init__ ran (every attribute it sets is there), the groups are shared, and
    step hooks registered through torch's public API fire around the scaled step (also after pickling)."""
    import pickle

    params = make_params()
    inner = torch.optim.Adam(params, lr=0.1)
    opt = StepSizeScaling(inner)
    assert set(vars(torch.optim.Adam(make_params(), lr=0.1))) - {"state"} <= set(vars(opt))
    assert opt.param_groups is inner.param_groups and opt.defaults is inner.defaults
    for o in (opt, pickle.loads(pickle.dumps(opt))):
        calls = []
        o.register_step_pre_hook(lambda *_: calls.append("pre"))
        o.register_step_post_hook(lambda *_: calls.append("post"))
        draw([p for g in o.param_groups for p in g["params"]], torch.Generator().manual_seed(0))
        o.step()
        assert calls == ["pre", "post"]


def test_skip_counts_and_scales_are_read_through_the_protocols():
    from hesscale.optim import CountsSkippedSteps, ReportsStepScales

    params = make_params()
    scaled, plain, own = StepSizeScaling(AdaHesScale(params)), torch.optim.Adam(params), AdaHesScale(params)
    assert isinstance(scaled, CountsSkippedSteps) and isinstance(scaled, ReportsStepScales)
    assert isinstance(own, CountsSkippedSteps) and not isinstance(own, ReportsStepScales)
    assert not isinstance(plain, CountsSkippedSteps) and not isinstance(plain, ReportsStepScales)
    draw(params, torch.Generator().manual_seed(0))
    params[0].grad[0] = float("nan")
    scaled.step()
    assert scaled.skipped_steps == 1 == scaled.optimizer.skipped_steps  # the wrapper's count covers its optimizer's
