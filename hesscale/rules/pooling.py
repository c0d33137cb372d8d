"""Pooling: linear maps whose Jacobian entries are ``0`` or one constant ``c`` per window.

Then ``Jᵀ diag(d_out) J`` has diagonal ``vjp(c · d_out)`` (since ``J² = c·J``): max-pooling has
``c = 1`` (the gradient routing of ``d_out`` to each window's arg-max), average pooling
``c = 1/divisor`` — the kernel's *squared* weights ``1/k²`` per window, not ``1/k``. Adaptive
average pooling has windows ``[⌊o·I/O⌋, ⌈(o+1)·I/O⌉)`` per dim (overlapping when ``O ∤ I``) and
``c = 1/|window|``.
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


def _adaptive_window_sizes(in_size: int, out_size: int, like: Tensor) -> Tensor:
    """``|window_o|`` of adaptive pooling along one dim: ``⌈(o+1)I/O⌉ − ⌊oI/O⌋``."""
    o = torch.arange(out_size, device=like.device)
    start = torch.div(o * in_size, out_size, rounding_mode="floor")
    end = torch.div((o + 1) * in_size + out_size - 1, out_size, rounding_mode="floor")
    return (end - start).to(like.dtype)


#: adaptive average pooling type → number of pooled (trailing) dims
ADAPTIVE_AVG_POOL_DIMS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}


class AdaptiveAvgPoolRule(Rule):
    """``nn.AdaptiveAvgPool1d/2d/3d``: ``d_in = vjp(d_out / |window|)``, ``|window|`` per output."""

    def input_diag(self, module, x, y, d_out, g_out, gauss_newton):
        spatial = ADAPTIVE_AVG_POOL_DIMS[type(module)]
        count = torch.ones((), dtype=d_out.dtype, device=d_out.device)
        for k in range(1, spatial + 1):
            size = _adaptive_window_sizes(x.shape[-k], y.shape[-k], d_out)
            count = count * size.reshape((-1,) + (1,) * (k - 1))
        return _vjp(module, x, d_out / count)
