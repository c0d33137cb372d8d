"""A2C, PPO and SAC on Stable-Baselines3 policies, updated through the HesScale core.

``agents.PPO("MlpPolicy", env, optimizer={...}, **sb3_kwargs)`` (same for ``A2C``, ``SAC``): the
``optimizer`` dict is described in :mod:`agents.optimizers`; ``None`` (or a first-order optimizer
without scaling) is SB3's own algorithm, bit for bit. Curvature optimizers go through one shared
update (:class:`agents.second_order.CurvatureUpdate`). A run that produces NaN/Inf stops ``learn()``
cleanly and sets ``model.divergence = {"step": ..., "reason": ...}`` (``None`` while healthy).

The exports load on first use (PEP 562): importing ``agents`` or a torch-free submodule
(``agents.optimizers``, ``agents.experiment.validation``) does not import torch or SB3.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "A2C": ".a2c",
    "PPO": ".ppo",
    "SAC": ".sac",
    "CurvatureUpdate": ".second_order",
    "CURVATURE_METHODS": ".optimizers",
    "OPTIMIZER_NAMES": ".optimizers",
    "normalize_optimizer_config": ".optimizers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:  # a submodule (``agents.optimizers``) or nothing
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
