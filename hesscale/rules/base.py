"""The interface every per-module rule implements.

A rule is pure math on one recorded call ``y = module(x)``: given the (approximate) per-sample
Hessian diagonal ``d_out = diag ∂²L/∂y²`` and, where needed, the gradient ``g_out = ∂L/∂y``, it
returns the curvature of the module's own parameters and the diagonal ``d_in`` passed on to ``x``.
No hooks, no state.
"""
from __future__ import annotations

from torch import Tensor, nn


class Rule:
    """Base class of a HesScale rule for one module type."""

    #: Whether :meth:`input_diag` needs ``g_out = ∂L/∂y`` (the σ''·g term of non-linear maps).
    needs_grad_output: bool = False

    def param_diag(
        self, module: nn.Module, x: Tensor, y: Tensor, d_out: Tensor, per_sample: bool
    ) -> dict[str, Tensor]:
        """Hessian diagonal of each direct parameter (by attribute name).

        With ``per_sample`` each tensor has a leading batch dimension ``[N, *param.shape]``.
        Parameter-free modules return ``{}``.
        """
        return {}

    def input_diag(
        self,
        module: nn.Module,
        x: Tensor,
        y: Tensor,
        d_out: Tensor,
        g_out: Tensor | None,
        gauss_newton: bool,
    ) -> Tensor:
        """Diagonal ``d_in`` of the loss Hessian w.r.t. the module input (same shape as ``x``)."""
        raise NotImplementedError
