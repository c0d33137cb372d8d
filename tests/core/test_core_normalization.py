"""LayerNorm, BatchNorm1d/2d, Embedding and adaptive average pooling against independent references."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

import hesscale
from reference import exact_diag_by_double_backward, hesscale_recursion, per_sample_output_hessian_diag

TOL = dict(rtol=1e-10, atol=1e-10)


def assert_exact(model, loss_fn, x, y, **kwargs) -> dict:
    """HesScale's diagonal equals the double-backward reference for every parameter; returns it."""
    ours = hesscale.hessian_diagonal(model, loss_fn, x, y, **kwargs)
    ref = exact_diag_by_double_backward(model, loss_fn, x, y)
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL)
    return ref


def second_order_recursion(chain: nn.Sequential, loss_fn, x, y, gauss_newton=False):
    """HesScale written out with per-sample Jacobians *and* per-sample Hessians of every module.

    ``D_in[n] = diag(J_nᵀ diag(D_out[n]) J_n) + diag ∂²(g_out[n]·m(x_n))/∂x_n²`` (second term
    dropped for GN); parameters ``ĥ_θ = Σ_n D_out[n] (J^θ_n)²``. Rows of a sample are independent
    for the modules used here (LayerNorm, Linear, activations), so a sample is one forward of
    ``m`` on ``x[n:n+1]``.
    """
    acts = [x]
    for m in chain:
        acts.append(m(acts[-1]))
    loss = loss_fn(acts[-1], y)
    grads = torch.autograd.grad(loss, acts[1:], retain_graph=True)
    d = per_sample_output_hessian_diag(loss_fn, acts[-1], y)
    result = {}
    modules = list(chain.named_children())
    for k in reversed(range(len(modules))):
        name, m = modules[k]
        a, g_out = acts[k].detach(), grads[k].detach()
        pvals = {pn: p.detach() for pn, p in m.named_parameters()}
        d_in = torch.zeros_like(a)
        for i in range(a.shape[0]):
            xi = a[i : i + 1]
            jac = torch.autograd.functional.jacobian(m, xi).reshape(d[i].numel(), -1)
            d_in[i] = (d[i].reshape(-1) @ jac**2).reshape(a[i].shape)
            if not gauss_newton:
                h = torch.autograd.functional.hessian(lambda t: (m(t) * g_out[i : i + 1]).sum(), xi)
                d_in[i] += h.reshape(xi.numel(), -1).diagonal().reshape(a[i].shape)
            for pn in pvals:
                f = lambda pv, pn=pn: functional_call(m, {**pvals, pn: pv}, (xi,))  # noqa: E731
                j_p = torch.autograd.functional.jacobian(f, pvals[pn]).reshape(d[i].numel(), -1)
                key = f"{name}.{pn}"
                result[key] = result.get(key, 0) + (d[i].reshape(-1) @ j_p**2).reshape(pvals[pn].shape)
        d = d_in
    return result


LAYER_NORMS = {
    "affine": lambda: nn.LayerNorm(5),
    "no_bias": lambda: nn.LayerNorm(5, bias=False),
    "no_affine": lambda: nn.LayerNorm(5, elementwise_affine=False),
}


@pytest.mark.parametrize("gn", [False, True], ids=["hesscale", "gn"])
@pytest.mark.parametrize("kind", LAYER_NORMS)
def test_layer_norm_trunk_equals_second_order_recursion(float64, kind, gn):
    """A SimBa-style Linear–LayerNorm–Tanh–Linear trunk; the σ''-like term of LayerNorm included."""
    torch.manual_seed(1)
    ln = LAYER_NORMS[kind]()
    if ln.weight is not None:
        nn.init.uniform_(ln.weight, 0.5, 1.5)
    if ln.bias is not None:
        nn.init.uniform_(ln.bias, -0.5, 0.5)
    model = nn.Sequential(nn.Linear(3, 5), ln, nn.Tanh(), nn.Linear(5, 4))
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    method = "hesscale_gn" if gn else "hesscale"
    ours = hesscale.hessian_diagonal(model, nn.CrossEntropyLoss(), x, y, method=method)
    ref = second_order_recursion(model, nn.CrossEntropyLoss(), x, y, gauss_newton=gn)
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL)


def test_layer_norm_second_order_term_matters(float64):
    """The Σ g ∂²y/∂x² term is not negligible: HesScale and GN differ in front of a LayerNorm."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2) * 3
    full = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y)["0.weight"].clone()
    gn = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y, method="hesscale_gn")["0.weight"]
    assert (full - gn).abs().max() > 1e-3 * gn.abs().max()


def test_layer_norm_over_two_dims_with_a_token_axis_is_exact_at_the_loss(float64):
    """LayerNorm([2, 3]) on [N, T, 2, 3] feeding the loss directly: γ, β exact."""
    torch.manual_seed(3)
    ln = nn.LayerNorm([2, 3])
    nn.init.uniform_(ln.weight, 0.5, 1.5)
    model = nn.Sequential(ln)
    x, y = torch.randn(4, 3, 2, 3), torch.randn(4, 3, 2, 3)
    ref = assert_exact(model, nn.MSELoss(), x, y, per_sample=True)
    assert ln.weight.hess_diag_per_sample.shape == (4, 2, 3)
    torch.testing.assert_close(ln.weight.hess_diag_per_sample.sum(0), ref["0.weight"], **TOL)


class FrozenBatchNorm(nn.Module):
    """BatchNorm with given constant statistics: ``γ(x − m)/√(σ² + ε) + β`` (a reference, no hesscale)."""

    def __init__(self, bn, mean, var):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps
        self.mean, self.var = mean.detach(), var.detach()

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = (x - self.mean.reshape(shape)) / torch.sqrt(self.var.reshape(shape) + self.eps)
        return x_hat * self.weight.reshape(shape) + self.bias.reshape(shape)


def _bn_chain(two_d: bool):
    if two_d:
        return nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2))
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize("two_d", [False, True], ids=["1d", "2d"])
def test_batch_norm_train_mode_treats_batch_statistics_as_constants(float64, two_d):
    """Curvature = HesScale of the same net with the batch's statistics frozen; the gradient is
    autograd's (through the statistics); running statistics move exactly once."""
    torch.manual_seed(4)
    model = _bn_chain(two_d).train()
    bn = model[1]
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    x = torch.randn(6, 2, 4, 4) if two_d else torch.randn(6, 3)
    y = torch.randint(0, 2, (6,))
    twin = _bn_chain(two_d).train()
    twin_state = {k: v.clone() for k, v in model.state_dict().items()}
    twin.load_state_dict(twin_state)

    ours = hesscale.hessian_diagonal(model, nn.CrossEntropyLoss(), x, y)

    # running statistics: one forward's update, as a plain forward of the twin makes it
    twin(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(twin[1], name), **TOL)
    # gradient: autograd through the batch statistics
    grad_twin = _bn_chain(two_d).train()
    grad_twin.load_state_dict(twin_state)
    nn.CrossEntropyLoss()(grad_twin(x), y).backward()
    for p, q in zip(model.parameters(), grad_twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)
    # curvature: the recursion on the frozen-statistics twin
    h = model[0](x).detach()
    dims = [0, *range(2, h.dim())]
    frozen = nn.Sequential(model[0], FrozenBatchNorm(bn, h.mean(dims), h.var(dims, unbiased=False)), *model[2:])
    ref = hesscale_recursion(frozen, nn.CrossEntropyLoss(), x, y)
    names = {id(p): n for n, p in frozen.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], ref[names[id(p)]], **TOL)


@pytest.mark.parametrize("two_d", [False, True], ids=["1d", "2d"])
def test_batch_norm_eval_mode_is_exact_before_a_diagonal_loss(float64, two_d):
    """Eval mode is element-wise affine: Linear/Conv–BN–MSE is exact for every parameter."""
    torch.manual_seed(5)
    if two_d:
        model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
        x = torch.randn(4, 2, 3, 3)
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        x = torch.randn(5, 3)
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    model.eval()
    ref = assert_exact(model, nn.MSELoss(), x, torch.randn_like(model(x)), per_sample=True)
    assert bn.weight.hess_diag_per_sample.shape == (x.shape[0], bn.num_features)
    torch.testing.assert_close(bn.weight.hess_diag_per_sample.sum(0), ref["1.weight"], **TOL)


def test_embedding_is_exact_when_indices_are_distinct_per_sample(float64):
    """Embedding–Flatten–Linear–MSE: exact for all parameters when no index repeats in a sample."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Flatten(), nn.Linear(4 * 3, 2))
    idx = torch.stack([torch.randperm(7)[:4] for _ in range(5)])
    y = torch.randn(5, 2)
    ref = assert_exact(model, nn.MSELoss(), idx, y, per_sample=True)
    assert (model[0].weight.hess_diag[0] == 0).all()  # padding row: no gradient, no curvature
    torch.testing.assert_close(model[0].weight.hess_diag_per_sample.sum(0), ref["0.weight"], **TOL)


@pytest.mark.parametrize("size", [(2, 3), (4, 4), (None, 2)], ids=str)
def test_adaptive_avg_pool_equals_reference_recursion(float64, size):
    """Overlapping windows (5 → 2, 5 → 3), upsampling (5 → 4 re-reads inputs) and ``None``."""
    torch.manual_seed(7)
    out = [5 if s is None else s for s in size]
    model = nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.Tanh(), nn.AdaptiveAvgPool2d(size), nn.Flatten(), nn.Linear(3 * out[0] * out[1], 3)
    )
    x, y = torch.randn(3, 2, 6, 6), torch.randint(0, 3, (3,))
    ours = hesscale.hessian_diagonal(model, nn.CrossEntropyLoss(), x, y)
    ref = hesscale_recursion(model, nn.CrossEntropyLoss(), x, y)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL)


def test_batch_renorm_is_rejected_with_its_reason():
    torch_layers = pytest.importorskip("sb3_contrib.common.torch_layers")
    model = nn.Sequential(nn.Linear(2, 3), torch_layers.BatchRenorm1d(3))
    reason = r"'1' of type BatchRenorm1d .*running statistics.*BatchNorm1d is supported"
    with pytest.raises(hesscale.UnsupportedModuleError, match=reason):
        hesscale.capture(model)
