"""Independent references for the core's tests: plain autograd loops, no hesscale code."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def exact_diag_by_double_backward(model, loss_fn, x, y=None):
    """``∂²L/∂θ_i²`` one entry at a time: a double-backward loop over parameter entries."""
    params = [p for p in model.parameters()]
    out = model(x)
    loss = loss_fn(out) if y is None else loss_fn(out, y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    diags = []
    for p, g in zip(params, grads):
        flat_g = g.reshape(-1)
        d = torch.zeros(p.numel(), dtype=p.dtype)
        for i in range(p.numel()):
            (h,) = torch.autograd.grad(flat_g[i], p, retain_graph=True)
            d[i] = h.reshape(-1)[i]
        diags.append(d.reshape(p.shape))
    return dict(zip([n for n, _ in model.named_parameters()], diags))


def per_sample_output_hessian_diag(loss_fn, out, y=None):
    """``diag ∂²L/∂out[n]²`` from the full Hessian of the loss w.r.t. all outputs."""
    f = (lambda o: loss_fn(o)) if y is None else (lambda o: loss_fn(o, y))
    h = torch.autograd.functional.hessian(f, out.detach())
    k = out.numel()
    return h.reshape(k, k).diagonal().reshape(out.shape)


def hesscale_recursion(chain: nn.Sequential, loss_fn, x, y=None, gauss_newton=False):
    """The HesScale recursion written out with per-sample Jacobians of each module.

    Linear-in-input modules: ``D_in[n] = D_out[n] (J_n ∘ J_n)``; parameters:
    ``ĥ_θ = Σ_n D_out[n] (J^θ_n ∘ J^θ_n)``. Element-wise activations (no parameters, listed in
    ``ACTS``): ``D_in = σ'² D_out + σ'' g_out`` with ``σ', σ''`` from autograd.
    """
    acts = [x]
    for m in chain:
        acts.append(m(acts[-1]))
    out = acts[-1]
    loss = loss_fn(out) if y is None else loss_fn(out, y)
    needs = [a for a in acts[1:] if a.requires_grad]
    found = iter(torch.autograd.grad(loss, needs, retain_graph=True))
    grads = [next(found) if a.requires_grad else torch.zeros_like(a) for a in acts[1:]]
    d = per_sample_output_hessian_diag(loss_fn, out, y)
    result = {}
    modules = list(chain.named_children())
    for k in reversed(range(len(modules))):
        name, m = modules[k]
        a, g_out = acts[k].detach(), grads[k]
        if isinstance(m, ACTS):
            ar = a.clone().requires_grad_(True)
            (s1,) = torch.autograd.grad(m(ar).sum(), ar, create_graph=True)
            (s2,) = torch.autograd.grad(s1.sum(), ar)
            d = s1.detach() ** 2 * d + (0 if gauss_newton else s2 * g_out)
            continue
        n = a.shape[0]
        d_in = torch.zeros_like(a)
        pnames = [pn for pn, _ in m.named_parameters()]
        pvals = {pn: p.detach() for pn, p in m.named_parameters()}
        for i in range(n):
            xi = a[i : i + 1]
            j_in = torch.autograd.functional.jacobian(lambda t: m(t), xi).reshape(d[i].numel(), -1)
            d_in[i] = (d[i].reshape(-1) @ j_in**2).reshape(a[i].shape)
            for pn in pnames:
                def f(pv, pn=pn):
                    return functional_call(m, {**pvals, pn: pv}, (xi,))
                j_p = torch.autograd.functional.jacobian(f, pvals[pn]).reshape(d[i].numel(), -1)
                h = (d[i].reshape(-1) @ j_p**2).reshape(pvals[pn].shape)
                key = f"{name}.{pn}"
                result[key] = result.get(key, 0) + h
        d = d_in
    return result


ACTS = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.Softplus, nn.SiLU, nn.GELU)
