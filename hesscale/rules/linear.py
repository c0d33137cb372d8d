"""``nn.Linear``: ``y = x Wᵀ + b``.

``ĥ_W = Σ_n d_outᵀ (x∘x)``, ``ĥ_b = Σ_n d_out``, ``d_in = d_out (W∘W)`` (off-diagonals dropped).
Extra leading dimensions of ``x`` (``[N, *, I]``) are summed like the batch. Fused with the
gradient: ``∂L/∂W = gᵀx``, ``∂L/∂b = Σ_n g``, ``g_in = g W``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Rule


class LinearRule(Rule):
    fused = True
    fused_reads = frozenset({"x"})

    def param_diag(
        self, module: nn.Linear, x: Tensor, y: Tensor, d_out: Tensor, per_sample: bool
    ) -> dict[str, Tensor]:
        if per_sample:
            n = x.shape[0]
            x2 = x.reshape(n, -1, x.shape[-1]).square()
            d = d_out.reshape(n, -1, d_out.shape[-1])
            out = {"weight": torch.einsum("nto,nti->noi", d, x2)}
            if module.bias is not None:
                out["bias"] = d.sum(1)
            return out
        x2 = x.reshape(-1, x.shape[-1]).square()
        d = d_out.reshape(-1, d_out.shape[-1])
        out = {"weight": d.t().mm(x2)}
        if module.bias is not None:
            out["bias"] = d.sum(0)
        return out

    def input_diag(self, module, x, y, d_out, g_out, gauss_newton):
        return d_out.matmul(module.weight.square())

    def fused_backward(self, module, x, y, g_out, d_out, gauss_newton, per_sample, need_input):
        if x.dim() == 2:  # SB3's networks: no reshapes (each costs about a third of a small op)
            x2d, g, d = x, g_out, d_out
        else:
            x2d, g, d = x.reshape(-1, x.shape[-1]), g_out.reshape(-1, g_out.shape[-1]), d_out.reshape(-1, d_out.shape[-1])
        grads = {"weight": torch.mm(g.t(), x2d)}
        if per_sample:
            hess = self.param_diag(module, x, y, d_out, per_sample)
        else:
            hess = {"weight": torch.mm(d.t(), x2d.square())}
        if module.bias is not None:
            grads["bias"] = g.sum(0)
            if not per_sample:
                hess["bias"] = d.sum(0)
        if not need_input:
            return grads, hess, None, None
        w = module.weight
        if x.dim() == 2:
            return grads, hess, torch.mm(g, w), torch.mm(d, w.square())
        return grads, hess, g_out.matmul(w), d_out.matmul(w.square())
