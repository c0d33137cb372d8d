"""The interface every per-module rule implements.

A rule is pure math on one recorded call ``y = module(x)``: given the (approximate) per-sample
Hessian diagonal ``d_out = diag ∂²L/∂y²`` and, where needed, the gradient ``g_out = ∂L/∂y``, it
returns the curvature of the module's own parameters and the diagonal ``d_in`` passed on to ``x``.
A rule with ``fused = True`` also computes the gradient in the same pass
(:meth:`Rule.fused_backward`); the engine asks autograd for the others. No hooks, no state.
"""
from __future__ import annotations

from torch import Tensor, nn


class Streams(list):
    """``[g_out, d_out]`` handed to :meth:`Rule.fused_backward_from`, which empties it.

    ``owned``: the engine made both tensors (a fused rule's fresh results, or sums) and holds no
    other reference to them, nor does the caller: the rule may overwrite them in place.
    ``into``: None, or parameter name → ``(gradient, ĥ)`` tensors shaped like it (the gradient's
    may be None) that the rule may write its results for that parameter into and return (``out=``
    of the product that makes them); a rule that does not is still correct.
    """

    __slots__ = ("owned", "into")

    @classmethod
    def of(cls, g_out: Tensor, d_out: Tensor, owned: bool = False) -> "Streams":
        streams = cls((g_out, d_out))
        streams.owned = owned
        streams.into = None
        return streams

    def destination(self, name: str, which: int) -> Tensor | None:
        """Where to write parameter ``name``'s gradient (``which`` 0) or ĥ (1), if anywhere."""
        into = getattr(self, "into", None)
        dest = into.get(name) if into else None
        return dest[which] if dest is not None else None


class Rule:
    """Base class of a HesScale rule for one module type."""

    #: Whether :meth:`input_diag` needs ``g_out = ∂L/∂y`` (the σ''·g term of non-linear maps).
    needs_grad_output: bool = False
    #: Whether :meth:`fused_backward` is implemented (gradient and curvature in one pass).
    fused: bool = False
    #: Which of the recorded input ``"x"`` and output ``"y"`` :meth:`fused_backward` reads; the
    #: engine keeps only those from the forward to the backward (as autograd keeps only the tensors
    #: a node saves) and passes ``None`` for the other.
    fused_reads: frozenset[str] = frozenset({"x", "y"})
    #: Whether :meth:`fused_backward_from` returns ``g_in`` and ``d_in`` as tensors no one else
    #: holds (new, or its own ``owned`` streams; no views): the engine may then hand them on owned.
    fresh_outputs: bool = False

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

    def fused_backward(
        self,
        module: nn.Module,
        x: Tensor,
        y: Tensor,
        g_out: Tensor,
        d_out: Tensor,
        gauss_newton: bool,
        per_sample: bool,
        need_input: bool,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None, Tensor | None]:
        """``(grads, hess, g_in, d_in)``: the parameters' gradients ``∂L/∂θ`` and curvature (as
        :meth:`param_diag`), and, when ``need_input``, ``g_in = ∂L/∂x`` and ``d_in`` (as
        :meth:`input_diag`), else ``None``. Only for rules with ``fused = True``; ``x`` or ``y`` is
        ``None`` where :attr:`fused_reads` leaves it out."""
        raise NotImplementedError

    def fused_backward_from(
        self,
        module: nn.Module,
        x: Tensor,
        y: Tensor,
        streams: Streams,
        gauss_newton: bool,
        per_sample: bool,
        need_input: bool,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None, Tensor | None]:
        """:meth:`fused_backward` with ``[g_out, d_out]`` handed over in ``streams``, which the rule
        empties: the engine then holds neither, so a rule may drop each after its last use (as
        autograd frees a node's incoming gradient), and overwrite them where ``streams.owned``.
        The default empties it and calls :meth:`fused_backward`."""
        g_out, d_out = streams
        streams.clear()
        return self.fused_backward(module, x, y, g_out, d_out, gauss_newton, per_sample, need_input)
