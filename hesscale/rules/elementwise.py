"""Element-wise maps ``y = σ(x)``: ``d_in = σ'(x)² d_out + σ''(x) g_out`` (GN: drop ``σ''·g``).

Each activation is one entry of a table: a pair of functions ``(σ', σ'')`` of
``(module, x, y)``; ``σ''`` is ``None`` for piecewise-linear maps. Using ``y`` avoids recomputing
``σ`` where the derivatives are cheaper from the output (tanh, sigmoid). Fused with the gradient:
``g_in = σ'(x) g_out`` from the same ``σ'``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .base import Rule, Streams

Derivative = Callable[[nn.Module, Tensor, Tensor], Tensor]


class ElementwiseRule(Rule):
    """Rule of an element-wise map given its first and (optional) second derivative."""

    def __init__(self, first: Derivative, second: Optional[Derivative] = None, pair: Optional[Callable] = None):
        self.first = first
        self.second = second
        self.pair = pair  # optional ``(m, y, [g, d], gauss_newton) -> (g_in, d_in)`` in fewer ops, from y alone
        self.needs_grad_output = second is not None
        if pair is not None:
            self.fused_reads = frozenset({"y"})  # the input is freed after the forward

    fused = True
    fresh_outputs = True

    def input_diag(self, module, x, y, d_out, g_out, gauss_newton):
        d_in = self.first(module, x, y).square() * d_out
        if self.second is not None and not gauss_newton:
            d_in = d_in + self.second(module, x, y) * g_out
        return d_in

    def fused_backward(self, module, x, y, g_out, d_out, gauss_newton, per_sample, need_input):
        return self.fused_backward_from(module, x, y, Streams.of(g_out, d_out), gauss_newton, per_sample, need_input)

    def fused_backward_from(self, module, x, y, streams, gauss_newton, per_sample, need_input):
        if not need_input:
            streams.clear()
            return {}, {}, None, None
        if self.pair is not None:
            return ({}, {}, *self.pair(module, y, streams, gauss_newton))
        g_out, d_out = streams
        streams.clear()
        s1 = self.first(module, x, y)
        d_in = s1.square() * d_out
        if self.second is not None and not gauss_newton:
            d_in = d_in + self.second(module, x, y) * g_out
        return {}, {}, s1 * g_out, d_in


def _step(m, x, y):
    return (x > 0).to(x.dtype)


def _leaky(m, x, y):
    return torch.where(x > 0, 1.0, m.negative_slope).to(x.dtype)


def _hardtanh(m, x, y):
    return ((x > m.min_val) & (x < m.max_val)).to(x.dtype)  # as autograd: zero at the bounds


def _elu_first(m, x, y):
    return torch.where(x > 0, torch.ones_like(x), y + m.alpha)  # α eˣ = y + α for x ≤ 0


def _elu_second(m, x, y):
    return torch.where(x > 0, torch.zeros_like(x), y + m.alpha)


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805


def _selu_first(m, x, y):
    return _SELU_SCALE * torch.where(x > 0, torch.ones_like(x), _SELU_ALPHA * torch.exp(x))


def _selu_second(m, x, y):
    return _SELU_SCALE * torch.where(x > 0, torch.zeros_like(x), _SELU_ALPHA * torch.exp(x))


def _softplus_linear(m, x):
    return x * m.beta > m.threshold


def _softplus_first(m, x, y):
    s = torch.sigmoid(m.beta * x)
    return torch.where(_softplus_linear(m, x), torch.ones_like(x), s)


def _softplus_second(m, x, y):
    s = torch.sigmoid(m.beta * x)
    return torch.where(_softplus_linear(m, x), torch.zeros_like(x), m.beta * s * (1 - s))


def _silu_first(m, x, y):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _silu_second(m, x, y):
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


_SQRT_2PI = math.sqrt(2 * math.pi)
_GELU_K, _GELU_C = math.sqrt(2 / math.pi), 0.044715


def _gelu_tanh_parts(x):
    t = torch.tanh(_GELU_K * (x + _GELU_C * x**3))
    du = _GELU_K * (1 + 3 * _GELU_C * x**2)
    return t, du


def _gelu_first(m, x, y):
    if m.approximate == "tanh":
        t, du = _gelu_tanh_parts(x)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * du
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return cdf + x * torch.exp(-0.5 * x**2) / _SQRT_2PI


def _gelu_second(m, x, y):
    if m.approximate == "tanh":
        t, du = _gelu_tanh_parts(x)
        d2u = 6 * _GELU_K * _GELU_C * x
        return (1 - t**2) * (du + 0.5 * x * (d2u - 2 * t * du**2))
    return torch.exp(-0.5 * x**2) / _SQRT_2PI * (2 - x**2)


#: module type → (σ', σ''); ``σ''`` None for piecewise-linear maps.
ACTIVATIONS: dict[type[nn.Module], tuple[Derivative, Optional[Derivative]]] = {
    nn.Tanh: (lambda m, x, y: 1 - y.square(), lambda m, x, y: -2 * y * (1 - y.square())),
    nn.Sigmoid: (lambda m, x, y: y * (1 - y), lambda m, x, y: y * (1 - y) * (1 - 2 * y)),
    nn.ReLU: (_step, None),
    nn.LeakyReLU: (_leaky, None),
    nn.Hardtanh: (_hardtanh, None),
    nn.ELU: (_elu_first, _elu_second),
    nn.SELU: (_selu_first, _selu_second),
    nn.Softplus: (_softplus_first, _softplus_second),
    nn.SiLU: (_silu_first, _silu_second),
    nn.GELU: (_gelu_first, _gelu_second),
}


def _one(y: Tensor) -> Tensor:
    """A 0-d one of ``y``'s dtype and device (``addcmul(one, y, y, value=-1)`` is ``1 − y²`` in one
    op; a Python scalar operand costs about as much as a second op)."""
    key = (y.dtype, y.device)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), dtype=y.dtype, device=y.device)
    return one


_ONES: dict = {}


def _smooth_pair(streams: Streams, s: Tensor, add_second, gauss_newton: bool) -> tuple[Tensor, Tensor]:
    """``(s·g, s·(s·d + add_second(g)))`` (GN: ``s²·d``) for ``s = σ'``, ``add_second(t, g)`` adding
    ``(σ''/σ')·g`` to ``t`` in place. New tensors: ``s`` (made by the caller) and, unless the streams
    are owned (then ``d`` and ``g`` are overwritten), one more; the rest in place."""
    g, d = streams
    owned = streams.owned
    streams.clear()
    t = d.mul_(s) if owned else s * d
    del d
    if not gauss_newton:
        add_second(t, g)
    t.mul_(s)
    return (g.mul_(s) if owned else s.mul_(g)), t


def _tanh_pair(m, y, streams, gauss_newton):
    """``s = 1 − y²``, ``σ''/σ' = −2y``."""
    s = torch.addcmul(_one(y), y, y, value=-1)
    return _smooth_pair(streams, s, lambda t, g: t.addcmul_(y, g, value=-2), gauss_newton)


def _sigmoid_pair(m, y, streams, gauss_newton):
    """``s = y(1 − y)``, ``σ''/σ' = 1 − 2y`` (added as ``g − 2y·g``: no temporary)."""
    s = torch.addcmul(y, y, y, value=-1)
    return _smooth_pair(streams, s, lambda t, g: t.add_(g).addcmul_(y, g, value=-2), gauss_newton)


def _relu_pair(m, y, streams, gauss_newton):
    """``mask = y > 0`` (as ``x > 0``): ``(mask·g, mask·d)``, by autograd's own ReLU kernel, which
    also reads the output (no float mask made); ``g`` is dropped before ``D``'s result is made."""
    g, d = streams
    streams.clear()
    g_in = torch.ops.aten.threshold_backward(g, y, 0)
    del g
    return g_in, torch.ops.aten.threshold_backward(d, y, 0)


#: module type → the fused ``(g_in, d_in)`` of the commonest activations, in the fewest ops, from
#: the output alone (the engine then keeps no copy of the input, as autograd's own nodes); each
#: takes ``[g, d]`` as a list it empties (:meth:`Rule.fused_backward_from`)
PAIRS = {nn.Tanh: _tanh_pair, nn.Sigmoid: _sigmoid_pair, nn.ReLU: _relu_pair}


class DropoutRule(Rule):
    """``y = mask·x/(1−p)`` in training, identity in eval: ``d_in = (y≠0)/(1−p)² · d_out``."""

    def input_diag(self, module, x, y, d_out, g_out, gauss_newton):
        if not module.training or module.p == 0:
            return d_out
        return (y != 0).to(d_out.dtype) * d_out / (1 - module.p) ** 2
