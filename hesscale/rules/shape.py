"""Maps that only move entries: ``d_in`` is ``d_out`` reshaped back."""
from __future__ import annotations

from .base import Rule


class ReshapeRule(Rule):
    """``nn.Flatten``/``nn.Unflatten``/``nn.Identity``: ``d_in = reshape(d_out, x.shape)``, the
    gradient alike."""

    fused = True

    def input_diag(self, module, x, y, d_out, g_out, gauss_newton):
        return d_out.reshape(x.shape)

    def fused_backward(self, module, x, y, g_out, d_out, gauss_newton, per_sample, need_input):
        if not need_input:
            return {}, {}, None, None
        return {}, {}, g_out.reshape(x.shape), d_out.reshape(x.shape)
