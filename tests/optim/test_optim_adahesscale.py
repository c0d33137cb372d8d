"""AdaHesScale: every update against the equations, written out element-wise, on hand-set g and ĥ."""

import io
import math
import re

import pytest
import torch

from hesscale.optim import AdaHesScale, MissingCurvatureError

from optim_helpers import (assert_rewound_optimizer_continues_identically, assert_steps_in_lockstep,  # noqa: F401
                           both_paths, draw)
from memory_helpers import memory_timeline
from optim_helpers import make_params as _make_params

SHAPES = [(3, 4), (4,), (2, 3)]


def make_params(shapes=SHAPES, seed=0, dtype=torch.float64):
    return _make_params(shapes, seed, dtype)


def reference_step(theta, m, v, g, h, t, lr, beta1, beta2, eps, wd, variant):
    """The update equations of the issue, one tensor at a time, without in-place tricks."""
    theta = theta - lr * wd * theta
    m = beta1 * m + (1 - beta1) * g
    curv = h * h if variant == "adam" else h.abs()
    v = beta2 * v + (1 - beta2) * curv
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    denom = v_hat + eps if variant == "newton" else torch.sqrt(v_hat) + eps
    return theta - lr * m_hat / denom, m, v


@pytest.mark.parametrize("variant", ["adam", "sqrt", "newton"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.usefixtures("both_paths")
def test_updates_follow_the_equations_step_by_step(variant, wd):
    params = make_params()
    hyper = [
        dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8),
        dict(lr=0.2, betas=(0.5, 0.9), eps=1e-3),  # a second group with its own hyperparameters
    ]
    groups = [dict(params=params[:2], **hyper[0]), dict(params=params[2:], **hyper[1])]
    opt = AdaHesScale(groups, weight_decay=wd, variant=variant)
    theta = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 6):
        gs, hs = draw(params, gen)
        opt.step()
        for i in range(len(params)):
            hp = hyper[0] if i < 2 else hyper[1]
            theta[i], m[i], v[i] = reference_step(
                theta[i], m[i], v[i], gs[i], hs[i], t, hp["lr"], *hp["betas"], hp["eps"], wd, variant
            )
            torch.testing.assert_close(params[i].detach(), theta[i], rtol=1e-12, atol=1e-12)
            assert opt.state[params[i]]["step"] == t


@pytest.mark.usefixtures("both_paths")
def test_first_step_is_gradient_over_abs_curvature():
    """Independent of the EMA algebra: at t = 1 the bias corrections give θ − lr·g / (|ĥ| + eps)."""
    (p,) = make_params([(5,)])
    theta0 = p.detach().clone()
    g = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    h = torch.tensor([2.0, -4.0, 0.25, 1.0, 10.0], dtype=torch.float64)
    p.grad, p.hess_diag = g, h
    AdaHesScale([p], lr=0.1, eps=1e-3).step()
    torch.testing.assert_close(p.detach(), theta0 - 0.1 * g / (h.abs() + 1e-3), rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("both_paths")
def test_constant_curvature_gives_newton_like_steps():
    """With constant g and ĥ, bias-corrected m and v are exactly g and ĥ² at every t."""
    (p,) = make_params([(4,)])
    g = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    h = torch.tensor([4.0, 2.0, -8.0, 1.0], dtype=torch.float64)
    for variant, expected in [("adam", g / (h.abs() + 1e-8)), ("newton", g / (h.abs() + 1e-8))]:
        q = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        opt = AdaHesScale([q], lr=1.0, variant=variant)
        for t in range(1, 4):
            q.grad, q.hess_diag = g.clone(), h.clone()
            opt.step()
            torch.testing.assert_close(q.detach(), -t * expected, rtol=1e-9, atol=1e-12)


def test_param_without_grad_is_skipped_and_others_step():
    a, b = make_params([(3,), (2,)])
    b0 = b.detach().clone()
    opt = AdaHesScale([a, b], lr=0.1)
    a.grad, a.hess_diag = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    opt.step()
    assert torch.equal(b.detach(), b0)
    assert len(opt.state[b]) == 0
    assert opt.state[a]["step"] == 1


def test_bias_corrections_count_each_parameters_own_steps():
    """A param that joins later has its own t (torch's convention); the group then mixes t = 1, 2."""
    a, b = make_params([(3,), (2,)])
    opt = AdaHesScale([a, b], lr=0.1, betas=(0.5, 0.7))
    theta = {0: a.detach().clone(), 1: b.detach().clone()}
    m = {0: torch.zeros(3, dtype=torch.float64), 1: torch.zeros(2, dtype=torch.float64)}
    v = {0: torch.zeros(3, dtype=torch.float64), 1: torch.zeros(2, dtype=torch.float64)}
    t = {0: 0, 1: 0}
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        active = [0] if step == 0 else [0, 1]
        draw([a, b], gen)
        if step == 0:
            b.grad = None
        gs = {i: p.grad.clone() for i, p in enumerate((a, b)) if i in active}
        hs = {i: p.hess_diag.clone() for i, p in enumerate((a, b)) if i in active}
        opt.step()
        for i in active:
            t[i] += 1
            theta[i], m[i], v[i] = reference_step(theta[i], m[i], v[i], gs[i], hs[i], t[i], 0.1, 0.5, 0.7, 1e-8, 0.0, "adam")
        torch.testing.assert_close(a.detach(), theta[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.detach(), theta[1], rtol=1e-12, atol=1e-12)
    assert (opt.state[a]["step"], opt.state[b]["step"]) == (4, 3)


def test_missing_hess_diag_is_an_error_naming_the_parameter():
    a, b = make_params([(3,), (2,)])
    opt = AdaHesScale([{"params": [a, b], "name": "actor"}])
    a.grad, a.hess_diag = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    b.grad = torch.ones(2, dtype=torch.float64)
    before = a.detach().clone()
    with pytest.raises(MissingCurvatureError, match=r"actor\[1\].*hess_diag"):
        opt.step()
    assert torch.equal(a.detach(), before)  # nothing stepped


def test_missing_hess_diag_uses_names_from_named_parameters():
    net = torch.nn.Linear(2, 1)
    opt = AdaHesScale(net.named_parameters())
    net(torch.ones(1, 2)).sum().backward()
    with pytest.raises(MissingCurvatureError, match="'weight'"):
        opt.step()


def test_hess_diag_of_the_wrong_shape_is_an_error():
    (p,) = make_params([(3,)])
    p.grad, p.hess_diag = torch.ones(3, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    with pytest.raises(MissingCurvatureError, match="shape"):
        AdaHesScale([p]).step()


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(lr=-1e-3), "-0.001"),
        (dict(betas=(1.0, 0.999)), "1.0"),
        (dict(betas=(0.9, -0.1)), "-0.1"),
        (dict(eps=0.0), "0.0"),
        (dict(eps=-1e-8), "-1e-08"),
        (dict(weight_decay=-0.1), "-0.1"),
        (dict(variant="adagrad"), "adagrad"),
        (dict(lr=float("nan")), "nan"),
    ],
)
def test_invalid_hyperparameters_are_rejected(kwargs, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        AdaHesScale(make_params(), **kwargs)


def test_invalid_hyperparameters_in_added_group_are_rejected():
    a, b = make_params([(2,), (2,)])
    opt = AdaHesScale([a])
    with pytest.raises(ValueError, match="-5"):
        opt.add_param_group({"params": [b], "lr": -5})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["grad", "hess_diag"])
@pytest.mark.usefixtures("both_paths")
def test_non_finite_group_is_skipped_with_state_untouched(bad, where):
    params = make_params()
    opt = AdaHesScale([{"params": params[:2], "name": "pi"}, {"params": params[2:], "name": "vf"}], lr=0.1)
    gen = torch.Generator().manual_seed(3)
    draw(params, gen)
    opt.step()
    snapshot = {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in params}
    theta = [p.detach().clone() for p in params]
    draw(params, gen)
    getattr(params[1], where)[0] = bad
    opt.step()
    assert opt.skipped_steps == 1
    assert opt.last_skipped_groups == {0}
    for p, t in zip(params[:2], theta[:2]):
        assert torch.equal(p.detach(), t)
        assert opt.state[p]["step"] == snapshot[p]["step"]
        assert torch.equal(opt.state[p]["exp_avg"], snapshot[p]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], snapshot[p]["exp_avg_sq"])
    assert not torch.equal(params[2].detach(), theta[2])  # the finite group still stepped
    assert opt.state[params[2]]["step"] == 2
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_hess_diag(set_to_none):
    params = make_params()
    opt = AdaHesScale(params)
    draw(params, torch.Generator().manual_seed(0))
    opt.zero_grad(set_to_none=set_to_none)
    for p in params:
        assert getattr(p, "hess_diag", None) is None
        assert p.grad is None if set_to_none else torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize("variant", ["adam", "newton"])
@pytest.mark.usefixtures("both_paths")
def test_state_dict_round_trip_continues_bit_identically(variant):
    params = make_params(dtype=torch.float32)
    opt = AdaHesScale([{"params": params[:1], "name": "a"}, {"params": params[1:], "lr": 0.3}], lr=0.1, variant=variant)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        draw(params, gen)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = AdaHesScale([{"params": clones[:1]}, {"params": clones[1:]}], lr=1.0, variant="sqrt")
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[1]["lr"] == 0.3 and opt2.param_groups[0]["variant"] == variant
    assert_steps_in_lockstep(opt, params, opt2, clones, gen, 3)


@pytest.mark.usefixtures("both_paths")
def test_mixed_dtypes_in_one_group():
    a = torch.nn.Parameter(torch.randn(3, dtype=torch.float32))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    a0, b0 = a.detach().clone(), b.detach().clone()
    for p in (a, b):
        p.grad = torch.full_like(p, 2.0)
        p.hess_diag = torch.full((3,), 4.0, dtype=torch.float64)  # cast for the float32 param
    AdaHesScale([a, b], lr=0.5, eps=1e-8).step()
    torch.testing.assert_close(a.detach(), a0 - 0.5 * 2.0 / 4.0)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * 2.0 / 4.0)


def test_closure_is_called_and_its_loss_returned():
    (p,) = make_params([(2,)])

    def closure():
        loss = (p**2).sum()
        p.grad = torch.autograd.grad(loss, p)[0]
        p.hess_diag = torch.full_like(p, 2.0)
        return loss

    loss = AdaHesScale([p]).step(closure)
    assert math.isfinite(float(loss.detach()))



@pytest.mark.usefixtures("both_paths")
def test_loading_a_checkpoint_into_a_used_optimizer_rewinds_it():
    params = make_params(dtype=torch.float32)
    opt = AdaHesScale(params, lr=0.1)
    gen = torch.Generator().manual_seed(6)
    assert_rewound_optimizer_continues_identically(opt, params, lambda ps: AdaHesScale(ps, lr=0.1), gen)


@pytest.mark.parametrize("variant", ["adam", "sqrt"])  # ĥ² and |ĥ| (the latter makes a temporary too)
def test_large_group_step_allocates_one_batch_of_temporaries(monkeypatch, variant):
    """A group above ``FLAT_LIMIT`` steps in batches of at most ``FLAT_LIMIT`` elements: the
    denominators it allocates are one tensor's, not the group's (8 tensors here), and the steps
    are those of the unbatched update."""
    from hesscale.optim import _base, _common

    monkeypatch.setattr(_common, "FLAT_LIMIT", 64 * 64)  # every 64×64 tensor a batch of its own
    twins = []
    for batched in (True, False):
        params = _make_params([(64, 64)] * 8, dtype=torch.float32)
        opt = AdaHesScale(params, lr=1e-2, variant=variant)
        if not batched:
            monkeypatch.setattr(_base, "element_batches", lambda sizes: [list(range(len(sizes)))])
        gen = torch.Generator().manual_seed(0)
        draw(params, gen)
        opt.step()  # the state exists before the measured step
        draw(params, gen)
        peak, end = memory_timeline(opt.step)
        twins.append((params, peak - end))
    (batched, extra_batched), (whole, extra_whole) = twins
    for p, q in zip(batched, whole):
        assert torch.equal(p.detach(), q.detach())
    one_tensor = 64 * 64 * 4
    assert extra_whole >= 8 * one_tensor  # the check can tell the two apart
    assert extra_batched < 3 * one_tensor  # a denominator (and |ĥ|), and a few scalars
