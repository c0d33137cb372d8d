"""Pooling: linear maps whose Jacobian entries are ``0`` or one constant ``c`` per window.

Then ``Jᵀ diag(d_out) J`` has diagonal ``vjp(c · d_out)`` (since ``J² = c·J``): max-pooling has
``c = 1`` (the gradient routing of ``d_out`` to each window's arg-max), average pooling
``c = 1/divisor`` — the kernel's *squared* weights ``1/k²`` per window, not ``1/k``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Rule


def _vjp(module: nn.Module, x: Tensor, v: Tensor) -> Tensor:
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        (d_in,) = torch.autograd.grad(module(xr), xr, v)
    return d_in


class MaxPoolRule(Rule):
    """``d_in[argmax] = Σ d_out`` over the windows whose maximum sits there."""

    def input_diag(self, module, x, y, d_out, g_out, gauss_newton):
        return _vjp(module, x, d_out)


def _avg_pool_divisor(module: nn.AvgPool2d, x: Tensor) -> Tensor | float:
    """The divisor of each output position of ``module`` (a number when it is uniform)."""
    if module.divisor_override:
        return float(module.divisor_override)
    kernel = nn.modules.utils._pair(module.kernel_size)
    if module.count_include_pad and not module.ceil_mode:
        return float(kernel[0] * kernel[1])
    if module.count_include_pad:
        raise NotImplementedError("AvgPool2d(ceil_mode=True, count_include_pad=True) is not supported")
    ones = torch.ones_like(x[:1, :1])
    return F.avg_pool2d(
        ones, kernel, module.stride, module.padding, module.ceil_mode, False, divisor_override=1
    )


class AvgPoolRule(Rule):
    """``d_in = vjp(d_out / divisor)``: each input gets ``Σ_windows d_out / divisor²``."""

    def input_diag(self, module, x, y, d_out, g_out, gauss_newton):
        return _vjp(module, x, d_out / _avg_pool_divisor(module, x))
