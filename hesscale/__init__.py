"""hesscale: HesScale Hessian-diagonal approximations at about the cost of a gradient.

Public API:

* :func:`hessian_diagonal` — ``param.hess_diag`` for a model, a loss and a batch;
* :class:`capture` — the same inside any training code (the agents use it);
* :func:`register_rule` — a rule for your own module type;
* :mod:`hesscale.optim` — AdaHesScale, step-size scaling, AdaHessian.

References: Elsayed & Mahmood, arXiv 2210.11639; Elsayed, Farrahi, Dangel & Mahmood, ICML 2024,
arXiv 2406.03276; Becker & LeCun 1989.
"""
from __future__ import annotations

import importlib
from typing import Any

from .names import SWEEP_METHODS

# PEP 562: the torch-backed parts load on first use, so `import hesscale.names` stays torch-free.
_EXPORTS = {
    "METHODS": ".api",
    "hessian_diagonal": ".api",
    "ElementwiseRule": ".rules",
    "Rule": ".rules",
    "Streams": ".rules",
    "UnsupportedModuleError": ".rules",
    "register_rule": ".rules",
    "supported_types": ".rules",
    "capture": ".sweep",
}

#: subpackages reachable as attributes after a bare ``import hesscale`` (``hesscale.optim.AdaHesScale``)
_SUBPACKAGES = ("optim",)

__all__ = ["SWEEP_METHODS", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it in globals()
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})
