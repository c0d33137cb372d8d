"""The core against independent exact references (float64)."""
import pytest
import torch
from torch import nn

import hesscale
from reference import exact_diag_by_double_backward, hesscale_recursion

TOL = dict(rtol=1e-10, atol=1e-10)


def mlp(sizes, act=nn.Tanh):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class GaussianHead(nn.Module):
    """Outputs ``[mean | log_std]``; ``log_std`` is a bare parameter like SB3's."""

    def __init__(self, sizes, act=nn.Tanh, k=2):
        super().__init__()
        self.body = mlp(sizes + [k], act)
        self.log_std = nn.Parameter(torch.full((k,), -0.3))

    def forward(self, x):
        mean = self.body(x)
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=1)


def gaussian_nll(out, y):
    k = out.shape[1] // 2
    mean, log_std = out[:, :k], out[:, k:]
    return (0.5 * ((y - mean) / log_std.exp()) ** 2 + log_std).sum(1).mean()


def ppo_clip_loss(out, data):
    k = out.shape[1] // 2
    actions, old_logp, adv = data[:, :k], data[:, k], data[:, k + 1]
    dist = torch.distributions.Normal(out[:, :k], out[:, k:].exp())
    ratio = torch.exp(dist.log_prob(actions).sum(1) - old_logp)
    return -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()


def _case(name):
    torch.manual_seed(1)
    n = 6
    x = torch.randn(n, 4)
    if name == "mse":
        return mlp([4, 5, 5, 3]), nn.MSELoss(), x, torch.randn(n, 3)
    if name == "ce":
        return mlp([4, 5, 5, 3]), nn.CrossEntropyLoss(), x, torch.randint(0, 3, (n,))
    if name == "gaussian_nll":
        return GaussianHead([4, 5, 5]), gaussian_nll, x, torch.randn(n, 2)
    if name == "ppo_clip":
        model = GaussianHead([4, 5, 5])
        with torch.no_grad():
            actions = model(x)[:, :2] + 0.5 * torch.randn(n, 2)
        old_logp = -torch.rand(n) - 1.5
        data = torch.cat([actions, old_logp[:, None], torch.randn(n, 1)], dim=1)
        return model, ppo_clip_loss, x, data
    raise KeyError(name)


LOSSES = ["mse", "ce", "gaussian_nll", "ppo_clip"]


@pytest.mark.parametrize("loss", LOSSES)
def test_exact_equals_double_backward_loop(float64, loss):
    model, loss_fn, x, y = _case(loss)
    ours = hesscale.hessian_diagonal(model, loss_fn, x, y, method="exact")
    ref = exact_diag_by_double_backward(model, loss_fn, x, y)
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL)


@pytest.mark.parametrize("loss", LOSSES)
def test_hesscale_last_layer_and_leaf_params_exact(float64, loss):
    model, loss_fn, x, y = _case(loss)
    exact = hesscale.hessian_diagonal(model, loss_fn, x, y, method="exact")
    model.zero_grad()
    approx = hesscale.hessian_diagonal(model, loss_fn, x, y, method="hesscale")
    last = [k for k in exact if k.startswith(("4.", "body.4."))] + [k for k in exact if k == "log_std"]
    assert len(last) >= 2
    for k in last:
        torch.testing.assert_close(approx[k], exact[k], **TOL)
    # the earlier layers are approximations, but not zero
    assert approx["0.weight" if "0.weight" in approx else "body.0.weight"].abs().sum() > 0


@pytest.mark.parametrize("loss", LOSSES)
def test_grad_is_what_loss_backward_leaves(float64, loss):
    model, loss_fn, x, y = _case(loss)
    out = model(x)
    loss_fn(out, y).backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    hesscale.hessian_diagonal(model, loss_fn, x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], **TOL)


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU, nn.ELU, nn.SiLU])
def test_one_hidden_layer_mse_is_exact_everywhere(float64, act):
    torch.manual_seed(2)
    model = mlp([4, 6, 3], act)
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    exact = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y, method="exact")
    approx = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y, method="hesscale")
    for k in exact:
        torch.testing.assert_close(approx[k], exact[k], **TOL)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU])
@pytest.mark.parametrize("gn", [False, True])
def test_deep_net_equals_reference_recursion(float64, loss, act, gn):
    torch.manual_seed(3)
    model = mlp([4, 5, 6, 5, 3], act)
    _, loss_fn, x, y = _case(loss)
    method = "hesscale_gn" if gn else "hesscale"
    approx = hesscale.hessian_diagonal(model, loss_fn, x, y, method=method)
    ref = hesscale_recursion(model, loss_fn, x, y, gauss_newton=gn)
    assert approx.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(approx[k], ref[k], **TOL)


CLOSED_FORM_LOSSES = {
    "mse-mean": nn.MSELoss(), "mse-sum": nn.MSELoss(reduction="sum"),
    "ce-mean": nn.CrossEntropyLoss(), "ce-sum": nn.CrossEntropyLoss(reduction="sum"),
    "ce-ignore": nn.CrossEntropyLoss(ignore_index=1),
}


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
@pytest.mark.parametrize("name", CLOSED_FORM_LOSSES)
def test_autograd_route_equals_closed_forms(float64, name, method):
    """The closed-form outside gradient and per-sample output Hessian (MSE / CE: no autograd call)
    = autograd through the same loss as an opaque function (gradient and exact output Hessian)."""
    model, _, x, y = _case(name[:name.index("-")])
    loss_fn = CLOSED_FORM_LOSSES[name]
    runs = []
    for fn in (loss_fn, lambda o, t: loss_fn(o, t)):
        model.zero_grad()
        diag = hesscale.hessian_diagonal(model, fn, x, y, method=method)
        runs.append((diag, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (closed, closed_grad), (generic, generic_grad) = runs
    assert closed.keys() == generic.keys() == closed_grad.keys()
    for k in closed:
        torch.testing.assert_close(closed[k], generic[k], **TOL)
        torch.testing.assert_close(closed_grad[k], generic_grad[k], **TOL)


def test_gn_equals_hesscale_on_relu(float64):
    model, loss_fn, x, y = _case("ce")
    model = mlp([4, 5, 5, 3], nn.ReLU)
    a = hesscale.hessian_diagonal(model, loss_fn, x, y, method="hesscale")
    b = hesscale.hessian_diagonal(model, loss_fn, x, y, method="hesscale_gn")
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL)
    tanh = mlp([4, 5, 5, 3], nn.Tanh)
    a = hesscale.hessian_diagonal(tanh, loss_fn, x, y, method="hesscale")
    b = hesscale.hessian_diagonal(tanh, loss_fn, x, y, method="hesscale_gn")
    assert not torch.allclose(a["0.weight"], b["0.weight"])


def test_bl89_equals_hesscale_for_mse_and_uses_onehot_for_ce(float64):
    model, loss_fn, x, y = _case("mse")
    a = hesscale.hessian_diagonal(model, loss_fn, x, y, method="hesscale")
    b = hesscale.hessian_diagonal(model, loss_fn, x, y, method="bl89")
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL)
    model, loss_fn, x, y = _case("ce")
    bl89 = hesscale.hessian_diagonal(model, loss_fn, x, y, method="bl89")
    # the definition, by hand: D_z = onehot(y)·(p − p²)/N at the logits; last-layer bias is Σ_n D_z
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
        d_z = nn.functional.one_hot(y, 3) * (p - p**2) / len(y)
        h = model[3](model[2](model[1](model[0](x))))  # input of the last Linear
    torch.testing.assert_close(bl89["4.bias"], d_z.sum(0), **TOL)
    torch.testing.assert_close(bl89["4.weight"], d_z.t() @ h**2, **TOL)
    hs = hesscale.hessian_diagonal(model, loss_fn, x, y, method="hesscale")
    assert not torch.allclose(hs["4.bias"], bl89["4.bias"])


def _rel_l1(approx, exact):
    num = sum((approx[k] - exact[k]).abs().sum() for k in exact)
    return float(num / sum(exact[k].abs().sum() for k in exact))


def test_error_ordering_as_in_the_paper(float64):
    """Tanh MLP + CE, single-sample evaluations: HesScale beats BL89, GGN-MC(1), Hutchinson(1)."""
    torch.manual_seed(4)
    model = mlp([8, 16, 16, 5], nn.Tanh)
    errors = {m: 0.0 for m in ["hesscale", "bl89", "ggn_mc", "hutchinson"]}
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        x, y = torch.randn(1, 8), torch.randint(0, 5, (1,))
        exact = hesscale.hessian_diagonal(model, nn.CrossEntropyLoss(), x, y, method="exact")
        for m in errors:
            kw = dict(samples=1, generator=gen) if m in ("ggn_mc", "hutchinson") else {}
            errors[m] += _rel_l1(hesscale.hessian_diagonal(model, nn.CrossEntropyLoss(), x, y, method=m, **kw), exact)
    assert errors["hesscale"] < errors["bl89"]
    assert errors["hesscale"] < errors["ggn_mc"]
    assert errors["hesscale"] < errors["hutchinson"]


def test_ggn_equals_explicit_jt_h_j(float64):
    model, loss_fn, x, y = _case("ce")
    ours = hesscale.hessian_diagonal(model, loss_fn, x, y, method="ggn")
    params = list(model.parameters())
    out = model(x)
    h = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), out.detach()).reshape(out.numel(), -1)
    rows = []
    for o in out.reshape(-1):
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)]))
    jac = torch.stack(rows)
    ref = torch.diagonal(jac.t() @ h @ jac)
    torch.testing.assert_close(torch.cat([ours[k].reshape(-1) for k, _ in model.named_parameters()]), ref, **TOL)


def test_monte_carlo_estimators_converge(float64):
    model, loss_fn, x, y = _case("ce")
    gen = torch.Generator().manual_seed(0)
    ggn = hesscale.hessian_diagonal(model, loss_fn, x, y, method="ggn")
    exact = hesscale.hessian_diagonal(model, loss_fn, x, y, method="exact")
    mc = hesscale.hessian_diagonal(model, loss_fn, x, y, method="ggn_mc", samples=3000, generator=gen)
    hutch = hesscale.hessian_diagonal(model, loss_fn, x, y, method="hutchinson", samples=3000, generator=gen)
    assert _rel_l1(mc, ggn) < 0.1
    assert _rel_l1(hutch, exact) < 0.3


def test_exact_refuses_big_models():
    big = nn.Linear(300, 100)
    with pytest.raises(ValueError, match="limited to 20000"):
        hesscale.hessian_diagonal(big, nn.MSELoss(), torch.randn(2, 300), torch.randn(2, 100), method="exact")


def test_ggn_mc_refuses_non_likelihood_losses():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="MSELoss and nn.CrossEntropyLoss"):
        hesscale.hessian_diagonal(model, lambda o, t: (o - t).abs().mean(), torch.randn(4, 3), torch.randn(4, 2), method="ggn_mc")


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="hesscale_gn.*hutchinson"):
        hesscale.hessian_diagonal(nn.Linear(2, 2), nn.MSELoss(), torch.randn(3, 2), torch.randn(3, 2), method="hesian")


def test_cached_capture_follows_the_model_and_the_method(float64):
    """``hessian_diagonal`` reuses one capture per model and method; replacing a module or a
    parameter, or deleting a module, takes effect at the next call, as on a fresh copy."""
    import copy

    model, loss_fn, x, y = _case("mse")

    def check(method="hesscale"):
        fresh = copy.deepcopy(model)  # a new object: nothing cached for it
        ours = hesscale.hessian_diagonal(model, loss_fn, x, y, method=method)
        ref = hesscale.hessian_diagonal(fresh, loss_fn, x, y, method=method)
        assert ours.keys() == ref.keys() == dict(model.named_parameters()).keys()
        for k in ref:
            torch.testing.assert_close(ours[k], ref[k], **TOL)
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.hess_diag, ref[k], **TOL)

    for method in ["hesscale", "hesscale_gn", "hesscale", "hesscale_gn"]:
        check(method)
    model[2] = nn.Linear(5, 5)
    check()
    model[0].weight = nn.Parameter(torch.randn(5, 4))
    check()
    del model[3:]  # the tanh and the last Linear: the output now has 5 features
    y = torch.randn(len(x), 5)
    check()

