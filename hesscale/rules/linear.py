"""``nn.Linear``: ``y = x Wᵀ + b``.

``ĥ_W = Σ_n d_outᵀ (x∘x)``, ``ĥ_b = Σ_n d_out``, ``d_in = d_out (W∘W)`` (off-diagonals dropped).
Extra leading dimensions of ``x`` (``[N, *, I]``) are summed like the batch.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Rule


class LinearRule(Rule):
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
