"""StepSizeScaling's fused route against its snapshot route (float64, 1e-10), for every optimizer it knows."""

import io

import pytest
import torch

from hesscale.optim import AdaHesScale, AdaHessian, StepSizeScaling, _fused, _updates

from optim_helpers import both_paths  # noqa: F401
from optim_helpers import make_params

SHAPES = [(3, 4), (4,), (2, 3), (3,), (5,)]

CASES = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
    "adam wd": lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.1),
    "adam amsgrad maximize": lambda ps: torch.optim.Adam(ps, lr=0.1, amsgrad=True, maximize=True),
    "adamw wd": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01),
    "rmsprop wd momentum": lambda ps: torch.optim.RMSprop(ps, lr=0.01, weight_decay=0.1, momentum=0.9),
    "rmsprop centered momentum": lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True, momentum=0.5),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd wd momentum dampening": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1, momentum=0.9, dampening=0.2),
    "sgd nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adahesscale": lambda ps: AdaHesScale(ps, lr=0.1),
    "adahesscale wd sqrt": lambda ps: AdaHesScale(ps, lr=0.1, weight_decay=0.1, variant="sqrt"),
    "adahesscale newton": lambda ps: AdaHesScale(ps, lr=0.1, variant="newton"),
}
BETAS = {"own beta": 0.999, "other beta": 0.9}  # 0.999 = the curvature optimizers' β2: their sqrt(v) is c


#: "own lr": every group steps alone; "shared options": pi, log_std and vf (an actor-critic's groups)
#: with equal options step as one flat batch on the fused route (each keeps its α)
OPTIONS = {"own lr": False, "shared options": True}


def grouped(params, shared=False):
    if shared:
        return [{"params": params[:2], "name": "pi"}, {"params": params[2:3], "name": "log_std"},
                {"params": params[3:], "name": "vf"}]
    return [{"params": params[:2], "name": "pi"}, {"params": params[2:], "name": "vf", "lr": 0.05}]


def pair(make, beta, seed=0, shared=False):
    """The same optimizer twice over equal parameters: fused and snapshot route."""
    a, b = make_params(SHAPES, seed), make_params(SHAPES, seed)
    fused = StepSizeScaling(make(grouped(a, shared)), delta=1e-3, beta=beta)
    snapshot = StepSizeScaling(make(grouped(b, shared)), delta=1e-3, beta=beta, fused=False)
    return (a, fused), (b, snapshot)


def set_grads(params_sets, gen, drop=None):
    """The same random g and ĥ on every set of params (``drop``: the index of a param left without grad)."""
    for i, shape in enumerate(SHAPES):
        g, h = torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)
        for ps in params_sets:
            ps[i].grad, ps[i].hess_diag = (None, None) if i == drop else (g.clone(), h.clone())


def assert_same(a, opt_a, b, opt_b):
    assert opt_a.last_scales.keys() == opt_b.last_scales.keys()
    for k in opt_a.last_scales:
        assert opt_a.last_scales[k] == pytest.approx(opt_b.last_scales[k], rel=1e-10, abs=1e-12)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-10)
        sa, sb = opt_a.optimizer.state[p], opt_b.optimizer.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(torch.as_tensor(sa[key]), torch.as_tensor(sb[key]), rtol=0, atol=1e-10)
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key in opt_a.state[p]:
            torch.testing.assert_close(opt_a.state[p][key], opt_b.state[q][key], rtol=0, atol=1e-10)


@pytest.mark.parametrize("shared", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("beta", BETAS.values(), ids=BETAS.keys())
@pytest.mark.parametrize("case", CASES)
def test_fused_route_equals_the_snapshot_route(case, beta, shared, both_paths, monkeypatch):
    (a, fused), (b, snapshot) = pair(CASES[case], beta, shared=shared)
    gathered = []  # the number of params of each flat gather (small chunks only)
    real_gather = _fused.gather_gh

    def counted_gather(chunk, *args):
        gathered.append(len(chunk.params))
        return real_gather(chunk, *args)

    monkeypatch.setattr(_fused, "gather_gh", counted_gather)
    gen = torch.Generator().manual_seed(1)
    for step in range(7):
        set_grads([a, b], gen, drop=3 if step == 2 else None)  # a step without one param's gradient
        if step == 4:  # one group skipped for a NaN: the groups' step counts differ from then on
            for ps in (a, b):
                ps[2].hess_diag[0] = float("nan")
        gathered.clear()
        fused.step()
        snapshot.step()
        assert (fused.last_route, snapshot.last_route) == ("fused", "snapshot")
        assert_same(a, fused, b, snapshot)
    assert fused.skipped_steps == snapshot.skipped_steps == 1
    assert min(fused.last_scales.values()) < 1.0  # the scaling acted
    batched = shared and both_paths == "flat"
    # the batch took one flat state; each group kept its own α (last_scales equal the snapshot's)
    assert ((0, 1, 2) in fused._layouts) == batched
    # after the skip, where step counts then differ, the batch's groups step on their own, without
    # a wasted gather into the batch first (SGD counts no steps: its batch stays one)
    split = batched and _updates.RULES[type(fused.optimizer)].step is not None
    assert ((0, 1, 2) in fused._split) == split
    alone = [len(g["params"]) for g in fused.param_groups]
    assert gathered == ([] if both_paths != "flat" else [sum(alone)] if batched and not split else alone)
    if both_paths == "per-tensor" and not isinstance(fused.optimizer, AdaHesScale):
        # c = sqrt(EMA) one parameter at a time: no group-sized c buffer kept between steps
        assert not any("c" in ch.buffers for _, chunks in fused._chunks.values() for ch in chunks)


@pytest.mark.parametrize("beta", BETAS.values(), ids=BETAS.keys())
@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1, "hessian_power": 0.5}], ids=["default", "wd power"])
@pytest.mark.usefixtures("both_paths")
def test_fused_route_equals_the_snapshot_route_for_adahessian(kwargs, beta):
    """AdaHessian draws ĥ itself (same generator seed on both sides) from gradients with a graph."""
    coef = torch.randn(sum(torch.Size(s).numel() for s in SHAPES), generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)

    def make(seed):
        return lambda ps: AdaHessian(ps, lr=0.1, generator=torch.Generator().manual_seed(seed), **kwargs)

    (a, fused), (b, snapshot) = pair(make(5), beta)
    for _ in range(4):
        for ps in (a, b):
            flat = torch.cat([p.reshape(-1) for p in ps])
            loss = 0.5 * (coef * flat**2).sum() + (flat**3).sum() / 3
            for p, g in zip(ps, torch.autograd.grad(loss, ps, create_graph=True)):
                p.grad = g
        fused.step()
        snapshot.step()
        assert (fused.last_route, snapshot.last_route) == ("fused", "snapshot")
        assert_same(a, fused, b, snapshot)


@pytest.mark.parametrize("shared", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("case", ["adam wd", "rmsprop wd momentum", "sgd wd momentum dampening", "adahesscale"])
@pytest.mark.usefixtures("both_paths")
def test_a_fused_checkpoint_continues_on_either_route(case, shared):
    """Saved after fused steps, loaded into a fresh fused and a fresh snapshot wrapper: all three
    continue alike; the wrapped optimizer's own state_dict loads into the plain optimizer too."""
    (a, fused), _ = pair(CASES[case], 0.9, shared=shared)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        set_grads([a], gen)
        fused.step()
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    copies = []
    for route in (True, False):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in a]
        opt = StepSizeScaling(CASES[case](grouped(ps, shared)), fused=route)
        buf.seek(0)
        opt.load_state_dict(torch.load(buf, weights_only=True))
        copies.append((ps, opt))
    plain = CASES[case](grouped([torch.nn.Parameter(p.detach().clone()) for p in a], shared))
    plain.load_state_dict(fused.optimizer.state_dict())  # what the wrapped optimizer holds is its own format
    for _ in range(3):
        set_grads([a] + [ps for ps, _ in copies], gen)
        for opt in [fused] + [opt for _, opt in copies]:
            opt.step()
        for ps, opt in copies:
            assert_same(a, fused, ps, opt)


def test_the_wrapped_state_is_the_format_of_the_optimizers_own_step():
    """After fused steps, the wrapped optimizer's state has its own keys and step type, and stepping it
    directly (without the wrapper) is its plain step."""
    for case in ("adam wd", "rmsprop wd momentum", "sgd wd momentum dampening", "adahesscale"):
        (a, fused), (b, _) = pair(CASES[case], 0.9)
        plain = CASES[case](grouped(b))
        gen = torch.Generator().manual_seed(4)
        for _ in range(2):
            set_grads([a, b], gen)
            fused.step()
            plain.step()
        for p, q in zip(a, b):
            sa, sb = fused.optimizer.state[p], plain.state[q]
            assert sa.keys() == sb.keys()
            for key in sa:
                assert type(sa[key]) is type(sb[key])
                if torch.is_tensor(sa[key]):
                    assert (sa[key].dtype, sa[key].shape) == (sb[key].dtype, sb[key].shape)
        with torch.no_grad():
            for p, q in zip(a, b):
                q.copy_(p)
        buf = io.BytesIO()
        torch.save(fused.optimizer.state_dict(), buf)
        buf.seek(0)
        plain.load_state_dict(torch.load(buf, weights_only=True))
        set_grads([a, b], gen)
        fused.optimizer.step()  # the wrapped optimizer alone, on state the fused route laid out
        plain.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-10)


def test_optimizers_without_a_rule_take_the_snapshot_route():
    params = make_params(SHAPES)

    class MyAdam(torch.optim.Adam):  # a subclass may step differently: no rule
        pass

    for inner, route in [(torch.optim.Adagrad(params), "snapshot"), (MyAdam(params), "snapshot"),
                         (torch.optim.Adam(params, foreach=True), "fused")]:
        opt = StepSizeScaling(inner)
        set_grads([params], torch.Generator().manual_seed(0))
        opt.step()
        assert opt.last_route == route


@pytest.mark.parametrize("case", ["adam wd", "sgd wd momentum dampening", "adahesscale"])
@pytest.mark.usefixtures("both_paths")
def test_the_wrapped_optimizer_and_the_wrapper_may_take_turns(case):
    """Each keeps its flat state valid when the other one stepped in between (its views replaced)."""
    (a, fused), (b, snapshot) = pair(CASES[case], 0.9)
    gen = torch.Generator().manual_seed(6)
    for who in ("inner", "wrapper", "inner", "wrapper", "inner"):
        set_grads([a, b], gen)
        for opt in (fused, snapshot):
            (opt.optimizer if who == "inner" else opt).step()
        assert_same(a, fused, b, snapshot)


@pytest.mark.parametrize("make", ["scaled adam", "scaled adahesscale", "adahesscale"])
def test_gradients_written_into_the_storage_step_as_fresh_ones(make):
    """``gradient_storage()`` offers, after a step, per-param views of the flat buffers that step
    gathered into; g and ĥ written there (as ``capture.backward(into=...)`` does) step exactly as
    the same values in fresh tensors, which the twin optimizer copies in."""
    build = {
        "scaled adam": lambda ps: StepSizeScaling(torch.optim.Adam(grouped(ps, True), lr=0.1), delta=1e-3, beta=0.9),
        "scaled adahesscale": lambda ps: StepSizeScaling(AdaHesScale(grouped(ps, True), lr=0.1), delta=1e-3),
        "adahesscale": lambda ps: AdaHesScale(grouped(ps, True), lr=0.1),
    }[make]
    a, b = make_params(SHAPES), make_params(SHAPES)
    opt_a, opt_b = build(a), build(b)
    assert opt_a.gradient_storage() == {}
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        set_grads([b], gen)
        storage = opt_a.gradient_storage()
        assert (set(storage) == set(a)) == (step > 0)
        for p, q in zip(a, b):
            if step > 0:  # the backward's writes: the values land in the storage, which becomes .grad
                g, h = storage[p]
                p.grad, p.hess_diag = g.copy_(q.grad), h.copy_(q.hess_diag)
            else:
                p.grad, p.hess_diag = q.grad.clone(), q.hess_diag.clone()
        opt_a.step()
        opt_b.step()
        for p, q in zip(a, b):
            assert torch.equal(p.detach(), q.detach())


def test_groups_of_different_dtypes_never_share_a_batch():
    """Equal options but float32 and float64 groups: each steps in its own flat chunk, as the
    snapshot route steps them."""
    def params():
        return [make_params(SHAPES[:2], dtype=torch.float32), make_params(SHAPES[2:], dtype=torch.float64)]

    (a32, a64), (b32, b64) = params(), params()
    fused = StepSizeScaling(AdaHesScale([{"params": a32, "name": "f32"}, {"params": a64, "name": "f64"}], lr=0.1), delta=1e-3)
    snapshot = StepSizeScaling(AdaHesScale([{"params": b32, "name": "f32"}, {"params": b64, "name": "f64"}], lr=0.1),
                               delta=1e-3, fused=False)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        for p, q in zip(a32 + a64, b32 + b64):
            g, h = torch.randn(p.shape, generator=gen, dtype=torch.float64), torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad, p.hess_diag = g.to(p.dtype), h.to(p.dtype)
            q.grad, q.hess_diag = g.to(q.dtype), h.to(q.dtype)
        fused.step()
        snapshot.step()
        assert fused.last_route == "fused"
        for p, q in zip(a32 + a64, b32 + b64):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)
    assert set(fused._layouts) == {0, 1}
