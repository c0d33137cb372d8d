"""Normalisation layers: ``nn.LayerNorm``, ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``.

**LayerNorm** over the last ``d`` entries of each row: ``x̂ = (x − μ)·r`` with ``r = (v + ε)^{-1/2}``,
``y = γ∘x̂ + β``. Its per-row Jacobian ``J_ji = γ_j·r·(δ_ji − 1/d − x̂_j x̂_i/d)`` is dense, so::

    D_x,i = Σ_j J_ji² D_y,j + Σ_j g_y,j ∂²y_j/∂x_i²                 (GN drops the second sum)

in O(d) per row from the moments ``S_k = Σ_j γ_j² D_y,j x̂_jᵏ`` (k = 0, 1, 2) and
``G_k = Σ_j γ_j g_y,j x̂_jᵏ`` (k = 0, 1)::

    Σ_j J_ji² D_y,j = r²·[ D'_i·(1 − 2(1 + x̂_i²)/d) + (S_0 + 2x̂_i S_1 + x̂_i² S_2)/d² ]
    Σ_j g_y,j ∂²y_j/∂x_i² = r²/d·[ −2x̂_i (g'_i − G_0/d) + (3x̂_i²/d − 1 + 1/d)·G_1 ]

(``D' = γ²∘D_y``, ``g' = γ∘g_y``; off-diagonal terms of ``∂²L/∂y²`` dropped as everywhere).
The affine parameters are exact given ``D_y``: ``ĥ_γ = Σ D_y∘x̂²``, ``ĥ_β = Σ D_y``.

**BatchNorm** normalises channel ``c`` (dim 1) by statistics ``(m_c, σ²_c)``: the running ones in
eval mode (an element-wise affine map: exact propagation), the batch's own (biased variance) in
training mode or without running statistics, which the rule treats as constants::

    D_x = γ²/(σ² + ε)·D_y          ĥ_γ = Σ D_y∘x̂²          ĥ_β = Σ D_y

The gradient still comes from autograd (through the batch statistics), and the rule recomputes
the statistics from the recorded input: the module runs, and updates its running statistics,
exactly once per forward.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Rule


def _rows(module: nn.LayerNorm, t: Tensor) -> Tensor:
    """``t`` as ``[..., d]``: the normalised trailing dims flattened into one."""
    return t.reshape(*t.shape[: t.dim() - len(module.normalized_shape)], -1)


def _layer_norm_parts(module: nn.LayerNorm, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x̂ [..., d], r [..., 1])`` of each row."""
    rows = _rows(module, x)
    mean = rows.mean(-1, keepdim=True)
    var = rows.var(-1, unbiased=False, keepdim=True)
    r = torch.rsqrt(var + module.eps)
    return (rows - mean) * r, r


def _sum_to(t: Tensor, per_sample: bool, shape: torch.Size) -> Tensor:
    """Sum ``t [N, ..., d]`` over every leading dim (all but N when ``per_sample``) into ``shape``."""
    if per_sample:
        return t.reshape(t.shape[0], -1, t.shape[-1]).sum(1).reshape(t.shape[0], *shape)
    return t.reshape(-1, t.shape[-1]).sum(0).reshape(shape)


class LayerNormRule(Rule):
    needs_grad_output = True

    def param_diag(self, module, x, y, d_out, per_sample):
        out = {}
        d = _rows(module, d_out)
        if module.weight is not None:
            x_hat, _ = _layer_norm_parts(module, x)
            out["weight"] = _sum_to(d * x_hat.square(), per_sample, module.weight.shape)
        if module.bias is not None:
            out["bias"] = _sum_to(d, per_sample, module.bias.shape)
        return out

    def input_diag(self, module, x, y, d_out, g_out, gauss_newton):
        x_hat, r = _layer_norm_parts(module, x)
        n = x_hat.shape[-1]
        gamma = None if module.weight is None else module.weight.reshape(-1)
        d_y = _rows(module, d_out) if gamma is None else _rows(module, d_out) * gamma.square()
        s0 = d_y.sum(-1, keepdim=True)
        s1 = (d_y * x_hat).sum(-1, keepdim=True)
        s2 = (d_y * x_hat.square()).sum(-1, keepdim=True)
        x2 = x_hat.square()
        d_in = d_y * (1 - 2 * (1 + x2) / n) + (s0 + 2 * x_hat * s1 + x2 * s2) / n**2
        if not gauss_newton and g_out is not None:
            g = _rows(module, g_out) if gamma is None else _rows(module, g_out) * gamma
            g0 = g.sum(-1, keepdim=True)
            g1 = (g * x_hat).sum(-1, keepdim=True)
            d_in = d_in + (-2 * x_hat * (g - g0 / n) + (3 * x2 / n - 1 + 1 / n) * g1) / n
        return (r.square() * d_in).reshape(x.shape)


def _batch_norm_parts(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x̂, r)`` with ``r = (σ² + ε)^{-1/2}`` shaped ``[1, C, 1, ...]``; batch or running statistics
    as ``F.batch_norm`` chooses them."""
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if module.training or module.running_mean is None:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
    else:
        mean, var = module.running_mean, module.running_var
    r = torch.rsqrt(var.to(x.dtype) + module.eps).reshape(shape)
    return (x - mean.to(x.dtype).reshape(shape)) * r, r


def _per_channel(t: Tensor, per_sample: bool) -> Tensor:
    """Sum ``t [N, C, ...]`` to ``[C]`` (``[N, C]`` when ``per_sample``)."""
    t = t.reshape(t.shape[0], t.shape[1], -1).sum(2)
    return t if per_sample else t.sum(0)


class BatchNormRule(Rule):
    def param_diag(self, module, x, y, d_out, per_sample):
        out = {}
        if module.weight is not None:
            x_hat, _ = _batch_norm_parts(module, x)
            out["weight"] = _per_channel(d_out * x_hat.square(), per_sample)
        if module.bias is not None:
            out["bias"] = _per_channel(d_out, per_sample)
        return out

    def input_diag(self, module, x, y, d_out, g_out, gauss_newton):
        _, r = _batch_norm_parts(module, x)
        scale = r if module.weight is None else r * module.weight.reshape(r.shape)
        return scale.square() * d_out
