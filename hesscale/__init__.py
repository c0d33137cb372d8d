"""hesscale: HesScale Hessian-diagonal approximations at about the cost of a gradient.

Public API:

* :func:`hessian_diagonal` — ``param.hess_diag`` for a model, a loss and a batch;
* :class:`capture` — the same inside any training code (the agents use it);
* :func:`register_rule` — a rule for your own module type;
* :mod:`hesscale.optim` — AdaHesScale, step-size scaling, AdaHessian.

References: Elsayed & Mahmood, arXiv 2210.11639; Elsayed, Farrahi, Dangel & Mahmood, ICML 2024,
arXiv 2406.03276; Becker & LeCun 1989.
"""
from .api import METHODS, hessian_diagonal
from .rules import ElementwiseRule, Rule, UnsupportedModuleError, register_rule, supported_types
from .sweep import SWEEP_METHODS, capture

__all__ = [
    "METHODS",
    "SWEEP_METHODS",
    "ElementwiseRule",
    "Rule",
    "UnsupportedModuleError",
    "capture",
    "hessian_diagonal",
    "register_rule",
    "supported_types",
]
