"""``exact`` and ``ggn`` against BackPACK's DiagHessian and DiagGGNExact (test-only dependency)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import hesscale

backpack = pytest.importorskip("backpack")
from backpack.extensions import DiagGGNExact, DiagHessian  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-10)

NETS = {
    "tanh_mlp_ce": (lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 4)), "ce"),
    "relu_mlp_mse": (lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), "mse"),
    "conv_ce": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4)), "ce"),
}


def _data(name, loss):
    n = 4
    x = torch.randn(n, 1, 5, 5) if name.startswith("conv") else torch.randn(n, 5)
    if loss == "ce":
        return x, torch.randint(0, 4, (n,)), nn.CrossEntropyLoss()
    return x, torch.randn(n, 3), nn.MSELoss()


def _backpack(model, loss_fn, x, y):
    model, loss_fn = backpack.extend(copy.deepcopy(model)), backpack.extend(copy.deepcopy(loss_fn))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backpack.backpack(DiagHessian(), DiagGGNExact()):
            loss_fn(model(x), y).backward()
    return (
        {n: p.diag_h for n, p in model.named_parameters()},
        {n: p.diag_ggn_exact for n, p in model.named_parameters()},
    )


@pytest.mark.parametrize("name", NETS)
def test_exact_and_ggn_match_backpack(float64, name):
    torch.manual_seed(13)
    build, loss = NETS[name]
    model = build()
    x, y, loss_fn = _data(name, loss)
    bp_h, bp_ggn = _backpack(model, loss_fn, x, y)
    exact = hesscale.hessian_diagonal(model, loss_fn, x, y, method="exact")
    ggn = hesscale.hessian_diagonal(model, loss_fn, x, y, method="ggn")
    for k in bp_h:
        torch.testing.assert_close(exact[k], bp_h[k], **TOL)
        torch.testing.assert_close(ggn[k], bp_ggn[k], **TOL)
