"""The optimizers end to end with the core's curvature (hesscale.hessian_diagonal)."""

import math

import pytest
import torch

import hesscale
from hesscale.optim import AdaHesScale, StepSizeScaling


def regression_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=g)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5]])) + 0.3 * x[:, :1] ** 2
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model, x, y


def train(make_opt, steps=150, method="hesscale"):
    model, x, y = regression_problem()
    loss_fn = torch.nn.MSELoss()
    opt = make_opt(model.parameters())
    with torch.no_grad():
        first = loss_fn(model(x), y).item()
    for _ in range(steps):
        opt.zero_grad()
        hesscale.hessian_diagonal(model, loss_fn, x, y, method=method)
        opt.step()
    with torch.no_grad():
        return first, loss_fn(model(x), y).item(), model


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
def test_adahesscale_with_hessian_diagonal_trains_a_regression_mlp(method):
    first, last, model = train(lambda ps: AdaHesScale(ps, lr=0.02), method=method)
    assert all(p.hess_diag is not None for p in model.parameters())  # it really read the core's curvature
    assert last < 0.25 * first


def test_scaled_adahesscale_with_hessian_diagonal_stays_finite_and_learns_at_lr_one():
    first, last, _ = train(lambda ps: StepSizeScaling(AdaHesScale(ps, lr=1.0), delta=1e-4))
    assert math.isfinite(last)
    assert last < 0.1 * first
