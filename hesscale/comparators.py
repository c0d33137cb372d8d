"""Reference diagonals for tests and benchmarks (small networks only).

All work on a functional copy of the model (``torch.func.functional_call``), so the model must be
deterministic (no active dropout). Costs: ``exact`` — one Hessian-vector product per parameter;
``ggn`` — the full output Jacobian; ``ggn_mc`` — per-sample gradients per Monte-Carlo sample;
``hutchinson`` — one Hessian-vector product per sample.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vjp, vmap

#: Above this many parameters ``exact`` and ``ggn`` refuse (pass ``max_params=`` to override).
MAX_EXACT_PARAMS = 20_000


def call_loss(loss_fn: Callable, output: Tensor, targets: Tensor | None) -> Tensor:
    return loss_fn(output) if targets is None else loss_fn(output, targets)


class _Flat:
    """The model as a function of one flat parameter vector."""

    def __init__(self, model: nn.Module, max_params: int | None):
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.buffers = dict(model.named_buffers())
        if max_params is not None and self.theta.numel() > max_params:
            raise ValueError(
                f"model has {self.theta.numel()} parameters; this exact comparator is limited to "
                f"{max_params} (pass max_params=... to raise the limit, at O(#params) cost)"
            )

    def params(self, theta: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            k = shape.numel()
            out[name] = theta[offset : offset + k].reshape(shape)
            offset += k
        return out

    def forward(self, theta: Tensor, inputs: Tensor) -> Tensor:
        return functional_call(self.model, (self.params(theta), self.buffers), (inputs,))

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: t.detach().clone() for n, t in self.params(flat).items()}


def _hvp_fn(flat: _Flat, loss_fn, inputs, targets):
    def loss_of(theta):
        return call_loss(loss_fn, flat.forward(theta, inputs), targets)

    _, hvp = vjp(grad(loss_of), flat.theta)
    return lambda v: hvp(v)[0]


def exact(model, loss_fn, inputs, targets=None, max_params: int = MAX_EXACT_PARAMS, chunk: int = 512):
    """Exact ``diag ∂²L/∂θ²`` by Hessian-vector products with basis vectors, in chunks."""
    flat = _Flat(model, max_params)
    hvp = vmap(_hvp_fn(flat, loss_fn, inputs, targets))
    p = flat.theta.numel()
    diag = torch.empty_like(flat.theta)
    for start in range(0, p, chunk):
        idx = torch.arange(start, min(start + chunk, p), device=diag.device)
        basis = torch.zeros(len(idx), p, dtype=diag.dtype, device=diag.device)
        basis[torch.arange(len(idx)), idx] = 1
        diag[idx] = hvp(basis)[torch.arange(len(idx)), idx]
    return flat.unflatten(diag)


def ggn(model, loss_fn, inputs, targets=None, max_params: int = MAX_EXACT_PARAMS):
    """Exact ``diag(Jᵀ H J)``: ``J`` the Jacobian of all outputs, ``H`` the loss Hessian w.r.t. them."""
    flat = _Flat(model, max_params)
    output = flat.forward(flat.theta, inputs).detach()
    jac = jacrev(lambda t: flat.forward(t, inputs).reshape(-1))(flat.theta)  # [O, P]
    h_out = hessian(lambda o: call_loss(loss_fn, o.reshape(output.shape), targets))(output.reshape(-1))
    return flat.unflatten(((h_out @ jac) * jac).sum(0))


def _loss_sqrt_samples(loss_fn, output: Tensor, targets, generator) -> Tensor:
    """A random ``S`` per sample with ``E[S Sᵀ] = ∂²L/∂output²`` (likelihood losses only)."""
    supported = type(loss_fn) is nn.MSELoss or (
        type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.label_smoothing == 0
    )
    if not supported:
        raise ValueError(
            f"ggn_mc samples from a likelihood: supported losses are nn.MSELoss and "
            f"nn.CrossEntropyLoss (no weights, no label smoothing), got {type(loss_fn).__name__}"
        )
    reduction = loss_fn.reduction
    if reduction not in ("mean", "sum"):
        raise ValueError(f"ggn_mc needs reduction 'mean' or 'sum', got {reduction!r}")
    if type(loss_fn) is nn.MSELoss:
        scale = 1.0 / output.numel() if reduction == "mean" else 1.0
        noise = torch.randn(output.shape, generator=generator, dtype=output.dtype, device=output.device)
        return noise * (2.0 * scale) ** 0.5
    scale = 1.0 / output.shape[0] if reduction == "mean" else 1.0
    p = torch.softmax(output, dim=1)
    drawn = torch.multinomial(p, 1, generator=generator).squeeze(1)
    return (p - nn.functional.one_hot(drawn, output.shape[1]).to(p.dtype)) * scale**0.5


def ggn_mc(model, loss_fn, inputs, targets=None, samples: int = 1, generator: torch.Generator | None = None):
    """Monte-Carlo GGN diagonal: ``(1/M) Σ_m Σ_n (J_nᵀ S_nm)²`` with ``E[S Sᵀ] = H_n``."""
    flat = _Flat(model, None)
    output = flat.forward(flat.theta, inputs).detach()

    def pseudo_loss(theta, x, s):
        return (flat.forward(theta, x.unsqueeze(0)).squeeze(0) * s).sum()

    per_sample_grad = vmap(grad(pseudo_loss), in_dims=(None, 0, 0))
    total = torch.zeros_like(flat.theta)
    for _ in range(samples):
        s = _loss_sqrt_samples(loss_fn, output, targets, generator)
        total += per_sample_grad(flat.theta, inputs, s).square().sum(0)
    return flat.unflatten(total / samples)


def hutchinson(model, loss_fn, inputs, targets=None, samples: int = 1, generator: torch.Generator | None = None):
    """Hutchinson's estimate ``(1/M) Σ_m z_m ⊙ H z_m`` with Rademacher ``z``."""
    flat = _Flat(model, None)
    hvp = vmap(_hvp_fn(flat, loss_fn, inputs, targets))
    z = torch.randint(0, 2, (samples, flat.theta.numel()), generator=generator, device=flat.theta.device)
    z = z.to(flat.theta.dtype) * 2 - 1
    return flat.unflatten((z * hvp(z)).mean(0))


COMPARATORS = {"exact": exact, "ggn": ggn, "ggn_mc": ggn_mc, "hutchinson": hutchinson}
