"""The fused route (gradient and curvature in one reverse pass) against the unfused one.

``capture(..., fused=False)`` is autograd's whole backward followed by the separate sweep; both
must leave the same ``.grad``, ``.hess_diag`` and per-sample diagonals (float64, 1e-10) on every
module chain with a rule, at fan-out, for repeated calls, leaf parameters and every loss kind.
``capture.routes`` says which route each module took. Between forward and backward the fused
route keeps only what its rules read, as autograd keeps only what its nodes save.
"""

import pytest
import torch
from torch import nn

import hesscale
from memory_helpers import memory_timeline
from test_core_exactness import LOSSES, _case
from test_core_modules import CONV_CHAINS, RESHAPE_AND_POOL_CHAINS

TOL = dict(rtol=1e-10, atol=1e-10)
ACTS = [nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.Softplus, nn.SiLU, nn.GELU, nn.Hardtanh]


def _run(model, loss_of, fused, method="hesscale", per_sample=False, leaf_params=(), given=None):
    """``{name: (grad, hess_diag, hess_diag_per_sample)}`` and the capture, for one route."""
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.hess_diag = p.hess_diag_per_sample = None
    with hesscale.capture(model, leaf_params=leaf_params, method=method, per_sample=per_sample, fused=fused) as cap:
        loss, closed = loss_of(model)
    cap.backward(loss, output_hessians=closed)
    return {n: (p.grad, p.hess_diag, p.hess_diag_per_sample) for n, p in model.named_parameters()}, cap


def _assert_routes_agree(model, loss_of, **kw):
    fused, cap = _run(model, loss_of, True, **kw)
    unfused, _ = _run(model, loss_of, False, **kw)
    assert fused.keys() == unfused.keys()
    for name in fused:
        for a, b in zip(fused[name], unfused[name]):
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, **TOL, msg=name)
    return cap


def _mlp(act, sizes=(4, 6, 5, 3)):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
@pytest.mark.parametrize("act", ACTS)
def test_activation_chains_agree_and_are_fused(float64, act, method):
    torch.manual_seed(1)
    model, x, y = _mlp(act), torch.randn(7, 4), torch.randn(7, 3)
    cap = _assert_routes_agree(model, lambda m: (nn.functional.mse_loss(m(x), y), None), method=method, per_sample=True)
    assert set(cap.routes.values()) == {"fused"} and len(cap.routes) == len(model)


@pytest.mark.parametrize("loss", LOSSES)
def test_losses_and_leaf_parameters_agree(float64, loss):
    """MSE, cross-entropy (autograd output Hessians), a Gaussian NLL reading a bare ``log_std``
    parameter, PPO's clipped surrogate."""
    model, loss_fn, x, y = _case(loss)
    _assert_routes_agree(model, lambda m: (loss_fn(m(x), y), None))


def test_closed_form_output_hessians_agree(float64):
    torch.manual_seed(2)
    model, x, y = _mlp(nn.Tanh), torch.randn(5, 4), torch.randn(5, 3)

    def loss_of(m):
        out = m(x)
        return nn.functional.mse_loss(out, y), {out: torch.full_like(out, 2 / out.numel())}

    _assert_routes_agree(model, loss_of)


def test_closed_form_outside_gradients_replace_autograd(float64):
    """``output_grads``: the caller's ∂L/∂output for two heads and ∂L/∂s for a parameter outside the
    capture give what autograd's route gives (``.grad`` and ĥ on every parameter), without an
    autograd call; the misuses are refused with the reason."""
    torch.manual_seed(3)
    trunk, head_a, head_b = _mlp(nn.Tanh, (4, 6, 5)), nn.Linear(5, 2), nn.Linear(5, 1)
    scale = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
    x, y = torch.randn(6, 4), torch.randn(6, 2)

    def forward():
        z = trunk(x)
        return head_a(z), head_b(z)

    def loss_of(a, b):  # Σ_n [scale·‖a_n − y_n‖² + b_n²] / N: its derivatives in closed form below
        return (scale * (a - y).square().sum(1) + b.square().sum(1)).mean()

    def run(closed):
        for p in [*trunk.parameters(), *head_a.parameters(), *head_b.parameters(), scale]:
            p.grad = None
        with hesscale.capture([trunk, head_a, head_b]) as cap:
            a, b = forward()
        loss = loss_of(a, b)
        n = a.shape[0]
        c = float(scale.detach())
        hessians = {a: torch.full_like(a, 2 * c / n), b: torch.full_like(b, 2 / n)}
        grads = {a: 2 * c * (a - y).detach() / n, b: 2 * b.detach() / n,
                 scale: (a - y).detach().square().sum(1).mean()} if closed else None
        calls = []
        original = torch.autograd.grad
        torch.autograd.grad = lambda *args, **kw: calls.append(1) or original(*args, **kw)
        try:
            cap.backward(loss, output_hessians=hessians, external_grads=[scale], output_grads=grads)
        finally:
            torch.autograd.grad = original
        params = [*trunk.parameters(), *head_a.parameters(), *head_b.parameters()]
        return [p.grad.clone() for p in params] + [scale.grad.clone()], [p.hess_diag for p in params], len(calls)

    g_closed, h_closed, autograd_calls = run(closed=True)
    g_auto, h_auto, _ = run(closed=False)
    assert autograd_calls == 0
    for u, v in zip(g_closed + h_closed, g_auto + h_auto):
        torch.testing.assert_close(u, v, **TOL)

    with hesscale.capture([trunk, head_a, head_b]) as cap:
        a, b = forward()
    with pytest.raises(ValueError, match="needs its Hessian in output_hessians"):
        cap.backward(loss_of(a, b), output_grads={a: torch.zeros_like(a)})
    with hesscale.capture([trunk, head_a, head_b]) as cap:
        a, b = forward()
    with pytest.raises(ValueError, match="captured module's parameter gets its gradient from the sweep"):
        cap.backward(loss_of(a, b), output_hessians={a: torch.ones_like(a)},
                     output_grads={a: torch.zeros_like(a), head_a.weight: torch.zeros_like(head_a.weight)})


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("name", [*CONV_CHAINS, *RESHAPE_AND_POOL_CHAINS])
def test_conv_pool_reshape_chains_agree(float64, name, per_sample):
    torch.manual_seed(8)
    if name in CONV_CHAINS:
        model = CONV_CHAINS[name]()
        x = torch.randn(3, 2, 6) if name == "conv1d" else torch.randn(3, 2, 6, 6)
    else:
        build, shape = RESHAPE_AND_POOL_CHAINS[name]
        model, x = build(), torch.randn(*shape)
    y = torch.randint(0, 3, (x.shape[0],))
    cap = _assert_routes_agree(model, lambda m: (nn.functional.cross_entropy(m(x), y), None), per_sample=per_sample)
    convs = [str(i) for i, m in enumerate(model) if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert all(cap.routes[i] == "fused" for i in [*convs, str(len(model) - 1)])  # convolutions, the last Linear


@pytest.mark.parametrize("train", [True, False])
def test_normalisation_dropout_embedding_agree(float64, train):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.BatchNorm1d(6), nn.Dropout(0.3),
                          nn.Linear(6, 3)).train(train)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    state = torch.get_rng_state()

    def loss_of(m):
        torch.set_rng_state(state)  # the same dropout mask on both routes
        return nn.functional.mse_loss(m(x), y), None

    cap = _assert_routes_agree(model, loss_of)
    assert cap.routes["1"] == "autograd" and cap.routes["5"] == "fused"
    emb = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2))
    idx = torch.tensor([[0, 3], [5, 3], [6, 1]])
    _assert_routes_agree(emb, lambda m: (m(idx).square().sum(), None))


class FanOut(nn.Module):
    """A trunk read by two captured heads and by the loss directly; one head called twice."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.a, self.b = nn.Linear(5, 2), nn.Sequential(nn.Linear(5, 3), nn.Sigmoid())

    def forward(self, x):
        h = self.trunk(x)
        return self.a(h), self.b(h), self.a(self.trunk(x + 1)), h


def test_fan_out_repeated_calls_and_outside_reads_agree(float64):
    torch.manual_seed(4)
    model, x = FanOut(), torch.randn(6, 4)

    def loss_of(m):
        a, b, a2, h = m(x)
        return (a.sin().sum() + (b * b.cos()).sum() + a2.square().mean() + h.exp().mean()), None

    cap = _assert_routes_agree(model, loss_of, per_sample=True)
    assert set(cap.routes.values()) == {"fused"}


@pytest.mark.parametrize("external", [True, "list"])
def test_external_parameters_get_the_gradient_loss_backward_gives(float64, external):
    torch.manual_seed(5)
    actor, critic = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), nn.Linear(2, 1)
    x = torch.randn(5, 3)
    results = []
    for fused in (True, False):
        actor.zero_grad(set_to_none=True)
        critic.zero_grad(set_to_none=True)
        with hesscale.capture(actor, fused=fused) as cap:
            loss = critic(torch.tanh(actor(x))).square().mean()
        cap.backward(loss, external_grads=True if external is True else list(critic.parameters()))
        results.append([p.grad.clone() for p in [*actor.parameters(), *critic.parameters()]]
                       + [p.hess_diag for p in actor.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)
    plain = [p.grad.clone() for p in [*actor.parameters(), *critic.parameters()]]
    actor.zero_grad(set_to_none=True)
    critic.zero_grad(set_to_none=True)
    critic(torch.tanh(actor(x))).square().mean().backward()
    for a, p in zip(plain, [*actor.parameters(), *critic.parameters()]):
        torch.testing.assert_close(a, p.grad, **TOL)


def test_grad_accumulates_like_loss_backward(float64):
    torch.manual_seed(6)
    model, x, y = _mlp(nn.ReLU), torch.randn(5, 4), torch.randn(5, 3)
    model(x).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    with hesscale.capture(model) as cap:
        loss = nn.functional.mse_loss(model(x), y)
    cap.backward(loss)
    model2 = _mlp(nn.ReLU)
    model2.load_state_dict(model.state_dict())
    nn.functional.mse_loss(model2(x), y).backward()
    for b, p, q in zip(before, model.parameters(), model2.parameters()):
        torch.testing.assert_close(p.grad, b + q.grad, **TOL)


def test_forward_wrappers_are_set_only_inside_the_block():
    model = _mlp(nn.Tanh)
    cap = hesscale.capture(model)
    assert all("forward" not in m.__dict__ for m in model)
    with cap:
        assert all("forward" in m.__dict__ for m in model)
        with torch.no_grad():
            out = model(torch.randn(2, 4))  # no recording under no_grad
        assert not cap._calls and not out.requires_grad
    assert all("forward" not in m.__dict__ for m in model)


@pytest.mark.parametrize("net", ["tanh", "sigmoid", "relu", "elu", "conv"])
def test_fused_forward_keeps_what_autograd_saves(net):
    """Between forward and backward the fused route holds no more tensor memory than autograd's own
    graph (a Linear keeps its input, a tanh/sigmoid/ReLU its output; the pre-activations are freed)."""
    torch.manual_seed(0)
    if net == "conv":
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
        x = torch.randn(16, 3, 8, 8)
    else:
        act = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "elu": nn.ELU}[net]
        model = nn.Sequential(nn.Linear(17, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 6))
        x = torch.randn(64, 17)
    cap = hesscale.capture(model)

    def captured():
        with cap:
            return model(x)

    assert memory_timeline(captured)[1] <= memory_timeline(lambda: model(x))[1]
    cap.backward(captured().sum())  # and the record is still complete for a backward
    assert cap.routes and set(cap.routes.values()) == {"fused"}


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU])
def test_sweep_peaks_near_autograds_backward(act):
    """The reverse walk's working set: each rule frees its incoming ``(g, D)`` after their last use
    (:meth:`~hesscale.rules.base.Rule.fused_backward_from`), a Linear makes its curvature half
    first, the tanh/sigmoid pairs overwrite the streams the engine owns (:class:`~hesscale.rules.base.Streams`). One
    ``hessian_diagonal`` (gradient and ĥ) then peaks at 1.39× what forward + ``loss.backward()``
    peak at on SB3's 64×64 net, N = 64, for all three (before these changes: 1.89×, 2.06×, 1.72×)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(17, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 6))
    x, y = torch.randn(64, 17), torch.randn(64, 6)

    def first_order():
        model.zero_grad(set_to_none=True)
        nn.MSELoss()(model(x), y).backward()

    def curvature():
        model.zero_grad(set_to_none=True)
        hesscale.hessian_diagonal(model, nn.MSELoss(), x, y)

    curvature()  # the capture is made and cached
    assert memory_timeline(curvature)[0] <= 1.45 * memory_timeline(first_order)[0]


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid])
def test_the_callers_tensors_are_never_overwritten(act, float64):
    """The activation pairs overwrite their incoming ``(g, D)`` only when the engine owns them (a
    fused rule's fresh result, or a sum): never the caller's closed forms, which here flow straight
    into a pair (the loss ``½·Σ w·y²`` reads the last activation's output). The result equals the
    unfused route's, where nothing is overwritten."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), act(), nn.Linear(5, 4), act())
    x, w = torch.randn(6, 3), torch.rand(6, 4)
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with hesscale.capture(model, fused=fused) as cap:
            out = model(x)
        g, d = w * out.detach(), w.clone()
        kept = g.clone(), d.clone()
        if fused:
            cap.backward(None, output_hessians={out: d}, output_grads={out: g})
        else:
            cap.backward(0.5 * (w * out**2).sum(), output_hessians={out: d})
        assert torch.equal(g, kept[0]) and torch.equal(d, kept[1])
        results.append([(p.grad.clone(), p.hess_diag.clone()) for p in model.parameters()])
    for (g1, h1), (g2, h2) in zip(*results):
        torch.testing.assert_close(g1, g2, **TOL)
        torch.testing.assert_close(h1, h2, **TOL)


def test_a_freed_outputs_id_is_not_taken_for_a_captured_output():
    """The engine holds a fused call's output weakly; a new tensor that reuses a freed output's id
    is no captured output (CPython reuses the id of a freed object at once)."""
    model = _mlp(nn.Tanh)
    with hesscale.capture(model) as cap:
        hidden = model[0](torch.randn(2, 4))
        freed = id(hidden)
        assert cap.is_captured_output(hidden) and cap.outputs(model[0]) == [hidden]
        del hidden
        assert cap.outputs(model[0]) == [None]
        reused = next((t for t in (torch.zeros(1) for _ in range(1000)) if id(t) == freed), None)
        if reused is None:
            pytest.skip("no tensor reused the freed id")
        assert not cap.is_captured_output(reused)


def test_backward_without_a_loss_needs_the_closed_forms_on_the_fused_route():
    model, x = _mlp(nn.Tanh), torch.randn(3, 4)
    for fused in (True, False):
        with hesscale.capture(model, fused=fused) as cap:
            out = model(x)
        with pytest.raises(ValueError, match="loss=None needs output_grads on the fused route"):
            cap.backward(None, output_hessians={out: torch.ones_like(out)}, output_grads=None if fused else {out: out.detach()})


@pytest.mark.parametrize("per_sample", [False, True])
def test_results_land_in_the_callers_storage(float64, per_sample):
    """``backward(into=...)``: each Linear writes its parameters' gradient and ĥ into the given
    tensors, which become ``.grad`` / ``.hess_diag``, with the values of a run without storage.
    Exceptions, each still exact: a layer called twice (its second contribution adds up in a fresh
    tensor), a ``.grad`` that already holds a gradient (accumulated, as without storage), and
    per-sample curvature (no storage at all)."""
    torch.manual_seed(8)
    shared, act, head = nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)
    model = nn.ModuleList([shared, act, head])
    x, y = torch.randn(6, 4), torch.randn(6, 2)

    def run(into=None, preset=None):
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.hess_diag = None
        if preset is not None:
            head.weight.grad = preset.clone()
        with hesscale.capture(model, per_sample=per_sample) as cap:
            loss = nn.functional.mse_loss(head(act(shared(act(shared(x))))), y)
        cap.backward(loss, into=into)
        assert set(cap.routes.values()) == {"fused"}
        return [(p.grad, p.hess_diag) for p in model.parameters()]

    reference = [(g.clone(), h.clone()) for g, h in run()]
    storage = {p: (torch.full_like(p, float("nan")), torch.full_like(p, float("nan"))) for p in model.parameters()}
    stored = run(into=storage)
    for (g, h), (g_ref, h_ref) in zip(stored, reference):
        torch.testing.assert_close(g, g_ref, **TOL)
        torch.testing.assert_close(h, h_ref, **TOL)
    for p in head.parameters():
        assert (p.grad is storage[p][0] and p.hess_diag is storage[p][1]) == (not per_sample)
    assert all(p.grad is not storage[p][0] for p in shared.parameters())
    preset = torch.randn_like(head.weight)
    stored = run(into=storage, preset=preset)
    torch.testing.assert_close(head.weight.grad, preset + reference[2][0], **TOL)
    assert head.weight.grad is not storage[head.weight][0]
    assert (head.weight.hess_diag is storage[head.weight][1]) == (not per_sample)


def test_hessian_diagonal_writes_into_an_optimizers_storage(float64):
    """``hessian_diagonal(..., into=opt.gradient_storage())``: after one step of AdaHesScale the
    next call's gradients and ĥ are the optimizer's flat views, with the values of a plain call."""
    torch.manual_seed(9)
    model, x, y = _mlp(nn.Tanh), torch.randn(6, 4), torch.randn(6, 3)
    opt = hesscale.optim.AdaHesScale(model.parameters(), lr=1e-2)
    hesscale.hessian_diagonal(model, nn.MSELoss(), x, y)
    opt.step()
    storage = opt.gradient_storage()
    assert set(storage) == set(model.parameters())
    opt.zero_grad()
    reference = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    stored = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y, into=storage)
    for (name, p), g in zip(model.named_parameters(), grads):
        assert p.grad is storage[p][0] and p.hess_diag is storage[p][1] and stored[name] is storage[p][1]
        torch.testing.assert_close(p.grad, g, **TOL)
        torch.testing.assert_close(stored[name], reference[name], **TOL)
