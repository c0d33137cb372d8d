"""Every supported module type, fan-out, in-place, per-sample, errors and custom rules."""
from pathlib import Path

import pytest
import torch
from torch import nn

import hesscale
from hesscale.rules import ElementwiseRule
from reference import exact_diag_by_double_backward, hesscale_recursion

TOL = dict(rtol=1e-10, atol=1e-10)

ACTIVATIONS = [
    nn.Tanh(), nn.Sigmoid(), nn.ReLU(), nn.LeakyReLU(0.1), nn.Hardtanh(-0.5, 0.7), nn.ELU(alpha=0.7), nn.SELU(),
    nn.Softplus(beta=2.0, threshold=1.0), nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"),
    nn.Identity(), nn.ReLU(inplace=True), nn.ELU(inplace=True), nn.LeakyReLU(0.2, inplace=True),
    nn.SELU(inplace=True), nn.SiLU(inplace=True),
]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=repr)
def test_activation_exact_in_one_hidden_layer_mse_net(float64, act):
    """Linear–σ–Linear with MSE: HesScale is exact for every parameter, for every σ."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 6), act, nn.Linear(6, 2))
    x, y = torch.randn(7, 3) * 2, torch.randn(7, 2)
    ref = exact_diag_by_double_backward(model, nn.MSELoss(), x, y)
    ours = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL)


def test_nested_sequential_flatten_dropout_eval_identity(float64):
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Sequential(nn.Linear(6, 5), nn.Sequential(nn.Tanh(), nn.Dropout(0.5))),
        nn.Identity(),
        nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3),
    ).eval()
    flat = nn.Sequential(*[m for m in model.modules() if next(m.children(), None) is None])
    x, y = torch.randn(5, 2, 3), torch.randint(0, 3, (5,))
    ours = hesscale.hessian_diagonal(model, nn.CrossEntropyLoss(), x, y)
    ref = hesscale_recursion(flat, nn.CrossEntropyLoss(), x, y)
    names = {id(p): n for n, p in flat.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], ref[names[id(p)]], **TOL)


def test_dropout_in_training_uses_the_drawn_mask(float64):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    with hesscale.capture(model) as cap:
        h = model[0](x)
        dropped = model[1](h)
        out = model[2](dropped)
        loss = nn.functional.mse_loss(out, y)
    mask = (dropped != 0).to(x.dtype)
    cap.backward(loss)
    d_out = torch.full_like(out, 2 / out.numel())
    d_h = (d_out @ model[2].weight**2) * mask * 4.0  # (mask / (1 - p))²
    torch.testing.assert_close(model[0].bias.hess_diag, d_h.sum(0), **TOL)


CONV_CHAINS = {
    "conv2d_maxpool": lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2, stride=1, dilation=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3),
    ),
    "conv2d_avgpool": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Sigmoid(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    ),
    "avgpool_no_pad_count": lambda: nn.Sequential(
        nn.Conv2d(2, 2, 3), nn.Tanh(), nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        nn.Flatten(), nn.Linear(2 * 2 * 2, 3),
    ),
    "conv1d": lambda: nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.ELU(), nn.Conv1d(3, 2, 2, padding="valid"),
        nn.Flatten(), nn.Linear(2 * 2, 3),
    ),
    "conv2d_no_bias_strided": lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, bias=False), nn.ReLU(), nn.Conv2d(3, 2, 3, padding="same", dilation=1),
        nn.Flatten(), nn.Linear(2 * 2 * 2, 3),
    ),
}


@pytest.mark.parametrize("name", CONV_CHAINS)
def test_conv_and_pooling_equal_reference_recursion(float64, name):
    torch.manual_seed(8)
    model = CONV_CHAINS[name]()
    x = torch.randn(3, 2, 6) if name == "conv1d" else torch.randn(3, 2, 6, 6)
    y = torch.randint(0, 3, (3,))
    ours = hesscale.hessian_diagonal(model, nn.CrossEntropyLoss(), x, y)
    ref = hesscale_recursion(model, nn.CrossEntropyLoss(), x, y)
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL)


RESHAPE_AND_POOL_CHAINS = {
    "unflatten": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Unflatten(1, (2, 4)),
                                        nn.Conv1d(2, 2, 2), nn.Flatten(), nn.Linear(6, 3)), (4, 6)),
    "adaptive_avg_pool1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 2), nn.Tanh(), nn.AdaptiveAvgPool1d(3),
                                                  nn.Flatten(), nn.Linear(9, 3)), (3, 2, 6)),
    "adaptive_avg_pool3d": (lambda: nn.Sequential(nn.Conv2d(2, 2, 2), nn.Tanh(), nn.Unflatten(1, (1, 2)),
                                                  nn.AdaptiveAvgPool3d((1, 2, 3)), nn.Flatten(), nn.Linear(6, 3)),
                            (3, 2, 5, 5)),
}


@pytest.mark.parametrize("name", RESHAPE_AND_POOL_CHAINS)
def test_unflatten_and_adaptive_pools_equal_reference_recursion(float64, name):
    """Unflatten, AdaptiveAvgPool1d and AdaptiveAvgPool3d (5 → 3 and 4 → 2 windows overlap)."""
    torch.manual_seed(10)
    build, shape = RESHAPE_AND_POOL_CHAINS[name]
    model = build()
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    ours = hesscale.hessian_diagonal(model, nn.CrossEntropyLoss(), x, y)
    ref = hesscale_recursion(model, nn.CrossEntropyLoss(), x, y)
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL)


def test_avgpool_uses_squared_kernel(float64):
    """The per-input diagonal behind an average pool is d_out/k², not d_out/k."""
    pool = nn.AvgPool2d(2)
    lin = nn.Linear(4, 1, bias=False)
    model = nn.Sequential(pool, nn.Flatten(), lin)
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    nn.init.ones_(lin.weight)
    with hesscale.capture(model) as cap:
        out = model(x)
        loss = 0.5 * out.square().sum()
    call = cap._calls[0]  # the backward consumes the record
    cap.backward(loss)
    d = call.rule.input_diag(pool, x.detach(), call.y, torch.ones(1, 1, 2, 2), None, False)
    torch.testing.assert_close(d, torch.full((1, 1, 4, 4), 1 / 16))


def test_fan_out_contributions_add_up(float64):
    """One feature tensor read by two captured heads (as SB3's shared extractor does)."""
    torch.manual_seed(9)
    trunk, head_a, head_b = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 1)
    act = nn.Tanh()

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.act, self.a, self.b = trunk, act, head_a, head_b

        def forward(self, x):
            h = self.act(self.trunk(x))
            return torch.cat([self.a(h), self.b(h)], 1)

    model = TwoHeads()
    x, y = torch.randn(5, 3), torch.randn(5, 3)
    ours = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y)
    # one hidden layer + diagonal output Hessian: HesScale is exact, fan-out included
    ref = exact_diag_by_double_backward(model, nn.MSELoss(), x, y)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL)


def test_same_module_called_twice_sums(float64):
    torch.manual_seed(10)
    lin = nn.Linear(3, 2)
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    with hesscale.capture(lin) as cap:
        loss = lin(x1).square().mean() + lin(x2).square().mean()
    cap.backward(loss)
    ref = exact_diag_by_double_backward(
        nn.Sequential(lin), lambda o: o[:4].square().mean() + o[4:].square().mean(), torch.cat([x1, x2])
    )
    torch.testing.assert_close(lin.weight.hess_diag, ref["0.weight"], **TOL)


def test_per_sample_diagonals_sum_to_the_batch(float64):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))
    x, y = torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,))
    d = hesscale.hessian_diagonal(model, nn.CrossEntropyLoss(), x, y, per_sample=True)
    for n, p in model.named_parameters():
        assert p.hess_diag_per_sample.shape == (4, *p.shape)
        torch.testing.assert_close(p.hess_diag_per_sample.sum(0), d[n], **TOL)
    # sample 0 alone (CE mean over 4 → the single-sample loss is 4× its share)
    single = hesscale.hessian_diagonal(model, nn.CrossEntropyLoss(), x[:1], y[:1])
    torch.testing.assert_close(model[3].weight.hess_diag_per_sample[0] * 4, single["3.weight"], **TOL)


def test_unsupported_module_is_named_before_forward():
    class Weird(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(Weird()))
    with pytest.raises(hesscale.UnsupportedModuleError, match=r"'1\.0' of type Weird.*Supported: .*Linear"):
        hesscale.capture(model)


def test_register_rule_for_a_custom_activation(float64, monkeypatch):
    import hesscale.rules.registry as registry

    monkeypatch.setattr(registry, "_RULES", dict(registry._RULES))  # the registration ends with the test

    class Cube(nn.Module):
        def forward(self, x):
            return x**3

    hesscale.register_rule(Cube, ElementwiseRule(lambda m, x, y: 3 * x**2, lambda m, x, y: 6 * x))
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 4), Cube(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    ours = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y)
    ref = exact_diag_by_double_backward(model, nn.MSELoss(), x, y)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL)
    with pytest.raises(TypeError):
        hesscale.register_rule(Cube, lambda *a: None)


def test_backward_inside_the_block_is_an_error():
    lin = nn.Linear(2, 1)
    with pytest.raises(RuntimeError, match="after the `with` block"):
        with hesscale.capture(lin) as cap:
            cap.backward(lin(torch.randn(3, 2)).sum())


def test_outside_parameters_are_left_alone(float64):
    actor, critic = nn.Linear(3, 2), nn.Linear(2, 1)
    x = torch.randn(4, 3)
    with hesscale.capture(actor) as cap:
        loss = critic(torch.tanh(actor(x))).square().mean()
    cap.backward(loss)
    assert critic.weight.grad is None and actor.weight.hess_diag is not None
    with hesscale.capture(actor) as cap:
        loss = critic(torch.tanh(actor(x))).square().mean()
    cap.backward(loss, external_grads=True)
    assert critic.weight.grad is not None


def test_outside_operation_warning_names_the_module_and_points_at_the_callers_line():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with pytest.warns(UserWarning, match=r"captured module '1' reads a tensor made by 'sin'") as record:
        with hesscale.capture(model) as cap:
            h = torch.sin(model[0](x))
            out = model[1](h)  # the warning's line
    cap.backward(out.square().mean())
    (w,) = [w for w in record if "made by" in str(w.message)]
    assert w.filename == __file__ and "model[1](h)" in Path(__file__).read_text().splitlines()[w.lineno - 1]
