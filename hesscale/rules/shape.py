"""Maps that only move entries: ``d_in`` is ``d_out`` reshaped back."""
from __future__ import annotations

from .base import Rule


class ReshapeRule(Rule):
    """``nn.Flatten``/``nn.Unflatten``: ``d_in = reshape(d_out, x.shape)``."""

    def input_diag(self, module, x, y, d_out, g_out, gauss_newton):
        return d_out.reshape(x.shape)
