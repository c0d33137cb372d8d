"""``Call``: what the engine keeps of one forward call of a captured module until the backward.

As autograd keeps only the tensors a node saves, a call of a fused rule under ``no_grad`` keeps
only what :attr:`Rule.fused_reads <hesscale.rules.Rule.fused_reads>` names (a Linear its input
``x``, a tanh its output ``y``) and holds the output the forward code received (the *alias*) only
weakly: the forward code, or a graph that reads it, holds it for as long as it matters. Calls on
autograd's graph or on a local graph keep everything.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import Tensor, nn

from .between import OpChain
from .rules import Rule


@dataclass
class Call:
    module: nn.Module
    path: str
    rule: Rule
    x: Tensor | None  # input values (before any in-place change); None: the fused rule doesn't read it
    y: Tensor | None  # the module's real output; None: the fused rule doesn't read it
    held: Tensor | weakref.ref  # what the forward code received, or a weak reference to it
    producer: int | None  # index of the call whose output is ``x``
    chain: OpChain | None = None  # known operations on captured outputs that made ``x``
    graph: bool = True  # connected to autograd's graph (else run under no_grad or on a local graph)
    g_out: Tensor | None = None  # unfused route: ∂L/∂y caught by a tensor hook

    @property
    def alias(self) -> Tensor | None:
        """What the forward code received; None once nothing else holds it (a fused call)."""
        held = self.held
        return held() if type(held) is weakref.ref else held

