"""``nn.Linear``: ``y = x Wᵀ + b``.

``ĥ_W = Σ_n d_outᵀ (x∘x)``, ``ĥ_b = Σ_n d_out``, ``d_in = d_out (W∘W)`` (off-diagonals dropped).
Extra leading dimensions of ``x`` (``[N, *, I]``) are summed like the batch. Fused with the
gradient: ``∂L/∂W = gᵀx``, ``∂L/∂b = Σ_n g``, ``g_in = g W``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Rule, Streams


class LinearRule(Rule):
    fused = True
    fused_reads = frozenset({"x"})
    fresh_outputs = True

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
        return self.fused_backward_from(module, x, y, Streams.of(g_out, d_out), gauss_newton, per_sample, need_input)

    def fused_backward_from(self, module, x, y, streams, gauss_newton, per_sample, need_input):
        """The curvature half first, ``D`` dropped after its last use, then the gradient half; each
        squared operand (``W∘W``, ``x∘x``) is freed by the product that reads it. At most ``g``,
        ``x``, ``D_in``, ``ĥ_W``, ``g_in``, ``∂L/∂W`` are alive together (autograd: ``g``, ``x``,
        ``g_in``, ``∂L/∂W``)."""
        g_out, d_out = streams
        streams.clear()
        w, bias = module.weight, module.bias is not None
        put = streams.destination  # the caller's storage for a result, else None (a fresh tensor)
        hw, hb, gw, gb = put("weight", 1), put("bias", 1), put("weight", 0), put("bias", 0)
        flat = x.dim() == 2  # SB3's networks: no reshapes (each costs about a third of a small op)
        x2d = x if flat else x.reshape(-1, x.shape[-1])
        d = d_out if flat else d_out.reshape(-1, d_out.shape[-1])
        d_in = None
        if need_input:
            d_in = torch.mm(d, w.square()) if flat else d_out.matmul(w.square())
        if per_sample:
            hess = self.param_diag(module, x, y, d_out, per_sample)
        else:
            hess = {"weight": torch.mm(d.t(), x2d.square(), out=hw)}
            if bias:
                hess["bias"] = torch.sum(d, 0, out=hb)
        del d, d_out  # the curvature stream is used up: free it before the gradient half
        g = g_out if flat else g_out.reshape(-1, g_out.shape[-1])
        g_in = None
        if need_input:
            g_in = torch.mm(g, w) if flat else g_out.matmul(w)
        grads = {"weight": torch.mm(g.t(), x2d, out=gw)}
        if bias:
            grads["bias"] = torch.sum(g, 0, out=gb)
        return grads, hess, g_in, d_in
